"""Scoring: stable studies -> the task's champion (in its served runtime) -> prediction rows.

Made for a backlog of thousands of studies as much as for the one that just arrived, so the
cost per study is the network's and little else:

- pending studies are found by one query per page of ids, then scored a chunk at a time, one
  transaction per chunk (``BATCHES_PER_TRANSACTION`` network batches); a page starts where the
  previous one ended in the queue (received_at, id), so the whole backlog is one pipeline that
  never drains at a page's end;
- a chunk is read as rows, not ORM objects: its studies' ids, then their series and each
  series' first image for routing (radflow.ingest.routing.candidates), in one query each;
- images come from the preprocessing cache (radflow.learning.cache: content digest + transform
digest),
  which training filled; a miss is fetched and decoded on threads and cached for the next
  scoring or training;
- a chunk's predictions are one INSERT, and its studies' status and triage pointer one
  executemany UPDATE, instead of a flush and two hook statements per prediction;
- the database work runs beside the network: one thread reads the next chunk and writes the
  previous one while PyTorch computes (mostly outside the GIL); on 2 cores this took the time
  outside the network from ~20% of the network's to ~4% (the network itself slows a little);
  the first chunk is read while the network is made ready (an ONNX Runtime session built);
- Grad-CAM maps are computed per network batch and written by threads, without an fsync each.

The champion scores in the runtime chosen for it (radflow.learning.variants: PyTorch fp32 unless
an ONNX variant that passed its non-inferiority check serves); each prediction records which.
Grad-CAM maps always come from the PyTorch weights, whatever computed the score. A segmentation
task scores each image or volume through its sliding window (radflow.learning.segmentation); a
3D one a volume per chunk (a 512x512x200 CT is 200 MB preprocessed).

A task on volumes routes each study to a series checked to be one volume from the index
(radflow.ingest.routing.route_studies) and loads it whole (radflow.dicom.volume); its Grad-CAM
map is a volume. With several tasks, each routes a study once: a task that does not apply (or
whose input fails) records why in a TaskOutcome row, and the study's own status is what the
tasks say together: SCORED if any scored it, else FAILED or NO_MODEL with their reasons.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sqlalchemy import (
    ColumnElement,
    Table,
    exists,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import (
    ModelStatus,
    ModelVariant,
    ModelVersion,
    Prediction,
    Study,
    StudyStatus,
    TaskOutcome,
    VariantRuntime,
    triage,
    unit_of_work,
)
from radflow.db.base import utcnow
from radflow.errors import NotAVolume
from radflow.ingest.routing import Image, RoutingRules, route_studies
from radflow.learning.cache import (
    CachedSeries,
    CacheItem,
    CacheStats,
    PreprocessCache,
    cache_item,
)
from radflow.learning.device import cpu_threads, select_device
from radflow.learning.explain import GRADCAM_NAME, GRADCAM_VOLUME_NAME, Explainer, save_heatmaps
from radflow.learning.inference import Runner, TorchRunner, load_network, load_runner
from radflow.learning.registry import require_champion
from radflow.learning.segmentation import Target, segment_studies
from radflow.learning.tasks import Task, get_task
from radflow.learning.variants import serving_variant
from radflow.settings import MAX_VOLUME_VOXELS
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)

BATCHES_PER_TRANSACTION = 8
"""Network batches per transaction: a commit, the queries and the bulk writes are paid once per
chunk, and a failure loses at most one chunk's work (it is scored again on the next run)."""
PENDING_PAGE = 4096
"""Study ids fetched per pending query; the query runs again until nothing is left."""
SCORABLE = (StudyStatus.STABLE, StudyStatus.SCORED, StudyStatus.NO_MODEL, StudyStatus.FAILED)
"""A study in one of these may still be pending for a task: another task may have scored it,
or found it not applicable or unreadable (see TaskOutcome)."""


@dataclass
class ScoreReport:
    """What one scoring did; reports of shards of one backlog add up (:meth:`add`)."""

    model: str = ""
    runtime: str = VariantRuntime.TORCH_FP32.value
    scored: int = 0
    no_model: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    seconds: float = 0.0
    network_seconds: float = 0.0  # of ``seconds``: the network (and Grad-CAM) alone

    def add(self, other: ScoreReport) -> None:
        if not self.model:
            self.model, self.runtime = other.model, other.runtime
        self.scored += other.scored
        self.no_model += other.no_model
        self.failed.update(other.failed)
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.seconds += other.seconds
        self.network_seconds += other.network_seconds

    def summary(self) -> str:
        return (
            f"{self.model} ({self.runtime}): scored {self.scored}, no applicable model "
            f"{self.no_model}, failed {len(self.failed)} in {self.seconds:.2f} s, "
            f"{self.network_seconds:.2f} s of it in the network (preprocessing cache: "
            f"{self.cache_hits} hits, {self.cache_misses} decoded)"
        )


@dataclass(frozen=True)
class _Inputs:
    """What reading a chunk needs (routing, the preprocessing cache): all but the network, so
    the first chunk is read while the network is made ready."""

    task: Task
    store: ObjectStore
    cache: PreprocessCache
    rules: RoutingRules | None
    max_voxels: int = MAX_VOLUME_VOXELS


@dataclass(frozen=True)
class _Scorer:
    """What every chunk of one scoring run uses."""

    inputs: _Inputs
    champion: ModelVersion
    runner: Runner
    explainer: Explainer | None  # Grad-CAM, always on the PyTorch weights
    device: torch.device
    batch_size: int

    @property
    def task(self) -> Task:
        return self.inputs.task

    @property
    def store(self) -> ObjectStore:
        return self.inputs.store

    @property
    def cache(self) -> PreprocessCache:
        return self.inputs.cache


def _pending_for(task: str, model_version_id: int) -> ColumnElement[bool]:
    """Studies that may be scored and that ``task``'s version has neither scored nor set aside."""
    set_aside = exists().where(TaskOutcome.study_id == Study.id, TaskOutcome.task == task)
    return Study.status.in_(SCORABLE) & _not_scored_by(model_version_id) & ~set_aside


def _not_scored_by(model_version_id: int) -> ColumnElement[bool]:
    current = exists().where(
        Prediction.study_id == Study.id,
        Prediction.model_version_id == model_version_id,
        # Spelled as the partial unique index uq_prediction_current spells it: SQLite uses a
        # partial index only for a condition it can match, and renders ~superseded as
        # "superseded = 0", which it does not (it then scans the version's predictions for
        # every study). PostgreSQL plans either spelling as an anti-join on that index.
        text(f"NOT {Prediction.__tablename__}.superseded"),
    )
    return ~current


class _Pending(NamedTuple):
    id: int
    study_uid: str
    received_at: datetime  # with ``id``, the study's place in the queue (oldest first)


def _pending(
    session: Session, champion: ModelVersion, limit: int, after: _Pending | None = None
) -> list[_Pending]:
    """Stable studies without a current prediction from this model version (and without an
    outcome of its task), oldest first; with ``after``, only those queued after that study.

    A reopened study's earlier predictions are superseded and its outcomes deleted
    (radflow.ingest.stability), so it is scored again as one whole study; after a promotion,
    studies scored by an earlier champion (and not reviewed yet) are pending again.
    """
    query = select(Study.id, Study.study_uid, Study.received_at).where(
        _pending_for(champion.task, champion.id)
    )
    if after is not None:
        # The next page by its place in the queue: a page read while the previous one's last
        # chunks are still in the network does not find them pending again. A row value
        # (received_at, id), which the received_at index serves on SQLite and PostgreSQL.
        query = query.where(tuple_(Study.received_at, Study.id) > (after.received_at, after.id))
    rows = session.execute(query.order_by(Study.received_at, Study.id).limit(limit))
    return [_Pending(row.id, row.study_uid, row.received_at) for row in rows]


def _load_pending(session: Session, champion: ModelVersion, ids: Sequence[int]) -> list[_Pending]:
    """The studies of ``ids`` still pending in this transaction, in the order of ``ids``."""
    found = session.execute(
        select(Study.id, Study.study_uid, Study.received_at).where(
            Study.id.in_(ids), _pending_for(champion.task, champion.id)
        )
    )
    by_id = {row.id: _Pending(row.id, row.study_uid, row.received_at) for row in found}
    return [by_id[i] for i in ids if i in by_id]


def _still_pending(session: Session, champion: ModelVersion, ids: Sequence[int]) -> set[int]:
    """Those of ``ids`` still pending in this transaction."""
    return set(
        session.scalars(
            select(Study.id).where(Study.id.in_(ids), _pending_for(champion.task, champion.id))
        )
    )


def has_pending(session: Session, task_name: str) -> bool:
    """Whether any stable study waits for the task's champion (False without a champion).

    Asked after every scoring run and by the reconciler every minute: one EXISTS, which stops
    at the first pending study and sorts nothing, on the champion's id alone (not its row,
    whose JSON config and metrics would be decoded for nothing).
    """
    champion_id = session.scalar(
        select(ModelVersion.id).where(
            ModelVersion.task == task_name, ModelVersion.status == ModelStatus.CHAMPION
        )
    )
    if champion_id is None:
        return False
    return bool(session.scalar(select(exists().where(_pending_for(task_name, champion_id)))))


def pending_ids(session: Session, task_name: str, limit: int = PENDING_PAGE) -> list[int]:
    """Ids of the studies waiting for the task's champion, oldest first (for sharding)."""
    champion = require_champion(session, task_name)
    return [study.id for study in _pending(session, champion, limit)]


def score_stable(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task_name: str,
    batch_size: int,
    *,
    explain: bool = True,
    threads: int | None = None,
    rules: RoutingRules | None = None,
    cache_dir: Path | None = None,
    ids: Sequence[int] | None = None,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> ScoreReport:
    """Score every stable study with the task's champion, one chunk of batches per transaction.

    Studies scored by an earlier champion and not reviewed yet count as pending too: after a
    promotion they are scored again (the earlier predictions stay, for history). With
    ``explain``, each prediction also stores a Grad-CAM heat map (radflow.learning.explain).
    ``rules``:
    the site's routing rules (radflow.ingest.routing.rules_for(settings)); None means the packaged
    ones.
    ``cache_dir``: the preprocessing cache (``settings.cache_dir``); None decodes every image.
    ``ids``: only these studies (those still pending), once: a shard of a backlog scored on
    several machines at once (flows/process.py).
    ``max_voxels``: the largest series a volume task assembles (``settings.max_volume_voxels``).
    """
    started = time.perf_counter()
    task = get_task(task_name)
    with unit_of_work(session_factory) as session:
        champion = require_champion(session, task.name)
        variant = serving_variant(session, champion)
    inputs = _Inputs(task, store, PreprocessCache(cache_dir, task), rules, max_voxels)
    # A volume segmentation holds a whole preprocessed series and its map per study: one study
    # per chunk (the next one read ahead while this one is segmented).
    size = 1 if task.segmentation and task.takes_series else batch_size * BATCHES_PER_TRANSACTION
    report = ScoreReport(model=champion.name)
    with (
        cpu_threads(threads),
        _heap_frozen(),
        _quick_gil_handoff(),
        ThreadPoolExecutor(1, thread_name_prefix="radflow-scoring-io") as io,
    ):
        if ids is not None:
            parts = _shard_parts(session_factory, champion, ids, size)
        else:
            parts = _pending_parts(session_factory, champion, size)
        # The io thread finds and reads the first chunk while this one makes the network ready
        # (an ONNX Runtime session builds and optimises its graph): both are a fixed cost of
        # every run, which a run scoring a few thousand studies in a second notices.
        first = io.submit(_read_next, session_factory, inputs, parts)
        scorer = _make_scorer(inputs, champion, variant, batch_size, threads, explain=explain)
        report.runtime = scorer.runner.runtime.value
        read = _score_parts(session_factory, scorer, parts, first, io, report)
        # Studies that became pending behind the queue's end while it was scored (a reopened
        # study stable again): another pass, until one finds none. Not for a shard: once.
        while read and ids is None:
            parts = _pending_parts(session_factory, champion, size)
            first = io.submit(_read_next, session_factory, inputs, parts)
            read = _score_parts(session_factory, scorer, parts, first, io, report)
    report.seconds = time.perf_counter() - started
    return report


def _make_scorer(
    inputs: _Inputs,
    champion: ModelVersion,
    variant: ModelVariant | None,
    batch_size: int,
    threads: int | None,
    *,
    explain: bool,
) -> _Scorer:
    """The champion's network in its served runtime, and Grad-CAM's on its PyTorch weights."""
    device = select_device()
    runner = load_runner(inputs.store, champion, variant, device, threads)
    cam_layer = champion.config.get("cam_layer", inputs.task.network.cam_layer)
    explainer = None
    if explain and cam_layer:
        network = (
            runner.network
            if isinstance(runner, TorchRunner)
            else load_network(inputs.store, champion, device)
        )
        explainer = Explainer(network, cam_layer)
    return _Scorer(inputs, champion, runner, explainer, device, batch_size)


def _pending_parts(
    session_factory: sessionmaker[Session], champion: ModelVersion, size: int
) -> Iterator[list[_Pending]]:
    """One pass over the queue: the studies pending when their page is read, ``size`` at a
    time, oldest first. Each page after the first starts after the previous one's last study,
    so it may be read while that page's last chunks are still being scored."""
    after: _Pending | None = None
    while True:
        with session_factory() as session:
            page = _pending(session, champion, PENDING_PAGE, after)
        if not page:
            return
        yield from (page[i : i + size] for i in range(0, len(page), size))
        after = page[-1]


def _shard_parts(
    session_factory: sessionmaker[Session], champion: ModelVersion, ids: Sequence[int], size: int
) -> Iterator[list[_Pending]]:
    """The studies of a shard still pending, ``size`` at a time."""
    with session_factory() as session:
        shard = _load_pending(session, champion, ids)
    yield from (shard[i : i + size] for i in range(0, len(shard), size))


def _read_next(
    session_factory: sessionmaker[Session], inputs: _Inputs, parts: Iterator[list[_Pending]]
) -> _Chunk | None:
    """The next chunk, read (None when ``parts`` ends). On the io thread only: ``parts`` queries
    the database as it goes."""
    part = next(parts, None)
    return _read_chunk(session_factory, inputs, part) if part is not None else None


def _score_parts(
    session_factory: sessionmaker[Session],
    scorer: _Scorer,
    parts: Iterator[list[_Pending]],
    first: Future[_Chunk | None],
    io: ThreadPoolExecutor,
    report: ScoreReport,
) -> bool:
    """Score ``parts`` (``first``: its first chunk, being read), a chunk at a time, the database
    work beside the network; whether there was any chunk.

    The network spends most of its time outside the GIL (PyTorch kernels, an ONNX Runtime
    call); meanwhile the ``io`` thread reads the next chunk (rows, cached tensors) and writes
    the previous one's predictions, in that order, one transaction per chunk (a failed write is
    raised here, at the latest one chunk later; its studies stay pending for the next run).
    """
    upcoming, writing = first, None
    any_chunk = False
    while (chunk := upcoming.result()) is not None:
        any_chunk = True
        upcoming = io.submit(_read_next, session_factory, scorer.inputs, parts)
        scored = _infer_chunk(scorer, chunk, report)
        if writing is not None:
            report.scored += writing.result()
        writing = io.submit(_write_chunk, session_factory, scorer, chunk, scored)
    if writing is not None:
        report.scored += writing.result()
    return any_chunk


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Python's cyclic GC skips the objects that exist now (gc.freeze) until the block ends.

    Loading a chunk's rows allocates thousands of ORM objects, which set off full collections;
    each walks every long-lived object of the process (PyTorch, MONAI, Prefect, pydantic
    models), which made the reading of a chunk three times slower. Objects made inside the
    block are collected as usual; unfreezing hands the rest back to the collector.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


GIL_SWITCH_SECONDS = 0.0005
"""Python's thread switch interval while scoring (its default is 0.005 s)."""


@contextlib.contextmanager
def _quick_gil_handoff() -> Iterator[None]:
    """The GIL changes hands within :data:`GIL_SWITCH_SECONDS` instead of Python's 5 ms.

    Each batch the network finishes (outside the GIL) has to take the GIL back to go on, and the
    ``io`` thread, busy with rows in Python, holds it until the switch interval makes it let go:
    up to 5 ms per batch of an int8 network that takes about 7 ms, which made scoring inside
    the process flow a third slower than the same runner alone. The interval is process-wide;
    the block restores it.
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@dataclass
class _Chunk:
    """One chunk's studies, read and preprocessed, waiting for the network."""

    started: float
    studies: list[_Pending]
    images: torch.Tensor | list[np.ndarray]  # a list for segmentation: sizes differ
    items: list[CacheItem] = field(default_factory=list)  # each study's input, as cached
    sources: list[str] = field(default_factory=list)  # each study's routed image (object key)
    ended: list[_Ended] = field(default_factory=list)  # studies that end unscored
    no_model: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)


def _read_chunk(
    session_factory: sessionmaker[Session], inputs: _Inputs, pending: Sequence[_Pending]
) -> _Chunk:
    """The studies of a chunk, routed, with their images.

    Reads only: the chunk's writes happen in :func:`_write_chunk`'s transaction, which scores
    only the studies still pending then (a study scored or reopened meanwhile is left alone); a
    chunk read ahead holds no lock (SQLite) while the one before it commits.
    """
    started = time.perf_counter()
    with session_factory() as session:
        routes = route_studies(
            session,
            [study.id for study in pending],
            inputs.task,
            inputs.rules,
            max_voxels=inputs.max_voxels,
        )
    ended: list[_Ended] = []
    routable: list[tuple[_Pending, Image, CacheItem]] = []
    for study in pending:
        routed = routes[study.id]
        if routed.instance is None:
            ended.append(_Ended(study.id, StudyStatus.NO_MODEL, routed.reason or ""))
        else:
            image = routed.instance
            routable.append((study, image, cache_item(image.sha256, image.object_key, routed.plan)))
    arrays, stats = inputs.cache.arrays(inputs.store, [item for _, _, item in routable])
    failed, ok, images, items, sources = {}, [], [], [], []
    for (study, image, item), array in zip(routable, arrays, strict=True):
        if isinstance(array, NotAVolume):
            # What only the pixels show (a multi-frame instance's frames): not applicable.
            reason = f"no series for {inputs.task.name} (loading the series: {array})"
            ended.append(_Ended(study.id, StudyStatus.NO_MODEL, reason))
        elif isinstance(array, Exception):
            # One undecodable image fails its own study, visibly, and not the chunk.
            ended.append(_Ended(study.id, StudyStatus.FAILED, f"preprocessing: {array}"))
            failed[study.study_uid] = str(array)
            logger.warning("study %s failed preprocessing: %s", study.id, array)
        else:
            ok.append(study)
            images.append(array)
            items.append(item)
            sources.append(image.object_key)
    no_model = sum(e.status == StudyStatus.NO_MODEL for e in ended)
    batch = images if inputs.task.segmentation else inputs.cache.stack(images)
    return _Chunk(started, ok, batch, items, sources, ended, no_model, failed, stats)


class _Ended(NamedTuple):
    """A study that ends its scoring without a score: NO_MODEL or FAILED, and why."""

    id: int
    status: StudyStatus
    reason: str


class _Scored(NamedTuple):
    scores: np.ndarray
    derived: list[dict[str, str]]  # each study's derived objects (heat map keys)


def _infer_chunk(scorer: _Scorer, chunk: _Chunk, report: ScoreReport) -> _Scored:
    """The network's scores (and stored heat maps) for a read chunk."""
    report.no_model += chunk.no_model
    report.failed.update(chunk.failed)
    report.cache_hits += chunk.stats.hits
    report.cache_misses += chunk.stats.misses
    if not chunk.studies:
        return _Scored(np.zeros(0), [])
    inferring = time.perf_counter()
    if isinstance(chunk.images, list):
        scores, derived = _segment(scorer, chunk.studies, chunk.items, chunk.sources, chunk.images)
    else:
        scores, derived = _infer(scorer, chunk.studies, chunk.images, chunk.items)
    report.network_seconds += time.perf_counter() - inferring
    return _Scored(scores, derived)


def _write_chunk(
    session_factory: sessionmaker[Session], scorer: _Scorer, chunk: _Chunk, scored: _Scored
) -> int:
    """A chunk's predictions and outcomes in one transaction; how many studies were scored.

    Only studies still pending when the transaction writes are written: one reopened by a late
    instance (radflow.ingest.stability) or scored by another run meanwhile is left as it now is.
    """
    with unit_of_work(session_factory) as session:
        ids = [study.id for study in chunk.studies] + [study.id for study in chunk.ended]
        still = _still_pending(session, scorer.champion, ids)
        if ended := [study for study in chunk.ended if study.id in still]:
            _set_aside(session, scorer.champion, ended)
        keep = [i for i, study in enumerate(chunk.studies) if study.id in still]
        if keep:
            # The chunk's time shared by its studies: what one study costs in a backlog.
            latency_ms = (time.perf_counter() - chunk.started) * 1000 / len(chunk.studies)
            _record(
                session,
                scorer,
                [chunk.studies[i] for i in keep],
                scored.scores[keep],
                [scored.derived[i] for i in keep],
                latency_ms,
            )
    return len(keep)


def _set_aside(session: Session, champion: ModelVersion, ended: Sequence[_Ended]) -> None:
    """Record why ``champion``'s task gives these studies no score, and set each study's
    status to what all tasks say together: a study another task scored stays SCORED; a failure
    of any task makes FAILED; else NO_MODEL. The status reason lists every task's reason."""
    now = utcnow()
    session.execute(
        insert(TaskOutcome),
        [
            {
                "study_id": study.id,
                "task": champion.task,
                "model_version_id": champion.id,
                "status": study.status,
                "reason": study.reason[:1024],
                "created_at": now,
            }
            for study in ended
        ],
    )
    ids = [study.id for study in ended]
    current = {
        row.id: row.status
        for row in session.execute(select(Study.id, Study.status).where(Study.id.in_(ids)))
    }
    outcomes: dict[int, list[tuple[StudyStatus, str]]] = {i: [] for i in ids}
    for study_id, status, reason in session.execute(
        select(TaskOutcome.study_id, TaskOutcome.status, TaskOutcome.reason)
        .where(TaskOutcome.study_id.in_(ids))
        .order_by(TaskOutcome.id)
    ):
        outcomes[study_id].append((status, reason))
    rows = [
        {
            "id": study_id,
            "status": StudyStatus.FAILED
            if any(status == StudyStatus.FAILED for status, _ in said)
            else StudyStatus.NO_MODEL,
            "status_reason": "; ".join(reason for _, reason in said)[:255],
            "updated_at": now,
        }
        for study_id, said in outcomes.items()
        if current.get(study_id) != StudyStatus.SCORED
    ]
    if rows:
        session.execute(update(Study), rows)


def _segment(
    scorer: _Scorer,
    studies: Sequence[_Pending],
    items: Sequence[CacheItem],
    sources: Sequence[str],
    images: Sequence[np.ndarray],
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Maps and SEGs (radflow.learning.segmentation), with the PyTorch weights: segmentation
    versions have no compressed variants (evaluation.PRIMARY_METRIC). A volume's SEG is over
    its series' slices in stack order, the order of the volume's first axis."""
    if not isinstance(scorer.runner, TorchRunner):
        raise TypeError(
            f"{scorer.champion.name} serves {scorer.runner.runtime.value}; a segmentation model "
            "scores only with its PyTorch weights: `radflow model serve ... --runtime torch-fp32`"
        )
    targets = [
        Target(
            study.study_uid,
            tuple(s.object_key for s in item.plan.slices),
            scorer.cache.affine(item),
        )
        if isinstance(item, CachedSeries)
        else Target(study.study_uid, (key,))
        for study, item, key in zip(studies, items, sources, strict=True)
    ]
    return segment_studies(
        scorer.store,
        scorer.task,
        scorer.champion,
        scorer.runner.network,
        scorer.device,
        targets,
        images,
    )


def _infer(
    scorer: _Scorer,
    studies: Sequence[_Pending],
    batch: torch.Tensor,
    items: Sequence[CacheItem],
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Scores, and with an explainer each study's stored heat map key."""
    if scorer.explainer is None:
        return scorer.runner.predict(batch, scorer.batch_size), [{} for _ in studies]
    scores, maps = [], []
    for part in torch.split(batch, scorer.batch_size):
        part_scores, part_maps = scorer.explainer(part, scorer.device)
        scores.append(part_scores)
        maps.append(part_maps)
    if scorer.runner.runtime != VariantRuntime.TORCH_FP32:
        # Grad-CAM's forward pass gave the PyTorch scores; the served runtime gives the score.
        scores = [scorer.runner.predict(batch, scorer.batch_size)]
    task, version = scorer.task.name, scorer.champion.version
    name = GRADCAM_VOLUME_NAME if scorer.task.takes_series else GRADCAM_NAME
    map_keys = [keys.derived(s.study_uid, task, version, name) for s in studies]
    affines = [scorer.cache.affine(item) for item in items]
    save_heatmaps(scorer.store, map_keys, np.concatenate(maps), affines)
    return np.concatenate(scores), [{"gradcam": key} for key in map_keys]


def _record(
    session: Session,
    scorer: _Scorer,
    studies: Sequence[_Pending],
    scores: np.ndarray,
    derived: Sequence[dict[str, str]],
    latency_ms: float,
) -> None:
    """The chunk's predictions in one INSERT; then its studies SCORED, with triage pointers."""
    task, champion = scorer.task, scorer.champion
    created = utcnow()
    # A Core INSERT on the table: the ORM's bulk path would inspect every row dict again. The
    # new ids come back with their study ids, in no particular order: asking SQLAlchemy for
    # them in parameter order made it insert (and fetch) one row at a time on SQLite, which
    # cost as much as the int8 network's whole forward pass.
    table: Table = Prediction.__table__  # type: ignore[assignment]  # mapped to a Table
    rows = (
        session.connection()
        .execute(
            insert(table).returning(table.c.study_id, table.c.id),
            [
                {
                    "study_id": study.id,
                    "model_version_id": champion.id,
                    "task": task.name,
                    "score": float(score),
                    "scores": {task.positive: float(score)},
                    "derived_keys": keys_out,
                    "latency_ms": latency_ms,
                    "created_at": created,
                    "superseded": False,
                    "runtime": scorer.runner.runtime,
                }
                for study, score, keys_out in zip(studies, scores, derived, strict=True)
            ],
        )
        .all()
    )
    inserted: dict[int, int] = {int(study_id): int(new_id) for study_id, new_id in rows}
    # A bulk INSERT skips the per-row ORM hook, so the triage pointers move here, in bulk.
    triage.advance(
        session.connection(),
        [
            triage.Move(study.id, inserted[study.id], triage.rank(float(score), champion.threshold))
            for study, score in zip(studies, scores, strict=True)
        ],
        status=StudyStatus.SCORED,
        status_reason=None,
    )

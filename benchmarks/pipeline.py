"""Pipeline benchmark: the production shape on one machine, ack to prediction, beside Orthanc.

    .venv/bin/python benchmarks/pipeline.py [--burst 30] [--trickle 25] [--trickle-interval 2]
                                            [--dask-studies 300] [--no-orthanc]

Starts what an operator starts (no Docker): PostgreSQL (``pgserver``), S3 (SeaweedFS), ``prefect
server start``, one ``radflow worker --pool process`` with its own data directory (another
machine's), and ``radflow receive`` (events to the server). A champion is trained first
(2 epochs on 16 labelled synthetic studies: the model's quality is not what is measured here).

Then DCMTK ``storescu`` sends synthetic chest radiographs (one association per study, each
timed until acknowledged): a single study, a burst of ``--burst`` back to back, and a trickle
of ``--trickle`` one every ``--trickle-interval`` seconds. During the trickle, once a process
run is Running (the worker's listener runs them in the worker's own process), the worker is
killed (SIGKILL of its process group: its flow runs die too) and started again at once, as a
supervisor (systemd, ``restart: unless-stopped``) would.

Side by side, every study also goes to Orthanc (Debian package) with ``StableAge`` equal to
Radflow's quiet period: the moment Orthanc reports the study stable (its ``StableStudy``
change, polled every 0.1 s) is where a pipeline built on a PACS (Kaapana, Orthanc plus scripts)
only starts its work, so it is the competitor's floor for ack-to-prediction.

Measured per study: acknowledged (storescu returned) to the first prediction stored. ``lost``:
acknowledged, never scored within ``--deadline`` s of the last send. ``cancelled_runs``: process
flow runs Cancelled; ``process_runs``: process flow runs by state (not the minute schedule's runs
still ahead). ``recovery_s``: worker kill to the next prediction stored (scoring
resumed); ``backlog_s``: kill to every study acknowledged before the kill scored.

With ``--dask-studies N`` (0 to skip), after the servers' part: N studies ingested directly and
scored by the process flow three ways, in turn: in its own process, with a local Dask cluster
of 1 worker, and of 2 workers (``RADFLOW_DASK_ADDRESS``); a warm-up pass fills the
preprocessing cache first, and predictions are deleted between passes.

Prints a table, then as the last line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import SecretStr
from sqlalchemy import delete, func, select, update

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / d) for d in ("", "flows", "ingest/receiver")]

from live import Worker, flow_runs, settings_env, worker_env  # noqa: E402
from peers import AE_TITLE, Orthanc, free_port, peer_env, wait_for_port  # noqa: E402
from servers import PostgresServer, PrefectServer, SeaweedS3  # noqa: E402

from demo.synthetic import write_cxr_studies  # noqa: E402
from radflow import ingest  # noqa: E402
from radflow.db import Prediction, Study, StudyStatus, unit_of_work  # noqa: E402
from radflow.learning import tasks  # noqa: E402
from radflow.learning.labels import add_label  # noqa: E402
from radflow.learning.tasks import TrainingPlan  # noqa: E402
from radflow.learning.training import train_task  # noqa: E402
from radflow.runtime import Runtime  # noqa: E402
from radflow.settings import Settings  # noqa: E402

Servers = tuple[PostgresServer, SeaweedS3, PrefectServer]
TASK = "pneumonia-cxr"
PROCESS = "process/process"
IMAGE_SIZE = 128


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# --------------------------------------------------------------------------------------------
# Sending and observing
# --------------------------------------------------------------------------------------------


def storescu(port: int, aet: str, folder: Path) -> float:
    """Send one study in one association; the moment (epoch) the last instance was acked."""
    sent = subprocess.run(
        ["storescu", "-aec", aet, "127.0.0.1", str(port), "+sd", str(folder)],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {sent.stderr[-2000:]}")
    return time.time()


class OrthancStable:
    """Polls Orthanc's changes for StableStudy; the moment each study was first seen stable."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.seen: dict[str, float] = {}
        self._since = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> OrthancStable:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            changes = self.orthanc.request("GET", f"/changes?since={self._since}&limit=200")
            now = time.time()
            for change in changes["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    study = self.orthanc.request("GET", f"/studies/{change['ID']}")
                    self.seen.setdefault(study["MainDicomTags"]["StudyInstanceUID"], now)
            self._since = changes["Last"]


def first_predictions(rt: Runtime, uids: list[str]) -> dict[str, float]:
    """Study UID -> when its first prediction was stored (epoch)."""
    with rt.session_factory() as session:
        rows = session.execute(
            select(Study.study_uid, func.min(Prediction.created_at))
            .join(Prediction, Prediction.study_id == Study.id)
            .where(Study.study_uid.in_(uids))
            .group_by(Study.study_uid)
        ).all()
    return {uid: epoch(when) for uid, when in rows}


def wait_scored(rt: Runtime, uids: list[str], deadline: float) -> dict[str, float]:
    while True:
        done = first_predictions(rt, uids)
        if len(done) == len(uids) or time.time() > deadline:
            return done
        time.sleep(0.5)


@dataclasses.dataclass
class Sent:
    phase: str
    uid: str
    radflow_ack: float
    orthanc_ack: float | None = None


# --------------------------------------------------------------------------------------------
# The production shape
# --------------------------------------------------------------------------------------------


@contextmanager
def receiver(settings: Settings, prefect: PrefectServer, work: Path) -> Iterator[int]:
    port = free_port()
    env = {**worker_env(settings, prefect, data_dir=work / "receiver"), "TCP_NODELAY": "1"}
    log = (work / "receiver.log").open("ab")
    command = [sys.executable, "-m", "cli.main", "receive", "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def train_champion(rt: Runtime, work: Path) -> None:
    studies = write_cxr_studies(work / "train", 16, seed=3, size=IMAGE_SIZE)
    ingest.ingest_files(
        ingest.find_files(work / "train"),
        settings=rt.settings,
        session_factory=rt.session_factory,
        store=rt.store,
    )
    with unit_of_work(rt.session_factory) as session:
        ingest.mark_stable(session, {s.study_uid for s in studies})
        for s in studies:
            value = "pneumonia" if s.positive else "normal"
            add_label(session, s.study_uid, TASK, value, source="bench", author="bench")
    train_task(rt.settings, rt.session_factory, rt.store, TASK, progress=False)


class Killer(threading.Thread):
    """Once a process run is Running (after ``after`` s), kill the worker and start it again:
    the worker's listener runs the process flow in the worker's own process, so the kill takes
    the scoring with it."""

    def __init__(self, workers: list[Worker], after: float, since: datetime) -> None:
        super().__init__(daemon=True)
        self.workers, self.after, self.since = workers, after, since
        self.killed_at: float | None = None
        self.running_run: str | None = None

    def run(self) -> None:
        # Prefect's temporary settings live in a context variable, which threads do not inherit.
        with temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
            self._kill_once()

    def _kill_once(self) -> None:
        time.sleep(self.after)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            running = _running_process_runs(self.since)
            if running:
                self.running_run = running[0].name
                break
            time.sleep(0.1)
        old = self.workers[-1]
        old.kill()
        self.killed_at = time.time()
        print(f"  worker killed during run {self.running_run}; started again", flush=True)
        self.workers.append(Worker(old.env, old.log.with_suffix(".restarted.log")).start())


def _running_process_runs(since: datetime) -> list[Any]:
    """Process flow runs Running: the deployment's, and those a worker's listener runs in its
    own process (flows/listener.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["process"])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(after_=since),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            ),
            limit=5,
        )


def production_settings(pg: PostgresServer, s3: SeaweedS3, data_dir: Path) -> Settings:
    """A fresh PostgreSQL database and S3 bucket; local files under ``data_dir``."""
    return Settings(
        data_dir=data_dir,
        database_url=pg.fresh_database(),
        store_url=f"s3://{s3.fresh_bucket_name()}",
        s3_endpoint=s3.endpoint,
        s3_access_key=s3.access_key,
        s3_secret_key=SecretStr(s3.secret_key),
        s3_secure=False,
        s3_region=None,
        receiver_host="127.0.0.1",
        pseudonym_key=SecretStr(secrets.token_hex(32)),  # the receiver refuses the public one
    )


def pipeline(args: argparse.Namespace, work: Path, servers: Servers) -> dict[str, Any]:
    quiet = Settings().stable_after_seconds
    pg, s3, prefect = servers
    settings = production_settings(pg, s3, work / "bench")
    with Runtime.open(settings) as rt:
        train_champion(rt, work)
        workers = [
            Worker(
                worker_env(settings, prefect, data_dir=work / "worker"), work / "worker.log"
            ).start()
        ]
        with orthanc_peer(args, work, quiet) as orthanc:
            workers[0].wait_serving()
            started = datetime.now(UTC)
            try:
                with receiver(settings, prefect, work) as port:
                    result = send_all(args, rt, work, port, orthanc, workers, started)
            finally:
                for worker in workers:
                    worker.stop()
        runs = flow_runs(PROCESS, started)
    states: dict[str, int] = {}
    for run in runs:
        if run.auto_scheduled and run.state_name == "Scheduled":
            continue  # the minute schedule's runs ahead, not work done
        states[run.state_name or "?"] = states.get(run.state_name or "?", 0) + 1
    result.update(
        quiet_period_s=quiet, process_runs=states, cancelled_runs=states.get("Cancelled", 0)
    )
    return result


@contextmanager
def orthanc_peer(
    args: argparse.Namespace, work: Path, quiet: float
) -> Iterator[tuple[Orthanc, OrthancStable] | None]:
    if args.no_orthanc:
        yield None
        return
    orthanc = Orthanc(work / "orthanc")
    config = json.loads(orthanc.config.read_text())
    orthanc.config.write_text(json.dumps({**config, "StableAge": int(quiet)}))
    with orthanc, OrthancStable(orthanc) as stable:
        yield orthanc, stable


def send_all(
    args: argparse.Namespace,
    rt: Runtime,
    work: Path,
    port: int,
    orthanc: tuple[Orthanc, OrthancStable] | None,
    workers: list[Worker],
    started: datetime,
) -> dict[str, Any]:
    sent: list[Sent] = []

    def send(phase: str, n: int, seed: int, interval: float = 0.0) -> None:
        folder = work / phase
        for i, study in enumerate(write_cxr_studies(folder, n, seed=seed, size=IMAGE_SIZE)):
            if i and interval:
                time.sleep(interval)
            one = Sent(phase, study.study_uid, storescu(port, AE_TITLE, folder / study.study_uid))
            if orthanc is not None:
                one.orthanc_ack = storescu(
                    orthanc[0].dicom_port, orthanc[0].aet, folder / study.study_uid
                )
            sent.append(one)

    print("single study", flush=True)
    send("single", 1, seed=11)
    wait_scored(rt, [s.uid for s in sent], time.time() + args.deadline)
    print(f"burst of {args.burst}", flush=True)
    send("burst", args.burst, seed=12)
    wait_scored(rt, [s.uid for s in sent], time.time() + args.deadline)
    print(
        f"trickle of {args.trickle}, one every {args.trickle_interval:g} s; a worker kill",
        flush=True,
    )
    killer = Killer(workers, after=args.trickle * args.trickle_interval / 3, since=started)
    killer.start()
    send("trickle", args.trickle, seed=13, interval=args.trickle_interval)
    killer.join()
    uids = [s.uid for s in sent]
    scored = wait_scored(rt, uids, time.time() + args.deadline)
    if orthanc is not None:  # Orthanc's last studies become stable StableAge after their ack
        time.sleep(Settings().stable_after_seconds + 3)
    return summarise(sent, scored, orthanc[1].seen if orthanc else {}, killer)


def summarise(
    sent: list[Sent], scored: dict[str, float], stable: dict[str, float], killer: Killer
) -> dict[str, Any]:
    out: dict[str, Any] = {"studies": len(sent)}
    latencies: dict[str, list[float]] = {}
    orthanc: dict[str, list[float]] = {}
    for s in sent:
        if s.uid in scored:
            latencies.setdefault(s.phase, []).append(scored[s.uid] - s.radflow_ack)
        if s.orthanc_ack is not None and s.uid in stable:
            orthanc.setdefault(s.phase, []).append(stable[s.uid] - s.orthanc_ack)
    every = [x for values in latencies.values() for x in values]
    out.update(
        p50_s=_round(statistics.median(every) if every else None),
        p95_s=_round(percentile(every, 0.95)),
        max_s=_round(max(every, default=None)),
        lost=sum(1 for s in sent if s.uid not in scored),
        phases={
            phase: {
                "n": len(values),
                "p50_s": _round(statistics.median(values)),
                "p95_s": _round(percentile(values, 0.95)),
                "max_s": _round(max(values)),
                "orthanc_stable_p50_s": _round(statistics.median(orthanc[phase]))
                if orthanc.get(phase)
                else None,
                "orthanc_stable_p95_s": _round(percentile(orthanc.get(phase, []), 0.95)),
            }
            for phase, values in latencies.items()
        },
        orthanc_stable_p50_s=_round(
            statistics.median([x for v in orthanc.values() for x in v]) if orthanc else None
        ),
        orthanc_stable_p95_s=_round(percentile([x for v in orthanc.values() for x in v], 0.95)),
        orthanc_unstable=sum(1 for s in sent if s.orthanc_ack is not None and s.uid not in stable),
    )
    killed = killer.killed_at
    if killed is not None:
        after = [t for t in scored.values() if t > killed]
        before = [s.uid for s in sent if s.radflow_ack < killed]
        pending = [scored.get(uid) for uid in before]
        out["recovery_s"] = _round(min(after) - killed if after else None)
        out["backlog_s"] = _round(
            max(0.0, max(t for t in pending if t is not None) - killed)
            if all(t is not None for t in pending)
            else None
        )
        out["killed_during_run"] = killer.running_run
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# --------------------------------------------------------------------------------------------
# Dask scale-out
# --------------------------------------------------------------------------------------------


def dask_scaling(n: int, work: Path, servers: Servers) -> dict[str, Any]:
    """Scoring throughput of the process flow: own process, Dask 1 worker, Dask 2 workers."""
    from distributed import LocalCluster

    from flows.process import process_flow

    settings = production_settings(servers[0], servers[1], work / "dask")
    os.environ.update(settings_env(settings))
    os.environ["RADFLOW_DASK_SHARD_STUDIES"] = str(max(1, math.ceil(n / 8)))
    with Runtime.open(settings) as rt:
        train_champion(rt, work / "dask-train")
        folder = work / "dask-studies"
        write_cxr_studies(folder, n, seed=21, size=IMAGE_SIZE)
        ingest.ingest_files(
            ingest.find_files(folder),
            settings=rt.settings,
            session_factory=rt.session_factory,
            store=rt.store,
        )
        with unit_of_work(rt.session_factory) as session:
            session.execute(
                update(Study)
                .where(Study.status == StudyStatus.RECEIVING)
                .values(status=StudyStatus.STABLE)
            )

        def timed(address: str | None) -> float:
            reset(rt)
            if address:
                os.environ["RADFLOW_DASK_ADDRESS"] = address
            else:
                os.environ.pop("RADFLOW_DASK_ADDRESS", None)
            start = time.perf_counter()
            result = process_flow(TASK)
            seconds = time.perf_counter() - start
            assert result["scored"] == total and not result["failed"], result
            return seconds

        with rt.session_factory() as session:
            total = session.scalar(select(func.count()).select_from(Study)) or 0
        timed(None)  # warm-up: fills the preprocessing cache
        rates: dict[str, float] = {}
        rates["own_process"] = total / timed(None)
        for workers in (1, 2):
            with LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster:
                address = cluster.scheduler_address
                timed(address)  # warm-up: the workers import PyTorch and the model
                rates[f"dask_{workers}"] = total / timed(address)
        os.environ.pop("RADFLOW_DASK_ADDRESS", None)
    return {
        "dask_studies": total,
        "studies_per_s": {k: round(v, 1) for k, v in rates.items()},
        "dask_2_vs_1": round(rates["dask_2"] / rates["dask_1"], 2),
        "dask_2_vs_own_process": round(rates["dask_2"] / rates["own_process"], 2),
    }


def reset(rt: Runtime) -> None:
    """Every study pending again: predictions deleted, status back to STABLE."""
    with unit_of_work(rt.session_factory) as session:
        session.execute(delete(Prediction))
        session.execute(update(Study).values(status=StudyStatus.STABLE))


# --------------------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> None:
    print()
    print(
        f"{'phase':<10} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7}   Orthanc stable p50/p95 s"
    )
    for phase, row in r.get("phases", {}).items():
        print(
            f"{phase:<10} {row['n']:>4} {row['p50_s']:>7} {row['p95_s']:>7} {row['max_s']:>7}"
            f"   {row['orthanc_stable_p50_s']}/{row['orthanc_stable_p95_s']}"
        )
    print(
        f"all: p50 {r.get('p50_s')} s, p95 {r.get('p95_s')} s, lost {r.get('lost')}, "
        f"cancelled runs {r.get('cancelled_runs')}, recovery {r.get('recovery_s')} s, "
        f"backlog after the kill cleared in {r.get('backlog_s')} s"
    )
    print(f"process flow runs by state: {r.get('process_runs')}")
    if "studies_per_s" in r:
        print(f"Dask, {r['dask_studies']} studies, studies/s: {r['studies_per_s']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=int, default=30)
    parser.add_argument("--trickle", type=int, default=25)
    parser.add_argument("--trickle-interval", type=float, default=2.0)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds to wait for scores")
    parser.add_argument("--dask-studies", type=int, default=300)
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs of every process)"
    )
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("needs DCMTK's storescu (apt-get install dcmtk)")
    plan = TrainingPlan(epochs=2, batch_size=8, min_labels=8)
    tasks.TASKS[TASK] = dataclasses.replace(tasks.get_task(TASK), plan=plan)
    work = Path(tempfile.mkdtemp(prefix="radflow-pipeline-"))
    result: dict[str, Any] = {}
    try:
        with (
            PostgresServer.start() as pg,
            SeaweedS3.start() as s3,
            PrefectServer.start() as prefect,
        ):
            # This process asks the server about runs, and the Dask part's flows run against
            # it. Prefect read its settings when tests/flows/live.py imported it: the variables
            # are for the processes started here, the temporary settings for this one.
            os.environ.update(prefect.env())
            servers = (pg, s3, prefect)
            try:
                with temporary_settings(updates={PREFECT_API_URL: prefect.api_url}):
                    if not args.skip_pipeline:
                        result.update(pipeline(args, work, servers))
                    if args.dask_studies:
                        result.update(dask_scaling(args.dask_studies, work, servers))
            finally:
                if args.keep:  # the server's own home goes with it
                    shutil.copy(prefect.log_path, work / "prefect-server.log")
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

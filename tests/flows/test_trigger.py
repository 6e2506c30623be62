"""The trigger: stable studies emit radflow.study.stable with a server (one event per pass, not
per study), run process without."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from factories import dicom_bytes
from live import server_events, wait_until
from pydicom.uid import generate_uid
from servers import PrefectServer
from sqlalchemy import func, select

from demo.synthetic import write_cxr_studies
from flows import trigger
from flows.deployments import stable_study_trigger
from flows.launcher import LISTENING_LEASE, listening_run
from flows.listener import Listener
from flows.trigger import STABLE_EVENT, Handoff, stabilise_and_process, trigger_mode
from radflow import ingest, leases
from radflow.db import Study, StudyStatus, unit_of_work
from radflow.db.base import utcnow
from radflow.db.delivery import ResultKind, ResultObject
from radflow.ingest.stability import promote_stable
from radflow.learning.labels import add_label
from radflow.learning.training import train_task
from radflow.runtime import Runtime
from radflow.settings import Settings


def _receive(rt: Runtime, folder: Path, n: int) -> list[str]:
    uids = [generate_uid() for _ in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    for uid in uids:
        (folder / f"{uid}.dcm").write_bytes(dicom_bytes(study_uid=uid))
    ingest.ingest_files(
        ingest.find_files(folder),
        settings=rt.settings,
        session_factory=rt.session_factory,
        store=rt.store,
    )
    return uids


def test_stable_studies_emit_events_for_the_deployment_trigger(
    flow_env: Settings, no_waiting_runs: PrefectServer, tmp_path: Path
) -> None:
    assert trigger_mode() == "event"  # the session's Prefect server sets PREFECT_API_URL
    since = utcnow()
    with Runtime.open(flow_env) as rt:
        uids = _receive(rt, tmp_path / "in", 2)
        assert stabilise_and_process(rt).promoted == []  # still inside the quiet period
        result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6))
        with rt.session_factory() as session:
            ids = {s.study_uid: s.id for s in session.scalars(select(Study))}
    expected = ",".join(str(i) for i in sorted(ids.values()))
    assert result.mode == "event"
    assert sorted(p.study_uid for p in result.promoted) == sorted(uids)
    # One event for the pass, whatever its size: a burst starts one run, not one per study.
    # Posted to the server, which has it (not queued in this process's memory).
    (event,) = wait_until(
        lambda: [
            e
            for e in server_events(no_waiting_runs, STABLE_EVENT, since)
            if e["radflow.study-ids"] == expected
        ],
        30,
        "the stable-study event never reached the server",
    )
    assert event["radflow.studies"] == "2"
    assert not any(uid in event.model_dump_json() for uid in uids)  # no UIDs leave the database
    # The process deployment listens for exactly these events, and scores every task.
    trigger = stable_study_trigger()
    assert trigger.expect == {STABLE_EVENT}
    assert trigger.match.matches(event)
    assert not trigger.parameters


def test_a_server_too_slow_to_say_whether_a_run_waits_gets_the_event_anyway(
    flow_env: Settings,
    no_waiting_runs: PrefectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a worker restart the server did not answer the "is a run waiting?" query within
    its timeout for 30 s and more; the promoted studies got no event and waited for the minute
    schedule (a trickle's p95 of 70 s)."""

    def stalled() -> bool:
        raise httpx.ReadTimeout("timed out")

    monkeypatch.setattr(trigger, "event_run_waiting", stalled)
    with Runtime.open(flow_env) as rt:
        _receive(rt, tmp_path / "in", 1)
        result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6))
    assert result.emitted and len(result.promoted) == 1


def test_embedded_default_processes_directly(flow_env: Settings, tmp_path: Path) -> None:
    with Runtime.open(flow_env) as rt:
        _receive(rt, tmp_path / "in", 1)
        result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6), mode="direct")
        with rt.session_factory() as session:
            statuses = set(session.scalars(select(Study.status)))
    assert result.mode == "direct" and len(result.promoted) == 1
    # No champion yet: nothing to run; the study waits as STABLE for the first model.
    assert result.processed == {} and statuses == {StudyStatus.STABLE}


def test_an_event_the_server_never_got_leaves_the_studies_for_the_reconciler(
    flow_env: Settings, tmp_path: Path
) -> None:
    """Defect 4: events lived in the receiver's memory, and went with it when it restarted
    while the server was down. Now the caller hears that the event was not delivered (the
    receiver logs it and goes on), and the studies stay STABLE in the database, which is what
    the reconciler (worker start, the process schedule, a new champion) scores."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with Runtime.open(flow_env) as rt:
        uids = _receive(rt, tmp_path / "in", 2)
        with (
            temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}),
            pytest.raises(httpx.ConnectError),
        ):
            stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6))
        with rt.session_factory() as session:
            statuses = dict(session.execute(select(Study.study_uid, Study.status)).tuples().all())
    assert statuses == {uid: StudyStatus.STABLE for uid in uids}


SQLITE_ONLY = pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)


@SQLITE_ONLY
def test_the_workers_listener_scores_stable_studies_in_its_own_process(
    flow_env: Settings, quick_task: str, no_waiting_runs: PrefectServer, tmp_path: Path
) -> None:
    """A flow run costs a new process importing PyTorch and MONAI (~8 s of CPU on 2 cores, most
    of a study's latency in benchmarks/pipeline.py). The worker's listener scores studies that
    become stable in the worker's process, with no event and no new process, writes their SRs,
    and lets go of its lease when stopped."""
    with Runtime.open(flow_env) as rt:
        _train_champion(rt, quick_task, tmp_path / "labelled")
        listener = Listener(flow_env).start()
        try:
            live = wait_until(lambda: listening_run(rt), 60, "the listener never listened")
            assert live.holder == listener.holder
            _wait_statuses(rt, {StudyStatus.SCORED})  # what was stable already
            uids = _receive(rt, tmp_path / "late", 3)
            handoff = Handoff()
            now = utcnow() + timedelta(seconds=6)
            result = stabilise_and_process(rt, now=now, handoff=handoff)
            assert result.listener == listener.holder and not result.emitted
            assert handoff.listener is not None and len(handoff.studies) == 3
            statuses = _wait_statuses(rt, {StudyStatus.SCORED})
            wait_until(lambda: _reports(rt) == len(statuses), 60, "the SRs were never written")
        finally:
            listener.stop()
        assert listening_run(rt) is None  # let go
        # The next pass sees the listener let go (after its last look): nothing to follow.
        assert not stabilise_and_process(rt, handoff=handoff).emitted
        assert handoff.listener is None
    assert set(uids) <= set(statuses) and len(statuses) == 12 + 3


def _wait_statuses(rt: Runtime, wanted: set[StudyStatus]) -> dict[str, StudyStatus]:
    def statuses() -> dict[str, StudyStatus] | None:
        with rt.session_factory() as session:
            found = dict(session.execute(select(Study.study_uid, Study.status)).tuples().all())
        return found if set(found.values()) == wanted else None

    found: dict[str, StudyStatus] = wait_until(statuses, 60, f"studies never all {wanted}")
    return found


def _reports(rt: Runtime) -> int:
    with rt.session_factory() as session:
        return int(
            session.scalar(select(func.count()).where(ResultObject.kind == ResultKind.SR)) or 0
        )


@SQLITE_ONLY
def test_studies_handed_to_a_listener_that_died_get_their_event(
    flow_env: Settings, no_waiting_runs: PrefectServer, tmp_path: Path
) -> None:
    """A listener whose worker is killed stops renewing its lease: the studies handed to it
    would wait for the minute schedule. The receiver's next pass after the lease ran out
    emits their event."""
    with Runtime.open(flow_env) as rt:
        ttl = timedelta(seconds=2.5)
        assert leases.try_acquire(rt.session_factory, LISTENING_LEASE, "flow-run/alive", ttl).ok
        _receive(rt, tmp_path / "first", 1)
        handoff = Handoff()
        result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6), handoff=handoff)
        assert result.listener == "flow-run/alive" and not result.emitted
        # Renewed after the handoff: the listener lives, and takes the study.
        assert leases.renew(rt.session_factory, LISTENING_LEASE, "flow-run/alive", ttl)
        assert not stabilise_and_process(rt, handoff=handoff).emitted
        assert handoff.listener is None

        since = utcnow()
        _receive(rt, tmp_path / "second", 2)
        result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6), handoff=handoff)
        assert result.listener == "flow-run/alive" and not result.emitted
        assert not stabilise_and_process(rt, handoff=handoff).emitted  # still live: waits
        time.sleep(ttl.total_seconds())  # no renewal: its worker died
        assert stabilise_and_process(rt, handoff=handoff).emitted
        assert handoff.listener is None
        with rt.session_factory() as session:
            ids = sorted(session.scalars(select(Study.id).order_by(Study.id)))[-2:]
    wait_until(
        lambda: [
            e
            for e in server_events(no_waiting_runs, STABLE_EVENT, since)
            if e["radflow.study-ids"] == ",".join(map(str, ids))
        ],
        30,
        "the handed-over studies' event never reached the server",
    )


def _train_champion(rt: Runtime, task: str, folder: Path) -> None:
    studies = write_cxr_studies(folder, 12, seed=5, size=64)
    ingest.ingest_files(
        ingest.find_files(folder),
        settings=rt.settings,
        session_factory=rt.session_factory,
        store=rt.store,
    )
    _promote_now(rt)
    with unit_of_work(rt.session_factory) as session:
        for study in studies:
            value = "pneumonia" if study.positive else "normal"
            add_label(session, study.study_uid, task, value, source="test", author="tester")
    train_task(rt.settings, rt.session_factory, rt.store, task, progress=False)


def _promote_now(rt: Runtime) -> None:
    with unit_of_work(rt.session_factory) as session:
        promote_stable(session, utcnow() + timedelta(seconds=60), rt.settings.stable_after_seconds)

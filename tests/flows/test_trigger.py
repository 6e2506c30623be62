"""The trigger: stable studies emit radflow.study.stable with a server (one event per pass, not
per study), run process without."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from factories import dicom_bytes
from live import server_events, wait_until
from pydicom.uid import generate_uid
from servers import PrefectServer
from sqlalchemy import select

from flows import trigger
from flows.deployments import stable_study_trigger
from flows.trigger import STABLE_EVENT, stabilise_and_process, trigger_mode
from radflow import ingest
from radflow.db import Study, StudyStatus
from radflow.db.base import utcnow
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

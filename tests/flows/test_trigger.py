"""The trigger: stable studies emit radflow.study.stable with a server (one event per pass, not
per study), run process without."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from factories import dicom_bytes
from prefect.events.clients import AssertingEventsClient
from prefect.events.worker import EventsWorker
from prefect.testing.fixtures import asserting_events_worker  # noqa: F401  (fixture)
from pydicom.uid import generate_uid
from sqlalchemy import select

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
    flow_env: Settings,
    asserting_events_worker: EventsWorker,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert trigger_mode() == "event"  # the session's Prefect server sets PREFECT_API_URL
    with Runtime.open(flow_env) as rt:
        uids = _receive(rt, tmp_path / "in", 2)
        assert stabilise_and_process(rt).promoted == []  # still inside the quiet period
        result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6))
        with rt.session_factory() as session:
            ids = {s.study_uid: s.id for s in session.scalars(select(Study))}
    assert result.mode == "event"
    assert sorted(p.study_uid for p in result.promoted) == sorted(uids)
    asserting_events_worker.drain()
    client = asserting_events_worker._client
    assert isinstance(client, AssertingEventsClient)
    # One event for the pass, whatever its size: a burst starts one run, not one per study.
    (event,) = [e for e in client.events if e.event == STABLE_EVENT]
    assert event.resource["radflow.studies"] == "2"
    assert event.resource["radflow.study-ids"] == ",".join(
        str(ids[u]) for u in sorted(uids, key=ids.get)
    )
    assert not any(uid in event.model_dump_json() for uid in uids)  # no UIDs leave the database
    # The process deployment listens for exactly these events, and scores every task.
    trigger = stable_study_trigger()
    assert trigger.expect == {STABLE_EVENT}
    assert trigger.match.matches(event.resource)
    assert not trigger.parameters


def test_embedded_default_processes_directly(flow_env: Settings, tmp_path: Path) -> None:
    with Runtime.open(flow_env) as rt:
        _receive(rt, tmp_path / "in", 1)
        result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=6), mode="direct")
        with rt.session_factory() as session:
            statuses = set(session.scalars(select(Study.status)))
    assert result.mode == "direct" and len(result.promoted) == 1
    # No champion yet: nothing to run; the study waits as STABLE for the first model.
    assert result.processed == {} and statuses == {StudyStatus.STABLE}

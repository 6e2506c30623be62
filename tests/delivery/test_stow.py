"""Sending results by DICOMweb STOW-RS: to a real Orthanc (its DICOMweb plugin) they arrive
under their study; a wrong URL or a server that does not answer is retried; each object's
outcome is read from the answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dicom_sources import radiograph
from ingest.receiver.peers import Orthanc, free_port
from outbound import scored_segmentation, stored_in
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Delivery, ResultObject
from radflow.delivery.outbox import send_due
from radflow.delivery.outgoing import DestinationUnavailable, ObjectRefused, Outgoing
from radflow.delivery.reports import write_reports
from radflow.delivery.stow import outcomes
from radflow.dicom.seg import part10
from radflow.ingest.routing import Destination, RoutingRules, parse_rules
from radflow.settings import Settings
from radflow.store import ObjectStore


@pytest.fixture(scope="module")
def dicomweb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc-web"), dicomweb=True) as pacs:
        yield pacs


def _stow_rules(urls: dict[str, str], task: str) -> RoutingRules:
    return parse_rules(
        json.dumps(
            {
                "destinations": [{"name": name, "stow_url": url} for name, url in urls.items()],
                "rules": [{"name": "everything", "task": task, "send_to": list(urls)}],
            }
        ),
        "(test)",
    )


def test_results_sent_by_stow_rs_arrive_under_their_study(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    dicomweb: Orthanc,
    segmentation_task: str,
) -> None:
    study_uid = scored_segmentation(settings, session_factory, store, tmp_path / "in")
    routing = _stow_rules(
        {
            "web": dicomweb.stow_url,
            "wrong-path": f"{dicomweb.url}/no-dicom-web/studies",
            "down": f"http://127.0.0.1:{free_port()}/dicom-web/studies",
        },
        segmentation_task,
    )
    write_reports(session_factory, store, routing)

    report = send_due(session_factory, store, settings, routing)

    assert (report.sent, report.retrying, report.parked) == (2, 4, 0)
    with session_factory() as session:
        made = {r.sop_instance_uid: r.kind.value for r in session.scalars(select(ResultObject))}
        reasons = {
            d.destination: d.last_error
            for d in session.scalars(select(Delivery).where(Delivery.status != "sent"))
        }
        sent = session.scalars(select(Delivery.destination).where(Delivery.status == "sent"))
        assert set(sent) == {"web"}
    assert stored_in(dicomweb, study_uid) == {uid: kind.upper() for uid, kind in made.items()}
    assert "answered HTTP 404 Not Found; check the URL" in (reasons["wrong-path"] or "")
    assert "cannot reach down" in (reasons["down"] or "")


def _items(count: int) -> list[Outgoing]:
    images = [radiograph(16) for _ in range(count)]
    return [Outgoing(i, part10(image), image) for i, image in enumerate(images)]


def _answer(
    status: int, items: list[Outgoing], stored: list[int], failed: dict[int, int]
) -> httpx.Response:
    """A STOW-RS answer (DICOM JSON) listing ``stored`` and ``failed`` (index -> reason)."""

    def sop(index: int) -> dict[str, object]:
        return {"00081155": {"vr": "UI", "Value": [str(items[index].dataset.SOPInstanceUID)]}}

    body = {
        "00081199": {"vr": "SQ", "Value": [sop(i) for i in stored]},
        "00081198": {
            "vr": "SQ",
            "Value": [
                {**sop(i), "00081197": {"vr": "US", "Value": [r]}} for i, r in failed.items()
            ],
        },
    }
    return httpx.Response(status, json=body)


def test_each_objects_outcome_is_read_from_the_answer() -> None:
    web = Destination(name="web", stow_url="http://pacs/dicom-web/studies")
    items = _items(3)

    # 202: some failed; out of resources (0xA700) is retried, a refusal (0xC000) is not.
    partly = outcomes(web, items, _answer(202, items, [0], {1: 0xA700, 2: 0xC000}))
    assert partly[0] is None
    assert isinstance(partly[1], DestinationUnavailable) and "0xA700" in str(partly[1])
    assert isinstance(partly[2], ObjectRefused) and "0xC000" in str(partly[2])
    # 409: what the answer does not list as stored was refused.
    conflict = outcomes(web, items, _answer(409, items, [1], {}))
    assert conflict[1] is None
    assert all(isinstance(conflict[i], ObjectRefused) for i in (0, 2))
    assert "answered HTTP 409 Conflict and did not store" in str(conflict[0])
    # 200 without a DICOM JSON body: all stored.
    assert outcomes(web, items, httpx.Response(200, text="ok")) == dict.fromkeys(range(3))
    # A busy server: the destination is unavailable for now.
    with pytest.raises(DestinationUnavailable, match="HTTP 503 Service Unavailable"):
        outcomes(web, items, httpx.Response(503))

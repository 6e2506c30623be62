"""The deliver flow through Prefect: newly scored studies get their SR, sent to a real Orthanc;
a refusing destination and a study whose image is gone do not fail the run for the others;
runs that overlap write each report once."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from dicom_sources import ingest, radiograph, score
from ingest.receiver.peers import Orthanc
from sqlalchemy import select

from flows.deliver import REPORTS_LEASE, deliver_flow
from radflow import leases
from radflow.db import (
    Delivery,
    DeliveryStatus,
    Instance,
    ResultKind,
    ResultObject,
    make_engine,
    make_sessionmaker,
)
from radflow.settings import Settings
from radflow.store import open_store


def test_deliver_sends_reports_and_records_what_failed(
    flow_env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(flow_env.database_url)
    factory, store = make_sessionmaker(engine), open_store(flow_env)
    images = [radiograph() for _ in range(3)]
    for image in images:
        uid = ingest([image], tmp_path / str(image.SOPInstanceUID), flow_env, factory, store)
        score(factory, uid, 0.7)
    with factory() as session:
        lost = session.scalar(
            select(Instance.object_key).where(Instance.sop_instance_uid == images[2].SOPInstanceUID)
        )
    assert lost is not None
    store.delete(lost)

    with Orthanc(tmp_path / "orthanc", check_called_aet=True) as pacs:
        routing = tmp_path / "routing.yaml"
        routing.write_text(
            json.dumps(
                {
                    "destinations": [
                        {
                            "name": "pacs",
                            "ae_title": pacs.aet,
                            "host": "127.0.0.1",
                            "port": pacs.dicom_port,
                        },
                        {
                            "name": "wrong",
                            "ae_title": "NOBODY",
                            "host": "127.0.0.1",
                            "port": pacs.dicom_port,
                        },
                    ],
                    "rules": [
                        {
                            "name": "chest",
                            "task": "pneumonia-cxr",
                            "modality": ["DX"],
                            "send_to": ["pacs", "wrong"],
                        }
                    ],
                }
            )
        )
        monkeypatch.setenv("RADFLOW_ROUTING_FILE", str(routing))

        state = deliver_flow(return_state=True)

        assert state.is_completed()
        result = state.result()
        assert (result["reports"], result["sent"], result["retrying"]) == (2, 2, 2)
        [reason] = result["reports_set_aside"].values()
        assert "missing from the object store" in reason
        held = pacs.request("GET", "/instances")
        assert len(held) == 2
    with factory() as session:
        statuses = session.execute(select(Delivery.destination, Delivery.status)).all()
    assert sorted(statuses) == [
        ("pacs", DeliveryStatus.SENT),
        ("pacs", DeliveryStatus.SENT),
        ("wrong", DeliveryStatus.PENDING),
        ("wrong", DeliveryStatus.PENDING),
    ]
    engine.dispose()


def test_a_run_leaves_the_reports_to_the_live_run_that_writes_them(
    flow_env: Settings, tmp_path: Path
) -> None:
    """Two deliver runs at once (the demo's beside the one a promotion starts) used to build
    every SR twice; now the second sees the first hold the reports lease and leaves them."""
    engine = make_engine(flow_env.database_url)
    factory, store = make_sessionmaker(engine), open_store(flow_env)
    for image in (radiograph(), radiograph()):
        uid = ingest([image], tmp_path / str(image.SOPInstanceUID), flow_env, factory, store)
        score(factory, uid, 0.7)
    ttl = timedelta(seconds=1.5)
    assert leases.try_acquire(factory, REPORTS_LEASE, "the other run", ttl).ok
    with leases.Renewed(factory, REPORTS_LEASE, "the other run", ttl):
        assert deliver_flow()["reports"] == 0
    leases.release(factory, REPORTS_LEASE, "the other run")

    assert deliver_flow()["reports"] == 2
    with factory() as session:
        kinds = session.scalars(select(ResultObject.kind)).all()
    assert kinds.count(ResultKind.SR) == 2
    engine.dispose()

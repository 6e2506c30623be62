"""Helpers of the delivery tests: routing rules with destinations, what Orthanc holds."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from dicom_sources import LESION, ct_series, ingest, score
from ingest.receiver.peers import Orthanc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance
from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import SEG_KEY, load_sources, write_segmentation
from radflow.ingest.routing import RoutingRules, parse_rules
from radflow.settings import Settings
from radflow.store import ObjectStore

SEGMENTATION_TASK = "ct-lesions"


def rules(destinations: dict[str, tuple[str, int]], *, task: str = "pneumonia-cxr") -> RoutingRules:
    """Rules routing every series to ``task`` and sending its results to each destination
    (name -> (called AE title, port on 127.0.0.1))."""
    return parse_rules(
        json.dumps(
            {
                "destinations": [
                    {"name": name, "ae_title": aet, "host": "127.0.0.1", "port": port}
                    for name, (aet, port) in destinations.items()
                ],
                "rules": [{"name": "everything", "task": task, "send_to": list(destinations)}],
            }
        ),
        "(test)",
    )


def stored_in(pacs: Orthanc, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> Modality of every instance Orthanc holds for the study."""
    found: list[dict[str, Any]] = pacs.request(
        "POST",
        "/tools/find",
        json.dumps(
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        ).encode(),
    )
    out = {}
    for instance in found:
        tags = pacs.request("GET", f"/instances/{instance['ID']}/simplified-tags")
        assert tags["StudyInstanceUID"] == study_uid
        out[tags["SOPInstanceUID"]] = tags["Modality"]
    return out


def clear(pacs: Orthanc) -> None:
    for study in pacs.request("GET", "/studies"):
        request = urllib.request.Request(f"{pacs.url}/studies/{study}", method="DELETE")
        urllib.request.urlopen(request, timeout=30).close()


def scored_segmentation(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, folder: Path
) -> str:
    """A CT study with a stored SEG and its prediction; the study's UID."""
    series = ct_series(slices=2)
    study_uid = ingest(series, folder, settings, session_factory, store)
    with session_factory() as session:
        keys = session.scalars(select(Instance.object_key).order_by(Instance.number)).all()
    mask = np.zeros((2, 32, 32), bool)
    mask[0, 2:6, 2:6] = True
    seg = write_segmentation(
        store,
        load_sources(store, keys),
        mask,
        [LESION],
        Algorithm.for_model(SEGMENTATION_TASK, 1),
        task=SEGMENTATION_TASK,
        version=1,
    )
    score(session_factory, study_uid, 1.0, task=SEGMENTATION_TASK, derived={SEG_KEY: seg.key})
    return study_uid

"""Helpers of the delivery tests: routing rules with destinations, what Orthanc holds."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from ingest.receiver.peers import Orthanc

from radflow.ingest.routing import RoutingRules, parse_rules

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

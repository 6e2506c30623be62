"""Routing rules with destinations, a segmentation task, and a real Orthanc PACS to send to."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from dicom_sources import LESION
from ingest.receiver.peers import Orthanc
from outbound import SEGMENTATION_TASK

from radflow.dicom.codes import ResultCoding
from radflow.learning import tasks


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for a test module; it refuses associations not called ORTHANC."""
    with Orthanc(tmp_path_factory.mktemp("orthanc"), check_called_aet=True) as pacs:
        yield pacs


@pytest.fixture
def segmentation_task(monkeypatch: pytest.MonkeyPatch) -> str:
    """A segmentation task (one segment, "lesion") declared like the built-in ones."""
    base = tasks.get_task("pneumonia-cxr")
    task = dataclasses.replace(
        base, name=SEGMENTATION_TASK, coding=ResultCoding(segments=(LESION,))
    )
    monkeypatch.setitem(tasks.TASKS, task.name, task)
    return task.name

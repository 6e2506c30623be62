"""The demo: synthetic chest radiographs through the whole platform, on the embedded defaults."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from radflow.db import Label, Study, unit_of_work
from radflow.dicom.synthetic import SyntheticStudy, write_cxr_studies
from radflow.labels import add_label
from radflow.registry import champion
from radflow.runtime import Runtime

logger = logging.getLogger(__name__)

TASK = "pneumonia-cxr"


def generate(folder: Path, n_studies: int, seed: int) -> list[SyntheticStudy]:
    """Write ``n_studies`` synthetic chest radiograph studies (one file each) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_cxr_studies(folder, n_studies, seed=seed)


def label_training_subset(
    rt: Runtime, studies: Sequence[SyntheticStudy], fraction: float, seed: int
) -> int:
    """Label a random ``fraction`` of the studies with their ground truth, as a radiologist would.

    Patients are drawn whole, so one patient's studies are either all labelled or none.
    Studies that already carry a label are left alone, so running the demo again adds nothing.
    """
    patients = sorted({s.patient_id for s in studies})
    random.Random(seed).shuffle(patients)
    chosen = set(patients[: round(len(patients) * fraction)])
    labelled = 0
    with unit_of_work(rt.session_factory) as session:
        already = set(
            session.scalars(
                select(Study.study_uid)
                .join(Label, Label.study_id == Study.id)
                .where(Label.task == TASK)
            )
        )
        for study in studies:
            if study.patient_id in chosen and study.study_uid not in already:
                value = "pneumonia" if study.positive else "normal"
                add_label(session, study.study_uid, TASK, value, source="demo", author="demo")
                labelled += 1
    return labelled


def has_champion(rt: Runtime) -> bool:
    with rt.session_factory() as session:
        return champion(session, TASK) is not None

"""The demo: synthetic chest radiographs through the whole platform, on the embedded defaults."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from demo.synthetic import SyntheticStudy, write_cxr_studies
from radflow.db import Label, Study, User, unit_of_work
from radflow.learning.labels import add_label
from radflow.learning.registry import champion
from radflow.runtime import Runtime
from radflow.services.users import Role, add_user

logger = logging.getLogger(__name__)

TASK = "pneumonia-cxr"

# Created only by `radflow demo` on its synthetic data, never by migrations or settings: a
# production installation has no user until an admin runs `radflow user add`.
DEMO_USERS = (
    ("demo-radiologist", Role.RADIOLOGIST, "demo-radiologist-pw"),
    ("demo-ml", Role.ML_ENGINEER, "demo-ml-pw"),
    ("demo-admin", Role.ADMIN, "demo-admin-pw"),
)


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


def create_demo_users(rt: Runtime) -> list[tuple[str, Role, str]]:
    """The demo's users (name, role, password); existing ones are left as they are."""
    with unit_of_work(rt.session_factory) as session:
        existing = set(session.scalars(select(User.name)))
        for name, role, password in DEMO_USERS:
            if name not in existing:
                add_user(session, name, role, password)
    return list(DEMO_USERS)

"""The demo: synthetic chest radiographs and abdominal CTs through the whole platform, on the
embedded defaults.

What ``radflow demo`` (and ``make demo``) runs: synthetic studies are generated (chest
radiographs for pneumonia-cxr, and a few CT series for the volume task adrenal-ct-3d), ingested,
a share labelled as a radiologist would, each task trained (once), every study scored, and the
demo's users created; then the dashboard is served with the DICOM receiver beside it. Running
it again adds nothing twice. Like the CLI, a thin caller of flows and of the core library.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from pydantic import SecretStr
from sqlalchemy import select

from demo.synthetic import write_ct_studies, write_cxr_studies
from radflow.db import Label, Study, User, upgrade
from radflow.errors import NotEnoughLabels
from radflow.learning.labels import add_label
from radflow.learning.registry import champion
from radflow.learning.tasks import Task
from radflow.learning.tasks.adrenal_ct_3d import TASK as CT_TASK
from radflow.learning.tasks.pneumonia_cxr import TASK as CHEST_TASK
from radflow.runtime import Runtime
from radflow.services.users import Principal, Role, add_user
from radflow.settings import DEVELOPMENT_PSEUDONYM_KEY, Settings
from radflow.store.durable import private_dir

logger = logging.getLogger(__name__)


# Created only by `radflow demo` on its synthetic data, never by migrations or settings: a
# production installation has no user until an admin runs `radflow user add`.
DEMO_USERS = (
    ("demo-radiologist", Role.RADIOLOGIST, "quiet-lung-window-radiologist"),
    ("demo-ml", Role.ML_ENGINEER, "tuned-model-curve-engineer"),
    ("demo-admin", Role.ADMIN, "locked-audit-ledger-admin"),
)
DEMO_ACTOR = Principal("demo", Role.ADMIN)


def ensure_demo_key(settings: Settings) -> Settings:
    """``settings`` with a pseudonym key that is not the public default.

    The demo never runs on the development key (which the receiver, ingest and export refuse):
    unless one is configured, it writes a random key to ``pseudonym_key_file`` (mode 0600) in
    its data dir, where every ``radflow`` process using that data dir reads it.
    """
    if settings.pseudonym_key.get_secret_value() != DEVELOPMENT_PSEUDONYM_KEY:
        return settings
    path = settings.pseudonym_key_file
    assert path is not None  # filled by the settings validator
    private_dir(path.parent)
    key = secrets.token_hex(32)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(key + "\n")
    print(f"Generated a random pseudonym key for the demo in {path}")
    return settings.model_copy(update={"pseudonym_key": SecretStr(key)})


class Written(Protocol):
    """A synthetic study written to disk, with its ground truth."""

    @property
    def study_uid(self) -> str: ...
    @property
    def patient_id(self) -> str: ...
    @property
    def positive(self) -> bool: ...


def run_demo(settings: Settings, *, studies: int, ct_studies: int, label_fraction: float) -> None:
    """Synthetic studies ingested, a share labelled, the models trained, every study scored."""
    from flows.embedded import run_settings
    from flows.ingest import ingest_flow
    from flows.process import process_and_deliver

    upgrade(settings.database_url)  # the demo may find a data dir an older Radflow made
    folder = settings.data_dir / "demo-studies"
    print(
        f"Generating {studies} synthetic chest radiograph studies and {ct_studies} abdominal CT "
        f"studies in {folder}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    # Each kind of synthetic study, with the task declared for it: the radiographs are frontal
    # chest radiographs; the CT series crops around an adrenal gland, for the volume task.
    written: list[tuple[Task, Sequence[Written]]] = [
        (CHEST_TASK, write_cxr_studies(folder, studies, seed=settings.seed)),
        (CT_TASK, write_ct_studies(folder, ct_studies, seed=settings.seed)),
    ]
    with run_settings():
        ingest_flow(str(folder))
        with Runtime.open(settings) as rt:
            n = sum(
                label_training_subset(rt, task, done, label_fraction, settings.seed)
                for task, done in written
            )
            trained_before = {task.name for task, _ in written if has_champion(rt, task.name)}
        print(f"Labelled {n} studies as a radiologist would")
        for task, done in written:
            if done:
                train_once(task.name, trained_before)
        scored = process_and_deliver()  # every task with a champion
    for report in scored["tasks"].values():
        print(f"Scored {report['scored']} studies with {report['model']}")
    with Runtime.open(settings) as rt:
        for name, role, password in create_demo_users(rt):
            print(f"Demo login ({role.value}): {name} / {password}")


def train_once(task_name: str, trained_before: set[str]) -> None:
    """Train ``task_name`` unless it has a champion already; too few labels only say so."""
    from flows.train import train_flow

    if task_name in trained_before:
        print(f"{task_name} already has a champion model; not training again")
        return
    try:
        trained = train_flow(task_name)
    except NotEnoughLabels as exc:
        print(f"{task_name} not trained: {exc}")
        return
    print(f"Trained {trained['model']}: validation AUC {trained['auc']:.3f}")


def label_training_subset(
    rt: Runtime, task: Task, studies: Sequence[Written], fraction: float, seed: int
) -> int:
    """Label a random ``fraction`` of the studies with their ground truth for ``task``, as a
    radiologist would.

    Patients are drawn whole, so one patient's studies are either all labelled or none.
    Studies that already carry a label are left alone, so running the demo again adds nothing.
    """
    patients = sorted({s.patient_id for s in studies})
    random.Random(seed).shuffle(patients)
    chosen = set(patients[: round(len(patients) * fraction)])
    labelled = 0
    with rt.transaction() as session:
        already = set(
            session.scalars(
                select(Study.study_uid)
                .join(Label, Label.study_id == Study.id)
                .where(Label.task == task.name)
            )
        )
        for study in studies:
            if study.patient_id in chosen and study.study_uid not in already:
                value = task.labels[study.positive]
                add_label(session, study.study_uid, task.name, value, source="demo", author="demo")
                labelled += 1
    return labelled


def has_champion(rt: Runtime, task_name: str) -> bool:
    with rt.session_factory() as session:
        return champion(session, task_name) is not None


def create_demo_users(rt: Runtime) -> list[tuple[str, Role, str]]:
    """The demo's users (name, role, password); existing ones are left as they are."""
    with rt.transaction() as session:
        existing = set(session.scalars(select(User.name)))
        for name, role, password in DEMO_USERS:
            if name not in existing:
                add_user(session, name, role, password, actor=DEMO_ACTOR)
    return list(DEMO_USERS)


@contextmanager
def serving_receiver(settings: Settings) -> Iterator[None]:
    """The DICOM receiver next to the demo dashboard, so a study sent to it shows up there."""
    port, host = settings.receiver_port, settings.receiver_host
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        print(f"DICOM receiver not started: port {port} is not free ({exc.strerror})")
        yield
        return
    receiver = subprocess.Popen([sys.executable, "-m", "cli.main", "receive"])
    print(
        f"DICOM receiver {settings.receiver_ae_title} on port {port}: "
        f"storescu -aec {settings.receiver_ae_title} localhost {port} FILE.dcm",
        flush=True,
    )
    try:
        yield
    finally:
        receiver.terminate()
        receiver.wait(60)

"""The demo: synthetic chest radiographs through the whole platform, on the embedded defaults.

What ``radflow demo`` (and ``make demo``) runs: synthetic studies are generated, ingested, a
share labelled as a radiologist would, the task trained (once), every study scored, and the
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

from pydantic import SecretStr
from sqlalchemy import select

from demo.synthetic import SyntheticStudy, write_cxr_studies
from radflow.db import Label, Study, User, upgrade
from radflow.learning.labels import add_label
from radflow.learning.registry import champion
from radflow.learning.tasks.pneumonia_cxr import TASK as CHEST_TASK
from radflow.runtime import Runtime
from radflow.services.users import Principal, Role, add_user
from radflow.settings import DEVELOPMENT_PSEUDONYM_KEY, Settings
from radflow.store.durable import private_dir

logger = logging.getLogger(__name__)

TASK = CHEST_TASK.name
"""The synthetic studies are frontal chest radiographs: the task declared for those."""

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


def run_demo(settings: Settings, *, studies: int, label_fraction: float) -> None:
    """Synthetic studies ingested, a share labelled, a model trained, every study scored."""
    from flows.embedded import run_settings
    from flows.ingest import ingest_flow
    from flows.process import process_and_deliver
    from flows.train import train_flow

    upgrade(settings.database_url)  # the demo may find a data dir an older Radflow made
    folder = settings.data_dir / "demo-studies"
    print(f"Generating {studies} synthetic chest radiograph studies in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    written = write_cxr_studies(folder, studies, seed=settings.seed)
    with run_settings():
        ingest_flow(str(folder))
        with Runtime.open(settings) as rt:
            n = label_training_subset(rt, written, label_fraction, settings.seed)
            trained_before = has_champion(rt)
        print(f"Labelled {n} studies as a radiologist would")
        if trained_before:
            print(f"{TASK} already has a champion model; not training again")
        else:
            trained = train_flow(TASK)
            print(f"Trained {trained['model']}: validation AUC {trained['auc']:.3f}")
        scored = process_and_deliver(TASK)
    print(f"Scored {scored['scored']} studies with {scored['tasks'][TASK]['model']}")
    with Runtime.open(settings) as rt:
        for name, role, password in create_demo_users(rt):
            print(f"Demo login ({role.value}): {name} / {password}")


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
    with rt.transaction() as session:
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

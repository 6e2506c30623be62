"""A CT series sent by DCMTK storescu to `radflow receive` is assembled into a volume, routed to
the 3D task and scored, with nothing else run: the production shape, a Prefect server and a
worker's listener (flows/listener.py, here in the test's process) scoring what the receiver
hands it. (The embedded default's receiver, which scores in its own process, spent 35 of this
test's 45 s importing PyTorch and starting Prefect's temporary server.)"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import free_port, radflow_env, storescu, wait_for_port
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import PrefectServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from demo.synthetic import CT_SPACING_MM, write_ct_studies
from flows.listener import Listener
from radflow.db import Prediction, Study, StudyStatus, TaskOutcome, unit_of_work
from radflow.ingest.routing import route_studies
from radflow.learning.registry import register
from radflow.learning.tasks import get_task
from radflow.settings import Settings
from radflow.store import ObjectStore

TASK = "adrenal-ct-3d"
SCORED_WITHIN = 120.0


def _scored(session_factory: sessionmaker[Session], study_uid: str) -> Prediction | None:
    with session_factory() as session:
        return session.scalar(
            select(Prediction)
            .join(Study)
            .where(Study.study_uid == study_uid, ~Prediction.superseded)
        )


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("receiver_path", ["fast"], indirect=True)
def test_a_ct_series_sent_with_storescu_is_scored_by_the_3d_task(
    receiver_settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    prefect_server: PrefectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = get_task(TASK)
    with unit_of_work(session_factory) as session:
        # An untrained champion: what is tested is the way there, not the score.
        champion = register(
            session,
            store,
            task,
            task.build_network(),
            metrics={},
            threshold=0.5,
            training_run=None,
        )
        champion_id = champion.id
    (volume,) = write_ct_studies(tmp_path / "ct", 1, shape=(12, 32, 32), prevalence=1.0)
    files = list(volume.paths)
    random.Random(0).shuffle(files)  # the order of arrival does not order the slices
    settings = receiver_settings.model_copy(update={"stable_after_seconds": 0.5})
    port = free_port()
    env = {k: v for k, v in radflow_env(settings).items() if not k.upper().startswith("PREFECT_")}
    env.update(prefect_server.env())
    for name, value in env.items():  # the listener's flows read them, as a worker's do
        if name.startswith(("RADFLOW_", "PREFECT_API_URL")):
            monkeypatch.setenv(name, value)
    log = tmp_path / "receive.log"
    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}),
        log.open("wb") as out,
    ):
        prefect_server.delete_unfinished_runs()  # no process run left waiting by another test
        listener = Listener(settings).start()
        receiver = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "receive", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, receiver)
            sent = storescu(port, files)
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + SCORED_WITHIN
            while (prediction := _scored(session_factory, volume.study_uid)) is None:
                assert receiver.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        finally:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(60)
            listener.stop()

    assert (prediction.task, prediction.model_version_id) == (TASK, champion_id)
    assert prediction.derived_keys["gradcam"].endswith(".npz")  # a heat map volume
    with session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_uid == volume.study_uid)).one()
        assert study.status == StudyStatus.SCORED
        assert sum(len(series.instances) for series in study.series) == 12
        outcomes = session.scalars(select(TaskOutcome).where(TaskOutcome.study_id == study.id))
        assert list(outcomes) == []  # the 3D task took it; no task has a champion to refuse it
        plan = route_studies(session, [study.id], task)[study.id].plan
    # Assembled as one volume: 12 slices 1.75 mm apart, and the tensor the receiver scored is
    # the one its preprocessing cache keeps under that stack's digest.
    assert plan is not None and (plan.depth, plan.spacing) == (12, pytest.approx(CT_SPACING_MM[0]))
    assert list(settings.cache_dir.glob(f"preprocessed/{TASK}/*/*/{plan.digest}.npy"))

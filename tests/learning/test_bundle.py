"""MONAI bundles: an exported version loads with monai.bundle and gives the registry's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import ModelStatus, unit_of_work
from radflow.learning import tasks
from radflow.learning.bundle import InvalidBundle, export_bundle, import_bundle
from radflow.learning.inference import load_network
from radflow.learning.registry import get_version, register
from radflow.store import ObjectStore

TASK = tasks.get_task("pneumonia-cxr")


def test_exported_bundle_loads_with_monai_and_imports_as_a_new_version(
    session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    with unit_of_work(session_factory) as session:
        register(
            session,
            store,
            TASK,
            TASK.build_network(),
            metrics={"auc": 0.9},
            threshold=0.42,
            training_run=None,
        )
        export_bundle(session, store, TASK.name, 1, tmp_path / "bundle", actor="tester")

    folder = tmp_path / "bundle"
    metadata = json.loads((folder / "configs/metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert metadata["radflow"]["threshold"] == pytest.approx(0.42)

    # A plain MONAI user: parse the inference config, load the weights, run it.
    parser = ConfigParser()
    parser.read_config(str(folder / "configs/inference.json"))
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(folder / "models/model.pt", map_location="cpu"))
    network.eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    image = torch.as_tensor(preprocessing(torch.rand(28, 28).numpy() * 4000)).unsqueeze(0)

    with session_factory() as session:
        registry_net = load_network(store, get_version(session, TASK.name, 1), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(network(image), registry_net(image))

    with unit_of_work(session_factory) as session:
        imported = import_bundle(session, store, folder, TASK.name, actor="tester")
        assert (imported.version, imported.status) == (2, ModelStatus.CHALLENGER)
    with session_factory() as session:
        again = load_network(store, get_version(session, TASK.name, 2), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(again(image), registry_net(image))


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_folder_that_is_not_a_bundle_is_refused_with_the_layout(
    session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    with unit_of_work(session_factory) as session, pytest.raises(InvalidBundle, match="metadata"):
        import_bundle(session, store, tmp_path, TASK.name, actor="tester")

"""The object store: one contract on a local folder and on S3, keys that cannot become paths."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from radflow.settings import Settings
from radflow.store import LocalStore, ObjectNotFound, ObjectStore, S3Store, keys

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
SOP = "1.2.826.0.1.3680043.8.498.1.1.1"
SHA256 = "0123456789abcdef" * 4


def test_settings_select_the_backend(settings: Settings, store: ObjectStore) -> None:
    expected = S3Store if settings.store_url.startswith("s3://") else LocalStore
    assert isinstance(store, expected)


def test_put_bytes_then_get_bytes_round_trips(store: ObjectStore) -> None:
    key = keys.original(STUDY, SERIES, SOP, SHA256)
    data = bytes(range(256)) * 4
    store.put_bytes(key, data, content_type="application/dicom")
    assert store.get_bytes(key) == data
    with store.open(key) as stream:
        assert stream.read() == data


def test_put_bytes_replaces_the_object(store: ObjectStore) -> None:
    key = keys.derived(STUDY, "pneumonia-cxr", 1, "report.json")
    store.put_bytes(key, b"first")
    store.put_bytes(key, b"second")
    assert store.get_bytes(key) == b"second"


def test_empty_object_round_trips(store: ObjectStore) -> None:
    store.put_bytes("derived/empty", b"")
    assert store.exists("derived/empty")
    assert store.get_bytes("derived/empty") == b""


def test_put_file_round_trips_a_large_file(store: ObjectStore, tmp_path: Path) -> None:
    # Over 5 MiB: the minio client uploads it in parts, SeaweedFS stores it in chunks.
    data = random.Random(0).randbytes(6 * 1024 * 1024 + 17)
    source = tmp_path / "weights.pt"
    source.write_bytes(data)
    key = keys.model("pneumonia-cxr", 3, "weights.pt")
    store.put_file(key, source)
    assert store.get_bytes(key) == data
    assert source.read_bytes() == data  # the source is copied, not moved


def test_exists_and_delete(store: ObjectStore) -> None:
    key = keys.original(STUDY, SERIES, SOP, SHA256)
    assert not store.exists(key)
    store.put_bytes(key, b"DICM")
    assert store.exists(key)
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.get_bytes(key)
    store.delete(key)  # deleting what is gone is not an error (re-runs are idempotent)


def test_missing_key_raises_object_not_found(store: ObjectStore) -> None:
    key = "originals/1.2.3/4.5.6/7.8.9.dcm"
    with pytest.raises(ObjectNotFound):
        store.get_bytes(key)
    with pytest.raises(ObjectNotFound):
        store.open(key)
    with pytest.raises(KeyError):  # ObjectNotFound is a KeyError, like a missing mapping key
        store.get_bytes(key)
    assert not store.exists(key)


def test_list_gives_keys_under_a_prefix_in_lexical_order(store: ObjectStore) -> None:
    all_keys = [
        "originals/1.2/1.2.1/1.2.1.10.dcm",
        "originals/1.2/1.2.1/1.2.1.2.dcm",
        "originals/1.2/1.2.1/1.2.1.1.dcm",
        "originals/1.2/1.2.2/1.2.2.1.dcm",
        "originals/1.23/1.23.1/1.23.1.1.dcm",
        "derived/1.2/pneumonia-cxr/v1/heatmap.png",
        "models/pneumonia-cxr/v1/weights.pt",
    ]
    for key in random.Random(1).sample(all_keys, len(all_keys)):
        store.put_bytes(key, key.encode())

    assert list(store.list()) == sorted(all_keys)
    assert list(store.list("originals/1.2/")) == [
        "originals/1.2/1.2.1/1.2.1.1.dcm",
        "originals/1.2/1.2.1/1.2.1.10.dcm",
        "originals/1.2/1.2.1/1.2.1.2.dcm",
        "originals/1.2/1.2.2/1.2.2.1.dcm",
    ]
    # A prefix is a string prefix, not a folder: "originals/1.2" also matches "originals/1.23/".
    assert list(store.list("originals/1.2")) == sorted(
        k for k in all_keys if k.startswith("originals/1.2")
    )
    assert list(store.list("models/")) == ["models/pneumonia-cxr/v1/weights.pt"]
    assert list(store.list("nothing/")) == []


# ---- keys: every key is built from checked parts -------------------------------------------

UID_64 = "1." + "2" * 62


def test_original_key_layout() -> None:
    assert keys.original(STUDY, SERIES, SOP, SHA256) == (
        f"originals/{STUDY}/{SERIES}/{SOP}.{SHA256[:32]}.dcm"
    )
    assert keys.derived(STUDY, "pneumonia-cxr", 2, "heatmap.png") == (
        f"derived/{STUDY}/pneumonia-cxr/v2/heatmap.png"
    )
    assert keys.model("pneumonia-cxr", 2, "weights.pt") == "models/pneumonia-cxr/v2/weights.pt"


def test_a_64_character_uid_is_accepted() -> None:
    assert len(UID_64) == 64
    assert keys.original(UID_64, UID_64, UID_64, SHA256).count(UID_64) == 3


BAD_UIDS = [
    "../../etc/passwd",
    "1.2/3",
    "1.2\\3",
    "..",
    "1..2",
    ".1.2",
    "1.2.",
    "",
    " 1.2.3",
    "1.2.3 ",
    "1.2.3\n",
    "1.2.3\x00",
    "1.2.3a",
    "1.2.٣",  # a non-ASCII digit
    UID_64 + "3",  # 65 characters
]


@pytest.mark.parametrize("uid", BAD_UIDS, ids=repr)
@pytest.mark.parametrize("position", ["study", "series", "instance"])
def test_original_rejects_bad_uids(uid: str, position: str) -> None:
    parts = {"study": STUDY, "series": SERIES, "instance": SOP} | {position: uid}
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        keys.original(parts["study"], parts["series"], parts["instance"], SHA256)


@pytest.mark.parametrize("digest", ["", "0" * 63, "A" * 64, "../" + "0" * 61, "g" * 64])
def test_original_rejects_what_is_not_a_sha256(digest: str) -> None:
    with pytest.raises(ValueError, match="not a SHA-256"):
        keys.original(STUDY, SERIES, SOP, digest)


@pytest.mark.parametrize("name", ["../weights.pt", "a/b", ".hidden", "", "a\\b", "x\n", "a b"])
def test_derived_and_model_names_reject_path_characters(name: str) -> None:
    with pytest.raises(ValueError, match="object name"):
        keys.derived(STUDY, "pneumonia-cxr", 1, name)
    with pytest.raises(ValueError, match="object name"):
        keys.model(name, 1, "weights.pt")


def test_derived_rejects_a_bad_study_uid() -> None:
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        keys.derived("../1.2", "pneumonia-cxr", 1, "heatmap.png")


# ---- LocalStore stays inside its root ---------------------------------------------------------


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "", ".", "a/.."], ids=repr)
def test_local_store_refuses_keys_escaping_its_root(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(ValueError, match="escapes the store root"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="escapes the store root"):
        store.get_bytes(key)
    with pytest.raises(ValueError, match="escapes the store root"):
        store.exists(key)
    with pytest.raises(ValueError, match="escapes the store root"):
        store.delete(key)
    assert not (tmp_path / "outside").exists()


def test_local_store_refuses_absolute_keys(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    target = tmp_path / "outside"
    with pytest.raises(ValueError, match="escapes the store root"):
        store.put_bytes(str(target), b"x")
    assert not target.exists()


def test_local_store_refuses_keys_through_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (store.root / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="escapes the store root"):
        store.put_bytes("link/x", b"x")
    assert list(elsewhere.iterdir()) == []


def test_local_store_lists_no_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    store.put_bytes("a/b", b"1")
    (store.root / "a" / ".tmp-half-written").write_bytes(b"partial")
    assert list(store.list()) == ["a/b"]


def test_put_files_stores_each_file_and_replaces_what_was_there(
    store: ObjectStore, tmp_path: Path
) -> None:
    sources = {}
    for n in range(3):
        sources[keys.original(STUDY, SERIES, f"{SOP}{n}", SHA256)] = tmp_path / f"{n}.dcm"
        sources[keys.original(STUDY, SERIES, f"{SOP}{n}", SHA256)].write_bytes(b"DICM" * (n + 1))
    store.put_bytes(keys.original(STUDY, SERIES, f"{SOP}0", SHA256), b"older")
    store.put_files(list(sources.items()), "application/dicom", immutable=True)
    for key, path in sources.items():
        assert store.get_bytes(key) == path.read_bytes()
    assert list(store.list("originals/")) == sorted(sources)


def test_immutable_files_are_linked_not_copied_and_outlive_their_source(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    spooled, inbox = tmp_path / "spooled.dcm", tmp_path / "inbox.dcm"
    spooled.write_bytes(b"received once")
    inbox.write_bytes(b"a user's file")
    store.put_files([("a/spooled", spooled)], immutable=True)
    store.put_files([("a/inbox", inbox)])
    # The spool's file and the object are one inode: no bytes copied, no second data fsync.
    assert (store.root / "a" / "spooled").stat().st_ino == spooled.stat().st_ino
    # A file its owner may still change is copied.
    assert (store.root / "a" / "inbox").stat().st_ino != inbox.stat().st_ino
    inbox.write_bytes(b"changed later")
    spooled.unlink()
    assert store.get_bytes("a/spooled") == b"received once"
    assert store.get_bytes("a/inbox") == b"a user's file"


@pytest.mark.parametrize("immutable", [True, False])
def test_put_files_leaves_no_temporary_file_when_a_source_is_missing(
    tmp_path: Path, immutable: bool
) -> None:
    store = LocalStore(tmp_path / "objects")
    present = tmp_path / "present"
    present.write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        store.put_files([("a/1", present), ("a/2", tmp_path / "missing")], immutable=immutable)
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == []

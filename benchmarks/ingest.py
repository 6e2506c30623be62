"""Ingest benchmark: the Radflow receiver against Orthanc and DCMTK storescp, in one run.

    .venv/bin/python benchmarks/ingest.py [--rounds 5] [--big-slices 4000] [--skip-big]

A 200-slice 512x512 16-bit CT series (CT Image Storage, generated here) is sent with DCMTK
``storescu`` (``TCP_NODELAY=1`` on both ends) to

(a) the Radflow receiver (``radflow receive``, embedded default: SQLite + local object folder),
    as one process and as 2 worker processes (``RADFLOW_RECEIVER_WORKERS=2``): timed until
    storescu finishes (every instance acknowledged = durably spooled) and, separately, until
    every instance is indexed in the database and in the object store;
(b) Orthanc (Debian package, default SQLite index, loopback, temporary storage);
(c) DCMTK ``storescp`` writing plain files (the ceiling).

Then 200 slices as 4 series of 50, sent by 4 storescu processes at once (4 parallel
associations) to each. All run at once and each round sends fresh series to each in turn; the
figures are each target's median over the rounds (per-round figures are in the JSON), and
Radflow / Orthanc is also printed round by round (two sends seconds apart). Before the rounds,
one untimed warm-up send of 10 slices to each; before every send, ``os.sync()`` (no target pays
for another's dirty pages); each round starts with the next target in turn. Last, the
receiver's peak RSS (VmHWM) while it receives a ~2 GB study (4000 slices, written to disk one
by one and deleted afterwards).

Prints a table, then as the last line one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "ingest" / "receiver"))

from peers import Orthanc, free_port, peer_env, radflow_env, wait_for_port  # noqa: E402

from radflow.db import Instance, make_engine, make_sessionmaker  # noqa: E402
from radflow.ingest.receiver import count_waiting, spool_folders  # noqa: E402
from radflow.settings import Settings  # noqa: E402

SLICES = 200
WARMUP_SLICES = 10
PARALLEL = 4
WORKERS = 2  # RADFLOW_RECEIVER_WORKERS of the second Radflow receiver: one per core here
ROWS = COLUMNS = 512


def ct_series(folder: Path, slices: int, *, study_uid: str, number: int = 1) -> Iterator[Path]:
    """Write a CT series slice by slice (never more than one slice in memory); yield each path."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    yy, xx = np.mgrid[-1 : 1 : ROWS * 1j, -1 : 1 : COLUMNS * 1j]
    body = ((xx**2 + yy**2) < 0.8).astype(np.int16)
    rng = np.random.default_rng(number)
    for i in range(slices):
        noise = rng.integers(0, 40, (ROWS, COLUMNS), dtype=np.int16)
        pixels = (body * (1000 + 20 * np.sin(i / 10)) + noise).astype(np.int16)
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = "BENCH-0001"
        ds.PatientName = "Bench^Phantom"
        ds.Modality = "CT"
        ds.StudyDate = "20240101"
        ds.SeriesNumber = number
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = 1.0
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        yield path


def send(port: int, aet: str, folders: list[Path]) -> float:
    """storescu, one association per folder, all at once; seconds until the last one finishes.

    First (untimed) every dirty page goes to disk: storescp's files, the generated series.
    Otherwise their writeback lands in the next target's time, and for a receiver that fsyncs
    each instance (Radflow, Orthanc) it stretches every fsync: each target starts from the same
    clean state instead.
    """
    os.sync()
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", aet, "127.0.0.1", str(port), "+sd", str(f)],
            env=peer_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for f in folders
    ]
    for sender in senders:
        _, err = sender.communicate(timeout=1800)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu to {aet} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start


@contextmanager
def radflow_receiver(
    work: Path, workers: int = 1
) -> Iterator[tuple[int, Settings, subprocess.Popen[bytes]]]:
    settings = Settings(
        data_dir=work / "radflow",
        receiver_host="127.0.0.1",
        receiver_workers=workers,
        pseudonym_key=SecretStr(secrets.token_hex(32)),  # the receiver refuses the public one
    )
    port = free_port()
    command = [sys.executable, "-m", "cli.main", "receive", "--port", str(port)]
    process = subprocess.Popen(command, env=radflow_env(settings))
    try:
        wait_for_port(port, process)
        yield port, settings, process
    finally:
        process.terminate()
        process.wait(60)


@contextmanager
def storescp(work: Path) -> Iterator[int]:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True)
    # --fork: one process per association, so parallel senders really run in parallel.
    process = subprocess.Popen(
        ["storescp", "--fork", "-od", str(out), str(port)], env=peer_env(), cwd=out
    )
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(30)


def indexed_count(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        engine.dispose()


def wait_indexed(settings: Settings, expected: int, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = sum(count_waiting(folder) for folder in spool_folders(settings.spool))
        if not waiting and indexed_count(settings) >= expected:
            return
        time.sleep(0.05)
    raise TimeoutError(f"not all {expected} instances indexed after {timeout} s")


def wait_reaped(settings: Settings, timeout: float = 600) -> None:
    """Until the receiver has deleted its consumed spool files: that I/O would otherwise slow
    whichever target is measured next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [f / "done" for f in spool_folders(settings.spool) if (f / "done").is_dir()]
        if not any(any(folder.iterdir()) for folder in done):
            return
        time.sleep(0.05)
    raise TimeoutError(f"spool files not deleted after {timeout} s")


def objects_stored(settings: Settings) -> int:
    return sum(1 for p in Path(settings.store_url).rglob("*.dcm"))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def run(work: Path, big_slices: int, rounds: int) -> dict[str, Any]:
    """All three receivers up at once; each round sends fresh series to each, in turn.

    On a shared 2-core machine the speed of the whole box drifts by a factor of two within
    minutes, so one send per target would compare moments, not receivers. Interleaving the
    targets round by round and taking each one's median keeps the ratios honest.
    """
    study = generate_uid()
    series = []
    for r in range(rounds):
        one = list(ct_series(work / f"r{r}-one", SLICES, study_uid=study, number=10 * r + 1))
        four = [work / f"r{r}-four-{k}" for k in range(PARALLEL)]
        for k, folder in enumerate(four):
            list(ct_series(folder, SLICES // PARALLEL, study_uid=generate_uid(), number=k + 2))
        series.append((work / f"r{r}-one", four))
    megabytes = sum(p.stat().st_size for p in one) / 1e6
    seconds: dict[str, list[float]] = {}

    def timed(key: str, value: float) -> None:
        seconds.setdefault(key, []).append(value)

    with (
        radflow_receiver(work / "radflow") as (port, settings, _),
        radflow_receiver(work / "radflow-workers", WORKERS) as (w_port, w_settings, _),
        Orthanc(work / "orthanc") as pacs,
        storescp(work / "scp") as scp_port,
    ):
        # One untimed warm-up send to each: first-association costs (imports, caches, a new
        # database file) are not what a receiver in service pays per study.
        warmup = work / "warmup"
        list(ct_series(warmup, WARMUP_SLICES, study_uid=generate_uid(), number=99))
        for target_port, aet in (
            (port, "RADFLOW"),
            (w_port, "RADFLOW"),
            (pacs.dicom_port, pacs.aet),
        ):
            send(target_port, aet, [warmup])
        send(scp_port, "STORESCP", [warmup])
        wait_indexed(settings, WARMUP_SLICES)
        wait_indexed(w_settings, WARMUP_SLICES)
        expected = WARMUP_SLICES

        def to_radflow(
            name: str, suffix: str, folders: list[Path], rport: int, rsettings: Settings
        ) -> None:
            start = time.perf_counter()
            timed(f"{name}_spool{suffix}", send(rport, "RADFLOW", folders))
            wait_indexed(rsettings, expected)
            timed(f"{name}_indexed{suffix}", time.perf_counter() - start)
            wait_reaped(rsettings)

        targets: list[Callable[[str, list[Path]], None]] = [
            lambda suffix, folders: to_radflow("radflow", suffix, folders, port, settings),
            lambda suffix, folders: to_radflow(
                "radflow_workers", suffix, folders, w_port, w_settings
            ),
            lambda suffix, folders: timed(
                f"orthanc{suffix}", send(pacs.dicom_port, pacs.aet, folders)
            ),
            lambda suffix, folders: timed(f"storescp{suffix}", send(scp_port, "STORESCP", folders)),
        ]
        for r, (one_folder, four) in enumerate(series):
            for suffix, folders in (("", [one_folder]), ("_4x", four)):
                expected += SLICES
                # Each round starts with the next target: none always follows the same one
                # (what a target leaves behind, e.g. the disk still busy, falls on all alike).
                for target in targets[r % len(targets) :] + targets[: r % len(targets)]:
                    target(suffix, folders)
        assert objects_stored(settings) == objects_stored(w_settings) == expected
        assert pacs.request("GET", "/statistics")["CountInstances"] == expected

    results: dict[str, Any] = {"slices": SLICES, "megabytes": round(megabytes, 1)}
    results["rounds"] = rounds
    for key, values in seconds.items():
        median = statistics.median(values)
        results[f"{key}_s"] = round(median, 3)
        results[f"{key}_inst_per_s"] = round(SLICES / median, 1)
        results[f"{key}_mb_per_s"] = round(megabytes / median, 1)
        results[f"{key}_inst_per_s_each_round"] = [round(SLICES / v, 1) for v in values]
    for name in (
        "radflow_spool",
        "radflow_indexed",
        "radflow_workers_spool",
        "radflow_workers_indexed",
        "storescp",
    ):
        for suffix in ("", "_4x"):
            key = f"{name}{suffix}"
            results[f"{key}_vs_orthanc"] = round(
                results[f"orthanc{suffix}_s"] / results[f"{key}_s"], 2
            )
    for key, versus in (("radflow_spool", "orthanc"), ("radflow_spool_4x", "orthanc_4x")):
        # Paired: each round's two sends were seconds apart, whatever the machine did between.
        pairs = zip(seconds[key], seconds[versus], strict=True)
        results[f"{key}_vs_orthanc_each_round"] = [round(other / ours, 2) for ours, other in pairs]
    for name in ("radflow", "radflow_workers"):
        results[f"{name}_indexed_vs_spool_time"] = round(
            results[f"{name}_indexed_s"] / results[f"{name}_spool_s"], 2
        )
    for folder in work.glob("r*-*"):
        shutil.rmtree(folder)
    if big_slices:
        results.update(big_study(work / "big", big_slices))
    return results


def big_study(work: Path, slices: int) -> dict[str, Any]:
    """Peak RSS of the receiver while a ~2 GB study arrives (slices written to disk lazily)."""
    folder = work / "slices"
    study = generate_uid()
    size = sum(p.stat().st_size for p in ct_series(folder, slices, study_uid=study, number=9))
    with radflow_receiver(work / "r") as (port, settings, process):
        start = time.perf_counter()
        seconds = send(port, "RADFLOW", [folder])
        wait_indexed(settings, slices)
        indexed = time.perf_counter() - start
        peak = peak_rss_mb(process.pid)
    shutil.rmtree(work)
    return {
        "big_study_slices": slices,
        "big_study_gb": round(size / 1e9, 2),
        "big_study_spool_s": round(seconds, 1),
        "big_study_indexed_s": round(indexed, 1),
        "receiver_peak_rss_mb": round(peak, 1),
    }


def report(r: dict[str, Any]) -> None:
    rows = [
        ("Radflow receiver, durably spooled", "radflow_spool"),
        ("Radflow receiver, indexed + stored", "radflow_indexed"),
        (f"Radflow, {WORKERS} worker processes, spooled", "radflow_workers_spool"),
        (f"Radflow, {WORKERS} worker processes, indexed", "radflow_workers_indexed"),
        ("Orthanc (SQLite index)", "orthanc"),
        ("DCMTK storescp (files, ceiling)", "storescp"),
    ]
    print(
        f"\n{SLICES} CT slices 512x512x16 bit ({r['megabytes']} MB), DCMTK storescu, TCP_NODELAY=1"
    )
    header = f"{'target':38} {'1 assoc inst/s':>14} {'MB/s':>7} {'x Orthanc':>9}"
    header += f" {'4 assoc inst/s':>15} {'MB/s':>7} {'x Orthanc':>9}"
    print(header)
    for label, key in rows:
        line = f"{label:38} {r[f'{key}_inst_per_s']:>14} {r[f'{key}_mb_per_s']:>7}"
        line += f" {r.get(f'{key}_vs_orthanc', 1.0):>9}"
        line += f" {r[f'{key}_4x_inst_per_s']:>15} {r[f'{key}_4x_mb_per_s']:>7}"
        line += f" {r.get(f'{key}_4x_vs_orthanc', 1.0):>9}"
        print(line)
    print(f"4 parallel associations = 4 series of {SLICES // PARALLEL} slices (same 200 slices)")
    for key, label in (("radflow_spool", "1 assoc"), ("radflow_spool_4x", "4 assoc")):
        each = r[f"{key}_vs_orthanc_each_round"]
        print(
            f"Radflow spool / Orthanc, round by round ({label}): {each}, "
            f"median {statistics.median(each)}"
        )
    print(
        f"indexed+stored time / spool time: {r['radflow_indexed_vs_spool_time']} (1 process), "
        f"{r['radflow_workers_indexed_vs_spool_time']} ({WORKERS} workers)"
    )
    if "receiver_peak_rss_mb" in r:
        print(
            f"receiver peak RSS receiving {r['big_study_slices']} slices "
            f"({r['big_study_gb']} GB): {r['receiver_peak_rss_mb']} MB "
            f"(spooled in {r['big_study_spool_s']} s, indexed in {r['big_study_indexed_s']} s)"
        )
    floors = {
        "spool >= 1.0x Orthanc (1 assoc)": r["radflow_spool_vs_orthanc"] >= 1.0,
        "indexed within 2x spool time": r["radflow_indexed_vs_spool_time"] <= 2.0,
        f"indexed within 2x spool time ({WORKERS} workers)": (
            r["radflow_workers_indexed_vs_spool_time"] <= 2.0
        ),
        "peak RSS < 500 MB (2 GB study)": (
            r["receiver_peak_rss_mb"] < 500 if "receiver_peak_rss_mb" in r else None
        ),
        "goal: spool >= 1.5x Orthanc (4 assoc)": r["radflow_spool_4x_vs_orthanc"] >= 1.5,
        f"goal: spool >= 1.5x Orthanc (4 assoc, {WORKERS} workers)": (
            r["radflow_workers_spool_4x_vs_orthanc"] >= 1.5
        ),
    }
    for name, ok in floors.items():
        print(f"  [{'not measured' if ok is None else 'ok' if ok else 'MISSED'}] {name}")
    r["floors"] = floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-slices", type=int, default=4000, help="slices of the RSS study")
    parser.add_argument("--skip-big", action="store_true", help="skip the 2 GB RSS measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    args = parser.parse_args()
    for name in list(os.environ):
        if name.startswith("RADFLOW_"):
            del os.environ[name]
    with tempfile.TemporaryDirectory(prefix="radflow-bench-ingest-") as tmp:
        results = run(Path(tmp), 0 if args.skip_big else args.big_slices, args.rounds)
    report(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

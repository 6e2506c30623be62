"""Assembling a CT series into a volume: Radflow's path against a bare pydicom loop.

    python benchmarks/volume.py [--slices 200] [--size 512] [--repeats 3]

Writes a ``--slices``-slice ``--size`` x ``--size`` 16-bit CT series (shuffled Instance Numbers)
into a local object store, then in a fresh process for each side, ``--repeats`` times:

- radflow: plan the series from its instances' headers (every geometry check of
  radflow.dicom.geometry, the order by highdicom) and load it (radflow.dicom.volume.load_volume:
  Hounsfield units, the affine);
- bare: the same files read from the store with pydicom, sorted by Image Position (Patient) z,
  rescaled to float32 and stacked with numpy (no checks, no affine).

Floor (issue 12): radflow at least 0.8x the bare loop's speed, peak RSS under twice the volume's
float32 size plus 300 MB. Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from radflow.store import ObjectStore

MB = 1024 * 1024


def write_series(root: Path, slices: int, size: int) -> None:
    """The series as files in a local store under ``root`` and its index rows in slices.json."""
    import pydicom
    from pydicom.uid import generate_uid

    from radflow.dicom.instance import read_header
    from radflow.dicom.writer import CTSeriesBuilder
    from radflow.store.local import LocalStore

    store = LocalStore(root / "objects")
    builder = CTSeriesBuilder(
        rows=size,
        columns=size,
        spacing=(1.0, 0.7, 0.7),
        patient_id="BENCH",
        patient_name="BENCH^VOLUME",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
    )
    rng = np.random.default_rng(0)
    numbers = rng.permutation(slices) + 1
    rows = []
    for i in range(slices):
        hu = rng.integers(-1000, 1500, (size, size)).astype(np.float32)
        ds = builder.slice(i, hu, sop_instance_uid=generate_uid(), instance_number=numbers[i])
        path = root / "slice.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        header = read_header(path, 10**9)
        key = f"series/{i:04d}.dcm"
        store.put_bytes(key, path.read_bytes())
        rows.append(
            {
                "object_key": key,
                "sha256": header.sha256,
                "rows": header.rows,
                "columns": header.columns,
                "image_type": header.image_type,
                "position": header.image_position,
                "orientation": header.image_orientation,
                "spacing": header.pixel_spacing,
            }
        )
    (root / "slices.json").write_text(json.dumps(rows))


def run_side(root: Path, side: str) -> dict[str, float]:
    """One assembly in this process, after a warm-up on three slices (imports, pixel
    handlers): seconds and peak RSS."""
    from radflow.store.local import LocalStore

    store = LocalStore(root / "objects")
    rows = json.loads((root / "slices.json").read_text())
    assemble = _radflow if side == "radflow" else _bare
    assemble(store, rows[:3])
    started = time.perf_counter()
    array = assemble(store, rows)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"seconds": seconds, "peak_rss_mb": peak / MB, "volume_mb": array.nbytes / MB}


def _radflow(store: ObjectStore, rows: list[dict[str, Any]]) -> np.ndarray:
    from radflow.dicom.geometry import Slice, plan_series
    from radflow.dicom.volume import load_volume

    slices = [
        Slice(
            r["object_key"],
            r["sha256"],
            r["rows"],
            r["columns"],
            image_type=r["image_type"],
            position=tuple(r["position"]),
            orientation=tuple(r["orientation"]),
            spacing=tuple(r["spacing"]),
        )
        for r in rows
    ]
    return load_volume(store, plan_series(slices)).array


def _bare(store: ObjectStore, rows: list[dict[str, Any]]) -> np.ndarray:
    import pydicom

    datasets = [pydicom.dcmread(io.BytesIO(store.get_bytes(r["object_key"]))) for r in rows]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in datasets
        ]
    )


def _measure(root: Path, side: str, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--side", side, "--root", str(root)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=["radflow", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.root, args.side)))
        return 0

    with tempfile.TemporaryDirectory(prefix="radflow-volume-") as tmp:
        root = Path(tmp)
        write_series(root, args.slices, args.size)
        bare = _measure(root, "bare", args.repeats)
        ours = _measure(root, "radflow", args.repeats)
    speed = bare["seconds"] / ours["seconds"]
    rss_limit = 2 * ours["volume_mb"] + 300
    print(f"{args.slices} slices of {args.size}x{args.size}, 16 bit, best of {args.repeats}")
    print(f"{'side':<10}{'seconds':>10}{'peak RSS MB':>14}")
    for name, r in (("bare", bare), ("radflow", ours)):
        print(f"{name:<10}{r['seconds']:>10.3f}{r['peak_rss_mb']:>14.0f}")
    print(
        f"radflow {speed:.2f}x the bare loop's speed (floor 0.8x); peak RSS "
        f"{ours['peak_rss_mb']:.0f} MB (floor {rss_limit:.0f} MB)"
    )
    result = {
        "slices": args.slices,
        "size": args.size,
        "bare_seconds": round(bare["seconds"], 3),
        "radflow_seconds": round(ours["seconds"], 3),
        "speed_vs_bare": round(speed, 3),
        "radflow_peak_rss_mb": round(ours["peak_rss_mb"]),
        "bare_peak_rss_mb": round(bare["peak_rss_mb"]),
        "rss_floor_mb": round(rss_limit),
        "floor_met": speed >= 0.8 and ours["peak_rss_mb"] < rss_limit,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

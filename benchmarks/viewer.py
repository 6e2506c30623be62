"""The study page's volume viewer in a real browser: how fast a CT opens and scrolls.

    python benchmarks/viewer.py [--slices 200] [--size 512] [--steps 60]

Writes a synthetic ``--slices`` x ``--size`` x ``--size`` 16-bit CT (demo.synthetic_ct: air,
tissue, lungs, bone and scanner noise, so it packs like a real CT) through the normal ingest
path into a fresh data dir, starts ``radflow dashboard`` on it, and drives headless Chromium
(``/usr/bin/chromium`` through playwright), logged in as a radiologist:

- open, cold: the CT's page the first time (a small CT's page was opened before it, the study
  page's first run since the server started, reported as "restart"), so the series is read
  from the object store and packed: from the page request (the navigation's start) to the
  first slice on the screen, in the browser's clock; and until every slice is in the browser;
- open, warm: the same page reloaded (the server keeps the packed series), the median of
  three;
- scroll: ``--steps`` ArrowDown presses, then as many wheel steps back, then sagittal
  reformats: each step timed in the browser from the input event to the frame showing its slice.

Issue 12's floors: open under 2 s, under 100 ms per slice. Prints a table; the last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
USER, PASSWORD = "reader", "viewer benchmark correct horse battery"
WARM_OPENS = 3


def prepare(data_dir: Path, slices: int, size: int) -> tuple[str, str]:
    """The CT in a fresh embedded data dir, a small one, and a radiologist; the studies' UIDs."""
    from demo.synthetic_ct import ct_phantom, write_ct_series
    from radflow.db import unit_of_work
    from radflow.ingest.index import ingest_files, mark_stable
    from radflow.runtime import Runtime
    from radflow.services.users import Principal, Role, add_user
    from radflow.settings import Settings

    rng = np.random.default_rng(0)
    study_uid, paths = write_ct_series(data_dir.parent / "big", ct_phantom(rng, slices, size))
    small_uid, small = write_ct_series(data_dir.parent / "small", ct_phantom(rng, 3, 64))
    settings = Settings(data_dir=data_dir, database_url="", store_url="")
    with Runtime.open(settings) as rt:
        report = ingest_files(
            [*paths, *small], settings=settings, session_factory=rt.session_factory, store=rt.store
        )
        if report.rejected:
            raise SystemExit(f"the series was refused: {report.rejected[:3]}")
        with unit_of_work(rt.session_factory) as session:
            mark_stable(session, [study_uid, small_uid])
            add_user(
                session, USER, Role.RADIOLOGIST, PASSWORD, actor=Principal("bench", Role.ADMIN)
            )
    return study_uid, small_uid


@contextmanager
def dashboard(data_dir: Path) -> Iterator[str]:
    """``radflow dashboard`` on a free port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADFLOW_")}
    env["RADFLOW_DATA_DIR"] = str(data_dir)
    log = (data_dir.parent / "dashboard.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "dashboard", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the dashboard did not start; see dashboard.log") from None
                time.sleep(0.25)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _viewer(page: Any) -> tuple[Any, Any]:
    page.wait_for_selector("iframe[src*='/component/dashboard.viewer']", timeout=60_000)
    frame = next(f for f in page.frames if "/component/dashboard.viewer" in f.url)
    root = frame.locator("#viewer")
    root.wait_for(state="attached")
    return frame, root


def open_study(page: Any, url: str, study_uid: str, *, reload: bool = False) -> dict[str, float]:
    """Seconds from the page request to the first slice shown, and to every slice in."""
    if reload:
        page.reload()
    else:
        page.goto(f"{url}/study?study={study_uid}")
    frame, root = _viewer(page)
    frame.wait_for_function(
        "() => document.getElementById('viewer').dataset.allIn", timeout=120_000
    )
    started = page.evaluate("performance.timeOrigin")
    first = float(root.get_attribute("data-first-drawn")) - started
    every = float(root.get_attribute("data-all-in")) - started
    return {"first_slice_s": first / 1000, "all_slices_s": every / 1000}


def scroll(page: Any, steps: int) -> dict[str, Any]:
    frame, _ = _viewer(page)

    def timed(count: int) -> None:  # each step is timed at the frame after it
        frame.wait_for_function(f"() => window.radflowViewer.steps.length === {count}")

    page.get_by_role("heading", name="Study").first.click()  # the page has the focus
    for _ in range(steps):
        page.keyboard.press("ArrowDown")
    timed(steps)
    frame.locator("#canvas").hover()
    for _ in range(steps):
        page.mouse.wheel(0, -120)
        time.sleep(0.01)  # one wheel event per step, not a coalesced burst
    timed(2 * steps)
    frame.get_by_role("button", name="Sagittal").click()
    frame.locator("#canvas").click()  # the viewer has the focus: its own keys
    for _ in range(steps):
        page.keyboard.press("ArrowDown")
    timed(3 * steps)
    times = frame.evaluate("window.radflowViewer.steps")
    return {
        "keys": _stats(times[:steps]),
        "wheel": _stats(times[steps : 2 * steps]),
        "sagittal": _stats(times[2 * steps :]),
        "payload_mb": frame.evaluate("window.radflowViewer.bytes") / 1e6,
    }


def _stats(times: list[float]) -> dict[str, float]:
    if not times:
        return {"n": 0}
    return {
        "n": len(times),
        "median_ms": round(float(np.median(times)), 1),
        "p95_ms": round(float(np.percentile(times, 95)), 1),
        "max_ms": round(float(max(times)), 1),
    }


def measure(url: str, study_uid: str, small_uid: str, steps: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_context(viewport={"width": 1400, "height": 1300}).new_page()
        page.set_default_timeout(60_000)
        page.goto(f"{url}/login")
        page.get_by_role("textbox", name="User name").fill(USER)
        page.get_by_role("textbox", name="Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("heading", name="Worklist").wait_for()
        restart = open_study(page, url, small_uid)  # the study page's first run since the start
        cold = open_study(page, url, study_uid)
        reloads = [open_study(page, url, study_uid, reload=True) for _ in range(WARM_OPENS)]
        warm = {k: float(np.median([r[k] for r in reloads])) for k in reloads[0]}
        scrolled = scroll(page, steps)
        browser.close()
    return {"restart": restart, "cold": cold, "warm": warm, **scrolled}


def pack_seconds(data_dir: Path, study_uid: str) -> float:
    """The server's share of a cold open: load_volume_view in a process of its own."""
    code = (
        "import time; from radflow.runtime import Runtime; from radflow.settings import Settings;"
        "from radflow.services.volume_view import load_volume_view;"
        "from radflow.db import Series, Study; from sqlalchemy import select;"
        "rt = Runtime.open(Settings()); s = rt.session_factory();"
        "uid = s.scalars(select(Series.series_uid).join(Study)"
        f".where(Study.study_uid == {study_uid!r})).one();"
        "t = time.perf_counter(); load_volume_view(s, rt.store, uid);"
        "print(time.perf_counter() - t)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADFLOW_")}
    env["RADFLOW_DATA_DIR"] = str(data_dir)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="radflow-viewer-") as tmp:
        data_dir = Path(tmp) / "data"
        study_uid, small_uid = prepare(data_dir, args.slices, args.size)
        with dashboard(data_dir) as url:
            # Every step must move: from the middle slice, at most half the series each way.
            steps = min(args.steps, args.slices // 2 - 1)
            result = measure(url, study_uid, small_uid, steps)
        result["pack_s"] = pack_seconds(data_dir, study_uid)
    print(
        f"{args.slices} slices of {args.size}x{args.size}, 16 bit; "
        f"packed {result['payload_mb']:.1f} MB"
    )
    for name in ("restart", "cold", "warm"):
        r = result[name]
        print(
            f"open {name:<5} first slice {r['first_slice_s']:.2f} s, "
            f"every slice {r['all_slices_s']:.2f} s"
        )
    print(f"server packing (own process) {result['pack_s']:.2f} s")
    for name in ("keys", "wheel", "sagittal"):
        r = result[name]
        print(
            f"scroll {name:<9} median {r['median_ms']} ms, p95 {r['p95_ms']} ms, "
            f"max {r['max_ms']} ms ({r['n']} steps)"
        )
    worst_step = max(result[n]["p95_ms"] for n in ("keys", "wheel", "sagittal"))
    summary = {
        "slices": args.slices,
        "size": args.size,
        "payload_mb": round(result["payload_mb"], 1),
        "open_restart_first_slice_s": round(result["restart"]["first_slice_s"], 3),
        "open_cold_first_slice_s": round(result["cold"]["first_slice_s"], 3),
        "open_cold_all_slices_s": round(result["cold"]["all_slices_s"], 3),
        "open_warm_first_slice_s": round(result["warm"]["first_slice_s"], 3),
        "open_warm_all_slices_s": round(result["warm"]["all_slices_s"], 3),
        "pack_s": round(result["pack_s"], 3),
        "step_keys_median_ms": result["keys"]["median_ms"],
        "step_wheel_median_ms": result["wheel"]["median_ms"],
        "step_sagittal_median_ms": result["sagittal"]["median_ms"],
        "step_p95_worst_ms": worst_step,
        "floor_met": result["cold"]["first_slice_s"] < 2.0 and worst_step < 100,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

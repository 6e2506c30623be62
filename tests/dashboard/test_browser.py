"""The dashboard as a user sees it: a real ``radflow dashboard`` server driven by headless Chromium.

Uses Debian's ``/usr/bin/chromium`` through the Python ``playwright`` package (never
``playwright install``). Screenshots go to ``artifacts/screenshots/`` at the repository root
(git-ignored). The server checks real argon2 hashes with production parameters, and runs with
the login gate and the content-security policy it has in production: every test fails if the
page asks another host for anything or the browser refuses something under the policy.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from certificates import LOOPBACK, issue
from factories import PASSWORD, make_model_version, make_study, make_user
from playwright.sync_api import Browser, Frame, Locator, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from sqlalchemy import select

from demo.synthetic import chest_phantom
from demo.synthetic_ct import ct_phantom, write_ct_series
from radflow.db import (
    AuditEvent,
    Label,
    ModelStatus,
    ModelVersion,
    Prediction,
    Study,
    StudyStatus,
    unit_of_work,
)
from radflow.ingest.index import ingest_files, mark_stable
from radflow.learning.heatmaps import heatmap_volume
from radflow.runtime import Runtime
from radflow.services.users import Role
from radflow.settings import Settings
from radflow.store import keys

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"
SCREENSHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCORED = {"ACC-HIGH": 0.91, "ACC-MID": 0.55, "ACC-LOW": 0.12}
CT_ACCESSION, CT_SLICES, CT_SIZE, CT_SPACING = "ACC-CT", 40, 128, (2.5, 0.7, 0.7)
HOSTILE_ACCESSION = ":red[NORMAL]"
HOSTILE_DESCRIPTION = "![x](http://evil.example/s.png)"
STARTUP_TIMEOUT_S = 60.0


def _require_chromium() -> None:
    if CHROMIUM.is_file():
        return
    reason = f"{CHROMIUM} is missing: `apt-get install chromium` to run the browser tests"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set, so the browser tests must run, but {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite data dir: three scored chest radiographs with heat maps, one waiting, one failed,
    a scored CT volume; a radiologist and an ML engineer."""
    path = tmp_path_factory.mktemp("dashboard") / "data"
    settings = Settings(data_dir=path, database_url="", store_url="")
    rng = np.random.default_rng(7)
    with Runtime.open(settings) as rt, unit_of_work(rt.session_factory) as session:
        for accession, score in SCORED.items():
            make_study(
                session,
                rt.store,
                accession=accession,
                score=score,
                pixels=chest_phantom(rng, 256, positive=score > 0.5),
                gradcam=True,
            )
        make_study(session, rt.store, accession="ACC-WAIT")
        hostile = make_study(session, rt.store, accession=HOSTILE_ACCESSION)
        hostile.series[0].description = HOSTILE_DESCRIPTION
        make_study(
            session,
            rt.store,
            accession="ACC-FAIL",
            status=StudyStatus.FAILED,
            status_reason="missing pixel data",
        )
        make_user(session, "rita", Role.RADIOLOGIST)
        make_user(session, "max", Role.ML_ENGINEER)
    _scored_ct(settings, path.parent / "ct", rng)
    return path


def _scored_ct(settings: Settings, folder: Path, rng: np.random.Generator) -> None:
    """An abdominal CT volume, received through the normal ingest path, scored below the
    threshold by adrenal-ct-3d with a Grad-CAM volume hot around the phantom's blob."""
    hu = ct_phantom(rng, CT_SLICES, CT_SIZE)
    study_uid, paths = write_ct_series(folder, hu, spacing=CT_SPACING, accession=CT_ACCESSION)
    depth, row, column = CT_SPACING
    affine = np.array([[0, 0, column, 0], [0, row, 0, 0], [depth, 0, 0, 0], [0, 0, 0, 1.0]])
    i, r, c = (
        np.mgrid[0:CT_SLICES, 0:CT_SIZE, 0:CT_SIZE]
        / np.array([CT_SLICES, CT_SIZE, CT_SIZE])[:, None, None, None]
    )
    heat = np.exp(-(((i - 0.5) / 0.15) ** 2 + ((r - 0.55) / 0.1) ** 2 + ((c - 0.4) / 0.1) ** 2))
    with Runtime.open(settings) as rt:
        report = ingest_files(
            paths, settings=settings, session_factory=rt.session_factory, store=rt.store
        )
        assert not report.rejected, report.rejected
        with unit_of_work(rt.session_factory) as session:
            mark_stable(session, [study_uid])
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            model = make_model_version(session, task="adrenal-ct-3d")
            gradcam = keys.derived(study_uid, model.task, model.version, "gradcam.npz")
            rt.store.put_bytes(gradcam, heatmap_volume(heat, affine))
            session.add(
                Prediction(
                    study_id=study.id,
                    model_version_id=model.id,
                    task=model.task,
                    score=0.3,
                    scores={"mass": 0.3},
                    derived_keys={"gradcam": gradcam},
                    latency_ms=50.0,
                )
            )
            study.status = StudyStatus.SCORED


def _wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            # A self-signed certificate in the HTTPS test: only the server's health is asked.
            unverified = ssl._create_unverified_context() if url.startswith("https") else None
            health = f"{url}/_stcore/health"
            with urllib.request.urlopen(health, timeout=2, context=unverified) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    pytest.fail(
        f"streamlit not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    # The server runs in its own session, so this reaches it and anything it started.
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _serve(data_dir: Path, log: Path, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """``radflow dashboard`` on a free port, as an operator runs it; returns it and its URL."""
    _require_chromium()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RADFLOW_")}
    env["RADFLOW_DATA_DIR"] = str(data_dir)
    env.update({f"RADFLOW_{name.upper()}": value for name, value in settings.items()})
    command = [sys.executable, "-m", "cli.main", "dashboard", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    scheme = "https" if "dashboard_tls_cert_file" in settings else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, log)
    except BaseException:
        _stop(process)
        raise
    return process, url


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The dashboard on the module's data dir; yields its base URL."""
    process, url = _serve(data_dir, tmp_path_factory.mktemp("streamlit") / "server.log")
    try:
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    # The first run of a page opens the database and store, slower than expect's 5 s default.
    expect.set_options(timeout=30_000)
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(30_000)
    elsewhere: list[str] = []
    refused: list[str] = []
    page.on(
        "request",
        lambda r: (
            elsewhere.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
            else None
        ),
    )
    page.on(
        "console",
        lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None,
    )
    yield page
    context.close()
    assert elsewhere == [], "the page fetched from another host"
    assert refused == [], "the browser refused something under the content-security policy"


def _screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _log_in(page: Page, server: str, name: str, path: str = "") -> None:
    """Open ``path`` (a fresh browser session: the login page comes first), then log in."""
    page.goto(f"{server}/{path}")
    page.get_by_role("textbox", name="User name").fill(name)
    page.get_by_role("textbox", name="Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log in")).to_have_count(0)


def _dismiss_page_not_found(page: Page) -> None:
    """Close Streamlit's "page not found" notice (a URL to a page this session may not see).

    It appears a moment after the page renders, so wait for it a little before deciding it
    is not coming.
    """
    dialog = page.get_by_role("dialog").filter(has_text="Page not found")
    try:
        dialog.wait_for(state="visible", timeout=3000)
    except PlaywrightTimeout:
        return
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)


def test_every_page_needs_a_login(server: str, page: Page) -> None:
    page.goto(f"{server}/study?study=1.2.3")
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    expect(page.get_by_test_id("stDataFrame")).to_have_count(0)
    _screenshot(page, "login")


def test_radiologist_reviews_a_study_from_the_worklist(
    server: str, page: Page, data_dir: Path
) -> None:
    _log_in(page, server, "rita")
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    table = page.get_by_test_id("stDataFrame")
    expect(table).to_be_visible()
    # Glide grid draws on a canvas; its accessible table mirrors the visible cells as text.
    cells = table.locator("[role=gridcell]")
    for accession, score in SCORED.items():
        expect(cells.filter(has_text=accession)).to_have_count(1)
        expect(cells.filter(has_text=f"{score:g}").first).to_be_attached()
    accession_column = table.locator('[role="gridcell"][aria-colindex="2"]')
    expect(accession_column.first).to_have_text("ACC-HIGH")  # flagged, waiting longest
    scored = page.get_by_test_id("stMetric").filter(has_text="Scored")
    expect(scored).to_contain_text(str(len(SCORED) + 1))  # and the CT
    _screenshot(page, "worklist")

    # Click the selection checkbox of the first row: it sits in the leftmost column of the
    # canvas, one header row down.
    box = table.bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + 15, box["y"] + 35 + 17)
    page.wait_for_url("**/study?study=*")

    expect(page.get_by_role("heading", name="Study ACC-HIGH")).to_be_visible()
    image = page.get_by_test_id("stImage").locator("img")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") == 256
    expect(page.get_by_text("Grad-CAM of pneumonia-cxr:v1")).to_be_visible()
    metrics = page.get_by_test_id("stMetric")
    expect(metrics.filter(has_text="Score")).to_contain_text("0.910")
    expect(metrics.filter(has_text="Threshold")).to_contain_text("0.500")
    expect(metrics.filter(has_text="Model")).to_contain_text("pneumonia-cxr:v1")
    expect(page.get_by_text("Above threshold")).to_be_visible()
    _screenshot(page, "study")

    page.get_by_label("Comment").fill("patchy opacity, right lower zone")
    page.get_by_role("button", name=re.compile(r"^Agree")).click()  # "Agree A": its key
    expect(page.get_by_text("Saved: pneumonia-cxr = pneumonia")).to_be_visible()

    settings = Settings(data_dir=data_dir, database_url="", store_url="")
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        label = session.scalars(select(Label).where(Label.source == "review")).one()
        audit = session.execute(
            select(AuditEvent.actor, AuditEvent.action).where(
                AuditEvent.object_id == label.study.study_uid
            )
        ).all()
        assert (label.value, label.author, label.comment) == (
            "pneumonia",
            "rita",
            "patchy opacity, right lower zone",
        )
    assert {("rita", "view"), ("rita", "label"), ("rita", "review")} <= {tuple(a) for a in audit}

    page.get_by_role("button", name="Next unreviewed").click()
    expect(page.get_by_role("heading", name="Study ACC-MID")).to_be_visible()


def test_radiologist_cannot_reach_the_promote_action(server: str, page: Page) -> None:
    _log_in(page, server, "rita", "models")
    _dismiss_page_not_found(page)
    # The server registers no models page for this role: the URL leads to the worklist.
    expect(page.get_by_role("heading", name="Worklist")).to_be_visible()
    expect(page.get_by_role("link", name="Models")).to_have_count(0)
    expect(page.get_by_role("button", name="Promote to champion")).to_have_count(0)


def test_ml_engineer_sees_the_models_page(server: str, page: Page, data_dir: Path) -> None:
    _log_in(page, server, "max")
    page.get_by_role("link", name="Models").click()
    expect(page.get_by_role("heading", name="Models")).to_be_visible()
    # One per task with a model: the chest radiographs' and the CT's.
    expect(page.get_by_text("Labels since last training")).to_have_count(2)
    expect(page.get_by_test_id("stPlotlyChart").first).to_be_visible()
    _screenshot(page, "models")
    settings = Settings(data_dir=data_dir, database_url="", store_url="")
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        statuses = set(session.scalars(select(ModelVersion.status)))
    assert statuses == {ModelStatus.CHALLENGER}  # the factory's versions; nothing promoted


def test_unknown_study_link_explains_itself(server: str, page: Page) -> None:
    _log_in(page, server, "rita", "study?study=1.2.3.4.5")
    expect(page.get_by_test_id("stAlertContentError")).to_contain_text("No study has this")
    expect(page.get_by_text("1.2.3.4.5", exact=True)).to_be_visible()


def _page_not_found(page: Page) -> bool:
    dialog = page.get_by_role("dialog").filter(has_text="Page not found")
    try:
        dialog.wait_for(state="visible", timeout=2000)
    except PlaywrightTimeout:
        return False
    return True


def test_a_shared_link_opens_after_login_survives_reload_and_logout_ends_it(
    server: str, browser: Browser, data_dir: Path
) -> None:
    """The link a colleague sent: log in, land on that study (no "page not found"), reload and
    stay there; the study's image is only for this session, and only until it logs out."""
    link = f"study?study={_study_uid(data_dir, 'ACC-HIGH')}"
    shared = browser.new_context()
    colleague = shared.new_page()
    _log_in(colleague, server, "max", link)
    expect(colleague.get_by_role("heading", name="Study ACC-HIGH")).to_be_visible()
    assert not _page_not_found(colleague)
    colleague.reload()
    expect(colleague.get_by_role("heading", name="Study ACC-HIGH")).to_be_visible()
    expect(colleague.get_by_role("button", name="Log in")).to_have_count(0)
    image = colleague.get_by_test_id("stImage").locator("img")
    source = image.get_attribute("src") or ""
    assert "/media/" in source
    assert colleague.request.get(source).status == 200  # with the session's cookie
    stranger = browser.new_context()
    assert stranger.request.get(source).status == 403  # the same URL without it
    colleague.get_by_role("button", name="Log out").click()
    expect(colleague.get_by_text("You have logged out.")).to_be_visible()
    assert colleague.request.get(source).status == 403  # the cookie is still there, but dead
    colleague.reload()
    expect(colleague.get_by_role("button", name="Log in")).to_be_visible()
    stranger.close()
    shared.close()


def test_dicom_text_shows_as_written_and_fetches_nothing(
    server: str, page: Page, data_dir: Path
) -> None:
    """An Accession ``:red[NORMAL]`` is not a red word, and a SeriesDescription that is Markdown
    for an image on another host makes the browser fetch nothing (the page fixture checks)."""
    _log_in(page, server, "rita", f"study?study={_study_uid(data_dir, HOSTILE_ACCESSION)}")
    expect(page.get_by_role("heading", name=f"Study {HOSTILE_ACCESSION}")).to_be_visible()
    expect(page.get_by_text(HOSTILE_DESCRIPTION).first).to_be_visible()
    expect(page.locator(".stMarkdownColoredText")).to_have_count(0)
    expect(page.locator("a[href*='evil.example'], img[src*='evil.example']")).to_have_count(0)


def _study_uid(data_dir: Path, accession: str) -> str:
    settings = Settings(data_dir=data_dir, database_url="", store_url="")
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        return session.scalars(
            select(Study.study_uid).where(Study.accession_number == accession)
        ).one()


def _self_signed(folder: Path) -> dict[str, str]:
    """A certificate for 127.0.0.1 and its key, as dashboard TLS settings."""
    issued = issue(folder, LOOPBACK)
    return {"dashboard_tls_cert_file": str(issued.cert), "dashboard_tls_key_file": str(issued.key)}


def test_over_https_the_cookie_is_secure_and_an_idle_page_clears_itself(
    data_dir: Path, browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The dashboard serving HTTPS itself (Streamlit's TLS, from two settings): the session
    cookie is Secure, and the worklist does not stay on screen past the idle timeout (15 s on
    this server)."""
    folder = tmp_path_factory.mktemp("idle")
    tls = _self_signed(folder)
    process, url = _serve(data_dir, folder / "server.log", session_idle_minutes="0.25", **tls)
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        _log_in(page, url, "rita")
        # The first page a fresh server renders (cold imports) can take more than 5 s here.
        expect(page.get_by_test_id("stDataFrame")).to_be_visible(timeout=30_000)
        (cookie,) = [c for c in context.cookies() if c["name"] == "radflow_session"]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        # Nobody touches the page from here on.
        expect(page.get_by_text("idle too long")).to_be_visible(timeout=40_000)
        expect(page.get_by_test_id("stDataFrame")).to_have_count(0)
        expect(page.get_by_role("link", name="Log in")).to_be_visible(timeout=30_000)
    finally:
        context.close()
        _stop(process)


def test_behind_a_trusted_proxy_cookies_are_secure_and_clients_told_apart(
    server: str, browser: Browser, data_dir: Path
) -> None:
    """An HTTPS reverse proxy in front (here: requests from 127.0.0.1, trusted by default) says
    the browser's scheme and address: the cookie is Secure, HSTS is sent, and a wrong password
    counts against the real client, not against everyone behind the proxy."""
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    context = browser.new_context(extra_http_headers=forwarded)
    try:
        for password in ("not the password", PASSWORD):
            form = context.request.get(f"{server}/login").text()
            csrf = re.search(r'name="csrf" value="([^"]+)"', form)
            assert csrf is not None
            fields = {"csrf": csrf[1], "next": "/", "name": "max", "password": password}
            answer = context.request.post(f"{server}/login", form=fields, max_redirects=0)
        assert answer.status == 303
        assert answer.headers["strict-transport-security"].startswith("max-age=")
        (session,) = [
            h["value"]
            for h in answer.headers_array
            if h["name"].lower() == "set-cookie" and h["value"].startswith("radflow_session=")
        ]
        assert "secure" in session.lower()
    finally:
        context.close()
    settings = Settings(data_dir=data_dir, database_url="", store_url="")
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        failed = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "login-failed")
        ).all()
    assert [(e.object_id, e.details["client"]) for e in failed] == [("max", "203.0.113.7")]


def _viewer(page: Page) -> tuple[Frame, Locator]:
    """The volume viewer's frame, and its root element once the whole series is in."""
    page.wait_for_selector("iframe[src*='/component/dashboard.viewer']")
    (frame,) = [f for f in page.frames if "/component/dashboard.viewer" in f.url]
    root = frame.locator("#viewer")
    expect(root).to_have_attribute("data-state", "ready")
    return frame, root


def _index(root: Locator) -> int:
    return int(root.get_attribute("data-index") or 0)


def test_a_ct_scrolls_in_the_browser_and_shows_its_reformats(
    server: str, page: Page, data_dir: Path
) -> None:
    _log_in(page, server, "rita", f"study?study={_study_uid(data_dir, CT_ACCESSION)}")
    frame, root = _viewer(page)
    expect(root).to_have_attribute("data-plane", "axial")
    expect(root).to_have_attribute("data-count", str(CT_SLICES))
    expect(frame.get_by_text("Grad-CAM of adrenal-ct-3d:v1", exact=True)).to_be_visible()
    windows = frame.get_by_label("Window").locator("option").all_inner_texts()
    assert windows == ["From the image", "Lung", "Mediastinum", "Bone", "Brain", "Abdomen"]
    start = _index(root)

    canvas = frame.locator("#canvas")
    canvas.hover()
    for _ in range(5):
        page.mouse.wheel(0, 120)
    expect(root).to_have_attribute("data-index", str(start + 5))
    canvas.click()  # the viewer has the focus: its own arrow keys
    for _ in range(3):
        page.keyboard.press("ArrowUp")
    expect(root).to_have_attribute("data-index", str(start + 2))
    page.get_by_role("heading", name=f"Study {CT_ACCESSION}").click()  # the page has it
    page.keyboard.press("PageDown")
    expect(root).to_have_attribute("data-index", str(start + 12))
    # Each step's time is taken at the frame after it: wait for the last one.
    frame.wait_for_function("() => window.radflowViewer.steps.length === 9")
    steps = frame.evaluate("window.radflowViewer.steps")
    print(f"per-slice step in the browser: median {np.median(steps):.1f} ms, max {max(steps):.1f}")
    assert np.median(steps) < 100
    _screenshot(page, "viewer-axial")

    frame.get_by_role("button", name="Coronal").click()
    expect(root).to_have_attribute("data-plane", "coronal")
    expect(root).to_have_attribute("data-count", str(CT_SIZE))
    # The coronal image shows the body: bright pixels in the middle of the canvas.
    centre = frame.evaluate(
        """() => { const c = document.getElementById("canvas");
        const d = c.getContext("2d").getImageData(c.width / 2 - 5, c.height / 2 - 5, 10, 10).data;
        return d.reduce((a, v) => a + v, 0); }"""
    )
    assert centre > 10 * 10 * 255  # more than the alpha channel alone: not black
    _screenshot(page, "viewer-coronal")


def test_agree_by_key_labels_the_study_and_opens_the_next(
    server: str, page: Page, data_dir: Path
) -> None:
    """With "next study after a verdict" on, A (pressed with the viewer focused: it passes the
    key on to the page) agrees with the model and the next unreviewed study opens."""
    _log_in(page, server, "rita", f"study?study={_study_uid(data_dir, CT_ACCESSION)}")
    frame, _ = _viewer(page)
    page.get_by_text("Next study after a verdict").click()
    frame.locator("#canvas").click()
    page.keyboard.press("a")
    expect(page.get_by_role("heading", name=f"Study {CT_ACCESSION}")).to_have_count(0)
    expect(page.get_by_text("Saved: adrenal-ct-3d = ")).to_be_visible()
    settings = Settings(data_dir=data_dir, database_url="", store_url="")
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        label = session.scalars(
            select(Label).join(Study).where(Study.accession_number == CT_ACCESSION)
        ).one()
        assert (label.task, label.author, label.source) == ("adrenal-ct-3d", "rita", "review")

"""Reviewing a segmentation in a real browser, as test_browser.py does (a real ``radflow
dashboard`` server, headless Chromium, the production content-security policy and login gate):
the predicted mask is drawn over the image, and a corrected mask uploaded becomes the label."""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from factories import make_segmentation_study, make_user, mask_png
from PIL import Image
from playwright.sync_api import Page, expect
from sqlalchemy import select
from test_browser import _log_in, _screenshot, _study_uid, browser, page, server

from radflow.db import Label, unit_of_work
from radflow.learning.masks import load_mask
from radflow.runtime import Runtime
from radflow.services.users import Role
from radflow.settings import Settings

pytestmark = pytest.mark.browser

__all__ = ["browser", "page", "server"]  # fixtures, used by name

SHAPE = (192, 256)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite data dir: one fundus-like study scored for retina-vessels, and a radiologist."""
    path = tmp_path_factory.mktemp("masks") / "data"
    probability = np.zeros(SHAPE, dtype=np.float32)
    probability[40:120, 60:200] = 0.9
    settings = Settings(data_dir=path, database_url="", store_url="")
    with Runtime.open(settings) as rt, unit_of_work(rt.session_factory) as session:
        make_segmentation_study(session, rt.store, probability, accession="ACC-SEG")
        make_user(session, "rita", Role.RADIOLOGIST)
    return path


def _tinted(page: Page, server: str, source: str) -> int:
    """Pixels of the served image (fetched with the page's session) that the mask tints green."""
    rgb = np.asarray(Image.open(io.BytesIO(page.request.get(urljoin(server, source)).body())))
    rgb = rgb[..., :3].astype(int)
    return int((rgb[..., 1] > rgb[..., 0] + 20).sum())


def test_the_mask_overlay_shows_and_a_corrected_mask_uploads(
    server: str, page: Page, data_dir: Path, tmp_path: Path
) -> None:
    uid = _study_uid(data_dir, "ACC-SEG")
    _log_in(page, server, "rita", f"study?study={uid}")
    expect(page.get_by_role("heading", name="Study ACC-SEG")).to_be_visible()
    expect(page.get_by_text("mask of retina-vessels:v1 at threshold 0.500")).to_be_visible()
    image = page.get_by_test_id("stImage").locator("img")
    filled = image.get_attribute("src") or ""
    # Served as JPEG: its edges blur a little, so counts are near, not exact.
    region = _tinted(page, server, filled)
    assert abs(region - 80 * 140) < 0.1 * 80 * 140  # the whole predicted region
    page.get_by_text("Contour", exact=True).click()
    expect(image).not_to_have_attribute("src", filled)
    outline = image.get_attribute("src") or ""
    assert 0 < _tinted(page, server, outline) < region / 3  # its edge only
    _screenshot(page, "study-mask")

    corrected = np.zeros(SHAPE, dtype=bool)
    corrected[20:60, 30:220] = True
    upload = tmp_path / "corrected.png"
    upload.write_bytes(mask_png(corrected))
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(upload)
    expect(page.get_by_text("corrected.png")).to_be_visible()
    page.get_by_role("button", name="Store the corrected mask").click()
    expect(
        page.get_by_text("Saved: the corrected mask is the retina-vessels label")
    ).to_be_visible()

    settings = Settings(data_dir=data_dir, database_url="", store_url="")
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        label = session.scalars(select(Label)).one()
        stored = load_mask(rt.store, uid, label.task, label.value)
    assert (label.source, label.author, label.task) == ("review", "rita", "retina-vessels")
    assert np.array_equal(stored.mask, corrected)

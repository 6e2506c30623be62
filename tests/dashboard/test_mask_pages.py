"""The study page of a segmentation (Streamlit AppTest, as test_pages.py): the predicted mask
over the image, filled or outlined, accepted; a wrong upload refused, a corrected one stored."""

from __future__ import annotations

import numpy as np
from factories import make_segmentation_study, mask_png
from sqlalchemy import select
from test_pages import browser, embedded, events, image_caption, runtime, study_page

from radflow.db import Label, unit_of_work
from radflow.runtime import Runtime

__all__ = ["browser", "embedded", "runtime"]  # fixtures, used by name

SHAPE = (64, 80)


def _study(runtime: Runtime) -> str:
    probability = np.zeros(SHAPE, dtype=np.float32)
    probability[10:30, 20:50] = 0.9
    with unit_of_work(runtime.session_factory) as session:
        study = make_segmentation_study(session, runtime.store, probability, accession="SEG")
        return study.study_uid


def _labels(runtime: Runtime) -> list[tuple[str, str, str]]:
    with runtime.session_factory() as session:
        return [(x.source, x.author, x.value) for x in session.scalars(select(Label))]


def test_the_predicted_mask_is_drawn_and_accepted(runtime: Runtime, embedded: None) -> None:
    uid = _study(runtime)
    at = study_page(uid)
    assert not at.exception
    assert "mask of retina-vessels:v1 at threshold 0.500" in image_caption(at)
    filled = at.image[0].value
    at.radio(key="mask_style").set_value("Contour").run()
    assert at.image[0].value != filled
    at.toggle(key="mask").set_value(False).run()
    assert "mask of" not in image_caption(at)
    assert not any(b.label in ("Agree", "Set label") for b in at.button)  # masks, not labels

    next(b for b in at.button if b.label == "Accept mask").click().run()

    assert not at.exception
    assert (
        at.success[0].value == "Saved: the predicted mask is the retina-vessels label (600 pixels)"
    )
    ((source, author, value),) = _labels(runtime)
    assert (source, author) == ("review", "rita") and value.startswith("mask:")
    assert events(runtime, "review") == [("rita", uid)]


def test_a_wrong_upload_is_refused_and_a_corrected_mask_stored(
    runtime: Runtime, embedded: None
) -> None:
    uid = _study(runtime)
    at = study_page(uid)
    store = next(b for b in at.button if b.label == "Store the corrected mask")
    small = mask_png(np.ones((10, 12), dtype=bool))
    at.file_uploader(key="mask_file").set_value(("small.png", small, "image/png"))
    store.click().run()
    assert not at.exception
    assert "was not stored (mask-size)" in at.error[0].value
    assert any("small.png is 12x10 but its image is 80x64" in t.value for t in at.text)
    assert _labels(runtime) == []

    corrected = np.zeros(SHAPE, dtype=bool)
    corrected[5:20, 30:70] = True
    at.file_uploader(key="mask_file").set_value(("mask.png", mask_png(corrected), "image/png"))
    next(b for b in at.button if b.label == "Store the corrected mask").click().run()
    assert not at.exception
    assert (
        at.success[0].value == "Saved: the corrected mask is the retina-vessels label (600 pixels)"
    )
    assert [(source, author) for source, author, _ in _labels(runtime)] == [("review", "rita")]

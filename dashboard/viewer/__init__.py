"""The volume viewer: a Streamlit component of hand-written HTML and JavaScript (``frontend/``,
no build step, nothing fetched from elsewhere) that holds a whole series in the browser.

The page sends the series once, packed by ``radflow.services.volume_view``, as the component's
arguments: over the page's own WebSocket (the logged-in Streamlit session), never by a URL of
its own. The browser then scrolls (wheel, arrow keys, slider), reformats (axial, coronal,
sagittal, each at its voxel spacing's aspect), windows (the presets that fit the modality) and
draws the layers (a heat map, a label map) without asking the server again.

Streamlit serves ``frontend/`` at ``/component/<name>/``; the gate lets only that path be framed,
and only by the app itself (dashboard/gate.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit.components.v1 as components

from radflow.services.volume_view import Layer, VolumeView

FRONTEND = Path(__file__).resolve().parent / "frontend"
HEIGHT = 720


def _component() -> Any:
    # Declared on every use, in the script run: Streamlit registers a component (and then
    # serves its files) only if it is declared while a script runs, and a module is imported
    # once per process, maybe outside one.
    return components.declare_component("viewer", path=str(FRONTEND))


def volume_viewer(
    view: VolumeView,
    *,
    layers: list[Layer],
    caption: str,
    key: str,
    height: int = HEIGHT,
) -> None:
    """The viewer on ``view`` with ``layers`` over it; ``caption`` is shown as plain text."""
    _component()(
        volume=view.describe(),
        voxels=view.data,
        layers=[layer.describe() for layer in layers],
        **{f"layer{i}": layer.data for i, layer in enumerate(layers)},
        caption=caption,
        height=height,
        key=key,
        default=None,
    )

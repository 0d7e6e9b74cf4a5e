"""napari sample data: a small synthetic Seestar night, as frames and as a finished mosaic.

The night comes from :mod:`napari_zemosaic.engine.demo` (2×2 panels of Seestar S50-like
CFA sub-frames with a WCS, stars, nebula, hot pixels, a satellite trail and a cloudy
frame) and is written once to a folder under the system temp directory, reused while
it is there. *Frames* opens it as a session (the Frame filter, SDS preview and Run
widgets of the current viewer pick it up) and returns its ``frames`` footprints layer;
*finished mosaic* also runs the pipeline (once; later calls read the result) and
returns ``mosaic``, ``alpha`` and ``coverage`` under the footprints.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

SAMPLE_SPEC: dict[str, Any] = {"panels": (2, 2), "frames_per_panel": 4, "scale": 0.25, "seed": 0}


def sample_root() -> Path:
    """The folder of the sample night (one per spec, under the temp directory)."""
    digest = hashlib.sha1(json.dumps(SAMPLE_SPEC, sort_keys=True, default=list).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"napari-zemosaic-sample-{digest}"


def ensure_sample_night() -> Path:
    """Write the sample night unless it is already there; returns its root folder."""
    from .engine.demo import DemoSpec, generate_demo

    root = sample_root()
    spec = DemoSpec(**SAMPLE_SPEC)
    frames = sorted((root / "frames").glob("*.fit"))
    if len(frames) != spec.n_frames or not (root / "truth" / "frames.json").is_file():
        generate_demo(root, spec)
    return root


def _current_viewer() -> Any:
    try:
        import napari

        return napari.current_viewer()
    except Exception:  # noqa: BLE001 - no Qt or no viewer: plain layer data is still returned
        return None


def _scanned_session(root: Path, viewer: Any) -> Any:
    """The sample's session, scanned (the viewer's widgets follow it); no layer added here."""
    from .api import Session, drain
    from .config import load_config

    session = Session(root / "frames", root / "mosaic", config=load_config(), viewer=viewer)
    session.apply_scan(drain(session.iter_scan()))
    return session


def _prepare_viewer(viewer: Any, replaced: tuple[str, ...]) -> None:
    """North up, RA/Dec readout, and the layers this sample replaces removed (names stay unique)."""
    if viewer is not None:
        for name in replaced:
            if name in viewer.layers:
                viewer.layers.remove(name)
        from ._widgets.layers import install_radec_readout, north_up

        north_up(viewer)
        install_radec_readout(viewer)


def sample_night() -> list[tuple]:
    """Sample: the synthetic night opened as a session (``frames`` footprints)."""
    from ._widgets import layers

    viewer = _current_viewer()
    session = _scanned_session(ensure_sample_night(), viewer)
    data = layers.frames_layer_data(viewer, layers.prepare_frames_display(session.scan_result, session.included))
    _prepare_viewer(viewer, (layers.FRAMES_LAYER,))
    return [] if data is None else [data]


def sample_mosaic() -> list[tuple]:
    """Sample: the synthetic night and its finished mosaic (``mosaic``, ``alpha``, ``coverage``, ``frames``)."""
    from ._widgets import layers
    from .api import drain

    viewer = _current_viewer()
    root = ensure_sample_night()
    session = _scanned_session(root, viewer)
    science = root / "mosaic" / f"{session.config['output_basename']}_science.fits"
    report = root / "mosaic" / "run_report.json"
    done = science.is_file() and report.is_file() and json.loads(report.read_text()).get("status") == "ok"
    result = layers.result_from_science_fits(science) if done else drain(session.iter_run())
    world = layers.world_wcs(viewer, session.canvas.wcs) if viewer is not None else session.canvas.wcs
    display = layers.prepare_mosaic_display(result, layers.max_texture_size())
    frames = layers.frames_layer_data(viewer, layers.prepare_frames_display(session.scan_result, session.included), world)
    _prepare_viewer(viewer, (layers.MOSAIC_LAYER, layers.ALPHA_LAYER, layers.COVERAGE_LAYER, layers.FRAMES_LAYER))
    return layers.mosaic_layer_data(viewer, display, world) + ([] if frames is None else [frames])

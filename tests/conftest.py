"""Shared fixtures: small synthetic Seestar nights (with truth) and their mosaics, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# Small but realistic: 2x2 panels of 270x480 px GRBG subs with every artefact the demo knows.
SCIENCE_SPEC = dict(panels=(2, 2), frames_per_panel=5, scale=0.25, seed=11)


@pytest.fixture(scope="session")
def demo_night(tmp_path_factory: pytest.TempPathFactory):
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("demo_night")
    truth = generate_demo(root, DemoSpec(**SCIENCE_SPEC))
    return root, truth


@pytest.fixture(scope="session")
def demo_mosaic(demo_night, tmp_path_factory: pytest.TempPathFactory):
    """The default Mosaic-First run on the demo night (kappa-sigma, linear_fit normalisation)."""
    from napari_zemosaic.engine.pipeline import run

    root, truth = demo_night
    out = tmp_path_factory.mktemp("demo_mosaic")
    result = run(root / "frames", out, {"max_memory_mb": 512, "language": "en"})
    return result, truth


def frames_dir(root: Path) -> Path:
    return root / "frames"

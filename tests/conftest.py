"""Shared fixtures: small synthetic Seestar nights (with truth) and their mosaics, built once per session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``"1m"``) at ``mount_point`` for a full-disk test; the test is
    skipped where it cannot be mounted (not root, not Linux, no mount permission)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if not (sys.platform.startswith("linux") and os.geteuid() == 0):
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)

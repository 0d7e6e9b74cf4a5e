"""SDS over several GPUs of one host (one Dask worker per GPU) gives the one-GPU mosaic.

Never in CI (``gpu`` marker; skipped without CuPy, ``distributed`` or a second device):
``python -m pytest -m gpu tests/engine/test_distributed_gpu.py -s`` on a 2-GPU host.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
pytest.importorskip("distributed")


def _devices() -> int:
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver
        return 0


@pytest.mark.skipif(_devices() < 2, reason="needs two CUDA devices")
def test_sds_over_two_gpus_matches_one_gpu(tmp_path: Path) -> None:
    from napari_zemosaic.config import gpu_mode_overrides
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.pipeline import run

    generate_demo(tmp_path / "night", DemoSpec(panels=(2, 2), frames_per_panel=12, scale=0.5, seed=4))
    frames = tmp_path / "night" / "frames"
    base = {"language": "en", "workflow": "sds", "quality_rejection": False, **gpu_mode_overrides("on")}

    started = time.perf_counter()
    one = run(frames, tmp_path / "one", base)  # one GPU, this process
    one_s = time.perf_counter() - started
    started = time.perf_counter()
    two = run(frames, tmp_path / "two", {**base, "scheduler": "local"})  # one worker per GPU
    two_s = time.perf_counter() - started

    assert one.report["workflow_used"] == two.report["workflow_used"] == "sds"
    section = two.report["scheduler"]
    assert section["gpus"] == _devices() and section["workers"] == _devices()
    megatiles = [task for task in section["tasks"] if task["kind"] == "megatile"]
    assert len(megatiles) >= 4 and all(task["status"] == "ok" for task in megatiles)
    assert len({task["worker"] for task in megatiles}) == 2  # both devices' workers built tiles
    value_range = float(np.nanmax(one.data) - np.nanmin(one.data))
    np.testing.assert_array_equal(np.isnan(two.data), np.isnan(one.data))
    difference = float(np.nanmax(np.abs(two.data - one.data)))
    assert difference <= 1e-5 * value_range
    print(f"\nSDS, {len(megatiles)} batches: one GPU {one_s:.1f} s, two GPUs {two_s:.1f} s "
          f"(x{one_s / two_s:.2f}); max |diff| / range = {difference / value_range:.2e}")

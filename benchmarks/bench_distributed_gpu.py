"""SDS on one GPU (this process) vs a local Dask cluster with one worker per GPU, same frames.

    python benchmarks/bench_distributed_gpu.py --frames 400 --panels 2x2 --workers 32

Full-size demo frames are written first (forked processes, before CUDA starts); each
configuration then runs the whole pipeline once (``--gpu on``, SDS); the mosaics are compared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--panels", default="2x2")
    parser.add_argument("--workers", type=int, default=16, help="processes writing the frames")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.panels.lower().split("x"))

    from bench_gpu import generate_frames

    root = Path(tempfile.mkdtemp(prefix="bench_dask_gpu_"))
    seconds = generate_frames(root / "frames", args.frames, (rows, cols), args.workers)
    print(f"{args.frames} full-size frames ({args.panels}) written in {seconds:.1f} s", flush=True)

    from napari_zemosaic.config import gpu_mode_overrides
    from napari_zemosaic.engine.pipeline import run

    base = {"language": "en", "workflow": "sds", **gpu_mode_overrides("on")}
    results = {}
    for label, extra in (("one GPU, no scheduler", {}), ("local cluster, one worker per GPU", {"scheduler": "local"})):
        started = time.perf_counter()
        result = run(root / "frames", root / label.split(",")[0].replace(" ", "_"), {**base, **extra})
        wall = time.perf_counter() - started
        results[label] = (wall, result)
        scheduler = result.report["scheduler"]
        print(f"{label}: {wall:.1f} s, {len(result.report['sds']['batches'])} batches, "
              f"workers={scheduler['workers']} gpus={scheduler.get('gpus')}, timings={result.report['timings_s']}",
              flush=True)
    (one_s, one), (two_s, two) = results.values()
    value_range = float(np.nanmax(one.data) - np.nanmin(one.data))
    print(f"speed-up x{one_s / two_s:.2f}; max |diff| / range = {float(np.nanmax(np.abs(two.data - one.data))) / value_range:.2e}")


if __name__ == "__main__":
    main()

"""SDS on one GPU (this process) and on a local Dask cluster of 1 and 2 GPU workers, same frames.

    python benchmarks/bench_distributed_gpu.py --frames 1000 --panels 2x2 --workers 32 \
        --configs cluster1 cluster2 --frames-dir /tmp/night1000

Full-size demo frames are written first (forked processes, before CUDA starts; kept and reused
when ``--frames-dir`` already holds them); each configuration then runs the whole pipeline
(``--gpu on``, SDS) ``--repeats`` times, in turns. Configurations:

* ``plain``    — no scheduler: everything in this process on GPU 0;
* ``cluster1`` — ``--scheduler local`` with one GPU worker (``scheduler_workers=1``);
* ``cluster2`` — ``--scheduler local`` with one worker per GPU (2 on a 2-GPU host).

Printed per run: wall time, phase timings, the sum of task seconds per kind; at the end the
medians, the speed-ups against the first configuration and the largest differences of the
mosaics and of the mega-tile photometry (gains, offsets) against it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "cluster1": {"scheduler": "local", "scheduler_workers": 1},
    "cluster2": {"scheduler": "local"},
}


def task_seconds(report: dict[str, Any]) -> dict[str, float]:
    """Sum of the tasks' wall seconds per kind (on their workers), and of their own phases."""
    sums: dict[str, float] = defaultdict(float)
    for task in report["scheduler"]["tasks"]:
        sums[task["kind"]] += float(task.get("seconds") or 0.0)
        for phase, seconds in (task.get("phases") or {}).items():
            sums[f"{task['kind']}.{phase}"] += float(seconds)
    return {kind: round(value, 1) for kind, value in sums.items()}


def batch_terms(report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    batches = [b for b in report["sds"]["batches"] if b.get("gain") is not None]
    return np.array([b["gain"] for b in batches]), np.array([b["offset"] for b in batches])


def compare(result: Any, reference: Any) -> str:
    value_range = float(np.nanmax(reference.data) - np.nanmin(reference.data))
    diff = float(np.nanmax(np.abs(result.data - reference.data))) / value_range
    same_nan = bool(np.array_equal(np.isnan(result.data), np.isnan(reference.data)))
    gains, offsets = batch_terms(result.report)
    ref_gains, ref_offsets = batch_terms(reference.report)
    if gains.shape == ref_gains.shape:
        terms = (f"gains max |diff| {float(np.max(np.abs(gains - ref_gains))):.2e}, "
                 f"offsets max |diff| {float(np.max(np.abs(offsets - ref_offsets))):.2e}")
    else:
        terms = f"different batches ({gains.shape} vs {ref_gains.shape})"
    return f"max |diff| / range = {diff:.2e}, same NaN mask: {same_nan}, {terms}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--panels", default="2x2")
    parser.add_argument("--workers", type=int, default=16, help="processes writing the frames")
    parser.add_argument("--configs", nargs="+", default=["plain", "cluster2"], choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--frames-dir", type=Path, default=None, help="write the frames here (reused if present)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config for every run")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.panels.lower().split("x"))

    from bench_gpu import generate_frames

    root = Path(tempfile.mkdtemp(prefix="bench_dask_gpu_"))
    frames_dir = args.frames_dir or root / "frames"
    if len(list(frames_dir.glob("*.fit"))) >= args.frames:
        print(f"reusing the {args.frames} frames of {frames_dir}", flush=True)
    else:
        seconds = generate_frames(frames_dir, args.frames, (rows, cols), args.workers)
        print(f"{args.frames} full-size frames ({args.panels}) written in {seconds:.1f} s", flush=True)

    from napari_zemosaic.config import gpu_mode_overrides, validate_config
    from napari_zemosaic.engine.pipeline import run

    extra_config: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra_config[key] = value
    base = {"language": "en", "workflow": "sds", **gpu_mode_overrides("on"), **extra_config}
    validate_config(base)
    walls: dict[str, list[float]] = defaultdict(list)
    last: dict[str, Any] = {}
    for repeat in range(args.repeats):
        for name in args.configs:
            out = root / f"{name}_{repeat}"
            started = time.perf_counter()
            result = run(frames_dir, out, {**base, **CONFIGS[name]})
            wall = time.perf_counter() - started
            walls[name].append(wall)
            last[name] = result
            scheduler = result.report["scheduler"]
            print(f"{name} run {repeat + 1}: {wall:.1f} s, {len(result.report['sds']['batches'])} batches, "
                  f"workers={scheduler['workers']} threads={scheduler.get('threads_per_worker')} "
                  f"gpus={scheduler.get('gpus')}, timings={result.report['timings_s']}, "
                  f"task seconds={task_seconds(result.report)}", flush=True)
            if name != args.configs[0] and args.configs[0] in last:
                print(f"  vs {args.configs[0]}: " + compare(result, last[args.configs[0]]), flush=True)
    first = args.configs[0]
    reference = statistics.median(walls[first])
    for name in args.configs:
        median = statistics.median(walls[name])
        line = f"{name}: median {median:.1f} s ({', '.join(f'{w:.1f}' for w in walls[name])}), x{reference / median:.2f} vs {first}"
        if name != first:
            line += "; " + compare(last[name], last[first])
        print(line, flush=True)
    if "cluster1" in walls and "cluster2" in walls:
        one, two = statistics.median(walls["cluster1"]), statistics.median(walls["cluster2"])
        print(f"1 -> 2 GPU workers: x{one / two:.2f}; " + compare(last["cluster2"], last["cluster1"]), flush=True)


if __name__ == "__main__":
    main()

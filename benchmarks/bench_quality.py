"""Frame-quality metrics per full-size sub versus reading and debayering it.

For each full-size (1080x1920) demo frame, interleaved and repeated, it times:

* ``read+debayer``: ``frames.load_frame`` (read, BZERO, hot pixels, bilinear debayer): what
  every stacking path pays per frame;
* ``raw read``: ``quality.load_measurement_data`` (read + BZERO, no debayer);
* ``metrics``: ``quality.measure_frame`` on the raw CFA plane already in memory;
* ``read+metrics``: ``quality.measure_one`` (what P1 pays per frame when it measures);

then the thread-pool throughput of ``quality.measure_frames`` (seconds per frame, wall clock)
with 1 worker and with ``--workers``. Medians over frames x repeats; ratios are to read+debayer.

    python benchmarks/bench_quality.py --frames 6 --repeats 10 --workers 2 [--order blocked]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def _timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _wall_and_cpu(function: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds: on a busy machine the CPU time is the steadier one."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def _drain(generator: Any) -> Any:
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--order", choices=("interleaved", "blocked"), default="interleaved")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from napari_zemosaic.engine import quality
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.frames import load_frame, read_frame_info
    from napari_zemosaic.events import Reporter

    with tempfile.TemporaryDirectory() as tmp:
        truth = generate_demo(Path(tmp), DemoSpec(panels=(1, 1), frames_per_panel=args.frames, scale=args.scale, seed=1))
        infos = [read_frame_info(path) for path in truth.frame_paths]
        raws = [quality.load_measurement_data(info) for info in infos]
        for info, raw in zip(infos, raws):  # warm caches and imports
            load_frame(info)
            quality.measure_frame(raw, info)

        stages: dict[str, Callable[[Any, Any], Any]] = {
            "read+debayer": lambda info, raw: load_frame(info),
            "raw read": lambda info, raw: quality.load_measurement_data(info),
            "metrics": lambda info, raw: quality.measure_frame(raw, info),
            "read+metrics": lambda info, raw: quality.measure_one(info),
        }
        samples: dict[str, list[float]] = {name: [] for name in stages}
        cpu_samples: dict[str, list[float]] = {name: [] for name in stages}
        if args.order == "interleaved":  # every stage starts with caches the others left
            plan = [(name, info, raw) for _ in range(args.repeats) for info, raw in zip(infos, raws) for name in stages]
        else:  # each stage in one block: warm caches, as in a loop over frames doing one thing
            plan = [(name, info, raw) for name in stages for _ in range(args.repeats) for info, raw in zip(infos, raws)]
        for name, info, raw in plan:
            wall, cpu = _wall_and_cpu(lambda: stages[name](info, raw))
            samples[name].append(wall)
            cpu_samples[name].append(cpu)

        pool: dict[str, float] = {}
        for workers in sorted({1, args.workers}):
            runs = [
                _timed(lambda: _drain(quality.measure_frames(infos, {"num_workers": workers}, Reporter())))
                for _ in range(max(1, args.repeats // 2))
            ]
            pool[f"measure_frames, {workers} worker(s), s/frame"] = statistics.median(runs) / len(infos)

    medians = {name: statistics.median(values) for name, values in samples.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_samples.items()}
    reference = medians["read+debayer"]
    cpu_reference = cpu_medians["read+debayer"]
    result = {
        "frame": f"{infos[0].shape[1]}x{infos[0].shape[0]} GRBG uint16",
        "samples_per_stage": len(samples["metrics"]),
        "order": args.order,
        "cpu_count": os.cpu_count(),
        "median_ms": {name: round(1000 * value, 2) for name, value in medians.items()},
        "ratio_to_read_debayer": {name: round(value / reference, 3) for name, value in medians.items()},
        "median_cpu_ms": {name: round(1000 * value, 2) for name, value in cpu_medians.items()},
        "cpu_ratio_to_read_debayer": {name: round(value / cpu_reference, 3) for name, value in cpu_medians.items()},
        "pool_ms_per_frame": {name: round(1000 * value, 2) for name, value in pool.items()},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['frame']}, {result['samples_per_stage']} samples per stage ({args.order}), {result['cpu_count']} CPUs")
    print(f"  {'stage':<14s} {'wall ms':>8s} {'ratio':>6s}   {'CPU ms':>8s} {'ratio':>6s}   (ratio: to read+debayer)")
    for name, value in medians.items():
        cpu = cpu_medians[name]
        print(f"  {name:<14s} {1000 * value:8.2f} {value / reference:6.2f}   {1000 * cpu:8.2f} {cpu / cpu_reference:6.2f}")
    for name, value in pool.items():
        print(f"  {name:<40s} {1000 * value:8.2f} ms")


if __name__ == "__main__":
    main()

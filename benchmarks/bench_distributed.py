"""SDS wall time on a local Dask cluster of 1 and 2 worker processes, against the plain run.

One demo night, SDS on the CPU, the same config for every run except ``scheduler``
(the configurations take turns within each repeat, so load changes hit them alike):

* ``none``       — the plain single-process run (the reference mosaic);
* ``1 worker``   — a LocalCluster of 1 worker process (1 thread), mega-tiles as tasks;
* ``2 workers``  — a LocalCluster of 2 worker processes (1 thread each).

Each cluster is started once (its start-up time is reported apart) and every configuration gets
one warm-up run that is not counted (first tasks pay the workers' imports); then ``--repeats``
runs each: median wall time, median sums of the mega-tile tasks' own wall and CPU times
(``run_report.json`` → ``scheduler``: CPU far below wall means the workers waited for cores), and
the largest difference from the reference mosaic over the data range. Other tasks of the run
(one ``metrics`` task per frame) are not in the sums.

    python benchmarks/bench_distributed.py --panels 2x2 --frames-per-panel 25 --scale 0.3 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _load() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - Windows
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--panels", default="2x2")
    parser.add_argument("--frames-per-panel", type=int, default=8)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-memory-mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from distributed import Client

    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.distributed import start_local_cluster
    from napari_zemosaic.engine.pipeline import run

    rows, cols = (int(v) for v in args.panels.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    generate_demo(work, DemoSpec(panels=(rows, cols), frames_per_panel=args.frames_per_panel, scale=args.scale,
                                 seed=args.seed))  # fmt: skip
    frames = work / "frames"
    config = {"workflow": "sds", "sds_mode": True, "max_memory_mb": args.max_memory_mb, "use_gpu_phase5": False,
              "stack_use_gpu": False, "language": "en"}  # fmt: skip
    counter = iter(range(10_000))

    def one(scheduler: str) -> tuple[float, float, np.ndarray, dict]:
        out = work / f"out_{next(counter)}"
        started = time.perf_counter()
        result = run(frames, out, {**config, "scheduler": scheduler})
        wall = time.perf_counter() - started
        assert result.report["workflow_used"] == "sds", result.report["fallbacks"]
        tasks = [t for t in result.report["scheduler"]["tasks"] if t["kind"] == "megatile"]
        units = (sum(t["seconds"] or 0.0 for t in tasks), sum(t["cpu_seconds"] or 0.0 for t in tasks))
        return wall, units, result.data, result.report

    print(f"night: {args.panels} panels x {args.frames_per_panel} frames, scale {args.scale}; cores {os.cpu_count()}")
    # Every cluster is up for the whole benchmark and the configurations take turns inside each
    # repeat, so a change of the machine's load hits all of them alike.
    setups: list[tuple[str, str, Any, Any, str]] = [("none (one process)", "none", None, None, "-")]
    try:
        for n in args.workers:
            started = time.perf_counter()
            cluster = start_local_cluster(n, 1)  # as `--scheduler local` starts it
            client = Client(cluster, set_as_default=False)
            client.wait_for_workers(n)
            name = f"local, {n} worker process{'es' if n > 1 else ''}"
            setups.append((name, cluster.scheduler_address, cluster, client, f"{time.perf_counter() - started:.1f}"))
        for _, scheduler, *_ in setups:
            one(scheduler)  # warm-up: imports and caches of this process and of the workers
        results: dict[str, list[tuple[float, tuple[float, float], np.ndarray, dict]]] = {s[0]: [] for s in setups}
        loads: dict[str, list[str]] = {s[0]: [] for s in setups}
        for _ in range(args.repeats):
            for name, scheduler, *_ in setups:
                results[name].append(one(scheduler))
                loads[name].append(_load().split(" / ")[0])
    finally:
        for _, _, cluster, client, _ in setups[1:]:
            client.close()
            cluster.close()

    reference = results[setups[0][0]][0][2]
    span = float(np.nanmax(reference) - np.nanmin(reference))
    batches = len(results[setups[0][0]][0][3]["sds"]["batches"])
    print(f"SDS batches: {batches}; repeats: {args.repeats} (medians), configurations interleaved")
    print("| scheduler | cluster start s | wall s (speed-up) | mega-tile tasks: sum of wall s / CPU s "
          "| max abs diff / range | 1-min load after each run |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r[0] for r in results[setups[0][0]])
    for name, scheduler, _, _, startup in setups:
        runs = results[name]
        wall = statistics.median(r[0] for r in runs)
        diff = max(float(np.nanmax(np.abs(r[2] - reference))) / span for r in runs)
        units_text = "-"
        if scheduler != "none":
            units_text = (f"{statistics.median(r[1][0] for r in runs):.2f} / "
                          f"{statistics.median(r[1][1] for r in runs):.2f}")  # fmt: skip
            workers = {t["worker"] for r in runs for t in r[3]["scheduler"]["tasks"] if t["kind"] == "megatile"}
            assert len(workers) == min(int(name.split(", ")[1].split()[0]), batches), workers
        print(f"| {name} | {startup} | {wall:.2f} ({base / wall:.2f}x) | {units_text} | {diff:.1e} "
              f"| {', '.join(loads[name])} |")

if __name__ == "__main__":
    main()

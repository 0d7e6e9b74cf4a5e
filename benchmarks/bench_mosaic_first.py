"""End-to-end Mosaic-First on full-size demo frames: frames/s and peak RSS versus frame count.

One night of N frames is generated (one pointing, equatorial mount: no field rotation, so the
canvas is fixed); each run stacks an evenly spaced subset of it, in its own process, so peak RSS
is that run's alone. Peak RSS is reported two ways: the kernel's high-water mark (ru_maxrss) and
the largest resident size sampled every 20 ms, per phase.

    python benchmarks/bench_mosaic_first.py --counts 50 200 --max-memory-mb 1500
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import psutil
from napari_zemosaic.engine.pipeline import iter_run
from napari_zemosaic.engine.context import peak_rss_mb
from napari_zemosaic.events import ProgressEvent
frames, out, budget, workflow, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
paths = sorted(Path(frames).glob("*.fit"))
include = paths[:: max(1, len(paths) // count)][:count]
process, phase, peaks, done = psutil.Process(), ["P1"], {}, threading.Event()
def sample():
    while not done.is_set():
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), process.memory_info().rss / 2**20)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
config = {"max_memory_mb": budget, "workflow": workflow, "use_gpu_phase5": False, "stack_use_gpu": False}
start = time.perf_counter()
generator = iter_run(frames, out, config, include=include)
while True:
    try:
        event = next(generator)
    except StopIteration as stop:
        result = stop.value
        break
    if isinstance(event, ProgressEvent):
        phase[0] = event.phase
elapsed = time.perf_counter() - start
done.set()
print(json.dumps({"seconds": elapsed, "frames": result.report["frames"]["used"], "peak_rss_mb": peak_rss_mb(),
                  "sampled_peak_by_phase_mb": {k: round(v, 1) for k, v in peaks.items()},
                  "canvas": result.report["canvas"]["shape"], "block": result.report["canvas"]["block_side"],
                  "spilled": result.report["canvas"]["spilled"], "timings": result.report["timings_s"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--max-memory-mb", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workflow", default="mosaic_first")
    parser.add_argument("--frames-dir", help="reuse a folder of demo frames instead of generating one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.frames_dir:
            frames = Path(args.frames_dir)
        else:
            from napari_zemosaic.engine.demo import DemoSpec, generate_demo

            generate_demo(Path(tmp) / "night", DemoSpec(panels=(1, 1), frames_per_panel=max(args.counts),
                                                        scale=args.scale, seed=1, eqmode=1))
            frames = Path(tmp) / "night" / "frames"
        for count in args.counts:
            runs = []
            for repeat in range(args.repeats):
                out = Path(tmp) / f"out{count}_{repeat}"
                completed = subprocess.run(
                    [sys.executable, "-c", CHILD, str(frames), str(out), str(args.max_memory_mb), args.workflow, str(count)],
                    check=True, capture_output=True, text=True,
                )
                runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
            seconds = statistics.median(r["seconds"] for r in runs)
            rows.append({"frames": runs[0]["frames"], "median_s": round(seconds, 2),
                         "frames_per_s": round(runs[0]["frames"] / seconds, 2),
                         "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
                         "sampled_peak_by_phase_mb": runs[0]["sampled_peak_by_phase_mb"],
                         "canvas": runs[0]["canvas"], "block": runs[0]["block"], "spilled": runs[0]["spilled"],
                         "timings": runs[0]["timings"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'frames':>7} {'median s':>9} {'frames/s':>9} {'peak RSS MB':>12}  canvas      block spilled")
    for row in rows:
        print(f"{row['frames']:>7} {row['median_s']:>9} {row['frames_per_s']:>9} {row['peak_rss_mb']:>12}  "
              f"{row['canvas'][1]}x{row['canvas'][0]:<6} {row['block']:>5} {row['spilled']}")
    if len(rows) >= 2:
        growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
        print(f"peak RSS growth from {rows[0]['frames']} to {rows[-1]['frames']} frames: {growth:+.1%}")


if __name__ == "__main__":
    main()

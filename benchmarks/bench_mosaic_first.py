"""End-to-end Mosaic-First (or SDS) on full-size demo frames: frames/s and peak RSS versus frame count.

One night of N frames is generated (equatorial mount: no field rotation, so the canvas is fixed;
one pointing unless ``--panels RxC``); each run stacks an evenly spaced subset of it, in its own
process, so peak RSS is that run's alone. Peak RSS is reported two ways: the kernel's high-water
mark (ru_maxrss) and the largest resident size sampled every 20 ms, per phase. Several
``--workflow`` values run side by side on the same frames.

    python benchmarks/bench_mosaic_first.py --counts 50 200 --max-memory-mb 1500
    python benchmarks/bench_mosaic_first.py --panels 2x2 --counts 80 --workflow mosaic_first sds
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import psutil
from napari_zemosaic.engine.pipeline import iter_run
from napari_zemosaic.engine.context import peak_rss_mb
from napari_zemosaic.events import LogEvent, ProgressEvent
frames, out, budget, workflow, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
paths = sorted(Path(frames).glob("*.fit"))
include = paths[:: max(1, len(paths) // count)][:count]
process, phase, peaks, done = psutil.Process(), ["P1"], {}, threading.Event()
# SDS: peak of each mega-tile (its 1-based batch number while in_sds and P3)
in_sds, batch, batch_peaks = [False], [1], {}
def sample():
    while not done.is_set():
        rss = process.memory_info().rss / 2**20
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
        if phase[0] == "P3" and in_sds[0]:
            batch_peaks[batch[0]] = max(batch_peaks.get(batch[0], 0.0), rss)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
# SDS runs Mosaic-First inside every batch (its P3/P5 progress events): the phase shown is the
# SDS one, taken from the SDS messages: mega-tiles = P3, mega-tile photometry = P4.5 (with the first
# block of the final stack, computed before its message arrives), the rest of the final stack = P5.
SDS_PHASES = {"sds_info_batches_built": "P3", "sds_info_photometry": "P4.5", "sds_info_final_stack": "P5"}
config = {"max_memory_mb": budget, "workflow": workflow, "use_gpu_phase5": False, "stack_use_gpu": False}
start = time.perf_counter()
generator = iter_run(frames, out, config, include=include)
while True:
    try:
        event = next(generator)
    except StopIteration as stop:
        result = stop.value
        break
    if isinstance(event, LogEvent) and event.key in SDS_PHASES:
        in_sds[0] = True
        phase[0] = SDS_PHASES[event.key]
    elif isinstance(event, ProgressEvent):
        if not in_sds[0] or event.phase not in ("P3", "P4.5", "P5"):
            phase[0] = event.phase
        elif event.key == "progress_batches":
            if event.done == event.total:
                phase[0] = "P4.5"
            else:
                batch[0] = event.done + 1
elapsed = time.perf_counter() - start
done.set()
sds = result.report.get("sds") or {}
print(json.dumps({"seconds": elapsed, "frames": result.report["frames"]["used"], "peak_rss_mb": peak_rss_mb(),
                  "sampled_peak_by_phase_mb": {k: round(v, 1) for k, v in peaks.items()},
                  "sampled_peak_by_batch_mb": [round(v, 1) for _, v in sorted(batch_peaks.items())],
                  "workflow": result.report["workflow_used"], "batches": len(sds.get("batches") or []),
                  "largest_batch": max((b["size"] for b in sds.get("batches") or []), default=0),
                  "canvas": result.report["canvas"]["shape"], "block": result.report["canvas"]["block_side"],
                  "spilled": result.report["canvas"]["spilled"], "timings": result.report["timings_s"]}))
"""


def parse_panels(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RxC, e.g. 2x2, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected RxC with R, C >= 1, got {text!r}")
    return rows, cols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--max-memory-mb", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--panels", type=parse_panels, default=(1, 1), metavar="RxC",
                        help="pointings of the generated night (frames split evenly over them)")
    parser.add_argument("--workflow", nargs="+", default=["mosaic_first"],
                        help="one or more of mosaic_first, sds, classic (run side by side)")
    parser.add_argument("--frames-dir", help="reuse a folder of demo frames instead of generating one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.frames_dir:
            frames = Path(args.frames_dir)
        else:
            from napari_zemosaic.engine.demo import DemoSpec, generate_demo

            per_panel = math.ceil(max(args.counts) / (args.panels[0] * args.panels[1]))
            generate_demo(Path(tmp) / "night", DemoSpec(panels=args.panels, frames_per_panel=per_panel,
                                                        scale=args.scale, seed=1, eqmode=1))
            frames = Path(tmp) / "night" / "frames"
        for count in args.counts:
            for workflow in args.workflow:
                runs = []
                for repeat in range(args.repeats):
                    out = Path(tmp) / f"out{count}_{workflow}_{repeat}"
                    completed = subprocess.run(
                        [sys.executable, "-c", CHILD, str(frames), str(out), str(args.max_memory_mb), workflow,
                         str(count)],
                        check=True, capture_output=True, text=True,
                    )
                    runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
                    shutil.rmtree(out, ignore_errors=True)
                seconds = statistics.median(r["seconds"] for r in runs)
                rows.append({"workflow": runs[0]["workflow"], "requested": workflow, "frames": runs[0]["frames"],
                             "batches": runs[0]["batches"], "largest_batch": runs[0]["largest_batch"],
                             "median_s": round(seconds, 2),
                             "frames_per_s": round(runs[0]["frames"] / seconds, 2),
                             "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
                             "sampled_peak_by_phase_mb": runs[0]["sampled_peak_by_phase_mb"],
                             "sampled_peak_by_batch_mb": runs[0]["sampled_peak_by_batch_mb"],
                             "canvas": runs[0]["canvas"], "block": runs[0]["block"], "spilled": runs[0]["spilled"],
                             "timings": runs[0]["timings"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'workflow':>13} {'frames':>7} {'batches (largest)':>18} {'median s':>9} {'frames/s':>9} "
          f"{'peak RSS MB':>12}  canvas      block spilled  sampled peak by phase (MB)")
    for row in rows:
        phases = " ".join(f"{k}={v:.0f}" for k, v in row["sampled_peak_by_phase_mb"].items())
        batches = f"{row['batches']} ({row['largest_batch']})" if row["batches"] else "-"
        print(f"{row['workflow']:>13} {row['frames']:>7} {batches:>18} {row['median_s']:>9} "
              f"{row['frames_per_s']:>9} {row['peak_rss_mb']:>12}  {row['canvas'][1]}x{row['canvas'][0]:<6} "
              f"{row['block']:>5} {str(row['spilled']):>7}  {phases}")
        if row["sampled_peak_by_batch_mb"]:
            per_batch = " ".join(f"{v:.0f}" for v in row["sampled_peak_by_batch_mb"])
            print(f"{'':>22}sampled peak per batch (MB): {per_batch}")
    for workflow in args.workflow:
        mine = [row for row in rows if row["requested"] == workflow]
        if len(mine) >= 2:
            growth = mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"] - 1
            print(f"{workflow}: peak RSS growth from {mine[0]['frames']} to {mine[-1]['frames']} frames: {growth:+.1%}")
    baseline = [row for row in rows if row["requested"] == "mosaic_first"]
    for workflow in args.workflow:
        if workflow == "mosaic_first" or not baseline:
            continue
        for mf, other in zip(baseline, [row for row in rows if row["requested"] == workflow]):
            wall, rss = other["median_s"] / mf["median_s"], other["peak_rss_mb"] / mf["peak_rss_mb"]
            print(f"{workflow} / mosaic_first at {mf['frames']} frames: wall {wall:.2f}x, peak RSS {rss:.2f}x")


if __name__ == "__main__":
    main()

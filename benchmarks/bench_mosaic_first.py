"""End-to-end Mosaic-First on full-size demo frames: frames/s and peak RSS versus frame count.

Each run happens in its own process so that peak RSS is that run's alone. The canvas is fixed
(one pointing on an equatorial mount: no field rotation, so dithers alone set the canvas), only the
number of frames changes.

    python benchmarks/bench_mosaic_first.py --counts 50 200 --max-memory-mb 1500 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from napari_zemosaic.engine.pipeline import run
from napari_zemosaic.engine.context import peak_rss_mb
frames, out, budget, workflow = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
result = run(frames, out, {"max_memory_mb": budget, "workflow": workflow, "use_gpu_phase5": False, "stack_use_gpu": False})
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "frames": result.report["frames"]["used"], "peak_rss_mb": peak_rss_mb(),
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            root = Path(tmp) / f"n{count}"
            start = time.perf_counter()
            generate_demo(root, DemoSpec(panels=(1, 1), frames_per_panel=count, scale=args.scale, seed=1, eqmode=1))
            generation = time.perf_counter() - start
            runs = []
            for repeat in range(args.repeats):
                out = Path(tmp) / f"out{count}_{repeat}"
                completed = subprocess.run(
                    [sys.executable, "-c", CHILD, str(root / "frames"), str(out), str(args.max_memory_mb), args.workflow],
                    check=True, capture_output=True, text=True,
                )
                runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            seconds = statistics.median(r["seconds"] for r in runs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            rows.append({"frames": count, "median_s": round(seconds, 2), "frames_per_s": round(count / seconds, 2),
                         "peak_rss_mb": round(rss, 1), "canvas": runs[0]["canvas"], "block": runs[0]["block"],
                         "spilled": runs[0]["spilled"], "timings": runs[0]["timings"],
                         "generation_s": round(generation, 1)})
            shutil_rm(root)
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


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Plate solving of no-WCS demo frames: direct solve of every frame vs solve-few-and-propagate.

    python benchmarks/bench_solve.py --frames 100 --scale 1.0

Writes ``--frames`` demo sub-frames without WCS (2x2 pointings, as the scope writes them),
builds an astrometry.net index from the demo's truth catalog (``build-astrometry-index``, so
``solve-field`` must be installed), then runs :func:`solve_missing` twice on fresh caches:

* ``direct``: ``solve_propagate=False`` -- every frame goes through ``solve-field``;
* ``propagate``: the default -- one anchor per pointing is solved, the others get their WCS
  by star matching against it;

and a third time on the ``propagate`` cache (``cached``). Reported per run: wall seconds per
frame (star detection included), the per-frame cost of the path itself (median seconds of a
``solve-field`` run vs of a propagation, detection excluded, as that is shared), and the worst
frame-corner error against the truth WCS. The index built here is tiny next to real index
sets (Tycho-2, 4100/5200 series), so real direct solves are slower: the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def build_index(truth, out_dir: Path) -> Path:
    """Index files whose quad sizes suit the demo field (about 1/8 to 1/1 of its short side)."""
    from astropy.io import fits

    out_dir.mkdir(parents=True, exist_ok=True)
    catalog = out_dir / "catalog.fits"
    fits.BinTableHDU.from_columns([
        fits.Column("RA", "D", array=truth.star_ra),
        fits.Column("DEC", "D", array=truth.star_dec),
        fits.Column("MAG", "E", array=-2.5 * np.log10(truth.star_flux[:, 1])),
    ]).writeto(catalog, overwrite=True)
    short_side_arcmin = min(truth.shape) * truth.pixel_scale_arcsec / 60.0
    for preset in range(0, 12):
        low = 2.0 * math.sqrt(2.0) ** preset  # -P n: quads of 2.0*sqrt(2)^n .. 2.8*sqrt(2)^n arcmin
        if short_side_arcmin / 8.0 <= low <= short_side_arcmin:
            subprocess.run(
                ["build-astrometry-index", "-i", str(catalog), "-o", str(out_dir / f"index-bench-{preset:02d}.fits"),
                 "-P", str(preset), "-S", "MAG", "-E", "-j", "0.5", "-I", f"88{preset:02d}00", "-t", str(out_dir)],
                check=True, capture_output=True,
            )
    return out_dir


def corner_error_px(wcs, truth_wcs, shape) -> float:
    height, width = shape
    corners = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = truth_wcs.all_world2pix(wcs.all_pix2world(corners, 0), 0)
    return float(np.hypot(*(back - corners).T).max())


def run_solve(frames, config: dict, cache: Path):
    from napari_zemosaic.engine.astrometry import solve_missing
    from napari_zemosaic.events import Reporter

    generator = solve_missing(frames, config, cache, Reporter())
    start = time.perf_counter()
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value, time.perf_counter() - start


def summarise(name: str, outcomes, seconds: float, truth) -> dict:
    by_method: dict[str, list] = {}
    for outcome in outcomes:
        by_method.setdefault(outcome.method, []).append(outcome)
    errors = [corner_error_px(o.wcs, truth.wcs_for(i), truth.shape)
              for i, o in enumerate(outcomes) if o.wcs is not None]
    row = {
        "run": name,
        "frames": len(outcomes),
        "counts": {method: len(items) for method, items in by_method.items()},
        "wall_s": round(seconds, 2),
        "wall_s_per_frame": round(seconds / len(outcomes), 4),
        "worst_corner_error_px": round(max(errors), 3) if errors else None,
    }
    for method in ("solved", "propagated"):
        if method in by_method:
            row[f"median_s_per_{method}_frame"] = round(statistics.median(o.seconds for o in by_method[method]), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--processes", type=int, default=0, help="solver processes (0 = min(4, cores))")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from napari_zemosaic.engine.astrometry import detect_stars
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.frames import read_frame_info

    per_panel = max(1, math.ceil(args.frames / 4))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        truth = generate_demo(root / "night", DemoSpec(panels=(2, 2), frames_per_panel=per_panel, scale=args.scale,
                                                       seed=args.seed, with_wcs=False))
        generation = time.perf_counter() - start
        index_dir = build_index(truth, root / "index")
        frames = [read_frame_info(path) for path in truth.frame_paths]
        detect = [time.perf_counter()]
        for info in frames[:10]:
            detect_stars(info)
            detect.append(time.perf_counter())
        detection_s = statistics.median(np.diff(detect))
        config = {"astrometry_index_dir": str(index_dir), "solver_processes": args.processes}
        direct, direct_s = run_solve(frames, {**config, "solve_propagate": False}, root / "cache_direct")
        few, few_s = run_solve(frames, config, root / "cache_propagate")
        cached, cached_s = run_solve(frames, config, root / "cache_propagate")
        rows = [summarise("direct", direct, direct_s, truth), summarise("propagate", few, few_s, truth),
                summarise("cached", cached, cached_s, truth)]

    solve_cost = rows[0].get("median_s_per_solved_frame")
    propagate_cost = rows[1].get("median_s_per_propagated_frame")
    summary = {
        "frames": len(frames),
        "frame_shape": list(truth.shape),
        "generation_s": round(generation, 1),
        "median_detection_s_per_frame": round(float(detection_s), 4),
        "runs": rows,
        "path_speedup": round(solve_cost / propagate_cost, 1) if solve_cost and propagate_cost else None,
        "wall_speedup": round(rows[0]["wall_s"] / rows[1]["wall_s"], 2),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{summary['frames']} frames of {truth.shape[1]}x{truth.shape[0]} px; star detection "
          f"{summary['median_detection_s_per_frame']} s/frame (median, shared by both paths)")
    print(f"{'run':10s} {'wall s':>8s} {'s/frame':>8s} {'solve s':>8s} {'prop. s':>8s} {'worst px':>8s}  methods")
    for row in rows:
        print(f"{row['run']:10s} {row['wall_s']:8.2f} {row['wall_s_per_frame']:8.4f} "
              f"{row.get('median_s_per_solved_frame', float('nan')):8.4f} "
              f"{row.get('median_s_per_propagated_frame', float('nan')):8.4f} "
              f"{row['worst_corner_error_px'] or float('nan'):8.3f}  {row['counts']}")
    print(f"per-frame path cost: solve-field {solve_cost} s vs propagation {propagate_cost} s "
          f"-> {summary['path_speedup']}x; end to end {summary['wall_speedup']}x")


if __name__ == "__main__":
    main()

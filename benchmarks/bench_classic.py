"""Classic vs Mosaic-First on the same 2×2 demo night: time, peak RSS, flux spread and seams.

Each workflow runs in its own process (peak RSS is that run's alone), on the same frames, with
the same memory budget and the CPU only. The science files are then measured against the demo
truth, the same way for both:

* **flux spread** — per panel, the median of measured / expected flux of bright isolated stars
  that only that panel covers (expected = truth flux divided by the frames' local pixel-area
  ratio, the flux a star has on a surface-brightness-conserving canvas); spread = max/min − 1,
  per channel (R, G, B) and for the sum.
* **seam steps** — across every panel's coverage edge inside the mosaic, in 32-px segments:
  star-free pixels within ±24 px are fitted with a quadratic surface plus a step at the edge;
  the step over the fit's residual σ (median and max over the segments).

    python benchmarks/bench_classic.py --scale 0.25 --frames-per-panel 12 --repeats 3

``classic`` uses ``final_assembly_method: reproject_coadd`` (the default), ``classic_incremental``
the on-disk accumulators.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ("mosaic_first", "classic", "classic_incremental")

CHILD = r"""
import json, sys, time
from pathlib import Path
from napari_zemosaic.engine.context import peak_rss_mb
frames, out, budget, workflow = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = {"max_memory_mb": budget, "workflow": workflow, "use_gpu_phase5": False, "stack_use_gpu": False}
if workflow == "classic_incremental":
    workflow = config["workflow"] = "classic"
    config["final_assembly_method"] = "incremental"
start = time.perf_counter()
from napari_zemosaic.engine import pipeline
if workflow == "mosaic_first" or "classic" in pipeline.WORKFLOWS_AVAILABLE:
    result = pipeline.run(frames, out, config)
    science, timings, used = result.science_path, result.report["timings_s"], result.report["workflow_used"]
else:  # the classic stage on its own, before the pipeline dispatches to it
    from napari_zemosaic.config import validate_config
    from napari_zemosaic.events import Reporter
    from napari_zemosaic.engine.canvas import build_canvas
    from napari_zemosaic.engine.classic import run_classic
    from napari_zemosaic.engine.context import RunContext
    from napari_zemosaic.engine.outputs import write_science_fits
    config = validate_config(config)
    reporter = Reporter()
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(config, reporter, out, out / ".zemosaic_cache")
    from napari_zemosaic.engine.pipeline import drain
    with ctx.timed("P1"):
        ingested = drain(pipeline.ingest(Path(frames), out, config, reporter))
    infos = ingested.usable
    with ctx.timed("P4"):
        canvas = build_canvas([f.wcs for f in infos], [f.shape for f in infos])
    outcome = drain(run_classic(infos, canvas, ctx, pipeline.output_channels(infos)))
    science = out / "mosaic_science.fits"
    with ctx.timed("P6"):
        stack = outcome.stack
        write_science_fits(science, stack.data, outcome.alpha, stack.weight, stack.canvas.header(), {})
    ctx.cleanup_cache()
    timings, used = ctx.timings_s, "classic"
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_rss_mb": peak_rss_mb(), "science": str(science), "timings": timings,
                  "workflow_used": used}))
"""


# ------------------------------------------------------------------------------- measuring


def _load(science: Path):
    from astropy.io import fits
    from astropy.wcs import WCS

    with fits.open(science) as hdul:
        return np.asarray(hdul[0].data, np.float32), np.asarray(hdul["ALPHA"].data), WCS(hdul[0].header).celestial


def _panel_coverage(truth, wcs, shape) -> np.ndarray:
    """(P, H, W) bool: where each panel's frames cover the mosaic."""
    from napari_zemosaic.engine.reproject import reproject_frame

    panels = sorted({f.panel for f in truth.frames})
    out = np.zeros((len(panels), *shape), bool)
    ones = np.ones((1, truth.height, truth.width), np.float32)
    for index, frame in enumerate(truth.frames):
        result = reproject_frame(ones, truth.wcs_for(index), wcs, shape)
        if result is not None:
            (y0, y1, x0, x1), values, _ = result
            out[panels.index(frame.panel), y0:y1, x0:x1] |= np.isfinite(values[0])
    return out


def _area_ratio(frame_wcs, wcs, x: float, y: float, step: float = 0.5) -> float:
    def frame_xy(px, py):
        ra, dec = wcs.all_pix2world([px], [py], 0)
        return np.array(frame_wcs.all_world2pix(ra, dec, 0))[:, 0]

    ddx = (frame_xy(x + step, y) - frame_xy(x - step, y)) / (2 * step)
    ddy = (frame_xy(x, y + step) - frame_xy(x, y - step)) / (2 * step)
    return float(abs(ddx[0] * ddy[1] - ddx[1] * ddy[0]))


def flux_spread(data, alpha, wcs, truth, coverage) -> list[float]:
    from starphot import aperture_flux

    height, width = alpha.shape
    x, y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    green = truth.star_flux[:, 1]
    radius = 3.0 * float(np.median([f.fwhm_px for f in truth.frames]))
    first = {p: next(i for i, f in enumerate(truth.frames) if f.panel == p) for p in {f.panel for f in truth.frames}}
    ratios: dict[int, list[np.ndarray]] = {}
    for i in np.flatnonzero((green > 3000) & (truth.star_flux.max(axis=1) < 400_000)):
        ix, iy = int(round(x[i])), int(round(y[i]))
        if not (16 < ix < width - 17 and 16 < iy < height - 17) or alpha[iy - 10 : iy + 11, ix - 10 : ix + 11].min() == 0:
            continue
        distance = np.hypot(x - x[i], y - y[i])
        distance[i] = np.inf
        if (green[distance < 12] > 0.01 * green[i]).any() or coverage[:, iy, ix].sum() != 1:
            continue
        panel = int(np.argmax(coverage[:, iy, ix]))
        measured = np.array([aperture_flux(data[c], x[i], y[i], radius, radius + 3, radius + 9) for c in range(3)])
        measured = np.append(measured, measured.sum())
        expected = np.append(truth.star_flux[i], truth.star_flux[i].sum())
        ratios.setdefault(panel, []).append(measured * _area_ratio(truth.wcs_for(first[panel]), wcs, x[i], y[i]) / expected)
    medians = np.array([np.median(v, axis=0) for v in ratios.values() if len(v) >= 5])
    return [round(float(v), 4) for v in medians.max(axis=0) / medians.min(axis=0) - 1]


def _star_mask(truth, wcs, shape) -> np.ndarray:
    height, width = shape
    x, y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    mask = np.zeros(shape, bool)
    for xi, yi, flux in zip(x, y, truth.star_flux.max(axis=1)):
        radius = 3.0 + 3.0 * np.log10(max(flux, 300.0) / 300.0)
        x0, x1 = int(max(xi - radius, 0)), int(min(xi + radius + 1, width))
        y0, y1 = int(max(yi - radius, 0)), int(min(yi + radius + 1, height))
        if x1 > x0 and y1 > y0:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            mask[y0:y1, x0:x1] |= np.hypot(xx - xi, yy - yi) <= radius
    return mask


def seam_steps(data, alpha, wcs, truth, coverage, half_width: int = 24, segment: int = 32) -> list[float]:
    from scipy.ndimage import distance_transform_edt

    luminance = data.sum(axis=0)
    covered = np.isfinite(luminance) & (alpha > 0)
    deep = distance_transform_edt(covered) > half_width + 2
    mask = _star_mask(truth, wcs, luminance.shape)
    height, width = luminance.shape
    steps = []
    for panel in coverage:
        signed = np.where(panel, distance_transform_edt(panel), -distance_transform_edt(~panel))
        edge = panel & (signed <= 1) & deep
        for cy in range(0, height, segment):
            for cx in range(0, width, segment):
                if edge[cy : cy + segment, cx : cx + segment].sum() < segment // 2:
                    continue
                window = (slice(max(cy - half_width, 0), min(cy + segment + half_width, height)),
                          slice(max(cx - half_width, 0), min(cx + segment + half_width, width)))
                yy, xx = np.mgrid[window]
                d = signed[window]
                ok = covered[window] & ~mask[window] & (np.abs(d) <= half_width)
                if (ok & (d > 0)).sum() < 150 or (ok & (d <= 0)).sum() < 150:
                    continue
                u = (xx[ok] - xx[ok].mean()) / segment
                v = (yy[ok] - yy[ok].mean()) / segment
                design = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v, (d[ok] > 0) - 0.5], axis=1)
                values = luminance[window][ok]
                keep = np.ones(values.size, bool)
                for _ in range(3):
                    coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
                    residual = values - design @ coef
                    sigma = 1.4826 * np.median(np.abs(residual[keep] - np.median(residual[keep])))
                    keep = np.abs(residual) < 3 * sigma
                steps.append(abs(coef[-1]) / sigma)
    return [round(float(np.median(steps)), 3), round(float(np.max(steps)), 3), len(steps)] if steps else [0.0, 0.0, 0]


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--frames-per-panel", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-memory-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))  # the science tests' star photometry
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "night"
        start = time.perf_counter()
        truth = generate_demo(root, DemoSpec(panels=(2, 2), frames_per_panel=args.frames_per_panel,
                                             scale=args.scale, seed=args.seed))
        generation = time.perf_counter() - start
        coverage = None
        for workflow in WORKFLOWS:
            runs = []
            for repeat in range(args.repeats):
                out = Path(tmp) / f"{workflow}_{repeat}"
                completed = subprocess.run(
                    [sys.executable, "-c", CHILD, str(root / "frames"), str(out), str(args.max_memory_mb), workflow],
                    check=True, capture_output=True, text=True,
                )
                runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            data, alpha, wcs = _load(Path(runs[0]["science"]))
            coverage = _panel_coverage(truth, wcs, alpha.shape)
            rows.append({
                "workflow": workflow,
                "workflow_used": runs[0]["workflow_used"],
                "median_s": round(statistics.median(r["seconds"] for r in runs), 2),
                "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
                "flux_spread_rgb_sum": flux_spread(data, alpha, wcs, truth, coverage),
                "seam_step_sigma_median_max_n": seam_steps(data, alpha, wcs, truth, coverage),
                "canvas": list(alpha.shape),
                "timings": runs[0]["timings"],
            })
    if args.json:
        print(json.dumps({"generation_s": round(generation, 1), "frames": len(truth.frames), "rows": rows}, indent=2))
        return
    print(f"2x2 demo night, {len(truth.frames)} frames of {truth.width}x{truth.height} px (scale {args.scale}, "
          f"seed {args.seed}), budget {args.max_memory_mb} MB, CPU, {args.repeats} run(s) each")
    print(f"{'workflow':>19} {'median s':>9} {'peak RSS MB':>12} {'flux spread R/G/B/sum':>30} {'seam step σ med/max (n)':>26}")
    for row in rows:
        spread = "/".join(f"{100 * v:.2f}%" for v in row["flux_spread_rgb_sum"])
        median, worst, count = row["seam_step_sigma_median_max_n"]
        print(f"{row['workflow']:>19} {row['median_s']:>9} {row['peak_rss_mb']:>12} {spread:>30} "
              f"{f'{median:.2f}/{worst:.2f} ({count})':>26}")


if __name__ == "__main__":
    main()

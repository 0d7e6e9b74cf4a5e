"""Resampling speed and agreement: ``reproject_frame`` vs ``reproject.reproject_interp``.

A realistic full-size smart-telescope frame (1080×1920×3 float32: sky, ~1500 stars of
FWHM ≈ 3 px, noise) with a TAN-SIP solution rotated 10° is resampled onto a cut-out of
a north-up mosaic canvas at the same pixel scale whose tangent point is 0.8° away.
Both methods get the same data, WCS and output grid; medians over ``--repeats`` runs
(after one warm-up each) and the ratio are printed, with the largest difference away
from the edges as a fraction of the data range.

    python benchmarks/bench_resample.py [--repeats 5] [--method bilinear] [--tol-px 0.01] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

FRAME_SHAPE = (1080, 1920)  # (H, W)
PIXEL_SCALE_ARCSEC = 2.39
ROTATION_DEG = 10.0
# A mild, realistic distortion: ≈ 1.5 px at the corners of the frame.
SIP_TERMS = {
    "A_2_0": 8e-7, "A_1_1": -5e-7, "A_0_2": 6e-7, "A_3_0": 2e-10, "A_1_2": -1e-10,
    "B_2_0": -6e-7, "B_1_1": 7e-7, "B_0_2": 5e-7, "B_0_3": 1.5e-10, "B_2_1": -1e-10,
}


def make_frame_wcs() -> WCS:
    height, width = FRAME_SHAPE
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    header["CRVAL1"], header["CRVAL2"] = 83.82, -5.39
    header["CRPIX1"], header["CRPIX2"] = (width + 1) / 2.0, (height + 1) / 2.0
    theta, scale = np.radians(ROTATION_DEG), PIXEL_SCALE_ARCSEC / 3600.0
    header["CD1_1"], header["CD1_2"] = -scale * np.cos(theta), scale * np.sin(theta)
    header["CD2_1"], header["CD2_2"] = scale * np.sin(theta), scale * np.cos(theta)
    header["A_ORDER"] = header["B_ORDER"] = 3
    for key, value in SIP_TERMS.items():
        header[key] = value
    wcs = WCS(header)
    wcs.pixel_shape = (width, height)
    return wcs


def make_frame_data(seed: int = 0, n_stars: int = 1500) -> np.ndarray:
    """Sky + Gaussian stars (FWHM ≈ 3 px, log-uniform fluxes) + Gaussian noise, (3, H, W)."""
    rng = np.random.default_rng(seed)
    height, width = FRAME_SHAPE
    image = np.zeros(FRAME_SHAPE, dtype=np.float64)
    sigma, half = 3.0 / 2.355, 8
    offsets = np.arange(-half, half + 1)
    for x, y, flux in zip(
        rng.uniform(half, width - half - 1, n_stars),
        rng.uniform(half, height - half - 1, n_stars),
        10 ** rng.uniform(2.5, 5.0, n_stars),
    ):
        ix, iy = int(x), int(y)
        gx = np.exp(-((ix + offsets - x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((iy + offsets - y) ** 2) / (2 * sigma**2))
        image[iy - half : iy + half + 1, ix - half : ix + half + 1] += flux / (2 * np.pi * sigma**2) * np.outer(gy, gx)
    colour = np.array([1.0, 0.85, 0.7])[:, None, None]
    sky = np.array([600.0, 520.0, 450.0])[:, None, None]
    noisy = image[None] * colour + sky + rng.normal(0.0, 8.0, (3, *FRAME_SHAPE))
    return noisy.astype(np.float32)


def make_canvas_cutout(frame_wcs: WCS) -> Any:
    """The frame's bounding box on a north-up canvas whose tangent point is 0.8° away."""
    from napari_zemosaic.engine.canvas import build_canvas, crop_canvas, frame_bbox_on_canvas

    neighbour = frame_wcs.deepcopy()
    neighbour.wcs.crval = [frame_wcs.wcs.crval[0] + 1.6, frame_wcs.wcs.crval[1] + 0.1]
    neighbour.wcs.set()
    canvas = build_canvas([frame_wcs, neighbour], [FRAME_SHAPE, FRAME_SHAPE])
    y0, y1, x0, x1 = frame_bbox_on_canvas(frame_wcs, FRAME_SHAPE, canvas)
    return crop_canvas(canvas, (slice(y0, y1), slice(x0, x1)))


def median_time(function: Callable[[], Any], repeats: int) -> tuple[float, float, list[float], Any]:
    """Median wall and CPU seconds over ``repeats`` runs after one warm-up, the wall times, the result.

    CPU time is reported too: both methods are single-threaded, so on a busy machine it
    is the steadier measure (on an idle one the two agree).
    """
    result = function()  # warm-up (imports, caches)
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = function()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu), wall, result


def run(repeats: int, method: str, tol_px: float) -> dict[str, Any]:
    import reproject
    from reproject import reproject_interp
    from scipy.ndimage import binary_erosion

    from napari_zemosaic.engine.reproject import compute_control_grid, reproject_frame

    frame_wcs = make_frame_wcs()
    data = make_frame_data()
    cutout = make_canvas_cutout(frame_wcs)
    shape_out = (data.shape[0], *cutout.shape)

    ours_s, ours_cpu_s, ours_times, (bbox, ours, footprint) = median_time(
        lambda: reproject_frame(data, frame_wcs, cutout.wcs, cutout.shape, method=method, tol_px=tol_px), repeats
    )
    grid_s, _, _, grid = median_time(
        lambda: compute_control_grid(frame_wcs, FRAME_SHAPE, cutout.wcs, bbox, tol_px=tol_px), repeats
    )
    ref_s, ref_cpu_s, ref_times, (ref, _) = median_time(
        lambda: reproject_interp((data, frame_wcs), cutout.wcs, shape_out=shape_out, order=method), repeats
    )

    y0, y1, x0, x1 = bbox
    ref = ref[:, y0:y1, x0:x1]
    both = (footprint > 0) & np.all(np.isfinite(ref), axis=0)
    interior = binary_erosion(both, iterations=3)
    data_range = float(data.max() - data.min())
    max_delta = float(np.abs(ours - ref)[:, interior].max())
    return {
        "frame_shape": [int(v) for v in data.shape],
        "output_shape": [int(v) for v in shape_out],
        "method": method,
        "tol_px": tol_px,
        "repeats": repeats,
        "control_grid": {"step": grid.step, "points": int(grid.src_x.size), "max_error_px": grid.max_error_px, "median_s": grid_s},
        "ours_median_s": ours_s,
        "ours_times_s": ours_times,
        "reproject_interp_median_s": ref_s,
        "reproject_interp_times_s": ref_times,
        "speedup": ref_s / ours_s,
        "ours_cpu_median_s": ours_cpu_s,
        "reproject_interp_cpu_median_s": ref_cpu_s,
        "speedup_cpu": ref_cpu_s / ours_cpu_s,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "max_abs_delta_over_range_interior": max_delta / data_range,
        "data_range": data_range,
        "footprint_disagreement_px": int(((footprint > 0) != np.all(np.isfinite(ref), axis=0)).sum()),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "reproject": reproject.__version__,
        },
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", choices=("bilinear", "bicubic"), default="bilinear")
    parser.add_argument("--tol-px", type=float, default=0.01, help="control-grid tolerance (pixels)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    result = run(args.repeats, args.method, args.tol_px)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    grid = result["control_grid"]
    print(f"frame {result['frame_shape']} -> output {result['output_shape']}, {args.method}, tol {args.tol_px} px")
    print(f"control grid: step {grid['step']} px, {grid['points']} points, max error {grid['max_error_px']:.4f} px, {grid['median_s'] * 1e3:.1f} ms")
    print(f"ours (reproject_frame):   median {result['ours_median_s'] * 1e3:8.1f} ms over {args.repeats}")
    print(f"reproject.reproject_interp: median {result['reproject_interp_median_s'] * 1e3:8.1f} ms over {args.repeats}")
    print(f"speed-up: {result['speedup']:.1f}x wall, {result['speedup_cpu']:.1f}x CPU time "
          f"(ours {result['ours_cpu_median_s'] * 1e3:.1f} ms CPU, reproject {result['reproject_interp_cpu_median_s'] * 1e3:.1f} ms CPU)")
    print(f"max |delta| / range away from edges: {result['max_abs_delta_over_range_interior']:.2e}")
    print(f"footprint disagreement: {result['footprint_disagreement_px']} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())

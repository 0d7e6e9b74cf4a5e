"""Satellite trails, hot pixels and noise in the stacked mosaic, against the demo truth."""

from __future__ import annotations

import numpy as np
import pytest

from starphot import local_background, robust_noise_map


@pytest.fixture(scope="module")
def single_field(tmp_path_factory):
    """One pointing, 16 frames with a trail, hot pixels and a cloudy frame.

    16, not fewer: with N samples one outlier can be at most (N−1)/√N standard deviations
    from the rest, so a 3σ clip cannot reject a single trail among fewer than 12 frames.
    """
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("single_field")
    truth = generate_demo(root, DemoSpec(panels=(1, 1), frames_per_panel=16, scale=0.15, seed=5))
    return root, truth


def _run(root, tmp_path_factory, **config):
    from napari_zemosaic.engine.pipeline import run

    out = tmp_path_factory.mktemp("out")
    return run(root / "frames", out, {"max_memory_mb": 256, **config})


def _star_distance(truth, wcs, x, y):
    sx, sy = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    bright = truth.star_flux[:, 1] > 300
    sx, sy = sx[bright], sy[bright]
    return np.array([np.min(np.hypot(sx - xi, sy - yi)) if sx.size else np.inf for xi, yi in zip(x, y)])


def _residuals_in_sigma(result, x, y):
    image = result.data.sum(axis=0)
    height, width = image.shape
    out = []
    for xi, yi in zip(x, y):
        ix, iy = int(round(xi)), int(round(yi))
        if not (14 <= ix < width - 14 and 14 <= iy < height - 14) or result.alpha[iy, ix] == 0:
            continue
        background, sigma = local_background(image, xi, yi, 5.0, 12.0)
        out.append((image[iy, ix] - background) / sigma)
    return np.array(out)


def _trail_points(truth, result):
    frame = truth.frames[truth.trail_frame]
    x0, y0, x1, y1 = frame.trail
    t = np.linspace(0.05, 0.95, 120)
    fx, fy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    ra, dec = truth.wcs_for(truth.trail_frame).all_pix2world(fx, fy, 0)
    x, y = result.canvas.wcs.all_world2pix(ra, dec, 0)
    far = _star_distance(truth, result.canvas.wcs, x, y) > 8
    return x[far], y[far]


def _distance_to_trail(truth, result, x, y):
    frame = truth.frames[truth.trail_frame]
    ends = np.array(frame.trail, float).reshape(2, 2)
    ra, dec = truth.wcs_for(truth.trail_frame).all_pix2world(ends[:, 0], ends[:, 1], 0)
    (ax, bx), (ay, by) = result.canvas.wcs.all_world2pix(ra, dec, 0)
    direction = np.array([bx - ax, by - ay]) / np.hypot(bx - ax, by - ay)
    return np.abs((x - ax) * direction[1] - (y - ay) * direction[0])


def _hot_pixel_points(truth, result):
    """Hot pixels of every frame on the mosaic, away from stars and from the trail (tested on its own)."""
    xs, ys = [], []
    for index in range(len(truth.frames)):
        ra, dec = truth.wcs_for(index).all_pix2world(truth.hot_pixels[:, 0], truth.hot_pixels[:, 1], 0)
        x, y = result.canvas.wcs.all_world2pix(ra, dec, 0)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    far = (_star_distance(truth, result.canvas.wcs, x, y) > 8) & (_distance_to_trail(truth, result, x, y) > 5)
    # Where dithers put the same hot pixel of two frames on one sky pixel, it is a repeated value,
    # not an outlier: no per-pixel statistic can reject it (that is what dithering is for).
    distance = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(distance, np.inf)
    alone = distance.min(axis=1) > 2.0
    return x[far & alone], y[far & alone]


@pytest.mark.parametrize("algorithm", ["kappa_sigma", "winsorized_sigma_clip"])
def test_trail_and_hot_pixels_are_rejected(single_field, tmp_path_factory, algorithm) -> None:
    root, truth = single_field
    assert truth.trail_frame is not None and len(truth.hot_pixels) > 5
    # hot-pixel correction off, so the rejection alone must remove them
    result = _run(root, tmp_path_factory, stacking_rejection_algorithm=algorithm, hot_pixel_correction=False)
    trail = _residuals_in_sigma(result, *_trail_points(truth, result))
    hot = _residuals_in_sigma(result, *_hot_pixel_points(truth, result))
    assert trail.size > 30 and hot.size > 30
    assert np.percentile(np.abs(trail), 95) < 3.0 and np.median(trail) < 1.0
    assert np.percentile(np.abs(hot), 99) < 3.0 and np.median(hot) < 1.0


def test_without_rejection_the_artefacts_show(single_field, tmp_path_factory) -> None:
    """The control: the measurement above does see trails and hot pixels when nothing rejects them."""
    root, truth = single_field
    result = _run(root, tmp_path_factory, stacking_rejection_algorithm="none", hot_pixel_correction=False)
    trail = _residuals_in_sigma(result, *_trail_points(truth, result))
    hot = _residuals_in_sigma(result, *_hot_pixel_points(truth, result))
    assert np.median(trail) > 3.0
    assert np.median(hot) > 3.0


def test_hot_pixel_correction_alone_removes_hot_pixels(single_field, tmp_path_factory) -> None:
    root, truth = single_field
    result = _run(root, tmp_path_factory, stacking_rejection_algorithm="none", hot_pixel_correction=True)
    hot = _residuals_in_sigma(result, *_hot_pixel_points(truth, result))
    assert np.percentile(np.abs(hot), 99) < 3.5


def test_background_noise_falls_as_sqrt_n(tmp_path_factory) -> None:
    """σ of the stack = 1/sqrt(Σ 1/σᵢ²) of the resampled, normalised frames (σ₁/√N for equal frames)."""
    from napari_zemosaic.config import validate_config
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.frames import read_frame_info
    from napari_zemosaic.engine.mosaic_first import reproject_unit

    root = tmp_path_factory.mktemp("noise_field")
    truth = generate_demo(root, DemoSpec(panels=(1, 1), frames_per_panel=9, scale=0.2, seed=9, artefacts=False, eqmode=1))
    result = _run(root, tmp_path_factory)
    height, width = result.canvas.shape
    count_region = (slice(height // 2 - 40, height // 2 + 40), slice(width // 2 - 30, width // 2 + 30))
    sx, sy = result.canvas.wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    yy, xx = np.mgrid[0:height, 0:width]
    star_mask = np.zeros((height, width), bool)
    for xi, yi, flux in zip(sx, sy, truth.star_flux[:, 1]):
        if flux > 50 and -10 < xi < width + 10 and -10 < yi < height + 10:
            star_mask |= np.hypot(xx - xi, yy - yi) < 7
    config = validate_config({})
    gains = {e["path"]: np.array(e["gain"]) for e in result.report["frames"]["normalisation"]}
    inverse_variance = 0.0
    for frame in result.frames:
        unit = reproject_unit(read_frame_info(frame.path), 0, result.canvas, config)
        y0, y1, x0, x1 = unit.bbox
        canvas_frame = np.full((height, width), np.nan, np.float32)
        canvas_frame[y0:y1, x0:x1] = unit.data[1] / gains[str(frame.path)][1]
        inverse_variance += 1.0 / robust_noise_map(canvas_frame, count_region, star_mask) ** 2
    expected = 1.0 / np.sqrt(inverse_variance)
    measured = robust_noise_map(result.data[1], count_region, star_mask)
    assert result.count[count_region].min() >= 8.5
    assert measured == pytest.approx(expected, rel=0.15)

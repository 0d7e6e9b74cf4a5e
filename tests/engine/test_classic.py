"""The classic workflow on a 2×2 demo night with haze that differs between panels, against the truth.

One night is generated per module and stacked once into master tiles; the other runs reuse the
tiles from the cache (the cache name is a hash of everything that makes a tile), so assembly and
harmonisation variants cost a fraction of a run.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from napari_zemosaic.config import validate_config
from napari_zemosaic.events import LogEvent, Reporter
from napari_zemosaic.engine.assembly import assemble, corrected, tile_on_canvas
from napari_zemosaic.engine.canvas import build_canvas
from napari_zemosaic.engine.classic import ClassicOutcome, master_tile_unit, run_classic, tile_canvas
from napari_zemosaic.engine.context import RunContext
from napari_zemosaic.engine.pipeline import drain as _drain
from starphot import aperture_flux, centroid, local_background

# 2×2 panels of 216×384 px GRBG subs; 12 frames a panel, the fewest with which kappa-sigma rejects a lone trail.
NIGHT = dict(panels=(2, 2), frames_per_panel=12, scale=0.2, seed=4)
BASE = {"max_memory_mb": 256, "language": "en"}


def run_on(frames, canvas, work: Path, **overrides: Any) -> tuple[ClassicOutcome, Reporter]:
    """run_classic with a context made the way the pipeline makes it (compute policy included)."""
    from napari_zemosaic.engine.gpu import ComputePolicy
    from napari_zemosaic.engine.pipeline import output_channels

    config = validate_config({**BASE, **overrides})
    reporter = Reporter()
    work.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(config, reporter, work, work / ".zemosaic_cache")
    ctx.policy = ComputePolicy.from_config(config, reporter=reporter)
    outcome = _drain(run_classic(frames, canvas, ctx, output_channels(frames)))
    return outcome, reporter


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.pipeline import ingest

    root = tmp_path_factory.mktemp("classic_night")
    truth = generate_demo(root, DemoSpec(**NIGHT))
    config = validate_config(BASE)
    frames = _drain(ingest(root / "frames", None, config, Reporter())).usable
    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    return truth, frames, canvas, tmp_path_factory.mktemp("classic_work")


@pytest.fixture(scope="module")
def default_run(night):
    truth, frames, canvas, work = night
    return run_on(frames, canvas, work)


@pytest.fixture(scope="module")
def incremental_run(night, default_run):
    truth, frames, canvas, work = night
    return run_on(frames, canvas, work, final_assembly_method="incremental")


@pytest.fixture(scope="module")
def unharmonised_run(night, default_run):
    truth, frames, canvas, work = night
    return run_on(frames, canvas, work, apply_intertile_photometry=False, two_pass_coverage_renorm=False)


# ------------------------------------------------------------------------------ measurements


def _panel_of(truth, frames) -> dict[str, int]:
    by_name = {f.file_name: f.panel for f in truth.frames}
    return {str(info.path): by_name[Path(info.path).name] for info in frames}


def _tile_coverage(outcome: ClassicOutcome) -> np.ndarray:
    """(N, H, W) bool: where each tile covers the final canvas."""
    canvas = outcome.stack.canvas
    out = np.zeros((len(outcome.tiles), *canvas.shape), bool)
    for slot, tile in enumerate(outcome.tiles):
        placed = tile_on_canvas(tile, canvas)
        y0, y1, x0, x1 = placed.bbox
        out[slot, y0:y1, x0:x1] = placed.weight > 0
    return out


def _area_ratio(frame_wcs, canvas_wcs, x: np.ndarray, y: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Frame pixels per canvas pixel at canvas (x, y): a surface-brightness-conserving resampling
    divides a star's frame flux by this (optical distortion makes it drift across a frame)."""

    def frame_xy(px, py):
        ra, dec = canvas_wcs.all_pix2world(px, py, 0)
        return np.array(frame_wcs.all_world2pix(ra, dec, 0))

    ddx = (frame_xy(x + step, y) - frame_xy(x - step, y)) / (2 * step)
    ddy = (frame_xy(x, y + step) - frame_xy(x, y - step)) / (2 * step)
    return np.abs(ddx[0] * ddy[1] - ddx[1] * ddy[0])


def _isolated_stars(outcome: ClassicOutcome, truth, min_flux: float = 3000.0):
    canvas = outcome.stack.canvas
    height, width = canvas.shape
    x, y = canvas.wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    green = truth.star_flux[:, 1]
    inside = (x > 16) & (x < width - 17) & (y > 16) & (y < height - 17) & (green > min_flux)
    keep = []
    for i in np.flatnonzero(inside & (truth.star_flux.max(axis=1) < 400_000)):
        distance = np.hypot(x - x[i], y - y[i])
        distance[i] = np.inf
        if (green[distance < 12] > 0.01 * green[i]).any():
            continue
        iy, ix = int(round(y[i])), int(round(x[i]))
        if outcome.alpha[iy - 10 : iy + 11, ix - 10 : ix + 11].min() == 0:
            continue
        keep.append(i)
    keep = np.array(keep, int)
    return keep, x[keep], y[keep]


def _fluxes(outcome: ClassicOutcome, truth, x, y) -> np.ndarray:
    radius = 3.0 * float(np.median([f.fwhm_px for f in truth.frames]))
    data = outcome.stack.data
    return np.array([[aperture_flux(data[c], xi, yi, radius, radius + 3, radius + 9) for c in range(data.shape[0])]
                     for xi, yi in zip(x, y)])


def panel_flux_scales(outcome: ClassicOutcome, truth, frames) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per panel, the median over its single-coverage stars of measured / expected flux (R, G, B, sum).

    Expected = truth flux / area ratio of the panel's frames at the star (the flux a star has on a
    surface-brightness-conserving canvas), so what remains is each panel's flux scale.
    """
    ids, x, y = _isolated_stars(outcome, truth)
    coverage = _tile_coverage(outcome)
    iy, ix = np.round(y).astype(int), np.round(x).astype(int)
    n_tiles = coverage[:, iy, ix].sum(axis=0)
    alone = n_tiles == 1
    slot = np.argmax(coverage[:, iy, ix], axis=0)
    panel_of = _panel_of(truth, frames)
    tile_panel = [panel_of[str(frames[tile.members[0]].path)] for tile in outcome.tiles]
    first_frame = {p: next(i for i, f in enumerate(truth.frames) if f.panel == p) for p in set(tile_panel)}
    measured = _fluxes(outcome, truth, x[alone], y[alone])
    measured = np.concatenate([measured, measured.sum(axis=1, keepdims=True)], axis=1)
    expected_truth = np.concatenate([truth.star_flux[ids[alone]], truth.star_flux[ids[alone]].sum(1, keepdims=True)], 1)
    panels = np.array([tile_panel[s] for s in slot[alone]])
    area = np.array([_area_ratio(truth.wcs_for(first_frame[p]), outcome.stack.canvas.wcs, np.array([xi]), np.array([yi]))[0]
                     for p, xi, yi in zip(panels, x[alone], y[alone])])
    ratio = measured * area[:, None] / expected_truth
    scales = {int(p): np.median(ratio[panels == p], axis=0) for p in np.unique(panels)}
    counts = {int(p): int((panels == p).sum()) for p in np.unique(panels)}
    return scales, counts


def _spread(scales: dict[int, np.ndarray]) -> np.ndarray:
    stacked = np.array(list(scales.values()))
    return stacked.max(axis=0) / stacked.min(axis=0) - 1.0


def _star_mask(canvas, truth) -> np.ndarray:
    height, width = canvas.shape
    x, y = canvas.wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    mask = np.zeros((height, width), bool)
    for xi, yi, flux in zip(x, y, truth.star_flux.max(axis=1)):
        radius = 3.0 + 3.0 * np.log10(max(flux, 300.0) / 300.0)
        x0, x1 = int(max(xi - radius, 0)), int(min(xi + radius + 1, width))
        y0, y1 = int(max(yi - radius, 0)), int(min(yi + radius + 1, height))
        if x1 > x0 and y1 > y0:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            mask[y0:y1, x0:x1] |= np.hypot(xx - xi, yy - yi) <= radius
    return mask


def seam_steps(outcome: ClassicOutcome, truth, cell: int = 32) -> np.ndarray:
    """Background steps across seams, in units of the mosaic's local pixel noise.

    Where tile ``b`` ends inside the mosaic, the mosaic goes from the blend with ``b`` to the blend
    of the others; the level change is ``share_b × (b − others)`` with ``share_b`` b's part of the
    (unfeathered) weights — the step the seam would show, which feathering only spreads over its
    taper. Measured on star-free pixels of b's edge zone (where its alpha is below 1 and other
    tiles cover), per 32-px cell: the median step over the robust σ of the final mosaic there.
    """
    from scipy.ndimage import median_filter

    stack = outcome.stack
    canvas = stack.canvas
    height, width = canvas.shape
    harmony = outcome.harmony
    mask = _star_mask(canvas, truth)
    luminance = stack.data.sum(axis=0)
    residual = luminance - median_filter(np.nan_to_num(luminance, nan=float(np.nanmedian(luminance))), size=7)
    levels = np.zeros((len(outcome.tiles), height, width))
    weights = np.zeros((len(outcome.tiles), height, width))
    alphas = np.zeros((len(outcome.tiles), height, width))
    for slot, tile in enumerate(outcome.tiles):
        placed = tile_on_canvas(tile, canvas)
        y0, y1, x0, x1 = placed.bbox
        level = corrected(harmony.norm, slot, placed.data, y0, x0).sum(axis=0)
        ok = np.isfinite(level)
        levels[slot, y0:y1, x0:x1] = np.where(ok, level, 0.0)
        weights[slot, y0:y1, x0:x1] = np.where(ok, placed.weight * harmony.scales[slot], 0.0)
        alphas[slot, y0:y1, x0:x1] = np.where(ok, placed.alpha, 0.0)
    total_weight = weights.sum(axis=0)
    total_level = (levels * weights).sum(axis=0)
    steps = []
    for slot in range(len(outcome.tiles)):
        others_weight = total_weight - weights[slot]
        others = (total_level - levels[slot] * weights[slot]) / np.where(others_weight > 0, others_weight, 1.0)
        share = weights[slot] / np.where(total_weight > 0, total_weight, 1.0)
        step = share * (levels[slot] - others)
        zone = (weights[slot] > 0) & (alphas[slot] < 1.0) & (others_weight > 0) & ~mask & np.isfinite(residual)
        for cy in range(0, height, cell):
            for cx in range(0, width, cell):
                window = (slice(cy, cy + cell), slice(cx, cx + cell))
                chosen = zone[window]
                if chosen.sum() < 150:
                    continue
                noise = residual[window][chosen]
                sigma = 1.4826 * np.median(np.abs(noise - np.median(noise)))
                steps.append(float(np.median(step[window][chosen])) / sigma)
    return np.array(steps)


# ----------------------------------------------------------------------------------- tests


def test_groups_are_the_panels_and_the_report_says_so(night, default_run) -> None:
    truth, frames, canvas, _ = night
    outcome, reporter = default_run
    panel_of = _panel_of(truth, frames)
    groups = outcome.report["groups"]
    assert len(groups) == 4
    for group in groups:
        panels = {panel_of[path] for path in group["members"]}
        assert len(panels) == 1 and group["size"] == NIGHT["frames_per_panel"]
        assert group["tile_wcs"]["CTYPE1"] == "RA---TAN" and len(group["tile_shape"]) == 2
    members = [path for group in groups for path in group["members"]]
    assert sorted(members) == sorted(str(f.path) for f in frames)  # each frame exactly once
    assert len(outcome.report["tiles"]) == 4
    for tile in outcome.report["tiles"]:
        assert len(tile["gain"]) == 3 and len(tile["offset"]) == 3 and tile["constrained"]
    assert outcome.report["assembly_method"] == "reproject_coadd"
    assert outcome.report["photometry"]["applied"] and outcome.report["photometry"]["anchor_tile"] is not None
    assert set(outcome.report["timings_s"]) == {"P2", "P3", "P4.5", "P5"}
    json.dumps(outcome.report)  # serialisable as it is, for run_report.json
    keys = {e.key for e in reporter.log_events}
    assert {"classic_info_groups", "classic_info_tile", "classic_info_photometry", "classic_info_renorm",
            "classic_info_assembly"} <= keys


def test_master_tiles_are_fits_with_wcs_provenance_and_a_feathered_alpha(default_run) -> None:
    outcome, _ = default_run
    tile = outcome.tiles[0]
    with fits.open(tile.path) as hdul:
        header = hdul[0].header
        assert WCS(header).celestial.has_celestial and hdul[0].data.shape[0] == 3
        assert header["WORKFLOW"] == "classic" and header["NCOMBINE"] == len(tile.members)
        assert len(header["HISTORY"]) == len(tile.members)
        alpha, weight = hdul["ALPHA"].data, hdul["WEIGHT"].data
    from scipy.ndimage import distance_transform_edt

    covered = weight > 0
    distance = distance_transform_edt(np.pad(covered, 1))[1:-1, 1:-1]
    assert np.all(alpha[~covered] == 0) and np.all(alpha[covered] > 0)
    # the alpha rises from the coverage edge into the tile: a fade, not a step
    edge, inside = alpha[covered & (distance <= 2)], alpha[covered & (distance > 40)]
    assert np.median(edge) < 0.15 and np.all(inside == 1.0)
    ramp = [np.median(alpha[covered & (np.round(distance) == d)]) for d in range(1, 20)]
    assert np.all(np.diff(ramp) > 0)


def test_haze_steps_between_panels_removed_by_p45(night, default_run, unharmonised_run) -> None:
    """Star flux scale of each panel region: within 1 % after P4.5, the haze step (8–15 %) without."""
    truth, frames, _, _ = night
    haze = [np.median([f.transparency for f in truth.frames if f.panel == p]) for p in range(4)]
    assert max(haze) / min(haze) - 1 > 0.1  # the night really has a step to remove
    on, counts = panel_flux_scales(default_run[0], truth, frames)
    off, _ = panel_flux_scales(unharmonised_run[0], truth, frames)
    assert len(on) == 4 and min(counts.values()) >= 8
    spread_on, spread_off = _spread(on), _spread(off)  # (R, G, B, sum)
    assert spread_on[1] <= 0.01 and spread_on[3] <= 0.01, f"spread with P4.5 {spread_on}"
    assert np.all(spread_on[:3] <= 0.015), f"spread with P4.5 {spread_on}"
    assert spread_off[3] > 0.08, f"spread without P4.5 {spread_off}"
    # without harmonisation each panel keeps its own transparency (relative to panel 0's)
    for panel in range(1, 4):
        assert off[panel][3] / off[0][3] == pytest.approx(haze[panel] / haze[0], abs=0.01)


def test_background_steps_across_seams_below_local_noise(night, default_run, unharmonised_run) -> None:
    truth = night[0]
    steps_on = np.abs(seam_steps(default_run[0], truth))
    steps_off = np.abs(seam_steps(unharmonised_run[0], truth))
    assert steps_on.size > 40
    assert steps_on.max() < 1.0, f"largest seam step {steps_on.max():.2f} σ"
    # the control: the haze-scattered sky differs between panels by many σ without P4.5
    assert np.median(steps_off) > 5.0


def test_reproject_coadd_and_incremental_agree(night, default_run, incremental_run) -> None:
    truth = night[0]
    coadd, incremental = default_run[0], incremental_run[0]
    assert incremental.report["assembly_method"] == "incremental"
    assert coadd.stack.data.shape == incremental.stack.data.shape
    assert np.array_equal(np.isfinite(coadd.stack.data), np.isfinite(incremental.stack.data))
    _, x, y = _isolated_stars(coadd, truth)
    flux_a, flux_b = _fluxes(coadd, truth, x, y), _fluxes(incremental, truth, x, y)
    assert np.max(np.abs(flux_b / flux_a - 1)) < 0.005
    green = coadd.stack.data[1]
    _, noise = local_background(green, green.shape[1] / 2, green.shape[0] / 2, 20, 60)
    assert np.nanmax(np.abs(coadd.stack.data - incremental.stack.data)) < noise
    assert np.allclose(coadd.stack.weight, incremental.stack.weight, rtol=1e-5)


def test_incremental_peak_memory_is_below_reproject_coadd(night, default_run) -> None:
    """Python-heap peak (tracemalloc sees numpy buffers) of the two assemblies on the same tiles."""
    _, frames, canvas, work = night
    outcome = default_run[0]
    harmony = outcome.harmony
    peaks = {}
    for method in ("reproject_coadd", "incremental"):
        placed = (tile_on_canvas(tile, canvas) for tile in outcome.tiles)
        tracemalloc.start()
        try:
            result = assemble(method, placed, canvas, harmony.norm, harmony.scales, 3, work / "assembly_probe")
            peaks[method] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        del result
    output_bytes = 5 * 4 * canvas.shape[0] * canvas.shape[1]  # data (3 planes), weight, count: both hold these
    assert peaks["incremental"] < peaks["reproject_coadd"]
    # beyond the output, incremental holds one tile; reproject_coadd holds them all
    assert (peaks["incremental"] - output_bytes) < 0.6 * (peaks["reproject_coadd"] - output_bytes)


def test_stars_match_the_truth_catalog(night, default_run) -> None:
    truth = night[0]
    outcome = default_run[0]
    _, x, y = _isolated_stars(outcome, truth)
    assert len(x) >= 40
    image = outcome.stack.data.sum(axis=0)
    measured = np.array([centroid(image, xi, yi) for xi, yi in zip(x, y)])
    rms = float(np.sqrt(np.mean((measured[:, 0] - x) ** 2 + (measured[:, 1] - y) ** 2)))
    assert rms <= 0.15, f"centroid RMS {rms:.3f} px"


def _residual_sigmas(outcome: ClassicOutcome, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    image = outcome.stack.data.sum(axis=0)
    height, width = image.shape
    out = []
    for xi, yi in zip(x, y):
        ix, iy = int(round(xi)), int(round(yi))
        if 14 <= ix < width - 14 and 14 <= iy < height - 14 and outcome.alpha[iy, ix]:
            background, sigma = local_background(image, xi, yi, 5.0, 12.0)
            out.append((image[iy, ix] - background) / sigma)
    return np.array(out)


def test_trail_and_hot_pixels_are_rejected(night, default_run) -> None:
    """The trail (one frame of its panel) is rejected by the master tile's kappa-sigma; the hot pixels
    are fixed per frame before stacking (at this demo scale dithers are ~4 px, so the same hot pixel
    of several frames often lands on one sky pixel, where no per-pixel rejection could see it)."""
    truth = night[0]
    outcome = default_run[0]
    wcs = outcome.stack.canvas.wcs
    star_x, star_y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    bright = truth.star_flux[:, 1] > 300

    def far_from_stars(x, y):
        return np.array([np.min(np.hypot(star_x[bright] - xi, star_y[bright] - yi)) > 8 for xi, yi in zip(x, y)])

    frame = truth.frames[truth.trail_frame]
    x0, y0, x1, y1 = frame.trail
    t = np.linspace(0.05, 0.95, 120)
    ra, dec = truth.wcs_for(truth.trail_frame).all_pix2world(x0 + t * (x1 - x0), y0 + t * (y1 - y0), 0)
    tx, ty = wcs.all_world2pix(ra, dec, 0)
    keep = far_from_stars(tx, ty)
    trail = _residual_sigmas(outcome, tx[keep], ty[keep])
    hx, hy = [], []
    for index in range(len(truth.frames)):
        ra, dec = truth.wcs_for(index).all_pix2world(truth.hot_pixels[:, 0], truth.hot_pixels[:, 1], 0)
        x, y = wcs.all_world2pix(ra, dec, 0)
        hx.append(x)
        hy.append(y)
    hx, hy = np.concatenate(hx), np.concatenate(hy)
    keep = far_from_stars(hx, hy)
    hot = _residual_sigmas(outcome, hx[keep], hy[keep])
    assert trail.size > 30 and hot.size > 100
    assert np.percentile(np.abs(trail), 95) < 3.0 and np.median(trail) < 1.0
    assert np.percentile(np.abs(hot), 99) < 3.5 and np.median(hot) < 1.0


def test_results_do_not_change_with_sds_or_gpu_settings(night, default_run, tmp_path) -> None:
    """SDS on and the GPU flags flipped (on this CPU machine): the classic result is the same, bit for bit.

    ``resume: off`` makes the run stack its master tiles again instead of reusing them.
    """
    truth, frames, canvas, _ = night
    reference = default_run[0]
    other, reporter = run_on(frames, canvas, tmp_path, sds_mode=True, use_gpu_phase5=False, stack_use_gpu=False,
                             sds_min_batch_size=2, sds_target_batch_size=3, resume="off")
    assert not any(tile.reused for tile in other.tiles)
    assert np.array_equal(reference.stack.data, other.stack.data, equal_nan=True)
    assert np.array_equal(reference.stack.weight, other.stack.weight)
    assert not any(e.key.startswith("sds_") for e in reporter.log_events if isinstance(e, LogEvent))


def test_single_group_one_frame_group_and_a_tile_without_overlap_all_complete(night, tmp_path) -> None:
    truth, frames, _, _ = night
    panel_of = _panel_of(truth, frames)
    panel0 = [f for f in frames if panel_of[str(f.path)] == 0]

    # single-group data: one pointing, one tile, nothing to harmonise
    canvas = build_canvas([f.wcs for f in panel0], [f.shape for f in panel0])
    single, reporter = run_on(panel0, canvas, tmp_path / "single")
    assert len(single.tiles) == 1 and len(single.stack.frames_used) == len(panel0)
    assert np.isfinite(single.stack.data).all(axis=0).mean() > 0.5
    assert "classic_info_photometry_off" in {e.key for e in reporter.log_events}

    # one frame pointed far away: a group of one frame whose tile overlaps no other
    far = panel0[0]
    moved = far.wcs.deepcopy()
    moved.wcs.crval = [moved.wcs.crval[0] + 1.5, moved.wcs.crval[1]]
    moved.wcs.set()
    lone = dataclasses.replace(far, wcs=moved)
    inputs = panel0[1:] + [lone]
    canvas = build_canvas([f.wcs for f in inputs], [f.shape for f in inputs])
    outcome, reporter = run_on(inputs, canvas, tmp_path / "lone", autocrop=False)
    sizes = sorted(len(tile.members) for tile in outcome.tiles)
    assert sizes == [1, len(panel0) - 1]
    warnings = [e for e in reporter.log_events if e.key == "classic_warn_tile_no_overlap"]
    assert len(warnings) >= 1
    lone_slot = next(s for s, t in enumerate(outcome.tiles) if len(t.members) == 1)
    assert outcome.report["tiles"][lone_slot]["gain"] == [1.0, 1.0, 1.0]
    # the lone frame is in the mosaic, at its own (unchanged) level
    coverage = _tile_coverage(outcome)
    assert np.isfinite(outcome.stack.data[:, coverage[lone_slot]]).all()


def test_master_tile_unit_is_a_pure_function_of_serialisable_inputs(night, default_run, tmp_path) -> None:
    _, frames, _, _ = night
    outcome = default_run[0]
    tile = outcome.tiles[0]
    members = [frames[i] for i in tile.members]
    config = validate_config({**BASE, "resume": "off"})
    unit = master_tile_unit([f.to_dict() for f in members], tile.members, tile.index,
                            tile_canvas(members).to_dict(), config, tmp_path, 3)
    assert unit.members == tile.members
    # The same pixels up to the float rounding of WCS keywords written as text and read back.
    planes, reference = unit.read_planes(), tile.read_planes()
    assert np.array_equal(np.isnan(planes), np.isnan(reference))
    assert np.nanmax(np.abs(planes[:3] - reference[:3])) < 1e-3 * tile.noise_per_unit_weight


def test_frame_gains_follow_the_truth_through_their_tiles(night, default_run) -> None:
    """Frame gain = gain inside its tile × the tile's gain: transparencies relative to the anchor's panel."""
    truth, frames, _, _ = night
    outcome = default_run[0]
    gains = outcome.stack.normalisation.gains.mean(axis=1)
    transparency = {f.file_name: f.transparency for f in truth.frames}
    measured = np.array([gains[i] for i in outcome.stack.frames_used])
    expected = np.array([transparency[Path(frames[i].path).name] for i in outcome.stack.frames_used])
    ratio = measured / expected
    assert np.max(np.abs(ratio / np.median(ratio) - 1)) < 0.02  # the cloudy frame (0.4) included

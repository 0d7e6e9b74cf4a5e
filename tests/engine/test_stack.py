"""Science tests of the stacking engine: rejection against oracles, noise, weights, coverage."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_zemosaic.config import DEFAULT_CONFIG, ConfigError
from napari_zemosaic.engine import stack
from napari_zemosaic.engine.stack import (
    StackParams,
    apply_normalisation,
    combine,
    kappa_sigma_mask,
    linear_fit_clip_mask,
    noise_weights,
    robust_linear_fit,
    robust_sigma,
    sky_level,
    sky_offsets,
    stack_cube,
    winsorized_consistency_factor,
    winsorized_sigma_clip_mask,
)

REJECTIONS = ("kappa_sigma", "winsorized_sigma_clip", "linear_fit_clip")


def _astropy_mask(cube: np.ndarray, kappa_low: float, kappa_high: float, maxiters: int | None) -> np.ndarray:
    from astropy.stats import sigma_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Input data contains invalid values"
        clipped = sigma_clip(
            cube, sigma_lower=kappa_low, sigma_upper=kappa_high, maxiters=maxiters,
            cenfunc="median", stdfunc="std", axis=0, masked=True,
        )
    return np.broadcast_to(np.ma.getmaskarray(clipped), cube.shape)


def _cube_with_outliers(rng: np.random.Generator, shape: tuple[int, ...], nan_fraction: float) -> np.ndarray:
    cube = rng.normal(100.0, 5.0, shape).astype(np.float32)
    hits = rng.random(shape) < 0.05
    cube[hits] += rng.normal(0.0, 60.0, int(hits.sum())).astype(np.float32)  # bright and dark outliers
    mild = rng.random(shape) < 0.03
    cube[mild] += rng.choice([-1.0, 1.0], int(mild.sum())).astype(np.float32) * 17.0  # ~3.4 σ: needs iterations
    cube[rng.random(shape) < nan_fraction] = np.nan
    cube[:, ..., 0, 0] = np.nan  # one all-NaN pixel per channel
    return cube


# ------------------------------------------------------------------------ kappa-sigma oracle


@pytest.mark.parametrize("shape", [(15, 1, 16, 16), (7, 3, 8, 12), (40, 2, 6, 5), (3, 1, 10, 10), (2, 1, 4, 4)])
@pytest.mark.parametrize("kappas", [(3.0, 3.0), (2.0, 3.5), (1.5, 2.5)])
@pytest.mark.parametrize("maxiters", [1, 5])
def test_kappa_sigma_equals_astropy_sigma_clip(shape, kappas, maxiters):
    rng = np.random.default_rng(hash((shape, kappas, maxiters)) % 2**32)
    cube = _cube_with_outliers(rng, shape, nan_fraction=0.05)
    mask = kappa_sigma_mask(cube, kappas[0], kappas[1], maxiters, np)
    np.testing.assert_array_equal(mask, _astropy_mask(cube, kappas[0], kappas[1], maxiters))


def test_kappa_sigma_equals_astropy_with_ties_many_frames_and_no_iteration_limit():
    rng = np.random.default_rng(7)
    cube = np.round(_cube_with_outliers(rng, (120, 1, 20, 24), nan_fraction=0.1))  # many equal values
    for maxiters in (3, None):
        mask = kappa_sigma_mask(cube, 2.5, 2.0, maxiters, np)
        np.testing.assert_array_equal(mask, _astropy_mask(cube, 2.5, 2.0, maxiters))


def test_kappa_sigma_spans_several_chunks(monkeypatch):
    monkeypatch.setattr(stack, "_CHUNK_SAMPLES_CPU", 64)  # 64 // 9 = 7 columns per chunk
    rng = np.random.default_rng(3)
    cube = _cube_with_outliers(rng, (9, 2, 7, 5), nan_fraction=0.05)
    np.testing.assert_array_equal(kappa_sigma_mask(cube, 2.0, 2.0, 4, np), _astropy_mask(cube, 2.0, 2.0, 4))


# --------------------------------------------------- winsorized / linear fit: reference oracles


def _reference_winsorized(sample: np.ndarray, kl: float, kh: float, iterations: int, ws: float) -> np.ndarray:
    """Plain per-sample Siril loop: σ from the sample std, σ ← c·std(winsorised) until stable."""
    factor = winsorized_consistency_factor(ws)
    kept = np.isfinite(sample)
    for _ in range(iterations):
        values = sample[kept].astype(np.float64)
        if values.size < 3:
            break
        centre = np.median(values)
        sigma = values.std(ddof=1)
        for _ in range(1000):
            new_sigma = factor * np.clip(values, centre - ws * sigma, centre + ws * sigma).std(ddof=1)
            done = abs(new_sigma - sigma) <= 5e-4 * sigma  # Siril's tolerance
            sigma = new_sigma
            if done:
                break
        reject = kept & ((sample < centre - kl * sigma) | (sample > centre + kh * sigma))
        if not reject.any():
            break
        kept &= ~reject
    return ~kept


def _reference_linear_fit(sample: np.ndarray, kl: float, kh: float, iterations: int) -> np.ndarray:
    """Plain per-sample Siril loop: sort, fit value = a + b·rank, σ = mean |residual|, clip."""
    kept = np.isfinite(sample)
    for _ in range(iterations):
        index = np.flatnonzero(kept)
        if index.size < 3:
            break
        order = index[np.argsort(sample[index], kind="stable")]
        values = sample[order].astype(np.float64)
        rank = np.arange(values.size, dtype=np.float64)
        slope, intercept = np.polyfit(rank, values, 1)
        residual = values - (intercept + slope * rank)
        sigma = np.mean(np.abs(residual))
        if sigma <= 0:
            break
        bad = order[(residual < -kl * sigma) | (residual > kh * sigma)]
        if bad.size == 0:
            break
        kept[bad] = False
    return ~kept


def _per_sample(reference, cube: np.ndarray, *args) -> np.ndarray:
    columns = cube.reshape(cube.shape[0], -1)
    mask = np.stack([reference(columns[:, j], *args) for j in range(columns.shape[1])], axis=1)
    return mask.reshape(cube.shape)


@pytest.mark.parametrize("shape", [(12, 1, 12, 12), (30, 2, 6, 6), (5, 1, 8, 8)])
def test_winsorized_matches_a_plain_per_sample_implementation(shape):
    rng = np.random.default_rng(shape[0])
    cube = _cube_with_outliers(rng, shape, nan_fraction=0.05)
    mask = winsorized_sigma_clip_mask(cube, 3.0, 2.7, 5, 1.5, np)
    expected = _per_sample(_reference_winsorized, cube, 3.0, 2.7, 5, 1.5)
    # Same loop; only float rounding (float32 deviations) may flip a value on a threshold.
    assert np.mean(mask != expected) <= 1e-3
    assert mask[~np.isfinite(cube)].all()


@pytest.mark.parametrize("shape", [(12, 1, 12, 12), (30, 2, 6, 6), (5, 1, 8, 8)])
def test_linear_fit_clip_matches_a_plain_per_sample_implementation(shape):
    rng = np.random.default_rng(100 + shape[0])
    cube = _cube_with_outliers(rng, shape, nan_fraction=0.05)
    # κ = 2.5 would be a structural tie: one spike among 5 sorted values has residual 2.5·σ exactly.
    mask = linear_fit_clip_mask(cube, 3.0, 2.7, 5, np)
    expected = _per_sample(_reference_linear_fit, cube, 3.0, 2.7, 5)
    assert np.mean(mask != expected) <= 1e-3  # float32 residuals vs float64 reference
    assert mask[~np.isfinite(cube)].all()


def test_winsorized_consistency_factor_is_siril_constant():
    assert winsorized_consistency_factor(1.5) == pytest.approx(1.134, abs=1e-3)
    # The factor makes the winsorised std an unbiased σ for Gaussian data.
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 2.0, 2_000_000)
    clamped = np.clip(values, -1.5 * 2.0, 1.5 * 2.0)
    assert winsorized_consistency_factor(1.5) * clamped.std() == pytest.approx(2.0, rel=3e-3)


def test_winsorized_ends_on_a_saturated_majority():
    # More than half the frames saturated at one value: the winsorised σ collapses to 0 (it
    # would shrink forever); the loop must end and keep the saturated level.
    rng = np.random.default_rng(6)
    cube = rng.normal(60000.0, 300.0, (20, 1, 3, 3)).astype(np.float32)
    cube[:12] = 65535.0
    result = stack_cube(cube, StackParams(rejection="winsorized_sigma_clip"))
    np.testing.assert_array_equal(result.data, 65535.0)
    np.testing.assert_array_equal(result.count, 12.0)


# ------------------------------------------------------------- artefacts: trail and hot pixels

SIGMA = 10.0
SIGNAL = 1000.0


def _night_with_artefacts(n_frames: int = 20, size: int = 64, seed: int = 5):
    """Constant signal + Gaussian noise; a satellite trail in one frame, hot pixels in some frames."""
    rng = np.random.default_rng(seed)
    clean = (SIGNAL + rng.normal(0.0, SIGMA, (n_frames, 3, size, size))).astype(np.float32)
    cube = clean.copy()
    rows = np.arange(size)
    trail_rows, trail_cols = rows, (rows * 0.7 + 5).astype(int)
    for width in (0, 1):  # a 2-px wide diagonal trail, 60 σ bright, in frame 3, all channels
        cube[3, :, trail_rows, np.clip(trail_cols + width, 0, size - 1)] += 60.0 * SIGMA
    hot = np.zeros((size, size), dtype=bool)
    for frame in (1, 7, 12, 18):
        ys, xs = rng.integers(0, size, 8), rng.integers(0, size, 8)
        cube[frame, :, ys, xs] = 20000.0  # saturated hot pixels
        hot[ys, xs] = True
    artefact = hot.copy()
    artefact[trail_rows, trail_cols] = True
    artefact[trail_rows, np.clip(trail_cols + 1, 0, size - 1)] = True
    return clean, cube, artefact


@pytest.mark.parametrize("rejection", REJECTIONS)
def test_rejection_removes_trail_and_hot_pixels(rejection):
    clean, cube, artefact = _night_with_artefacts()
    n_frames = cube.shape[0]
    params = StackParams(rejection=rejection)
    result = stack_cube(cube, params)
    reference = stack_cube(clean, params)  # the same night without artefacts
    stack_noise = SIGMA / math.sqrt(n_frames)
    local_noise = float(np.std(reference.data - SIGNAL))
    assert local_noise == pytest.approx(stack_noise, rel=0.15)

    # What the artefacts leave: the stack minus the stack of the same night without them.
    # Everywhere below 3 stack noises (rejecting the bad sample also drops its noise, and a
    # clipped sample may differ), against ≈ 13 stack noises without rejection (below).
    leftover = (result.data - reference.data)[:, artefact]
    assert np.max(np.abs(leftover)) < 3.0 * local_noise
    assert abs(float(np.mean(leftover))) < 0.3 * local_noise  # no systematic offset
    # Against the truth, artefact pixels are as good as the others: RMS at the noise level, and
    # a max bounded as for ~750 Gaussian draws (3σ alone would fail by chance ~9 times in 10).
    residual = (result.data - SIGNAL)[:, artefact]
    assert np.sqrt(np.mean(residual**2)) < 1.25 * local_noise
    assert np.max(np.abs(residual)) < 4.5 * local_noise
    # Without rejection the trail alone leaves 60σ/N = 3σ ≈ 13 stack noises.
    plain = stack_cube(cube, StackParams(rejection="none"))
    assert np.max(np.abs(plain.data - SIGNAL)[:, artefact]) > 10 * local_noise
    # Every artefact sample was rejected.
    assert np.all(result.rejected[artefact] >= 1.0)


# -------------------------------------------------------------------------------- noise vs √N


@pytest.mark.parametrize("n_frames", [4, 16])
def test_mean_combine_noise_scales_as_one_over_sqrt_n(n_frames):
    rng = np.random.default_rng(n_frames)
    cube = (SIGNAL + rng.normal(0.0, SIGMA, (n_frames, 1, 128, 128))).astype(np.float32)
    expected = SIGMA / math.sqrt(n_frames)
    plain = stack_cube(cube, StackParams(rejection="none"))
    plain_noise = float(np.std(plain.data))
    assert plain_noise == pytest.approx(expected, rel=0.15)
    assert float(np.mean(plain.data)) == pytest.approx(SIGNAL, abs=3 * expected / 128)
    for rejection in ("kappa_sigma", "winsorized_sigma_clip"):
        result = stack_cube(cube, StackParams(rejection=rejection))
        noise = float(np.std(result.data))
        assert noise == pytest.approx(expected, rel=0.15)
        assert noise / plain_noise == pytest.approx(1.0, abs=0.05)  # clean data: almost nothing rejected
        assert float(np.mean(result.data)) == pytest.approx(SIGNAL, abs=3 * noise / 128)
        assert float(np.mean(result.count)) > 0.98 * n_frames


@pytest.mark.parametrize("n_frames", [4, 16])
def test_linear_fit_clip_keeps_clean_gaussian_noise_close(n_frames):
    rng = np.random.default_rng(40 + n_frames)
    cube = (SIGNAL + rng.normal(0.0, SIGMA, (n_frames, 1, 128, 128))).astype(np.float32)
    plain_noise = float(np.std(stack_cube(cube, StackParams(rejection="none")).data))
    # σ = mean |residual| is small next to the curvature of sorted Gaussian tails, so κ = 3
    # trims a few per cent of clean samples; κ = 5 keeps the noise within a few per cent.
    result = stack_cube(cube, StackParams(rejection="linear_fit_clip", kappa_low=5.0, kappa_high=5.0))
    assert float(np.std(result.data)) / plain_noise == pytest.approx(1.0, abs=0.05)
    assert float(np.mean(result.data)) == pytest.approx(SIGNAL, abs=3 * plain_noise / 128)


# ----------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("rejection", ["none", "kappa_sigma"])
def test_noise_variance_weights_reach_the_theoretical_noise(rejection):
    rng = np.random.default_rng(11)
    sigmas = np.array([5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 18.0, 20.0, 25.0, 30.0, 35.0, 40.0])
    cube = (SIGNAL + rng.normal(0.0, 1.0, (sigmas.size, 1, 128, 128)) * sigmas[:, None, None, None]).astype(np.float32)
    weights = noise_weights(sigmas, np)
    weighted = stack_cube(cube, StackParams(rejection=rejection), weights=weights)
    unweighted = stack_cube(cube, StackParams(rejection=rejection, weighting="none"), weights=weights)
    weighted_noise, unweighted_noise = float(np.std(weighted.data)), float(np.std(unweighted.data))
    assert weighted_noise == pytest.approx(1.0 / math.sqrt(np.sum(1.0 / sigmas**2)), rel=0.15)
    assert unweighted_noise == pytest.approx(math.sqrt(np.sum(sigmas**2)) / sigmas.size, rel=0.15)
    assert weighted_noise < 0.75 * unweighted_noise
    # The coverage map is the sum of the (mean-1) weights of the kept frames.
    assert float(np.median(weighted.weight)) == pytest.approx(sigmas.size, rel=0.02)


def test_noise_weights_are_inverse_variance_normalised_to_mean_one():
    weights = noise_weights(np.array([1.0, 2.0, 4.0, np.nan, 0.0]), np)
    valid = weights[:3]
    assert np.mean(valid) == pytest.approx(1.0)
    assert valid[0] / valid[1] == pytest.approx(4.0) and valid[1] / valid[2] == pytest.approx(4.0)
    assert weights[3] == 0.0 and weights[4] == 0.0
    np.testing.assert_array_equal(noise_weights(np.array([np.nan, np.nan]), np), [1.0, 1.0])


def test_pixel_weights_exclude_a_frame_where_they_are_zero():
    rng = np.random.default_rng(2)
    cube = (SIGNAL + rng.normal(0.0, 1.0, (6, 2, 8, 10))).astype(np.float32)
    cube[0] += 500.0  # a frame that must not count on the left half
    pixel_weights = np.ones((6, 8, 10), dtype=np.float32)
    pixel_weights[0, :, :5] = 0.0
    result = stack_cube(cube, StackParams(rejection="none", weighting="none"), pixel_weights=pixel_weights)
    np.testing.assert_allclose(result.data[:, :, :5], cube[1:, :, :, :5].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(result.data[:, :, 5:], cube[:, :, :, 5:].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(result.count[:, :5], 5.0)
    np.testing.assert_array_equal(result.weight[:, 5:], 6.0)


# ------------------------------------------------------------------------- median and coverage


def test_median_combine_noise_and_value():
    rng = np.random.default_rng(21)
    n_frames = 15
    cube = (SIGNAL + rng.normal(0.0, SIGMA, (n_frames, 1, 128, 128))).astype(np.float32)
    result = stack_cube(cube, StackParams(rejection="none", combine="median"))
    np.testing.assert_array_equal(result.data[0], np.median(cube[:, 0], axis=0).astype(np.float32))
    # Efficiency of the median of n=15 Gaussian values: σ_med ≈ 1.2533·σ/√n (slightly less).
    assert float(np.std(result.data)) == pytest.approx(1.2533 * SIGMA / math.sqrt(n_frames), rel=0.15)


@pytest.mark.parametrize("method", ["mean", "median"])
@pytest.mark.parametrize("rejection", ["none", "kappa_sigma", "winsorized_sigma_clip", "linear_fit_clip"])
def test_partial_coverage_uses_exactly_the_covering_frames(method, rejection):
    rng = np.random.default_rng(8)
    n_frames, width = 8, 16
    cube = (SIGNAL + rng.normal(0.0, SIGMA, (n_frames, 3, 6, width))).astype(np.float32)
    for frame in range(n_frames):
        cube[frame, :, :, : 2 * frame] = np.nan  # frame k covers columns ≥ 2k: coverage 1..8
    cube[:, :, 0, 0] = np.nan  # a pixel no frame covers
    weights = rng.uniform(0.5, 2.0, n_frames).astype(np.float32)
    params = StackParams(rejection=rejection, combine=method)
    result = stack_cube(cube, params, weights=weights)

    finite = np.isfinite(cube)
    covering = finite[:, 0].sum(axis=0)
    rejected = stack.rejection_mask(cube, params, np)
    assert not np.any(rejected[:, :, covering <= 2] & finite[:, :, covering <= 2])  # N ≤ 2: nothing rejected
    kept = finite & ~rejected
    np.testing.assert_allclose(result.count, kept.sum(axis=0).mean(axis=0), rtol=1e-6)
    kept_weights = np.where(kept, weights[:, None, None, None], 0.0)
    np.testing.assert_allclose(result.weight, kept_weights.sum(axis=0).mean(axis=0), rtol=1e-6)
    if method == "mean":
        expected = (np.where(kept, cube, 0.0) * kept_weights).sum(axis=0) / kept_weights.sum(axis=0)
    else:
        expected = np.nanmedian(np.where(kept, cube, np.nan), axis=0)
    good = covering > 0
    np.testing.assert_allclose(result.data[:, good], expected[:, good], rtol=1e-6)
    assert np.all(np.isnan(result.data[:, 0, 0]))
    assert result.weight[0, 0] == 0.0 and result.count[0, 0] == 0.0 and result.rejected[0, 0] == 0.0
    np.testing.assert_allclose(result.rejected, (rejected & finite).sum(axis=0).mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("rejection", ["kappa_sigma", "winsorized_sigma_clip", "linear_fit_clip"])
@pytest.mark.parametrize("method", ["mean", "median"])
def test_one_and_two_frame_cubes_keep_every_value(rejection, method):
    rng = np.random.default_rng(4)
    params = StackParams(rejection=rejection, combine=method)
    one = rng.normal(SIGNAL, SIGMA, (1, 3, 5, 6)).astype(np.float32)
    result = stack_cube(one, params)
    np.testing.assert_array_equal(result.data, one[0])
    np.testing.assert_array_equal(result.count, 1.0)
    two = rng.normal(SIGNAL, SIGMA, (2, 3, 5, 6)).astype(np.float32)
    two[1, :, 2, 3] = 60000.0  # an outlier cannot be told from two values
    two[0, :, 4, 5] = np.nan
    result = stack_cube(two, params)
    expected = np.nanmean(two, axis=0)
    np.testing.assert_allclose(result.data, expected, rtol=1e-6)
    assert result.count[2, 3] == 2.0 and result.count[4, 5] == 1.0
    assert np.all(result.rejected == 0.0)


def test_all_nan_cube():
    cube = np.full((5, 3, 4, 4), np.nan, dtype=np.float32)
    for rejection in ("none",) + REJECTIONS:
        for method in ("mean", "median"):
            result = stack_cube(cube, StackParams(rejection=rejection, combine=method), weights=np.ones(5))
            assert np.all(np.isnan(result.data))
            assert np.all(result.weight == 0.0) and np.all(result.count == 0.0) and np.all(result.rejected == 0.0)


def test_combine_accepts_a_missing_mask_and_per_channel_weights():
    rng = np.random.default_rng(9)
    cube = rng.normal(SIGNAL, SIGMA, (4, 2, 3, 3)).astype(np.float32)
    cube[0, 1] = np.nan
    weights = np.ones((4, 2, 3, 3), dtype=np.float32)
    weights[1, 0] = 3.0
    data, weight, count = combine(cube, None, weights, "mean", np)
    np.testing.assert_allclose(data[0], (cube[:, 0] * weights[:, 0]).sum(axis=0) / 6.0, rtol=1e-6)
    np.testing.assert_allclose(data[1], np.nanmean(cube[:, 1], axis=0), rtol=1e-6)
    np.testing.assert_allclose(weight, (6.0 + 3.0) / 2.0)
    np.testing.assert_allclose(count, (4.0 + 3.0) / 2.0)


# --------------------------------------------------------------- photometric helpers and misc


def test_robust_linear_fit_recovers_gain_and_offset_with_20_percent_outliers():
    rng = np.random.default_rng(13)
    x = rng.uniform(0.0, 1000.0, 4000)
    y = 1.7 * x + 50.0 + rng.normal(0.0, 5.0, x.size)
    bad = rng.random(x.size) < 0.2
    # Mostly bright outliers (stars, trails in one image), some dark.
    y[bad] += rng.choice([-1.0, 1.0, 1.0, 1.0], int(bad.sum())) * rng.uniform(100.0, 3000.0, int(bad.sum()))
    x[rng.random(x.size) < 0.02] = np.nan
    gain, offset = robust_linear_fit(x, y, np)
    assert float(gain) == pytest.approx(1.7, rel=0.005)
    assert float(offset) == pytest.approx(50.0, abs=2.0)
    # Plain least squares is far off on the same data.
    good = np.isfinite(x)
    naive_offset = np.polyfit(x[good], y[good], 1)[1]
    assert abs(naive_offset - 50.0) > 50.0


def test_robust_linear_fit_batches_and_degenerate_inputs():
    rng = np.random.default_rng(14)
    x = rng.uniform(10.0, 500.0, (3, 2, 600))
    gains = np.array([[0.8, 1.0], [1.2, 1.5], [2.0, 0.5]])
    offsets = np.array([[-5.0, 0.0], [10.0, 20.0], [3.0, -40.0]])
    y = gains[..., None] * x + offsets[..., None] + rng.normal(0.0, 1.0, x.shape)
    y[..., ::7] += 800.0  # stars present in one image only
    gain, offset = robust_linear_fit(x, y, np)
    np.testing.assert_allclose(gain, gains, rtol=0.01)
    np.testing.assert_allclose(offset, offsets, atol=1.5)
    flat_gain, flat_offset = robust_linear_fit(np.full(50, 100.0), np.full(50, 130.0), np)  # no spread in x
    assert float(flat_gain) == 1.0 and float(flat_offset) == pytest.approx(30.0)


def test_robust_sigma_ignores_outliers_and_nan():
    rng = np.random.default_rng(15)
    values = rng.normal(0.0, 3.0, 20000)
    values[:2000] = 1e4
    values[2000:2100] = np.nan
    assert float(robust_sigma(values, np)) == pytest.approx(3.0 * 1.13, rel=0.06)  # 10 % one-sided outliers
    assert float(robust_sigma(values[2100:], np)) == pytest.approx(3.0, rel=0.03)
    per_row = robust_sigma(rng.normal(0.0, 2.0, (4, 5000)), np, axis=1)
    np.testing.assert_allclose(per_row, 2.0, rtol=0.05)


def test_sky_normalisation_brings_frames_to_one_level():
    rng = np.random.default_rng(16)
    skies = np.array([[100.0, 200.0, 300.0], [150.0, 180.0, 330.0], [80.0, 260.0, 310.0]])
    cube = (skies[:, :, None, None] + rng.normal(0.0, 2.0, (3, 3, 64, 64))).astype(np.float32)
    levels = sky_level(cube, np)
    np.testing.assert_allclose(levels, skies, atol=0.2)
    offsets = sky_offsets(levels, np)
    apply_normalisation(cube, np.ones((3, 3)), offsets, np)  # in place
    np.testing.assert_allclose(sky_level(cube, np), np.median(skies, axis=0)[None, :].repeat(3, 0), atol=0.3)


def test_apply_normalisation_is_gain_then_offset_in_place_and_keeps_nan():
    cube = np.ones((2, 3, 4, 4), dtype=np.float32)
    cube[1, 2, 0, 0] = np.nan
    gains = np.array([[2.0, 3.0, 4.0], [0.5, 1.0, 1.5]])
    offsets = np.array([[1.0, 0.0, -1.0], [0.0, 10.0, 0.5]])
    out = apply_normalisation(cube, gains, offsets, np)
    assert out is cube
    np.testing.assert_allclose(cube[:, :, 1, 1], gains + offsets)
    assert np.isnan(cube[1, 2, 0, 0])


def test_params_from_config_and_validation():
    params = StackParams.from_config(DEFAULT_CONFIG)
    assert params == StackParams(
        rejection=DEFAULT_CONFIG["stacking_rejection_algorithm"],
        kappa_low=DEFAULT_CONFIG["stacking_kappa_low"],
        kappa_high=DEFAULT_CONFIG["stacking_kappa_high"],
        max_iterations=DEFAULT_CONFIG["stacking_max_iterations"],
        winsor_sigma=DEFAULT_CONFIG["stacking_winsor_sigma"],
        combine=DEFAULT_CONFIG["stacking_final_combine"],
        weighting=DEFAULT_CONFIG["stacking_weighting_method"],
    )
    custom = StackParams.from_config({"stacking_rejection_algorithm": "linear_fit_clip", "stacking_kappa_low": 2})
    assert custom.rejection == "linear_fit_clip" and custom.kappa_low == 2.0 and custom.kappa_high == 3.0
    with pytest.raises(ConfigError) as error:
        StackParams(rejection="sigma")
    assert error.value.key == "config_error_invalid_value"
    with pytest.raises(ConfigError):
        StackParams(kappa_high=0.0)
    with pytest.raises(ConfigError):
        StackParams(max_iterations=0)


def test_stack_module_imports_neither_scipy_nor_astropy():
    source = Path(stack.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"scipy", "astropy"}


# ------------------------------------------------------------------------------- GPU parity


@pytest.mark.gpu
@pytest.mark.parametrize("rejection", ("none",) + REJECTIONS)
@pytest.mark.parametrize("method", ["mean", "median"])
def test_gpu_matches_cpu(rejection, method):
    cp = pytest.importorskip("cupy")
    clean, cube, _ = _night_with_artefacts(n_frames=24, size=96, seed=31)
    cube[:5, :, :, :30] = np.nan  # partial coverage
    cube[:, :, 0, :3] = np.nan  # uncovered pixels
    rng = np.random.default_rng(32)
    weights = noise_weights(rng.uniform(5.0, 20.0, cube.shape[0]), np).astype(np.float32)
    pixel_weights = rng.uniform(0.5, 1.0, (cube.shape[0],) + cube.shape[2:]).astype(np.float32)
    params = StackParams(rejection=rejection, combine=method)
    cpu = stack_cube(cube, params, weights=weights, pixel_weights=pixel_weights, xp=np)
    gpu = stack_cube(cp.asarray(cube), params, weights=cp.asarray(weights),
                     pixel_weights=cp.asarray(pixel_weights), xp=cp)
    stack_noise = SIGMA / math.sqrt(cube.shape[0])
    cpu_mask = stack.rejection_mask(cube, params, np)
    gpu_mask = cp.asnumpy(stack.rejection_mask(cp.asarray(cube), params, cp))
    assert np.mean(cpu_mask != gpu_mask) <= 1e-4  # only float rounding on a threshold may differ
    np.testing.assert_array_equal(np.isnan(cp.asnumpy(gpu.data)), np.isnan(cpu.data))
    differs = np.abs(cp.asnumpy(gpu.data) - cpu.data) > 1e-3 * stack_noise
    assert np.mean(differs[np.isfinite(cpu.data)]) <= 1e-3
    np.testing.assert_allclose(cp.asnumpy(gpu.weight), cpu.weight, rtol=1e-5, atol=0.05)
    np.testing.assert_allclose(cp.asnumpy(gpu.count), cpu.count, atol=0.5)
    np.testing.assert_allclose(cp.asnumpy(gpu.rejected), cpu.rejected, atol=0.5)


@pytest.mark.gpu
def test_gpu_statistics_match_cpu():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(33)
    x = rng.uniform(0.0, 1000.0, (3, 2000))
    y = 1.3 * x + 20.0 + rng.normal(0.0, 3.0, x.shape)
    y[:, ::5] += 700.0
    gain, offset = robust_linear_fit(x, y, np)
    gpu_gain, gpu_offset = robust_linear_fit(cp.asarray(x), cp.asarray(y), cp)
    np.testing.assert_allclose(cp.asnumpy(gpu_gain), gain, rtol=1e-9)
    np.testing.assert_allclose(cp.asnumpy(gpu_offset), offset, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(float(robust_sigma(cp.asarray(y[0]), cp)), float(robust_sigma(y[0], np)), rtol=1e-12)
    sigmas = np.array([4.0, 5.0, 8.0])
    np.testing.assert_allclose(cp.asnumpy(noise_weights(cp.asarray(sigmas), cp)), noise_weights(sigmas, np))
    frames = rng.normal(100.0, 3.0, (4, 3, 32, 32)).astype(np.float32)
    levels = sky_level(frames, np)
    np.testing.assert_allclose(cp.asnumpy(sky_level(cp.asarray(frames), cp)), levels, rtol=1e-6)
    gpu_frames = apply_normalisation(cp.asarray(frames), cp.full((4, 3), 2.0), sky_offsets(cp.asarray(levels), cp), cp)
    apply_normalisation(frames, np.full((4, 3), 2.0), sky_offsets(levels, np), np)
    np.testing.assert_allclose(cp.asnumpy(gpu_frames), frames, rtol=1e-6)

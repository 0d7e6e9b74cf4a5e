"""CFA masks, bilinear debayering and hot-pixel correction on synthetic Bayer data."""

from __future__ import annotations

import numpy as np
import pytest

from napari_zemosaic.engine.debayer import (
    PATTERNS,
    cfa_site_masks,
    correct_hot_pixels,
    debayer_bilinear,
    median_of_8,
)

CHANNEL = {"R": 0, "G": 1, "B": 2}


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample a (3, H, W) scene through a Bayer filter: the CFA plane the sensor sees."""
    cfa = np.empty(rgb.shape[1:], dtype=np.float32)
    for dy in (0, 1):
        for dx in (0, 1):
            cfa[dy::2, dx::2] = rgb[CHANNEL[pattern[2 * dy + dx]], dy::2, dx::2]
    return cfa


def star_scene(
    shape: tuple[int, int], n_stars: int, rng: np.random.Generator, fwhm: float = 2.5, sky: float = 1000.0,
    noise: float = 10.0, amplitudes: tuple[float, float] = (10.0, 3000.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noisy (3, H, W) scene, star y, star x): Gaussian stars of varied colour on a flat sky."""
    height, width = shape
    sigma = fwhm / 2.3548
    scene = np.full((3, height, width), sky, dtype=np.float64)
    ys = rng.uniform(6, height - 6, n_stars)
    xs = rng.uniform(6, width - 6, n_stars)
    peaks = np.exp(rng.uniform(np.log(amplitudes[0] * noise), np.log(amplitudes[1] * noise), n_stars))
    colours = rng.uniform(0.5, 1.0, (n_stars, 3))
    colours[:, 1] = 1.0
    grid_y, grid_x = np.mgrid[0:13, 0:13]
    for y, x, peak, colour in zip(ys, xs, peaks, colours):
        y0, x0 = int(y) - 6, int(x) - 6
        profile = np.exp(-((grid_y + y0 - y) ** 2 + (grid_x + x0 - x) ** 2) / (2 * sigma**2))
        y_lo, x_lo = max(y0, 0), max(x0, 0)
        y_hi, x_hi = min(y0 + 13, height), min(x0 + 13, width)
        cut = profile[y_lo - y0 : y_hi - y0, x_lo - x0 : x_hi - x0]
        scene[:, y_lo:y_hi, x_lo:x_hi] += peak * colour[:, None, None] * cut
    scene += rng.normal(0.0, noise, scene.shape)
    return scene.astype(np.float32), ys, xs


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("pattern", PATTERNS)
def test_site_masks_partition_the_frame_with_bayer_proportions(pattern: str) -> None:
    masks = cfa_site_masks(pattern, (6, 8), np)
    total = masks["R"].astype(int) + masks["G"].astype(int) + masks["B"].astype(int)
    assert np.all(total == 1)
    assert masks["R"].sum() == 12 and masks["B"].sum() == 12 and masks["G"].sum() == 24
    for dy in (0, 1):
        for dx in (0, 1):
            assert masks[pattern[2 * dy + dx]][dy + 2, dx + 4]


def test_unknown_pattern_is_refused() -> None:
    with pytest.raises(ValueError):
        cfa_site_masks("RGBG", (4, 4), np)


def test_median_of_8_matches_numpy_including_ties() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, (8, 5000)).astype(np.float32)  # many ties
    values[:, :10] = rng.normal(size=(8, 10))
    assert np.array_equal(median_of_8(list(values), np), np.median(values, axis=0).astype(np.float32))


# ----------------------------------------------------------------------------- debayer


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", [(8, 12), (7, 9)])
def test_uniform_colour_scene_is_reproduced_exactly_everywhere(pattern: str, shape: tuple[int, int]) -> None:
    colour = np.array([0.1, 1234.567, 3.3e3], dtype=np.float32)
    scene = np.broadcast_to(colour[:, None, None], (3,) + shape).astype(np.float32)
    rgb = debayer_bilinear(mosaic(scene, pattern), pattern, np)
    assert rgb.dtype == np.float32 and rgb.shape == (3,) + shape
    assert np.array_equal(rgb, scene)  # bit-exact, edges included


@pytest.mark.parametrize("pattern", PATTERNS)
def test_known_sites_are_kept_exactly(pattern: str) -> None:
    cfa = np.random.default_rng(1).uniform(0, 65535, (10, 14)).astype(np.float32)
    rgb = debayer_bilinear(cfa, pattern, np)
    for colour, mask in cfa_site_masks(pattern, cfa.shape, np).items():
        assert np.array_equal(rgb[CHANNEL[colour]][mask], cfa[mask])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_linear_gradient_is_exact_in_the_interior(pattern: str) -> None:
    y, x = np.mgrid[0:40, 0:50].astype(np.float64)
    scene = np.stack([100 + 3.0 * x + 2.0 * y, 500 - 1.5 * x + 4.0 * y, 50 + 0.25 * x - 0.5 * y]).astype(np.float32)
    rgb = debayer_bilinear(mosaic(scene, pattern), pattern, np)
    np.testing.assert_allclose(rgb[:, 1:-1, 1:-1], scene[:, 1:-1, 1:-1], rtol=1e-6)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_smooth_scene_is_reconstructed_accurately(pattern: str) -> None:
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    blob = np.exp(-((x - 30.3) ** 2 + (y - 33.7) ** 2) / (2 * 12.0**2))
    scene = np.stack([1000 * blob, 800 * blob + 200, 300 * blob + 0.5 * x]).astype(np.float32)
    rgb = debayer_bilinear(mosaic(scene, pattern), pattern, np)
    interior = (slice(None), slice(2, -2), slice(2, -2))
    # The mean of 4 diagonal neighbours errs by ~ (f_xx + f_yy) / 2 = A / sigma^2 = 6.9 at
    # the peak of a Gaussian of amplitude A = 1000, sigma = 12 px: 0.7 % at worst.
    error = np.abs(rgb[interior] - scene[interior])
    assert np.max(error) < 0.008 * 1000
    assert np.mean(error) < 0.001 * 1000


def test_debayer_does_not_modify_its_input() -> None:
    cfa = np.random.default_rng(2).normal(100, 5, (16, 16)).astype(np.float32)
    before = cfa.copy()
    debayer_bilinear(cfa, "GRBG", np)
    assert np.array_equal(cfa, before)


# ----------------------------------------------------------------------------- hot pixels


def _sparse_sites(rng: np.random.Generator, shape: tuple[int, int], phase: tuple[int, int], n: int, spacing: int = 12):
    """n distinct positions of one Bayer phase, at least ``spacing`` px apart on a jittered grid."""
    height, width = shape
    cells = [(cy, cx) for cy in range(0, height - spacing, spacing) for cx in range(0, width - spacing, spacing)]
    chosen = rng.choice(len(cells), size=n, replace=False)
    ys = np.array([cells[i][0] + 2 + 2 * rng.integers(0, (spacing - 4) // 2) + phase[0] for i in chosen])
    xs = np.array([cells[i][1] + 2 + 2 * rng.integers(0, (spacing - 4) // 2) + phase[1] for i in chosen])
    return ys, xs


@pytest.mark.parametrize("pattern", PATTERNS)
def test_hot_pixels_on_every_colour_site_are_found_and_replaced(pattern: str) -> None:
    rng = np.random.default_rng(3)
    shape = (192, 256)
    clean = rng.normal(1000.0, 10.0, shape).astype(np.float32)
    hot = clean.copy()
    positions = []
    for index, phase in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        ys, xs = _sparse_sites(np.random.default_rng(10 + index), shape, phase, 15)
        hot[ys, xs] += rng.uniform(200.0, 30000.0, ys.size).astype(np.float32)  # 20 to 3000 sigma
        positions.append((ys, xs))
    # Hot pixels on the frame edges and corners too.
    edge_y, edge_x = np.array([0, 0, shape[0] - 1, 100]), np.array([0, 101, shape[1] - 1, 0])
    hot[edge_y, edge_x] += 5000.0
    positions.append((edge_y, edge_x))
    ys = np.concatenate([p[0] for p in positions])
    xs = np.concatenate([p[1] for p in positions])
    before = hot.copy()

    corrected, n_fixed = correct_hot_pixels(hot, pattern, 8.0, np)

    assert np.array_equal(hot, before)  # input untouched
    assert n_fixed == ys.size
    expected = np.zeros(shape, dtype=bool)
    expected[ys, xs] = True
    assert np.array_equal(corrected != hot, expected)  # exactly the hot pixels changed
    # Replaced by the same-colour neighbour median: back within the noise of the true value.
    assert np.max(np.abs(corrected[ys, xs] - clean[ys, xs])) < 5 * 10.0
    for colour, mask in cfa_site_masks(pattern, shape, np).items():
        assert np.any(mask[ys, xs]), colour


def test_hot_pixels_just_above_threshold_are_mostly_found() -> None:
    rng = np.random.default_rng(4)
    shape = (256, 256)
    clean = rng.normal(500.0, 10.0, shape).astype(np.float32)
    hot = clean.copy()
    ys, xs = _sparse_sites(rng, shape, (0, 1), 300, spacing=12)
    residual_noise = 10.0 * np.sqrt(1.19)  # noise of value - median of 8 neighbours
    hot[ys, xs] += 15 * residual_noise
    corrected, n_fixed = correct_hot_pixels(hot, "RGGB", 8.0, np)
    assert n_fixed >= 0.99 * ys.size
    assert np.count_nonzero(corrected != hot) == n_fixed


@pytest.mark.parametrize("pattern", PATTERNS)
def test_star_field_has_no_false_positives(pattern: str) -> None:
    rng = np.random.default_rng(5)
    scene, star_y, star_x = star_scene((256, 320), 300, rng)
    cfa = mosaic(scene, pattern)
    corrected, n_fixed = correct_hot_pixels(cfa, pattern, 8.0, np)
    assert n_fixed == 0
    assert np.array_equal(corrected, cfa)
    # The field really has stars far above the threshold (the test is not vacuous).
    peaks = cfa[np.round(star_y).astype(int), np.round(star_x).astype(int)]
    assert np.sum(peaks - 1000.0 > 100 * 10.0) > 50


def test_hot_pixels_on_a_star_field_are_fixed_and_star_peaks_kept() -> None:
    rng = np.random.default_rng(6)
    shape = (256, 320)
    scene, star_y, star_x = star_scene(shape, 250, rng)
    cfa = mosaic(scene, "GRBG")
    red_y, red_x = _sparse_sites(np.random.default_rng(60), shape, (0, 1), 40)
    green_y, green_x = _sparse_sites(np.random.default_rng(61), shape, (1, 1), 40)
    ys, xs = np.concatenate([red_y, green_y]), np.concatenate([red_x, green_x])
    distance = np.min(np.hypot(ys[:, None] - star_y[None], xs[:, None] - star_x[None]), axis=1)
    isolated = distance > 8  # a hot pixel that falls on a star may legitimately be kept
    hot = cfa.copy()
    hot[ys, xs] += 20000.0

    corrected, n_fixed = correct_hot_pixels(hot, "GRBG", 8.0, np)

    assert np.all(corrected[ys[isolated], xs[isolated]] != hot[ys[isolated], xs[isolated]])
    assert np.max(np.abs(corrected[ys[isolated], xs[isolated]] - cfa[ys[isolated], xs[isolated]])) < 60.0
    injected = set(zip(ys.tolist(), xs.tolist()))
    changed = {(int(y), int(x)) for y, x in np.argwhere(corrected != hot)}
    assert changed <= injected and n_fixed == len(changed)
    peak_y, peak_x = np.round(star_y).astype(int), np.round(star_x).astype(int)
    not_hot = np.array([(y, x) not in injected for y, x in zip(peak_y.tolist(), peak_x.tolist())])
    assert np.array_equal(corrected[peak_y[not_hot], peak_x[not_hot]], hot[peak_y[not_hot], peak_x[not_hot]])


def test_hot_pixel_correction_leaves_nan_pixels_alone() -> None:
    rng = np.random.default_rng(7)
    cfa = rng.normal(1000.0, 10.0, (64, 64)).astype(np.float32)
    cfa[10:14, 20:30] = np.nan
    cfa[40, 40] += 5000.0
    corrected, n_fixed = correct_hot_pixels(cfa, "RGGB", 8.0, np)
    assert n_fixed == 1
    assert abs(corrected[40, 40] - 1000.0) < 50.0
    assert np.all(np.isnan(corrected[10:14, 20:30]))


def test_flat_noiseless_frame_with_one_hot_pixel() -> None:
    cfa = np.full((32, 32), 700.0, dtype=np.float32)
    cfa[9, 12] = 900.0
    corrected, n_fixed = correct_hot_pixels(cfa, "BGGR", 8.0, np)
    assert n_fixed == 1
    assert np.all(corrected == 700.0)

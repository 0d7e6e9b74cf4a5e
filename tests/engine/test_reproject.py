"""Reprojection: control-grid accuracy, agreement with reproject.reproject_interp, NaN and edge rules."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_interp
from scipy.ndimage import binary_erosion

from napari_zemosaic.engine.canvas import Canvas, build_canvas, crop_canvas, frame_bbox_on_canvas
from napari_zemosaic.engine.reproject import (
    compute_control_grid,
    exact_map,
    expand_control_grid,
    reproject_frame,
    sample,
)

SHAPE = (160, 240)  # (H, W)
SCALE_ARCSEC = 2.4
# ≈ 1 px of distortion at the corners: a typical small-refractor TAN-SIP solution.
SIP = {"A_2_0": 2e-5, "A_1_1": -1.5e-5, "A_0_2": 1e-5, "B_2_0": -1e-5, "B_1_1": 2e-5, "B_0_2": 1.5e-5}


def frame_wcs(
    ra: float,
    dec: float,
    *,
    rotation_deg: float = 0.0,
    shape: tuple[int, int] = SHAPE,
    scale_arcsec: float = SCALE_ARCSEC,
    sip: dict[str, float] | None = None,
) -> WCS:
    height, width = shape
    header = fits.Header()
    suffix = "-SIP" if sip else ""
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN" + suffix, "DEC--TAN" + suffix
    header["CRVAL1"], header["CRVAL2"] = ra % 360.0, dec
    header["CRPIX1"], header["CRPIX2"] = (width + 1) / 2.0, (height + 1) / 2.0
    theta = np.radians(rotation_deg)
    scale = scale_arcsec / 3600.0
    header["CD1_1"], header["CD1_2"] = -scale * np.cos(theta), scale * np.sin(theta)
    header["CD2_1"], header["CD2_2"] = scale * np.sin(theta), scale * np.cos(theta)
    if sip:
        header["A_ORDER"] = header["B_ORDER"] = 2
        for key, value in sip.items():
            header[key] = value
    wcs = WCS(header)
    wcs.pixel_shape = (width, height)
    return wcs


def star_field(shape: tuple[int, int], n_stars: int, seed: int, channels: int = 3) -> np.ndarray:
    """Sky + Gaussian stars (FWHM ≈ 3.5 px) + a little noise, (C, H, W) float32."""
    rng = np.random.default_rng(seed)
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.full(shape, 200.0)
    for x, y, flux in zip(rng.uniform(0, width, n_stars), rng.uniform(0, height, n_stars), rng.uniform(500, 5000, n_stars)):
        image += flux / (2 * np.pi * 1.5**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    colour = np.array([1.0, 0.8, 0.6])[:channels, None, None]
    return (image[None] * colour + rng.normal(0, 2.0, (channels, *shape))).astype(np.float32)


def canvas_for(frame: WCS, offset_deg: float = 0.3, shape: tuple[int, int] = SHAPE) -> Canvas:
    """A north-up canvas whose tangent point is off the frame, cut to the frame's box."""
    ra, dec = frame.wcs.crval
    neighbour = frame_wcs(ra + offset_deg, dec + offset_deg / 2, shape=shape)
    canvas = build_canvas([frame, neighbour], [shape, shape])
    y0, y1, x0, x1 = frame_bbox_on_canvas(frame, shape, canvas, margin=3)
    return crop_canvas(canvas, (slice(y0, y1), slice(x0, x1)))


def reference(data: np.ndarray, frame: WCS, canvas: Canvas, order: str) -> np.ndarray:
    ref, _ = reproject_interp((data, frame), canvas.wcs, shape_out=(data.shape[0], *canvas.shape), order=order)
    return ref


def interior(footprint: np.ndarray, reference_values: np.ndarray, width_px: int = 3) -> np.ndarray:
    both = (footprint > 0) & np.all(np.isfinite(reference_values), axis=0)
    return binary_erosion(both, iterations=width_px)


# --------------------------------------------------------------------------------------
# (1) agreement with reproject_interp
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sip", [None, SIP], ids=["TAN", "TAN-SIP"])
def test_bilinear_agrees_with_reproject_interp(sip: dict[str, float] | None) -> None:
    frame = frame_wcs(83.8, -5.4, rotation_deg=10.0, sip=sip)
    data = star_field(SHAPE, 40, seed=3)
    canvas = canvas_for(frame)
    ref_full = reference(data, frame, canvas, "bilinear")
    data_range = float(data.max() - data.min())
    # Bilinear values at two points δ apart differ by at most δ·(max |Δx| + max |Δy|).
    steepest = float(np.abs(np.diff(data, axis=2)).max() + np.abs(np.diff(data, axis=1)).max())
    for tol_px in (0.01, 0.002):
        bbox, out, footprint = reproject_frame(data, frame, canvas.wcs, canvas.shape, tol_px=tol_px)
        y0, y1, x0, x1 = bbox
        ref = ref_full[:, y0:y1, x0:x1]
        inner = interior(footprint, ref)
        assert inner.sum() > 0.6 * SHAPE[0] * SHAPE[1]
        difference = np.abs(out - ref)[:, inner].max()
        assert difference <= tol_px * steepest + 1e-5 * data_range
        if tol_px <= 0.002:
            # Stars of FWHM 3.5 px are steep (Δ ≈ 0.4·peak per px): 1e-3 of the range
            # needs the mapping within ≈ 2.5e-3 px.
            assert difference <= 1e-3 * data_range
        # Footprints match the oracle's coverage except along the outline itself.
        disagree = (footprint > 0) != np.all(np.isfinite(ref), axis=0)
        assert disagree.sum() <= 0.002 * footprint.size
        assert out.dtype == np.float32 and footprint.dtype == np.float32
        assert np.all(np.isnan(out[:, footprint == 0])) and np.all(np.isfinite(out[:, footprint == 1]))


@pytest.mark.parametrize("tol_px, flux_rel", [(0.01, 2e-3), (0.001, 2e-4)])
def test_star_lands_at_its_sky_position(tol_px: float, flux_rel: float) -> None:
    frame = frame_wcs(120.0, 30.0, rotation_deg=25.0, sip=SIP)
    height, width = SHAPE
    yy, xx = np.mgrid[0:height, 0:width]
    star_x, star_y = 141.3, 77.8
    data = (np.exp(-((xx - star_x) ** 2 + (yy - star_y) ** 2) / (2 * 2.0**2)) * 1000)[None].astype(np.float32)
    canvas = canvas_for(frame)
    (y0, _, x0, _), out, _ = reproject_frame(data, frame, canvas.wcs, canvas.shape, tol_px=tol_px)
    ra, dec = frame.all_pix2world([star_x], [star_y], 0)
    expected_x, expected_y = canvas.wcs.all_world2pix(ra, dec, 0)
    image = np.nan_to_num(out[0])
    cy, cx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    total = image.sum()
    assert (cx * image).sum() / total + x0 == pytest.approx(expected_x[0], abs=0.02)
    assert (cy * image).sum() / total + y0 == pytest.approx(expected_y[0], abs=0.02)
    # Flux scales with the pixel-area ratio (SIP makes the frame's pixels slightly uneven).
    # The bilinear map's local Jacobian is off by ≈ sqrt(8·tol·f''), hence the tolerance
    # tied to tol_px (this SIP is ≈ 20× stronger than a Seestar's).
    grid_x, grid_y = exact_map(frame, canvas.wcs, expected_x[0] + np.array([0.0, 1.0, 0.0]), expected_y[0] + np.array([0.0, 0.0, 1.0]))
    area_ratio = abs((grid_x[1] - grid_x[0]) * (grid_y[2] - grid_y[0]) - (grid_x[2] - grid_x[0]) * (grid_y[1] - grid_y[0]))
    assert total * area_ratio == pytest.approx(data.sum(), rel=flux_rel)


def test_channels_share_one_mapping() -> None:
    frame = frame_wcs(10.0, 40.0, rotation_deg=-8.0, sip=SIP)
    mono = star_field(SHAPE, 20, seed=5, channels=1)
    data = np.concatenate([mono, 2.0 * mono, mono - 50.0])
    canvas = canvas_for(frame)
    _, out, footprint = reproject_frame(data, frame, canvas.wcs, canvas.shape)
    _, out_mono, _ = reproject_frame(mono, frame, canvas.wcs, canvas.shape)
    valid = footprint > 0
    np.testing.assert_allclose(out[0][valid], out_mono[0][valid], rtol=0, atol=0)
    np.testing.assert_allclose(out[1][valid], 2.0 * out[0][valid], rtol=1e-5)
    np.testing.assert_allclose(out[2][valid], out[0][valid] - 50.0, atol=1e-3)


# --------------------------------------------------------------------------------------
# (2) control grid accuracy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tol_px", [0.01, 0.001])
def test_control_grid_matches_astropy_at_random_points(tol_px: float) -> None:
    strong_sip = {key: 8 * value for key, value in SIP.items()}  # ≈ 8 px at the corners
    frame = frame_wcs(200.0, 60.0, rotation_deg=33.0, sip=strong_sip, shape=(400, 600))
    canvas = canvas_for(frame, shape=(400, 600))
    bbox = frame_bbox_on_canvas(frame, (400, 600), canvas)
    grid = compute_control_grid(frame, (400, 600), canvas.wcs, bbox, tol_px=tol_px)
    y0, y1, x0, x1 = bbox
    # The grid reaches the far edge of the box.
    assert (grid.src_x.shape[0] - 1) * grid.step >= y1 - y0 - 1
    assert (grid.src_x.shape[1] - 1) * grid.step >= x1 - x0 - 1
    assert grid.max_error_px < tol_px
    map_x, map_y = expand_control_grid(grid)  # float32, as used for sampling
    rng = np.random.default_rng(7)
    rows = rng.integers(0, y1 - y0, 2000)
    cols = rng.integers(0, x1 - x0, 2000)
    exact_x, exact_y = exact_map(frame, canvas.wcs, cols + x0, rows + y0)
    error = np.hypot(map_x[rows, cols] - exact_x, map_y[rows, cols] - exact_y)
    assert error.max() < tol_px
    # astropy's own inverse agrees with ours (the oracle is not circular).
    ra, dec = canvas.wcs.all_pix2world(cols[:20] + x0, rows[:20] + y0, 0)
    forward_x, forward_y = frame.all_pix2world(exact_x[:20], exact_y[:20], 0)
    np.testing.assert_allclose(np.vstack([forward_x, forward_y]), np.vstack([ra, dec]), atol=1e-9)


def test_grid_refines_only_as_much_as_needed() -> None:
    frame = frame_wcs(50.0, 20.0, rotation_deg=10.0)
    canvas = canvas_for(frame)
    bbox = frame_bbox_on_canvas(frame, SHAPE, canvas)
    coarse = compute_control_grid(frame, SHAPE, canvas.wcs, bbox, tol_px=0.01)
    fine = compute_control_grid(frame, SHAPE, canvas.wcs, bbox, tol_px=1e-5)
    assert coarse.step == 64  # TAN → TAN over a small field is nearly affine
    assert fine.step < coarse.step and fine.max_error_px < 1e-5


def test_float32_map_is_within_a_small_fraction_of_the_tolerance() -> None:
    frame = frame_wcs(10.0, 10.0, rotation_deg=10.0, sip=SIP, shape=(1080, 1920))
    canvas = canvas_for(frame, shape=(1080, 1920))
    grid = compute_control_grid(frame, (1080, 1920), canvas.wcs, (0, canvas.shape[0], 0, canvas.shape[1]))
    map32 = expand_control_grid(grid)
    map64 = expand_control_grid(grid, dtype=np.float64)
    assert map32[0].dtype == np.float32
    assert max(np.abs(map32[0] - map64[0]).max(), np.abs(map32[1] - map64[1]).max()) < 1e-3


# --------------------------------------------------------------------------------------
# (3) NaN handling and edges
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, reach", [("bilinear", 1), ("bicubic", 2), ("lanczos3", 3)])
def test_nan_never_bleeds_beyond_the_kernel_support(method: str, reach: int) -> None:
    data = star_field((40, 50), 5, seed=2, channels=2)
    bad_y, bad_x = 20, 25
    data[1, bad_y, bad_x] = np.nan  # one channel only: the pixel is invalid for all channels
    yy, xx = np.mgrid[0:40, 0:50].astype(np.float32)
    map_x, map_y = xx + 0.3, yy - 0.4
    out, footprint = sample(data, map_x, map_y, method=method)
    touches = (np.abs(map_x - bad_x) < reach) & (np.abs(map_y - bad_y) < reach)
    inside = (map_x <= 49.5) & (map_y >= -0.5)
    assert touches.sum() == (2 * reach) ** 2
    np.testing.assert_array_equal(footprint == 0, touches | ~inside)
    assert np.all(np.isnan(out[:, touches]))
    assert np.all(np.isfinite(out[:, ~touches & inside]))


def test_nan_at_an_exact_pixel_position_stays_one_pixel() -> None:
    data = np.ones((1, 10, 12), dtype=np.float32)
    data[0, 4, 6] = np.nan
    yy, xx = np.mgrid[0:10, 0:12].astype(np.float32)
    for method in ("bilinear", "bicubic", "lanczos3"):
        out, footprint = sample(data, xx, yy, method=method)
        assert np.isnan(out[0]).sum() == 1 and np.isnan(out[0, 4, 6])
        assert footprint.sum() == 10 * 12 - 1


def test_outside_the_frame_is_nan_with_reprojects_half_pixel_rule() -> None:
    data = np.arange(4 * 5, dtype=np.float32).reshape(1, 4, 5)
    map_x = np.array([[-0.6, -0.5, -0.2, 2.5, 4.2, 4.5, 4.6]], dtype=np.float32)
    map_y = np.full_like(map_x, 1.0)
    out, footprint = sample(data, map_x, map_y)
    np.testing.assert_array_equal(footprint[0], [0, 1, 1, 1, 1, 1, 0])
    # Outer half of a border pixel: the border pixel's value (clamped like reproject).
    np.testing.assert_allclose(out[0, 0, 1:6], [5.0, 5.0, 7.5, 9.0, 9.0])
    assert np.isnan(out[0, 0, 0]) and np.isnan(out[0, 0, 6])


def test_frame_off_the_canvas_returns_none() -> None:
    frame = frame_wcs(10.0, 10.0)
    canvas = canvas_for(frame)
    assert reproject_frame(np.ones((1, *SHAPE), np.float32), frame_wcs(20.0, 10.0), canvas.wcs, canvas.shape) is None


# --------------------------------------------------------------------------------------
# (4) identity and (5) higher-order kernels
# --------------------------------------------------------------------------------------


def smooth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 100.0 + 50.0 * np.sin(x / 9.0) * np.cos(y / 7.0)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "lanczos3"])
def test_identity_wcs_leaves_the_image_unchanged(method: str) -> None:
    frame = frame_wcs(150.0, -30.0, rotation_deg=17.0, sip=SIP)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    data = np.stack([smooth(xx, yy), 2 * smooth(yy, xx)]).astype(np.float32)
    bbox, out, footprint = reproject_frame(data, frame, frame, SHAPE, method=method)
    assert bbox == (0, SHAPE[0], 0, SHAPE[1])
    assert footprint.min() == 1.0
    np.testing.assert_allclose(out, data, rtol=0, atol=2e-3)  # 0.01 px × max gradient (≈ 6/px)


@pytest.mark.parametrize("method, tolerance", [("bilinear", 0.25), ("bicubic", 5e-3), ("lanczos3", 0.2)])
def test_kernels_interpolate_a_smooth_function(method: str, tolerance: float) -> None:
    frame = frame_wcs(30.0, 50.0, rotation_deg=7.0, sip=SIP)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    data = smooth(xx, yy)[None].astype(np.float32)
    canvas = canvas_for(frame, offset_deg=0.1)
    # A near-exact map (1e-4 px) so that only the kernel's own error is measured.
    bbox, out, footprint = reproject_frame(data, frame, canvas.wcs, canvas.shape, method=method, tol_px=1e-4)
    y0, y1, x0, x1 = bbox
    rows, cols = np.mgrid[y0:y1, x0:x1]
    src_x, src_y = exact_map(frame, canvas.wcs, cols, rows)
    away = (src_x > 3) & (src_x < SHAPE[1] - 4) & (src_y > 3) & (src_y < SHAPE[0] - 4)
    error = np.abs(out[0] - smooth(src_x, src_y))[away]
    # Amplitude 50: bilinear's curvature error ≈ 0.2, Keys cubic is third order,
    # Lanczos-3 is limited by its non-unit moments (a few 1e-3 of the amplitude).
    assert error.max() < tolerance
    if method != "bilinear":
        # reproject's bicubic is a cubic B-spline interpolant: a different kernel, so loosely.
        ref = reference(data, frame, canvas, "bicubic")[0, y0:y1, x0:x1]
        assert np.abs(out[0] - ref)[away].max() < max(tolerance, 0.1)


def test_sharper_kernels_keep_more_star_peak() -> None:
    frame = frame_wcs(30.0, 50.0, rotation_deg=45.0)
    data = star_field(SHAPE, 30, seed=11, channels=1)
    canvas = canvas_for(frame, offset_deg=0.1)
    peaks = {}
    for method in ("bilinear", "bicubic", "lanczos3"):
        _, out, _ = reproject_frame(data, frame, canvas.wcs, canvas.shape, method=method)
        peaks[method] = np.nanpercentile(out, 99.9)
    assert peaks["bilinear"] < peaks["bicubic"] <= peaks["lanczos3"] * 1.01


# --------------------------------------------------------------------------------------
# (6) canvas across RA = 0
# --------------------------------------------------------------------------------------


def test_reprojection_onto_a_canvas_across_ra_zero() -> None:
    frames = [frame_wcs(359.97, 5.0, rotation_deg=4.0, sip=SIP), frame_wcs(0.03, 5.02, rotation_deg=-6.0)]
    canvas = build_canvas(frames, [SHAPE, SHAPE])
    assert canvas.shape[1] < 2 * SHAPE[1]
    data = star_field(SHAPE, 30, seed=13, channels=1)
    for frame in frames:
        bbox, out, footprint = reproject_frame(data, frame, canvas.wcs, canvas.shape, tol_px=0.002)
        y0, y1, x0, x1 = bbox
        ref = reference(data, frame, canvas, "bilinear")[:, y0:y1, x0:x1]
        inner = interior(footprint, ref)
        assert inner.sum() > 0.8 * SHAPE[0] * SHAPE[1]
        assert np.abs(out - ref)[:, inner].max() <= 1e-3 * float(data.max() - data.min())


def test_array_module_path_matches_numpy() -> None:
    """The code path taken for another array module (CuPy on a GPU) computes the same thing."""
    import types

    other_xp = types.ModuleType("numpy_as_device")
    other_xp.__dict__.update({name: getattr(np, name) for name in dir(np) if not name.startswith("__")})
    frame = frame_wcs(240.0, -60.0, rotation_deg=-20.0, sip=SIP)
    data = star_field(SHAPE, 20, seed=17, channels=3)
    data[1, 50, 60] = np.nan
    canvas = canvas_for(frame)
    for method in ("bilinear", "bicubic"):
        bbox, out, footprint = reproject_frame(data, frame, canvas.wcs, canvas.shape, method=method)
        bbox_xp, out_xp, footprint_xp = reproject_frame(data, frame, canvas.wcs, canvas.shape, method=method, xp=other_xp)
        assert bbox_xp == bbox
        np.testing.assert_array_equal(footprint_xp, footprint)
        np.testing.assert_allclose(out_xp, out, rtol=1e-6, equal_nan=True)

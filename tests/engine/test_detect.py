"""The frame measurement's own detection (``engine.detect``) against ``sep``, and one batch of
frames against the same frames one by one, on the host and (``-m gpu``) on CuPy.

``sep`` is the oracle: its positions, fluxes and second moments are what the measurement was
first built on; ours must agree on isolated stars to far below what the metrics resolve.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from napari_zemosaic.engine import detect
from napari_zemosaic.engine import quality as q
from napari_zemosaic.engine.demo import DemoSpec, generate_demo
from napari_zemosaic.engine.frames import read_frame_info

sep = pytest.importorskip("sep")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Four half-size demo frames (raw CFA planes) of one pointing, with a trail and hot pixels."""
    truth = generate_demo(tmp_path_factory.mktemp("detect"), DemoSpec(panels=(1, 1), frames_per_panel=4, scale=0.5, seed=3))
    infos = [read_frame_info(path) for path in truth.frame_paths]
    return truth, infos, [q.load_measurement_data(info) for info in infos]


def _residual(plane: np.ndarray) -> tuple[np.ndarray, float]:
    binned = q._bin2x2(plane)
    q._subtract_background(binned[None], None, np)
    return binned, q._sky_noise(binned, None)


def test_sources_sit_where_seps_do_with_its_fluxes_and_moments(frames):
    _, _, planes = frames
    for plane in planes:
        residual, noise = _residual(plane)
        ours = detect.detect_sources(residual[None], np.array([noise]), q.DETECT_SIGMA, q.DETECT_MIN_AREA)
        theirs = sep.extract(residual, q.DETECT_SIGMA, err=noise, minarea=q.DETECT_MIN_AREA, deblend_nthresh=1)
        assert abs(ours.size - theirs.size) <= max(2, 0.03 * theirs.size)
        distance, match = cKDTree(np.column_stack([theirs["x"], theirs["y"]])).query(np.column_stack([ours["x"], ours["y"]]))
        matched = distance < 0.5
        assert matched.mean() >= 0.97
        bright = matched & (ours["flux"] > np.percentile(ours["flux"], 50))
        assert np.median(distance[bright]) < 0.03 and np.percentile(distance[bright], 90) < 0.1  # binned px
        pair = theirs[match[matched]]
        assert np.median(np.abs(ours["flux"][matched] / pair["flux"] - 1)) < 1e-3
        for name in ("x2", "y2", "a", "b"):
            assert np.median(np.abs(ours[name][matched] / pair[name] - 1)) < 1e-4, name
        assert np.mean(ours["npix"][matched] == pair["npix"]) >= 0.95


def test_aperture_sums_equal_seps_exact_overlap(frames):
    _, _, planes = frames
    residual, noise = _residual(planes[0])
    objects = detect.detect_sources(residual[None], np.array([noise]), q.DETECT_SIGMA, q.DETECT_MIN_AREA)
    for radius in (2.0, 3.3):
        flux, usable = detect.aperture_sums(residual[None], np.zeros(objects.size, dtype=np.int64), objects["x"], objects["y"], radius)
        reference, _, flag = sep.sum_circle(residual, objects["x"], objects["y"], radius, subpix=0)
        both = usable & (flag == 0) & (reference > 50 * noise)
        assert both.sum() >= 20
        assert np.median(np.abs(flux[both] / reference[both] - 1)) < 2e-3
        assert np.percentile(np.abs(flux[both] / reference[both] - 1), 90) < 1e-2
        edge = (objects["x"] < radius) | (objects["y"] < radius)
        assert not np.any(usable & edge)


def test_mesh_background_level_and_noise_follow_seps(frames):
    _, _, planes = frames
    for plane in planes:
        binned = q._bin2x2(plane)
        model = sep.Background(binned, bw=32, bh=32, fw=3, fh=3)
        level, noise = detect.subtract_mesh_background(binned.copy()[None], 32)
        assert level[0] == pytest.approx(model.globalback, rel=2e-3)
        assert noise[0] == pytest.approx(model.globalrms, rel=0.05)
        residual = binned.copy()[None]
        detect.subtract_mesh_background(residual, 32)
        sky = binned - residual[0]
        # The same smooth sky as sep's model to a small fraction of the pixel noise (the two
        # mode estimators and splines differ a little; neither moves a detection threshold).
        assert np.median(np.abs(sky - model.back())) < 0.15 * model.globalrms


def test_a_gradient_and_masked_pixels_leave_a_flat_residual():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:300, 0:500]
    sky = 1000.0 + 0.8 * xx + 0.3 * yy + 2e-3 * (xx - 250) ** 2
    image = (sky + rng.normal(0, 10, sky.shape)).astype(np.float32)
    invalid = np.zeros(image.shape, dtype=bool)
    invalid[:, :60] = True  # a blank band, as a frame's edge after a shift
    image[invalid] = 0.0
    detect.subtract_mesh_background(image[None], 32, invalid[None])
    inner = image[40:-40, 100:-40]  # away from the band and the image's border meshes
    assert abs(float(np.median(inner))) < 1.0
    assert float(np.std(inner)) < 11.0
    flat = (1000.0 + rng.normal(0, 10, sky.shape)).astype(np.float32)
    flat[invalid] = 0.0
    level, noise = detect.subtract_mesh_background(flat[None], 32, invalid[None])
    assert level[0] == pytest.approx(1000.0, abs=0.5) and noise[0] == pytest.approx(10.0, rel=0.05)


def test_a_batch_measures_as_its_frames_one_by_one(frames):
    truth, infos, planes = frames
    batch = np.stack(planes)
    pattern = infos[0].bayer_pattern
    _, channels, parity = q._measurement_plane(planes[0], pattern)
    metrics = [q.FrameMetrics(path=str(info.path)) for info in infos]
    q.measure_planes(batch, channels, parity, metrics)
    for info, plane, got in zip(infos, planes, metrics):
        alone = q.measure_frame(plane, info, pixel_scale_arcsec=None)
        assert got.reason == alone.reason and got.n_stars == alone.n_stars and got.n_measured == alone.n_measured
        for name in ("fwhm_px", "elongation", "background", "noise", "star_flux", "trail_length_px", "saturated_fraction"):
            assert getattr(got, name) == pytest.approx(getattr(alone, name), rel=1e-6, nan_ok=True), name
        assert np.allclose(got.stars.flux, alone.stars.flux, rtol=1e-6)


def test_a_batch_with_an_unmeasurable_frame_measures_the_others(frames):
    _, infos, planes = frames
    _, channels, parity = q._measurement_plane(planes[0], infos[0].bayer_pattern)
    flat = np.full_like(planes[0], 900)
    batch = np.stack([planes[0], flat, planes[1]])
    metrics = [q.FrameMetrics() for _ in range(3)]
    q.measure_planes(batch, channels, parity, metrics)
    assert metrics[1].reason == q.REASON_FLAT
    assert metrics[0].reason is None and metrics[2].reason is None
    assert math.isfinite(metrics[0].fwhm_px) and math.isfinite(metrics[2].fwhm_px)


@pytest.mark.gpu
def test_the_device_batch_measures_as_the_host(frames):
    """CuPy against NumPy on the same planes: the same detections and stars; metrics equal to
    float rounding (sums in another order, the spline's matrix products, FMA)."""
    cp = pytest.importorskip("cupy")
    _, infos, planes = frames
    _, channels, parity = q._measurement_plane(planes[0], infos[0].bayer_pattern)
    host = [q.FrameMetrics() for _ in planes]
    device = [q.FrameMetrics() for _ in planes]
    q.measure_planes(np.stack(planes), channels, parity, host)
    q.measure_planes(cp.asarray(np.stack(planes)), channels, parity, device, xp=cp)
    for got, expected in zip(device, host):
        assert got.reason == expected.reason and got.n_stars == expected.n_stars
        assert abs(got.n_measured - expected.n_measured) <= 1
        for name in ("fwhm_px", "elongation", "star_flux"):
            assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-4), name
        for name in ("background", "noise", "saturated_fraction"):
            assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-5), name
        assert got.trail_flag == expected.trail_flag


@pytest.mark.gpu
def test_the_fused_adaptive_moments_iterate_as_the_array_code():
    """gpu.fused_adaptive_moments (one block per star) against quality._adaptive_moments on
    NumPy: elliptical Gaussian stars on a CFA-like lattice, noise, a dead stamp, a star off centre."""
    cp = pytest.importorskip("cupy")
    from napari_zemosaic.engine import gpu

    rng = np.random.default_rng(8)
    half = 9
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    dy, dx = (grid.ravel() for grid in np.meshgrid(offsets, offsets, indexing="ij"))
    n = 300
    sxx, syy = rng.uniform(0.8, 4.0, n), rng.uniform(0.8, 4.0, n)
    sxy = rng.uniform(-0.5, 0.5, n) * np.sqrt(sxx * syy)
    cx, cy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    ox, oy = dx[None, :] - cx[:, None], dy[None, :] - cy[:, None]
    det = sxx * syy - sxy**2
    form = (syy[:, None] * ox**2 - 2 * sxy[:, None] * ox * oy + sxx[:, None] * oy**2) / det[:, None]
    values = 1000.0 * np.exp(-0.5 * form) + rng.normal(0, 3.0, form.shape)
    values[7] = 0.0  # nothing to weigh: never converges
    valid = (((dx + dy).astype(int) & 1) == 0)[None, :].repeat(n, axis=0).astype(np.float64)
    start = np.column_stack([cx + 0.3, cy - 0.2, sxx * 1.5, syy * 0.7, sxy * 0.5])
    expected = q._adaptive_moments(values, valid, dx, dy, start, np)
    got = [array.get() for array in q._adaptive_moments(cp.asarray(values), cp.asarray(valid), dx, dy, cp.asarray(start), cp)]
    # The float64 sums run in another order: a star may meet the convergence test (1e-3) one
    # iteration sooner or later, so the moments agree to that test's size, not to the bit.
    both = got[3] & expected[3]
    assert both.sum() >= 0.99 * expected[3].sum() and expected[3].sum() >= 200 and not got[3][7], (got[3].sum(), expected[3].sum())
    for ours, theirs in zip(got[:3], expected[:3]):
        assert np.allclose(ours[both], theirs[both], rtol=2e-3, atol=1e-6), np.max(np.abs(ours[both] - theirs[both]))
    assert gpu.fused_adaptive_moments(cp.zeros((0, 4), dtype=cp.float32), dx[:4], dy[:4], cp.zeros((0, 5)), 30, 2.0, 1e-3, cp) is None


@pytest.mark.parametrize("length, mesh", [(540, 64), (960, 64), (135, 32), (100, 64), (70, 64), (1000, 250)])
def test_the_spline_matrix_is_scipys_natural_cubic_spline(length, mesh):
    """``scipy.interpolate.CubicSpline`` (natural ends) through the unit values at the mesh
    centres, evaluated at every pixel clipped to the centres: the oracle of the background's
    interpolation, to float32 rounding."""
    from scipy.interpolate import CubicSpline

    n_meshes = -(-length // mesh)
    detect._spline_matrix.cache_clear()
    ours = detect._spline_matrix(length, mesh, n_meshes)
    centres = np.array([(k * mesh + min((k + 1) * mesh, length) - 1) / 2.0 for k in range(n_meshes)])
    positions = np.clip(np.arange(length, dtype=np.float64), centres[0], centres[-1])
    expected = CubicSpline(centres, np.eye(n_meshes), bc_type="natural")(positions) if n_meshes > 1 else np.ones((length, 1))
    assert ours.shape == (length, n_meshes) and ours.dtype == np.float32
    assert np.max(np.abs(ours - expected)) < 1e-6
    assert np.allclose(ours.sum(axis=1), 1.0, atol=1e-5)  # a constant sky stays constant

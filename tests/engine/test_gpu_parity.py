"""CPU/GPU parity of the xp-generic kernels and the real CuPy paths of ``engine.gpu``.

Run on a machine with an NVIDIA GPU and CuPy: ``pytest -m gpu tests/engine/test_gpu_parity.py``.
Never in CI (the ``gpu`` marker is deselected by default; without CuPy the module is skipped).

Tolerances come from ``gpu.PARITY_TOLERANCES`` and are scaled to the data and its noise:
both backends run the same float32 algorithm, so they may differ only by rounding (summation
order, fused multiply-adds on the GPU, 1-2 ulp differences of ``sin``) and, for rejection, by
samples lying exactly on a threshold.

* debayer: |Δ| ≤ 1e-6 × peak of the CFA (pairwise sums scaled by 0.5 / 0.25: only rounding).
* hot pixels: the corrected frames differ (by more than 1e-6 × peak) on at most 1e-4 of the
  pixels: only where a candidate sits exactly on a threshold.
* dense pixel map: ≤ 2 ulp of the coordinate in the map's dtype (the y-interpolation
  ``top + f·(bottom − top)`` may be fused into an FMA on the GPU; float32 spacing is 1.2e-4 px
  at x ≈ 1920).
* sampling (same map on both): |Δ| ≤ 1e-3 σ + 4e-6 × peak — the second term bounds float32
  rounding of up to 36 weighted taps (36 · 2⁻²⁴ · Σ|w| ≈ 3e-6); NaN masks agree on all but
  1e-5 of the pixels.
* map + sampling end to end: the above plus (largest image gradient) × (map tolerance).
* stacking: where the kept counts agree, |Δ| ≤ 1e-2 σ/√N + 1e-5 |value|; a sample exactly on
  a κ threshold may flip on at most 1e-3 of the pixels, moving the mean by at most
  (κ + 1)·σ/(n − 1).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import pytest
from astropy.wcs import WCS

from napari_zemosaic.config import default_config
from napari_zemosaic.engine import gpu
from napari_zemosaic.events import Reporter

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

TOL = gpu.PARITY_TOLERANCES
SKY = 1000.0  # ADU
NOISE_SIGMA = 10.0  # ADU per frame
SEESTAR_SHAPE = (1080, 1920)  # Seestar S50 sub-frame (H, W)
SEESTAR_PATTERN = "GRBG"


@pytest.fixture(scope="module")
def device() -> int:
    ok, reason = gpu.gpu_is_available(0, refresh=True)
    if not ok:
        pytest.skip(f"no usable GPU: {reason}")
    return 0


# ----------------------------------------------------------------------------- synthetic data


def star_field(shape: tuple[int, int], n_stars: int, rng: np.random.Generator, noise: bool = True) -> np.ndarray:
    """Sky + Gaussian stars (FWHM ≈ 3 px, peaks up to 200 σ) + Gaussian noise, float32."""
    height, width = shape
    image = np.full(shape, SKY, dtype=np.float64)
    ys, xs = rng.uniform(8, height - 8, n_stars), rng.uniform(8, width - 8, n_stars)
    peaks = NOISE_SIGMA * 10 ** rng.uniform(0.5, 2.3, n_stars)
    psf_sigma = 1.3
    for y, x, peak in zip(ys, xs, peaks):
        y0, y1, x0, x1 = int(y) - 6, int(y) + 7, int(x) - 6, int(x) + 7
        gy, gx = np.mgrid[y0:y1, x0:x1]
        image[y0:y1, x0:x1] += peak * np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * psf_sigma**2))
    if noise:
        image += rng.normal(0.0, NOISE_SIGMA, shape)
    return image.astype(np.float32)


def seestar_cfa(rng: np.random.Generator, n_hot: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A Seestar-sized GRBG CFA frame with colour-dependent response and isolated hot pixels."""
    cfa = star_field(SEESTAR_SHAPE, 400, rng)
    response = {"R": 0.8, "G": 1.0, "B": 0.6}
    for dy in (0, 1):
        for dx in (0, 1):
            cfa[dy::2, dx::2] *= response[SEESTAR_PATTERN[2 * dy + dx]]
    hot_y = rng.integers(8, SEESTAR_SHAPE[0] - 8, n_hot)
    hot_x = rng.integers(8, SEESTAR_SHAPE[1] - 8, n_hot)
    cfa[hot_y, hot_x] += 60 * NOISE_SIGMA
    return cfa, np.stack([hot_y, hot_x], axis=1)


def tan_wcs(ra: float, dec: float, shape: tuple[int, int], scale_arcsec: float, rotation_deg: float) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    scale = scale_arcsec / 3600.0
    angle = np.deg2rad(rotation_deg)
    wcs.wcs.cd = scale * np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return wcs


RESPONSE = (0.8, 1.0, 0.6)


def stack_cube_with_nans(
    rng: np.random.Generator, n_frames: int = 24, side: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(N, 3, side, side) frames of one scene: partial coverage (NaN), noise, a trail and hot pixels.

    Returns the cube, per-frame weights, the noise-free truth (3, side, side) and the trail pixels.
    """
    scene = star_field((side, side), 40, rng, noise=False)
    truth = np.stack([scene * response for response in RESPONSE]).astype(np.float32)
    cube = np.empty((n_frames, 3, side, side), dtype=np.float32)
    for frame in range(n_frames):
        cube[frame] = truth + rng.normal(0.0, NOISE_SIGMA, (3, side, side))
        # Partial coverage: each frame misses a random band on one side.
        cut = int(rng.integers(0, side // 3))
        if frame % 2:
            cube[frame, :, :, :cut] = np.nan
        else:
            cube[frame, :, :cut, :] = np.nan
    # A satellite trail across one frame and a few hot pixels in others.
    trail = (np.arange(side), np.clip(np.arange(side) // 2 + 40, 0, side - 1))
    cube[3, :, trail[0], trail[1]] += 50 * NOISE_SIGMA
    for frame in (5, 11, 17):
        cube[frame, :, rng.integers(0, side, 30), rng.integers(0, side, 30)] += 80 * NOISE_SIGMA
    weights = rng.uniform(0.5, 1.5, n_frames).astype(np.float32)
    return cube, weights, truth, trail


# ----------------------------------------------------------------------------- the gpu module itself


def test_gpu_probe_succeeds_on_a_gpu_machine() -> None:
    ok, reason = gpu.gpu_is_available(0, refresh=True)
    assert ok, reason
    assert reason == ""


def test_memory_info_and_sufficiency_on_the_device(device: int) -> None:
    gpu.ensure_cupy_pool_initialized(device)
    info = gpu.gpu_memory_info(device)
    assert info is not None and info["name"]
    assert 0 < info["free_bytes"] <= info["total_bytes"]
    assert info["cuda_runtime_version"].count(".") == 1
    live = gpu.gpu_free_memory(device)
    assert live["total_bytes"] == info["total_bytes"] and 0 < live["free_bytes"] <= live["total_bytes"]
    assert gpu.gpu_memory_sufficient(64 * 2**20, 0.8, device)
    assert not gpu.gpu_memory_sufficient(2 * info["total_bytes"], 1.0, device)


def test_pool_initialisation_is_idempotent_across_threads(device: int) -> None:
    threads = [threading.Thread(target=gpu.ensure_cupy_pool_initialized, args=(device,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert device in gpu._pools_ready


def test_free_pools_returns_cached_blocks(device: int) -> None:
    pool = cp.get_default_memory_pool()
    with cp.cuda.Device(device):
        block = cp.empty(64 * 2**20, dtype=cp.uint8)
        del block
        assert pool.free_bytes() >= 64 * 2**20
        gpu.free_cupy_memory_pools(device)
        # Blocks split off a chunk still partly in use stay in the pool; the 64 MiB one is gone.
        assert pool.free_bytes() < 64 * 2**20


def test_policy_on_a_real_device_retries_a_real_out_of_memory(device: int) -> None:
    reporter = Reporter()
    policy = gpu.ComputePolicy.from_config(default_config(), reporter, env={})
    assert policy.xp_for("stack") is cp
    policy.summary_start()
    assert reporter.log_events[0].key == "gpu_summary_device"
    free = gpu.gpu_memory_info(device)["free_bytes"]
    seen: list[float] = []

    def gpu_fn(xp: Any, chunk_scale: float) -> float:
        seen.append(chunk_scale)
        # 1.6 × free at scale 1 cannot be allocated; 0.8 × free at scale 0.5 can.
        block = xp.ones(int(1.6 * free * chunk_scale) // 4, dtype=xp.float32)
        return float(block[:1024].sum())

    assert policy.run_stage("stack", gpu_fn, lambda xp: -1.0) == 1024.0
    assert seen == [1.0, 0.5]
    assert "gpu_info_oom_retry" in [event.key for event in reporter.log_events]
    policy.end_stage("stack")
    assert cp.get_default_memory_pool().free_bytes() < 64 * 2**20  # the big block went back
    report = policy.summary_end()
    assert report["backend_by_stage"]["stack"] == "gpu"
    assert report["gpu"]["oom_retries_by_stage"]["stack"] == 1


def test_host_device_round_trip(device: int) -> None:
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    on_device = gpu.to_device(data, cp)
    assert isinstance(on_device, cp.ndarray)
    back = gpu.to_host(on_device)
    assert isinstance(back, np.ndarray) and np.array_equal(back, data)


# ----------------------------------------------------------------------------- kernel parity


def check_debayer_parity(xp_gpu: Any) -> None:
    debayer = pytest.importorskip("napari_zemosaic.engine.debayer")
    cfa, _ = seestar_cfa(np.random.default_rng(10))
    cpu = debayer.debayer_bilinear(cfa, SEESTAR_PATTERN, np)
    gpu_rgb = gpu.to_host(debayer.debayer_bilinear(xp_gpu.asarray(cfa), SEESTAR_PATTERN, xp_gpu))
    assert gpu_rgb.shape == cpu.shape == (3,) + SEESTAR_SHAPE and gpu_rgb.dtype == np.float32
    assert np.max(np.abs(gpu_rgb - cpu)) <= TOL["debayer"]["atol_of_peak"] * np.max(np.abs(cfa))


def check_hot_pixel_parity(xp_gpu: Any) -> None:
    debayer = pytest.importorskip("napari_zemosaic.engine.debayer")
    cfa, hot = seestar_cfa(np.random.default_rng(11))
    cpu, n_cpu = debayer.correct_hot_pixels(cfa, SEESTAR_PATTERN, 8.0, np)
    corrected, n_gpu = debayer.correct_hot_pixels(xp_gpu.asarray(cfa), SEESTAR_PATTERN, 8.0, xp_gpu)
    corrected = gpu.to_host(corrected)
    tol = TOL["hot_pixels"]
    differs = np.abs(corrected - cpu) > tol["atol_of_peak"] * np.max(np.abs(cfa))
    assert differs.mean() <= tol["mask_mismatch_fraction"]
    assert abs(n_gpu - n_cpu) <= tol["mask_mismatch_fraction"] * cfa.size
    # The science: the injected hot pixels are brought back to the local level on the GPU too.
    residual = corrected[hot[:, 0], hot[:, 1]] - cfa[hot[:, 0], hot[:, 1]]
    assert np.mean(residual < -30 * NOISE_SIGMA) >= 0.9


def _reprojection_case() -> tuple[np.ndarray, Any, WCS, WCS, tuple[int, int]]:
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    rng = np.random.default_rng(12)
    channels = np.stack([star_field(SEESTAR_SHAPE, 300, rng) * r for r in (0.8, 1.0, 0.6)])
    channels[:, 200:260, 900:1400] = np.nan  # a masked satellite trail
    channels[1, 700:703, 100:103] = np.nan  # one NaN in one channel: invalidates all channels there
    frame_wcs = tan_wcs(150.0, 20.0, SEESTAR_SHAPE, 2.4, 12.0)
    canvas_shape = (1500, 2300)
    canvas_wcs = tan_wcs(150.0, 20.0, canvas_shape, 2.4, 0.0)
    whole_canvas = (0, canvas_shape[0], 0, canvas_shape[1])
    grid = reproject.compute_control_grid(frame_wcs, SEESTAR_SHAPE, canvas_wcs, whole_canvas)
    return channels.astype(np.float32), grid, frame_wcs, canvas_wcs, canvas_shape


def _max_gradient(data: np.ndarray) -> float:
    filled = np.where(np.isfinite(data), data, SKY)
    gy, gx = np.gradient(filled, axis=(1, 2))
    return float(np.max(np.hypot(gx, gy)))


def check_control_grid_parity(xp_gpu: Any) -> None:
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    _, grid, _, _, canvas_shape = _reprojection_case()
    for dtype in (np.float32, np.float64):
        cpu_x, cpu_y = reproject.expand_control_grid(grid, np, dtype=dtype)
        gpu_x, gpu_y = (gpu.to_host(a) for a in reproject.expand_control_grid(grid, xp_gpu, dtype=dtype))
        assert cpu_x.shape == canvas_shape and gpu_x.dtype == dtype
        for cpu_map, gpu_map in ((cpu_x, gpu_x), (cpu_y, gpu_y)):
            allowed = TOL["control_grid"]["ulps"] * np.spacing(np.abs(cpu_map).astype(dtype))
            assert np.all(np.abs(gpu_map - cpu_map) <= allowed)
        # The control rows interpolated along x (float64, then cast) are the host's to the bit.
        host_rows, device_rows = reproject._MapExpander(grid, np, dtype), reproject._MapExpander(grid, xp_gpu, dtype)
        np.testing.assert_array_equal(gpu.to_host(device_rows.rows_x), host_rows.rows_x)
        np.testing.assert_array_equal(gpu.to_host(device_rows.rows_y), host_rows.rows_y)


def check_sample_parity(xp_gpu: Any) -> None:
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    data, grid, _, _, _ = _reprojection_case()
    map_x, map_y = reproject.expand_control_grid(grid, np)
    tol = TOL["sample"]
    peak = float(np.nanmax(np.abs(data)))
    for method in reproject.METHODS:
        cpu_out, cpu_fp = reproject.sample(data, map_x, map_y, method, np)
        gpu_out, gpu_fp = reproject.sample(
            xp_gpu.asarray(data), xp_gpu.asarray(map_x), xp_gpu.asarray(map_y), method, xp_gpu
        )
        gpu_out, gpu_fp = gpu.to_host(gpu_out), gpu.to_host(gpu_fp)
        nan_mismatch = np.isnan(cpu_out) != np.isnan(gpu_out)
        assert nan_mismatch.mean() <= tol["nan_mismatch_fraction"], method
        assert (cpu_fp != gpu_fp).mean() <= tol["nan_mismatch_fraction"], method
        both = np.isfinite(cpu_out) & np.isfinite(gpu_out)
        assert both.mean() > 0.5, method  # the frame covers most of the canvas
        allowed = tol["atol_of_noise"] * NOISE_SIGMA + tol["atol_of_peak"] * peak
        assert np.max(np.abs(gpu_out[both] - cpu_out[both])) <= allowed, method


def check_reprojection_end_to_end_parity(xp_gpu: Any) -> None:
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    data, grid, _, _, _ = _reprojection_case()
    tol = TOL["sample"]
    cpu_x, cpu_y = reproject.expand_control_grid(grid, np)
    cpu_out, _ = reproject.sample(data, cpu_x, cpu_y, "bilinear", np)
    gpu_x, gpu_y = reproject.expand_control_grid(grid, xp_gpu)
    gpu_out = gpu.to_host(reproject.sample(xp_gpu.asarray(data), gpu_x, gpu_y, "bilinear", xp_gpu)[0])
    max_map_error = TOL["control_grid"]["ulps"] * float(np.spacing(np.float32(max(SEESTAR_SHAPE))))
    allowed = (
        tol["atol_of_noise"] * NOISE_SIGMA
        + tol["atol_of_peak"] * float(np.nanmax(np.abs(data)))
        + np.sqrt(2) * max_map_error * _max_gradient(data)
    )
    assert (np.isnan(cpu_out) != np.isnan(gpu_out)).mean() <= TOL["reproject"]["nan_mismatch_fraction"]
    both = np.isfinite(cpu_out) & np.isfinite(gpu_out)
    assert np.max(np.abs(gpu_out[both] - cpu_out[both])) <= allowed


def check_stack_parity(xp_gpu: Any, rejection: str, combine: str) -> None:
    stack = pytest.importorskip("napari_zemosaic.engine.stack")
    cube, weights, truth, trail = stack_cube_with_nans(np.random.default_rng(13))
    params = stack.StackParams(rejection=rejection, combine=combine, kappa_low=3.0, kappa_high=3.0)
    cpu = stack.stack_cube(cube, params, weights=weights, xp=np)
    result = stack.stack_cube(xp_gpu.asarray(cube), params, weights=xp_gpu.asarray(weights), xp=xp_gpu)
    gpu_data, gpu_count = gpu.to_host(result.data), gpu.to_host(result.count)
    gpu_weight = gpu.to_host(result.weight)
    tol = TOL["stack"]

    same_count = np.abs(gpu_count - cpu.count) < 1e-6
    assert 1.0 - same_count.mean() <= tol["flip_fraction"], rejection
    assert (np.isnan(gpu_data) != np.isnan(cpu.data)).mean() <= tol["flip_fraction"], rejection
    finite = np.isfinite(gpu_data) & np.isfinite(cpu.data)
    kept = np.maximum(cpu.count, 1.0)[None]
    stack_noise = NOISE_SIGMA / np.sqrt(kept)
    difference = np.abs(gpu_data - cpu.data)
    close = difference <= tol["atol_of_stack_noise"] * stack_noise + tol["rtol"] * np.abs(cpu.data)
    agree = finite & same_count[None]
    assert np.all(close[agree]), rejection
    flip_bound = (max(params.kappa_low, params.kappa_high) + 1.0) * NOISE_SIGMA / np.maximum(kept - 1.0, 1.0)
    flipped = finite & ~same_count[None]
    assert np.all(difference[flipped] <= np.broadcast_to(flip_bound, difference.shape)[flipped]), rejection
    np.testing.assert_allclose(gpu_weight[same_count], cpu.weight[same_count], rtol=1e-5, atol=1e-6)
    # The science, on the GPU result: the trail (50 σ in one frame) is rejected by every
    # rejection algorithm, and visibly biases the plain mean without rejection.
    on_trail = gpu_data[1][trail] - truth[1][trail]
    sky_trail = np.isfinite(on_trail) & (truth[1][trail] < SKY + 5 * NOISE_SIGMA) & (gpu_count[trail] >= 10)
    trail_noise = NOISE_SIGMA / np.sqrt(gpu_count[trail][sky_trail])
    bias = float(np.mean(on_trail[sky_trail] / trail_noise))  # mean error in stack-noise units
    if rejection == "none":
        assert bias > 3.0
    else:
        assert abs(bias) < 0.5, (rejection, bias)


@pytest.mark.parametrize(
    "case", ["seestar", "nan_patches", "adjacent_hot", "small_odd", "pattern_rggb", "flat_colour", "no_colour"]
)
def test_fused_hot_pixel_kernels_equal_the_numpy_path_to_the_bit(device: int, case: str) -> None:
    """The GPU's fused hot-pixel kernels (gpu.fused_hot_pixel_residuals / fused_median_mad_on_device /
    fused_hot_pixel_noise / fused_hot_pixel_fix) correct exactly the pixels NumPy corrects, with the
    same values; so does CuPy's xp path. Without waiting (``deferred``), the device status says
    whether the plane is final: 0 (the same plane), 1 for a colour without finite pixel (nothing
    corrected, as NumPy), 2 for a flat colour (the host computes its noise: the waiting call)."""
    debayer = pytest.importorskip("napari_zemosaic.engine.debayer")
    rng = np.random.default_rng(21)
    pattern = "RGGB" if case == "pattern_rggb" else SEESTAR_PATTERN
    if case == "small_odd":
        cfa = (SKY + NOISE_SIGMA * rng.standard_normal((37, 53))).astype(np.float32)
        cfa[5, 7] += 80 * NOISE_SIGMA
        cfa[0, 0] += 80 * NOISE_SIGMA  # on the reflected edge
        cfa[36, 52] += 80 * NOISE_SIGMA
    else:
        cfa, _ = seestar_cfa(rng)
        if case == "nan_patches":
            cfa[100:140, 300:420] = np.nan
            cfa[rng.integers(0, SEESTAR_SHAPE[0], 200), rng.integers(0, SEESTAR_SHAPE[1], 200)] = np.nan
        if case == "adjacent_hot":
            for y, x in rng.integers(10, 1000, (40, 2)):
                cfa[y, x] += 70 * NOISE_SIGMA
                cfa[y, x + 1] += 70 * NOISE_SIGMA
        if case == "flat_colour":  # red (GRBG: row 0, odd columns) without spread but for one hot pixel
            cfa[0::2, 1::2] = SKY
            cfa[200, 301] += 80 * NOISE_SIGMA
        if case == "no_colour":  # blue (GRBG: odd rows, even columns) missing
            cfa[1::2, 0::2] = np.nan
    cpu, n_cpu = debayer.correct_hot_pixels(cfa, pattern, 8.0, np)
    checks: list = []
    deferred, n_deferred = debayer.correct_hot_pixels(cp.asarray(cfa), pattern, 8.0, cp, deferred=checks)
    (status,) = checks
    assert n_deferred is None and int(status.get()[0]) == {"flat_colour": 2, "no_colour": 1}.get(case, 0)
    if case != "flat_colour":
        np.testing.assert_array_equal(gpu.to_host(deferred), cpu)
    fused, n_fused = debayer.correct_hot_pixels(cp.asarray(cfa), pattern, 8.0, cp)
    generic, n_generic = debayer.correct_hot_pixels(cp.asarray(cfa), pattern, 8.0, cp, fused=False)
    assert n_fused == n_cpu
    np.testing.assert_array_equal(gpu.to_host(fused), cpu)
    # Not asking for the count (no copy back): the same plane, and None for the count; NumPy
    # ignores the keyword.
    quiet, n_quiet = debayer.correct_hot_pixels(cp.asarray(cfa), pattern, 8.0, cp, count_fixed=False)
    assert n_quiet is None
    np.testing.assert_array_equal(gpu.to_host(quiet), cpu)
    assert debayer.correct_hot_pixels(cfa, pattern, 8.0, np, count_fixed=False)[1] == n_cpu
    assert abs(n_generic - n_cpu) <= TOL["hot_pixels"]["mask_mismatch_fraction"] * cfa.size
    if case not in ("nan_patches", "no_colour"):
        assert n_cpu > 0
    if case == "flat_colour":
        assert cpu[200, 301] == SKY  # the hot pixel of the flat colour, found with the fallback noise
    # The residual sample of the noise estimate, element for element.
    plane = cp.asarray(cfa)
    step = debayer._noise_step(cfa.shape)
    parts = gpu.fused_hot_pixel_residuals(plane, step, cp)
    padded = np.pad(cfa, 2, mode="reflect")
    wanted = []
    for (dy, dx), part in zip(debayer._PHASES, parts):
        def at(oy: int, ox: int, dy: int = dy, dx: int = dx) -> np.ndarray:
            return debayer._phase_view(padded, 2, cfa.shape, dy, dx, oy, ox)[::step, ::step]

        want = (at(0, 0) - debayer.median_of_8([at(oy, ox) for oy, ox in debayer._SAME_COLOUR_OFFSETS], np)).ravel()
        np.testing.assert_array_equal(gpu.to_host(part), want)
        wanted.append(want)
    # Phases grouped (as by colour): each group's samples one after the other, in the group's order.
    grouped = gpu.fused_hot_pixel_residuals(plane, step, cp, [[3, 0], [1], [2]])
    for got, group in zip(grouped, [[3, 0], [1], [2]]):
        np.testing.assert_array_equal(gpu.to_host(got), np.concatenate([wanted[phase] for phase in group]))
    with pytest.raises(ValueError):
        gpu.fused_hot_pixel_residuals(plane, step, cp, [[0, 1], [1, 2]])


def _cfa_case(case: str, seed: int) -> np.ndarray:
    """A Seestar plane with hot pixels; ``flat_colour``/``no_colour`` make the hot-pixel status 2/1."""
    cfa, _ = seestar_cfa(np.random.default_rng(seed))
    if case == "flat_colour":  # red (GRBG: row 0, odd columns) without spread
        cfa[0::2, 1::2] = SKY
    if case == "no_colour":  # blue (GRBG: odd rows, even columns) missing
        cfa[1::2, 0::2] = np.nan
    return cfa


@pytest.mark.parametrize("mode", ["cfa", "cfa_no_hot_pixels", "mono_in_colour"])
def test_captured_corrections_replay_the_kernels_to_the_bit(device: int, mode: str) -> None:
    """P3's corrections and noise of a frame, captured once as a CUDA graph (gpu.capture_work) and
    replayed for other frames written into the same input, give each frame exactly what the
    kernels give it one by one: corrected pixels, noise and hot-pixel status (0, 1 or 2)."""
    from types import SimpleNamespace

    from napari_zemosaic.engine.mosaic_first import corrections_and_noise

    config = {**default_config(), "hot_pixel_correction": mode != "cfa_no_hot_pixels"}
    info = SimpleNamespace(layout="mono" if mode == "mono_in_colour" else "cfa", shape=SEESTAR_SHAPE,
                           bayer_pattern=None if mode == "mono_in_colour" else SEESTAR_PATTERN)
    work = lambda plane: corrections_and_noise(plane, info, config, 3, cp)  # noqa: E731
    planes = [_cfa_case(case, seed) for seed, case in enumerate(["plain", "plain", "flat_colour", "no_colour", "plain"])]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        inputs = cp.asarray(planes[0])
        captured = gpu.capture_work(work, inputs, cp)
        assert isinstance(captured, gpu.CapturedWork), captured
        for plane in planes:
            wanted_data, wanted_noise, wanted_status = work(cp.asarray(plane))
            inputs[...] = cp.asarray(plane)
            data, noise, status = captured.replay(stream)
            stream.synchronize()
            assert data.shape == (3, *SEESTAR_SHAPE)
            np.testing.assert_array_equal(gpu.to_host(data), gpu.to_host(wanted_data))
            np.testing.assert_array_equal(gpu.to_host(noise), gpu.to_host(wanted_noise))
            if mode == "cfa":
                assert int(status.get()[0]) == int(wanted_status.get()[0])
            else:
                assert status is None and wanted_status is None
        if mode == "cfa":  # the statuses the cases were made for, as replayed
            inputs[...] = cp.asarray(planes[2])
            assert int(captured.replay(stream)[2].get()[0]) == 2
            inputs[...] = cp.asarray(planes[3])
            assert int(captured.replay(stream)[2].get()[0]) == 1
        captured.close()


def test_capture_work_declines_work_that_waits_for_the_device(device: int) -> None:
    """A copy to the host inside the work cannot be captured: the reason comes back, the stream
    is left out of capture mode and runs the next work as usual; the legacy stream is declined."""
    stream = cp.cuda.Stream(non_blocking=True)
    values = cp.arange(1000, dtype=cp.float32)
    with stream:
        reason = gpu.capture_work(lambda x: float((x * 2).sum().get()), values, cp)
        assert isinstance(reason, str) and reason
        assert not stream.is_capturing()  # nothing left half-captured
        assert float((values * 2).sum().get()) == 999_000.0
    with cp.cuda.Stream.null:
        assert gpu.capture_work(lambda x: x * 2, values, cp) == "the legacy default stream"


@pytest.mark.parametrize("case", ["stars", "nan_and_inf", "integers", "tiny"])
def test_fused_background_noise_equals_the_numpy_path_to_the_bit(device: int, case: str) -> None:
    """estimate_background_noise on CuPy (gpu.fused_clipped_mad_sigmas: one kernel, no sort)
    returns NumPy's per-channel sigmas exactly."""
    frames = pytest.importorskip("napari_zemosaic.engine.frames")
    rng = np.random.default_rng(31)
    shape = (5, 9) if case == "tiny" else (540, 960)
    if case == "tiny":
        data = (SKY + NOISE_SIGMA * rng.standard_normal((3, *shape))).astype(np.float32)
    else:
        data = np.stack([star_field(shape, 150, rng) * r for r in RESPONSE]).astype(np.float32)
    if case == "nan_and_inf":
        data[:, 40:90, 100:400] = np.nan
        data[1, rng.integers(0, shape[0], 300), rng.integers(0, shape[1], 300)] = np.inf
        data[2, rng.integers(0, shape[0], 300), rng.integers(0, shape[1], 300)] = -np.inf
        data[0] = np.nan  # a channel without any finite value
    if case == "integers":
        data = np.round(data / 7.0).astype(np.float32)  # many exact ties in values and deviations
    for max_samples in (100_000, 5_000):
        cpu = frames.estimate_background_noise(data, np, max_samples)
        fused = gpu.to_host(frames.estimate_background_noise(cp.asarray(data), cp, max_samples))
        np.testing.assert_array_equal(fused, cpu)
        rows = cp.asarray(data.reshape(3, -1))
        sigmas = gpu.to_host(gpu.fused_clipped_mad_sigmas(rows, 3.0, 5, cp))
        want = np.array([frames._clipped_mad_sigma(row, np) for row in data.reshape(3, -1)])
        np.testing.assert_array_equal(sigmas, want)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "uint8"])
def test_raw_pixels_decode_on_the_device_as_on_the_host(device: int, dtype: str, tmp_path: Any) -> None:
    """A reader's RawPixels (big-endian bytes swapped on the GPU) give the host's decoded values."""
    from astropy.io import fits

    from napari_zemosaic.engine.frames import raw_pixel_plan, read_frame_info

    rng = np.random.default_rng(41)
    info_range = {"uint16": (0, 65536), "int16": (-32768, 32768), "uint8": (0, 256)}[dtype]
    data = rng.integers(*info_range, (108, 192)).astype(dtype)
    data.flat[:4] = [info_range[0], info_range[1] - 1, 0, 1]
    path = tmp_path / "frame.fit"
    fits.PrimaryHDU(data).writeto(path)
    plan = raw_pixel_plan(read_frame_info(path))
    assert plan is not None
    host = plan.load(np)
    device_values = plan.load(cp)
    assert device_values.dtype == host.dtype
    np.testing.assert_array_equal(gpu.to_host(device_values), host)
    np.testing.assert_array_equal(host, data)
    # Read ahead into pinned memory by a loader thread, copied asynchronously on a worker stream.
    from concurrent.futures import ThreadPoolExecutor

    from napari_zemosaic.engine.frames import PrefetchedRaw

    with ThreadPoolExecutor(1) as loader:
        prefetched = PrefetchedRaw(plan, loader.submit(plan.read_for_device))
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            values = prefetched.load(cp)
            stream.synchronize()
    np.testing.assert_array_equal(gpu.to_host(values), host)
    # With the float copy the device thread uses (from the decoding kernel for 16-bit values).
    with ThreadPoolExecutor(1) as loader:
        prefetched = PrefetchedRaw(plan, loader.submit(plan.read_for_device))
        values, as_float = prefetched.load(cp, with_float=True)
    assert values.dtype == host.dtype and as_float.dtype == cp.float32 and as_float.shape == host.shape
    np.testing.assert_array_equal(gpu.to_host(values), host)
    np.testing.assert_array_equal(gpu.to_host(as_float), host.astype(np.float32))


def test_device_frames_cut_into_the_pieces_of_the_host_split(device: int) -> None:
    """mosaic_first._cut_device_pieces (views, one sync) keeps exactly the pieces, and values,
    that the host split keeps (any finite value), for frames straddling block corners."""
    from napari_zemosaic.engine.mosaic_first import PieceStore, ReprojectedFrame, _cut_device_pieces, _split_into_blocks

    rng = np.random.default_rng(61)
    side, canvas_shape = 256, (900, 1000)
    for bbox in [(100, 700, 200, 900), (0, 256, 0, 512), (250, 520, 500, 780), (700, 900, 740, 1000)]:
        h, w = bbox[1] - bbox[0], bbox[3] - bbox[2]
        data = rng.normal(size=(3, h, w)).astype(np.float32)
        data[:, : h // 2, : w // 3] = np.nan  # blocks empty in this corner
        data[1, h - 1, w - 1] = np.nan
        data[:, :, -1] = np.nan
        data[2, 0, w // 2] = 1.0 if h > 1 else np.nan  # one channel, one pixel: still a piece
        host = PieceStore(None)
        _split_into_blocks(ReprojectedFrame(0, bbox, data, np.ones(3)), side, host, canvas_shape)
        device_frame = ReprojectedFrame(0, bbox, cp.asarray(data), np.ones(3))
        cut = _cut_device_pieces(device_frame, side, canvas_shape)
        blocks = sorted(host._entries)
        assert [piece[0] for piece in cut] == blocks
        for block, y0, x0, piece in cut:
            (hy0, hx0, host_piece), = [host._entries[block][0]]
            assert (y0, x0) == (hy0, hx0)
            np.testing.assert_array_equal(gpu.to_host(piece), host_piece)


def test_fused_piece_placement_equals_the_numpy_path_to_the_bit(device: int) -> None:
    """mosaic_first.normalised_cube: the GPU's one-kernel-per-piece placement (gpu.fused_place_pieces)
    writes NumPy's values (background plane in float64, float32 difference and gain) everywhere."""
    from napari_zemosaic.engine.mosaic_first import normalised_cube
    from napari_zemosaic.engine.photometry import Normalisation

    rng = np.random.default_rng(51)
    n, channels, box = 7, 3, (1000, 1300, 2000, 2250)
    norm = Normalisation(
        rng.uniform(0.7, 1.4, (n, channels)), rng.normal(0, 30, (n, channels)), rng.normal(0, 0.5, (n, channels, 2)),
        rng.uniform(-50, 200, (n, 2)), 16,
    )
    pieces = []
    for index in range(n):
        height, width = int(rng.integers(20, 300)), int(rng.integers(20, 250))
        top, left = int(rng.integers(box[0], box[1] - 20)), int(rng.integers(box[2], box[3] - 20))
        height, width = min(height, box[1] - top), min(width, box[3] - left)
        big = (SKY + NOISE_SIGMA * rng.standard_normal((channels, height + 9, width + 5))).astype(np.float32)
        big[:, :3, :4] = np.nan
        piece = big[:, 4 : 4 + height, 2 : 2 + width]  # a strided view, as strips crop pieces
        pieces.append((index, top, left, cp.asarray(big)[:, 4 : 4 + height, 2 : 2 + width] if index % 2 else piece))
    host_pieces = [(i, top, left, gpu.to_host(piece)) for i, top, left, piece in pieces]
    cpu = normalised_cube(host_pieces, box, channels, norm, np)
    fused = gpu.to_host(normalised_cube(pieces, box, channels, norm, cp))
    generic = gpu.to_host(normalised_cube(pieces, box, channels, norm, cp, fused=False))
    np.testing.assert_array_equal(fused, cpu)
    finite = np.isfinite(cpu)
    np.testing.assert_allclose(generic[finite], cpu[finite], rtol=1e-6, atol=1e-3)


def _ulp_run(start: float, count: int) -> np.ndarray:
    """``count`` consecutive float32 values from ``start``: keys that differ only in their low bits."""
    first = np.array([start], np.float32).view(np.int32)[0]
    return (first + np.arange(count, dtype=np.int32)).view(np.float32)


def _with_non_finite(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` with NaN, +inf and -inf mixed in at random places (none of them counted)."""
    mixed = np.concatenate([values, np.array([np.nan, np.inf, -np.inf, np.nan, -np.inf], np.float32)])
    return mixed[rng.permutation(mixed.size)].astype(np.float32)


def _median_mad_rows(case: str) -> list[np.ndarray]:
    """Rows for gpu.fused_median_mad, each case aimed at one edge of the radix selection."""
    rng = np.random.default_rng(61)
    f32 = np.float32
    if case == "mixed":
        return [
            rng.standard_normal(20_001).astype(f32),
            np.round(rng.standard_normal(40_000) * 3).astype(f32),  # ties everywhere
            np.array([5.0], f32),
            np.array([np.nan, np.inf, -np.inf], f32),  # nothing finite
            _with_non_finite(rng.standard_normal(999).astype(f32), rng),
            np.zeros(10, f32),  # MAD 0
        ]
    if case == "few_finite":  # 0, 1, 2, 7, 8, 9 finite values, negative ones too, among non-finite ones
        return [_with_non_finite((rng.standard_normal(k) * 5 - 2).astype(f32), rng) for k in (0, 1, 2, 7, 8, 9)]
    if case == "ties_and_zeros":
        zeros = np.zeros(1000, f32)
        zeros[::2] = -0.0
        mixed_zeros = np.concatenate([zeros[:501], rng.standard_normal(400).astype(f32)])
        return [
            np.full(1000, 3.0, f32),  # all equal, even count
            np.full(1001, -2.5, f32),  # all equal, odd count
            zeros,
            mixed_zeros[rng.permutation(mixed_zeros.size)],
            np.array([-0.0, 0.0], f32),
            np.array([-1.0, 1.0], f32),  # the middle pair under different first-pass bins
            rng.integers(-3, 4, 50_001).astype(f32),
            np.repeat(rng.standard_normal(300).astype(f32), 70),
        ]
    if case == "low_bits":
        # No subnormals: the host's and the device's float32 arithmetic round them differently
        # (a middle pair of 1e-45 and 2e-45 averages to 1e-45 in NumPy, 0 on one H100), and no
        # frame holds values near 1e-38.
        gap = _ulp_run(1.0, 2048)
        return [
            _ulp_run(1.0, 5000)[rng.permutation(5000)],  # middle pair in one last-pass bin
            _ulp_run(-3.0, 4000)[rng.permutation(4000)],
            np.concatenate([gap[:1000], gap[1030:2030]])[rng.permutation(2000)],  # middle pair across last-pass bins
            _ulp_run(1.0, 2),
            np.array([1.0, 2.0], f32),
            np.array([3e38, 3e38, 3.3e38, -3e38], f32),  # the middle sum overflows to inf, as in NumPy
        ]
    # "sizes": rows of very different lengths in one launch
    return [
        (rng.standard_normal(100_000) * 10 + 1000).astype(f32),
        np.array([7.0], f32),
        _with_non_finite(rng.standard_normal(20_000).astype(f32), rng),
        (rng.standard_normal(100_001) * 10).astype(f32),
        rng.standard_cauchy(30_000).astype(f32),
    ]


@pytest.mark.parametrize("case", ["mixed", "few_finite", "ties_and_zeros", "low_bits", "sizes"])
def test_fused_median_mad_equals_numpy_medians(device: int, case: str) -> None:
    """gpu.fused_median_mad (radix selection, no sort): numpy.median of the finite values and of
    their absolute deviations, for every row of a launch of 1, 2, 3 or all the rows."""
    rows = _median_mad_rows(case)
    wanted = []
    with np.errstate(over="ignore", invalid="ignore"):
        for row in rows:
            finite = row[np.isfinite(row)]
            centre = np.median(finite) if finite.size else np.float32(np.nan)
            wanted.append((finite.size, centre, np.median(np.abs(finite - centre)) if finite.size else np.nan))
    for group in (1, 2, 3, len(rows)):
        for start in range(0, len(rows), group):
            stats = gpu.fused_median_mad([cp.asarray(row) for row in rows[start : start + group]], cp)
            for (count, centre, mad), (want_count, want_centre, want_mad) in zip(stats, wanted[start : start + group]):
                assert count == want_count
                if want_count == 0:
                    assert np.isnan(centre) and np.isnan(mad)
                    continue
                # Equal as floats (so to the bit but for the sign of a zero median, which NumPy's
                # partition may take from either zero).
                assert centre == float(want_centre), (case, start, centre, want_centre)
                assert mad == float(want_mad), (case, start, mad, want_mad)


def _clipping_stop(values: np.ndarray, clip: float = 3.0, iterations: int = 5) -> str:
    """Which of frames._clipped_mad_sigma's rules ends its loop on ``values`` (same steps)."""
    values = values[np.isfinite(values)]
    for _ in range(iterations):
        if values.size < 8:
            return "too_few"
        deviation = np.abs(values - np.median(values))
        sigma = 1.4826 * float(np.median(deviation))
        if not sigma > 0:
            return "sigma_not_positive"
        keep = deviation <= clip * sigma
        if bool(keep.all()):
            return "nothing_clipped"
        values = values[keep]
    return "iterations"


#: 33 values whose clipping keeps, in its third iteration, a set that clipping all the finite
#: values around the current median would not give (a value dropped before is inside the new
#: limit): the kernel must clip the kept values, not the row.
_CLIP_OF_A_CLIP = np.array([
    -1.1207694, 0.93704396, 0.46068567, 0.016529793, -42.332958, -0.68672007, 1.9489837, -0.67290789,
    -3.1953788, 4.5358891, 0.063062266, -7.8123546, 0.0088519361, 4.0561471, 8.3111353, -2.5826423,
    -1.5134026, 0.86345196, -1.5524620, -0.23695786, -0.85727602, -0.53612310, -0.27447769, 23.042044,
    0.026575761, 1.4868902, -1.1684223, 0.097106107, 0.092837580, -0.77673125, -0.83852488, 9.7274685,
    -3.9354324,
], np.float32)


def _clipped_rows(case: str) -> tuple[list[np.ndarray], str | None]:
    """Rows for gpu.fused_clipped_mad_sigmas and the stop rule each one reaches (clip 3, 5 iterations)."""
    rng = np.random.default_rng(71)
    f32 = np.float32
    if case == "too_few_at_once":
        return [_with_non_finite(rng.standard_normal(7).astype(f32), rng)], "too_few"
    if case == "too_few_after_a_clip":
        return [np.concatenate([rng.standard_normal(7), [100.0, 200.0]]).astype(f32)], "too_few"
    if case == "sigma_zero":
        flat = np.full(50, 2.0, f32)
        flat[:20] = rng.standard_normal(20)
        return [flat], "sigma_not_positive"
    if case == "nothing_clipped":
        return [np.clip(rng.standard_normal(1000), -2, 2).astype(f32)], "nothing_clipped"
    if case == "all_iterations":
        return [rng.standard_cauchy(50_000).astype(f32)], "iterations"
    if case == "clip_of_a_clip":
        return [_CLIP_OF_A_CLIP], None
    if case == "value_on_the_limit":
        # Median 0 and MAD 2, so the first limit is fl32(3 x 1.4826 x 2); one value sits exactly on
        # it (kept: |v - median| <= limit) and decides the second iteration's sigma.
        on_limit = np.repeat(np.arange(-4, 5, dtype=f32), [7, 6, 9, 4, 3, 8, 5, 5, 5])
        return [np.concatenate([on_limit, [f32(3.0 * 1.4826 * 2.0), 100.0]]).astype(f32)], None
    if case == "ties_zeros_low_bits":
        zeros = np.zeros(30_000, f32)
        zeros[::2] = -0.0
        zeros[:100] = rng.standard_normal(100)
        tail = _ulp_run(7.0, 40_000)
        tail[-3000:] += 1
        stars = np.round(rng.standard_normal(60_000) * 4).astype(f32)
        stars[::41] += 200
        return [zeros, tail[rng.permutation(tail.size)], stars], None
    # "sizes": rows of very different finite counts in one (NaN-padded) table
    long_row = (rng.standard_normal(100_000) * 10).astype(f32)
    long_row[::37] += 300
    long_row[::1001] = -np.inf
    return [long_row, _with_non_finite(rng.standard_normal(20_000).astype(f32), rng),
            _with_non_finite(rng.standard_normal(9).astype(f32), rng)], None


@pytest.mark.parametrize("case", ["too_few_at_once", "too_few_after_a_clip", "sigma_zero", "nothing_clipped",
                                  "all_iterations", "clip_of_a_clip", "value_on_the_limit", "ties_zeros_low_bits",
                                  "sizes"])
def test_fused_clipped_mad_sigmas_equal_numpy_to_the_bit(device: int, case: str) -> None:
    """gpu.fused_clipped_mad_sigmas (radix selection, no sort) gives frames._clipped_mad_sigma's
    sigma exactly: each stop rule, NaN/inf, ties, zeros of both signs, low-bit differences, rows
    of very different finite counts, a value exactly on the limit, launches of 1 to 3 rows, other
    clips and iteration counts."""
    frames = pytest.importorskip("napari_zemosaic.engine.frames")
    rows, stop = _clipped_rows(case)
    if stop is not None:
        assert all(_clipping_stop(row) == stop for row in rows)
    if case == "value_on_the_limit":
        deviation = np.abs(rows[0] - np.median(rows[0]))
        assert np.float32(3.0 * 1.4826 * float(np.median(deviation))) in deviation
    table = np.full((len(rows), max(row.size for row in rows)), np.nan, np.float32)
    for index, row in enumerate(rows):
        table[index, : row.size] = row
    for clip, iterations in ((3.0, 5), (3.0, 1), (3.0, 0), (1.0, 5), (2.5, 20)):
        want = np.array([frames._clipped_mad_sigma(row, np, clip, iterations) for row in table])
        for count in range(1, len(rows) + 1):
            sigmas = gpu.fused_clipped_mad_sigmas(cp.asarray(table[:count]), clip, iterations, cp)
            assert sigmas.dtype == cp.float64 and sigmas.shape == (count,)
            np.testing.assert_array_equal(gpu.to_host(sigmas), want[:count])


@pytest.mark.parametrize("with_nan", [False, True])
def test_fused_bilinear_sampling_equals_the_numpy_path_to_the_bit(device: int, with_nan: bool) -> None:
    """reproject.sample(bilinear) on CuPy (one kernel, gpu.fused_bilinear_into) gives NumPy's
    values and footprint exactly, edges, NaN pixels and NaN coordinates included."""
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    rng = np.random.default_rng(71)
    data = np.stack([star_field((300, 420), 60, rng) * r for r in RESPONSE]).astype(np.float32)
    if with_nan:
        data[:, 100:120, 200:260] = np.nan
        data[1, 5, 7] = np.nan
    map_x = rng.uniform(-3.0, 423.0, (257, 389)).astype(np.float32)
    map_y = rng.uniform(-3.0, 303.0, (257, 389)).astype(np.float32)
    map_x[0, :6] = [-0.5, 419.5, -0.50001, 419.50003, 0.0, 419.0]  # exactly on / just past the edges
    map_y[1, :6] = [-0.5, 299.5, -0.50001, 299.50003, 0.0, 299.0]
    map_x[2, :3] = np.nan
    cpu_out, cpu_fp = reproject.sample(data, map_x, map_y, "bilinear", np)
    gpu_out, gpu_fp = reproject.sample(cp.asarray(data), cp.asarray(map_x), cp.asarray(map_y), "bilinear", cp)
    np.testing.assert_array_equal(gpu.to_host(gpu_out), cpu_out)
    np.testing.assert_array_equal(gpu.to_host(gpu_fp), cpu_fp)
    # The xp path on CuPy still runs (fused=False) and lands within the sampling tolerance.
    source = reproject._prepare_source(cp.asarray(data), cp)
    out = cp.empty((3, *map_x.shape), dtype=cp.float32)
    footprint = cp.empty(map_x.shape, dtype=cp.float32)
    reproject._bilinear_into(source, cp.asarray(map_x), cp.asarray(map_y), out, footprint, cp, fused=False)
    np.testing.assert_array_equal(gpu.to_host(footprint), cpu_fp)
    both = np.isfinite(cpu_out)
    np.testing.assert_allclose(gpu.to_host(out)[both], cpu_out[both], rtol=1e-6, atol=1e-3)


DEBAYER_SHAPES = [(2, 2), (2, 3), (3, 2), (7, 9), (64, 96), (65, 97)]


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
@pytest.mark.parametrize("shape", DEBAYER_SHAPES, ids=[f"{h}x{w}" for h, w in DEBAYER_SHAPES])
def test_fused_debayer_equals_the_numpy_path_to_the_bit(device: int, pattern: str, shape: tuple[int, int]) -> None:
    """debayer.debayer_bilinear on CuPy (one kernel, gpu.fused_debayer_bilinear) gives NumPy's cube
    exactly: every pattern, odd sizes, the reflected borders, NaN and ±inf pixels."""
    debayer = pytest.importorskip("napari_zemosaic.engine.debayer")
    rng = np.random.default_rng(81)
    cfa = (SKY + NOISE_SIGMA * rng.standard_normal(shape)).astype(np.float32)
    if cfa.size >= 16:
        picks = rng.choice(cfa.size, 6, replace=False)
        cfa.flat[picks[:2]] = np.nan
        cfa.flat[picks[2:4]] = np.inf
        cfa.flat[picks[4:]] = -np.inf
        cfa[0, -1] = np.nan  # on the reflected border
    cpu = debayer.debayer_bilinear(cfa, pattern, np)
    direct = gpu.fused_debayer_bilinear(cp.asarray(cfa), pattern, cp)
    assert direct is not None and direct.dtype == cp.float32 and direct.shape == (3, *shape)
    np.testing.assert_array_equal(gpu.to_host(direct), cpu)
    np.testing.assert_array_equal(gpu.to_host(debayer.debayer_bilinear(cp.asarray(cfa), pattern, cp)), cpu)
    # A strided view and an integer CFA reach the same kernel through the float32 C-order copy.
    np.testing.assert_array_equal(gpu.to_host(debayer.debayer_bilinear(cp.asarray(cfa)[:, ::-1], pattern, cp)),
                                  debayer.debayer_bilinear(cfa[:, ::-1], pattern, np))
    raw = np.clip(np.nan_to_num(cfa, nan=0.0, posinf=65535.0, neginf=0.0), 0, 65535).astype(np.uint16)
    np.testing.assert_array_equal(gpu.to_host(debayer.debayer_bilinear(cp.asarray(raw), pattern.lower(), cp)),
                                  debayer.debayer_bilinear(raw, pattern, np))
    generic = gpu.to_host(debayer.debayer_bilinear(cp.asarray(cfa), pattern, cp, fused=False))
    finite = np.isfinite(cpu)
    assert np.array_equal(np.isfinite(generic), finite)
    np.testing.assert_allclose(generic[finite], cpu[finite], rtol=1e-6)


def test_fused_debayer_declines_what_it_does_not_cover(device: int) -> None:
    plane = cp.zeros((8, 8), dtype=cp.float32)
    assert gpu.fused_debayer_bilinear(np.zeros((8, 8), np.float32), "RGGB", np) is None
    assert gpu.fused_debayer_bilinear(plane.astype(cp.float64), "RGGB", cp) is None
    assert gpu.fused_debayer_bilinear(plane[:, ::2], "RGGB", cp) is None
    assert gpu.fused_debayer_bilinear(plane[None], "RGGB", cp) is None
    assert gpu.fused_debayer_bilinear(plane, "RGBG", cp) is None
    assert gpu.fused_debayer_bilinear(plane[:1], "RGGB", cp) is None


def _grid_case(case: str) -> tuple[np.ndarray, Any]:
    """A frame (C, H, W) with NaN pixels and a real control grid over a box that runs past the
    frame's edges (so part of the map is off the frame)."""
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    if case == "seestar":
        data, grid, _, _, _ = _reprojection_case()
        return data, grid
    rng = np.random.default_rng(91)
    shape = (301, 419)
    data = np.stack([star_field(shape, 60, rng) * r for r in RESPONSE]).astype(np.float32)
    if case == "nan":
        data[:, 100:120, 200:260] = np.nan
        data[1, 5, 7] = np.nan
        data[2, -1, :] = np.nan  # the bottom border row
    if case == "mono":
        data = data[:1]
    frame_wcs = tan_wcs(150.0, 20.0, shape, 2.4, 23.0)
    canvas_shape = (520, 610)
    canvas_wcs = tan_wcs(150.02, 20.01, canvas_shape, 2.0, 0.0)
    grid = reproject.compute_control_grid(frame_wcs, shape, canvas_wcs, (37, 503, 11, 597), tol_px=0.001,
                                          initial_step=16)
    return data, grid


@pytest.mark.parametrize("case", ["plain", "nan", "mono", "seestar"])
def test_fused_map_and_bilinear_sampling_equal_the_numpy_path_to_the_bit(device: int, case: str) -> None:
    """reproject.sample_rows on CuPy (one kernel computing the map from the expander's control rows,
    gpu.fused_bilinear_control_into) gives NumPy's expand_control_grid + _bilinear_into values and
    footprint exactly, whatever the row chunks; so does the dense-map path on CuPy."""
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    data, grid = _grid_case(case)
    height, width = grid.shape
    map_x, map_y = reproject.expand_control_grid(grid, np)
    cpu_source = reproject._prepare_source(data, np)
    cpu_out = np.empty((data.shape[0], height, width), dtype=np.float32)
    cpu_fp = np.empty((height, width), dtype=np.float32)
    reproject._bilinear_into(cpu_source, map_x, map_y, cpu_out, cpu_fp, np)
    assert 0.05 < np.isnan(cpu_out[0]).mean() < 0.95  # both inside and off the frame
    if case == "nan":
        assert (cpu_fp == 0).sum() > (~reproject._inside(map_x, map_y, data.shape[2], data.shape[1])).sum()
    source = reproject._prepare_source(cp.asarray(data), cp)
    expander = reproject._MapExpander(grid, cp)
    assert grid.src_x.shape[0] > 2
    for chunks in ([height], [1, 2, 3, height], [7] * (height // 7 + 1), [64] * (height // 64 + 1)):
        out = cp.full((data.shape[0], height, width), 7.0, dtype=cp.float32)
        footprint = cp.full((height, width), 7.0, dtype=cp.float32)
        r0 = 0
        for rows in chunks:
            r1 = min(r0 + rows, height)
            if r1 > r0:
                assert expander.sample_bilinear_into(source, r0, r1, out[:, r0:r1], footprint[r0:r1])
            r0 = r1
        assert r0 == height
        np.testing.assert_array_equal(gpu.to_host(out), cpu_out)
        np.testing.assert_array_equal(gpu.to_host(footprint), cpu_fp)
    # The kernel computed the control rows itself: no expander array was made.
    assert expander._arrays is None
    # Control points staged after a frame's pixels and copied with them: the same bits.
    from napari_zemosaic.engine.frames import StagedPixels

    raw = np.arange(6000, dtype=np.uint16)
    points = reproject.control_points(grid)
    buffer = np.zeros(12288 + points.nbytes, np.uint8)
    buffer[: raw.nbytes] = raw.view(np.uint8)
    buffer[12288:] = points.view(np.uint8).reshape(-1)
    staged = StagedPixels(buffer, raw, buffer[12288:].view(np.float64).reshape(points.shape), 12288)
    raw_on_device, points_on_device = staged.upload(cp)
    staged_expander = reproject._MapExpander(grid, cp, grid_on_device=points_on_device)
    out = cp.empty((data.shape[0], height, width), dtype=cp.float32)
    footprint = cp.empty((height, width), dtype=cp.float32)
    assert staged_expander.sample_bilinear_into(source, 0, height, out, footprint)
    np.testing.assert_array_equal(gpu.to_host(out), cpu_out)
    np.testing.assert_array_equal(gpu.to_host(footprint), cpu_fp)
    np.testing.assert_array_equal(gpu.to_host(raw_on_device), raw)
    # The public helper, fused and not (rows() + fused_bilinear_into): the same bits.
    for fused in (True, False):
        out = cp.empty((data.shape[0], height, width), dtype=cp.float32)
        footprint = cp.empty((height, width), dtype=cp.float32)
        step = 97
        for r0 in range(0, height, step):
            r1 = min(r0 + step, height)
            reproject.sample_rows(expander, source, "bilinear", r0, r1, out[:, r0:r1], footprint[r0:r1], cp,
                                  fused=fused)
        np.testing.assert_array_equal(gpu.to_host(out), cpu_out)
        np.testing.assert_array_equal(gpu.to_host(footprint), cpu_fp)


def test_fused_map_sampling_declines_and_reproject_frame_agrees(device: int) -> None:
    """The grid kernel declines what it does not cover (NumPy, a float64 map, a bad output layout),
    and reproject.reproject_frame (which samples through sample_rows) gives NumPy's bits."""
    reproject = pytest.importorskip("napari_zemosaic.engine.reproject")
    data, grid = _grid_case("nan")
    height, width = grid.shape
    source = reproject._prepare_source(cp.asarray(data), cp)
    out = cp.empty((data.shape[0], height, width), dtype=cp.float32)
    footprint = cp.empty((height, width), dtype=cp.float32)
    assert not reproject._MapExpander(grid, np).sample_bilinear_into(source, 0, height, out, footprint)
    assert not reproject._MapExpander(grid, cp, np.float64).sample_bilinear_into(source, 0, height, out, footprint)
    expander = reproject._MapExpander(grid, cp)
    assert not expander.sample_bilinear_into(source, 0, height, out[:, :, ::2], footprint)
    assert not expander.sample_bilinear_into(source, 0, height + 1, out, footprint)
    assert not expander.sample_bilinear_into(source, 0, height - 1, out, footprint)  # shapes disagree
    # A canvas larger than the frame: edges, NaN pixels and uncovered canvas all in one call.
    frame_shape = (int(data.shape[1]), int(data.shape[2]))
    frame_wcs = tan_wcs(150.0, 20.0, frame_shape, 2.4, 23.0)
    canvas_shape = (520, 610)
    canvas_wcs = tan_wcs(150.02, 20.01, canvas_shape, 2.0, 0.0)
    cpu = reproject.reproject_frame(data, frame_wcs, canvas_wcs, canvas_shape, xp=np)
    on_gpu = reproject.reproject_frame(cp.asarray(data), frame_wcs, canvas_wcs, canvas_shape, xp=cp)
    assert cpu is not None and on_gpu is not None and cpu[0] == on_gpu[0]
    np.testing.assert_array_equal(gpu.to_host(on_gpu[1]), cpu[1])
    np.testing.assert_array_equal(gpu.to_host(on_gpu[2]), cpu[2])


def fused_kappa_sigma_cube(rng: np.random.Generator, n_frames: int, columns: int) -> np.ndarray:
    """(N, 1, 1, columns) samples made to stress kappa-sigma: outliers, NaN, ±inf, ties, constants."""
    cube = (SKY + NOISE_SIGMA * rng.standard_normal((n_frames, columns))).astype(np.float32)
    cube[rng.random(cube.shape) < 0.05] += np.float32(30 * NOISE_SIGMA)  # outliers
    cube[rng.random(cube.shape) < 0.15] = np.nan  # partial coverage
    cube[rng.random(cube.shape) < 0.01] = np.inf
    cube[rng.random(cube.shape) < 0.01] = -np.inf
    quarter = columns // 4
    cube[:, :quarter] = np.round(cube[:, :quarter] / NOISE_SIGMA)  # small integers: many exact ties
    cube[:, quarter : quarter + 8] = np.float32(SKY)  # constant samples (σ = 0)
    cube[:, quarter + 8 : quarter + 16] = np.nan  # empty samples
    if n_frames > 2:
        cube[: n_frames // 2, quarter + 16 : quarter + 24] = np.nan  # half-empty samples
    return cube.reshape(n_frames, 1, 1, columns)


@pytest.mark.parametrize("n_frames", [1, 2, 31, 32, 33, 500, 1024, 1025, 2000])
def test_fused_sort_gives_each_column_its_finite_values_in_numpy_order(device: int, n_frames: int) -> None:
    """Both sorts of the fused clipping kernels (a warp's registers up to FUSED_WARP_SORT_MAX_ROWS
    rows, shared memory beyond): each column's finite values as numpy.sort orders them, and their
    count, also for a strided view of the columns; signed zeros compare equal, as in NumPy."""
    rng = np.random.default_rng(4000 + n_frames)
    cube = fused_kappa_sigma_cube(rng, n_frames, 2 * 300).reshape(n_frames, -1)
    cube[rng.random(cube.shape) < 0.02] = np.float32(-0.0)
    cube[rng.random(cube.shape) < 0.02] = np.float32(0.0)
    # The last 200 columns filled to every depth: each size of the register network sorts some.
    depth = rng.integers(0, n_frames + 1, 200)
    cube[:, -200:][np.arange(n_frames)[:, None] >= depth[None, :]] = np.nan
    for columns in (cp.asarray(cube), cp.asarray(cube)[:, ::2]):
        host = gpu.to_host(columns)
        sorted_values, counts, prefix, prefix_sq = gpu._sorted_finite_columns(columns, cp)
        assert prefix.shape == prefix_sq.shape == (n_frames + 1, host.shape[1])
        sorted_host, counts_host = gpu.to_host(sorted_values), gpu.to_host(counts)
        for col in range(host.shape[1]):
            finite = np.sort(host[np.isfinite(host[:, col]), col])
            assert counts_host[col] == finite.size
            np.testing.assert_array_equal(sorted_host[: finite.size, col], finite, err_msg=f"column {col}")


@pytest.mark.parametrize("n_frames", [1, 2, 3, 7, 24, 100, 513])
@pytest.mark.parametrize("iterations", [None, 1, 3])
def test_fused_kappa_sigma_kernel_equals_the_numpy_path_to_the_bit(device: int, n_frames: int, iterations: Any) -> None:
    """The GPU's fused sort + iteration (gpu.fused_kappa_sigma_bounds) gives NumPy's mask exactly,
    itself equal to astropy's sigma_clip (tests/engine/test_stack.py)."""
    stack = pytest.importorskip("napari_zemosaic.engine.stack")
    rng = np.random.default_rng(1000 + n_frames)
    cube = fused_kappa_sigma_cube(rng, n_frames, 4096)
    cpu = stack.kappa_sigma_mask(cube, 2.5, 3.0, iterations, np)
    fused = gpu.to_host(stack.kappa_sigma_mask(cp.asarray(cube), 2.5, 3.0, iterations, cp))
    generic = gpu.to_host(stack.kappa_sigma_mask(cp.asarray(cube), 2.5, 3.0, iterations, cp, fused=False))
    np.testing.assert_array_equal(fused, cpu)
    np.testing.assert_array_equal(generic, cpu)
    # Bounds themselves, bit for bit, on a strided chunk view (as kappa_sigma_mask passes them).
    columns = cp.asarray(cube.reshape(n_frames, -1))[:, 100:3000]
    bounds = gpu.fused_kappa_sigma_bounds(columns, 2.5, 3.0, stack._iterations(iterations, n_frames), cp)
    assert bounds is not None
    expected = stack._kappa_sigma_bounds(
        stack._sorted_samples(cube.reshape(n_frames, -1)[:, 100:3000], np), 2.5, 3.0,
        stack._iterations(iterations, n_frames), np,
    )
    for got, want in zip(bounds, expected):
        np.testing.assert_array_equal(gpu.to_host(got), want)


@pytest.mark.parametrize("n_frames", [1, 2, 3, 4, 7, 24, 100, 513])
@pytest.mark.parametrize("iterations", [None, 1, 3])
def test_fused_winsorized_kernel_equals_the_numpy_path_to_the_bit(device: int, n_frames: int, iterations: Any) -> None:
    """The GPU's fused winsorized clipping (gpu.fused_winsorized_range_values) gives the NumPy
    mask exactly, on the same stress samples as kappa-sigma (outliers, NaN, ±inf, ties, constants)."""
    stack = pytest.importorskip("napari_zemosaic.engine.stack")
    rng = np.random.default_rng(2000 + n_frames)
    cube = fused_kappa_sigma_cube(rng, n_frames, 4096)
    cpu = stack.winsorized_sigma_clip_mask(cube, 2.5, 3.0, iterations, 1.5, np)
    fused = gpu.to_host(stack.winsorized_sigma_clip_mask(cp.asarray(cube), 2.5, 3.0, iterations, 1.5, cp))
    generic = gpu.to_host(stack.winsorized_sigma_clip_mask(cp.asarray(cube), 2.5, 3.0, iterations, 1.5, cp,
                                                           fused=False))  # fmt: skip
    np.testing.assert_array_equal(fused, cpu)
    np.testing.assert_array_equal(generic, cpu)
    if n_frames >= 7:  # the clipping did something on these samples (not only the non-finite values)
        assert (cpu & np.isfinite(cube)).any()
    columns = cp.asarray(cube.reshape(n_frames, -1))[:, 100:3000]  # a strided chunk view
    kept = gpu.fused_winsorized_range_values(columns, 2.5, 3.0, stack._iterations(iterations, n_frames), 1.5, cp)
    assert kept is not None
    lowest, highest = (gpu.to_host(a) for a in kept)
    view = cube.reshape(n_frames, -1)[:, 100:3000]
    expected = stack.winsorized_sigma_clip_mask(view, 2.5, 3.0, iterations, 1.5, np)
    np.testing.assert_array_equal(~((view >= lowest) & (view <= highest)), expected)


@pytest.mark.parametrize("n_frames", [1, 7, 100])
@pytest.mark.parametrize("rejection", ["none", "kappa_sigma", "winsorized_sigma_clip"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_stack_cube_equals_the_numpy_stack_to_the_bit(
    device: int, n_frames: int, rejection: str, weighted: bool
) -> None:
    """stack_cube on CuPy with a mean combine: the rejection's kept ranges, then one kernel for the
    sums (gpu.fused_combine_within_bounds), without the mask. Data, weight, count and rejected
    equal NumPy's stack_cube exactly (frame after frame float64 sums, as NumPy's reductions along
    axis 0), on the stress samples of the kappa-sigma kernel laid out as three channels, with
    frame weights including a zero and a NaN."""
    stack = pytest.importorskip("napari_zemosaic.engine.stack")
    rng = np.random.default_rng(3000 + n_frames)
    cube = fused_kappa_sigma_cube(rng, n_frames, 3 * 24 * 40).reshape(n_frames, 3, 24, 40)
    weights = None
    if weighted:
        weights = rng.uniform(0.2, 2.0, n_frames).astype(np.float32)
        weights[0] = 0.0
        if n_frames > 2:
            weights[2] = np.nan
    params = stack.StackParams(rejection=rejection, kappa_low=2.5, kappa_high=3.0, max_iterations=3)
    cpu = stack.stack_cube(cube, params, weights=weights, xp=np)
    fused = stack.stack_cube(cp.asarray(cube), params, weights=None if weights is None else cp.asarray(weights), xp=cp)
    for name in ("data", "weight", "count", "rejected"):
        np.testing.assert_array_equal(gpu.to_host(getattr(fused, name)), getattr(cpu, name), err_msg=name)
    if rejection != "none" and n_frames >= 7:
        assert float(cpu.rejected.max()) > 0  # the rejection did something here
    assert stack._fused_stack(cp.asarray(cube)[:, :, :, ::2], params, None, cp) is None  # not contiguous
    median = stack.StackParams(rejection=rejection, combine="median")
    assert stack._fused_stack(cp.asarray(cube), median, None, cp) is None


@pytest.mark.parametrize("extra", [0, 1])
def test_deepest_columns_the_fused_sort_takes_and_one_deeper(device: int, extra: int) -> None:
    """At FUSED_SORT_MAX_ROWS frames the kernel sorts (its shared memory at the padded size is
    launchable) and equals NumPy to the bit; one frame more, the xp path gives the same mask."""
    stack = pytest.importorskip("napari_zemosaic.engine.stack")
    n_frames = gpu.FUSED_SORT_MAX_ROWS + extra
    cube = fused_kappa_sigma_cube(np.random.default_rng(77), n_frames, 48)
    columns = cp.asarray(cube.reshape(n_frames, -1))
    bounds = gpu.fused_kappa_sigma_bounds(columns, 2.5, 3.0, 3, cp)
    assert (bounds is None) == bool(extra)
    if bounds is not None:
        expected = stack._kappa_sigma_bounds(stack._sorted_samples(cube.reshape(n_frames, -1), np), 2.5, 3.0, 3, np)
        for got, want in zip(bounds, expected):
            np.testing.assert_array_equal(gpu.to_host(got), want)
    cpu = stack.kappa_sigma_mask(cube, 2.5, 3.0, 3, np)
    np.testing.assert_array_equal(gpu.to_host(stack.kappa_sigma_mask(cp.asarray(cube), 2.5, 3.0, 3, cp)), cpu)


def test_fused_kappa_sigma_kernel_declines_what_it_does_not_cover(device: int) -> None:
    too_deep = cp.zeros((gpu.FUSED_SORT_MAX_ROWS + 1, 4), dtype=cp.float32)
    assert gpu.fused_kappa_sigma_bounds(too_deep, 3.0, 3.0, 5, cp) is None
    assert gpu.fused_kappa_sigma_bounds(cp.zeros((4, 4), dtype=cp.float64), 3.0, 3.0, 5, cp) is None
    assert gpu.fused_kappa_sigma_bounds(np.zeros((4, 4), dtype=np.float32), 3.0, 3.0, 5, np) is None
    assert gpu.fused_winsorized_range_values(too_deep, 3.0, 3.0, 5, 1.5, cp) is None
    assert gpu.fused_winsorized_range_values(np.zeros((4, 4), dtype=np.float32), 3.0, 3.0, 5, 1.5, np) is None


def test_debayer_parity(device: int) -> None:
    check_debayer_parity(cp)


def test_hot_pixel_parity(device: int) -> None:
    check_hot_pixel_parity(cp)


def test_control_grid_parity(device: int) -> None:
    check_control_grid_parity(cp)


def test_sample_parity_every_method(device: int) -> None:
    check_sample_parity(cp)


def test_reprojection_end_to_end_parity(device: int) -> None:
    check_reprojection_end_to_end_parity(cp)


@pytest.mark.parametrize("rejection", ["none", "kappa_sigma", "winsorized_sigma_clip", "linear_fit_clip"])
def test_stack_parity_each_rejection(device: int, rejection: str) -> None:
    check_stack_parity(cp, rejection, "mean")


def test_stack_parity_median_combine(device: int) -> None:
    check_stack_parity(cp, "kappa_sigma", "median")


# ----------------------------------------------------------------------------- memory model


@pytest.mark.parametrize("rejection", ["none", "kappa_sigma", "winsorized_sigma_clip", "linear_fit_clip"])
@pytest.mark.parametrize("combine", ["mean", "median"])
def test_stack_memory_model_bounds_the_pool_high_water_mark(device: int, rejection: str, combine: str) -> None:
    """The pool's total after a stack (what ``set_limit`` constrains) stays under the model."""
    stack = pytest.importorskip("napari_zemosaic.engine.stack")
    pool = cp.get_default_memory_pool()
    n_frames, height, width = 24, 256, 256
    cube, weights, _, _ = stack_cube_with_nans(np.random.default_rng(21), n_frames, height)
    params = stack.StackParams(rejection=rejection, combine=combine)
    cp.cuda.Device(device).synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    stack.stack_cube(cp.asarray(cube), params, weights=cp.asarray(weights), xp=cp)
    cp.cuda.Device(device).synchronize()
    high_water = pool.total_bytes() - before
    model = gpu.kernel_bytes_per_pixel("stack", channels=3, frames=n_frames, rejection=rejection,
                                       combine=combine) * height * width
    print(f"stack {rejection}/{combine}: pool high water {high_water / 2**20:.1f} MB, "
          f"model {model / 2**20:.1f} MB, ratio {high_water / model:.2f}")
    assert high_water <= model


def test_reprojection_unit_memory_stays_inside_its_plan(device: int) -> None:
    """A full-size frame's device pass (pixels, noise, sampling) fits the bytes it planned."""
    mosaic_first = pytest.importorskip("napari_zemosaic.engine.mosaic_first")
    from napari_zemosaic.config import default_config
    from napari_zemosaic.engine.frames import FrameInfo

    rng = np.random.default_rng(22)
    cfa, _ = seestar_cfa(rng)
    pixels = np.clip(cfa, 0, 65535).astype(np.uint16)
    frame_wcs = tan_wcs(150.0, 20.0, SEESTAR_SHAPE, 2.4, 12.0)
    canvas_wcs = tan_wcs(150.0, 20.0, (1500, 2300), 2.4, 0.0)
    from napari_zemosaic.engine.canvas import Canvas

    canvas = Canvas(canvas_wcs, (1500, 2300))
    info = FrameInfo(path="synthetic.fit", shape=SEESTAR_SHAPE, n_channels=1, layout="cfa",
                     bayer_pattern=SEESTAR_PATTERN, exposure_s=10.0, date_obs=None, eqmode=None, ra_deg=None,
                     dec_deg=None, focal_mm=None, pixel_um=None, header_scale_arcsec=None, instrument=None,
                     is_seestar=True, wcs=frame_wcs, wcs_status="ok", wcs_reason="", hdu_index=0, header=None)
    bbox = mosaic_first.frame_bbox_on_canvas(frame_wcs, SEESTAR_SHAPE, canvas, margin=2)
    grid = mosaic_first.compute_control_grid(frame_wcs, SEESTAR_SHAPE, canvas_wcs, bbox)
    host = mosaic_first.HostFrame(0, pixels, False, grid)
    config = default_config()
    pool = cp.get_default_memory_pool()
    for budget in (64 * 2**20, 4 * 2**30):
        cp.cuda.Device(device).synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        frame = mosaic_first.reproject_host_frame(host, info, config, 3, cp, budget)
        cp.cuda.Device(device).synchronize()
        high_water = pool.total_bytes() - before
        planned = max(budget, mosaic_first.reproject_unit_min_bytes(host, info, config, 3))
        print(f"reprojection unit, budget {budget / 2**20:.0f} MB: pool high water {high_water / 2**20:.1f} MB, "
              f"planned {planned / 2**20:.1f} MB")
        assert high_water <= planned
        assert np.isfinite(gpu.to_host(frame.data)).mean() > 0.5
        del frame


# ----------------------------------------------------------------------------- Mosaic-First end to end


def _bright_isolated_stars(result: Any, truth: Any, min_flux: float = 3000.0) -> tuple[np.ndarray, np.ndarray]:
    """Canvas (x, y) of bright, isolated truth stars well inside the covered mosaic."""
    x, y = result.canvas.wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    height, width = result.canvas.shape
    green = truth.star_flux[:, 1]
    keep = []
    for i in np.flatnonzero((x > 20) & (x < width - 21) & (y > 20) & (y < height - 21) & (green > min_flux)):
        distance = np.hypot(x - x[i], y - y[i])
        distance[i] = np.inf
        if np.any(green[distance < 12] > 0.01 * green[i]) or truth.star_flux[i].max() > 400_000:
            continue
        iy, ix = int(round(y[i])), int(round(x[i]))
        if result.alpha[iy - 12 : iy + 13, ix - 12 : ix + 13].min() == 0:
            continue
        keep.append(i)
    return x[keep], y[keep]


def _run_demo(frames: Any, out: Any, events: list | None = None, on_event: Any = None, **config: Any) -> Any:
    from napari_zemosaic.engine.pipeline import run

    settings = {"max_memory_mb": 512, "language": "en", **config}
    return run(frames, out, settings, on_event=on_event if events is None else events.append)


@pytest.fixture(scope="module")
def demo_cpu_and_gpu(demo_night, tmp_path_factory, device):
    root, truth = demo_night
    cpu = _run_demo(root / "frames", tmp_path_factory.mktemp("cpu"), use_gpu_phase5=False, stack_use_gpu=False)
    events: list = []
    slices: list = []  # the interpreter's switch interval at each event of the GPU run
    before = sys.getswitchinterval()

    def on_event(event: Any) -> None:
        events.append(event)
        slices.append((getattr(event, "key", ""), sys.getswitchinterval()))

    gpu_out = tmp_path_factory.mktemp("gpu")
    # The cache is kept for the rerun below (its resume units).
    gpu_run = _run_demo(root / "frames", gpu_out, gpu_strict=True, on_event=on_event, cache_retention="keep")
    gpu_run.out = gpu_out
    gpu_run.events = events  # the GPU run's events, for what its log says
    gpu_run.slices = (before, slices, sys.getswitchinterval())
    return cpu, gpu_run, truth


def _compare_mosaics(reference: Any, other: Any) -> dict[str, float]:
    """Pixel differences in units of the reference mosaic's noise, split by agreeing kept counts."""
    import starphot

    assert other.canvas.shape == reference.canvas.shape
    height, width = reference.canvas.shape
    centre = (slice(height // 4, 3 * height // 4), slice(width // 4, 3 * width // 4))
    sigma = starphot.robust_noise_map(reference.data[1], centre)
    both = np.isfinite(reference.data) & np.isfinite(other.data)
    same_count = np.abs(other.count - reference.count) < 1e-6
    difference = np.abs(other.data - reference.data)
    agree = both & same_count[None]
    return {
        "sigma": sigma,
        "nan_mismatch": float((np.isnan(reference.data) != np.isnan(other.data)).mean()),
        "count_mismatch": float(1.0 - same_count[reference.count > 0].mean()),
        "max_where_counts_agree": float(difference[agree].max() / sigma),
        "p9999": float(np.quantile(difference[both], 0.9999) / sigma),
        "max": float(difference[both].max() / sigma),
    }


def test_full_demo_run_on_the_gpu_matches_the_cpu_run(demo_cpu_and_gpu) -> None:
    import starphot

    cpu, gpu_run, truth = demo_cpu_and_gpu
    compute = gpu_run.report["compute"]
    assert compute["gpu_fallbacks"] == []
    for stage in ("debayer", "reproject", "stack"):
        assert compute["backend_by_stage"][stage] == "gpu", stage
    units = compute["gpu"]["units_by_stage"]
    used = cpu.report["frames"]["used"]
    assert gpu_run.report["frames"]["used"] == used >= len(truth.frames) - 2  # the quality filter may drop one
    # P2 measures while the GPU resamples, so the frames P2 rejects were resampled too (then dropped).
    rejected = sum(e["reason_key"].startswith("frame_excluded_quality") for e in gpu_run.report["frames"]["excluded"])
    assert units["reproject"]["gpu"] == used + rejected and units["reproject"]["cpu"] == 0
    assert units["stack"]["gpu"] >= 1 and units["stack"]["cpu"] == 0
    # P2 measured on the device the raw planes P3 decoded there: the host's metrics, to rounding.
    assert compute["backend_by_stage"]["quality"] == "gpu" and units["quality"]["gpu"] >= 1
    # ...by the measuring process started before the header pass (engine/quality_device.py).
    device_p2 = [e.params for e in gpu_run.events if getattr(e, "key", "") == "quality_debug_device"]
    assert [(p["where"], p["frames"]) for p in device_p2] == [("process", used + rejected)]
    # Every frame's corrections and noise were replayed from one CUDA graph (mosaic_first._FramePrepGraphs).
    (p3,) = [e.params for e in gpu_run.events if getattr(e, "key", "") == "mf_debug_gpu_p3"]
    assert p3["graphed"] == used + rejected
    # Short GIL slices from P3 until P2's verdicts (mosaic_first.P3_SWITCH_INTERVAL_S), the
    # interpreter's own again from the photometric solve on, and after the run.
    from napari_zemosaic.engine.mosaic_first import P3_SWITCH_INTERVAL_S

    before, slices, after = gpu_run.slices
    assert after == before > P3_SWITCH_INTERVAL_S
    assert min(interval for _, interval in slices) == P3_SWITCH_INTERVAL_S
    assert [interval for key, interval in slices if key == "mf_info_normalisation"] == [before]
    for on_cpu, on_gpu in zip(cpu.report["frames"]["metrics"], gpu_run.report["frames"]["metrics"]):
        assert on_gpu["path"] == on_cpu["path"] and on_gpu["n_stars"] == on_cpu["n_stars"]
        assert on_gpu["decision"]["accepted"] == on_cpu["decision"]["accepted"]
        for name in ("fwhm_px", "elongation", "background", "noise", "transparency"):
            assert on_gpu[name] == pytest.approx(on_cpu[name], rel=1e-3), name

    # Star fluxes: the same to 0.1 % in every channel.
    x, y = _bright_isolated_stars(cpu, truth)
    assert len(x) >= 15
    fwhm = float(np.median([f.fwhm_px for f in truth.frames]))
    radius = 3.0 * fwhm
    ratios = np.array([
        [starphot.aperture_flux(gpu_run.data[c], xi, yi, radius, radius + 3, radius + 9)
         / starphot.aperture_flux(cpu.data[c], xi, yi, radius, radius + 3, radius + 9) for c in range(3)]
        for xi, yi in zip(x, y)
    ])
    worst = float(np.max(np.abs(ratios - 1.0)))
    stats = _compare_mosaics(cpu, gpu_run)
    print(f"GPU vs CPU demo mosaic: {len(x)} stars, worst flux ratio deviation {worst:.2e}; pixels {stats}")
    assert worst <= 1e-3
    # Pixels: far below the noise wherever both backends kept the same samples; a sample lying
    # within float32 rounding of a κ threshold may flip on a few pixels (bounded like the stack parity).
    tol = TOL["stack"]
    assert stats["nan_mismatch"] <= tol["flip_fraction"]
    assert stats["count_mismatch"] <= tol["flip_fraction"]
    assert stats["max_where_counts_agree"] <= 0.01
    assert stats["p9999"] <= 0.01
    assert stats["max"] <= 2.0


def test_forced_down_gpu_budget_gives_the_same_mosaic_through_chunking(
    demo_night, demo_cpu_and_gpu, tmp_path, monkeypatch, device
) -> None:
    """256 MB of GPU memory (budget and a hard CuPy pool limit): strips, no OOM, no fallback."""
    root, truth = demo_night
    _, unconstrained, _ = demo_cpu_and_gpu
    limit = 256 * 2**20
    pool = cp.get_default_memory_pool()
    monkeypatch.setenv(gpu.ENV_MEMORY_LIMIT_MB, "256")
    events: list = []
    previous = pool.get_limit()
    pool.free_all_blocks()
    pool.set_limit(size=limit)  # the device refuses anything beyond: a real 256 MB card
    try:
        small = _run_demo(root / "frames", tmp_path, events, gpu_strict=True)
    finally:
        pool.set_limit(size=previous)
    compute = small.report["compute"]
    assert compute["gpu_fallbacks"] == []
    assert compute["gpu"]["memory_limit_mb"] == 256.0
    assert all(count == 0 for count in compute["gpu"]["oom_retries_by_stage"].values()), compute["gpu"]
    assert compute["gpu"]["errors"] == []
    (p5,) = [e for e in events if getattr(e, "key", "") == "mf_debug_gpu_p5"]
    assert p5.params["strips"] > p5.params["blocks"]  # the budget really cut the blocks into strips
    stats = _compare_mosaics(unconstrained, small)
    print(f"256 MB GPU run vs unconstrained GPU run: {p5.params}; pixels {stats}")
    assert stats["nan_mismatch"] == 0.0 and stats["count_mismatch"] <= TOL["stack"]["flip_fraction"]
    assert stats["max_where_counts_agree"] <= 1e-3


def test_a_night_whose_pieces_do_not_fit_on_the_device_is_stacked_in_passes_to_the_bit(
    demo_night, demo_cpu_and_gpu, tmp_path, monkeypatch, device
) -> None:
    """Pieces that do not fit on the device at once: the blocks are stacked in passes (here one
    block a pass), each pass after the first reading its frames again; the mosaic is the one of
    the run that kept every piece on the device, to the bit."""
    from napari_zemosaic.engine import mosaic_first as module

    root, _ = demo_night
    _, reference, _ = demo_cpu_and_gpu
    planned: list = []
    plan = module.plan_device_passes

    def one_block_a_pass(per_block: dict, store_bytes: int, max_passes: int = module.MAX_DEVICE_PASSES) -> Any:
        planned.append(plan(per_block, max(per_block.values()), max_passes=len(per_block)))
        return planned[-1]

    monkeypatch.setattr(module, "DEVICE_STORE_SHARE", 1e-9)  # nothing fits at once
    monkeypatch.setattr(module, "plan_device_passes", one_block_a_pass)
    events: list = []
    passed = _run_demo(root / "frames", tmp_path, events, gpu_strict=True)
    (passes,) = planned
    assert passes is not None and len(passes) >= 2
    assert [e.params["passes"] for e in events if getattr(e, "key", "") == "mf_info_device_passes"] == [len(passes)]
    p3 = [e.params for e in events if getattr(e, "key", "") == "mf_debug_gpu_p3"]
    assert len(p3) == len(passes) and all(params["storage"] == "gpu" for params in p3)
    frames_read = [params["frames"] for params in p3]
    assert frames_read[0] == passed.report["frames"]["found"] - len(passed.report["frames"]["excluded"]) + sum(
        e["reason_key"].startswith("frame_excluded_quality") for e in passed.report["frames"]["excluded"])
    assert all(0 < count <= passed.report["frames"]["used"] for count in frames_read[1:])
    compute = passed.report["compute"]
    assert compute["gpu_fallbacks"] == [] and compute["gpu"]["errors"] == []
    assert passed.report["frames"]["used"] == reference.report["frames"]["used"]
    np.testing.assert_array_equal(passed.data, reference.data)
    np.testing.assert_array_equal(passed.coverage, reference.coverage)
    np.testing.assert_array_equal(passed.count, reference.count)


def test_frames_whose_corrections_cannot_be_captured_give_the_same_mosaic_kernel_by_kernel(
    demo_night, demo_cpu_and_gpu, tmp_path, monkeypatch, device
) -> None:
    """A host wait inside the recorded work (here: in the noise estimate) makes the capture fail:
    the reason is logged once, every frame runs its kernels one by one, and the mosaic is the
    graph-replaying run's, to the bit."""
    from napari_zemosaic.engine import mosaic_first as module

    root, _ = demo_night
    _, replayed, _ = demo_cpu_and_gpu
    estimate = module.estimate_background_noise

    def estimate_after_a_wait(data: Any, xp: Any) -> Any:
        cp.cuda.get_current_stream().synchronize()  # not allowed while a stream is captured
        return estimate(data, xp)

    monkeypatch.setattr(module, "estimate_background_noise", estimate_after_a_wait)
    events: list = []
    eager = _run_demo(root / "frames", tmp_path, events, gpu_strict=True)
    declined = [e.params for e in events if getattr(e, "key", "") == "mf_debug_gpu_graph_declined"]
    assert len(declined) == 1 and declined[0]["reason"]
    (p3,) = [e.params for e in events if getattr(e, "key", "") == "mf_debug_gpu_p3"]
    assert p3["graphed"] == 0
    assert eager.report["compute"]["gpu_fallbacks"] == []
    np.testing.assert_array_equal(eager.data, replayed.data)
    np.testing.assert_array_equal(eager.count, replayed.count)


# ------------------------------------------------------------------------------ SDS feather


def test_feather_map_is_identical_on_the_gpu(device) -> None:
    """The mega-tile feather (exact Euclidean distance transform) gives the same bits with CuPy."""
    from napari_zemosaic.engine.sds import feather_map

    rng = np.random.default_rng(12)
    covered = np.zeros((1400, 2100), dtype=bool)
    for _ in range(9):  # a union of shifted, rotated-ish frame footprints, with holes
        y0, x0 = rng.integers(0, 500), rng.integers(0, 900)
        covered[y0 : y0 + 900, x0 : x0 + 1200] = True
    covered[700:760, 1000:1013] = False
    covered[rng.random(covered.shape) < 1e-4] = False  # isolated dead pixels
    for width in (67.5, 1.0, 0.0):
        on_cpu = feather_map(covered, width)
        on_gpu = feather_map(covered, width, cp)
        assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == np.float32
        np.testing.assert_array_equal(on_gpu, on_cpu)



def test_fused_column_coverage_equals_the_per_column_reductions(device: int) -> None:
    """mosaic_first._column_coverage on CuPy (gpu.fused_column_coverage, one kernel) flags the same
    rows of each block column as the NumPy reductions, for a box that starts inside a block, with
    NaN corners (a rotated frame), an all-NaN channel and a column without any finite value."""
    from napari_zemosaic.engine import mosaic_first

    rng = np.random.default_rng(77)
    data = (SKY + NOISE_SIGMA * rng.standard_normal((3, 150, 230))).astype(np.float32)
    yy, xx = np.mgrid[:150, :230]
    data[:, (yy + 0.6 * xx) < 60] = np.nan  # a corner outside the frame
    data[:, (yy - 0.5 * xx) > 80] = np.nan
    data[1] = np.nan  # one channel missing everywhere: the others decide
    data[0, :, 200:] = np.nan
    data[2, :, 200:] = np.nan  # the last block column holds nothing
    for x0, side in ((37, 64), (0, 32), (5, 1024)):
        _, cols = mosaic_first._piece_layout((11, 161, x0, x0 + 230), side, (400, 2000))
        want = mosaic_first._column_coverage(data, cols, x0, side)
        got = mosaic_first._column_coverage(cp.asarray(data), cols, x0, side)
        np.testing.assert_array_equal(gpu.to_host(got), want)
        assert want.any()
        if x0 == 37:  # five block columns: the last (box x 219-229) holds nothing, the first not every row
            assert want.shape == (5, 150) and not want[-1].any() and not want[0].all()


def test_packed_download_gives_each_array_as_its_own_download(device: int) -> None:
    """gpu.download_packed_async (one gather kernel, one copy) gives every array with its shape, dtype
    and values: a frame's results (bool coverage, float32 noise, int32 checks, float32 coarse means),
    float64 and empty arrays, a strided view; more arrays than one kernel takes go one by one."""
    rng = np.random.default_rng(5)
    arrays = [
        cp.asarray(rng.random((5, 1401)) < 0.5),
        cp.asarray(rng.standard_normal(3).astype(np.float32)),
        cp.asarray(np.array([7], dtype=np.int32)),
        cp.asarray(np.array([-1, 0], dtype=np.int32)),
        cp.asarray(np.zeros((3, 0, 0), dtype=np.float32)),
        cp.asarray(rng.standard_normal((3, 87, 131)).astype(np.float32))[:, ::2, 1:],
        cp.asarray(rng.standard_normal(5)),
        cp.asarray(np.array([True])),
    ]
    for chosen in (arrays, arrays[:1], arrays[1:4], arrays + arrays[:3]):
        got = gpu.download_packed_async(chosen, cp)
        cp.cuda.get_current_stream().synchronize()
        assert len(got) == len(chosen)
        for host, array in zip(got, chosen):
            want = cp.asnumpy(array)
            assert isinstance(host, np.ndarray) and host.dtype == want.dtype and host.shape == want.shape
            np.testing.assert_array_equal(host, want)
    assert gpu.download_packed_async([], cp) == []


def test_fused_block_means_equal_numpy_coarse_piece(device: int) -> None:
    """photometry.coarse_piece of a CuPy piece (gpu.fused_block_means, one kernel) equals NumPy's
    float64 means cast to float32, to the bit: boxes that start off the cell grid, NaN (a partly
    covered cell is NaN), bins of 16 and 5, a piece smaller than a cell."""
    from napari_zemosaic.engine.photometry import coarse_piece

    rng = np.random.default_rng(9)
    data = (SKY + NOISE_SIGMA * rng.standard_normal((3, 150, 233))).astype(np.float32)
    data[:, :40, :25] = np.nan
    data[1, 100, 100] = np.nan
    for bbox, bin_px in (((7, 157, 11, 244), 16), ((0, 150, 0, 233), 16), ((3, 153, 1, 234), 5)):
        want = coarse_piece(data, bbox, bin_px)
        got = coarse_piece(cp.asarray(data), bbox, bin_px)
        assert (got.y0, got.x0) == (want.y0, want.x0)
        assert isinstance(got.data, cp.ndarray) and got.data.dtype == cp.float32
        np.testing.assert_array_equal(cp.asnumpy(got.data), want.data)
        assert np.isnan(want.data).any() and np.isfinite(want.data).any()
    small = coarse_piece(cp.asarray(data[:, :10, :10]), (3, 13, 3, 13), 16)
    assert small.data.shape == (3, 0, 0)


def test_fused_masked_row_medians_equal_numpy_median(device: int) -> None:
    """The float64 radix-select medians (photometry's masked row medians on the GPU) are
    ``np.median`` of each row's masked values, to the bit: ties, negatives, empty and one-value
    rows, masked-out NaN and infinities, rows of 20 000 values (a Theil–Sen seed's slopes)."""
    rng = np.random.default_rng(21)
    for rows, width in ((64, 57), (40, 3001), (6, 20000)):
        values = rng.normal(0.0, 3.0, (rows, width))
        values[1::3] = values[1::3].round(1)  # ties
        values[2] = 7.25  # one value throughout
        mask = rng.random((rows, width)) < rng.uniform(0.05, 1.0, (rows, 1))
        mask[0] = False
        mask[3] = False
        mask[3, width // 2] = True
        values[~mask & (rng.random((rows, width)) < 0.3)] = np.nan
        values[4, ~mask[4]] = np.inf
        got = gpu.fused_masked_row_medians(cp.asarray(values), cp.asarray(mask), cp).get()
        assert np.isnan(got[0])
        for row in range(1, rows):
            assert got[row] == np.median(values[row][mask[row]]), (rows, width, row)
    assert gpu.fused_masked_row_medians(values, mask, np) is None


def test_a_gpu_rerun_reuses_the_metrics_whose_star_files_the_measuring_process_wrote(demo_cpu_and_gpu, demo_night) -> None:
    """The measuring process wrote the star files of P2's resume units (their SHA-256 in the
    manifest): a rerun into the same OUTPUT finds every one intact and measures nothing again."""
    cpu, gpu_run, truth = demo_cpu_and_gpu
    root, _ = demo_night
    recorded = gpu_run.report["resume"]["units"]["metrics"]["computed"]
    assert recorded >= len(truth.frames) - 2
    again = _run_demo(root / "frames", gpu_run.out, gpu_strict=True, cache_retention="keep")
    units = again.report["resume"]["units"]["metrics"]
    assert (units["reused"], units["computed"], units["corrupt"]) == (recorded, 0, 0)

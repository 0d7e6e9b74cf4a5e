"""Frame quality: per-frame star metrics, rejection rules, quality weights and a tile gate.

Metrics (P1), on a fast path
----------------------------
A sub-frame is measured from its raw plane, before any debayering:

1. **Detection image.** The 2x2-binned luminance (for a CFA: R + G + G + B of each Bayer
   cell; for RGB/mono data: the channel sum, binned). A quarter of the pixels, every photon
   kept.
2. **Background, noise and detection** (:mod:`.detect`, one code for NumPy and CuPy): a mesh
   background (64-sensor-px cells, statistics on every other binned pixel) subtracted in place;
   the noise from neighbour differences (blind to nebulae and gradients); sources above
   ``DETECT_SIGMA`` x noise in the 1-2-1 smoothed image with at least ``DETECT_MIN_AREA`` binned
   pixels, with sep's positions, fluxes and moments (``tests/engine/test_detect.py``). Very long,
   thin sources are streaks (satellites, aircraft): their total length sets ``trail_flag``. Hot pixels and cosmic-ray
   hits (one sensor pixel whose neighbours stay at the sky) are dropped; the rest is ``n_stars``.
3. **Star shape** on the *full-resolution* plane, at the CFA green sites only (a checkerboard
   lattice), or every pixel of mono/RGB data. For the brightest isolated unsaturated stars,
   Gaussian-weighted *adaptive moments* are iterated on all stamps at once (a weight twice as
   wide as the star, so the sparse green lattice samples it without aliasing; the fixed point
   is exact for a Gaussian). Pixel integration adds 1/12 px² per axis; it is removed. Per
   star: FWHM = 2.3548 x the geometric mean of the axis sigmas, elongation = major / minor
   axis. The frame gets the medians. (Debayered input is accepted, but interpolation widens
   stars by ~20 %: measure raw CFA planes, as ``measure_one`` does.)
4. **Flux of stars** in circular apertures of 1.5 x FWHM on the binned image (whatever the
   seeing, > 99 % of a star's light), kept for the transparency proxy.

No full-size work is done beyond one binning pass and one max (saturation), so a full
1080x1920 sub costs about a third of reading and debayering it (``benchmarks/bench_quality.py``).
:func:`measure_planes` measures a batch of planes of one shape: one frame on the host (the
measuring processes of ``measure_frames``), or, with CuPy, the raw planes Mosaic-First's device
threads decoded, all at once on the GPU (:mod:`.quality_device`; the per-frame choices, trails
and isolated stars, stay on the host).

Transparency (``measure_frames``)
---------------------------------
Frames are grouped by pointing (centres closer than half the short side of a field). In each
group the frame with most stars is the reference; every frame's stars are matched on the
sky (through the WCS) to the reference's, and the median flux ratio of the matched stars,
divided by the group median, is the frame's transparency (1 = a typical frame of that
pointing; 0.4 = a cloud took 60 % of the light). Without a WCS, or with too few matches,
the group falls back to relative flux levels (the median flux of each frame's brightest stars).

Rules
-----
Thresholds are relative to the session (or to the pointing group where the sky field
matters, i.e. star counts), so they hold for any camera. Each rule is switched off by a
threshold of 0. In order of precedence (a frame is listed under the first rule it fails,
and every failed rule is kept in ``QualityDecision.failed``):

=============  ====================================================================
elongation     elongation > max(quality_max_elongation, 1.25 x session median)
fwhm           FWHM > quality_max_fwhm_ratio x session median
transparency   transparency < quality_min_transparency_fraction x session median
stars          star count < quality_min_star_fraction x median of its pointing group
background     background > quality_max_background_ratio x session median
trail          a satellite/aircraft trail, only if quality_reject_trails
=============  ====================================================================

Satellite trails are *flagged* but not rejected by default: the per-pixel rejection of the
stacker removes a trail and keeps the rest of the frame's signal.

Weights and the tile gate
-------------------------
``quality_weights`` gives per-frame weights for ``none``, ``noise_variance`` and
``noise_fwhm`` (1/σ² x (median FWHM / FWHM)²: point-source signal-to-noise² scales as
1/FWHM² at fixed noise). ``tile_quality`` scores a master tile or SDS mega-tile from its
coverage, its edge/centre background disparity and its star density; ``tile_weight`` turns
the score into a weight that is never zero (a poor tile is down-weighted, never dropped).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Mapping, Sequence

import numpy as np

from .detect import FLAG_MERGED, FLAG_TRUNCATED, nanmedian_rows
from .photometry import exact_median

# --- configuration keys (to be merged into config.OPTIONS) ---------------------------------
QUALITY_DEFAULTS: dict[str, Any] = {
    "quality_rejection": True,
    "quality_max_fwhm_ratio": 1.5,
    "quality_max_elongation": 1.5,
    "quality_min_star_fraction": 0.5,
    "quality_min_transparency_fraction": 0.7,
    "quality_max_background_ratio": 1.5,
    "quality_reject_trails": False,
}

RULES: tuple[str, ...] = ("elongation", "fwhm", "transparency", "stars", "background", "trail")
WEIGHTING_METHODS: tuple[str, ...] = ("none", "noise_variance", "noise_fwhm")

# --- reason keys when a metric cannot be measured (locale keys, params: path, detail) ------
REASON_NO_VALID_PIXELS = "quality_reason_no_valid_pixels"
REASON_SATURATED = "quality_reason_saturated"
REASON_FLAT = "quality_reason_flat_image"
REASON_NO_STARS = "quality_reason_no_stars"
REASON_TOO_FEW_STARS = "quality_reason_too_few_stars"
REASON_EXTRACTION_FAILED = "quality_reason_extraction_failed"
REASON_UNREADABLE = "quality_reason_unreadable"

PROGRESS_KEY = "progress_quality"

# --- measurement constants --------------------------------------------------------------------
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Detection threshold (x background noise of the binned image) and minimum area (binned px).
DETECT_SIGMA = 5.0
DETECT_MIN_AREA = 3
#: Background mesh, in binned pixels (64 sensor px: follows nebulae, much larger than stars).
BACKGROUND_MESH = 32
#: Row sums of a band of this many values (512 KiB) are binned at a time (see ``_bin2x2``).
BIN_BAND_VALUES = 1 << 17
#: Pixels sampled for the sky noise.
NOISE_SAMPLES = 30_000
#: Stars used for the shape (the brightest isolated ones) and a cap on stamp pixels.
MAX_SHAPE_STARS = 80
MAX_STAMP_VALUES = 25_000
MIN_SHAPE_STARS = 3
STAMP_HALF_RANGE = (6, 24)
ADAPTIVE_ITERATIONS = 30
#: Adaptive-moment weight covariance / star covariance (see ``_adaptive_moments``).
WEIGHT_RATIO = 2.0
CONVERGENCE = 1e-3
#: Stars whose measured FWHM is below this (px) are cosmetics (hot/cold pixel clusters).
MIN_STAR_FWHM_PX = 1.0
#: A source whose neighbours (second largest of 8) hold less than this fraction of its
#: peak is a hot pixel or a cosmic-ray hit.
SINGLE_PIXEL_FRACTION = 0.15
#: Stars for flux matching (brightest first).
MAX_FLUX_STARS = 400
APERTURE_FWHM = 1.5
#: A source is a streak when its major axis exceeds this many times the minor one and its
#: length this fraction of the frame's short side (summed over aligned segments).
TRAIL_MIN_AXIS_RATIO = 4.0
TRAIL_MIN_LENGTH_FRACTION = 0.15
#: A plateau of at least this many pixels at the image maximum means clipping (saturation).
SATURATION_MIN_PIXELS = 4
#: Values that mean "clipped" even when the whole image sits there.
FULL_SCALE_VALUES = (65535.0, 1.0)
#: Above this fraction of saturated pixels the frame is not measured.
MAX_SATURATED_FRACTION = 0.5
#: Transparency by star matching needs this many matches, within this radius (px, and
#: at least the FWHM).
MIN_MATCHES = 5
MATCH_RADIUS_PX = 2.5
FLUX_LEVEL_STARS = 20
#: Relative rules need medians over at least this many measured frames.
MIN_FRAMES_FOR_RULES = 3
#: The elongation limit is never below this multiple of the session median.
ELONGATION_MEDIAN_MARGIN = 1.25

# --- tile gate constants ---------------------------------------------------------------------
TILE_EDGE_FRACTION = 0.1
TILE_DISPARITY_SCALE = 0.25
TILE_WEIGHT_FLOOR = 0.1
TILE_FULL_WEIGHT_SCORE = 0.7


# ============================================================================ data classes


@dataclass
class StarList:
    """Stars of one frame kept for matching: sensor pixel positions and fluxes (binned ADU)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray

    @classmethod
    def empty(cls) -> StarList:
        return cls(np.zeros(0), np.zeros(0), np.zeros(0))


@dataclass
class FrameMetrics:
    """Quality numbers of one frame. NaN (and ``reason``) where a number could not be measured."""

    path: str = ""
    n_stars: int = 0
    n_measured: int = 0  # stars that went into FWHM / elongation
    fwhm_px: float = math.nan
    fwhm_arcsec: float = math.nan
    elongation: float = math.nan  # major / minor axis, 1 = round
    roundness: float = math.nan  # minor / major axis
    background: float = math.nan  # sky level, ADU per sensor pixel and channel
    noise: float = math.nan  # sky noise, ADU per sensor pixel and channel
    star_flux: float = math.nan  # median aperture flux of the brightest stars (binned ADU)
    transparency: float = math.nan  # relative to the frame's pointing group (1 = typical)
    transparency_method: str = ""  # "matched" | "flux_level" | ""
    trail_flag: bool = False
    trail_length_px: float = 0.0
    saturated_fraction: float = 0.0
    group: int = -1  # pointing group (measure_frames)
    reason: str | None = None  # locale key saying why a metric is NaN / zero
    detail: str = ""
    stars: StarList = field(default_factory=StarList.empty, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (NaN -> None) for ``run_report.json`` and ``zemosaic plan --json``."""
        return {
            "path": self.path,
            "n_stars": int(self.n_stars),
            "n_measured": int(self.n_measured),
            "fwhm_px": _json_float(self.fwhm_px, 3),
            "fwhm_arcsec": _json_float(self.fwhm_arcsec, 3),
            "elongation": _json_float(self.elongation, 4),
            "roundness": _json_float(self.roundness, 4),
            "background": _json_float(self.background, 2),
            "noise": _json_float(self.noise, 3),
            "star_flux": _json_float(self.star_flux, 1),
            "transparency": _json_float(self.transparency, 4),
            "transparency_method": self.transparency_method,
            "trail_flag": bool(self.trail_flag),
            "trail_length_px": _json_float(self.trail_length_px, 1),
            "saturated_fraction": _json_float(self.saturated_fraction, 6),
            "group": int(self.group),
            "reason": self.reason,
            "detail": self.detail,
        }

    def filter_values(self) -> dict[str, float]:
        """The numeric metrics the Frame filter offers (``FrameInfo.metrics``); NaN when unknown."""
        return {
            "n_stars": float(self.n_stars),
            "fwhm_px": float(self.fwhm_px),
            "fwhm_arcsec": float(self.fwhm_arcsec),
            "elongation": float(self.elongation),
            "roundness": float(self.roundness),
            "background": float(self.background),
            "noise": float(self.noise),
            "transparency": float(self.transparency),
            "trail": 1.0 if self.trail_flag else 0.0,
        }


@dataclass
class QualityDecision:
    """Whether a frame is kept; if not, the first rule it fails, its value and the threshold."""

    accepted: bool
    rule: str | None = None
    value: float | None = None
    threshold: float | None = None
    median: float | None = None
    failed: list[dict[str, Any]] = field(default_factory=list)  # every failed rule

    @property
    def reason_key(self) -> str | None:
        return None if self.rule is None else f"frame_excluded_quality_{self.rule}"

    @property
    def detail(self) -> str:
        """Language-neutral numbers, e.g. ``fwhm 5.21 > 4.02 (median 2.68)``."""
        if self.rule is None:
            return ""
        text = f"{self.rule} {_fmt(self.value)} {'<' if self.rule in ('transparency', 'stars') else '>'} {_fmt(self.threshold)}"
        if self.median is not None:
            text += f" (median {_fmt(self.median)})"
        return text

    @property
    def params(self) -> dict[str, Any]:
        """Placeholders of the ``frame_excluded_quality_*`` message (plus ``detail``)."""
        return {"value": _fmt(self.value), "threshold": _fmt(self.threshold), "median": _fmt(self.median), "detail": self.detail}

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rule": self.rule,
            "reason_key": self.reason_key,
            "value": _json_float(self.value, 4),
            "threshold": _json_float(self.threshold, 4),
            "median": _json_float(self.median, 4),
            "failed": self.failed,
        }


@dataclass
class TileQuality:
    """Score of a master tile / mega-tile and its three ingredients (each in [0, 1])."""

    score: float
    coverage_term: float
    disparity: float  # |edge - centre| background, relative to the sky level
    disparity_term: float
    star_density: float  # stars per megapixel
    density_term: float

    def to_dict(self) -> dict[str, float]:
        return {name: round(float(value), 5) for name, value in self.__dict__.items()}


# ============================================================================ one frame


def measure_frame(
    data_or_cfa: Any,
    info: Any = None,
    xp: Any = np,
    *,
    bayer_pattern: str | None = None,
    pixel_scale_arcsec: float | None = None,
) -> FrameMetrics:
    """Metrics of one frame from its raw CFA plane ``(H, W)`` / ``(1, H, W)`` or image ``(C, H, W)``.

    ``info`` (a :class:`~.frames.FrameInfo`, optional) supplies the Bayer pattern (for a CFA
    layout), the pixel scale and the path; ``bayer_pattern`` / ``pixel_scale_arcsec`` override
    it. Arrays on another module ``xp`` (CuPy) are brought to the host (:func:`measure_planes`
    measures device arrays where they are).
    Never raises for bad pixels: NaN metrics and a ``reason`` instead.
    """
    path = str(getattr(info, "path", "") or "")
    pattern = bayer_pattern
    if pattern is None and info is not None and getattr(info, "layout", "") == "cfa":
        pattern = getattr(info, "bayer_pattern", None)
    scale = pixel_scale_arcsec if pixel_scale_arcsec is not None else _pixel_scale(info)
    data = _to_host(data_or_cfa, xp)
    plane, n_channels, green_parity = _measurement_plane(data, pattern)
    metrics = FrameMetrics(path=path)
    measure_planes(plane[None], n_channels, green_parity, [metrics])
    if scale and math.isfinite(metrics.fwhm_px):
        metrics.fwhm_arcsec = metrics.fwhm_px * scale
    return metrics


def measure_planes(
    planes: Any, n_channels: int, green_parity: int | None, metrics: Sequence[FrameMetrics], xp: Any = np
) -> None:
    """Measure planes ``(B, H, W)`` of one shape and type (raw CFA planes or channel sums) into
    ``metrics``, one per plane: a frame that cannot be measured gets a ``reason`` and stops there,
    the others go on. With CuPy as ``xp`` the pixel work of all planes runs on the device at once
    (binning, saturation, background, noise, detection, stamps, moments, apertures); the
    per-frame choices (trails, isolated stars) run on the host. One frame on NumPy is the same
    code with B = 1.
    """
    batch = _Batch(metrics)
    height, width = planes.shape[1:]
    if height < 8 or width < 8:
        batch.stop_all(REASON_NO_VALID_PIXELS, f"{width}x{height} px")
        return
    binned = _bin2x2_planes(planes, xp)
    invalid = _invalid_pixels(binned, planes.dtype, batch, xp)

    saturation, fraction = _saturation_planes(planes, binned, xp)
    for index in batch.alive():
        metrics[index].saturated_fraction = float(fraction[index])
        if fraction[index] > MAX_SATURATED_FRACTION:
            detail = f"{100 * fraction[index]:.1f} % of the pixels at {saturation[index]:g}"
            if fraction[index] >= 1.0 and not _is_full_scale(float(saturation[index]), planes.dtype):
                batch.stop(index, REASON_FLAT, detail)  # a constant image, not a clipped one
            else:
                batch.stop(index, REASON_SATURATED, detail)

    level, mesh_rms = _subtract_background(binned, invalid, xp)
    if invalid is not None:
        binned[invalid] = 0.0
    rms = _sky_noise_planes(binned, invalid, xp)
    rms = np.where(np.isfinite(rms), rms, mesh_rms)
    for index in batch.alive():
        metrics[index].background = float(level[index]) / (4.0 * n_channels)
        metrics[index].noise = float(rms[index]) / (2.0 * n_channels)
        if not (math.isfinite(rms[index]) and rms[index] > 0):
            batch.stop(index, REASON_FLAT, "the sky has no measurable noise")

    detection_rms = np.where(batch.alive_mask, rms, np.nan)  # no detection at all in stopped frames
    objects = _extract(binned, detection_rms, invalid, xp)
    sources = _star_candidates(planes, objects, batch, min(binned.shape[1:]), xp)
    fwhm, elongation = _star_shapes(planes, green_parity, sources, binned.shape[1:], saturation, xp)
    for index in batch.alive():
        good = np.isfinite(fwhm[index]) & (fwhm[index] >= MIN_STAR_FWHM_PX)
        metrics[index].n_measured = int(good.sum())
        if metrics[index].n_measured >= MIN_SHAPE_STARS:
            metrics[index].fwhm_px = float(np.median(fwhm[index][good]))
            metrics[index].elongation = float(np.median(elongation[index][good]))
            metrics[index].roundness = 1.0 / metrics[index].elongation
    stars = _star_fluxes(binned, invalid, sources, [metrics[index].fwhm_px for index in range(len(metrics))], xp)
    for index in batch.alive():
        metrics[index].stars = stars[index]
        if stars[index].flux.size:
            top = np.sort(stars[index].flux)[::-1][:FLUX_LEVEL_STARS]
            metrics[index].star_flux = float(np.median(top))
        if metrics[index].n_measured < MIN_SHAPE_STARS:
            detail = f"{metrics[index].n_measured} measurable star(s) of {metrics[index].n_stars}"
            batch.stop(index, REASON_TOO_FEW_STARS, detail)


class _Batch:
    """Which frames of a measured batch are still going, and why the others stopped."""

    def __init__(self, metrics: Sequence[FrameMetrics]) -> None:
        self.metrics = metrics
        self.alive_mask = np.ones(len(metrics), dtype=bool)

    def alive(self) -> list[int]:
        return [int(index) for index in np.flatnonzero(self.alive_mask)]

    def stop(self, index: int, key: str, detail: str = "") -> None:
        self.metrics[index].reason, self.metrics[index].detail = key, detail
        self.alive_mask[index] = False

    def stop_all(self, key: str, detail: str = "") -> None:
        for index in self.alive():
            self.stop(index, key, detail)


def _invalid_pixels(binned: Any, dtype: np.dtype, batch: _Batch, xp: Any) -> Any:
    """Binned cells with a NaN (set to 0 in ``binned``), or None where every cell is finite;
    frames without any finite cell are stopped. Integer pixels sum to finite values: no test."""
    if np.dtype(dtype).kind in "ui":
        return None
    invalid = ~xp.isfinite(binned)
    flat = invalid.reshape(invalid.shape[0], -1)
    some, every = _to_host(xp.any(flat, axis=1), xp), _to_host(xp.all(flat, axis=1), xp)
    for index in np.flatnonzero(every):
        batch.stop(int(index), REASON_NO_VALID_PIXELS, "no finite pixel")
    if not some.any():
        return None
    binned[invalid] = 0.0
    return invalid


def _star_candidates(planes: Any, objects: np.ndarray, batch: _Batch, short_side: int, xp: Any) -> list[np.ndarray]:
    """Per frame: its detected objects less trail segments and single-pixel hits (sets the trail
    metrics and ``n_stars``; a frame with no star left is stopped)."""
    bounds = np.searchsorted(objects["frame"], np.arange(len(batch.metrics) + 1))
    sources = [objects[bounds[index] : bounds[index + 1]] for index in range(len(batch.metrics))]
    for index in batch.alive():
        trail, trail_length_binned = _find_trails(sources[index], short_side)
        batch.metrics[index].trail_flag = bool(trail.any())
        batch.metrics[index].trail_length_px = 2.0 * trail_length_binned
        sources[index] = sources[index][~trail]
    hits = _single_pixel_sources(planes, sources, xp)
    for index in batch.alive():
        sources[index] = sources[index][~hits[index]]
        batch.metrics[index].n_stars = int(sources[index].size)
        if sources[index].size == 0:
            batch.stop(index, REASON_NO_STARS, f"nothing above {DETECT_SIGMA:g} sigma")
    for index in np.flatnonzero(~batch.alive_mask):
        sources[index] = sources[index][:0]
    return sources


# ----------------------------------------------------------------------------- pieces


def _to_host(array: Any, xp: Any) -> np.ndarray:
    if xp is not np and hasattr(xp, "asnumpy"):
        return xp.asnumpy(array)
    if hasattr(array, "get") and not isinstance(array, np.ndarray):
        return array.get()
    return np.asarray(array)


def _measurement_plane(data: np.ndarray, pattern: str | None) -> tuple[np.ndarray, int, int | None]:
    """(plane, channels summed, green checkerboard parity or None for 'every pixel')."""
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 2:
        return data, 1, green_parity(pattern)
    if data.ndim != 3:
        raise ValueError(f"expected (H, W) or (C, H, W), got {data.shape}")
    luminance = data.sum(axis=0, dtype=np.float32)
    return luminance, int(data.shape[0]), None


def green_parity(pattern: str | None) -> int | None:
    """The (row + column) parity of a CFA's green sites (greens on the even diagonal when the
    pattern starts with G), or None for data without a pattern (every pixel measured)."""
    if not pattern:
        return None
    return 0 if pattern.strip().upper()[0] == "G" else 1


def _bin2x2_planes(planes: Any, xp: Any) -> Any:
    """:func:`_bin2x2` of each plane (B, H, W): the banded host version for one NumPy plane, four
    strided adds of all planes otherwise (exact integer sums for 16-bit pixels either way)."""
    if xp is np and planes.shape[0] == 1:
        return _bin2x2(planes[0])[None]
    height, width = planes.shape[1] // 2 * 2, planes.shape[2] // 2 * 2
    binned = planes[:, 0:height:2, 0:width:2].astype(np.float32)
    binned += planes[:, 0:height:2, 1:width:2]
    binned += planes[:, 1:height:2, 0:width:2]
    binned += planes[:, 1:height:2, 1:width:2]
    return binned


def _bin2x2(plane: np.ndarray) -> np.ndarray:
    """Sum of each 2x2 cell as float32 (odd last row/column dropped). Four strided adds (two
    per band of rows for 8/16-bit integers)."""
    height, width = plane.shape[0] // 2 * 2, plane.shape[1] // 2 * 2
    if plane.dtype.kind in "ui" and plane.dtype.itemsize <= 2:
        # Sums of four 16-bit values are integers below 2**24: exact in float32 in any order.
        # Row pairs are added straight into float32, then column pairs, a band of rows at a
        # time: the row sums stay in the core's cache instead of a full-size temporary.
        binned = np.empty((height // 2, width // 2), dtype=np.float32)
        band = max(1, BIN_BAND_VALUES // max(width, 1))
        rows = np.empty((min(band, height // 2), width), dtype=np.float32)
        for start in range(0, height // 2, band):
            stop = min(start + band, height // 2)
            pairs = rows[: stop - start]
            np.add(plane[2 * start : 2 * stop : 2, :width], plane[2 * start + 1 : 2 * stop : 2, :width], out=pairs, dtype=np.float32)
            np.add(pairs[:, 0::2], pairs[:, 1::2], out=binned[start:stop])
        return binned
    binned = plane[0:height:2, 0:width:2].astype(np.float32)
    binned += plane[0:height:2, 1:width:2]
    binned += plane[1:height:2, 0:width:2]
    binned += plane[1:height:2, 1:width:2]
    return binned


def _subtract_background(binned: Any, invalid: Any, xp: Any) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the mesh background (:func:`.detect.subtract_mesh_background`, meshes of
    ``BACKGROUND_MESH`` binned px) in place; returns each plane's sky level and meshes' noise."""
    from .detect import subtract_mesh_background

    height, width = binned.shape[1:]
    mesh = 2 * max(4, min(BACKGROUND_MESH // 2, height // 4, width // 4))
    return subtract_mesh_background(binned, mesh, invalid, xp)


def _sky_noise_planes(binned: Any, invalid: Any, xp: Any) -> np.ndarray:
    """:func:`_sky_noise` of each plane (host array): frame by frame on the host, all planes at
    once on the device (the same order statistics, from one sort per plane)."""
    if xp is np or invalid is not None:
        host = _to_host(binned, xp)
        mask = None if invalid is None else _to_host(invalid, xp)
        return np.array([_sky_noise(host[index], None if mask is None else mask[index]) for index in range(host.shape[0])])
    from .detect import sorted_range_median

    count, height, width = binned.shape
    rows = binned[:, :: _noise_row_step(height, width)]
    delta = xp.sort((rows[:, :, 1:] - rows[:, :, :-1]).reshape(count, -1), axis=1)
    if delta.shape[1] < 16:
        return np.full(count, math.nan)
    size = delta.shape[1]
    everything = (xp.zeros(count, dtype=np.int64), xp.full(count, size, dtype=np.int64))
    median = sorted_range_median(delta, *everything, xp)
    deviation = xp.sort(xp.abs(delta - median[:, None]), axis=1)
    sigma = 1.4826 * sorted_range_median(deviation, *everything, xp) / math.sqrt(2.0)
    # The kept values (|delta - median| <= bound) are one contiguous range of the sorted deltas.
    bound = (4.0 * math.sqrt(2.0) * sigma)[:, None]
    low = xp.sum(delta < median[:, None] - bound, axis=1)
    high = xp.sum(delta <= median[:, None] + bound, axis=1)
    kept_median = sorted_range_median(delta, low, high, xp)
    positions = xp.arange(size)[None, :]
    inside = (positions >= low[:, None]) & (positions < high[:, None])
    kept_deviation = xp.sort(xp.where(inside, xp.abs(delta - kept_median[:, None]), np.inf), axis=1)
    kept_sigma = 1.4826 * sorted_range_median(kept_deviation, xp.zeros_like(low), high - low, xp) / math.sqrt(2.0)
    sigma = xp.where(high - low >= 16, kept_sigma, sigma)
    return _to_host(sigma, xp).astype(np.float64)


def _noise_row_step(height: int, width: int) -> int:
    """Every how many rows the noise is sampled (odd: both colours of a CFA row pair)."""
    return max(1, int(height * width / NOISE_SAMPLES) // 2 * 2 + 1)


def _sky_noise(binned: np.ndarray, invalid: np.ndarray | None) -> float:
    """Pixel noise of the binned image from neighbour differences: 1.4826 x MAD(Δ) / √2.

    Differences of adjacent pixels cancel everything smooth (sky gradients, nebulae that a
    mesh background cannot follow), which a plain MAD of the residual, or sep's mesh
    ``globalrms``, would count as noise. Rows are strided to bound the cost.
    """
    step = _noise_row_step(*binned.shape)
    rows = binned[::step]
    delta = rows[:, 1:] - rows[:, :-1]
    usable = np.isfinite(delta)
    if invalid is not None:
        bad = invalid[::step]
        usable &= ~(bad[:, 1:] | bad[:, :-1])
    # np.compress, not a boolean index: the same values in the same order, several times faster.
    delta = delta.ravel() if usable.all() else np.compress(usable.ravel(), delta)
    if delta.size < 16:
        return math.nan
    median = float(exact_median(delta))
    deviation = np.abs(delta - median)
    sigma = 1.4826 * float(exact_median(deviation)) / math.sqrt(2.0)
    # One clipping pass: star edges make the tails heavy, not the core.
    kept = np.compress(deviation <= 4.0 * math.sqrt(2.0) * sigma, delta)
    if kept.size >= 16:
        sigma = 1.4826 * float(exact_median(np.abs(kept - exact_median(kept)))) / math.sqrt(2.0)
    return sigma


def _saturation_planes(planes: Any, binned: Any, xp: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_saturation` of each plane (host arrays): with the candidate-cell count for one
    NumPy plane, one comparison of all planes with their peaks on the device."""
    if xp is np:
        pairs = [_saturation(planes[index], binned[index]) for index in range(planes.shape[0])]
        return np.array([pair[0] for pair in pairs]), np.array([pair[1] for pair in pairs])
    flat = planes.reshape(planes.shape[0], -1)
    peak = xp.nanmax(flat, axis=1) if planes.dtype.kind == "f" else xp.max(flat, axis=1)
    count = xp.sum(flat >= peak[:, None], axis=1)
    peak, count = _to_host(peak, xp).astype(np.float64), _to_host(count, xp)
    clipped = np.isfinite(peak) & (count >= SATURATION_MIN_PIXELS)
    return np.where(clipped, peak, np.inf), np.where(clipped, count / flat.shape[1], 0.0)


def _saturation(plane: np.ndarray, binned: np.ndarray) -> tuple[float, float]:
    """(level, fraction of pixels at it): a plateau at the maximum means clipping; else (inf, 0).

    ``binned``: :func:`_bin2x2` of ``plane``, before anything is subtracted from it."""
    peak = float(np.nanmax(plane)) if plane.dtype.kind == "f" else float(plane.max())
    if not math.isfinite(peak):
        return math.inf, 0.0
    at_peak = _count_at_least(plane, binned, peak)
    if at_peak < SATURATION_MIN_PIXELS:
        return math.inf, 0.0
    return peak, at_peak / plane.size


_CELL_DY = np.array([0, 0, 1, 1])
_CELL_DX = np.array([0, 1, 0, 1])


def _count_at_least(plane: np.ndarray, binned: np.ndarray, level: float) -> int:
    """Pixels of ``plane`` >= ``level``, as ``np.count_nonzero(plane >= level)``.

    Unsigned pixels are never negative, so one >= level lies in a 2x2 cell whose (exact)
    binned sum is >= level too: only those cells, usually a handful, and the odd last
    row/column that binning drops, are looked at instead of the whole plane.
    """
    if plane.dtype.kind != "u" or plane.dtype.itemsize > 2:
        return int(np.count_nonzero(plane >= level))
    cells = np.flatnonzero(binned >= level)
    if cells.size > binned.size // 16:  # a low peak (a dark frame): the plain count is cheaper
        return int(np.count_nonzero(plane >= level))
    y, x = np.divmod(cells, binned.shape[1])
    corners = plane[2 * y[:, None] + _CELL_DY, 2 * x[:, None] + _CELL_DX]  # (cells, 4)
    count = int(np.count_nonzero(corners >= level))
    height, width = plane.shape
    if height % 2:
        count += int(np.count_nonzero(plane[-1] >= level))
    if width % 2:
        count += int(np.count_nonzero(plane[: height - height % 2, -1] >= level))
    return count


def _is_full_scale(value: float, dtype: np.dtype) -> bool:
    """The top of the range: the integer type's maximum, 16-bit 65535, or 1.0 for normalised data."""
    if np.dtype(dtype).kind in "iu" and value >= np.iinfo(dtype).max:
        return True
    return value in FULL_SCALE_VALUES


def _extract(binned: Any, rms: np.ndarray, invalid: Any, xp: Any) -> np.ndarray:
    """Sources above ``DETECT_SIGMA`` x each plane's ``rms`` (:func:`.detect.detect_sources`)."""
    from .detect import detect_sources

    return detect_sources(binned, rms, DETECT_SIGMA, DETECT_MIN_AREA, invalid, xp)


def _find_trails(objects: np.ndarray, short_side: int) -> tuple[np.ndarray, float]:
    """Streak segments (very elongated sources) and their summed length if it is long enough.

    A uniform line of length L has a second-moment major axis of L / sqrt(12). Segments of one
    trail share its orientation; the longest aligned family is measured.
    """
    if objects.size == 0:
        return np.zeros(0, dtype=bool), 0.0
    a, b = objects["a"], np.maximum(objects["b"], 1e-3)
    thin = (a / b >= TRAIL_MIN_AXIS_RATIO) & (a >= 2.0)
    if not thin.any():
        return np.zeros(objects.size, dtype=bool), 0.0
    length = math.sqrt(12.0) * a
    theta = objects["theta"]
    best, best_length = np.zeros(objects.size, dtype=bool), 0.0
    for index in np.flatnonzero(thin):
        # Orientation difference modulo pi.
        delta = np.abs(((theta - theta[index]) + math.pi / 2) % math.pi - math.pi / 2)
        family = thin & (delta < math.radians(5.0))
        total = float(length[family].sum())
        if total > best_length:
            best, best_length = family, total
    if best_length < TRAIL_MIN_LENGTH_FRACTION * short_side:
        # Short thin things (a galaxy, a blend) are left to the star pipeline.
        return np.zeros(objects.size, dtype=bool), 0.0
    return best, best_length


def _single_pixel_sources(planes: Any, sources: list[np.ndarray], xp: Any) -> list[np.ndarray]:
    """Per frame, True for hot pixels and cosmic-ray hits: one sensor pixel whose 8 neighbours
    stay at the sky.

    Binning and the detection's smoothing make a hot CFA site look like a small star, so each
    source is checked on the full-resolution plane: at its brightest pixel, the second
    largest excess of the 8 immediate neighbours (any colour) is compared with the peak's.
    A star of FWHM >= 1.5 px lifts its neighbours to > 0.2 of the peak whatever its colour.
    """
    height, width = planes.shape[1:]
    half = 3
    frame, selected = _source_table(sources)
    if frame.size == 0:
        return [np.zeros(part.size, dtype=bool) for part in sources]
    cx = np.floor(2.0 * selected["x"] + 1.0).astype(np.int64)
    cy = np.floor(2.0 * selected["y"] + 1.0).astype(np.int64)
    inside = (cx >= half) & (cx < width - half) & (cy >= half) & (cy < height - half)
    index = np.flatnonzero(inside)
    hit = np.zeros(frame.size, dtype=bool)
    if index.size:
        stamps = _gather_stamps(planes, frame[index], cy[index], cx[index], half, xp, keep_on_device=True)
        hit[index] = _single_pixel_stamps(stamps.astype(np.float32), planes.dtype.kind in "ui", xp)
    return _split_by_frame(hit, sources)


def _single_pixel_stamps(stamps: Any, integer: bool, xp: Any) -> np.ndarray:
    """:func:`_single_pixel_sources`' test of stamps (S, 7, 7) centred on the sources (host result)."""
    count, side = stamps.shape[0], stamps.shape[1]
    flat = stamps.reshape(count, -1)
    if integer:  # no NaN to skip or zero: the same numbers, a third of the work
        sky = _row_median(flat) if xp is np else nanmedian_rows(flat, xp)
        excess = stamps - sky[:, None, None]
    else:
        excess = xp.nan_to_num(stamps - nanmedian_rows(flat, xp)[:, None, None], nan=0.0)
    core = excess[:, 1:-1, 1:-1].reshape(count, -1)  # the peak's neighbours stay inside
    peak = xp.argmax(core, axis=1)
    py, px = peak // (side - 2) + 1, peak % (side - 2) + 1
    rows = py[:, None] + xp.asarray([-1, -1, -1, 0, 0, 1, 1, 1])[None, :]
    cols = px[:, None] + xp.asarray([-1, 0, 1, -1, 1, -1, 0, 1])[None, :]
    neighbours = excess[xp.arange(count)[:, None], rows, cols]
    second = xp.sort(neighbours, axis=1)[:, -2]
    peak_excess = core[xp.arange(count), peak]
    return _to_host((peak_excess > 0) & (second < SINGLE_PIXEL_FRACTION * peak_excess), xp)


def _source_table(sources: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All frames' sources in one array, with the frame each came from."""
    frame = np.concatenate([np.full(part.size, index, dtype=np.int64) for index, part in enumerate(sources)])
    return frame, np.concatenate(sources)


def _split_by_frame(values: np.ndarray, sources: list[np.ndarray]) -> list[np.ndarray]:
    """``values`` of :func:`_source_table`'s rows, back into one array per frame."""
    return np.split(values, np.cumsum([part.size for part in sources])[:-1])


def _gather_stamps(
    planes: Any, frame: np.ndarray, cy: np.ndarray, cx: np.ndarray, half: int, xp: Any, keep_on_device: bool = False
) -> Any:
    """Copies of ``planes[frame, cy - half : cy + half + 1, cx - half : cx + half + 1]`` (all
    inside), (n, side, side): windows of a strided view for one NumPy plane, one gather of flat
    indices otherwise; on the host unless ``keep_on_device``."""
    side = 2 * half + 1
    if xp is np and planes.shape[0] == 1:
        windows = np.lib.stride_tricks.sliding_window_view(planes[0], (side, side))
        return windows[cy - half, cx - half]
    height, width = planes.shape[1:]
    offsets = np.arange(-half, half + 1)
    flat = frame[:, None, None] * (height * width) + (cy[:, None, None] + offsets[None, :, None]) * width + (cx[:, None, None] + offsets[None, None, :])
    stamps = planes.ravel()[xp.asarray(flat.ravel())].reshape(frame.size, side, side)
    return stamps if keep_on_device else _to_host(stamps, xp)


def _star_shapes(
    planes: Any,
    green_parity: int | None,
    sources: list[np.ndarray],
    binned_shape: tuple[int, int],
    saturation: np.ndarray,
    xp: Any,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per frame, FWHM (px) and elongation of its brightest isolated stars: the stars chosen frame
    by frame, their adaptive moments iterated on all stamps of one size at once."""
    choices = [_shape_stars(part, planes.shape[1:]) for part in sources]
    fwhm = [np.zeros(0) for _ in sources]
    elongation = [np.zeros(0) for _ in sources]
    for half in sorted({choice[1] for choice in choices if choice[0].size}):
        frames = [index for index, choice in enumerate(choices) if choice[0].size and choice[1] == half]
        stars = [sources[index][choices[index][0]] for index in frames]
        frame = np.concatenate([np.full(part.size, index, dtype=np.int64) for index, part in zip(frames, stars)])
        star_saturation = saturation[frame]
        values, elongations = _shape_moments(planes, frame, np.concatenate(stars), half, green_parity, star_saturation, xp)
        bounds = np.cumsum([0] + [part.size for part in stars])
        for position, index in enumerate(frames):
            fwhm[index] = values[bounds[position] : bounds[position + 1]]
            elongation[index] = elongations[bounds[position] : bounds[position + 1]]
    return fwhm, elongation


def _shape_stars(sources: np.ndarray, plane_shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Which sources of a frame get their shape measured (brightest first) and the stamp half-size."""
    from scipy.spatial import cKDTree

    clean = (sources["flag"] & (FLAG_MERGED | FLAG_TRUNCATED)) == 0
    if not clean.any():
        return np.zeros(0, dtype=np.int64), 0
    # Stamp size from the typical detected size (binned sigma x 2 = sensor px): the weight
    # (sigma x sqrt(WEIGHT_RATIO)) must fade out within it, and a ring for the sky fit in.
    size = 2.0 * float(np.median(np.sqrt(0.5 * (sources["x2"][clean] + sources["y2"][clean]))))
    half = min(max(math.ceil(3.5 * math.sqrt(1.0 + WEIGHT_RATIO) * size), STAMP_HALF_RANGE[0]), STAMP_HALF_RANGE[1])
    x = 2.0 * sources["x"] + 0.5
    y = 2.0 * sources["y"] + 0.5
    height, width = plane_shape
    inside = (x >= half + 1) & (x <= width - half - 2) & (y >= half + 1) & (y <= height - half - 2)
    if sources.size > 1:
        points = np.column_stack([x, y])
        # Neighbours beyond twice the isolation radius are not searched for (they come back as
        # inf): the search stops early; a neighbour within the radius has the same distance.
        distance, _ = cKDTree(points).query(points, k=2, distance_upper_bound=3.0 * half)
        isolated = distance[:, 1] > 1.5 * half
    else:
        isolated = np.ones(1, dtype=bool)
    usable = np.flatnonzero(clean & inside & isolated)
    if usable.size == 0:
        return np.zeros(0, dtype=np.int64), half
    pixels = (2 * half + 1) ** 2
    n_stars = min(MAX_SHAPE_STARS, max(MIN_SHAPE_STARS, MAX_STAMP_VALUES // pixels))
    return usable[np.argsort(-sources["flux"][usable], kind="stable")[:n_stars]], half


def _shape_moments(
    planes: Any,
    frame: np.ndarray,
    stars: np.ndarray,
    half: int,
    green_parity: int | None,
    saturation: np.ndarray,
    xp: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """FWHM and elongation of stars (host arrays) from stamps of ``2 half + 1`` px of their planes."""
    x = 2.0 * stars["x"] + 0.5
    y = 2.0 * stars["y"] + 0.5
    centre_x = np.floor(x + 0.5).astype(np.int64)
    centre_y = np.floor(y + 0.5).astype(np.int64)
    offsets = np.arange(-half, half + 1)
    side = 2 * half + 1
    stamps = _gather_stamps(planes, frame, centre_y, centre_x, half, xp, keep_on_device=True)
    stamps = stamps.astype(np.float64).reshape(frame.size, -1)
    dy = np.broadcast_to(offsets[:, None], (side, side)).ravel().astype(np.float64)
    dx = np.broadcast_to(offsets[None, :], (side, side)).ravel().astype(np.float64)
    valid = xp.isfinite(stamps)
    if green_parity is not None:  # sensor (row + column) parity = centre's + offset's
        parity = (centre_y + centre_x)[:, None] + (offsets[:, None] + offsets[None, :]).ravel()[None, :]
        valid &= xp.asarray((parity & 1) == green_parity)
    unsaturated = ~xp.any(valid & (stamps >= xp.asarray(saturation)[:, None]), axis=1)
    ring = xp.asarray(np.flatnonzero(np.maximum(np.abs(dx), np.abs(dy)) >= half - 1))
    # The sky from the ring pixels alone (the NaN elsewhere never entered the median).
    sky = nanmedian_rows(xp.where(valid[:, ring], stamps[:, ring], np.nan), xp)
    values = xp.where(valid, stamps - sky[:, None], 0.0)

    start = np.column_stack([x - centre_x, y - centre_y, 4.0 * stars["x2"], 4.0 * stars["y2"], 4.0 * stars["xy"]])
    cxx, cyy, cxy, converged = _adaptive_moments(values, valid.astype(np.float64), dx, dy, xp.asarray(start), xp)
    # Remove the pixel integration (a 1 px box: variance 1/12 per axis).
    cxx, cyy = cxx - 1.0 / 12.0, cyy - 1.0 / 12.0
    trace, det = cxx + cyy, cxx * cyy - cxy * cxy
    spread = xp.sqrt(xp.maximum(trace * trace / 4.0 - det, 0.0))
    major, minor = trace / 2.0 + spread, trace / 2.0 - spread
    ok = converged & unsaturated & xp.isfinite(major) & (minor > 0) & xp.isfinite(sky)
    safe_minor = xp.where(ok, minor, 1.0)
    safe_major = xp.where(ok, major, 1.0)
    fwhm = xp.where(ok, FWHM_PER_SIGMA * (safe_major * safe_minor) ** 0.25, np.nan)
    elongation = xp.where(ok, xp.sqrt(safe_major / safe_minor), np.nan)
    return _to_host(fwhm, xp), _to_host(elongation, xp)


def _adaptive_moments(
    values: Any, valid: Any, dx: np.ndarray, dy: np.ndarray, start: Any, xp: Any = np
) -> tuple[Any, Any, Any, Any]:
    """Gaussian-weighted adaptive second moments of many stamps at once.

    ``values`` (S, P) background-subtracted, ``valid`` (S, P) 0/1, ``dx, dy`` (P,) pixel
    offsets from each stamp's centre pixel, ``start`` (S, 5): centroid x, y (offsets) and
    covariance xx, yy, xy. The weight's covariance is W = r·C with C the current estimate of
    the star's (r = ``WEIGHT_RATIO``). For a Gaussian star the weighted moment is then
    M = (C⁻¹ + W⁻¹)⁻¹ = C·r/(r+1) exactly and the weighted centroid moves r/(r+1) of the
    way to the true one, so C ← M·(r+1)/r and c ← c + (r+1)/r·(weighted offset) has the
    star as its fixed point. r > 1 keeps the weighted profile wide enough that a sparse
    lattice (the CFA green sites) samples it without aliasing.
    Returns the star covariance (xx, yy, xy) and which stamps converged (arrays of ``xp``).
    """
    from .gpu import fused_adaptive_moments

    masked = (values * valid).astype(np.float32)
    fused = fused_adaptive_moments(masked, dx, dy, start, ADAPTIVE_ITERATIONS, WEIGHT_RATIO, CONVERGENCE, xp)
    if fused is not None:  # CuPy: the same iterations in one kernel (one block per star)
        return fused
    gain = (WEIGHT_RATIO + 1.0) / WEIGHT_RATIO
    n_stars = values.shape[0]
    cx, cy = start[:, 0].copy(), start[:, 1].copy()
    cxx = xp.clip(start[:, 2], 0.5, 25.0)
    cyy = xp.clip(start[:, 3], 0.5, 25.0)
    cxy = xp.clip(start[:, 4], -0.9 * xp.sqrt(cxx * cyy), 0.9 * xp.sqrt(cxx * cyy))
    converged = xp.zeros(n_stars, dtype=bool)
    active = xp.arange(n_stars)  # neither converged nor given up
    limit = float(np.max(np.abs(dx)))
    dx32, dy32 = xp.asarray(dx, dtype=np.float32), xp.asarray(dy, dtype=np.float32)
    for _ in range(ADAPTIVE_ITERATIONS):
        if active.size == 0:
            break
        wxx, wyy, wxy = WEIGHT_RATIO * cxx[active], WEIGHT_RATIO * cyy[active], WEIGHT_RATIO * cxy[active]
        det = wxx * wyy - wxy * wxy
        ixx, iyy, ixy = (wyy / det).astype(np.float32), (wxx / det).astype(np.float32), (-wxy / det).astype(np.float32)
        ox = dx32[None, :] - cx[active, None].astype(np.float32)
        oy = dy32[None, :] - cy[active, None].astype(np.float32)
        q = ixx[:, None] * ox * ox
        q += (2.0 * ixy[:, None]) * ox * oy
        q += iyy[:, None] * oy * oy
        q *= -0.5
        weighted = xp.exp(q, out=q)
        weighted *= masked[active]
        total = weighted.sum(axis=1, dtype=np.float64)
        alive = total > 0
        total = xp.where(alive, total, 1.0)
        wx, wy = weighted * ox, weighted * oy
        mx = wx.sum(axis=1, dtype=np.float64) / total
        my = wy.sum(axis=1, dtype=np.float64) / total
        new_xx = gain * ((wx * ox).sum(axis=1, dtype=np.float64) / total - mx * mx)
        new_yy = gain * ((wy * oy).sum(axis=1, dtype=np.float64) / total - my * my)
        new_xy = gain * ((wx * oy).sum(axis=1, dtype=np.float64) / total - mx * my)
        alive &= (new_xx > 0.05) & (new_yy > 0.05) & (new_xx * new_yy - new_xy * new_xy > 0.0025)
        alive &= (new_xx < limit * limit) & (new_yy < limit * limit)
        change = xp.abs(new_xx - cxx[active]) + xp.abs(new_yy - cyy[active]) + xp.abs(new_xy - cxy[active])
        step = xp.hypot(mx, my) * gain
        done = alive & (change < CONVERGENCE * (cxx[active] + cyy[active])) & (step < CONVERGENCE)
        cxx[active] = xp.where(alive, new_xx, cxx[active])
        cyy[active] = xp.where(alive, new_yy, cyy[active])
        cxy[active] = xp.where(alive, new_xy, cxy[active])
        cx[active] += xp.where(alive, xp.clip(gain * mx, -1.0, 1.0), 0.0)
        cy[active] += xp.where(alive, xp.clip(gain * my, -1.0, 1.0), 0.0)
        alive &= (xp.abs(cx[active]) < limit) & (xp.abs(cy[active]) < limit)
        converged[active[done & alive]] = True
        active = active[alive & ~done]
    return cxx, cyy, cxy, converged


def _star_fluxes(
    binned: Any, invalid: Any, sources: list[np.ndarray], fwhm_px: Sequence[float], xp: Any
) -> list[StarList]:
    """Per frame, aperture fluxes (background-subtracted binned image) of its brightest clean sources."""
    from .detect import aperture_sums

    chosen, radius = [], []
    for part, fwhm in zip(sources, fwhm_px):
        # A group of two stars (merged) has its centroid between them: no star's position.
        clean = np.flatnonzero((part["flag"] & (FLAG_MERGED | FLAG_TRUNCATED)) == 0)
        chosen.append(clean[np.argsort(-part["flux"][clean], kind="stable")[:MAX_FLUX_STARS]])
        typical = fwhm if math.isfinite(fwhm) else 3.0
        radius.append(np.full(chosen[-1].size, max(2.0, APERTURE_FWHM * typical / 2.0)))  # binned px
    picked = [part[rows] for part, rows in zip(sources, chosen)]
    frame, table = _source_table(picked)
    flux, keep = aperture_sums(binned, frame, table["x"], table["y"], np.concatenate(radius), invalid, xp)
    keep &= np.isfinite(flux) & (flux > 0)
    stars = []
    for part, part_flux, part_keep in zip(picked, _split_by_frame(flux, picked), _split_by_frame(keep, picked)):
        kept = part[part_keep]
        stars.append(StarList(2.0 * kept["x"] + 0.5, 2.0 * kept["y"] + 0.5, np.asarray(part_flux[part_keep], dtype=np.float64)))
    return stars


def _pixel_scale(info: Any) -> float | None:
    """arcsec per pixel from the WCS, else from the header optics."""
    if info is None:
        return None
    wcs = getattr(info, "wcs", None)
    if wcs is not None:
        try:
            from astropy.wcs.utils import proj_plane_pixel_scales

            from .canvas import celestial_part

            scales = proj_plane_pixel_scales(celestial_part(wcs))
            return float(np.sqrt(scales[0] * scales[1]) * 3600.0)
        except Exception:  # a WCS astropy cannot reduce: fall back to the header
            pass
    scale = getattr(info, "header_scale_arcsec", None)
    return float(scale) if scale else None


# ============================================================================ many frames


def load_measurement_data(info: Any) -> np.ndarray:
    """The raw plane measure_frame wants: the CFA plane as stored (no debayer), else (C, H, W).

    Integer pixels that need no general scaling (a Seestar's BZERO 32768 16-bit, for one) are read
    straight from where they lie in the file (:func:`.frames.raw_pixel_plan`): the same values,
    in half the time of astropy's read and scaling (which took about 40 % of a frame's measurement
    on the 2-core development box).
    """
    from .frames import _read_raw_image, _scaled_pixels, _to_chw, raw_pixel_plan

    plan = raw_pixel_plan(info)
    if plan is not None:
        pixels = plan.load(np)
    else:
        raw, header = _read_raw_image(info)
        pixels, _ = _scaled_pixels(raw, header)
    if info.layout == "cfa":
        return pixels if pixels.ndim == 2 else pixels.reshape(info.shape)
    return _to_chw(pixels, info.layout, info.shape, np)


def measure_one(info: Any, pixel_scale: float | None = None) -> FrameMetrics:
    """Read one frame's raw pixels and measure them; an unreadable file gives a reason, not an error.

    ``pixel_scale`` (arcsec per pixel) overrides the one of ``info``'s WCS."""
    from .frames import FrameError

    try:
        data = load_measurement_data(info)
    except FrameError as exc:
        return FrameMetrics(path=str(info.path), reason=REASON_UNREADABLE, detail=f"{exc.reason_key}: {exc.detail}")
    except (OSError, ValueError) as exc:
        return FrameMetrics(path=str(info.path), reason=REASON_UNREADABLE, detail=f"{type(exc).__name__}: {exc}")
    return measure_frame(data, info, pixel_scale_arcsec=pixel_scale)


#: From this many frames the default measurement runs in a pool of processes: the metrics are
#: mostly Python-level NumPy calls that hold the GIL, so threads of one process do not scale.
PROCESS_MEASURE_MIN_FRAMES = 48


def _measure_light(
    info: Any, pixel_scale: float | None, star_file: Path | None = None
) -> tuple[FrameMetrics, str | None]:
    """:func:`measure_one` in a worker process, for a FrameInfo sent without its WCS and header
    (pickling those costs the main process milliseconds per frame; the pixel scale, the only
    thing the metrics take from the WCS, comes computed). With ``star_file`` the frame's star
    list is written there too (see :func:`_write_star_file`). Returns the metrics and the SHA-256
    of the star file, None where none was written."""
    metrics = measure_one(info, pixel_scale)
    return metrics, (None if star_file is None else _write_star_file(star_file, metrics))


#: A frame whose metrics carry one of these reasons is not a finished ``metrics`` resume unit
#: (its pixels could not be read: the loader excludes it with the exact reason, every run).
UNRECORDED_REASONS = (REASON_NO_VALID_PIXELS, REASON_UNREADABLE)


def _write_star_file(path: Path, metrics: FrameMetrics) -> str | None:
    """Write ``metrics.stars`` as the ``metrics`` resume unit's file (``resume.save_unit_arrays``,
    x / y / flux); its SHA-256. None, and nothing written, for a frame that is not a unit or when
    the write fails (the run's process writes it again and reports the error)."""
    from .resume import save_unit_arrays

    if metrics.reason in UNRECORDED_REASONS:
        return None
    try:
        return save_unit_arrays(path, durable=False, x=metrics.stars.x, y=metrics.stars.y, flux=metrics.stars.flux)
    except Exception:  # a full disk, a vanished cache: the run's process tries again and says why
        return None


#: Niceness added to the measuring processes: they are throughput work, while the run's own
#: threads (feeding the GPU, drawing the viewer) must not queue for a core behind them.
MEASURE_WORKER_NICENESS = 5


def _lower_worker_priority() -> None:
    try:
        os.nice(MEASURE_WORKER_NICENESS)
    except (AttributeError, OSError):  # no os.nice (Windows) or not allowed: run at the usual priority
        pass


def _measure_executor(
    frames: Sequence[Any],
    config: dict[str, Any],
    measure: Callable[[Any], FrameMetrics],
    geometry: _FrameGeometry | None = None,
    star_file: Callable[[int], Path | None] | None = None,
) -> tuple[Any, Callable[[int], Any]]:
    """A process pool for the default measurement of many frames, else a thread pool.

    ``geometry`` holds the frames' pixel scales, computed once per run of :func:`measure_frames`
    (the transparency needs them again). ``star_file(index)``: where the default measurement
    writes the frame's star list (None: nowhere). A future's result is ``(metrics, SHA-256 of
    the star file or None)``."""
    total = len(frames)
    geometry = geometry if geometry is not None else _FrameGeometry(frames)
    star_file = star_file if star_file is not None else (lambda index: None)
    if measure is measure_one and total >= PROCESS_MEASURE_MIN_FRAMES and (os.cpu_count() or 1) >= 4:
        from dataclasses import replace

        from .mosaic_first import _main_module_is_importable
        from .worker_env import process_context

        if _main_module_is_importable():
            requested = int(config.get("num_workers", 0) or 0)
            workers = max(1, min(requested if requested > 0 else (os.cpu_count() or 1), total))
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=process_context(),
                                       initializer=_lower_worker_priority)

            def submit_to_process(index: int) -> Any:
                info = frames[index]
                light = replace(info, wcs=None, header=None) if hasattr(info, "__dataclass_fields__") else info
                return pool.submit(_measure_light, light, geometry.scale(index), star_file(index))

            return pool, submit_to_process
    threads = ThreadPoolExecutor(max_workers=_worker_count(config, total), thread_name_prefix="zemosaic-quality")
    if measure is measure_one:  # the scale measure_one would compute, once a frame
        return threads, lambda index: threads.submit(
            _measure_light, frames[index], geometry.scale(index), star_file(index)
        )
    return threads, lambda index: threads.submit(_measured_with_star_file, measure, frames[index], star_file(index))


def _measured_with_star_file(
    measure: Callable[[Any], FrameMetrics], info: Any, star_file: Path | None
) -> tuple[FrameMetrics, str | None]:
    """``measure(info)`` on a pool thread, which also writes the frame's star file (as the
    measuring processes do), so that the thread collecting the results does not."""
    metrics = measure(info)
    return metrics, None if star_file is None else _write_star_file(star_file, metrics)


def measure_frames(
    frames: Sequence[Any],
    config: dict[str, Any],
    reporter: Any,
    *,
    measure: Callable[[Any], FrameMetrics] = measure_one,
    known: Mapping[int, FrameMetrics] | None = None,
    units: Any = None,
) -> Generator[Any, None, list[FrameMetrics]]:
    """Measure every frame on a pool (processes for many frames, else threads), then the
    transparency of each pointing group.

    ``known`` holds metrics measured earlier (a resumed run), by frame index: those frames are
    not measured again, but still take part in their group's transparency.

    ``units`` (the caller's resume units, optional) is asked frame by frame, in frame order,
    just before the frame would go to the pool (the caller's per-frame work, e.g. a unit
    signature, overlaps the measurement of the frames sent before):

    * ``units.load(index)``: metrics measured earlier (the frame is not measured), or None;
    * ``units.star_file(index)``: where the measuring worker writes the frame's star list
      (:func:`_write_star_file`), or None;

    and, in this thread, as each measured frame comes back (before its transparency is known,
    while the pool measures the others): ``units.store(index, metrics, star_sha256)``, with the
    SHA-256 of the star file the worker wrote, or None where it wrote none.

    Yields the reporter's events (progress ``P1`` / ``progress_quality`` after each frame);
    returns the metrics in the order of ``frames``.
    """
    total = len(frames)
    results: list[FrameMetrics | None] = [None] * total
    for index, metric in (known or {}).items():
        results[index] = metric
    geometry = _FrameGeometry(frames)
    pool: Any = None
    futures: dict[Any, int] = {}
    try:
        for index in range(total):
            if results[index] is None and units is not None:
                results[index] = units.load(index)
            if results[index] is not None:
                continue
            if pool is None:
                pool, submit = _measure_executor(
                    frames, config, measure, geometry, None if units is None else units.star_file
                )
            futures[submit(index)] = index
        for done, future in enumerate(as_completed(futures), start=total - len(futures) + 1):
            index = futures[future]
            metric, star_sha256 = future.result()
            results[index] = metric
            if units is not None:
                units.store(index, metric, star_sha256)
            geometry.prepare(index, metric.stars)  # what the transparency needs, while the pool works
            reporter.progress("P1", done, total, PROGRESS_KEY, name=Path(str(frames[index].path)).name)
            yield from reporter.pop_pending()
    finally:
        if pool is not None:
            # Worker processes wind down in the background (joining them costs the run seconds);
            # threads are joined, as before.
            pool.shutdown(wait=not isinstance(pool, ProcessPoolExecutor), cancel_futures=True)
    metrics = [m if m is not None else FrameMetrics() for m in results]
    assign_transparency(metrics, frames, geometry=geometry)
    for item in metrics:
        if item.reason:
            reporter.debug(item.reason, path=item.path, detail=item.detail)
        if item.trail_flag:
            reporter.info("quality_info_trail", path=item.path, length=_fmt(item.trail_length_px))
    measured = [m for m in metrics if math.isfinite(m.fwhm_px)]
    reporter.info(
        "quality_info_summary",
        frames=total,
        measured=len(measured),
        fwhm=_fmt(_nanmedian([m.fwhm_px for m in measured])),
        fwhm_arcsec=_fmt(_nanmedian([m.fwhm_arcsec for m in measured])),
        stars=_fmt(_nanmedian([float(m.n_stars) for m in metrics])),
    )
    yield from reporter.pop_pending()
    return metrics


def _worker_count(config: dict[str, Any], total: int) -> int:
    wanted = int(config.get("num_workers", 0) or 0)
    if wanted <= 0:
        wanted = min(8, os.cpu_count() or 1)
    return max(1, min(wanted, max(total, 1)))


# ----------------------------------------------------------------------------- transparency


def pointing_groups(
    frames: Sequence[Any], metrics: Sequence[FrameMetrics], *, geometry: _FrameGeometry | None = None
) -> list[int]:
    """Group index per frame: centres within half the short side of a field, richest frame first.

    Frames without a known centre share one extra group.
    """
    n = len(frames)
    geometry = geometry if geometry is not None else _FrameGeometry(frames)
    centres = [getattr(info, "centre", None) for info in frames]
    radius_deg = []
    for index, info in enumerate(frames):
        scale = geometry.scale(index) or math.nan
        radius_deg.append(0.5 * min(info.shape) * scale / 3600.0)
    order = sorted(range(n), key=lambda i: (-metrics[i].n_stars, i))
    groups = [-1] * n
    next_group = 0
    for seed in order:
        if groups[seed] != -1 or centres[seed] is None or not math.isfinite(radius_deg[seed]):
            continue
        groups[seed] = next_group
        seed_vector = _unit_vector(*centres[seed])
        for other in order:
            if groups[other] == -1 and centres[other] is not None:
                separation = math.degrees(math.acos(float(np.clip(np.dot(seed_vector, _unit_vector(*centres[other])), -1.0, 1.0))))
                if separation <= radius_deg[seed]:
                    groups[other] = next_group
        next_group += 1
    return [g if g != -1 else next_group for g in groups]


def assign_transparency(
    metrics: Sequence[FrameMetrics], frames: Sequence[Any] | None = None, *, geometry: _FrameGeometry | None = None
) -> None:
    """Fill ``transparency`` and ``group`` of every metric, in place (see the module docstring).

    ``geometry`` (of ``frames``) may hold pixel scales and star vectors computed already."""
    if frames is None:
        groups = [0] * len(metrics)
    else:
        geometry = geometry if geometry is not None else _FrameGeometry(frames)
        groups = pointing_groups(frames, metrics, geometry=geometry)
    for index, group in enumerate(groups):
        metrics[index].group = group
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        ratios = _matched_ratios(members, metrics, frames, geometry) if frames is not None else None
        if ratios is not None:
            method = "matched"
        else:
            ratios = {i: metrics[i].star_flux for i in members}
            method = "flux_level"
        typical = _nanmedian(list(ratios.values()))
        for i in members:
            value = ratios.get(i, math.nan)
            if math.isfinite(value) and math.isfinite(typical) and typical > 0:
                metrics[i].transparency = value / typical
                metrics[i].transparency_method = method
            elif metrics[i].n_stars == 0 and math.isfinite(metrics[i].noise):
                metrics[i].transparency = 0.0  # sky measured but no star at all: a total cloud
                metrics[i].transparency_method = method


def _matched_ratios(
    members: list[int], metrics: Sequence[FrameMetrics], frames: Sequence[Any], geometry: _FrameGeometry | None = None
) -> dict[int, float] | None:
    """Median flux ratio to the group's reference frame, or None if matching is not possible for all.

    Each star is matched to the reference's nearest star within the frame's radius. The stars of
    all frames go through the tree in one query (at the largest radius): one call instead of one a
    frame. Each frame's own radius is then applied as cKDTree applies a bound, so the matches are
    those of a query per frame."""
    from scipy.spatial import cKDTree

    geometry = geometry if geometry is not None else _FrameGeometry(frames)
    usable = [i for i in members if getattr(frames[i], "wcs", None) is not None and metrics[i].stars.flux.size]
    if len(usable) < len(members) or not usable:
        return None
    reference = max(usable, key=lambda i: (metrics[i].stars.flux.size, -i))
    ref_vectors = geometry.vectors(reference, metrics[reference].stars)
    if ref_vectors is None:
        return None
    radii: list[float] = []
    star_vectors: list[np.ndarray] = []
    for i in members:
        scale = geometry.scale(i) or math.nan
        fwhm = metrics[i].fwhm_px if math.isfinite(metrics[i].fwhm_px) else 0.0
        radius = math.radians(max(MATCH_RADIUS_PX, fwhm) * scale / 3600.0)
        vectors = geometry.vectors(i, metrics[i].stars)
        if vectors is None or not math.isfinite(radius):
            return None
        radii.append(radius)
        star_vectors.append(vectors)
    within = _within_radius(cKDTree(ref_vectors), ref_vectors, star_vectors, radii)
    ref_flux = metrics[reference].stars.flux
    flux_ratios = [metrics[i].stars.flux[matched] / ref_flux[nearest[matched]] for i, (matched, nearest) in zip(members, within)]
    medians = _medians_of(flux_ratios)
    ratios: dict[int, float] = {}
    for i, frame_ratios, median in zip(members, flux_ratios, medians):
        if frame_ratios.size < MIN_MATCHES:
            if metrics[i].n_stars == 0:
                continue  # nothing to match: assign_transparency gives 0
            return None
        ratios[i] = float(median)
    return ratios


def _medians_of(samples: Sequence[np.ndarray]) -> list[float]:
    """``numpy.median`` of each 1-D array (NaN for an empty one), with one sort for all of them:
    the middle value, or the mean of the two middle values, NaN where an array holds a NaN."""
    counts = np.array([sample.size for sample in samples], dtype=np.intp)
    if counts.sum() == 0:
        return [math.nan] * len(samples)
    values = np.concatenate(samples)
    owner = np.repeat(np.arange(len(samples)), counts)
    ordered = values[np.lexsort((values, owner))]  # by array, then by value (NaN last)
    ends = np.cumsum(counts)
    last = values.size - 1  # the positions of empty arrays are clipped in; their median is NaN
    low = np.clip(ends - counts + (counts - 1) // 2, 0, last)
    high = np.clip(ends - counts + counts // 2, 0, last)
    middle = np.mean(np.stack([ordered[low], ordered[high]]), axis=0)
    medians = np.where(counts % 2 == 1, ordered[low], middle)
    has_nan = np.isnan(ordered[np.clip(ends - 1, 0, last)])
    return [math.nan if n == 0 or nan else float(m) for n, nan, m in zip(counts, has_nan, medians)]


def _within_radius(
    tree: Any, ref_vectors: np.ndarray, star_vectors: Sequence[np.ndarray], radii: Sequence[float]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(matched, nearest)`` per set of ``star_vectors``: the index of each star's nearest reference
    vector and whether it lies within that set's radius, as ``tree.query(vectors, k=1,
    distance_upper_bound=radius)`` decides it: squared distance (summed over x, y, z in order)
    below the squared radius."""
    counts = [len(vectors) for vectors in star_vectors]
    if not counts or sum(counts) == 0:
        return [(np.zeros(n, bool), np.zeros(n, np.intp)) for n in counts]
    stars = np.concatenate(star_vectors)
    distance, nearest = tree.query(stars, k=1, distance_upper_bound=max(radii), workers=-1)
    found = np.isfinite(distance)
    nearest = np.where(found, nearest, 0)
    difference = stars - ref_vectors[nearest]
    squared = difference[:, 0] * difference[:, 0] + difference[:, 1] * difference[:, 1] + difference[:, 2] * difference[:, 2]
    bound = np.repeat(np.asarray(radii, dtype=np.float64), counts)
    matched = found & (squared < bound * bound)
    ends = np.cumsum(counts)
    return [(matched[end - n : end], nearest[end - n : end]) for n, end in zip(counts, ends)]


def _star_vectors(info: Any, stars: StarList) -> np.ndarray | None:
    if stars.flux.size == 0:
        return None
    try:
        ra, dec = info.wcs.all_pix2world(stars.x, stars.y, 0)
    except Exception:  # a WCS that cannot map these pixels
        return None
    ra, dec = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


class _FrameGeometry:
    """What the measurement and the transparency take from each frame's WCS, computed once a frame:
    the pixel scale (:func:`_pixel_scale`: astropy copies the WCS for it, ~0.15 ms) and the sky
    vectors of its stars (:func:`_star_vectors`). The same calls on the same objects as without
    the memo, so the numbers are the same to the bit. Used from one thread at a time."""

    def __init__(self, frames: Sequence[Any]) -> None:
        self.frames = frames
        self._scales: dict[int, float | None] = {}
        self._vectors: dict[int, tuple[StarList, np.ndarray | None]] = {}

    def scale(self, index: int) -> float | None:
        if index not in self._scales:
            self._scales[index] = _pixel_scale(self.frames[index])
        return self._scales[index]

    def vectors(self, index: int, stars: StarList) -> np.ndarray | None:
        known = self._vectors.get(index)
        if known is None or known[0] is not stars:  # memoised for these very stars only
            known = (stars, _star_vectors(self.frames[index], stars))
            self._vectors[index] = known
        return known[1]

    def prepare(self, index: int, stars: StarList) -> None:
        """Compute ahead what :func:`assign_transparency` will ask for this frame."""
        self.scale(index)
        if getattr(self.frames[index], "wcs", None) is not None and stars.flux.size:
            self.vectors(index, stars)


def _unit_vector(ra_deg: float, dec_deg: float) -> np.ndarray:
    ra, dec = math.radians(ra_deg), math.radians(dec_deg)
    return np.array([math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)])


# ============================================================================ rules


def quality_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The quality keys of ``config`` with :data:`QUALITY_DEFAULTS` for the missing ones."""
    merged = dict(QUALITY_DEFAULTS)
    merged.update({key: value for key, value in (config or {}).items() if key in QUALITY_DEFAULTS})
    return merged


def apply_quality_rules(metrics: Sequence[FrameMetrics], config: dict[str, Any] | None = None) -> list[QualityDecision]:
    """One decision per frame (same order). With ``quality_rejection`` off every frame is accepted."""
    settings = quality_config(config)
    decisions = [QualityDecision(True) for _ in metrics]
    if not settings["quality_rejection"] or not metrics:
        return decisions
    checks = _rule_checks(metrics, settings)
    for index, decision in enumerate(decisions):
        for rule in RULES:
            check = checks.get(rule)
            if check is None:
                continue
            failed, value, threshold, median = check(index)
            if failed:
                decision.failed.append(
                    {"rule": rule, "value": _json_float(value, 4), "threshold": _json_float(threshold, 4), "median": _json_float(median, 4)}
                )
        if decision.failed:
            first = decision.failed[0]
            decision.accepted = False
            decision.rule = first["rule"]
            decision.value, decision.threshold, decision.median = first["value"], first["threshold"], first["median"]
    return decisions


def _rule_checks(metrics: Sequence[FrameMetrics], settings: dict[str, Any]) -> dict[str, Callable[[int], tuple[bool, Any, Any, Any]]]:
    """rule -> check(frame index) -> (failed, value, threshold, median); rules off or without data are absent."""
    checks: dict[str, Callable[[int], tuple[bool, Any, Any, Any]]] = {}

    def session_median(values: list[float]) -> float | None:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.median(finite)) if len(finite) >= MIN_FRAMES_FOR_RULES else None

    def above(values: list[float], threshold: float, median: float) -> Callable[[int], tuple[bool, Any, Any, Any]]:
        return lambda i: (math.isfinite(values[i]) and values[i] > threshold, values[i], threshold, median)

    def below(values: list[float], threshold: float, median: float) -> Callable[[int], tuple[bool, Any, Any, Any]]:
        return lambda i: (math.isfinite(values[i]) and values[i] < threshold, values[i], threshold, median)

    elongation = [m.elongation for m in metrics]
    limit = float(settings["quality_max_elongation"])
    median = session_median(elongation)
    if limit > 0 and median is not None:
        checks["elongation"] = above(elongation, max(limit, ELONGATION_MEDIAN_MARGIN * median), median)

    fwhm = [m.fwhm_px for m in metrics]
    ratio = float(settings["quality_max_fwhm_ratio"])
    median = session_median(fwhm)
    if ratio > 0 and median is not None:
        checks["fwhm"] = above(fwhm, ratio * median, median)

    transparency = [m.transparency for m in metrics]
    fraction = float(settings["quality_min_transparency_fraction"])
    median = session_median(transparency)
    if fraction > 0 and median is not None:
        checks["transparency"] = below(transparency, fraction * median, median)

    fraction = float(settings["quality_min_star_fraction"])
    if fraction > 0:
        stars = [float(m.n_stars) for m in metrics]
        group_median: dict[int, float | None] = {}
        for group in {m.group for m in metrics}:
            group_median[group] = session_median([stars[i] for i, m in enumerate(metrics) if m.group == group])

        def star_check(i: int) -> tuple[bool, Any, Any, Any]:
            typical = group_median.get(metrics[i].group)
            if typical is None:
                return False, stars[i], None, None
            return stars[i] < fraction * typical, stars[i], fraction * typical, typical

        checks["stars"] = star_check

    background = [m.background for m in metrics]
    ratio = float(settings["quality_max_background_ratio"])
    median = session_median(background)
    if ratio > 0 and median is not None:
        checks["background"] = above(background, ratio * median, median)

    if settings["quality_reject_trails"]:
        checks["trail"] = lambda i: (metrics[i].trail_flag, metrics[i].trail_length_px, None, None)
    return checks


def excluded_entries(
    metrics: Sequence[FrameMetrics], decisions: Sequence[QualityDecision]
) -> list[dict[str, Any]]:
    """``run_report.json`` ``frames.excluded`` entries for the rejected frames (nothing is moved)."""
    return [
        {"path": m.path, "reason_key": d.reason_key, "detail": d.detail, "params": d.params}
        for m, d in zip(metrics, decisions)
        if not d.accepted
    ]


# ============================================================================ weights


def fwhm_weight_factors(metrics: Sequence[FrameMetrics]) -> np.ndarray:
    """(median FWHM / FWHM)² per frame, mean 1 over the frames; 1 where the FWHM is unknown."""
    return fwhm_factors(np.array([m.fwhm_px for m in metrics], dtype=np.float64))


def fwhm_factors(fwhm: np.ndarray) -> np.ndarray:
    """(median FWHM / FWHM)² for an array of FWHMs, mean 1; 1 where the FWHM is unknown."""
    fwhm = np.asarray(fwhm, dtype=np.float64)
    finite = np.isfinite(fwhm) & (fwhm > 0)
    if not finite.any():
        return np.ones(len(fwhm))
    typical = float(np.median(fwhm[finite]))
    factor = np.where(finite, (typical / np.where(finite, fwhm, 1.0)) ** 2, 1.0)
    return factor / factor.mean()


def quality_weights(metrics: Sequence[FrameMetrics], method: str) -> np.ndarray:
    """Per-frame weights (mean 1 over frames with a valid noise) from the metrics alone.

    ``noise_variance``: 1/σ² with σ the sky noise divided by the transparency (the noise of
    the frame once brought to the session's flux scale). ``noise_fwhm``: that times
    (median FWHM / FWHM)². ``none``: ones.
    """
    from .stack import noise_weights

    if method not in WEIGHTING_METHODS:
        raise ValueError(f"unknown weighting method {method!r}; expected one of {WEIGHTING_METHODS}")
    n = len(metrics)
    if method == "none" or n == 0:
        return np.ones(n)
    noise = np.array([m.noise for m in metrics], dtype=np.float64)
    gain = np.array([m.transparency if math.isfinite(m.transparency) and m.transparency > 0 else 1.0 for m in metrics])
    weights = np.asarray(noise_weights(noise / gain, np), dtype=np.float64)
    if method == "noise_fwhm":
        weights = weights * fwhm_weight_factors(metrics)
        valid = weights > 0
        if valid.any():
            weights = weights * (valid.sum() / weights[valid].sum())
    return weights


# ============================================================================ tile gate


def tile_quality(
    data: Any,
    coverage: Any,
    *,
    star_density_ref: float | None = None,
    xp: Any = np,
) -> TileQuality:
    """Score a stacked tile (``data`` (C, H, W) or (H, W), ``coverage`` (H, W)) in [0, 1].

    * coverage term: fraction of the covered pixels with at least half the tile's typical
      (95th percentile) coverage; a tile made of a few shifted frames scores low;
    * disparity term: ``exp(-D / 0.25)`` with D = |median sky of the outer 10 % band - median
      sky of the centre| / max(|centre sky|, 10 x noise): dew, a moon glow or a gradient;
    * density term: stars per megapixel / ``star_density_ref`` (the session's typical tile),
      capped at 1; 1 when no reference is given.
    """
    import sep

    image = _to_host(data, xp).astype(np.float32, copy=False)
    weight = _to_host(coverage, xp).astype(np.float32, copy=False)
    plane = image if image.ndim == 2 else np.nanmean(image, axis=0) if image.shape[0] > 1 else image[0]
    covered = (weight > 0) & np.isfinite(plane)
    if not covered.any():
        return TileQuality(0.0, 0.0, math.inf, 0.0, 0.0, 0.0)

    typical = float(np.percentile(weight[covered], 95))
    coverage_term = float(np.count_nonzero(weight[covered] >= 0.5 * typical) / np.count_nonzero(covered))

    binned = _bin2x2(np.where(covered, plane, np.nan)) / 4.0
    invalid = ~np.isfinite(binned)
    binned[invalid] = 0.0
    mesh = max(8, min(BACKGROUND_MESH // 2, binned.shape[0] // 2, binned.shape[1] // 2))
    disparity, disparity_term, density = math.inf, 0.0, 0.0
    try:
        background = sep.Background(binned, mask=invalid, bw=mesh, bh=mesh)
        sky = background.back()
        rms = _sky_noise(binned, invalid)
        if not math.isfinite(rms):
            rms = float(background.globalrms)
        height, width = sky.shape
        band_y, band_x = max(1, int(TILE_EDGE_FRACTION * height)), max(1, int(TILE_EDGE_FRACTION * width))
        edge_mask = np.zeros(sky.shape, dtype=bool)
        edge_mask[:band_y], edge_mask[-band_y:], edge_mask[:, :band_x], edge_mask[:, -band_x:] = True, True, True, True
        centre_mask = np.zeros(sky.shape, dtype=bool)
        centre_mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
        edge_values = sky[edge_mask & ~invalid]
        centre_values = sky[centre_mask & ~invalid]
        if edge_values.size and centre_values.size:
            edge, centre = float(np.median(edge_values)), float(np.median(centre_values))
            disparity = abs(edge - centre) / max(abs(centre), 10.0 * rms, 1e-12)
            disparity_term = math.exp(-disparity / TILE_DISPARITY_SCALE)
        background.subfrom(binned)
        binned[invalid] = 0.0
        objects = _extract(binned[None], np.array([rms]), invalid[None], np) if rms > 0 else np.zeros(0)
        area_mpx = 4.0 * np.count_nonzero(~invalid) / 1e6
        density = float(len(objects) / area_mpx) if area_mpx > 0 else 0.0
    except Exception:  # a tile sep cannot model scores low, it is not dropped
        pass
    density_term = 1.0 if not star_density_ref else float(min(1.0, density / star_density_ref))
    score = coverage_term * disparity_term * density_term
    return TileQuality(float(score), coverage_term, float(disparity), float(disparity_term), density, density_term)


def tile_quality_score(data: Any, coverage: Any, *, star_density_ref: float | None = None, xp: Any = np) -> float:
    """The score of :func:`tile_quality` alone."""
    return tile_quality(data, coverage, star_density_ref=star_density_ref, xp=xp).score


def tile_weight(score: float, floor: float = TILE_WEIGHT_FLOOR, full_at: float = TILE_FULL_WEIGHT_SCORE) -> float:
    """Weight multiplier of a tile: 1 from ``full_at`` up, falling linearly to ``floor`` at 0; never 0."""
    if not math.isfinite(score):
        return floor
    if score >= full_at:
        return 1.0
    return float(floor + (1.0 - floor) * max(0.0, score) / full_at)


# ============================================================================ helpers


def _row_median(values: np.ndarray) -> np.ndarray:
    """Median of each row of an array without NaN: :func:`.detect.nanmedian_rows`' numbers, from a partition."""
    low, high = (values.shape[1] - 1) // 2, values.shape[1] // 2
    ordered = np.partition(values, (low, high), axis=1)
    return 0.5 * (ordered[:, low] + ordered[:, high])


def _nanmedian(values: Iterable[float]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.median(finite)) if finite else math.nan


def _json_float(value: Any, digits: int) -> float | None:
    if value is None:
        return None
    number = float(value)
    return round(number, digits) if math.isfinite(number) else None


def _fmt(value: Any) -> str:
    """Numbers for message placeholders: 3 significant digits, integers as integers."""
    if value is None:
        return "-"
    number = float(value)
    if not math.isfinite(number):
        return "-"
    if number == int(number) and abs(number) < 1e9:
        return str(int(number))
    return f"{number:.3g}" if abs(number) < 1000 else f"{number:.0f}"


#: Neighbour differences sampled to measure a tile's noise.
NOISE_SAMPLE_VALUES = 2_000_000


def noise_per_unit_weight(data: np.ndarray, weight: np.ndarray) -> float:
    """Robust σ of a pixel of coverage weight 1, from horizontal neighbour differences.

    ``(a − b)·sqrt(w̄/2)`` has the σ of a unit-weight pixel when a pixel's variance is σ²/w; the
    smooth sky cancels in the difference and stars are outliers the MAD ignores. Used to weigh
    stacked tiles (SDS mega-tiles, classic master tiles) against each other: resampling correlates
    neighbours the same way in every tile, so ratios between tiles are unbiased.
    """
    row_step = max(1, math.ceil(data.size / NOISE_SAMPLE_VALUES))
    w = weight[::row_step]
    mean_weight = 0.5 * (w[:, 1:] + w[:, :-1])
    sigmas = []
    for channel in range(data.shape[0]):
        plane = data[channel][::row_step]
        diff = (plane[:, 1:] - plane[:, :-1]) * np.sqrt(mean_weight / 2.0)
        ok = np.isfinite(diff) & (w[:, 1:] > 0) & (w[:, :-1] > 0)
        if ok.sum() >= 100:
            sample = diff[ok].astype(np.float64)
            sigmas.append(1.4826 * float(np.median(np.abs(sample - np.median(sample)))))
    finite = [s for s in sigmas if np.isfinite(s) and s > 0]
    return float(np.sqrt(np.mean(np.square(finite)))) if finite else float("nan")

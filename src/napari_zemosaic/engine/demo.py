"""A synthetic night of ZWO Seestar S50 sub-frames, with complete truth.

What it makes
-------------
``generate_demo(out_dir, spec)`` writes ``out_dir/frames/*.fit`` exactly as the scope
writes its light sub-frames (uint16 GRBG CFA, BZERO=32768, the S50 keyword set) and
``out_dir/truth/`` with everything that was used to render them: the star catalog
(``catalog.csv``) and, per frame, the true TAN(-SIP) WCS, seeing, transparency, sky,
rotation, dither and artefacts (``frames.json``). ``load_truth`` reads it back.

How a frame is rendered (all vectorised, no full-image work per star)
---------------------------------------------------------------------
1. Geometry. Panel centres are laid out on a grid in the tangent plane of the mosaic
   centre (so cos δ, RA wrap-around and the pole are handled by the projection itself),
   ``(1 - overlap)`` of a field apart in the sensor's orientation. Each frame's true
   centre is its panel centre moved by a dither; its rotation drifts with time in alt-az
   mode. The true WCS has CRPIX at the sensor centre, a CD matrix for 2.39"/px and the
   rotation, and a fixed order-2 SIP distortion of the optics. Header RA/DEC are the mount
   pointing: the true centre plus a pointing error of up to about one arcminute.
2. Stars are projected with the true WCS (``all_world2pix``, SIP included) and rendered as
   pixel-integrated Gaussians: separable erf differences on a ±4σ stamp, so the sum of a
   star's pixels equals its catalog flux times the transparency. Only the colour of each
   pixel's CFA site is rendered (GRBG: row 0 = G R G R, row 1 = B G B G), and all stamps
   are accumulated with one ``np.bincount``.
3. The smooth background (sky level with a few-% linear gradient, plus a reddish nebula
   made of Gaussian blobs and filaments fixed on the sky) is evaluated on a coarse grid
   through the WCS and bilinearly interpolated to every CFA site.
4. Noise: shot noise of the signal in electrons plus read noise. Every pixel holds at
   least ~1000 e- of sky, where Poisson counts are indistinguishable from a normal law of
   the same variance, so one normal draw per pixel is used (several times faster).
5. Artefacts: fixed hot pixels (same detector position and level in every frame), one
   satellite trail crossing one frame, one cloudy frame (transparency 0.4, sky +30 %) and
   a haze level per panel. The result is rounded, clipped to [0, 65535] and stored.
   On request (off by default) one frame is heavily blurred (seeing x ``BLURRED_FWHM_FACTOR``:
   defocus, dew, wind) and one has its stars smeared into short trails of
   ``SMEAR_LENGTH_PX`` (tracking error, wind shake): each star is then rendered as
   ``SMEAR_STEPS`` Gaussians spread evenly along the smear, sharing its flux.

Everything random comes from one seed through independent ``numpy`` generators, so the
same spec gives the same bytes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from astropy.wcs import WCS

__all__ = [
    "DemoSpec",
    "DemoSpecError",
    "DemoTruth",
    "FrameTruth",
    "generate_demo",
    "load_truth",
    "truth_star_pixels",
]

# --- instrument (ZWO Seestar S50, Sony IMX462 in portrait orientation) -------------------
SENSOR_WIDTH = 1080
SENSOR_HEIGHT = 1920
FOCAL_LENGTH_MM = 250.0
PIXEL_SIZE_UM = 2.9
PIXEL_SCALE_ARCSEC = 206.265 * PIXEL_SIZE_UM / FOCAL_LENGTH_MM
BAYER_PATTERN = "GRBG"
#: Colour channel (0=R, 1=G, 2=B) of the CFA site at ``[y % 2, x % 2]`` for GRBG.
CFA_CHANNELS = np.array([[1, 0], [2, 1]], dtype=np.intp)
GAIN_SETTING = 80
GAIN_E_PER_ADU = 2.0
READ_NOISE_E = 2.0
BIAS_ADU = 100.0
SATURATION_ADU = 65535
CREATOR = "ZWO Seestar S50"
INSTRUMENT = "Seestar S50"
TELESCOPE = "S50_1d568bdd"
FILTER_NAME = "IRCUT"

# --- sky and sources ----------------------------------------------------------------------
#: Sky level above bias (R, G, B) at transparency 1: a suburban light-polluted sky.
SKY_ADU = (1200.0, 1000.0, 850.0)
#: Default star density per pixel² (one star per 2500 px², ~800 on a full frame).
STAR_DENSITY_PER_PX2 = 1.0 / 2500.0
FAINT_FLUX_ADU = 300.0
#: Green flux from which a star counts as "bright" (isolated ones are used by tests).
BRIGHT_FLUX_ADU = 20000.0
#: Cap on any channel's flux: peak ≈ 0.166·flux at the sharpest seeing (FWHM 2.2 px),
#: plus sky, stays near 53000 ADU, below saturation.
MAX_CHANNEL_FLUX_ADU = 300000.0
#: Slope of the cumulative counts N(>F) ∝ F^-slope.
FLUX_SLOPE = 0.8
#: Bright stars guaranteed per field area, whatever the sensor scale.
MIN_BRIGHT_PER_FIELD = 50
FWHM_RANGE_PX = (2.2, 3.2)

# --- night and artefacts --------------------------------------------------------------------
PANEL_TRANSPARENCY = (1.00, 0.92, 0.85, 0.95)
CLOUDY_TRANSPARENCY = 0.4
CLOUDY_SKY_FACTOR = 1.3
HOT_PIXELS_FULL_FRAME = 50
#: Floor on small sensors, so every test night has hot pixels to reject.
HOT_PIXELS_MIN = 8
HOT_PIXEL_RANGE_ADU = (20000.0, 60000.0)
SIP_CORNER_DISTORTION_PX = (1.2, 1.8)
#: Seeing multiplier of the optional blurred frame (``DemoSpec.blurred_frame``).
BLURRED_FWHM_FACTOR = 2.0
#: Length (px) of the star smear of the optional trailed frame (``DemoSpec.elongated_frame``).
SMEAR_LENGTH_PX = 6.0
SMEAR_STEPS = 13
START_TIME = datetime(2026, 11, 21, 22, 30, 15)


class DemoSpecError(ValueError):
    """A demo spec value out of range, carried as a locale key and its parameters."""

    def __init__(self, key: str, **params: Any) -> None:
        self.key = key
        self.params = params
        super().__init__(f"{key}: {params}")


@dataclass(frozen=True)
class DemoSpec:
    """What night to simulate. Frozen: use ``dataclasses.replace`` to vary it."""

    panels: tuple[int, int] = (2, 2)  # rows x cols of pointings
    frames_per_panel: int = 8
    #: Sensor size factor (width=round(1080*scale), height=round(1920*scale), both even);
    #: the pixel scale stays 2.39"/px, so the field shrinks and the FWHM in px stays real.
    scale: float = 1.0
    seed: int = 0
    with_wcs: bool = True  # False: headers as the scope writes them, no WCS keywords
    sip: bool = True  # true optical distortion (TAN-SIP order 2) in truth and header
    overlap: float = 0.25  # panel overlap fraction
    ra_deg: float = 83.82  # mosaic centre (M42-like)
    dec_deg: float = -5.39
    eqmode: int = 0  # 0 = alt-az (field rotation drifts), 1 = equatorial (no drift)
    artefacts: bool = True  # hot pixels, a satellite trail, a cloudy frame, panel haze
    star_density: float = 1.0  # multiplier on the default number of stars
    exptime: float = 10.0
    object_name: str = "M42"
    #: Index (time order) of a frame rendered with a heavily blurred PSF; None: no such frame.
    blurred_frame: int | None = None
    #: Index of a frame whose stars are smeared into short trails; None: no such frame.
    elongated_frame: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "panels", tuple(int(n) for n in self.panels))

    @property
    def width(self) -> int:
        return _even(SENSOR_WIDTH * self.scale)

    @property
    def height(self) -> int:
        return _even(SENSOR_HEIGHT * self.scale)

    @property
    def n_frames(self) -> int:
        return self.panels[0] * self.panels[1] * self.frames_per_panel

    def validate(self) -> None:
        """Raise :class:`DemoSpecError` naming the first value out of range."""
        checks: list[tuple[str, Any, bool, str]] = [
            ("panels", self.panels, len(self.panels) == 2 and min(self.panels) >= 1, "RxC with R, C >= 1"),
            ("frames_per_panel", self.frames_per_panel, self.frames_per_panel >= 1, ">= 1"),
            ("scale", self.scale, 0.05 <= self.scale <= 2.0, "0.05 to 2"),
            ("overlap", self.overlap, 0.0 <= self.overlap <= 0.9, "0 to 0.9"),
            ("dec_deg", self.dec_deg, -89.0 <= self.dec_deg <= 89.0, "-89 to 89"),
            ("eqmode", self.eqmode, self.eqmode in (0, 1), "0 or 1"),
            ("star_density", self.star_density, 0.0 <= self.star_density <= 20.0, "0 to 20"),
            ("exptime", self.exptime, 0.1 <= self.exptime <= 600.0, "0.1 to 600"),
            ("blurred_frame", self.blurred_frame, _optional_index_ok(self.blurred_frame, self.n_frames), "none or a frame index"),
            ("elongated_frame", self.elongated_frame, _optional_index_ok(self.elongated_frame, self.n_frames), "none or a frame index"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise DemoSpecError("demo_error_invalid_spec", field=name, value=value, allowed=allowed)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["panels"] = list(self.panels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoSpec:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class FrameTruth:
    """Everything true about one written frame."""

    file_name: str
    panel: int
    index: int  # position in time order over the whole night
    index_in_panel: int
    date_obs: str
    wcs_header: dict[str, Any]  # true WCS keywords (CD matrix, SIP when spec.sip)
    fwhm_px: float
    transparency: float  # multiplies star and nebula flux
    sky_adu: tuple[float, float, float]  # R, G, B above bias at the frame centre
    sky_gradient: tuple[float, float]  # fractional sky change across the full width, height
    rotation_deg: float  # position angle of the detector +y axis, east of north
    dither_px: tuple[float, float]  # field centre moved by this many detector px from the panel centre
    centre_ra: float  # true field centre (at CRPIX)
    centre_dec: float
    mount_ra: float  # header RA/DEC: centre + pointing error
    mount_dec: float
    is_cloudy: bool
    trail: tuple[float, float, float, float] | None  # (x0, y0, x1, y1) on the frame border
    trail_peak_adu: float
    is_blurred: bool = False  # fwhm_px is then BLURRED_FWHM_FACTOR x the night's seeing
    smear_px: float = 0.0  # length of the star smear (trailed frame); fwhm_px is the core
    smear_angle_deg: float = 0.0  # direction of the smear, from detector +x towards +y

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sky_adu"] = list(self.sky_adu)
        data["sky_gradient"] = list(self.sky_gradient)
        data["dither_px"] = list(self.dither_px)
        data["trail"] = None if self.trail is None else list(self.trail)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrameTruth:
        data = dict(data)
        data["sky_adu"] = tuple(data["sky_adu"])
        data["sky_gradient"] = tuple(data["sky_gradient"])
        data["dither_px"] = tuple(data["dither_px"])
        data["trail"] = None if data["trail"] is None else tuple(data["trail"])
        return cls(**data)


@dataclass(eq=False)
class DemoTruth:
    """The truth of a demo night, as written under ``out_dir/truth``.

    Star fluxes are total ADU above bias in one frame at transparency 1, per channel
    (``star_flux[:, 0|1|2]`` = R, G, B); a frame holds ``star_flux * transparency``.
    """

    spec: DemoSpec
    out_dir: Path
    star_ids: np.ndarray
    star_ra: np.ndarray
    star_dec: np.ndarray
    star_flux: np.ndarray  # (N, 3) R, G, B
    frames: list[FrameTruth]
    hot_pixels: np.ndarray  # (K, 2) detector (x, y)
    hot_pixel_values: np.ndarray  # (K,) raw ADU written at those pixels (±1 %)
    width: int
    height: int
    pixel_scale_arcsec: float
    gain_e_per_adu: float
    bias_adu: float
    read_noise_e: float
    saturation_adu: int
    bayer_pattern: str
    cloudy_frame: int | None
    trail_frame: int | None
    nebula: list[dict[str, Any]] = field(default_factory=list)
    blurred_frame: int | None = None
    elongated_frame: int | None = None
    _wcs_cache: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def frames_dir(self) -> Path:
        return self.out_dir / "frames"

    @property
    def shape(self) -> tuple[int, int]:
        """Detector shape (height, width)."""
        return (self.height, self.width)

    @property
    def frame_paths(self) -> list[Path]:
        return [self.frames_dir / frame.file_name for frame in self.frames]

    def wcs_for(self, i: int) -> WCS:
        """The true WCS of frame ``i`` (SIP included when the spec has it)."""
        if i not in self._wcs_cache:
            self._wcs_cache[i] = wcs_from_header_dict(self.frames[i].wcs_header)
        return self._wcs_cache[i]


# ============================================================================ public API


def generate_demo(
    out_dir: str | Path,
    spec: DemoSpec = DemoSpec(),
    progress: Callable[[int, int], None] | None = None,
) -> DemoTruth:
    """Write a synthetic night (frames + truth) under ``out_dir`` and return its truth.

    Earlier demo frames in ``out_dir/frames`` (``Light_*.fit``) are removed first so the
    folder holds exactly this night. ``progress(done, total)`` is called after each frame.
    """
    spec.validate()
    out_path = Path(out_dir)
    frames_dir = out_path / "frames"
    truth_dir = out_path / "truth"
    frames_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    for stale in frames_dir.glob("Light_*.fit"):
        stale.unlink()

    night = _plan_night(spec)
    total = len(night.frames)
    for done, frame in enumerate(night.frames, start=1):
        pixels = _render_frame(night, frame)
        _write_fits_atomic(frames_dir / frame.truth.file_name, pixels, _frame_header(spec, frame))
        if progress is not None:
            progress(done, total)

    _write_catalog(truth_dir / "catalog.csv", night.catalog)
    _write_json_atomic(truth_dir / "frames.json", _truth_document(night))
    return load_truth(out_path)


def load_truth(out_dir: str | Path) -> DemoTruth:
    """Read the truth written by :func:`generate_demo`."""
    out_path = Path(out_dir)
    document = json.loads((out_path / "truth" / "frames.json").read_text(encoding="utf-8"))
    catalog = _read_catalog(out_path / "truth" / "catalog.csv")
    hot = np.asarray(document["hot_pixels"], dtype=np.int64).reshape(-1, 2)
    return DemoTruth(
        spec=DemoSpec.from_dict(document["spec"]),
        out_dir=out_path,
        star_ids=catalog.ids,
        star_ra=catalog.ra,
        star_dec=catalog.dec,
        star_flux=catalog.flux,
        frames=[FrameTruth.from_dict(item) for item in document["frames"]],
        hot_pixels=hot,
        hot_pixel_values=np.asarray(document["hot_pixel_values"], dtype=np.float64),
        width=int(document["width"]),
        height=int(document["height"]),
        pixel_scale_arcsec=float(document["pixel_scale_arcsec"]),
        gain_e_per_adu=float(document["gain_e_per_adu"]),
        bias_adu=float(document["bias_adu"]),
        read_noise_e=float(document["read_noise_e"]),
        saturation_adu=int(document["saturation_adu"]),
        bayer_pattern=str(document["bayer_pattern"]),
        cloudy_frame=document["cloudy_frame"],
        trail_frame=document["trail_frame"],
        nebula=list(document.get("nebula", [])),
        blurred_frame=document.get("blurred_frame"),
        elongated_frame=document.get("elongated_frame"),
    )


def truth_star_pixels(
    truth: DemoTruth,
    wcs: WCS,
    shape: tuple[int, ...],
    min_flux: float = BRIGHT_FLUX_ADU,
    isolation_px: float = 10.0,
    edge_px: float | None = None,
    max_flux: float = MAX_CHANNEL_FLUX_ADU,
    clean_frame: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright, isolated, unsaturated catalog stars inside an image with ``wcs``.

    ``shape`` is the image shape (its last two entries are height, width); positions
    are 0-based pixel coordinates of that image. A star is kept when its green flux is
    at least ``min_flux``, no channel exceeds ``max_flux`` (every catalog star is below
    the saturation cap by construction), no other catalog star of any flux lies within
    ``isolation_px`` and it is at least ``edge_px`` (default ``isolation_px``) from the
    image edges. With ``clean_frame`` (``wcs`` being that frame's detector WCS), stars
    within ``isolation_px`` of a hot pixel or of that frame's satellite trail are dropped
    too. Returns ``(ids, x, y)`` sorted by decreasing flux.
    """
    from scipy.spatial import cKDTree

    height, width = int(shape[-2]), int(shape[-1])
    if wcs.naxis > 2:
        wcs = wcs.celestial
    edge = isolation_px if edge_px is None else edge_px
    x, y = _world_to_pixels(wcs, truth.star_ra, truth.star_dec)
    near = np.isfinite(x) & np.isfinite(y)
    near &= (x > -isolation_px - 1) & (x < width + isolation_px) & (y > -isolation_px - 1) & (y < height + isolation_px)
    index = np.flatnonzero(near)
    if index.size == 0:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty
    points = np.column_stack([x[index], y[index]])
    if index.size > 1:
        distance, _ = cKDTree(points).query(points, k=2)
        nearest = distance[:, 1]
    else:
        nearest = np.full(1, np.inf)
    flux = truth.star_flux[index]
    keep = (flux[:, 1] >= min_flux) & (flux.max(axis=1) <= max_flux) & (nearest > isolation_px)
    keep &= (points[:, 0] >= edge) & (points[:, 0] <= width - 1 - edge)
    keep &= (points[:, 1] >= edge) & (points[:, 1] <= height - 1 - edge)
    if clean_frame is not None:
        keep &= _far_from_artefacts(truth, clean_frame, points, isolation_px)
    chosen = index[keep]
    order = np.argsort(-truth.star_flux[chosen, 1], kind="stable")
    chosen = chosen[order]
    return truth.star_ids[chosen].astype(np.int64), x[chosen], y[chosen]


def _far_from_artefacts(truth: DemoTruth, frame: int, points: np.ndarray, distance: float) -> np.ndarray:
    """True for detector positions (n, 2) farther than ``distance`` from hot pixels and the trail."""
    far = np.ones(points.shape[0], dtype=bool)
    if truth.hot_pixels.size:
        gaps = np.hypot(points[:, None, 0] - truth.hot_pixels[None, :, 0], points[:, None, 1] - truth.hot_pixels[None, :, 1])
        far &= gaps.min(axis=1) > distance
    trail = truth.frames[frame].trail
    if trail is not None:
        x0, y0, x1, y1 = trail
        length = math.hypot(x1 - x0, y1 - y0)
        across = np.abs((points[:, 0] - x0) * (y1 - y0) - (points[:, 1] - y0) * (x1 - x0)) / length
        far &= across > distance
    return far


def wcs_from_header_dict(header: dict[str, Any]) -> WCS:
    """An astropy WCS from WCS keywords stored as a plain dict (as in ``frames.json``)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header(header), relax=True)


# ============================================================================ planning


@dataclass
class _Catalog:
    ids: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    flux: np.ndarray  # (N, 3)
    mosaic_x: np.ndarray | None = None  # position in the mosaic tangent plane, px
    mosaic_y: np.ndarray | None = None


@dataclass
class _FramePlan:
    truth: FrameTruth
    ccd_temp: float
    noise_seed: np.random.SeedSequence
    mosaic_xy: tuple[float, float]  # field centre in the mosaic tangent plane, px


@dataclass
class _Night:
    spec: DemoSpec
    width: int
    height: int
    mosaic_wcs: Any  # TAN WCS centred on the mosaic centre, 0-based pixel (0, 0) = centre
    sip_coefficients: dict[str, float]
    catalog: _Catalog
    nebula: list[dict[str, Any]]
    hot_xy: np.ndarray  # (K, 2)
    hot_values: np.ndarray
    frames: list[_FramePlan]
    cloudy_frame: int | None
    trail_frame: int | None


def _plan_night(spec: DemoSpec) -> _Night:
    # Child i of a SeedSequence depends only on i, so the 7th stream (the optional smear
    # direction) leaves the first six, hence every default night, unchanged.
    streams = np.random.SeedSequence(spec.seed).spawn(7)
    geometry_rng, catalog_rng, nebula_rng, artefact_rng, sip_rng = (np.random.default_rng(s) for s in streams[:5])
    width, height = spec.width, spec.height
    base_rotation = float(geometry_rng.uniform(-15.0, 15.0))
    mosaic_wcs = _tan_wcs(spec.ra_deg, spec.dec_deg, base_rotation, crpix=(1.0, 1.0))

    panel_offsets = _panel_offsets(spec, width, height)
    dither_max = max(6.0, 20.0 * spec.scale)
    half_extent = _catalog_half_extent(panel_offsets, width, height, dither_max)
    catalog = _make_catalog(spec, catalog_rng, mosaic_wcs, half_extent, width * height)
    nebula = _make_nebula(nebula_rng, half_extent)
    sip = _make_sip(sip_rng, width, height) if spec.sip else {}
    n_frames = spec.n_frames
    cloudy, trail = _pick_artefact_frames(artefact_rng, n_frames) if spec.artefacts else (None, None)
    hot_xy, hot_values = _make_hot_pixels(artefact_rng, width, height) if spec.artefacts else (
        np.zeros((0, 2), dtype=np.int64),
        np.zeros(0),
    )
    smear_angle = float(np.random.default_rng(streams[6]).uniform(0.0, 180.0))
    frames = _plan_frames(
        spec, geometry_rng, artefact_rng, streams[5], mosaic_wcs, base_rotation, panel_offsets,
        dither_max, sip, cloudy, trail, smear_angle,
    )
    return _Night(spec, width, height, mosaic_wcs, sip, catalog, nebula, hot_xy, hot_values, frames, cloudy, trail)


def _panel_offsets(spec: DemoSpec, width: int, height: int) -> list[tuple[float, float]]:
    """Panel centres in the mosaic tangent plane (px, sensor orientation), row by row."""
    rows, cols = spec.panels
    step_x = (1.0 - spec.overlap) * width
    step_y = (1.0 - spec.overlap) * height
    return [
        ((col - (cols - 1) / 2.0) * step_x, (row - (rows - 1) / 2.0) * step_y)
        for row in range(rows)
        for col in range(cols)
    ]


def _catalog_half_extent(
    panel_offsets: list[tuple[float, float]], width: int, height: int, dither_max: float
) -> tuple[float, float]:
    # The half-diagonal covers any field rotation; the margin covers dithers and PSF stamps.
    half_diagonal = 0.5 * math.hypot(width, height)
    margin = half_diagonal + dither_max + 16.0
    return (
        max(abs(dx) for dx, _ in panel_offsets) + margin,
        max(abs(dy) for _, dy in panel_offsets) + margin,
    )


def _make_catalog(
    spec: DemoSpec,
    rng: np.random.Generator,
    mosaic_wcs: Any,
    half_extent: tuple[float, float],
    field_area_px: int,
) -> _Catalog:
    half_x, half_y = half_extent
    area = 4.0 * half_x * half_y
    n_main = int(round(spec.star_density * STAR_DENSITY_PER_PX2 * area))
    flux_g = _power_law(rng, n_main, FAINT_FLUX_ADU, MAX_CHANNEL_FLUX_ADU)
    colours = _star_colours(rng, n_main)
    flux = _cap_flux(flux_g[:, None] * colours)

    # Small sensors would see almost no bright stars: top up to a minimum per field area.
    n_bright_wanted = 0 if spec.star_density <= 0 else math.ceil(MIN_BRIGHT_PER_FIELD * area / field_area_px)
    n_extra = max(0, n_bright_wanted - int(np.count_nonzero(flux[:, 1] >= BRIGHT_FLUX_ADU)))
    extra_g = _power_law(rng, n_extra, 1.25 * BRIGHT_FLUX_ADU, MAX_CHANNEL_FLUX_ADU / 1.6, slope=0.5)
    flux = np.vstack([flux, _cap_flux(extra_g[:, None] * _star_colours(rng, n_extra))])

    n_total = flux.shape[0]
    mosaic_x = rng.uniform(-half_x, half_x, n_total)
    mosaic_y = rng.uniform(-half_y, half_y, n_total)
    ra, dec = mosaic_wcs.wcs_pix2world(mosaic_x, mosaic_y, 0)
    # Round-trip exactly through the CSV: positions as written are the truth.
    ra = np.mod(ra, 360.0)
    flux = np.round(flux, 3)
    return _Catalog(np.arange(n_total, dtype=np.int64), ra, dec, flux, mosaic_x, mosaic_y)


def _power_law(rng: np.random.Generator, n: int, low: float, high: float, slope: float = FLUX_SLOPE) -> np.ndarray:
    """Fluxes with cumulative counts N(>F) ∝ F^-slope between low and high."""
    u = rng.uniform(0.0, 1.0, n)
    tail = (high / low) ** (-slope)
    return low * (1.0 - u * (1.0 - tail)) ** (-1.0 / slope)


def _star_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) flux ratios R/G, 1, B/G from a temperature-like parameter (0 hot, 1 cool)."""
    temperature = rng.beta(2.0, 2.0, n)
    red_over_green = np.exp(np.log(0.55) + temperature * np.log(1.6 / 0.55))
    blue_over_green = np.exp(np.log(1.55) - temperature * np.log(1.55 / 0.5))
    return np.column_stack([red_over_green, np.ones(n), blue_over_green])


def _cap_flux(flux: np.ndarray) -> np.ndarray:
    if flux.size == 0:
        return flux.reshape(0, 3)
    factor = np.minimum(1.0, MAX_CHANNEL_FLUX_ADU / flux.max(axis=1))
    return flux * factor[:, None]


def _make_nebula(rng: np.random.Generator, half_extent: tuple[float, float]) -> list[dict[str, Any]]:
    """Gaussian blobs and filaments in the mosaic tangent plane (px), amplitudes in ADU (R, G, B)."""
    radius = math.sqrt(half_extent[0] * half_extent[1])
    red_noise = math.sqrt(SKY_ADU[0] / GAIN_E_PER_ADU)  # sky shot noise of a red pixel, ADU
    min_sigma = 40.0  # keeps the nebula smooth at the background grid spacing
    blobs = []
    for kind in ("blob", "blob", "blob", "blob", "filament", "filament"):
        if kind == "blob":
            sigma_major = max(min_sigma, rng.uniform(0.2, 0.5) * radius)
            sigma_minor = max(min_sigma, sigma_major * rng.uniform(0.5, 1.0))
            amplitude = rng.uniform(2.0, 5.0) * red_noise
        else:
            sigma_major = max(min_sigma, rng.uniform(0.4, 0.8) * radius)
            sigma_minor = max(min_sigma, 0.06 * radius)
            amplitude = rng.uniform(1.5, 3.5) * red_noise
        colour = (1.0, rng.uniform(0.25, 0.45), rng.uniform(0.2, 0.4))  # H-alpha red, some OIII/H-beta
        blobs.append(
            {
                "kind": kind,
                "x": float(rng.uniform(-0.6, 0.6) * half_extent[0]),
                "y": float(rng.uniform(-0.6, 0.6) * half_extent[1]),
                "sigma_major_px": float(sigma_major),
                "sigma_minor_px": float(sigma_minor),
                "angle_deg": float(rng.uniform(0.0, 180.0)),
                "amplitude_adu": [float(amplitude * c) for c in colour],
            }
        )
    # Keep the brightest nebula at most ~10x the red sky noise.
    grid_x, grid_y = np.meshgrid(
        np.linspace(-half_extent[0], half_extent[0], 64), np.linspace(-half_extent[1], half_extent[1], 64)
    )
    peak = float(_nebula_at(blobs, grid_x, grid_y)[0].max())
    limit = 10.0 * red_noise
    if peak > limit:
        for blob in blobs:
            blob["amplitude_adu"] = [a * limit / peak for a in blob["amplitude_adu"]]
    return blobs


def _nebula_at(blobs: list[dict[str, Any]], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nebula surface brightness (3, *x.shape) in ADU per pixel at mosaic-plane positions."""
    out = np.zeros((3,) + x.shape, dtype=np.float64)
    for blob in blobs:
        angle = math.radians(blob["angle_deg"])
        dx, dy = x - blob["x"], y - blob["y"]
        along = dx * math.cos(angle) + dy * math.sin(angle)
        across = -dx * math.sin(angle) + dy * math.cos(angle)
        shape = np.exp(-0.5 * ((along / blob["sigma_major_px"]) ** 2 + (across / blob["sigma_minor_px"]) ** 2))
        for channel, amplitude in enumerate(blob["amplitude_adu"]):
            out[channel] += amplitude * shape
    return out


def _make_sip(rng: np.random.Generator, width: int, height: int) -> dict[str, float]:
    """Order-2 SIP coefficients with ~1.2–1.8 px of distortion at the sensor corners.

    Coefficients are normalised at the actual corners, so the distortion in px is the
    same at any ``scale`` (the coefficients grow as 1/scale²).
    """
    terms = ((2, 0), (1, 1), (0, 2))
    a = rng.normal(0.0, 1.0, 3)
    b = rng.normal(0.0, 1.0, 3)
    u = np.array([-1.0, 1.0, -1.0, 1.0]) * (width - 1) / 2.0
    v = np.array([-1.0, -1.0, 1.0, 1.0]) * (height - 1) / 2.0
    monomials = np.stack([u**p * v**q for p, q in terms])  # (3, 4)
    corner = np.hypot(a @ monomials, b @ monomials).max()
    factor = rng.uniform(*SIP_CORNER_DISTORTION_PX) / corner
    coefficients: dict[str, float] = {}
    for (p, q), ca, cb in zip(terms, a * factor, b * factor):
        coefficients[f"A_{p}_{q}"] = _round_sig(ca)
        coefficients[f"B_{p}_{q}"] = _round_sig(cb)
    return coefficients


def _pick_artefact_frames(rng: np.random.Generator, n_frames: int) -> tuple[int | None, int | None]:
    """(cloudy, trail): distinct frames, never the first one when the night allows it.

    A one-frame night gets the trail but no cloud (a lone cloudy frame shows nothing).
    """
    if n_frames == 1:
        return None, 0
    candidates = np.arange(1, n_frames)
    if candidates.size >= 2:
        cloudy, trail = rng.choice(candidates, size=2, replace=False)
        return int(cloudy), int(trail)
    return 1, 1


def _make_hot_pixels(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    count = max(HOT_PIXELS_MIN, int(round(HOT_PIXELS_FULL_FRAME * width * height / (SENSOR_WIDTH * SENSOR_HEIGHT))))
    flat = rng.choice((width - 4) * (height - 4), size=count, replace=False)
    xy = np.column_stack([flat % (width - 4) + 2, flat // (width - 4) + 2]).astype(np.int64)
    values = np.round(rng.uniform(*HOT_PIXEL_RANGE_ADU, count), 1)
    return xy, values


def _plan_frames(
    spec: DemoSpec,
    rng: np.random.Generator,
    artefact_rng: np.random.Generator,
    noise_root: np.random.SeedSequence,
    mosaic_wcs: Any,
    base_rotation: float,
    panel_offsets: list[tuple[float, float]],
    dither_max: float,
    sip: dict[str, float],
    cloudy: int | None,
    trail: int | None,
    smear_angle: float = 0.0,
) -> list[_FramePlan]:
    width, height = spec.width, spec.height
    # Alt-az field rotation: a few tenths of a degree per ~11 s frame, one sign per night.
    rotation_rate = 0.0 if spec.eqmode == 1 else float(rng.uniform(0.2, 0.4) / 11.0 * rng.choice([-1.0, 1.0]))
    seeing_base = rng.uniform(2.5, 2.8)
    seeing_phase = rng.uniform(0.0, 2.0 * math.pi)
    ccd_temp_start = rng.uniform(18.0, 24.0)
    gradient_angle = rng.uniform(0.0, 2.0 * math.pi)
    gradient_size = rng.uniform(0.02, 0.05)
    noise_seeds = noise_root.spawn(spec.n_frames)

    plans: list[_FramePlan] = []
    elapsed = 0.0
    index = 0
    for panel, (offset_x, offset_y) in enumerate(panel_offsets):
        if panel > 0:
            elapsed += rng.uniform(20.0, 40.0)  # slew and re-centre between panels
        panel_ra, panel_dec = (float(v) for v in mosaic_wcs.wcs_pix2world(offset_x, offset_y, 0))
        haze = PANEL_TRANSPARENCY[panel % len(PANEL_TRANSPARENCY)] if spec.artefacts else 1.0
        error_angle = rng.uniform(0.0, 2.0 * math.pi)
        error_arcsec = rng.uniform(10.0, 50.0)
        panel_dithers: list[tuple[float, float]] = []
        for index_in_panel in range(spec.frames_per_panel):
            if index_in_panel > 0:
                elapsed += max(spec.exptime, 1.0) + rng.uniform(0.2, 2.0)
            rotation = base_rotation + rotation_rate * elapsed
            dither = _dither(rng, dither_max, panel_dithers)
            panel_dithers.append(dither)
            centre_ra, centre_dec = _offset_on_sky(panel_ra, panel_dec, rotation, dither)
            mount_ra, mount_dec = _pointing_error(rng, centre_ra, centre_dec, error_angle, error_arcsec)
            fwhm = seeing_base + 0.25 * math.sin(seeing_phase + elapsed / 900.0) + rng.normal(0.0, 0.05)
            fwhm = float(np.clip(fwhm, *FWHM_RANGE_PX))
            is_blurred = index == spec.blurred_frame
            if is_blurred:
                fwhm *= BLURRED_FWHM_FACTOR
            smear = SMEAR_LENGTH_PX if index == spec.elongated_frame else 0.0
            is_cloudy = index == cloudy
            if is_cloudy:
                transparency, sky_factor = CLOUDY_TRANSPARENCY, CLOUDY_SKY_FACTOR
            else:
                jitter = rng.normal(0.0, 0.004) if spec.artefacts else 0.0
                transparency = float(min(1.0, haze * (1.0 + jitter)))
                sky_factor = 1.0 + 0.5 * (1.0 - transparency)  # haze scatters light into the sky
            sky = tuple(round(level * sky_factor * (1.0 + rng.normal(0.0, 0.01)), 3) for level in SKY_ADU)
            angle = gradient_angle + math.radians(rotation - base_rotation) + 0.3 * panel
            gradient = (round(gradient_size * math.cos(angle), 6), round(gradient_size * math.sin(angle), 6))
            trail_line, trail_peak = (None, 0.0)
            if index == trail:
                trail_line = _trail_endpoints(artefact_rng, width, height)
                trail_peak = round(float(artefact_rng.uniform(2000.0, 4500.0)), 3)
            when = START_TIME + timedelta(seconds=elapsed)
            header = _wcs_header(centre_ra, centre_dec, rotation, width, height, sip)
            truth = FrameTruth(
                file_name=f"Light_{spec.object_name}_{spec.exptime:.1f}s_{FILTER_NAME}_{when:%Y%m%d-%H%M%S}.fit",
                panel=panel,
                index=index,
                index_in_panel=index_in_panel,
                date_obs=when.isoformat(timespec="milliseconds"),
                wcs_header=header,
                fwhm_px=round(fwhm, 4),
                transparency=round(transparency, 5),
                sky_adu=sky,  # type: ignore[arg-type]
                sky_gradient=gradient,
                rotation_deg=_round_sig(rotation),
                dither_px=(round(dither[0], 4), round(dither[1], 4)),
                centre_ra=header["CRVAL1"],
                centre_dec=header["CRVAL2"],
                mount_ra=_round_sig(mount_ra),
                mount_dec=_round_sig(mount_dec),
                is_cloudy=is_cloudy,
                trail=trail_line,
                trail_peak_adu=trail_peak,
                is_blurred=is_blurred,
                smear_px=smear,
                smear_angle_deg=round(smear_angle, 4) if smear else 0.0,
            )
            mosaic_xy = tuple(float(v) for v in mosaic_wcs.wcs_world2pix(centre_ra, centre_dec, 0))
            ccd_temp = round(ccd_temp_start - elapsed / 1800.0 + rng.normal(0.0, 0.1), 1)
            plans.append(_FramePlan(truth, ccd_temp, noise_seeds[index], mosaic_xy))  # type: ignore[arg-type]
            index += 1
    return plans


def _dither(rng: np.random.Generator, dither_max: float, earlier: list[tuple[float, float]]) -> tuple[float, float]:
    """A dither offset within ``dither_max`` px, kept apart from the panel's earlier ones.

    Like capture software, a new position is chosen away from the previous ones, so a
    hot pixel rarely lands twice on the same sky spot (the best of a few draws wins).
    """
    angle = rng.uniform(0.0, 2.0 * math.pi, 24)
    size = np.sqrt(rng.uniform(0.04, 1.0, 24)) * dither_max  # uniform over the disc
    candidates = np.column_stack([size * np.cos(angle), size * np.sin(angle)])
    if not earlier:
        return float(candidates[0, 0]), float(candidates[0, 1])
    previous = np.asarray(earlier)
    gaps = np.hypot(*(candidates[:, None, :] - previous[None, :, :]).transpose(2, 0, 1)).min(axis=1)
    wanted = 0.5 * dither_max
    good = np.flatnonzero(gaps >= wanted)
    best = int(good[0]) if good.size else int(np.argmax(gaps))
    return float(candidates[best, 0]), float(candidates[best, 1])


def _offset_on_sky(ra: float, dec: float, rotation: float, offset_px: tuple[float, float]) -> tuple[float, float]:
    """Sky position ``offset_px`` detector pixels from the field centre (ra, dec)."""
    wcs = _tan_wcs(ra, dec, rotation, crpix=(1.0, 1.0))
    new_ra, new_dec = wcs.wcs_pix2world(offset_px[0], offset_px[1], 0)
    return float(np.mod(new_ra, 360.0)), float(new_dec)


def _pointing_error(
    rng: np.random.Generator, ra: float, dec: float, angle: float, size_arcsec: float
) -> tuple[float, float]:
    """Mount-reported position: a per-panel systematic offset plus a few arcsec of jitter."""
    east = size_arcsec * math.cos(angle) + rng.normal(0.0, 3.0)
    north = size_arcsec * math.sin(angle) + rng.normal(0.0, 3.0)
    mount_dec = float(np.clip(dec + north / 3600.0, -90.0, 90.0))
    mount_ra = float(np.mod(ra + east / 3600.0 / max(math.cos(math.radians(dec)), 1e-6), 360.0))
    return mount_ra, mount_dec


def _trail_endpoints(rng: np.random.Generator, width: int, height: int) -> tuple[float, float, float, float]:
    """Two points on different sides of the frame border, so the line crosses it."""
    first, second = rng.choice(4, size=2, replace=False)

    def on_side(side: int) -> tuple[float, float]:
        t = rng.uniform(0.15, 0.85)
        if side == 0:
            return (t * (width - 1), 0.0)
        if side == 1:
            return (float(width - 1), t * (height - 1))
        if side == 2:
            return (t * (width - 1), float(height - 1))
        return (0.0, t * (height - 1))

    x0, y0 = on_side(int(first))
    x1, y1 = on_side(int(second))
    return (round(x0, 3), round(y0, 3), round(x1, 3), round(y1, 3))


# ============================================================================ WCS helpers


def _round_sig(value: float, digits: int = 12) -> float:
    """Round to ``digits`` significant digits so FITS cards and JSON hold the same number."""
    return float(f"{float(value):.{digits - 1}e}")


def _cd_matrix(rotation_deg: float) -> tuple[float, float, float, float]:
    """CD for 2.39"/px, east left when north is up, detector +y at position angle ``rotation_deg``."""
    scale = PIXEL_SCALE_ARCSEC / 3600.0
    theta = math.radians(rotation_deg)
    return (-scale * math.cos(theta), scale * math.sin(theta), scale * math.sin(theta), scale * math.cos(theta))


def _tan_wcs(ra: float, dec: float, rotation_deg: float, crpix: tuple[float, float]) -> Any:
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = list(crpix)
    cd11, cd12, cd21, cd22 = _cd_matrix(rotation_deg)
    wcs.wcs.cd = [[cd11, cd12], [cd21, cd22]]
    return wcs


def _wcs_header(
    ra: float, dec: float, rotation_deg: float, width: int, height: int, sip: dict[str, float]
) -> dict[str, Any]:
    cd11, cd12, cd21, cd22 = _cd_matrix(rotation_deg)
    suffix = "-SIP" if sip else ""
    header: dict[str, Any] = {
        "WCSAXES": 2,
        "CTYPE1": "RA---TAN" + suffix,
        "CTYPE2": "DEC--TAN" + suffix,
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CRVAL1": _round_sig(ra % 360.0),
        "CRVAL2": _round_sig(dec),
        "CRPIX1": (width + 1) / 2.0,
        "CRPIX2": (height + 1) / 2.0,
        "CD1_1": _round_sig(cd11),
        "CD1_2": _round_sig(cd12),
        "CD2_1": _round_sig(cd21),
        "CD2_2": _round_sig(cd22),
        "RADESYS": "ICRS",
        "EQUINOX": 2000.0,
    }
    if sip:
        header["A_ORDER"] = 2
        header.update({key: value for key, value in sip.items() if key.startswith("A_")})
        header["B_ORDER"] = 2
        header.update({key: value for key, value in sip.items() if key.startswith("B_")})
    return header


def _world_to_pixels(wcs: Any, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions, SIP included; NaN where the projection has no answer."""
    if ra.size == 0:
        return np.zeros(0), np.zeros(0)
    if wcs.sip is None:
        x, y = wcs.wcs_world2pix(ra, dec, 0)
    else:
        x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-7, maxiter=50, quiet=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


# ============================================================================ rendering


def _render_frame(night: _Night, plan: _FramePlan) -> np.ndarray:
    """The uint16 CFA image (height, width) of one frame."""
    truth = plan.truth
    width, height = night.width, night.height
    wcs = wcs_from_header_dict(truth.wcs_header)
    rng = np.random.default_rng(plan.noise_seed)

    signal = _render_background(night, truth, wcs)
    x, y, flux = _stars_in_frame(night, plan, wcs)
    sigma = truth.fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    if truth.smear_px > 0:
        x, y, flux = _smeared(x, y, flux, truth.smear_px, truth.smear_angle_deg)
    signal += _render_stars(x, y, flux * truth.transparency, sigma, (height, width))
    if truth.trail is not None:
        signal += _render_trail(truth.trail, truth.trail_peak_adu * truth.transparency, (height, width))

    # Shot noise of the signal (in electrons) and read noise, as one normal draw (see module doc).
    noise = np.sqrt(signal * GAIN_E_PER_ADU + READ_NOISE_E**2)
    noise *= rng.standard_normal((height, width), dtype=np.float32)
    noise *= 1.0 / GAIN_E_PER_ADU
    raw = signal
    raw += noise
    raw += BIAS_ADU
    if night.hot_xy.size:
        levels = night.hot_values * (1.0 + 0.01 * rng.standard_normal(night.hot_values.size))
        raw[night.hot_xy[:, 1], night.hot_xy[:, 0]] = levels
    np.rint(raw, out=raw)
    np.clip(raw, 0, SATURATION_ADU, out=raw)
    return raw.astype(np.uint16)


def _stars_in_frame(night: _Night, plan: _FramePlan, wcs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel positions and fluxes of the catalog stars whose stamps touch the frame."""
    catalog = night.catalog
    assert catalog.mosaic_x is not None and catalog.mosaic_y is not None
    # Cheap preselection in the mosaic tangent plane (same pixel scale within <1 %).
    reach = 1.02 * 0.5 * math.hypot(night.width, night.height) + 16.0
    centre_x, centre_y = plan.mosaic_xy
    close = (catalog.mosaic_x - centre_x) ** 2 + (catalog.mosaic_y - centre_y) ** 2 < reach**2
    x, y = _world_to_pixels(wcs, catalog.ra[close], catalog.dec[close])
    margin = 12.0
    inside = np.isfinite(x) & np.isfinite(y)
    inside &= (x > -margin) & (x < night.width + margin) & (y > -margin) & (y < night.height + margin)
    return x[inside], y[inside], catalog.flux[close][inside]


def _render_stars(
    x: np.ndarray, y: np.ndarray, flux: np.ndarray, sigma: float, shape: tuple[int, int]
) -> np.ndarray:
    """Pixel-integrated Gaussians at the CFA site colours, accumulated with one bincount."""
    from scipy.special import erf

    height, width = shape
    if x.size == 0:
        return np.zeros(shape, dtype=np.float32)
    half = int(math.ceil(4.0 * sigma)) + 1
    steps = np.arange(2 * half + 1)
    edges = np.arange(2 * half + 2) - 0.5
    scale = 1.0 / (sigma * math.sqrt(2.0))

    def axis_weights(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first = np.floor(centre + 0.5).astype(np.int64) - half
        cdf = erf((first[:, None] + edges[None, :] - centre[:, None]) * scale)
        return first[:, None] + steps[None, :], 0.5 * np.diff(cdf, axis=1)

    cols, weight_x = axis_weights(x)
    rows, weight_y = axis_weights(y)
    stars = np.arange(x.size)[:, None, None]
    flux_by_site = flux[:, CFA_CHANNELS]  # (N, 2, 2): flux of the colour at [y % 2, x % 2]
    site_flux = flux_by_site[stars, (rows & 1)[:, :, None], (cols & 1)[:, None, :]]
    values = site_flux * weight_y[:, :, None] * weight_x[:, None, :]
    row_index = np.broadcast_to(rows[:, :, None], values.shape)
    col_index = np.broadcast_to(cols[:, None, :], values.shape)
    valid = (row_index >= 0) & (row_index < height) & (col_index >= 0) & (col_index < width)
    flat = row_index[valid] * width + col_index[valid]
    image = np.bincount(flat, weights=values[valid], minlength=height * width)
    return image.reshape(shape).astype(np.float32)


def _smeared(
    x: np.ndarray, y: np.ndarray, flux: np.ndarray, length: float, angle_deg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each star as SMEAR_STEPS points evenly spread along a centred segment, sharing its flux."""
    steps = np.linspace(-0.5, 0.5, SMEAR_STEPS) * length
    angle = math.radians(angle_deg)
    xs = (x[:, None] + steps[None, :] * math.cos(angle)).ravel()
    ys = (y[:, None] + steps[None, :] * math.sin(angle)).ravel()
    return xs, ys, np.repeat(flux / SMEAR_STEPS, SMEAR_STEPS, axis=0)


def _render_background(night: _Night, truth: FrameTruth, wcs: Any) -> np.ndarray:
    """Sky with its gradient plus the nebula, at each CFA site's colour (float32, ADU above bias)."""
    width, height = night.width, night.height
    step = 8 if min(width, height) >= 500 else 4
    nodes_x = np.linspace(0.0, width - 1.0, int(math.ceil((width - 1) / step)) + 1)
    nodes_y = np.linspace(0.0, height - 1.0, int(math.ceil((height - 1) / step)) + 1)
    grid_x, grid_y = np.meshgrid(nodes_x, nodes_y)
    ra, dec = wcs.all_pix2world(grid_x.ravel(), grid_y.ravel(), 0)
    mosaic_x, mosaic_y = night.mosaic_wcs.wcs_world2pix(ra, dec, 0)
    nebula = _nebula_at(night.nebula, mosaic_x.reshape(grid_x.shape), mosaic_y.reshape(grid_x.shape))

    along_x = (grid_x - (width - 1) / 2.0) / width
    along_y = (grid_y - (height - 1) / 2.0) / height
    slope = 1.0 + truth.sky_gradient[0] * along_x + truth.sky_gradient[1] * along_y
    coarse = np.stack([level * slope for level in truth.sky_adu]) + truth.transparency * nebula

    # Separable bilinear interpolation, one small matrix product per CFA parity.
    image = np.empty((height, width), dtype=np.float32)
    for parity_y in (0, 1):
        rows_matrix = _linear_matrix(nodes_y, np.arange(parity_y, height, 2))
        for parity_x in (0, 1):
            channel = CFA_CHANNELS[parity_y, parity_x]
            cols_matrix = _linear_matrix(nodes_x, np.arange(parity_x, width, 2))
            image[parity_y::2, parity_x::2] = rows_matrix @ (coarse[channel].astype(np.float32) @ cols_matrix.T)
    return image


def _linear_weights(nodes: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the bracketing nodes and the fraction towards the second one."""
    at = np.clip(np.searchsorted(nodes, positions, side="right") - 1, 0, nodes.size - 2)
    t = (positions - nodes[at]) / (nodes[at + 1] - nodes[at])
    return at, at + 1, t.astype(np.float32)


def _linear_matrix(nodes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    at, after, t = _linear_weights(nodes, positions)
    matrix = np.zeros((positions.size, nodes.size), dtype=np.float32)
    rows = np.arange(positions.size)
    matrix[rows, at] = 1.0 - t
    matrix[rows, after] = t
    return matrix


def _render_trail(line: tuple[float, float, float, float], peak: float, shape: tuple[int, int]) -> np.ndarray:
    """A straight satellite trail, ~2 px FWHM across, of slightly warm sunlight colour."""
    height, width = shape
    x0, y0, x1, y1 = line
    length = math.hypot(x1 - x0, y1 - y0)
    normal_x, normal_y = -(y1 - y0) / length, (x1 - x0) / length
    sigma = 2.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    distance = (xs - x0) * normal_x + (ys - y0) * normal_y
    profile = np.exp(-0.5 * (distance / sigma) ** 2).astype(np.float32)
    colour = np.array([1.0, 1.0, 0.9], dtype=np.float32)[CFA_CHANNELS]  # per CFA site
    site_colour = np.tile(colour, (height // 2, width // 2))
    return peak * profile * site_colour


# ============================================================================ writing


def _frame_header(spec: DemoSpec, plan: _FramePlan) -> Any:
    from astropy.io import fits

    truth = plan.truth
    cards: list[tuple[str, Any, str]] = [
        ("CREATOR", CREATOR, "Capture software"),
        ("INSTRUME", INSTRUMENT, "Instrument name"),
        ("TELESCOP", TELESCOPE, "Telescope name"),
        ("OBJECT", spec.object_name, "Target name"),
        ("DATE-OBS", truth.date_obs, "UTC start of the exposure"),
        ("EXPTIME", float(spec.exptime), "[s] Exposure time"),
        ("EXPOSURE", float(spec.exptime), "[s] Exposure time"),
        ("GAIN", GAIN_SETTING, "Sensor gain setting"),
        ("CCD-TEMP", float(plan.ccd_temp), "[C] Sensor temperature"),
        ("FILTER", FILTER_NAME, "Filter"),
        ("BAYERPAT", BAYER_PATTERN, "Bayer colour pattern"),
        ("XBAYROFF", 0, "X offset of the Bayer pattern"),
        ("YBAYROFF", 0, "Y offset of the Bayer pattern"),
        ("FOCALLEN", FOCAL_LENGTH_MM, "[mm] Focal length"),
        ("XPIXSZ", PIXEL_SIZE_UM, "[um] Pixel width"),
        ("YPIXSZ", PIXEL_SIZE_UM, "[um] Pixel height"),
        ("XBINNING", 1, "Binning in x"),
        ("YBINNING", 1, "Binning in y"),
        ("EQMODE", int(spec.eqmode), "Mount mode: 0 alt-az, 1 equatorial"),
        ("RA", truth.mount_ra, "[deg] Mount right ascension"),
        ("DEC", truth.mount_dec, "[deg] Mount declination"),
    ]
    header = fits.Header()
    for key, value, comment in cards:
        header[key] = (value, comment)
    if spec.with_wcs:
        for key, value in truth.wcs_header.items():
            header[key] = value
    return header


def _write_fits_atomic(path: Path, pixels: np.ndarray, header: Any) -> None:
    """uint16 data: astropy stores it as BITPIX=16 with BZERO=32768, BSCALE=1."""
    from astropy.io import fits

    temporary = path.with_name(f".{path.name}.part")
    fits.PrimaryHDU(data=pixels, header=header).writeto(temporary, overwrite=True)
    os.replace(temporary, path)


def _write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _write_catalog(path: Path, catalog: _Catalog) -> None:
    temporary = path.with_name(f".{path.name}.part")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "ra", "dec", "flux_r", "flux_g", "flux_b"])
        for star, ra, dec, flux in zip(catalog.ids, catalog.ra, catalog.dec, catalog.flux):
            writer.writerow([int(star), repr(float(ra)), repr(float(dec))] + [repr(float(f)) for f in flux])
    os.replace(temporary, path)


def _read_catalog(path: Path) -> _Catalog:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    table = np.array([[float(v) for v in row] for row in rows], dtype=np.float64).reshape(-1, 6)
    return _Catalog(table[:, 0].astype(np.int64), table[:, 1].copy(), table[:, 2].copy(), table[:, 3:6].copy())


def _truth_document(night: _Night) -> dict[str, Any]:
    return {
        "format": "napari-zemosaic-demo-truth",
        "version": 1,
        "spec": night.spec.to_dict(),
        "width": night.width,
        "height": night.height,
        "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
        "gain_setting": GAIN_SETTING,
        "gain_e_per_adu": GAIN_E_PER_ADU,
        "bias_adu": BIAS_ADU,
        "read_noise_e": READ_NOISE_E,
        "saturation_adu": SATURATION_ADU,
        "bayer_pattern": BAYER_PATTERN,
        "flux_definition": "total ADU above bias per channel in one frame at transparency 1",
        "cloudy_frame": night.cloudy_frame,
        "trail_frame": night.trail_frame,
        "blurred_frame": night.spec.blurred_frame,
        "elongated_frame": night.spec.elongated_frame,
        "hot_pixels": night.hot_xy.tolist(),
        "hot_pixel_values": [float(v) for v in night.hot_values],
        "nebula": night.nebula,
        "frames": [plan.truth.to_dict() for plan in night.frames],
    }


def _optional_index_ok(value: int | None, n_frames: int) -> bool:
    return value is None or (isinstance(value, (int, np.integer)) and 0 <= int(value) < n_frames)


def _even(value: float) -> int:
    return max(2, 2 * int(round(value / 2.0)))

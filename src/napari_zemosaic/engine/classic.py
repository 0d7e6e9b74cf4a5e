"""The classic workflow: pointing groups → master tiles → P4.5 between tiles → final assembly.

Default for non-Seestar data (``workflow: auto``), available for any data with
``--workflow classic``. It stays independent of SDS and of the GPU settings: with the stages on
the CPU the result is the same whatever ``sds_mode`` or the GPU flags say.

Phases
------
* **P2 — groups** (:mod:`.grouping`): frames by pointing, orientation and size; no frame twice.
* **P3 — master tiles.** Each group is stacked on its own *tile WCS*: a gnomonic (TAN, no SIP)
  projection centred on the group's mean centre, with the linear CD matrix (scale, rotation,
  parity) of the group's reference frame (the member nearest that centre), sized to hold every
  member's outline. Stacking goes through the common engine: :func:`.mosaic_first.mosaic_first`
  on the tile's pixel grid does the per-frame resampling, photometric normalisation, weights,
  rejection and combine, within the memory budget. The tile keeps its data, coverage weight
  and frame count, an optional edge crop (``master_tile_crop_pct``: the coverage is eroded by
  that share of the tile's short side) and an **alpha** map feathered from its own coverage
  edge (distance to the nearest uncovered pixel over a twelfth of the short side), so
  rotated alt-az edges fade out instead of stepping. The tile is written to
  ``.zemosaic_cache/classic/`` as a FITS file (data, ``WEIGHT``, ``COUNT``, ``ALPHA``
  extensions, tile WCS, provenance) named by a hash of its inputs, and a finished tile is
  reused when a run resumes (``resume`` not ``off``). :func:`master_tile_unit` is the pure
  work unit: a function of frame descriptions, the tile WCS and the config.
* **P4.5 — harmonisation** (``apply_intertile_photometry``): each tile is resampled onto the
  global canvas once to take its coarse block means (well-covered cells only), and
  :func:`.photometry.solve_normalisation` solves per-channel gain, offset and plane jointly over
  the overlap graph (sigma-clipped pairwise fits, weighted least squares) with the
  best-connected tile as anchor, gains clipped to :data:`TILE_GAIN_LIMITS` (logged), and the
  offset-only fallback for under-constrained graphs (logged). Gains are solved on the flux the
  sources have in the frames (stars × the members' area ratio, see :mod:`.assembly`), then
  offsets and planes on the cells' sky (block medians) with those gains, all planes in one
  least-squares problem. A tile that overlaps no other is left as it is, with
  ``classic_warn_tile_no_overlap``. Each tile's inverse-variance scale follows from its measured
  noise per unit weight after its gain.
* **P5 — assembly** (:mod:`.assembly`): optional two-pass coverage renormalisation, then
  ``reproject_coadd`` or ``incremental`` onto the global canvas, autocrop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np
from astropy.wcs import WCS

from .. import __version__
from ..events import Event, LogEvent, Reporter
from .assembly import (
    PHOTOMETRY_BIN_PX,
    TileOnCanvas,
    TilePhotometry,
    alpha_map,
    assemble,
    coverage_renorm_gains,
    crop_to_coverage,
    renormalise,
    tile_on_canvas,
    tile_photometry,
)
from .canvas import Canvas, footprint_polygon
from .grouping import GroupPlan, plan_groups
from .quality import noise_per_unit_weight, tile_quality, tile_weight
from .photometry import Normalisation, solve_normalisation

#: Alpha taper width: the tile's short side divided by this.
FEATHER_DIVISOR = 12
#: Smallest alpha inside the coverage, so a pixel that only one tile covers is never lost.
FEATHER_FLOOR = 1e-3
#: P4.5 gains outside this range are clipped (and logged): beyond it the data, not the sky, is wrong.
TILE_GAIN_LIMITS = (0.5, 2.0)
#: Margin (pixels) around the members' outlines on the tile grid.
TILE_MARGIN_PX = 2
#: Layout of the cached tile files (part of their name: a new layout never reads an old file).
TILE_FORMAT = 1
#: Config keys that change a master tile's pixels (part of its cache name).
TILE_CONFIG_KEYS = (
    "hot_pixel_correction", "hot_pixel_sigma", "debayer_method", "resample_method", "control_grid_tolerance_px",
    "stacking_normalize_method", "stacking_weighting_method", "stacking_rejection_algorithm", "stacking_kappa_low",
    "stacking_kappa_high", "stacking_max_iterations", "stacking_winsor_sigma", "stacking_final_combine",
    "master_tile_crop_pct",
)


# --------------------------------------------------------------------------------- tile WCS


def _unit(ra_deg: float, dec_deg: float) -> np.ndarray:
    ra, dec = math.radians(ra_deg), math.radians(dec_deg)
    return np.array([math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)])


def reference_member(frames: Sequence[Any]) -> int:
    """Index (in ``frames``) of the frame whose centre is nearest the group's mean centre."""
    centres = [info.centre for info in frames]
    vectors = np.array([_unit(*c) for c in centres])
    mean = vectors.mean(axis=0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    return int(np.argmax(vectors @ mean))


def tile_canvas(frames: Sequence[Any]) -> Canvas:
    """The local TAN grid of a group (see the module docstring)."""
    vectors = np.array([_unit(*info.centre) for info in frames])
    mean = vectors.mean(axis=0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    crval = (float(np.degrees(np.arctan2(mean[1], mean[0])) % 360.0), float(np.degrees(np.arcsin(np.clip(mean[2], -1, 1)))))
    reference = frames[reference_member(frames)]
    cd = np.asarray(reference.wcs.celestial.pixel_scale_matrix, dtype=np.float64)

    def make(crpix: tuple[float, float]) -> WCS:
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.cunit = ["deg", "deg"]
        wcs.wcs.crval = list(crval)
        wcs.wcs.crpix = list(crpix)
        wcs.wcs.cd = cd
        wcs.wcs.radesys = "ICRS"
        wcs.wcs.set()
        return wcs

    projection = make((1.0, 1.0))  # tangent point at pixel (0, 0)
    outlines = np.concatenate([footprint_polygon(info.wcs, info.shape, projection, 16) for info in frames])
    # Outline points are pixel edges; pixel k spans [k - 0.5, k + 0.5].
    x0 = int(np.floor(outlines[:, 0].min() + 0.5)) - TILE_MARGIN_PX
    y0 = int(np.floor(outlines[:, 1].min() + 0.5)) - TILE_MARGIN_PX
    width = int(np.floor(outlines[:, 0].max() + 0.5)) + TILE_MARGIN_PX - x0 + 1
    height = int(np.floor(outlines[:, 1].max() + 0.5)) + TILE_MARGIN_PX - y0 + 1
    return Canvas(make((1.0 - x0, 1.0 - y0)), (height, width))


# ------------------------------------------------------------------------------ tile pixels


def feather_alpha(covered: np.ndarray, feather_px: float) -> np.ndarray:
    """0…1: distance to the nearest uncovered pixel over ``feather_px``, ≥ :data:`FEATHER_FLOOR` inside."""
    from scipy.ndimage import distance_transform_edt

    if not covered.any():
        return np.zeros(covered.shape, dtype=np.float32)
    if feather_px <= 0:
        return covered.astype(np.float32)
    distance = distance_transform_edt(np.pad(covered, 1))[1:-1, 1:-1]
    return np.where(covered, np.clip(distance / float(feather_px), FEATHER_FLOOR, 1.0), 0.0).astype(np.float32)


def crop_coverage(covered: np.ndarray, crop_px: float) -> np.ndarray:
    """The covered mask eroded by ``crop_px`` from its edge (the optional master-tile edge crop)."""
    from scipy.ndimage import distance_transform_edt

    if crop_px <= 0 or not covered.any():
        return covered
    return covered & (distance_transform_edt(np.pad(covered, 1))[1:-1, 1:-1] > crop_px)


@dataclass
class MasterTile:
    """A stacked group on disk (FITS) and what later phases need to know about it."""

    index: int  # 0-based group number
    members: list[int]  # global indices of the frames used
    frames_failed: list[tuple[int, str, str]]
    path: Path | None  # None when nothing could be stacked
    canvas: Canvas  # the tile WCS and shape
    n_channels: int
    noise_per_unit_weight: float = float("nan")
    median_weight: float = 0.0
    quality: dict[str, float] | None = None  # tile quality gate (engine/quality.py), set in P4.5
    reused: bool = False
    frame_gains: np.ndarray | None = None  # (len(members), C) each used frame's gain inside the tile

    def read_planes(self) -> np.ndarray:
        """``(C + 3, h, w)`` float32: data (NaN where uncovered), weight, count, alpha."""
        from astropy.io import fits

        assert self.path is not None
        with fits.open(self.path, memmap=False) as hdul:
            planes = [np.asarray(hdul[0].data, dtype=np.float32)]
            planes += [np.asarray(hdul[name].data, dtype=np.float32)[None] for name in ("WEIGHT", "COUNT", "ALPHA")]
        return np.concatenate(planes, axis=0)

    def to_report(self, frames: Sequence[Any]) -> dict[str, Any]:
        return {
            "index": self.index,
            "frames_used": len(self.members),
            "shape": [self.canvas.shape[0], self.canvas.shape[1]],
            "tile_wcs": self.canvas.to_dict()["wcs"],
            "path": None if self.path is None else str(self.path),
            "noise_per_unit_weight": _finite_or_none(self.noise_per_unit_weight),
            "reused": self.reused,
        }


def _finite_or_none(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def tile_cache_name(frames: Sequence[Any], canvas: Canvas, config: dict[str, Any], n_channels: int) -> str:
    """A name that changes whenever the tile's inputs do (files, tile WCS, stacking settings)."""
    digest = hashlib.sha256()
    for info in frames:
        path = Path(info.path)
        try:
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(str(path).encode())
        digest.update(json.dumps(info.wcs.to_header(relax=True).tostring(), sort_keys=True).encode())
    digest.update(json.dumps(canvas.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps({k: config.get(k) for k in TILE_CONFIG_KEYS}, sort_keys=True, default=str).encode())
    digest.update(f"{n_channels}|{__version__}|{TILE_FORMAT}".encode())
    return f"master_tile_{digest.hexdigest()[:16]}.fits"


def write_tile_fits(
    path: Path,
    data: np.ndarray,
    weight: np.ndarray,
    count: np.ndarray,
    alpha: np.ndarray,
    canvas: Canvas,
    provenance: dict[str, tuple[Any, str]],
    member_names: Sequence[str],
    meta: dict[str, Any],
) -> None:
    """The tile as FITS: primary (C, h, w) + WCS + provenance; WEIGHT, COUNT, ALPHA extensions."""
    from astropy.io import fits

    from .outputs import atomic_path, write_hdus_in_strips

    header = canvas.header()
    del header["NAXIS"], header["NAXIS1"], header["NAXIS2"]
    for key, (value, comment) in provenance.items():
        header[key] = (value, comment)
    for name in member_names:
        header.add_history(f"frame {name}")
    header["ZMMETA"] = (json.dumps(meta, separators=(",", ":")), "tile metadata (JSON)")
    hdus = [fits.PrimaryHDU(np.ascontiguousarray(data, dtype=np.float32), header=header)]
    for name, plane in (("WEIGHT", weight), ("COUNT", count), ("ALPHA", alpha)):
        hdus.append(fits.ImageHDU(np.ascontiguousarray(plane, dtype=np.float32), header=canvas.header(), name=name))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        write_hdus_in_strips(temp, hdus)


def _read_tile_meta(path: Path) -> dict[str, Any] | None:
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            return json.loads(hdul[0].header["ZMMETA"])
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None


def _nested(generator: Generator[Event, None, Any], ctx: Any) -> Generator[Event, None, Any]:
    """Run an inner stage: its log events go to the run's reporter, its progress is dropped
    (the tile count is the progress of P3)."""
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if isinstance(event, LogEvent):
            ctx.reporter.emit(event)
            yield from ctx.drain()


def build_master_tile(
    frames: Sequence[Any],
    frame_indices: Sequence[int],
    index: int,
    tile: Canvas,
    ctx: Any,
    n_channels: int,
    out_dir: Path,
) -> Generator[Event, None, MasterTile]:
    """One master tile (see the module docstring). Yields events; returns the tile."""
    from .mosaic_first import mosaic_first

    config = ctx.config
    path = out_dir / tile_cache_name(frames, tile, config, n_channels)
    manifest = getattr(ctx, "manifest", None)
    signature = ""
    if manifest is not None:  # the run's record of finished units decides (and checks the file's hash)
        signature = manifest.signature("master_tile", {"frames": list(frames), "tile": tile, "channels": n_channels})
        found = manifest.lookup("master_tile", index, signature)
        reusable = found is not None
        path = found or path
    else:
        reusable = str(config.get("resume", "auto")) != "off" and path.exists()
    if reusable:
        meta = _read_tile_meta(path)
        if meta is not None and meta.get("members") == [str(Path(f.path)) for f in frames]:
            used = [int(frame_indices[i]) for i in meta["used"]]
            failed = [(int(frame_indices[i]), key, detail) for i, key, detail in meta["failed"]]
            noise = float(meta["noise"]) if meta.get("noise") is not None else float("nan")
            gains = np.asarray(meta["frame_gains"], dtype=np.float64) if meta.get("frame_gains") else None
            return MasterTile(index, used, failed, path, tile, n_channels, noise, float(meta["median_weight"]),
                              reused=True, frame_gains=gains)

    inner_ctx = dataclasses.replace(ctx, reporter=Reporter(), timings_s={})
    stack = yield from _nested(mosaic_first(frames, tile, inner_ctx, n_channels, label=f"_classic_{index:04d}"), ctx)
    failed = [(int(frame_indices[i]), key, detail) for i, key, detail in stack.frames_failed]
    if not stack.frames_used or not (stack.weight > 0).any():
        return MasterTile(index, [], failed, None, tile, n_channels)
    covered = (stack.weight > 0) & np.isfinite(stack.data).all(axis=0)
    short_side = float(min(tile.shape))
    covered = crop_coverage(covered, float(config.get("master_tile_crop_pct") or 0.0) / 100.0 * short_side)
    data = np.where(covered[None], stack.data, np.nan).astype(np.float32)
    weight = np.where(covered, stack.weight, 0.0).astype(np.float32)
    count = np.where(covered, stack.count, 0.0).astype(np.float32)
    alpha = feather_alpha(covered, short_side / FEATHER_DIVISOR)
    noise = noise_per_unit_weight(data, weight)
    median_weight = float(np.median(weight[covered])) if covered.any() else 0.0
    local_used = list(stack.frames_used)
    meta = {
        "members": [str(Path(f.path)) for f in frames],
        "used": local_used,
        "failed": [[i, key, detail] for i, key, detail in stack.frames_failed],
        "noise": noise if np.isfinite(noise) else None,
        "median_weight": median_weight,
        "frame_gains": np.asarray(stack.normalisation.gains)[local_used].round(6).tolist(),
    }
    provenance = {
        "WORKFLOW": ("classic", "napari-zemosaic workflow"),
        "TILEIDX": (index, "master tile number (0-based)"),
        "NCOMBINE": (len(local_used), "frames combined"),
        "REJECT": (config["stacking_rejection_algorithm"], "pixel rejection"),
        "NORMMETH": (config["stacking_normalize_method"], "photometric normalisation"),
        "WEIGHTS": (config["stacking_weighting_method"], "frame weighting"),
        "COMBINE": (config["stacking_final_combine"], "combine method"),
    }
    write_tile_fits(path, data, weight, count, alpha, tile, provenance, [Path(frames[i].path).name for i in local_used], meta)
    if manifest is not None:
        manifest.record("master_tile", index, signature, path)
    for phase, seconds in inner_ctx.timings_s.items():
        ctx.extras.setdefault("classic_tile_timings_s", {}).setdefault(phase, 0.0)
        ctx.extras["classic_tile_timings_s"][phase] += seconds
    return MasterTile(index, [int(frame_indices[i]) for i in local_used], failed, path, tile, n_channels,
                      noise if np.isfinite(noise) else float("nan"), median_weight,
                      frame_gains=np.asarray(meta["frame_gains"], dtype=np.float64))


def master_tile_unit(
    frames: Sequence[dict[str, Any]],
    frame_indices: Sequence[int],
    index: int,
    tile: dict[str, Any],
    config: dict[str, Any],
    cache_dir: str | Path,
    n_channels: int = 3,
) -> MasterTile:
    """:func:`build_master_tile` as a pure work unit of serialisable inputs (frame dicts from
    ``FrameInfo.to_dict``, the tile grid from ``Canvas.to_dict``, the config) — e.g. for Dask."""
    from .context import RunContext
    from .frames import FrameInfo

    infos = [FrameInfo.from_dict(item) for item in frames]
    ctx = RunContext(dict(config), Reporter(), Path(cache_dir), Path(cache_dir))
    generator = build_master_tile(
        infos, frame_indices, index, Canvas.from_dict(tile), ctx, n_channels, ctx.make_cache_dir("classic")
    )
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


# ------------------------------------------------------------------------------ harmonisation


@dataclass
class Harmonisation:
    """P4.5 and pass-2 results, aligned with the list of stacked tiles."""

    norm: Normalisation  # final corrections, renormalisation factors folded into the gains
    scales: np.ndarray  # (N,) inverse-variance factor of each tile's coverage weight
    renorm: np.ndarray  # (N, C) pass-2 factors (1 when off)
    intertile_gains: np.ndarray  # (N, C) P4.5 gains before the renormalisation
    anchor: int | None
    applied: bool
    mode: str


def harmonise_tiles(
    tiles: Sequence[MasterTile],
    views: Sequence[TilePhotometry],
    canvas: Canvas,
    config: dict[str, Any],
    reporter: Any,
) -> Harmonisation:
    """P4.5 between tiles, the tiles' inverse-variance scales and the pass-2 factors (logged)."""
    n_tiles = len(tiles)
    n_channels = tiles[0].n_channels if tiles else 1
    grid = (-(-canvas.shape[0] // PHOTOMETRY_BIN_PX), -(-canvas.shape[1] // PHOTOMETRY_BIN_PX))
    applied = bool(config.get("apply_intertile_photometry", True)) and n_tiles >= 2
    anchor: int | None = None
    if applied:
        method = "sky_mean" if config.get("stacking_normalize_method") == "sky_mean" else "linear_fit"
        # Gains on point-source flux (area-ratio corrected cells), then offsets and planes on the
        # surface brightness the mosaic is made of, with those gains (module docstring).
        flux = solve_normalisation([view.flux_conserving() for view in views], grid, method, bin_px=PHOTOMETRY_BIN_PX,
                                   anchor="best_connected", gain_limits=TILE_GAIN_LIMITS, offset_only_fallback=True)
        plane_method = "sky_mean" if flux.mode == "offset_only" else method
        norm = solve_normalisation([view.diffuse for view in views], grid, plane_method, bin_px=PHOTOMETRY_BIN_PX,
                                   anchor="best_connected", fixed_gains=flux.gains, plane_solve="joint")
        norm.mode, norm.clipped = flux.mode, flux.clipped
        anchor = _main_anchor(norm, tiles)
        if norm.mode == "offset_only":
            reporter.warning("classic_warn_photometry_offset_only", tiles=n_tiles)
        for slot, tile in enumerate(tiles):
            if not norm.constrained[slot]:
                reporter.warning("classic_warn_tile_no_overlap", tile=tile.index + 1)
            if norm.clipped[slot]:
                reporter.warning("classic_warn_tile_gain_clipped", tile=tile.index + 1,
                                 low=TILE_GAIN_LIMITS[0], high=TILE_GAIN_LIMITS[1])
            reporter.debug("classic_debug_tile_correction", tile=tile.index + 1,
                           gain=", ".join(f"{g:.4f}" for g in norm.gains[slot]),
                           offset=", ".join(f"{o:.2f}" for o in norm.offsets[slot]))
        reporter.info("classic_info_photometry", tiles=n_tiles, anchor=(anchor + 1) if anchor is not None else 0,
                      mode=norm.mode, gain_min=float(np.min(norm.gains)), gain_max=float(np.max(norm.gains)))
    else:
        norm = Normalisation.identity(n_tiles, n_channels, PHOTOMETRY_BIN_PX)
        norm.centres = np.zeros((n_tiles, 2))
        norm.mode = "none"
        reporter.info("classic_info_photometry_off", tiles=n_tiles)
    intertile_gains = norm.gains.copy()
    scales = tile_scales(tiles, norm, anchor)
    renorm = np.ones((n_tiles, n_channels))
    # Pass 2 measures gains too: pointless where P4.5 found the overlaps could not tie them.
    if config.get("two_pass_coverage_renorm", True) and n_tiles >= 2 and norm.mode != "offset_only":
        renorm, measured = coverage_renorm_gains(views, norm, scales, grid, anchor)
        norm = renormalise(norm, views, renorm)
        reporter.info("classic_info_renorm", tiles=int(measured.sum()), gain_min=float(renorm.min()),
                      gain_max=float(renorm.max()))
    return Harmonisation(norm, scales, renorm, intertile_gains, anchor, applied, norm.mode)


def _main_anchor(norm: Normalisation, tiles: Sequence[MasterTile]) -> int | None:
    """The anchor of the largest connected group of tiles (the run's flux scale)."""
    return norm.anchors[0] if norm.anchors else None


def tile_scales(tiles: Sequence[MasterTile], norm: Normalisation, anchor: int | None) -> np.ndarray:
    """Inverse-variance factor of each tile's coverage weight: (σ_ref / σ_i)², σ after the gain.

    Unknown noise (a tiny tile) leaves the factor at 1.
    """
    sigma = np.array([t.noise_per_unit_weight for t in tiles], dtype=np.float64)
    if len(tiles):
        sigma = sigma / np.mean(norm.gains, axis=1)
    good = np.isfinite(sigma) & (sigma > 0)
    scales = np.ones(len(tiles))
    if not good.any():
        return scales
    reference = sigma[anchor] if anchor is not None and good[anchor] else float(np.median(sigma[good]))
    scales[good] = (reference / sigma[good]) ** 2
    return scales


# ------------------------------------------------------------------------------ the workflow


@dataclass
class ClassicOutcome:
    """What :func:`run_classic` returns: a Mosaic-First-compatible stack (cropped when
    ``autocrop``), its uint8 alpha, the groups, the tiles and the ``classic`` report section."""

    stack: Any  # mosaic_first.CanvasStack
    alpha: np.ndarray
    plan: GroupPlan
    tiles: list[MasterTile] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    peak_tile_bytes: int = 0
    harmony: Harmonisation | None = None  # the tile corrections used by the assembly


def _on_stage(ctx: Any, stage: str, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(xp)`` as one unit of ``stage`` under the run's compute policy (GPU or CPU)."""
    policy = getattr(ctx, "policy", None)
    if policy is None or not hasattr(policy, "run_stage"):
        return fn(np)
    return policy.run_stage(stage, lambda xp, chunk_scale=1.0: fn(xp), lambda xp: fn(xp))


def _end_stage(ctx: Any, stage: str) -> None:
    policy = getattr(ctx, "policy", None)
    if policy is not None and hasattr(policy, "end_stage"):
        policy.end_stage(stage)


def _placed(tiles: Sequence[MasterTile], canvas: Canvas, ctx: Any, stage: str) -> Iterator[TileOnCanvas | None]:
    """Tiles resampled onto the canvas one by one (lazy: callers decide how many are held)."""
    method = ctx.config["resample_method"]
    tol = float(ctx.config["control_grid_tolerance_px"])
    for tile in tiles:
        yield _on_stage(ctx, stage, lambda xp, tile=tile: tile_on_canvas(tile, canvas, method, tol, xp))


def run_classic(
    frames: Sequence[Any], canvas: Canvas, ctx: Any, n_channels: int = 3
) -> Generator[Event, None, ClassicOutcome]:
    """The classic workflow over the global ``canvas`` (module docstring). Yields events."""
    from .mosaic_first import CanvasStack

    config, reporter = ctx.config, ctx.reporter

    # --- P2: pointing groups -------------------------------------------------------------------
    with ctx.timed("P2"):
        plan = plan_groups(frames, config, n_channels=n_channels, budget_bytes=ctx.budget_bytes, reporter=reporter)
        reporter.info("classic_info_groups", groups=len(plan.groups), frames=sum(plan.sizes),
                      threshold_arcmin=round(plan.threshold_deg * 60.0, 3),
                      sizes=", ".join(str(s) for s in plan.sizes))
    yield from ctx.drain()

    # --- P3: master tiles -------------------------------------------------------------------------
    out_dir = ctx.make_cache_dir("classic")
    tiles: list[MasterTile] = []
    failed: list[tuple[int, str, str]] = []
    from .distributed import master_tile_result, submit_master_tiles

    remote = submit_master_tiles(ctx, [g.members for g in plan.groups], frames, n_channels)  # None: no scheduler
    with ctx.timed("P3"):
        for number, group in enumerate(plan.groups, start=1):
            members = [frames[i] for i in group.members]
            if remote is not None:  # a task on the run's scheduler (engine/distributed.py), taken in order
                tile = yield from master_tile_result(remote, number - 1, members, group.members, tile_canvas(members),
                                                     ctx, n_channels, out_dir)
            else:
                tile = yield from build_master_tile(members, group.members, number - 1, tile_canvas(members), ctx,
                                                    n_channels, out_dir)
            failed.extend(tile.frames_failed)
            if tile.path is not None:
                tiles.append(tile)
                if tile.reused:
                    reporter.info("classic_info_tile_reused", tile=number, count=len(plan.groups), frames=len(tile.members))
                else:
                    reporter.info("classic_info_tile", tile=number, count=len(plan.groups), frames=len(tile.members),
                                  width=tile.canvas.shape[1], height=tile.canvas.shape[0])
            reporter.progress("P3", number, len(plan.groups), "progress_tiles")
            yield from ctx.drain()
        if getattr(ctx, "manifest", None) is not None:
            for kind in ("master_tile", "reproject", "block"):
                ctx.manifest.log_summary(kind, reporter)

    # --- P4.5: harmonisation between tiles ----------------------------------------------------------
    with ctx.timed("P4.5"):
        views: list[TilePhotometry] = []
        kept: list[MasterTile] = []
        qualities: list[dict[str, float]] = []
        for tile, placed in zip(tiles, _placed(tiles, canvas, ctx, "intertile")):
            if placed is not None and (placed.weight > 0).any():
                views.append(tile_photometry(placed, canvas.wcs, [frames[i].wcs for i in tile.members]))
                tile.quality = tile_quality(placed.data, placed.weight).to_dict()
                qualities.append(tile.quality)
                kept.append(tile)
            del placed
        tiles = kept
        harmony = harmonise_tiles(tiles, views, canvas, config, reporter)
        # Tile quality gate: a poor master tile is down-weighted in the assembly, never dropped (no holes).
        gates = np.array([tile_weight(q["score"]) for q in qualities]) if qualities else np.ones(0)
        harmony.scales = np.asarray(harmony.scales, dtype=np.float64) * gates
        _end_stage(ctx, "intertile")
    yield from ctx.drain()

    # --- P5: assembly ---------------------------------------------------------------------------------
    method = str(config.get("final_assembly_method", "reproject_coadd"))
    with ctx.timed("P5"):
        reporter.info("classic_info_assembly", method=method, tiles=len(tiles),
                      width=canvas.shape[1], height=canvas.shape[0])
        yield from ctx.drain()
        work_dir = ctx.make_cache_dir("classic_assembly")
        xp = ctx.xp("assembly") if hasattr(ctx, "xp") else np
        assembled = assemble(method, _placed(tiles, canvas, ctx, "assembly"), canvas, harmony.norm, harmony.scales,
                             n_channels, work_dir, xp)
        _end_stage(ctx, "assembly")
        data, weight, count, final_canvas = assembled.data, assembled.weight, assembled.count, canvas
        cropped_from = None
        if config.get("autocrop", True):
            shape_before = canvas.shape
            data, weight, count, final_canvas = crop_to_coverage(data, weight, count, canvas,
                                                                 int(config.get("autocrop_margin_px", 8)))
            cropped_from = [shape_before[0], shape_before[1]]
        alpha = alpha_map(weight, data)
    yield from ctx.drain()

    used = sorted(i for tile in tiles for i in tile.members)
    frame_norm = frame_normalisation(len(frames), n_channels, tiles, harmony)
    stack = CanvasStack(
        canvas=final_canvas, data=data, weight=weight, count=count, normalisation=frame_norm,
        frames_used=used, frames_failed=sorted(failed), block_side=0, spilled=method == "incremental",
    )
    report = _report(frames, plan, tiles, harmony, method, config, cropped_from, final_canvas, ctx)
    return ClassicOutcome(stack, alpha, plan, tiles, report, assembled.peak_tile_bytes, harmony)


def frame_normalisation(n_frames: int, n_channels: int, tiles: Sequence[MasterTile], harmony: Harmonisation) -> Normalisation:
    """Each frame's gain onto the mosaic's flux scale: its gain inside its tile × the tile's gain.

    Offsets and planes stay 0 here: a frame's additive terms live on its tile's grid (see the
    tile entries of the report for the tiles' own offsets and planes).
    """
    result = Normalisation.identity(n_frames, n_channels, PHOTOMETRY_BIN_PX)
    for slot, tile in enumerate(tiles):
        if tile.frame_gains is None or len(tile.frame_gains) != len(tile.members):
            continue
        for local, index in enumerate(tile.members):
            result.gains[index] = tile.frame_gains[local] * harmony.norm.gains[slot]
    return result


def _report(
    frames: Sequence[Any],
    plan: GroupPlan,
    tiles: Sequence[MasterTile],
    harmony: Harmonisation,
    method: str,
    config: dict[str, Any],
    cropped_from: list[int] | None,
    canvas: Canvas,
    ctx: Any,
) -> dict[str, Any]:
    tile_by_group = {tile.index: slot for slot, tile in enumerate(tiles)}
    groups = []
    for number, group in enumerate(plan.groups):
        entry = group.to_report(frames)
        slot = tile_by_group.get(number)
        entry["tile_wcs"] = tiles[slot].canvas.to_dict()["wcs"] if slot is not None else None
        entry["tile_shape"] = list(tiles[slot].canvas.shape) if slot is not None else None
        groups.append(entry)
    tile_entries = []
    for slot, tile in enumerate(tiles):
        entry = tile.to_report(frames)
        entry.update({
            "gain": [round(float(g), 6) for g in harmony.norm.gains[slot]],
            "intertile_gain": [round(float(g), 6) for g in harmony.intertile_gains[slot]],
            "renorm_gain": [round(float(g), 6) for g in harmony.renorm[slot]],
            "offset": [round(float(o), 4) for o in harmony.norm.offsets[slot]],
            "tilt": [[round(float(t), 6) for t in pair] for pair in harmony.norm.tilts[slot]],
            "constrained": bool(harmony.norm.constrained[slot]) if harmony.applied else False,
            "gain_clipped": bool(harmony.norm.clipped[slot]) if harmony.norm.clipped.size else False,
            "weight_scale": round(float(harmony.scales[slot]), 6),
            "quality": tile.quality,
            "quality_weight": round(float(tile_weight(tile.quality["score"])), 4) if tile.quality else 1.0,
        })
        tile_entries.append(entry)
    return {
        "grouping": plan.to_report(frames),
        "groups": groups,
        "tiles": tile_entries,
        "photometry": {
            "applied": harmony.applied,
            "mode": harmony.mode,
            "anchor_tile": None if harmony.anchor is None else tiles[harmony.anchor].index,
            "gain_limits": list(TILE_GAIN_LIMITS),
        },
        "two_pass_coverage_renorm": bool(config.get("two_pass_coverage_renorm", True)),
        "assembly_method": method,
        "canvas": {"shape": list(canvas.shape), "cropped_from": cropped_from},
        "tile_stack_timings_s": {k: round(v, 4) for k, v in ctx.extras.get("classic_tile_timings_s", {}).items()},
        "timings_s": {k: ctx.timings_s.get(k) for k in ("P2", "P3", "P4.5", "P5") if k in ctx.timings_s},
    }

"""Final assembly (P5) of master tiles onto the global canvas, and what it needs from P4.5.

A master tile (see :mod:`.classic`) lives on its own tile WCS and carries four kinds of plane:
its data ``(C, h, w)``, its coverage weight (sum of the kept frames' weights), its frame count
and its alpha (0…1, feathered from its own coverage edge). Every function here sees a tile
through :class:`TileSource`, so the module does not depend on how tiles were made.

Tile on the canvas
------------------
:func:`tile_on_canvas` resamples all of a tile's planes at once onto its bounding box of the
canvas with the engine's reprojection (:func:`.reproject.reproject_frame`, the same kernel as
frames). A tile's *correction* is the P4.5 result for it — ``(tile − plane) / gain``, the plane
and gain from :class:`.photometry.Normalisation` in canvas coordinates — and its *weight* is
``alpha × coverage weight × scale``, where ``scale`` is the tile's inverse-variance factor
(its measured noise per unit weight, after its gain, relative to the anchor tile's).

Assembly methods (``final_assembly_method``)
--------------------------------------------
* ``reproject_coadd`` — every tile is resampled first and all stay in memory; the canvas is
  then combined band by band by the common stacking engine (:func:`.stack.combine`, weighted
  mean, no rejection: a pixel rarely has more than two or four tiles). Peak memory: all
  resampled tiles plus the output.
* ``incremental`` — tiles are resampled one at a time and added into running sums
  (``Σ w·x``, ``Σ w``, coverage and count) held in raw float32 files in the cache
  (memory-mapped), then the sums are divided band by band into the output. Peak memory: one
  resampled tile plus the output; the accumulators live on disk.

Both compute the same weighted mean (they differ only by float rounding).

Photometry on the canvas: surface brightness and point-source flux
------------------------------------------------------------------
Resampling keeps surface brightness (the convention of every workflow here), so the flux of a
star drawn on the canvas is its frame flux divided by the local *area ratio* (frame pixels per
canvas pixel, :func:`area_ratio_cells`). With optical distortion (SIP) that ratio drifts across
a frame, and two tiles see their overlap at opposite edges of their frames: matching their
gains on the canvas pixels would match distorted star fluxes (1–2 % off on strongly distorted
small sensors). The diffuse light (sky, nebula) of flat-fielded frames is per pixel, so it is
consistent between tiles as it is. Each coarse cell is therefore split into its median (the
diffuse light) and its mean's excess over it (the stars): P4.5 fits the gains on
``median + area × excess`` (:meth:`TilePhotometry.flux_conserving`, every source at its frame
flux) and the offsets and planes on the medians (the sky), with those gains (see
:func:`.classic.harmonise_tiles`).

Two-pass coverage renormalisation (``two_pass_coverage_renorm``)
----------------------------------------------------------------
Where tiles overlap, the weighted mean jumps from one tile's level to a blend of two; any gain
left between them shows as a step along the coverage change. Pass 1 assembles the corrected
tiles on the coarse photometry grid (block means, the cheap and exact way to get the
consensus); pass 2 measures, for each tile, its gain relative to that consensus on the cells
where other tiles contribute too (the symmetric clipped fit of :func:`.photometry.fit_gain_ratio`,
planes absorbing any additive residual), clips it to :data:`RENORM_GAIN_LIMITS`, and the full
assembly then divides each tile by it — around the tile's own sky level (:func:`renormalise`),
so a gain change never reopens a background step that P4.5 closed. Because the consensus
includes the tile itself, the update is naturally damped: two equal tiles a factor ``1 + δ``
apart each move half-way. The gauge is kept: the anchor tile's (or, without one, the median
tile's) factor is 1. Gains are measured on point-source flux, as in P4.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from .canvas import BBox, Canvas, autocrop_slices, crop_canvas
from .photometry import MAX_LOG_GAIN_SIGMA, PHOTOMETRY_BIN_PX, CoarsePiece, Normalisation, coarse_piece, fit_gain_ratio
from .reproject import reproject_frame


ASSEMBLY_METHODS = ("reproject_coadd", "incremental")
#: Pass-2 gains are clipped into this range (a safety net: P4.5 has already matched the tiles).
RENORM_GAIN_LIMITS = (0.85, 1.18)
#: Only the well-covered part of a tile (coverage weight ≥ this share of its median) is used to
#: measure its photometry: the ragged low-coverage fringe is noisier and less well normalised.
PHOTOMETRY_MIN_WEIGHT_SHARE = 0.5
#: Rows per band when combining or dividing the canvas.
BAND_ROWS = 256
#: Member frames sampled to compute a tile's area ratio (they are nearly aligned: a few suffice).
AREA_SAMPLE_FRAMES = 8


class TileSource(Protocol):
    """What assembly needs to know about a master tile."""

    canvas: Canvas  # the tile's own WCS and shape
    n_channels: int

    def read_planes(self) -> np.ndarray:
        """``(C + 3, h, w)`` float32: data channels (NaN where uncovered), weight, count, alpha."""
        ...


@dataclass
class TileOnCanvas:
    """A tile resampled onto its bounding box of the canvas."""

    bbox: BBox
    data: np.ndarray  # (C, h, w) float32, NaN where the tile does not cover
    weight: np.ndarray  # (h, w) float32 coverage weight, 0 outside
    count: np.ndarray  # (h, w) float32 frames
    alpha: np.ndarray  # (h, w) float32 in [0, 1]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.weight.nbytes + self.count.nbytes + self.alpha.nbytes)


@dataclass
class TilePhotometry:
    """A tile's coarse view on the canvas photometry grid (all that P4.5 and pass 1 keep)."""

    bbox: BBox
    data: CoarsePiece  # block means of the well-covered data, NaN elsewhere
    diffuse: CoarsePiece  # block medians of the same cells: sky and nebula without the stars
    weight: CoarsePiece  # block means of alpha × coverage weight (unscaled)
    area: np.ndarray  # (hc, wc) frame pixels per canvas pixel at the cells of ``data`` (see area_ratio_cells)

    def flux_conserving(self) -> CoarsePiece:
        """Diffuse light as it is plus the stars' excess × ``area``: every source at the flux it
        has in the frames, whatever the optical distortion (module docstring)."""
        diffuse = self.diffuse.data
        values = diffuse + (self.data.data - diffuse) * self.area[None]
        return CoarsePiece(self.data.y0, self.data.x0, values.astype(np.float32))


# ------------------------------------------------------------------------- tile on the canvas


def tile_on_canvas(
    tile: TileSource, canvas: Canvas, method: str = "bilinear", tol_px: float = 0.01, xp: Any = np
) -> TileOnCanvas | None:
    """Resample every plane of ``tile`` onto its bounding box of ``canvas`` (None: misses it)."""
    planes = tile.read_planes()
    channels = tile.n_channels
    # Weight, count and alpha are 0 outside the tile; NaN there in the data makes the resampler
    # drop every canvas pixel whose kernel touches uncovered tile pixels, for all planes at once.
    planes[channels:, ~np.isfinite(planes[:channels]).all(axis=0)] = np.nan
    source = planes if xp is np else xp.asarray(planes)
    result = reproject_frame(source, tile.canvas.wcs, canvas.wcs, canvas.shape, method=method, tol_px=tol_px, xp=xp)
    if result is None:
        return None
    bbox, out, _ = result
    if xp is not np:
        out = out.get()
    out = np.asarray(out, dtype=np.float32)
    data = out[:channels]
    valid = np.isfinite(data).all(axis=0)
    weight = np.where(valid, np.clip(np.nan_to_num(out[channels]), 0.0, None), 0.0).astype(np.float32)
    count = np.where(valid, np.clip(np.nan_to_num(out[channels + 1]), 0.0, None), 0.0).astype(np.float32)
    alpha = np.where(valid, np.clip(np.nan_to_num(out[channels + 2]), 0.0, 1.0), 0.0).astype(np.float32)
    covered = valid & (weight > 0)
    data = np.where(covered[None], data, np.nan).astype(np.float32)
    return TileOnCanvas(tuple(int(v) for v in bbox), data, weight, count, alpha)  # type: ignore[arg-type]


def area_ratio_cells(
    member_wcs: Sequence[Any], canvas_wcs: Any, piece: CoarsePiece, bin_px: int = PHOTOMETRY_BIN_PX,
    max_frames: int = AREA_SAMPLE_FRAMES,
) -> np.ndarray:
    """Frame pixels per canvas pixel, ``|det ∂(frame x, y)/∂(canvas x, y)|``, at the centres of
    ``piece``'s cells, averaged over (up to ``max_frames`` of) the tile's member frames.

    Resampling keeps surface brightness, so a star drawn on the canvas has its frame flux divided
    by this ratio: with optical distortion (SIP) the ratio changes across a frame, and two tiles
    see their overlap at opposite edges of their frames. Multiplying by it gives the flux a star
    really has, which is what tiles' gains must be matched on.
    """
    _, rows, cols = piece.data.shape
    if rows == 0 or cols == 0 or not member_wcs:
        return np.ones((rows, cols))
    picks = np.unique(np.linspace(0, len(member_wcs) - 1, min(max_frames, len(member_wcs))).round().astype(int))
    x = (np.arange(piece.x0, piece.x0 + cols) + 0.5) * bin_px - 0.5
    y = (np.arange(piece.y0, piece.y0 + rows) + 0.5) * bin_px - 0.5
    grid_x, grid_y = np.meshgrid(x, y)
    step = 0.5  # canvas pixels: central differences of a mapping smooth on the scale of the frame
    points_x = np.concatenate([(grid_x + step).ravel(), (grid_x - step).ravel(), grid_x.ravel(), grid_x.ravel()])
    points_y = np.concatenate([grid_y.ravel(), grid_y.ravel(), (grid_y + step).ravel(), (grid_y - step).ravel()])
    ra, dec = canvas_wcs.all_pix2world(points_x, points_y, 0)
    total = np.zeros(grid_x.size)
    for index in picks:
        wcs = member_wcs[int(index)]
        if wcs.has_distortion:
            fx, fy = wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50, quiet=True)
        else:
            fx, fy = wcs.wcs_world2pix(ra, dec, 0)
        fx, fy = np.asarray(fx).reshape(4, -1), np.asarray(fy).reshape(4, -1)
        dxdx, dydx = (fx[0] - fx[1]) / (2 * step), (fy[0] - fy[1]) / (2 * step)
        dxdy, dydy = (fx[2] - fx[3]) / (2 * step), (fy[2] - fy[3]) / (2 * step)
        total += np.abs(dxdx * dydy - dxdy * dydx)
    ratio = (total / len(picks)).reshape(rows, cols)
    return np.where(np.isfinite(ratio) & (ratio > 0), ratio, 1.0)


def tile_photometry(
    placed: TileOnCanvas, canvas_wcs: Any = None, member_wcs: Sequence[Any] = (), bin_px: int = PHOTOMETRY_BIN_PX
) -> TilePhotometry:
    """The coarse views P4.5 and the renormalisation work on (well-covered cells only), with the
    members' area ratio at those cells (1 when no WCS is given)."""
    covered = placed.weight > 0
    threshold = PHOTOMETRY_MIN_WEIGHT_SHARE * float(np.median(placed.weight[covered])) if covered.any() else 0.0
    inner = covered & (placed.weight >= threshold)
    inner_data = np.where(inner[None], placed.data, np.nan)
    data = coarse_piece(inner_data, placed.bbox, bin_px)
    diffuse = coarse_piece(inner_data, placed.bbox, bin_px, "median")
    weight = coarse_piece(np.where(covered, placed.alpha * placed.weight, np.nan)[None], placed.bbox, bin_px)
    if canvas_wcs is None or not member_wcs:
        area = np.ones(data.data.shape[1:])
    else:
        area = area_ratio_cells(member_wcs, canvas_wcs, data, bin_px)
    return TilePhotometry(placed.bbox, data, diffuse, weight, area)


def corrected(norm: Normalisation, slot: int, data: np.ndarray, y0: int, x0: int, xp: Any = np) -> np.ndarray:
    """``(data − plane) / gain`` of tile ``slot`` over canvas pixels starting at (y0, x0)."""
    _, height, width = data.shape
    plane = norm.background_plane(slot, y0, x0, height, width, xp)
    gain = xp.asarray(norm.gains[slot], dtype=xp.float32)[:, None, None]
    return (data - plane) / gain


# ----------------------------------------------------------------- two-pass renormalisation


def _coarse_planes(norm: Normalisation, slot: int, piece: CoarsePiece) -> np.ndarray:
    """The tile's additive term evaluated at the centres of its coarse cells: (C, hc, wc)."""
    _, hc, wc = piece.data.shape
    cols = np.arange(piece.x0, piece.x0 + wc, dtype=np.float64) - norm.centres[slot, 0]
    rows = np.arange(piece.y0, piece.y0 + hc, dtype=np.float64) - norm.centres[slot, 1]
    tilt = norm.tilts[slot]
    return norm.offsets[slot][:, None, None] + tilt[:, 0, None, None] * cols[None, None, :] + tilt[:, 1, None, None] * rows[None, :, None]


def coverage_renorm_gains(
    views: Sequence[TilePhotometry],
    norm: Normalisation,
    scales: np.ndarray,
    grid_shape: tuple[int, int],
    anchor: int | None = None,
    limits: tuple[float, float] = RENORM_GAIN_LIMITS,
) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2 factors ``(N, C)`` (divide tile i by them) and which tiles had overlap to measure.

    ``grid_shape`` is the coarse canvas shape. See the module docstring.
    """
    n_tiles = len(views)
    n_channels = norm.gains.shape[1] if n_tiles else 1
    factors = np.ones((n_tiles, n_channels))
    measured = np.zeros(n_tiles, bool)
    if n_tiles < 2:
        return factors, measured
    height, width = grid_shape
    total = np.zeros((n_channels, height, width))
    weight_sum = np.zeros((height, width))
    tiles_here = np.zeros((height, width), int)
    prepared = []
    for slot, view in enumerate(views):
        piece = view.data
        _, hc, wc = piece.data.shape
        if hc == 0 or wc == 0:
            prepared.append(None)
            continue
        # Gains are about the flux sources have in the frames: stars' excess × area ratio.
        piece = view.flux_conserving()
        values = (piece.data - _coarse_planes(norm, slot, piece)) / norm.gains[slot][:, None, None]
        weights = _aligned(view.weight, piece) * float(scales[slot])
        ok = np.isfinite(values).all(axis=0) & np.isfinite(weights) & (weights > 0)
        region = (slice(piece.y0, piece.y0 + hc), slice(piece.x0, piece.x0 + wc))
        total[(slice(None), *region)] += np.where(ok, values * weights, 0.0)
        weight_sum[region] += np.where(ok, weights, 0.0)
        tiles_here[region] += ok
        prepared.append((values, ok, region))
    consensus = total / np.where(weight_sum > 0, weight_sum, 1.0)
    for slot, item in enumerate(prepared):
        if item is None:
            continue
        values, ok, region = item
        shared = ok & (tiles_here[region] >= 2)
        if shared.sum() < 12:
            continue
        rows, cols = np.nonzero(shared)
        x, y = cols.astype(np.float64), rows.astype(np.float64)
        for channel in range(n_channels):
            fit = fit_gain_ratio(values[channel][shared], consensus[channel][region][shared], x, y)
            if fit is not None and fit[1] <= MAX_LOG_GAIN_SIGMA:
                factors[slot, channel] = fit[0]
                measured[slot] = True
    if not measured.any():
        return np.ones((n_tiles, n_channels)), measured
    gauge = factors[anchor] if anchor is not None and measured[anchor] else np.median(factors[measured], axis=0)
    factors = np.where(measured[:, None], factors / gauge[None, :], 1.0)
    return np.clip(factors, limits[0], limits[1]), measured


def renormalise(norm: Normalisation, views: Sequence[TilePhotometry], factors: np.ndarray) -> Normalisation:
    """``norm`` with tile ``i`` divided by ``factors[i]`` around its own sky level.

    Scaling a tile by ``1/r`` would also scale its sky and open a background step where P4.5 had
    matched it; the signal is scaled around the tile's median corrected level ``b`` instead:
    ``x' = (x − b)/r + b``, i.e. gain ``g·r`` and offset ``o − g·b·(r − 1)``.
    """
    result = Normalisation(
        np.array(norm.gains, dtype=np.float64), np.array(norm.offsets, dtype=np.float64),
        np.array(norm.tilts, dtype=np.float64), np.array(norm.centres, dtype=np.float64), norm.bin_px,
        norm.iterations, norm.converged, np.asarray(norm.constrained).copy(), norm.mode, list(norm.anchors),
        np.asarray(norm.clipped).copy(),
    )
    for slot, view in enumerate(views):
        piece = view.diffuse
        if piece.data.size == 0:
            continue
        values = (piece.data - _coarse_planes(norm, slot, piece)) / norm.gains[slot][:, None, None]
        level = np.array([np.nanmedian(c) if np.isfinite(c).any() else 0.0 for c in values])
        result.offsets[slot] -= norm.gains[slot] * level * (factors[slot] - 1.0)
        result.gains[slot] = norm.gains[slot] * factors[slot]
    return result


def _aligned(weight: CoarsePiece, like: CoarsePiece) -> np.ndarray:
    """``weight`` cut or NaN-padded to the cells of ``like`` (both come from the same tile box)."""
    _, hc, wc = like.data.shape
    out = np.full((hc, wc), np.nan)
    _, hw, ww = weight.data.shape
    y0, y1 = max(like.y0, weight.y0), min(like.y0 + hc, weight.y0 + hw)
    x0, x1 = max(like.x0, weight.x0), min(like.x0 + wc, weight.x0 + ww)
    if y1 > y0 and x1 > x0:
        out[y0 - like.y0 : y1 - like.y0, x0 - like.x0 : x1 - like.x0] = weight.data[
            0, y0 - weight.y0 : y1 - weight.y0, x0 - weight.x0 : x1 - weight.x0
        ]
    return out


# --------------------------------------------------------------------------------- assembly


@dataclass
class Assembled:
    """The assembled canvas: weighted-mean data, coverage weight and frame count."""

    data: np.ndarray  # (C, H, W) float32, NaN where no tile contributes
    weight: np.ndarray  # (H, W) float32: Σ scale × coverage weight of the contributing tiles
    count: np.ndarray  # (H, W) float32: Σ frames of the contributing tiles
    peak_tile_bytes: int = 0  # largest memory held at once in resampled tiles (accounting)


@dataclass
class _Contribution:
    bbox: BBox
    values: np.ndarray  # (C, h, w) corrected data, NaN where unused
    blend: np.ndarray  # (h, w) blending weight: alpha × coverage weight × scale
    coverage: np.ndarray  # (h, w) scale × coverage weight where used
    count: np.ndarray  # (h, w) frames where used

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.blend.nbytes + self.coverage.nbytes + self.count.nbytes)


def _contribution(placed: TileOnCanvas, norm: Normalisation, slot: int, scale: float) -> _Contribution:
    y0, _, x0, _ = placed.bbox
    values = corrected(norm, slot, placed.data, y0, x0)
    blend = placed.alpha * placed.weight * np.float32(scale)
    usable = np.isfinite(values).all(axis=0) & (blend > 0)
    return _Contribution(
        placed.bbox,
        np.where(usable[None], values, np.nan).astype(np.float32),
        np.where(usable, blend, 0.0).astype(np.float32),
        np.where(usable, placed.weight * np.float32(scale), 0.0).astype(np.float32),
        np.where(usable, placed.count, 0.0).astype(np.float32),
    )


def assemble_reproject_coadd(
    placed_tiles: Iterable[TileOnCanvas | None],
    canvas: Canvas,
    norm: Normalisation,
    scales: np.ndarray,
    n_channels: int,
    xp: Any = np,
) -> Assembled:
    """Every tile resampled and held, then the canvas combined band by band by the common
    stacking engine (:func:`.stack.combine`, weighted mean, no rejection)."""
    from .stack import combine

    height, width = canvas.shape
    held: list[_Contribution] = []
    held_bytes = 0
    peak = 0
    for slot, placed in enumerate(placed_tiles):
        if placed is not None:
            held.append(_contribution(placed, norm, slot, float(scales[slot])))
            held_bytes += held[-1].nbytes
            peak = max(peak, held_bytes + placed.nbytes)
            del placed
    data = np.full((n_channels, height, width), np.nan, dtype=np.float32)
    weight = np.zeros((height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.float32)
    for band0 in range(0, height, BAND_ROWS):
        band1 = min(band0 + BAND_ROWS, height)
        members = [item for item in held if item.bbox[0] < band1 and item.bbox[1] > band0]
        if not members:
            continue
        cube = np.full((len(members), n_channels, band1 - band0, width), np.nan, dtype=np.float32)
        weights = np.zeros((len(members), band1 - band0, width), dtype=np.float32)
        for k, item in enumerate(members):
            y0, y1, x0, x1 = item.bbox
            r0, r1 = max(y0, band0), min(y1, band1)
            rows = slice(r0 - y0, r1 - y0)
            cube[k, :, r0 - band0 : r1 - band0, x0:x1] = item.values[:, rows]
            weights[k, r0 - band0 : r1 - band0, x0:x1] = item.blend[rows]
            weight[r0:r1, x0:x1] += item.coverage[rows]
            count[r0:r1, x0:x1] += item.count[rows]
        if xp is np:
            band_data, _, _ = combine(cube, None, weights, "mean", np)
        else:
            band_data = combine(xp.asarray(cube), None, xp.asarray(weights), "mean", xp)[0].get()
        data[:, band0:band1] = band_data
        del cube, weights
    _finish(data, weight, count)
    return Assembled(data, weight, count, peak)


class _DiskAccumulators:
    """Running sums Σw·x (C, H, W), Σw, coverage and count (H, W) in raw float32 files."""

    def __init__(self, directory: Path, n_channels: int, shape: tuple[int, int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = [directory / f"{name}.f32" for name in ("sum", "blend", "coverage", "count")]
        height, width = shape
        # mode "w+" creates zero-filled (sparse) files: untouched canvas costs neither RAM nor disk.
        self.sum = np.memmap(self.paths[0], dtype=np.float32, mode="w+", shape=(n_channels, height, width))
        self.blend, self.coverage, self.count = (
            np.memmap(path, dtype=np.float32, mode="w+", shape=(height, width)) for path in self.paths[1:]
        )

    def add(self, item: _Contribution) -> None:
        y0, y1, x0, x1 = item.bbox
        region = (slice(y0, y1), slice(x0, x1))
        self.sum[(slice(None), *region)] += np.where(np.isfinite(item.values), item.values * item.blend[None], 0.0)
        self.blend[region] += item.blend
        self.coverage[region] += item.coverage
        self.count[region] += item.count

    def close(self) -> None:
        for array in (self.sum, self.blend, self.coverage, self.count):
            array.flush()
            base = getattr(array, "_mmap", None)
            if base is not None:
                base.close()
        for path in self.paths:
            path.unlink(missing_ok=True)


def assemble_incremental(
    placed_tiles: Iterable[TileOnCanvas | None],
    canvas: Canvas,
    norm: Normalisation,
    scales: np.ndarray,
    n_channels: int,
    work_dir: Path,
) -> Assembled:
    """Tiles added one at a time into on-disk running sums, then divided band by band."""
    height, width = canvas.shape
    sums = _DiskAccumulators(work_dir, n_channels, canvas.shape)
    peak = 0
    try:
        for slot, placed in enumerate(placed_tiles):
            if placed is None:
                continue
            item = _contribution(placed, norm, slot, float(scales[slot]))
            peak = max(peak, item.nbytes + placed.nbytes)
            del placed
            sums.add(item)
            del item
        data = np.full((n_channels, height, width), np.nan, dtype=np.float32)
        weight = np.zeros((height, width), dtype=np.float32)
        count = np.zeros((height, width), dtype=np.float32)
        for band0 in range(0, height, BAND_ROWS):
            band = slice(band0, min(band0 + BAND_ROWS, height))
            blend = np.asarray(sums.blend[band], dtype=np.float64)
            has = blend > 0
            values = np.asarray(sums.sum[:, band], dtype=np.float64) / np.where(has, blend, 1.0)[None]
            data[:, band] = np.where(has[None], values, np.nan)
            weight[band] = np.where(has, sums.coverage[band], 0.0)
            count[band] = np.where(has, sums.count[band], 0.0)
    finally:
        sums.close()
    _finish(data, weight, count)
    return Assembled(data, weight, count, peak)


def assemble(
    method: str,
    placed_tiles: Iterable[TileOnCanvas | None],
    canvas: Canvas,
    norm: Normalisation,
    scales: np.ndarray,
    n_channels: int,
    work_dir: Path,
    xp: Any = np,
) -> Assembled:
    """Dispatch on ``final_assembly_method``. ``placed_tiles`` may be a lazy iterator (incremental
    then holds one resampled tile at a time)."""
    if method == "incremental":
        return assemble_incremental(placed_tiles, canvas, norm, scales, n_channels, work_dir)
    if method == "reproject_coadd":
        return assemble_reproject_coadd(placed_tiles, canvas, norm, scales, n_channels, xp)
    raise ValueError(f"unknown final_assembly_method {method!r}; expected one of {ASSEMBLY_METHODS}")


def _finish(data: np.ndarray, weight: np.ndarray, count: np.ndarray) -> None:
    """Pixels with no usable value get weight and count 0 (and NaN in every channel)."""
    empty = ~np.isfinite(data).all(axis=0)
    data[:, empty] = np.nan
    weight[empty] = 0.0
    count[empty] = 0.0


# ------------------------------------------------------------------------------ crop, alpha


def crop_to_coverage(
    data: np.ndarray, weight: np.ndarray, count: np.ndarray, canvas: Canvas, margin_px: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Canvas]:
    """The covered area plus ``margin_px`` (idempotent: cropping again changes nothing)."""
    if not (weight > 0).any():
        return data, weight, count, canvas
    rows, cols = autocrop_slices(weight > 0, margin_px)
    return (
        np.ascontiguousarray(data[:, rows, cols]),
        np.ascontiguousarray(weight[rows, cols]),
        np.ascontiguousarray(count[rows, cols]),
        crop_canvas(canvas, (rows, cols)),
    )


def alpha_map(weight: np.ndarray, data: np.ndarray) -> np.ndarray:
    """uint8 alpha of the science file: 255 where a tile contributed and every channel is finite."""
    return np.where((weight > 0) & np.isfinite(data).all(axis=0), 255, 0).astype(np.uint8)

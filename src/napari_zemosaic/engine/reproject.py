"""Exact, fast reprojection of one frame onto (a bounding box of) the canvas.

Approach
--------
Resampling a frame onto the canvas needs, for every canvas pixel, the frame pixel
it comes from: canvas pixel → sky → frame pixel. Evaluating that with astropy for
every pixel (what ``reproject.reproject_interp`` does) dominates the cost, because the
SIP inverse is iterative. The mapping is, however, very smooth, so:

1. **Bounding box only.** Only the frame's bounding box on the canvas is computed.
2. **Control grid.** The exact astropy transform (``all_pix2world`` of the canvas then
   ``all_world2pix`` of the frame, which honours SIP exactly) is evaluated on a sparse
   grid of control points over the box, spaced ``step`` canvas pixels, the far edge
   included. The grid is checked at the cell centres and edge midpoints (the points of
   the grid at half the step) against the exact transform, and the step is halved
   until bilinear interpolation of the grid reproduces the exact mapping to better
   than ``tol_px`` (default 0.01 px). When the step is even, the check grid *is* the
   next grid, so no exact evaluation is wasted.
3. **Dense map.** The per-pixel map is the bilinear interpolation of the control grid,
   separable: first along x for each control row, then along y (xp-generic).
4. **Sampling.** The frame is sampled at the map by an xp-generic gather: floor
   indices and weights are computed once per output pixel (float32) and applied to
   every channel with flat ``take`` on precomputed flat indices. On NumPy the output is
   processed in row chunks that stay in cache, with map expansion fused into the same
   loop so the full-size map is never materialised. On the GPU, bilinear sampling computes
   the map inside its CUDA kernel from the expander's control rows (:func:`sample_rows`).

Pixel convention (identical to ``reproject.reproject_interp``): pixel centres at
integer coordinates; a frame of shape ``(H, W)`` covers ``x ∈ [-0.5, W - 0.5]``; source
coordinates in the outer half of a border pixel are clamped to that pixel's centre;
anything outside is NaN.

Footprint: ``1`` where the output is valid, ``0`` elsewhere. A pixel is valid when it
falls inside the frame and every input pixel that carries a nonzero kernel weight is
finite (for bilinear: all neighbours with nonzero weight; at exact integer positions
only the pixel itself). Inside the frame and away from NaNs this is the footprint of
``reproject_interp``. Input NaNs therefore never bleed beyond the kernel support; a NaN
in any channel invalidates the pixel for all channels (the footprint is per pixel).
For bicubic / Lanczos, kernel taps that fall outside the frame reuse the border pixel
(edge replication), so every point inside the frame is covered.

Measured precision: the float32 dense map differs from the float64 bilinear
interpolation of the same control grid by 2.3e-4 px on a 1920 px frame and 4.9e-4 px
on a 6000 px frame (float32 spacing is 2.4e-4 / 4.9e-4 there), far inside the default
0.01 px tolerance, so the dense map is kept in float32 (half the memory traffic).

Photometric note: the bilinear map's *positions* are within ``tol_px``, but its local
Jacobian (pixel-area ratio) is off by about ``sqrt(8 · tol_px · f'')`` relative, ``f''``
being the mapping's curvature (SIP): ≈ 1e-3 for tol_px = 0.01 on a strongly distorted
field, ≈ 2e-4 for tol_px = 0.001. A star's flux inherits that error; lower ``tol_px``
when sub-permille photometry matters (the grid costs stay small).

Kernels: "bilinear"; "bicubic" is Keys cubic convolution (a = -0.5, 4×4 taps, exact for
quadratics); "lanczos3" is the windowed sinc over 6×6 taps with weights normalised to
sum to one (Lanczos-3 does not reproduce a linear ramp exactly: expect a few 1e-3 of
the signal's amplitude on smooth data, in exchange for sharper stars).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.wcs import WCS

from .canvas import BBox, bbox_on_grid

METHODS = ("bilinear", "bicubic", "lanczos3")
#: Output pixels per chunk on NumPy (keeps indices, weights and gathers in cache).
NUMPY_CHUNK_PIXELS = 1 << 15
#: Output pixels per chunk on a GPU: large launches, but bounded temporaries (~0.4 GB).
DEVICE_CHUNK_PIXELS = 1 << 21
#: Kernel weights below this are treated as zero (so exact grid positions do not touch neighbours).
_ZERO_WEIGHT = 1e-6
#: Tolerance handed to astropy's iterative SIP inverse, in pixels (far below ``tol_px``).
_SIP_INVERSE_TOLERANCE_PX = 1e-7


@dataclass
class ControlGrid:
    """Exact frame-pixel coordinates at control points spaced ``step`` canvas pixels."""

    bbox: BBox  # (y0, y1, x0, x1) on the canvas, end-exclusive
    step: int  # control-point spacing in canvas pixels
    src_x: np.ndarray  # float64 (ny, nx) frame x at canvas (y0 + j·step, x0 + i·step)
    src_y: np.ndarray  # float64 (ny, nx) frame y
    max_error_px: float  # largest interpolation error found at the check points

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` of the bounding box (the dense map's shape)."""
        y0, y1, x0, x1 = self.bbox
        return y1 - y0, x1 - x0


# --------------------------------------------------------------------------------------
# Control grid
# --------------------------------------------------------------------------------------


def exact_map(
    src_wcs: WCS, canvas_wcs: WCS, canvas_x: np.ndarray, canvas_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Frame pixel (x, y) of canvas pixels, through the sky, with astropy (SIP exact)."""
    canvas_x = np.asarray(canvas_x, dtype=np.float64)
    canvas_y = np.asarray(canvas_y, dtype=np.float64)
    shape = np.broadcast(canvas_x, canvas_y).shape
    cx = np.broadcast_to(canvas_x, shape).ravel()
    cy = np.broadcast_to(canvas_y, shape).ravel()
    ra, dec = canvas_wcs.all_pix2world(cx, cy, 0)
    if not src_wcs.has_distortion:  # plain TAN: the closed-form inverse is exact
        sx, sy = src_wcs.wcs_world2pix(ra, dec, 0)
    else:
        sx, sy = src_wcs.all_world2pix(
            ra, dec, 0, tolerance=_SIP_INVERSE_TOLERANCE_PX, maxiter=50, quiet=True
        )
    return np.asarray(sx, dtype=np.float64).reshape(shape), np.asarray(sy, dtype=np.float64).reshape(shape)


def _grid_offsets(length: int, step: float) -> np.ndarray:
    """Offsets 0, step, 2·step, … up to the first one ≥ ``length - 1`` (at least two points)."""
    count = max(int(np.ceil((length - 1) / step)), 1) + 1
    return np.arange(count, dtype=np.float64) * step


def _upsample2(grid: np.ndarray) -> np.ndarray:
    """Bilinear values of a grid at its own points, cell-edge midpoints and cell centres."""
    ny, nx = grid.shape
    out = np.empty((2 * ny - 1, 2 * nx - 1), dtype=np.float64)
    out[::2, ::2] = grid
    out[::2, 1::2] = 0.5 * (grid[:, :-1] + grid[:, 1:])
    out[1::2, ::2] = 0.5 * (grid[:-1, :] + grid[1:, :])
    out[1::2, 1::2] = 0.25 * (grid[:-1, :-1] + grid[:-1, 1:] + grid[1:, :-1] + grid[1:, 1:])
    return out


def compute_control_grid(
    src_wcs: WCS,
    src_shape: tuple[int, int],
    canvas_wcs: WCS,
    bbox: BBox,
    tol_px: float = 0.01,
    initial_step: int = 64,
) -> ControlGrid:
    """The coarsest control grid (step halved from ``initial_step``) accurate to ``tol_px``.

    ``src_shape`` is accepted for symmetry with the other calls; the mapping does not
    depend on it (points outside the frame are mapped too and masked when sampling).
    """
    del src_shape  # the mapping is defined everywhere; sampling decides what is inside
    y0, y1, x0, x1 = (int(v) for v in bbox)
    height, width = y1 - y0, x1 - x0
    if height <= 0 or width <= 0:
        raise ValueError(f"empty bounding box {bbox}")
    step = max(int(initial_step), 1)
    grid_x_off, grid_y_off = _grid_offsets(width, step), _grid_offsets(height, step)
    src_x, src_y = exact_map(src_wcs, canvas_wcs, x0 + grid_x_off[None, :], y0 + grid_y_off[:, None])
    while True:
        if step == 1:
            return ControlGrid((y0, y1, x0, x1), 1, src_x, src_y, 0.0)
        # Check points: the grid at half the step over the same extent.
        half = step / 2.0
        check_x_off = np.arange(2 * grid_x_off.size - 1, dtype=np.float64) * half
        check_y_off = np.arange(2 * grid_y_off.size - 1, dtype=np.float64) * half
        exact_x, exact_y = exact_map(src_wcs, canvas_wcs, x0 + check_x_off[None, :], y0 + check_y_off[:, None])
        error = np.hypot(_upsample2(src_x) - exact_x, _upsample2(src_y) - exact_y)
        finite = error[np.isfinite(error)]
        max_error = float(finite.max()) if finite.size else 0.0
        if max_error < tol_px:
            return ControlGrid((y0, y1, x0, x1), step, src_x, src_y, max_error)
        if step % 2 == 0:  # the check grid is exactly the next control grid
            step //= 2
            grid_x_off, grid_y_off, src_x, src_y = check_x_off, check_y_off, exact_x, exact_y
        else:
            step //= 2
            grid_x_off, grid_y_off = _grid_offsets(width, step), _grid_offsets(height, step)
            src_x, src_y = exact_map(src_wcs, canvas_wcs, x0 + grid_x_off[None, :], y0 + grid_y_off[:, None])


# --------------------------------------------------------------------------------------
# Dense map (xp-generic)
# --------------------------------------------------------------------------------------


class _MapExpander:
    """Bilinear expansion of a control grid, row range by row range (xp-generic).

    The x-interpolation of every control row is done once (``ny × w``, small); each
    requested row range is then a y-interpolation between two of those rows.
    """

    def __init__(self, grid: ControlGrid, xp: Any = np, dtype: Any = np.float32, grid_on_device: Any = None) -> None:
        """``grid_on_device``: :func:`control_points` of ``grid`` already on the device (copied with
        the frame's pixels), else copied here when the bilinear kernel first needs it."""
        self.grid, self.xp, self.dtype = grid, xp, dtype
        self._arrays: dict[str, Any] | None = None
        self._grid_on_device: Any = grid_on_device
        if xp is np:
            self._expanded()

    def _expanded(self) -> dict[str, Any]:
        """The control rows, cells and fractions (made once, on first use: on the device the
        bilinear kernel computes them itself and never asks)."""
        if self._arrays is not None:
            return self._arrays
        grid, xp = self.grid, self.xp
        height, width = grid.shape
        step = grid.step
        col_cell, col_frac = self._cells(width, step, grid.src_x.shape[1])
        if xp is np:
            rows_x = self._along_x(grid.src_x, col_cell, col_frac)
            rows_y = self._along_x(grid.src_y, col_cell, col_frac)
        else:  # on the device: both coordinates at once, the same float64 operations (no host work)
            rows_x, rows_y = self._along_x(np.stack([grid.src_x, grid.src_y]), col_cell, col_frac)
            # C order (the gather may leave another), as the fused sampling kernel reads them.
            rows_x, rows_y = xp.ascontiguousarray(rows_x), xp.ascontiguousarray(rows_y)
        row_cell, row_frac = self._cells(height, step, grid.src_x.shape[0])
        self._arrays = {
            "rows_x": rows_x,
            "rows_y": rows_y,
            "row_cell": xp.asarray(row_cell),
            "row_frac": xp.asarray(row_frac.astype(self.dtype)),
            # Row-to-row differences once, so each expanded row costs one gather pair and an FMA.
            "step_x": rows_x[1:] - rows_x[:-1],
            "step_y": rows_y[1:] - rows_y[:-1],
        }
        return self._arrays

    rows_x = property(lambda self: self._expanded()["rows_x"])
    rows_y = property(lambda self: self._expanded()["rows_y"])
    row_cell = property(lambda self: self._expanded()["row_cell"])
    row_frac = property(lambda self: self._expanded()["row_frac"])
    step_x = property(lambda self: self._expanded()["step_x"])
    step_y = property(lambda self: self._expanded()["step_y"])

    @staticmethod
    def _cells(length: int, step: int, n_points: int) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.arange(length)
        cell = np.minimum(offsets // step, n_points - 2)
        frac = (offsets - cell * step) / float(step)
        return cell, frac

    def _along_x(self, values: np.ndarray, col_cell: np.ndarray, col_frac: np.ndarray) -> Any:
        """``(…, ny, w)`` rows interpolated along x in float64 (one IEEE operation at a time on
        either backend, so the same values), then cast to the map's dtype on ``xp``."""
        xp = self.xp
        values, col_cell, col_frac = (xp.asarray(a) for a in (values, col_cell, col_frac))
        left, right = values[..., col_cell], values[..., col_cell + 1]
        rows = left + col_frac * (right - left)
        return rows.astype(self.dtype)

    def rows(self, r0: int, r1: int) -> tuple[Any, Any]:
        """Dense ``(map_x, map_y)`` for box rows ``r0 … r1 - 1``, each ``(r1 - r0, w)``."""
        cell = self.row_cell[r0:r1]
        frac = self.row_frac[r0:r1][:, None]
        return self.rows_x[cell] + frac * self.step_x[cell], self.rows_y[cell] + frac * self.step_y[cell]

    def sample_bilinear_into(self, source: _Source, r0: int, r1: int, out: Any, footprint: Any) -> bool:
        """Bilinear samples of box rows ``r0 … r1 - 1`` into ``out`` (C, r1 - r0, w) and ``footprint``,
        the map computed inside one CUDA kernel (:func:`.gpu.fused_bilinear_control_into`): the values
        of :meth:`rows` + :func:`_bilinear_into` to the bit, without the dense map. False (nothing
        written) when not on CuPy or the arrays do not fit the kernel."""
        xp = self.xp
        if xp is np or np.dtype(self.dtype) != np.float32:
            return False
        from .gpu import fused_bilinear_control_into, upload_async

        if self._grid_on_device is None:
            self._grid_on_device = upload_async(control_points(self.grid), xp)
        return fused_bilinear_control_into(
            source.flat, source.bad, source.height, source.width, self._grid_on_device, self.grid.step,
            self.grid.shape, r0, r1, out, footprint, xp,
        )


def control_points(grid: ControlGrid) -> np.ndarray:
    """The grid's frame coordinates as the bilinear kernel reads them: float64 ``(2, ny, nx)``, x then y."""
    return np.stack([grid.src_x, grid.src_y]).astype(np.float64)


def expand_control_grid(grid: ControlGrid, xp: Any = np, dtype: Any = np.float32) -> tuple[Any, Any]:
    """Dense ``(map_x, map_y)`` of shape ``(h, w)`` over the grid's bounding box."""
    height, _ = grid.shape
    return _MapExpander(grid, xp, dtype).rows(0, height)


# --------------------------------------------------------------------------------------
# Sampling kernels (xp-generic)
# --------------------------------------------------------------------------------------


def _keys_cubic(distance: Any, xp: Any) -> Any:
    """Keys cubic convolution kernel, a = -0.5."""
    a = -0.5
    s = xp.abs(distance)
    near = ((a + 2.0) * s - (a + 3.0)) * s * s + 1.0
    far = ((a * s - 5.0 * a) * s + 8.0 * a) * s - 4.0 * a
    return xp.where(s <= 1.0, near, xp.where(s < 2.0, far, 0.0))


def _lanczos3(distance: Any, xp: Any) -> Any:
    s = xp.abs(distance)
    safe = xp.where(s < 1e-6, 1.0, s)
    value = 3.0 * xp.sin(np.pi * safe) * xp.sin(np.pi * safe / 3.0) / (np.pi * np.pi * safe * safe)
    return xp.where(s < 1e-6, 1.0, xp.where(s < 3.0, value, 0.0))


_KERNELS = {"bicubic": (_keys_cubic, 4), "lanczos3": (_lanczos3, 6)}


@dataclass
class _Source:
    """The frame prepared once for sampling: flat channels, NaNs zeroed, a NaN mask."""

    flat: Any  # (C, H·W) float32, NaN replaced by 0 when ``bad`` is set
    bad: Any | None  # (H·W,) float32, 1 where any channel is NaN; None when there are none
    height: int
    width: int


def _prepare_source(data: Any, xp: Any, may_hold_nan: bool = True) -> _Source:
    """``may_hold_nan=False``: the caller knows every value is a number (frames decoded from
    integers), so the NaN test, a host sync on the GPU, is skipped."""
    data = xp.asarray(data, dtype=xp.float32)
    if data.ndim == 2:
        data = data[None]
    channels, height, width = data.shape
    flat = data.reshape(channels, height * width)
    if not may_hold_nan:
        return _Source(flat, None, height, width)
    nan = xp.isnan(flat)
    if bool(xp.any(nan)):
        bad = xp.any(nan, axis=0).astype(xp.float32)
        flat = xp.where(nan, xp.float32(0.0), flat)
        return _Source(flat, bad, height, width)
    return _Source(flat, None, height, width)


def _inside(x: Any, y: Any, width: int, height: int) -> Any:
    # Same rule as reproject: coordinates up to half a pixel beyond the border centres are in.
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def _bilinear_into(source: _Source, x: Any, y: Any, out: Any, footprint: Any, xp: Any, fused: bool = True) -> None:
    """Bilinear samples of every channel at (x, y) ``(r, w)`` written to ``out`` (C, r, w).

    On the GPU (``fused``) one CUDA kernel (:func:`.gpu.fused_bilinear_into`) computes the same
    values, operation for operation, instead of ~50 array calls.
    """
    height, width = source.height, source.width
    if fused and xp is not np:
        from .gpu import fused_bilinear_into

        if fused_bilinear_into(source.flat, source.bad, height, width, x, y, out, footprint, xp):
            return
    inside = _inside(x, y, width, height)
    # Clamp to the border centres (reproject's convention), then pick the cell so that
    # the right/bottom neighbours exist: x = W - 1 becomes cell W - 2 with weight 1.
    xc = xp.clip(xp.where(inside, x, 0.0), 0.0, width - 1.0)
    yc = xp.clip(xp.where(inside, y, 0.0), 0.0, height - 1.0)
    cell_x = xp.minimum(xp.floor(xc), max(width - 2, 0))
    cell_y = xp.minimum(xp.floor(yc), max(height - 2, 0))
    fx = (xc - cell_x).astype(xp.float32, copy=False)
    fy = (yc - cell_y).astype(xp.float32, copy=False)
    # The four weights once, shared by every channel (and the NaN mask).
    gx = 1.0 - fx
    gy = 1.0 - fy
    weights = (gx * gy, fx * gy, gx * fy, fx * fy)
    step_x = 1 if width > 1 else 0
    step_y = width if height > 1 else 0
    top_left = cell_y.astype(xp.int64) * width + cell_x.astype(xp.int64)
    top_right = top_left + step_x
    bottom_left = top_left + step_y
    bottom_right = bottom_left + step_x

    def gather(plane: Any) -> Any:
        w00, w01, w10, w11 = weights
        return (
            w00 * xp.take(plane, top_left)
            + w01 * xp.take(plane, top_right)
            + w10 * xp.take(plane, bottom_left)
            + w11 * xp.take(plane, bottom_right)
        )

    valid = inside
    if source.bad is not None:
        # All bilinear weights are ≥ 0, so the interpolated mask is > 0 exactly when a
        # neighbour with nonzero weight is NaN.
        valid = valid & (gather(source.bad) <= 0.0)
    nan = xp.float32(np.nan)
    for channel in range(source.flat.shape[0]):
        out[channel] = xp.where(valid, gather(source.flat[channel]), nan)
    footprint[...] = valid


def _separable_weights(coord: Any, size: int, kernel: Any, taps: int, xp: Any) -> tuple[list[Any], list[Any]]:
    """Clamped tap indices and normalised weights along one axis (``taps`` each)."""
    base = xp.floor(coord)
    frac = coord - base
    first = -(taps // 2 - 1)
    indices, weights = [], []
    for k in range(taps):
        offset = first + k
        weight = kernel(frac - offset, xp).astype(xp.float32)
        weights.append(xp.where(xp.abs(weight) < _ZERO_WEIGHT, xp.float32(0.0), weight))
        indices.append(xp.clip(base + offset, 0, size - 1).astype(xp.int64))
    total = weights[0]
    for weight in weights[1:]:
        total = total + weight
    return indices, [weight / total for weight in weights]


def _kernel_into(source: _Source, x: Any, y: Any, method: str, out: Any, footprint: Any, xp: Any) -> None:
    """Separable-kernel samples (bicubic, Lanczos-3) written to ``out`` (C, r, w)."""
    kernel, taps = _KERNELS[method]
    height, width = source.height, source.width
    inside = _inside(x, y, width, height)
    xc = xp.clip(xp.where(inside, x, 0.0), 0.0, width - 1.0).astype(xp.float32)
    yc = xp.clip(xp.where(inside, y, 0.0), 0.0, height - 1.0).astype(xp.float32)
    col_index, col_weight = _separable_weights(xc, width, kernel, taps, xp)
    row_index, row_weight = _separable_weights(yc, height, kernel, taps, xp)
    # Flat indices of the taps² neighbours once, shared by every channel and the NaN mask.
    flat_index = [[row * width + col for col in col_index] for row in row_index]

    def gather(plane: Any, absolute: bool = False) -> Any:
        total = None
        for j in range(taps):
            line = None
            for i in range(taps):
                value = xp.take(plane, flat_index[j][i])
                weight = xp.abs(col_weight[i]) if absolute else col_weight[i]
                line = weight * value if line is None else line + weight * value
            weight = xp.abs(row_weight[j]) if absolute else row_weight[j]
            total = weight * line if total is None else total + weight * line
        return total

    valid = inside
    if source.bad is not None:
        valid = valid & (gather(source.bad, absolute=True) <= 0.0)
    nan = xp.float32(np.nan)
    for channel in range(source.flat.shape[0]):
        out[channel] = xp.where(valid, gather(source.flat[channel]), nan)
    footprint[...] = valid


def _sample_into(source: _Source, x: Any, y: Any, method: str, out: Any, footprint: Any, xp: Any) -> None:
    if method == "bilinear":
        _bilinear_into(source, x, y, out, footprint, xp)
    else:
        _kernel_into(source, x, y, method, out, footprint, xp)


def sample_rows(
    expander: _MapExpander, source: _Source, method: str, r0: int, r1: int, out: Any, footprint: Any, xp: Any,
    *, fused: bool = True,
) -> None:
    """Samples of box rows ``r0 … r1 - 1`` into ``out`` (C, r1 - r0, w) and ``footprint`` (r1 - r0, w).

    Bilinear on the GPU (``fused``): map and sampling in one kernel
    (:meth:`_MapExpander.sample_bilinear_into`); otherwise the dense map of the rows, then
    :func:`_sample_into`. Both give the same values.
    """
    if fused and method == "bilinear" and expander.sample_bilinear_into(source, r0, r1, out, footprint):
        return
    map_x, map_y = expander.rows(r0, r1)
    _sample_into(source, map_x, map_y, method, out, footprint, xp)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown resampling method {method!r}; expected one of {METHODS}")


def _rows_per_chunk(width: int, xp: Any, total_rows: int) -> int:
    budget = NUMPY_CHUNK_PIXELS if xp is np else DEVICE_CHUNK_PIXELS
    return min(max(budget // max(width, 1), 1), max(total_rows, 1))


def sample(
    data: Any, map_x: Any, map_y: Any, method: str = "bilinear", xp: Any = np
) -> tuple[Any, Any]:
    """Sample ``data`` (C, H, W) at frame coordinates ``(map_x, map_y)`` (h, w).

    Returns ``out`` (C, h, w) float32, NaN where not covered, and ``footprint`` (h, w)
    float32 in {0, 1} (see the module docstring for the NaN and edge rules).
    """
    _check_method(method)
    source = _prepare_source(data, xp)
    map_x, map_y = xp.asarray(map_x), xp.asarray(map_y)
    height, width = map_x.shape
    out = xp.empty((source.flat.shape[0], height, width), dtype=xp.float32)
    footprint = xp.empty((height, width), dtype=xp.float32)
    rows = _rows_per_chunk(width, xp, height)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        _sample_into(source, map_x[r0:r1], map_y[r0:r1], method, out[:, r0:r1], footprint[r0:r1], xp)
    return out, footprint


def reproject_frame(
    data: Any,
    src_wcs: WCS,
    canvas_wcs: WCS,
    canvas_shape: tuple[int, int],
    *,
    method: str = "bilinear",
    tol_px: float = 0.01,
    xp: Any = np,
) -> tuple[BBox, Any, Any] | None:
    """Resample a frame (C, H, W) onto its bounding box of the canvas.

    Returns ``(bbox, out, footprint)`` with ``bbox = (y0, y1, x0, x1)`` on the canvas,
    ``out`` (C, y1-y0, x1-x0) float32 (NaN where not covered) and ``footprint``
    (y1-y0, x1-x0) float32; ``None`` when the frame misses the canvas.
    """
    _check_method(method)
    frame_shape = (int(data.shape[-2]), int(data.shape[-1]))
    # Every kernel is NaN outside the frame's outline, so the box is the outline's (plus a
    # margin for the outline's curvature between its sampled points), whatever the kernel.
    bbox = bbox_on_grid(src_wcs, frame_shape, canvas_wcs, canvas_shape, margin=2)
    if bbox is None:
        return None
    grid = compute_control_grid(src_wcs, frame_shape, canvas_wcs, bbox, tol_px=tol_px)
    source = _prepare_source(data, xp)
    expander = _MapExpander(grid, xp)
    height, width = grid.shape
    out = xp.empty((source.flat.shape[0], height, width), dtype=xp.float32)
    footprint = xp.empty((height, width), dtype=xp.float32)
    rows = _rows_per_chunk(width, xp, height)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        sample_rows(expander, source, method, r0, r1, out[:, r0:r1], footprint[r0:r1], xp)
    return bbox, out, footprint

"""Sources on binned sky images: a mesh background, detection with moments, aperture sums.

One implementation for the host (NumPy + SciPy) and the device (CuPy + cupyx), batched over a
leading frame axis: a measuring process calls it with one frame, the GPU with a batch of frames,
and both get the same numbers (up to float rounding; ``tests/engine/test_detect.py`` compares
them, and compares the host's results with ``sep``'s).

* **Background** (:func:`subtract_mesh_background`): every other pixel of each mesh (the sky is
  smooth on the mesh scale), sorted once; a few rounds of clipping at ``BACKGROUND_CLIP_SIGMA``
  around the median (the kept values of a sorted mesh are one contiguous range, so a round is
  two counts and two prefix-sum lookups); the mode estimate 2.5 x median - 1.5 x mean where the
  mesh is nearly symmetric, else the median (SExtractor's rule); a 3x3 median filter over the
  meshes; a natural cubic spline through the mesh centres, applied as two small matrices.
* **Detection** (:func:`detect_sources`): the residual smoothed by a 1-2-1 kernel in each
  direction, pixels above ``sigma`` x the frame's noise, 8-connected groups of at least
  ``min_area`` pixels; per group the first and second moments of the unsmoothed residual (the
  quantities ``sep.extract`` reports: x, y, flux, peak and npix of the residual; x2, y2, xy and
  the ellipse a, b, theta of the smoothed image, as sep computes them) and flags:
  ``FLAG_MERGED`` where a group holds more than one significant peak of the smoothed image (two
  stars touching), ``FLAG_TRUNCATED`` where it touches the image's edge.
* **Aperture sums** (:func:`aperture_sums`): circular apertures with pixels weighted by their
  overlap with the circle (a linear ramp over the pixel's width at the rim).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from .gpu import to_host as _to_host

BACKGROUND_CLIP_SIGMA = 3.0
BACKGROUND_CLIP_ROUNDS = 5
#: SExtractor's rule: the mode estimate only where (mean - median) / sigma stays below this.
MODE_SKEW_LIMIT = 0.3
#: A mesh with fewer usable pixels than this fraction is filled from its neighbours.
MIN_MESH_FILL = 0.5
#: A second peak of a group counts (a blend) above this fraction of the group's highest one.
MERGED_PEAK_FRACTION = 0.1

FLAG_MERGED = 1
FLAG_TRUNCATED = 2

OBJECT_FIELDS = ("frame", "x", "y", "x2", "y2", "xy", "a", "b", "theta", "flux", "peak", "npix", "flag")
OBJECT_DTYPE = np.dtype(
    [("frame", np.int32)]
    + [(name, np.float64) for name in ("x", "y", "x2", "y2", "xy", "a", "b", "theta", "flux", "peak")]
    + [("npix", np.int32), ("flag", np.int32)]
)


def ndimage_module(xp: Any) -> Any:
    """``scipy.ndimage`` for NumPy arrays, ``cupyx.scipy.ndimage`` for CuPy's."""
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


# ============================================================================ background


def subtract_mesh_background(
    images: Any, mesh: int, invalid: Any = None, xp: Any = np
) -> tuple[np.ndarray, np.ndarray]:
    """Subtract each image's smooth sky in place; returns its level and noise per image (host arrays).

    ``images`` (B, h, w) float32; ``mesh``: the mesh side in pixels (the statistics use every
    other pixel of it); ``invalid`` (B, h, w) bool or None: pixels left out of the statistics.
    The level is the median of the meshes' sky values, the noise the median of their clipped
    standard deviations (NaN for an image without a usable mesh).
    """
    n_images, height, width = images.shape
    sky_grid, sigma_grid = _mesh_statistics(images, mesh, invalid, xp)
    filtered = _median_filter_3x3(sky_grid, xp)
    level = nanmedian_rows(filtered.reshape(n_images, -1), xp)
    noise = nanmedian_rows(sigma_grid.reshape(n_images, -1), xp)
    filled = xp.where(xp.isnan(filtered), xp.asarray(level, dtype=filtered.dtype)[:, None, None], filtered)
    filled = xp.nan_to_num(filled, nan=0.0)
    rows = xp.asarray(_spline_matrix(height, mesh, sky_grid.shape[1]))
    cols = xp.asarray(_spline_matrix(width, mesh, sky_grid.shape[2]))
    images -= xp.matmul(xp.matmul(rows, filled.astype(np.float32)), cols.T)
    return _to_host(level), _to_host(noise)


def _mesh_statistics(images: Any, mesh: int, invalid: Any, xp: Any) -> tuple[Any, Any]:
    """(sky, sigma) per mesh, (B, ny, nx) float64; NaN for meshes with too few usable pixels."""
    n_images, height, width = images.shape
    ny, nx = -(-height // mesh), -(-width // mesh)
    half = mesh // 2  # every other pixel: the mesh is sampled on a lattice of step 2
    sampled = xp.full((n_images, ny * half, nx * half), np.nan, dtype=np.float32)
    sub = images[:, ::2, ::2]
    if invalid is not None:
        sub = xp.where(invalid[:, ::2, ::2], np.float32(np.nan), sub)
    sampled[:, : sub.shape[1], : sub.shape[2]] = sub
    cells = sampled.reshape(n_images, ny, half, nx, half).transpose(0, 1, 3, 2, 4).reshape(n_images, ny, nx, half * half)
    values = xp.sort(cells, axis=-1)  # NaN sort last
    count = xp.sum(~xp.isnan(values), axis=-1)
    finite = xp.nan_to_num(values.astype(np.float64), nan=0.0)
    zeros = xp.zeros(finite.shape[:-1] + (1,), dtype=np.float64)
    first = xp.concatenate([zeros, xp.cumsum(finite, axis=-1)], axis=-1)
    second = xp.concatenate([zeros, xp.cumsum(finite * finite, axis=-1)], axis=-1)
    low, high = xp.zeros_like(count), count
    for _ in range(BACKGROUND_CLIP_ROUNDS):
        mean, sigma, median = _range_statistics(values, first, second, low, high, xp)
        bound = BACKGROUND_CLIP_SIGMA * sigma
        low = xp.sum(values < (median - bound)[..., None], axis=-1)
        high = xp.sum(values <= (median + bound)[..., None], axis=-1)
        high = xp.maximum(high, low + 1)
    mean, sigma, median = _range_statistics(values, first, second, low, high, xp)
    symmetric = xp.abs(mean - median) < MODE_SKEW_LIMIT * sigma
    sky = xp.where(symmetric, 2.5 * median - 1.5 * mean, median)
    usable = count >= max(1, int(MIN_MESH_FILL * half * half))
    return xp.where(usable, sky, np.nan), xp.where(usable, sigma, np.nan)


def _range_statistics(values: Any, first: Any, second: Any, low: Any, high: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Mean, standard deviation and median of ``values[..., low:high]`` (sorted rows)."""
    size = xp.maximum(high - low, 1)
    total = xp.take_along_axis(first, high[..., None], axis=-1)[..., 0] - xp.take_along_axis(first, low[..., None], axis=-1)[..., 0]
    squares = xp.take_along_axis(second, high[..., None], axis=-1)[..., 0] - xp.take_along_axis(second, low[..., None], axis=-1)[..., 0]
    mean = total / size
    sigma = xp.sqrt(xp.maximum(squares / size - mean * mean, 0.0))
    return mean, sigma, sorted_range_median(values, low, low + size, xp)


def sorted_range_median(values: Any, low: Any, high: Any, xp: Any) -> Any:
    """Median of ``values[..., low:high]`` for rows sorted along the last axis (``low``, ``high``:
    one index per row; NaN for an empty range), as float64: NumPy's median, the middle value or
    the mean of the two middle values in the values' own type."""
    size = high - low
    last = values.shape[-1] - 1
    lower = xp.clip(low + (size - 1) // 2, 0, last)
    upper = xp.clip(low + size // 2, 0, last)
    middle = (
        xp.take_along_axis(values, lower[..., None], axis=-1)[..., 0]
        + xp.take_along_axis(values, upper[..., None], axis=-1)[..., 0]
    ) / 2
    return xp.where(size > 0, middle.astype(np.float64), np.nan)


def _median_filter_3x3(grid: Any, xp: Any) -> Any:
    """NaN-ignoring 3x3 median over the meshes of each image (edges repeated)."""
    n_images, ny, nx = grid.shape
    padded = xp.pad(grid, ((0, 0), (1, 1), (1, 1)), mode="edge")
    shifted = xp.stack([padded[:, dy : dy + ny, dx : dx + nx] for dy in range(3) for dx in range(3)], axis=-1)
    return nanmedian_rows(shifted, xp)


def nanmedian_rows(values: Any, xp: Any = np) -> Any:
    """Median of the non-NaN values along the last axis (NaN where there are none)."""
    ordered = xp.sort(values, axis=-1)  # NaN sort last
    count = xp.sum(~xp.isnan(ordered), axis=-1)
    return sorted_range_median(ordered, xp.zeros_like(count), count, xp)


@lru_cache(maxsize=32)
def _spline_matrix(length: int, mesh: int, n_meshes: int) -> np.ndarray:
    """(length, n_meshes) float32: a natural cubic spline through the mesh centres, evaluated at
    every pixel (flat beyond the first and last centre). Column k is the spline through the unit
    values e_k, so the spline of any mesh values is this matrix times them (``scipy``'s
    ``CubicSpline(centres, eye, bc_type="natural")``, computed here without importing
    ``scipy.interpolate``: its import took a new measuring process 0.7 s)."""
    centres = np.array([(k * mesh + min((k + 1) * mesh, length) - 1) / 2.0 for k in range(n_meshes)])
    if n_meshes == 1:
        return np.ones((length, 1), dtype=np.float32)
    positions = np.clip(np.arange(length, dtype=np.float64), centres[0], centres[-1])
    return np.ascontiguousarray(natural_spline_basis(centres, positions), dtype=np.float32)


def natural_spline_basis(knots: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(len(positions), len(knots)) float64: column k is the natural cubic spline (second
    derivative 0 at both ends) through the values e_k at ``knots`` (increasing, at least two),
    evaluated at ``positions`` (within the knots)."""
    n = knots.size
    step = np.diff(knots)
    identity = np.eye(n)
    # Second derivatives at the knots: a tridiagonal system for the interior ones, 0 at the ends.
    second = np.zeros((n, n))
    if n > 2:
        system = np.diag(2.0 * (step[:-1] + step[1:])) + np.diag(step[1:-1], 1) + np.diag(step[1:-1], -1)
        slopes = np.diff(identity, axis=0) / step[:, None]
        second[1:-1] = np.linalg.solve(system, 6.0 * np.diff(slopes, axis=0))
    interval = np.clip(np.searchsorted(knots, positions, side="right") - 1, 0, n - 2)
    h = step[interval][:, None]
    left, right = (knots[interval + 1] - positions)[:, None], (positions - knots[interval])[:, None]
    m_left, m_right = second[interval], second[interval + 1]
    return (m_left * left**3 + m_right * right**3) / (6.0 * h) + (identity[interval] / h - m_left * h / 6.0) * left \
        + (identity[interval + 1] / h - m_right * h / 6.0) * right


# ============================================================================ detection


def smooth_121(images: Any, xp: Any = np) -> Any:
    """The 1-2-1 kernel along rows and columns (sum 1; edges repeated), float32.

    Each pass is two adds into one array (no padded copy): a + 2b + c = (a + b) + (b + c)."""
    rows = _smooth_121_axis(images, 1, xp)
    smoothed = _smooth_121_axis(rows, 2, xp)
    smoothed *= np.float32(1.0 / 16.0)
    return smoothed


def _smooth_121_axis(images: Any, axis: int, xp: Any) -> Any:
    """a[i-1] + 2 a[i] + a[i+1] along ``axis`` (1 or 2) of (B, h, w), the edge value repeated."""
    def part(start: int | None, stop: int | None) -> tuple[slice, ...]:
        index = [slice(None)] * 3
        index[axis] = slice(start, stop)
        return tuple(index)

    out = xp.empty(images.shape, dtype=np.float32)
    if images.shape[axis] < 2:
        xp.multiply(images, 4.0, out=out)
        return out
    pairs = images[part(1, None)] + images[part(None, -1)]  # a[i] + a[i+1], one shorter
    xp.add(pairs[part(None, -1)], pairs[part(1, None)], out=out[part(1, -1)])
    xp.add(pairs[part(None, 1)], 2.0 * images[part(None, 1)], out=out[part(None, 1)])  # 3 a0 + a1
    xp.add(pairs[part(-1, None)], 2.0 * images[part(-1, None)], out=out[part(-1, None)])  # a[-2] + 3 a[-1]
    return out


def detect_sources(
    residual: Any, noise: Any, sigma: float, min_area: int, invalid: Any = None, xp: Any = np
) -> np.ndarray:
    """Sources of each background-subtracted image (B, h, w), as a host array of ``OBJECT_DTYPE``.

    ``noise`` (B,): each image's pixel noise; a source is a group of 8-connected pixels whose
    smoothed value exceeds ``sigma`` x it, at least ``min_area`` of them. Rows come frame after
    frame (``frame`` field), each frame's in raster order of their first pixel.
    """
    n_images, height, width = residual.shape
    smoothed = smooth_121(residual, xp)
    threshold = xp.asarray(sigma * np.asarray(noise, dtype=np.float64), dtype=np.float32)[:, None, None]
    above = smoothed > threshold
    if invalid is not None:
        above &= ~invalid
    ndimage = ndimage_module(xp)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within a frame, never across frames
    labels, n_labels = ndimage.label(above, structure=xp.asarray(structure))
    n_labels = int(n_labels)
    if n_labels == 0:
        return np.zeros(0, dtype=OBJECT_DTYPE)
    flat = labels.ravel()
    index = xp.flatnonzero(flat)
    label = flat[index]
    frame_of_pixel = index // (height * width)
    within = index % (height * width)
    y, x = (within // width).astype(np.float64), (within % width).astype(np.float64)
    value = residual.ravel()[index].astype(np.float64)
    bins = n_labels + 1

    def total(weights: Any) -> Any:
        return xp.bincount(label, weights=weights, minlength=bins)[1:]

    npix = xp.bincount(label, minlength=bins)[1:]
    frame = (total(frame_of_pixel.astype(np.float64)) / xp.maximum(npix, 1)).round().astype(np.int32)
    flux = total(value)
    safe = xp.where(flux > 0, flux, 1.0)
    # Moments about each group's plain centroid: small numbers, no cancellation in x2 = <x²> - <x>².
    count = xp.maximum(npix, 1).astype(np.float64)
    origin_x = xp.concatenate([xp.zeros(1), total(x) / count])
    origin_y = xp.concatenate([xp.zeros(1), total(y) / count])
    dx, dy = x - origin_x[label], y - origin_y[label]
    mx, my = total(value * dx) / safe, total(value * dy) / safe
    # The second moments of the smoothed values, as sep reports them (what the star shapes'
    # stamp size and starting point were tuned on); position and flux from the pixels themselves.
    smooth_value = smoothed.ravel()[index].astype(np.float64)
    smooth_flux = total(smooth_value)
    smooth_safe = xp.where(smooth_flux > 0, smooth_flux, 1.0)
    sx, sy = total(smooth_value * dx) / smooth_safe, total(smooth_value * dy) / smooth_safe
    x2 = total(smooth_value * dx * dx) / smooth_safe - sx * sx
    y2 = total(smooth_value * dy * dy) / smooth_safe - sy * sy
    xy = total(smooth_value * dx * dy) / smooth_safe - sx * sy
    a, b, theta = _ellipse(x2, y2, xy, xp)

    peak = _group_maximum(label, value, n_labels, xp)
    smoothed_peak = _group_maximum(label, smooth_value, n_labels, xp)
    pixel_peak = _local_maximum(smoothed, frame_of_pixel, y, x, xp)
    significant = pixel_peak & (smooth_value >= MERGED_PEAK_FRACTION * smoothed_peak[label - 1])
    significant &= smooth_value >= 2.0 * threshold.ravel()[frame_of_pixel]
    n_peaks = total(significant.astype(np.float64))
    on_edge = (x == 0) | (y == 0) | (x == width - 1) | (y == height - 1)
    flag = xp.where(n_peaks > 1.5, FLAG_MERGED, 0) | xp.where(total(on_edge.astype(np.float64)) > 0, FLAG_TRUNCATED, 0)

    keep = (npix >= min_area) & (flux > 0)
    columns = [frame, origin_x[1:] + mx, origin_y[1:] + my, x2, y2, xy, a, b, theta, flux, xp.asarray(peak, dtype=np.float64), npix, flag]
    table = _to_host(xp.stack([xp.asarray(column, dtype=np.float64)[keep] for column in columns], axis=1))
    objects = np.zeros(table.shape[0], dtype=OBJECT_DTYPE)
    for position, name in enumerate(OBJECT_FIELDS):
        objects[name] = table[:, position]
    return objects


def _local_maximum(smoothed: Any, frame: Any, y: Any, x: Any, xp: Any) -> Any:
    """Whether each listed pixel is >= its 8 neighbours (edges repeated): the neighbours of the
    labelled pixels only, looked up with clamped indices (no filter or padded copy of the image)."""
    n_images, height, width = smoothed.shape
    flat = smoothed.ravel()
    row, col = y.astype(np.int64), x.astype(np.int64)
    base = frame * (height * width)
    value = flat[base + row * width + col]
    result = xp.ones(value.shape, dtype=bool)
    for dy in (-1, 0, 1):
        rows = xp.clip(row + dy, 0, height - 1) * width
        for dx in (-1, 0, 1):
            if dy or dx:
                result &= value >= flat[base + rows + xp.clip(col + dx, 0, width - 1)]
    return result


def _group_maximum(label: Any, values: Any, n_labels: int, xp: Any) -> Any:
    """Largest of ``values`` for each label 1..n (every label present): one sort of the labelled
    pixels by label then value (a per-label reduction over the whole image sorts all of it)."""
    low, high = xp.min(values), xp.max(values)
    scaled = (values - low) / (0.5 * (high - low) + 1e-300) * 0.25  # in [0, 0.5]: inside its label's unit step
    order = xp.argsort(label.astype(np.float64) + scaled)
    last = xp.searchsorted(label[order], xp.arange(1, n_labels + 1), side="right") - 1
    return values[order][last]


def _ellipse(x2: Any, y2: Any, xy: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Semi-axes and angle of the second-moment ellipse, as sep defines them (a tiny group's
    moments get the 1/12 px² of a pixel's width, so a single row of pixels has a finite b)."""
    singular = x2 * y2 - xy * xy < 1.0 / 144.0
    x2 = xp.where(singular, x2 + 1.0 / 12.0, x2)
    y2 = xp.where(singular, y2 + 1.0 / 12.0, y2)
    theta = 0.5 * xp.arctan2(2.0 * xy, x2 - y2)
    spread = xp.sqrt(0.25 * (x2 - y2) ** 2 + xy * xy)
    a = xp.sqrt(xp.maximum(0.5 * (x2 + y2) + spread, 0.0))
    b = xp.sqrt(xp.maximum(0.5 * (x2 + y2) - spread, 0.0))
    return a, b, theta


# ============================================================================ apertures


def aperture_sums(
    images: Any, frame: np.ndarray, x: np.ndarray, y: np.ndarray, radius: Any, invalid: Any = None, xp: Any = np
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of each image inside circles (host arrays in, host arrays out): (flux, usable).

    ``radius`` is one value or one per circle. A pixel counts by its overlap with the circle, a
    linear ramp from 1 half a pixel inside the rim to 0 half a pixel outside. ``usable`` is
    False for circles that leave the image or touch an invalid pixel.
    """
    n_images, height, width = images.shape
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), np.shape(x))
    if x.size == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    half = int(math.ceil(float(radius.max()) + 0.5))
    centre_x = np.floor(x + 0.5).astype(np.int64)
    centre_y = np.floor(y + 0.5).astype(np.int64)
    reach = np.ceil(radius + 0.5).astype(np.int64)
    usable = (centre_x - reach >= 0) & (centre_y - reach >= 0) & (centre_x + reach < width) & (centre_y + reach < height)
    offsets = xp.arange(-half, half + 1)
    rows = xp.clip(xp.asarray(centre_y)[:, None, None] + offsets[None, :, None], 0, height - 1)
    cols = xp.clip(xp.asarray(centre_x)[:, None, None] + offsets[None, None, :], 0, width - 1)
    distance = xp.hypot(rows - xp.asarray(y)[:, None, None], cols - xp.asarray(x)[:, None, None])
    weight = xp.clip(xp.asarray(radius)[:, None, None] + 0.5 - distance, 0.0, 1.0)
    flat = xp.asarray(frame)[:, None, None] * (height * width) + rows * width + cols
    stamps = images.ravel()[flat].astype(np.float64)
    flux = xp.sum(stamps * weight, axis=(1, 2))
    if invalid is not None:
        touched = xp.any(invalid.ravel()[flat] & (weight > 0), axis=(1, 2))
        usable &= ~_to_host(touched)
    return _to_host(flux), usable

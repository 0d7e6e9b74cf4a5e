"""CFA (Bayer) handling: colour-site masks, hot-pixel correction and bilinear debayering.

Every function takes the array module ``xp`` (``numpy`` or ``cupy``) and uses only
operations both provide (slicing, ``pad(mode="reflect")``, ufuncs with ``out=``,
``flatnonzero``, ``take``, ``sort`` and fancy indexing; no SciPy), so the CPU and the GPU
compute the same function.

Geometry. A Bayer pattern name such as ``"GRBG"`` lists the colours of the 2x2 cell
row by row: ``[[G, R], [B, G]]`` with the top-left at array index ``[0, 0]``. Every
pixel belongs to one of four *phases* ``(row % 2, col % 2)``. Same-colour neighbours
of any site sit on the distance-2 grid (offsets in {-2, 0, 2}^2). Reflective padding
(``mode="reflect"``, the edge pixel is not repeated) keeps the parity of every index,
so a padded CFA is still a valid CFA of the same pattern and the edges need no
special cases.

Debayering is classic bilinear interpolation: a known colour is copied unchanged;
green at a red/blue site is the mean of its 4 cross neighbours; red/blue at a green
site is the mean of the 2 neighbours along the row or column that holds that colour;
red at a blue site (and blue at red) is the mean of the 4 diagonal neighbours. Sums
are formed pairwise and scaled by 0.5 or 0.25 so a uniform scene is reproduced
bit-exactly. The work is done per phase on strided quarter-size views, so no
full-size mask or convolution is ever built.

Hot pixels. A hot pixel is a *single-site* excess: it stands far above the median
of its 8 same-colour neighbours while its immediate neighbours (any colour) do not.
The second condition is what keeps star cores intact: a star with a FWHM of 2-3 px
lifts the pixels next to its peak as well, a hot pixel does not. With ``s_c`` the
robust spread (1.4826 x MAD, on a strided subsample) of ``value - median8`` over the
sites of colour ``c``, a pixel is hot when

1. ``z = (value - median8) / s_c > sigma`` (``median8``: its 8 same-colour neighbours), and
2. its immediate neighbours show no comparable excess: with
   ``e = (value - min8) / s_c`` computed for every pixel, the second largest ``e`` among
   its 8 immediate neighbours is below ``max(ISOLATION_FRACTION * z, ISOLATION_FLOOR)``.
   A hot pixel never lies in its neighbours' same-colour rings, so around it ``e`` is
   pure noise (second largest of 8 is ~2 and almost never above 5). On a star, every
   wing pixel has neighbours nearer the peak whose ``e`` is larger than its own, and the
   peak's neighbours carry ~0.6 of its excess. "Second largest" rather than "largest"
   so that two adjacent hot pixels do not shield each other.

A hot pixel is replaced by its same-colour neighbour median.

Speed: ``e`` is cheap for the whole frame (``min8`` is five ``minimum`` calls sharing
3-wide row minima) and, because ``min8 <= median8``, ``e > sigma`` is necessary for
``z > sigma``. The exact medians (a min/max selection network) are evaluated only
at those candidates, gathered with flat ``take`` indices; star pixels make up most of
them, typically a few thousand per frame.
"""

from __future__ import annotations

from functools import partial
from typing import Any

PATTERNS: tuple[str, ...] = ("RGGB", "BGGR", "GRBG", "GBRG")

#: A candidate is hot only if the second largest excess (over min8, in noise units) of its
#: 8 immediate neighbours is below ``max(ISOLATION_FRACTION * z, ISOLATION_FLOOR)``
#: (see the module docstring for why).
ISOLATION_FRACTION = 0.1
ISOLATION_FLOOR = 5.0

#: Pixels per colour plane used for the noise estimate (a strided subsample).
_NOISE_SAMPLES_PER_PHASE = 20_000

#: Offsets (dy, dx) of the 8 same-colour neighbours of a Bayer site.
_SAME_COLOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple(
    (dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if (dy, dx) != (0, 0)
)
#: Offsets (dy, dx) of the 8 immediate neighbours of a pixel.
_IMMEDIATE_OFFSETS: tuple[tuple[int, int], ...] = tuple(
    (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)
_PHASES: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))


def normalize_pattern(pattern: str) -> str:
    """Upper-case ``pattern`` and check that it is one of :data:`PATTERNS`."""
    name = str(pattern).strip().upper()
    if name not in PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; expected one of {PATTERNS}")
    return name


def cfa_site_masks(pattern: str, shape: tuple[int, int], xp: Any) -> dict[str, Any]:
    """Boolean masks ``{"R", "G", "B"}`` of shape ``shape`` marking each colour's sites."""
    name = normalize_pattern(pattern)
    height, width = int(shape[0]), int(shape[1])
    masks = {colour: xp.zeros((height, width), dtype=bool) for colour in "RGB"}
    for dy, dx in _PHASES:
        masks[name[2 * dy + dx]][dy::2, dx::2] = True
    return masks


def _require_cfa(cfa: Any) -> None:
    if cfa.ndim != 2 or cfa.shape[0] < 2 or cfa.shape[1] < 2:
        raise ValueError(f"a CFA plane must be 2-D and at least 2x2, got shape {tuple(cfa.shape)}")


def _phase_view(padded: Any, pad: int, shape: tuple[int, int], dy: int, dx: int, oy: int, ox: int) -> Any:
    """Strided view of ``padded`` holding, for every pixel of phase (dy, dx), its neighbour at (oy, ox)."""
    height, width = shape
    return padded[pad + dy + oy : pad + height + oy : 2, pad + dx + ox : pad + width + ox : 2]


def _mean_of(weight: float, *views: Any) -> Any:
    """``weight * sum(views)`` summed pairwise ((a + b) + (c + d)), so equal inputs give an exact mean."""
    total = views[0] + views[1]
    if len(views) == 4:
        total += views[2] + views[3]
    total *= weight
    return total


def debayer_bilinear(cfa: Any, pattern: str, xp: Any, *, fused: bool = True) -> Any:
    """Bilinear demosaic of a (H, W) CFA plane into a (3, H, W) float32 RGB cube.

    Known sites keep their value exactly; edges are handled by reflective padding.
    On the GPU (``fused``, the default) one CUDA kernel (:func:`.gpu.fused_debayer_bilinear`)
    computes the same values to the bit, without the padded copy and the ~20 strided calls.
    """
    _require_cfa(cfa)
    name = normalize_pattern(pattern)
    plane = xp.asarray(cfa, dtype=xp.float32)
    if fused and getattr(xp, "cuda", None) is not None:  # CuPy
        rgb = _fused_gpu().fused_debayer_bilinear(xp.ascontiguousarray(plane), name, xp)
        if rgb is not None:
            return rgb
    shape = (int(plane.shape[0]), int(plane.shape[1]))
    padded = xp.pad(plane, 1, mode="reflect")
    rgb = xp.empty((3,) + shape, dtype=xp.float32)
    channel = {"R": 0, "G": 1, "B": 2}

    for dy, dx in _PHASES:
        at = partial(_phase_view, padded, 1, shape, dy, dx)
        colour = name[2 * dy + dx]
        rows, cols = slice(dy, None, 2), slice(dx, None, 2)
        rgb[channel[colour], rows, cols] = at(0, 0)
        if colour == "G":
            # The other site of this row of the cell says which colour runs along the row.
            row_colour = name[2 * dy + (1 - dx)]
            column_colour = "B" if row_colour == "R" else "R"
            rgb[channel[row_colour], rows, cols] = _mean_of(0.5, at(0, -1), at(0, 1))
            rgb[channel[column_colour], rows, cols] = _mean_of(0.5, at(-1, 0), at(1, 0))
        else:
            other = "B" if colour == "R" else "R"
            rgb[channel["G"], rows, cols] = _mean_of(0.25, at(0, -1), at(0, 1), at(-1, 0), at(1, 0))
            rgb[channel[other], rows, cols] = _mean_of(0.25, at(-1, -1), at(-1, 1), at(1, -1), at(1, 1))
    return rgb


# --- order statistics with min/max only (identical on numpy and cupy) ------------------


def _sort4(a: Any, b: Any, c: Any, d: Any, xp: Any) -> tuple[Any, Any, Any, Any]:
    """Sort four arrays element-wise with the optimal 5-comparator network."""
    a, b = xp.minimum(a, b), xp.maximum(a, b)
    c, d = xp.minimum(c, d), xp.maximum(c, d)
    a, c = xp.minimum(a, c), xp.maximum(a, c)
    b, d = xp.minimum(b, d), xp.maximum(b, d)
    b, c = xp.minimum(b, c), xp.maximum(b, c)
    return a, b, c, d


def median_of_8(values: list[Any] | tuple[Any, ...], xp: Any) -> Any:
    """Element-wise median (mean of the 4th and 5th smallest) of eight arrays.

    Each half is sorted, then the k-th smallest of the union is
    ``min over i+j=k of max(a_i, b_j)`` (1-based, a_0 = b_0 = -inf).
    """
    a = _sort4(*values[:4], xp=xp)
    b = _sort4(*values[4:], xp=xp)
    mn, mx = xp.minimum, xp.maximum
    fourth = mn(mn(mn(a[3], b[3]), mx(a[0], b[2])), mn(mx(a[1], b[1]), mx(a[2], b[0])))
    fifth = mn(mn(mx(a[0], b[3]), mx(a[1], b[2])), mn(mx(a[2], b[1]), mx(a[3], b[0])))
    return (fourth + fifth) * 0.5


def _robust_sigma(values: Any, xp: Any) -> float:
    """1.4826 x MAD of the finite entries; falls back to the mean absolute deviation, then to a tiny floor."""
    finite = values[xp.isfinite(values)]
    if finite.size == 0:
        return float("nan")
    centre = xp.median(finite)
    deviation = xp.abs(finite - centre)
    sigma = 1.4826 * float(xp.median(deviation))
    if not sigma > 0.0:
        sigma = 1.2533 * float(xp.mean(deviation))
    floor = float(xp.finfo(xp.float32).eps) * max(1.0, abs(float(centre)))
    return max(sigma, floor)


def _noise_step(shape: tuple[int, int]) -> int:
    """Stride of the noise subsample: at most :data:`_NOISE_SAMPLES_PER_PHASE` sites per phase."""
    height, width = shape
    quarter = max(1, (height // 2) * (width // 2))
    step = 1
    while quarter // (step * step) > _NOISE_SAMPLES_PER_PHASE:
        step += 1
    return step


def _joined_by_colour(by_colour: dict[str, list[Any]], xp: Any) -> list[Any]:
    """Each colour's residuals as one array (only a colour of several phases is joined: the
    selection kernel reads the others where they lie), in the order of ``by_colour``."""
    return [parts[0] if len(parts) == 1 else xp.concatenate(parts) for parts in by_colour.values()]


def _robust_sigmas_on_gpu(by_colour: dict[str, list[Any]], xp: Any, stats: Any = None) -> dict[str, float]:
    """:func:`_robust_sigma` of each colour's residuals, its two medians from one fused kernel
    (:func:`.gpu.fused_median_mad`, or its host copy ``stats`` when already computed); a colour
    whose MAD is 0 takes the xp function itself."""
    colours = list(by_colour)
    joined = _joined_by_colour(by_colour, xp)
    if stats is None:
        stats = _fused_gpu().fused_median_mad(joined, xp)
    if stats is None:  # rows the kernel does not take
        return {colour: _robust_sigma(values, xp) for colour, values in zip(colours, joined)}
    noise: dict[str, float] = {}
    for colour, values, (count, centre, mad) in zip(colours, joined, stats):
        if count == 0:
            noise[colour] = float("nan")
            continue
        sigma = 1.4826 * float(mad)
        if not sigma > 0.0:  # a flat colour plane: the mean-deviation fallback, as _robust_sigma
            noise[colour] = _robust_sigma(values, xp)
            continue
        floor = float(xp.finfo(xp.float32).eps) * max(1.0, abs(float(centre)))
        noise[colour] = max(sigma, floor)
    return noise


def _fused_correction(
    plane: Any, name: str, sigma: float, xp: Any, count_fixed: bool, deferred: list[Any] | None
) -> tuple[Any, int | None] | None:
    """:func:`correct_hot_pixels` in the CUDA kernels of :mod:`.gpu`; ``None`` where they decline.

    The colours' noise stays on the device (:func:`.gpu.fused_hot_pixel_noise`), so nothing
    waits for the device unless asked to: with ``deferred`` its int32 status goes there instead
    (non-zero: the result is not final; the caller repeats the frame without ``deferred``) and
    the count is ``None``. Otherwise the status is read back; a flat colour (status 2) has its
    noise computed on the host and the fix runs again.
    """
    gpu = _fused_gpu()
    height, width = plane.shape
    colours = [colour for colour in "RGB" if colour in name]
    # Each colour's phases side by side: its residuals are one array, without a copy to join them.
    groups = [[phase for phase in range(4) if name[phase] == colour] for colour in colours]
    parts = gpu.fused_hot_pixel_residuals(plane, _noise_step((int(height), int(width))), xp, groups)
    if parts is None:
        return None
    by_colour: dict[str, list[Any]] = {colour: [part] for colour, part in zip(colours, parts)}
    stats = gpu.fused_median_mad_on_device(_joined_by_colour(by_colour, xp), xp)
    if stats is None:
        return None
    table, status = gpu.fused_hot_pixel_noise(stats, [list(by_colour).index(colour) for colour in name], xp)
    corrected, fixed = gpu.fused_hot_pixel_fix(plane, table, sigma, ISOLATION_FRACTION, ISOLATION_FLOOR, xp,
                                              status=status)
    if deferred is not None:
        deferred.append(status)
        return corrected, None
    code = int(status.get()[0])
    if code == 1:  # a colour without a finite residual: nothing corrected
        return corrected, (0 if count_fixed else None)
    if code == 2:  # a flat colour: its noise is the host's mean-deviation fallback
        noise = _robust_sigmas_on_gpu(by_colour, xp, stats.get())
        corrected, fixed = gpu.fused_hot_pixel_fix(
            plane, [noise[colour] for colour in name], sigma, ISOLATION_FRACTION, ISOLATION_FLOOR, xp
        )
    return corrected, (int(fixed.get()[0]) if count_fixed else None)


def _residual_noise_by_colour(padded: Any, pad: int, shape: tuple[int, int], name: str, xp: Any) -> dict[str, float]:
    """Robust spread of ``value - median8_same_colour`` for each colour, from a strided subsample."""
    step = _noise_step(shape)
    residuals: dict[str, list[Any]] = {"R": [], "G": [], "B": []}
    for dy, dx in _PHASES:
        def at(oy: int, ox: int, dy: int = dy, dx: int = dx) -> Any:
            return _phase_view(padded, pad, shape, dy, dx, oy, ox)[::step, ::step]

        centre = at(0, 0)
        neighbours = [at(oy, ox) for oy, ox in _SAME_COLOUR_OFFSETS]
        residuals[name[2 * dy + dx]].append((centre - median_of_8(neighbours, xp)).ravel())
    return {colour: _robust_sigma(xp.concatenate(parts), xp) for colour, parts in residuals.items()}


def _phase_table(noise: dict[str, float], name: str, xp: Any) -> Any:
    """(2, 2) array of the per-colour noise laid out like the Bayer cell."""
    return xp.asarray([[noise[name[0]], noise[name[1]]], [noise[name[2]], noise[name[3]]]], dtype=xp.float32)


def correct_hot_pixels(
    cfa: Any, pattern: str, sigma: float, xp: Any, *, fused: bool = True, count_fixed: bool = True,
    deferred: list[Any] | None = None,
) -> tuple[Any, int | None]:
    """Replace isolated hot pixels of a (H, W) CFA plane by their same-colour neighbour median.

    Returns ``(corrected, n_fixed)``; ``corrected`` is a new float32 array (the input is
    not modified). See the module docstring for the detection rule.

    On the GPU (``fused``, the default) the three stages are three CUDA kernels
    (:func:`.gpu.fused_hot_pixel_residuals`, :func:`.gpu.fused_hot_pixel_fix`) that compute the
    same function to the bit; the per-colour noise is the same :func:`_robust_sigma` call.
    There the count is a copy from the device that waits for the kernels: with
    ``count_fixed=False`` it is not asked for and ``n_fixed`` is ``None``. Every other path
    returns the count whatever ``count_fixed`` says (it costs nothing more there).

    ``deferred`` (a list; used on the fused path only): nothing is waited for at all; a device
    int32 status is appended, and when it reads non-zero once the device got there, the result
    is not final and the call must be repeated without ``deferred`` (a colour plane without
    spread, whose noise the host computes). ``n_fixed`` is then ``None``.
    """
    _require_cfa(cfa)
    name = normalize_pattern(pattern)
    plane = xp.asarray(cfa, dtype=xp.float32)
    height, width = shape = (int(plane.shape[0]), int(plane.shape[1]))
    if height < 4 or width < 4:
        return plane.copy(), 0
    if fused and getattr(xp, "cuda", None) is not None:  # CuPy
        plane = xp.ascontiguousarray(plane)
        result = _fused_correction(plane, name, float(sigma), xp, count_fixed, deferred)
        if result is not None:
            return result
    corrected = plane.copy()
    pad = 2
    padded = xp.pad(plane, pad, mode="reflect")
    noise = _residual_noise_by_colour(padded, pad, shape, name, xp)
    if any(value != value for value in noise.values()):  # NaN: a colour plane has no finite pixel
        return corrected, 0
    noise_by_phase = _phase_table(noise, name, xp)

    # Stage 1, whole frame: excess over the darkest same-colour neighbour, in units of
    # that colour's noise. min8 <= median8, so "excess > sigma" is necessary for a hot pixel.
    # min8 = min(row above, row below, left, right); the 3-wide row minima are shared.
    # Buffers are reused in place (out=) to keep large temporaries few.
    row_min = xp.minimum(padded[:, :-4], padded[:, 2:-2])
    xp.minimum(row_min, padded[:, 4:], out=row_min)
    excess = xp.minimum(row_min[:height], row_min[4:])
    del row_min
    xp.minimum(excess, padded[pad:-pad, :width], out=excess)
    xp.minimum(excess, padded[pad:-pad, 4:], out=excess)
    xp.subtract(plane, excess, out=excess)
    for dy, dx in _PHASES:
        excess[dy::2, dx::2] *= 1.0 / noise[name[2 * dy + dx]]
    flat_hits = xp.flatnonzero(excess > float(sigma))
    if int(flat_hits.size) == 0:
        return corrected, 0
    ys, xs = flat_hits // width, flat_hits % width

    # Stage 2, candidates only: the exact same-colour median and z = residual / noise.
    padded_flat = padded.ravel()
    padded_width = width + 2 * pad
    flat = (ys + pad) * padded_width + (xs + pad)
    local_median = median_of_8(
        [xp.take(padded_flat, flat + oy * padded_width + ox) for oy, ox in _SAME_COLOUR_OFFSETS], xp
    )
    z = (xp.take(padded_flat, flat) - local_median) / noise_by_phase[ys % 2, xs % 2]
    outlier = z > float(sigma)
    ys, xs, z, local_median = ys[outlier], xs[outlier], z[outlier], local_median[outlier]
    if int(ys.size) == 0:
        return corrected, 0

    # Stage 3, isolation: the excess of the 8 immediate neighbours (any colour). Their
    # "excess over min8" is >= their z, so this errs on the side of keeping star pixels.
    excess_flat = excess.ravel()
    neighbour_excess = xp.stack(
        [
            xp.take(excess_flat, _reflect_index(ys + oy, height, xp) * width + _reflect_index(xs + ox, width, xp))
            for oy, ox in _IMMEDIATE_OFFSETS
        ]
    )
    # Second largest, not largest: one adjacent hot pixel must not shield another.
    support = xp.sort(neighbour_excess, axis=0)[-2]
    isolated = support < xp.maximum(ISOLATION_FRACTION * z, ISOLATION_FLOOR)
    ys, xs = ys[isolated], xs[isolated]
    corrected[ys, xs] = local_median[isolated]
    return corrected, int(ys.size)


def _fused_gpu() -> Any:
    from . import gpu

    return gpu


def _reflect_index(index: Any, size: int, xp: Any) -> Any:
    """Reflect out-of-range indices by one step (-1 -> 1, size -> size - 2), like ``pad(mode='reflect')``."""
    index = xp.where(index < 0, -index, index)
    return xp.where(index > size - 1, 2 * (size - 1) - index, index)

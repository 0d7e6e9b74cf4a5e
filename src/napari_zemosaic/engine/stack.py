"""Robust stacking of resampled frames: normalisation, weighting, rejection, combine.

One implementation for CPU and GPU: every kernel takes the array module ``xp`` (``numpy`` or
``cupy``) and uses only functions both provide (``sort``, ``argsort``, ``take_along_axis``,
``where``, reductions, ``nanmedian``). Nothing here imports SciPy or astropy.

Input of the stacking functions is a cube ``(N, C, h, w)`` float32 of N frames already
resampled to one pixel grid and photometrically normalised, NaN where a frame does not cover a
pixel. The sample of one (channel, pixel) is the N values along axis 0; rejection works on each
sample independently, so channels are rejected independently.

How the rejection kernels stay fast without per-pixel loops
------------------------------------------------------------
Kappa-sigma and winsorized clipping reject by value thresholds around a centre, so in a sorted
sample the kept values always form one contiguous index range ``[start, stop)``. Each sample is
sorted once (NaN last), prefix sums of the values and of their squares are built once (float64,
relative to a per-sample reference value so that large sky levels cost no precision), and from
then on every iteration only does O(log N) work per sample: the median is read at the middle of
the range, the mean and standard deviation come from two prefix-sum differences, and the new
range ends come from a vectorised binary search. Linear-fit clipping rejects relative to a line
through the ranks, which can leave holes in the sorted range, so it iterates on a kept mask over
the sorted sample instead and scatters the result back through the sort order.

Samples are processed in column chunks of at most 2²⁰ values on the CPU (2²⁴ on the GPU),
which bounds the temporaries whatever the cube size (see each function's docstring for its peak).

Semantics
---------
* ``kappa_sigma_mask`` is exactly ``astropy.stats.sigma_clip(cube, sigma_lower, sigma_upper,
  maxiters, cenfunc='median', stdfunc='std', axis=0).mask`` (population std, final mask = the
  values outside the bounds of the last iteration, non-finite values masked).
* ``winsorized_sigma_clip_mask`` follows Siril: per sample, σ is found by winsorising the kept
  values at median ± winsor_sigma·σ until σ changes by less than 0.05 %, with
  σ_w = c·std(winsorised) (sample std, c = 1.134 for winsor_sigma = 1.5: the factor that makes σ_w
  the Gaussian σ); values beyond median − κlow·σ_w / median + κhigh·σ_w are rejected; repeat.
* ``linear_fit_clip_mask`` follows Siril: sort the kept values, fit value = a + b·rank by least
  squares, σ = mean |residual|, reject residuals below −κlow·σ or above +κhigh·σ; repeat.
* Winsorized and linear-fit clipping never reject from a sample with fewer than 3 kept values,
  so cubes with N ≤ 2 keep every finite value (kappa-sigma matches astropy, which cannot reject
  from 1 or 2 values either for κ ≥ 1).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from ..config import ConfigError

Array = Any  # a numpy or cupy ndarray

REJECTION_ALGORITHMS = ("none", "kappa_sigma", "winsorized_sigma_clip", "linear_fit_clip")
COMBINE_METHODS = ("mean", "median")
WEIGHTING_METHODS = ("none", "noise_variance", "noise_fwhm")

MAD_TO_SIGMA = 1.4826
"""Scale from the median absolute deviation to the standard deviation of a Gaussian."""

_CHUNK_SAMPLES_CPU = 1 << 20
_CHUNK_SAMPLES_GPU = 1 << 24
"""Values (N × columns) processed together by the rejection kernels; bounds their temporaries.
On the CPU a chunk's tables stay cache-sized; on the GPU larger chunks mean fewer kernel launches."""
#: The fused rejection kernels take a cube's columns in about this many chunks (of at least
#: ``_CHUNK_SAMPLES_GPU`` values). Their workspace (a sorted float32 copy and two float64 prefix
#: tables, 20 bytes a value) then stays within 1.25 times the cube, which the strips Mosaic-First
#: plans count (``gpu.kernel_bytes_per_pixel``), in a few launches: a 500-frame strip of P5 was
#: cut into about 27 chunks of 2**24 values, each with its allocations and copies (one H100: P5
#: 0.60-0.62 s with a few chunks against 0.68 s).
_FUSED_CHUNK_SHARE = 4

_MIN_SAMPLES_TO_REJECT = 3
"""Winsorized and linear-fit clipping leave samples with fewer kept values alone."""

_WINSOR_MAX_ITERATIONS = 1000  # Siril's loop has no cap; tiny samples can converge slowly
_WINSOR_TOLERANCE = 5e-4  # relative change of σ that ends the winsorisation loop (Siril's)
_WINSOR_COLLAPSED = 1e-6  # σ below this fraction of |median| counts as 0 (settled)


# ------------------------------------------------------------------------------ parameters


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError("config_error_invalid_value", key=key, value=repr(value), allowed=", ".join(allowed))


def _check_positive(key: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ConfigError("config_error_invalid_value", key=key, value=repr(value), allowed="float > 0")


@dataclass(frozen=True)
class StackParams:
    """How a cube is stacked: rejection algorithm and thresholds, combine method, weighting."""

    rejection: str = "kappa_sigma"
    kappa_low: float = 3.0
    kappa_high: float = 3.0
    max_iterations: int = 5
    winsor_sigma: float = 1.5
    combine: str = "mean"
    weighting: str = "noise_variance"

    def __post_init__(self) -> None:
        _check_choice("stacking_rejection_algorithm", self.rejection, REJECTION_ALGORITHMS)
        _check_choice("stacking_final_combine", self.combine, COMBINE_METHODS)
        _check_choice("stacking_weighting_method", self.weighting, WEIGHTING_METHODS)
        _check_positive("stacking_kappa_low", self.kappa_low)
        _check_positive("stacking_kappa_high", self.kappa_high)
        _check_positive("stacking_winsor_sigma", self.winsor_sigma)
        iterations = self.max_iterations
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
            raise ConfigError(
                "config_error_invalid_value",
                key="stacking_max_iterations",
                value=repr(self.max_iterations),
                allowed="int >= 1",
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "StackParams":
        """The stacking parameters of a (validated) run config; missing keys take the defaults."""
        default = cls()
        return cls(
            rejection=str(config.get("stacking_rejection_algorithm", default.rejection)),
            kappa_low=float(config.get("stacking_kappa_low", default.kappa_low)),
            kappa_high=float(config.get("stacking_kappa_high", default.kappa_high)),
            max_iterations=int(config.get("stacking_max_iterations", default.max_iterations)),
            winsor_sigma=float(config.get("stacking_winsor_sigma", default.winsor_sigma)),
            combine=str(config.get("stacking_final_combine", default.combine)),
            weighting=str(config.get("stacking_weighting_method", default.weighting)),
        )


@dataclass
class StackResult:
    """A stacked block; all arrays live on the device of the input cube."""

    data: Array  # (C, h, w) float32, NaN where nothing was kept
    weight: Array  # (h, w) float32: sum of the weights of the kept samples, mean over channels (coverage)
    count: Array  # (h, w) float32: number of kept frames, mean over channels
    rejected: Array  # (h, w) float32: number of rejected finite samples, mean over channels


# ------------------------------------------------------------------------- sorted samples
#
# The per-column helpers below work on a subset of the columns of a chunk, given by ``cols``
# (int64 column ids), so that iterations only revisit the samples that still change.


def _as_columns(cube: Array) -> Array:
    """The cube as (N, P): one column per sample (channel, pixel). A view when the cube is contiguous."""
    return cube.reshape(cube.shape[0], -1)


def _column_chunks(n_rows: int, n_columns: int, xp: Any, samples: int = 0) -> Iterator[slice]:
    budget = samples or (_CHUNK_SAMPLES_CPU if xp is np else _CHUNK_SAMPLES_GPU)
    step = max(1, budget // max(n_rows, 1))
    for begin in range(0, n_columns, step):
        yield slice(begin, min(begin + step, n_columns))


def _sort_columns(columns: Array, xp: Any) -> Array:
    """Each column sorted ascending (NaN last), as a C-contiguous (N, P) array.

    Sorting the rows of a transposed copy is about twice as fast in numpy as sorting along
    axis 0 (contiguous SIMD sort) and is what cupy does internally anyway.
    """
    by_column = xp.ascontiguousarray(columns.T)
    by_column.sort(axis=-1)
    return xp.ascontiguousarray(by_column.T)


def _gather(table: Array, rows: Array, cols: Array) -> Array:
    """``table[rows[i], cols[i]]`` of a C-contiguous 2-D table (flat indexing: cheaper than
    ``take_along_axis``, which rebuilds its index grids on every call)."""
    return table.reshape(-1)[rows * table.shape[1] + cols]


def _first_failing(
    sorted_values: Array, bound: Any, start: Array, stop: Array, inclusive: bool, cols: Array, xp: Any
) -> Array:
    """Per column, the first index k in [start, stop] where ``value < bound`` (``<=`` if inclusive) is False.

    The predicate must be True then False along [start, stop) — true of sorted values with
    NaN last. A vectorised binary search by descending powers of two on flat indices
    (row·P + column): ⌊log2 N⌋ + 1 gathers, no pass over the whole sample.
    """
    n_rows, n_columns = sorted_values.shape
    flat = sorted_values.reshape(-1)
    position = start * n_columns + cols  # flat index of the first row not known to pass
    limit = stop * n_columns + cols
    last = flat.size - 1
    step = 1 << (max(n_rows, 1).bit_length() - 1)
    while step:
        candidate = position + step * n_columns
        value = flat[xp.minimum(candidate - n_columns, last)]
        passes = (value <= bound) if inclusive else (value < bound)
        position = xp.where(passes & (candidate <= limit), candidate, position)
        step >>= 1
    return position // n_columns


def _range_median(sorted_values: Array, start: Array, stop: Array, cols: Array, xp: Any) -> Array:
    """Median (float64) of the sorted values in [start, stop); NaN for an empty range."""
    count = stop - start
    last = sorted_values.shape[0] - 1
    below = _gather(sorted_values, xp.clip(start + (count - 1) // 2, 0, last), cols).astype(xp.float64)
    above = _gather(sorted_values, xp.clip(start + count // 2, 0, last), cols).astype(xp.float64)
    return xp.where(count > 0, 0.5 * (below + above), xp.nan)


@dataclass
class _SortedSamples:
    """Sorted columns of one chunk with the prefix sums that give any range's moments in O(1)."""

    values: Array  # (N, P) float32, each column ascending, NaN last
    reference: Array  # (P,) float64: a value inside each column's finite range (0 if none)
    prefix_sum: Array  # (N+1, P) float64: cumulative sum of (value − reference)
    prefix_sq: Array  # (N+1, P) float64: cumulative sum of (value − reference)²
    start: Array  # (P,) int64: first finite index
    stop: Array  # (P,) int64: one past the last finite index

    def range_sums(self, start: Array, stop: Array, cols: Array) -> tuple[Array, Array]:
        """Σ(v − reference) and Σ(v − reference)² over [start, stop) (start ≤ stop ≤ self.stop)."""
        total = _gather(self.prefix_sum, stop, cols) - _gather(self.prefix_sum, start, cols)
        total_sq = _gather(self.prefix_sq, stop, cols) - _gather(self.prefix_sq, start, cols)
        return total, total_sq


def _sorted_samples(columns: Array, xp: Any) -> _SortedSamples:
    values = _sort_columns(columns, xp)
    n_rows, n_columns = values.shape
    cols = xp.arange(n_columns)
    everything = xp.full(n_columns, n_rows, dtype=xp.int64)
    # −inf sorts first, then the finite values, then +inf, then NaN.
    start = _first_failing(values, -math.inf, xp.zeros(n_columns, dtype=xp.int64), everything, True, cols, xp)
    stop = _first_failing(values, math.inf, start, everything, False, cols, xp)
    middle = xp.clip((start + stop - 1) // 2, 0, n_rows - 1)
    reference = xp.where(stop > start, _gather(values, middle, cols), 0.0).astype(xp.float32)
    # NaN and +inf sort after ``stop`` and only spoil prefix entries past it, which are never
    # read; −inf sorts before ``start`` and would spoil every entry, so only then zero them.
    sanitise = bool(xp.any(start > 0))
    prefix_sum = xp.zeros((n_rows + 1, n_columns), dtype=xp.float64)
    prefix_sq = xp.zeros((n_rows + 1, n_columns), dtype=xp.float64)
    # A loop over the N rows of vector operations: numpy's cumsum along axis 0 is several times
    # slower, and this needs no full-size float64 temporary. Deviations from a value inside the
    # range are small, so float32 deviations summed in float64 keep the moments exact enough.
    for row in range(n_rows):
        deviation = values[row] - reference
        if sanitise:
            deviation = xp.where(xp.isfinite(deviation), deviation, 0.0).astype(xp.float32, copy=False)
        xp.add(prefix_sum[row], deviation, out=prefix_sum[row + 1])
        deviation *= deviation
        xp.add(prefix_sq[row], deviation, out=prefix_sq[row + 1])
    return _SortedSamples(values, reference.astype(xp.float64), prefix_sum, prefix_sq, start, stop)


def _std_from_sums(count: Array, total: Array, total_sq: Array, ddof: int, xp: Any) -> Array:
    """Standard deviation from n, Σd and Σd² (d = value − reference); 0 where n ≤ ddof."""
    n = count.astype(xp.float64)
    squares = xp.maximum(total_sq - total * total / xp.maximum(n, 1.0), 0.0)
    return xp.where(n > ddof, xp.sqrt(squares / xp.maximum(n - ddof, 1.0)), 0.0)


def _iterations(max_iterations: int | None, n_rows: int) -> int:
    # Every iteration that changes something removes a value, so N + 1 iterations reach convergence.
    return n_rows + 1 if max_iterations is None else int(max_iterations)


# ------------------------------------------------------------------------------ rejection


def kappa_sigma_mask(
    cube: Array, kappa_low: float, kappa_high: float, max_iterations: int | None, xp: Any = np, *, fused: bool = True
) -> Array:
    """Kappa-sigma rejection along axis 0; True = rejected (non-finite values are always True).

    Equal to ``astropy.stats.sigma_clip(cube, sigma_lower=kappa_low, sigma_upper=kappa_high,
    maxiters=max_iterations, cenfunc='median', stdfunc='std', axis=0).mask``: per sample, centre =
    median and σ = population std of the kept values, kept = values within [centre − κlow·σ,
    centre + κhigh·σ], until nothing changes or ``max_iterations`` (None: until convergence);
    the final mask rejects every value outside the last bounds.

    Peak temporaries per chunk of S ≤ 2²⁰ values (2²⁴ on the GPU): two float32 sorted copies
    (during the sort) and two float64 prefix-sum tables, ≈ 6·S float32-equivalents (~25 MB on
    the CPU), plus the bool mask of the whole cube (1 byte per value).

    On the GPU (``fused``, the default) the sort, the prefix sums and the iteration of each chunk
    are two CUDA kernels (:func:`.gpu.fused_kappa_sigma_bounds`) that compute the same bounds
    to the bit; ``fused=False`` forces the xp path (the parity tests compare both).
    """
    n_rows = cube.shape[0]
    iterations = _iterations(max_iterations, n_rows)
    if n_rows == 0 or cube.size == 0 or iterations < 1:
        return ~xp.isfinite(cube)
    columns = _as_columns(cube)
    mask = xp.empty(columns.shape, dtype=bool)
    for chunk in _column_chunks(n_rows, columns.shape[1], xp):
        values = columns[:, chunk]
        bounds = _fused_kappa_sigma(values, kappa_low, kappa_high, iterations, xp) if fused else None
        if bounds is None:
            bounds = _kappa_sigma_bounds(_sorted_samples(values, xp), kappa_low, kappa_high, iterations, xp)
        lower, upper = bounds
        # float32 values against float64 bounds compare in float64, as astropy does.
        mask[:, chunk] = ~((values >= lower) & (values <= upper))
    return mask.reshape(cube.shape)


def _fused_kappa_sigma(
    values: Array, kappa_low: float, kappa_high: float, iterations: int, xp: Any
) -> tuple[Array, Array] | None:
    """The GPU's fused bounds of one chunk, or None (NumPy, or a shape the kernel does not cover)."""
    if xp is np:
        return None
    from .gpu import fused_kappa_sigma_bounds

    return fused_kappa_sigma_bounds(values, kappa_low, kappa_high, iterations, xp)


def _kappa_sigma_bounds(
    samples: _SortedSamples, kappa_low: float, kappa_high: float, iterations: int, xp: Any
) -> tuple[Array, Array]:
    """Final (lower, upper) bounds of every column; each iteration only revisits changed columns."""
    values = samples.values
    lower = xp.full(samples.start.shape, xp.nan)
    upper = xp.full(samples.start.shape, xp.nan)
    cols = xp.nonzero(samples.stop > samples.start)[0]  # all-NaN columns keep NaN bounds: all rejected
    start, stop = samples.start[cols], samples.stop[cols]
    for _ in range(iterations):
        centre = _range_median(values, start, stop, cols, xp)
        total, total_sq = samples.range_sums(start, stop, cols)
        sigma = _std_from_sums(stop - start, total, total_sq, 0, xp)
        column_lower = centre - kappa_low * sigma
        column_upper = centre + kappa_high * sigma
        lower[cols] = column_lower
        upper[cols] = column_upper
        new_start = _first_failing(values, column_lower, start, stop, False, cols, xp)
        new_stop = _first_failing(values, column_upper, new_start, stop, True, cols, xp)
        # A column whose range did not change would get the same bounds again: it is done. One
        # whose range emptied keeps the bounds that emptied it, as astropy does.
        moving = ((new_start != start) | (new_stop != stop)) & (new_stop > new_start)
        cols, start, stop = cols[moving], new_start[moving], new_stop[moving]
        if cols.size == 0:
            break
    return lower, upper


def winsorized_consistency_factor(winsor_sigma: float) -> float:
    """c such that c·std of a Gaussian winsorised at ±winsor_sigma·σ is σ (1.134 at 1.5)."""
    z = float(winsor_sigma)
    density = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    variance = (1.0 - 2.0 * tail) - 2.0 * z * density + 2.0 * z * z * tail
    return 1.0 / math.sqrt(variance)


def winsorized_sigma_clip_mask(
    cube: Array,
    kappa_low: float,
    kappa_high: float,
    max_iterations: int | None,
    winsor_sigma: float,
    xp: Any = np,
    *,
    fused: bool = True,
) -> Array:
    """Winsorized sigma clipping (Siril-style) along axis 0; True = rejected.

    Per sample: median m of the kept values; σ starts as their sample std and is iterated as
    σ ← c·std(kept values winsorised at m ± winsor_sigma·σ) (sample std; c from
    :func:`winsorized_consistency_factor`, 1.134 at 1.5) until it changes by less than 0.05 %;
    then values below m − κlow·σ or above m + κhigh·σ are rejected. Repeated up to
    ``max_iterations`` times or until nothing changes. Samples with fewer than 3 kept values are
    not clipped. Rejected values stay rejected.

    Each winsorised std comes from the prefix sums (the clamped ends counted in closed form),
    so every step costs O(log N) per sample. Peak temporaries as :func:`kappa_sigma_mask`.

    On the GPU (``fused``, the default) each chunk is the shared sort kernel and one kernel for
    the whole iteration (:func:`.gpu.fused_winsorized_range_values`), same mask to the bit;
    ``fused=False`` forces the xp path (the parity tests compare both).
    """
    n_rows = cube.shape[0]
    iterations = _iterations(max_iterations, n_rows)
    if n_rows == 0 or cube.size == 0 or iterations < 1:
        return ~xp.isfinite(cube)
    columns = _as_columns(cube)
    mask = xp.empty(columns.shape, dtype=bool)
    for chunk in _column_chunks(n_rows, columns.shape[1], xp):
        values = columns[:, chunk]
        kept = _fused_winsorized(values, kappa_low, kappa_high, iterations, winsor_sigma, xp) if fused else None
        if kept is None:
            samples = _sorted_samples(values, xp)
            start, stop = _winsorized_range(samples, kappa_low, kappa_high, iterations, winsor_sigma, xp)
            mask[:, chunk] = _outside_range(values, samples.values, start, stop, xp)
        else:
            lowest, highest = kept
            mask[:, chunk] = ~((values >= lowest) & (values <= highest))
    return mask.reshape(cube.shape)


def _fused_winsorized(
    values: Array, kappa_low: float, kappa_high: float, iterations: int, winsor_sigma: float, xp: Any
) -> tuple[Array, Array] | None:
    """The GPU's fused kept-value range of one chunk, or None (NumPy, or a shape it does not cover)."""
    if xp is np:
        return None
    from .gpu import fused_winsorized_range_values

    return fused_winsorized_range_values(values, kappa_low, kappa_high, iterations, winsor_sigma, xp)


def _outside_range(values: Array, sorted_values: Array, start: Array, stop: Array, xp: Any) -> Array:
    """Mask of the values outside the sorted index range [start, stop) of their column.

    Rejection by thresholds leaves a strict value gap at both ends of the kept range, so the
    kept values are exactly those between the range's first and last value.
    """
    cols = xp.arange(start.shape[0])
    last = sorted_values.shape[0] - 1
    lowest = _gather(sorted_values, xp.clip(start, 0, last), cols)
    highest = _gather(sorted_values, xp.clip(stop - 1, 0, last), cols)
    empty = stop <= start
    lowest = xp.where(empty, xp.inf, lowest)
    highest = xp.where(empty, -xp.inf, highest)
    return ~((values >= lowest) & (values <= highest))


def _winsorized_range(
    samples: _SortedSamples, kappa_low: float, kappa_high: float, iterations: int, winsor_sigma: float, xp: Any
) -> tuple[Array, Array]:
    """Final kept range [start, stop) of every column."""
    values = samples.values
    final_start, final_stop = samples.start.copy(), samples.stop.copy()
    cols = xp.nonzero(samples.stop - samples.start >= _MIN_SAMPLES_TO_REJECT)[0]
    start, stop = samples.start[cols], samples.stop[cols]
    for _ in range(iterations):
        centre = _range_median(values, start, stop, cols, xp)
        total, total_sq = samples.range_sums(start, stop, cols)
        sigma = _std_from_sums(stop - start, total, total_sq, 1, xp)
        sigma = _winsorized_sigma(samples, start, stop, centre, sigma, cols, winsor_sigma, xp)
        new_start = _first_failing(values, centre - kappa_low * sigma, start, stop, False, cols, xp)
        new_stop = _first_failing(values, centre + kappa_high * sigma, new_start, stop, True, cols, xp)
        final_start[cols] = new_start
        final_stop[cols] = new_stop
        moving = ((new_start != start) | (new_stop != stop)) & (new_stop - new_start >= _MIN_SAMPLES_TO_REJECT)
        cols, start, stop = cols[moving], new_start[moving], new_stop[moving]
        if cols.size == 0:
            break
    return final_start, final_stop


def _winsorized_sigma(
    samples: _SortedSamples,
    start: Array,
    stop: Array,
    centre: Array,
    sigma: Array,
    cols: Array,
    winsor_sigma: float,
    xp: Any,
) -> Array:
    """Siril's loop σ ← c·std(values of [start, stop) clamped to centre ± winsor_sigma·σ).

    Starts from the given σ (the plain sample std) and ends, per column, when σ changes by at
    most 0.05 %, or when σ has collapsed below 1e-6·|centre| (more than half the values equal,
    e.g. saturated: σ then shrinks geometrically and would never settle). Only the columns still
    changing are evaluated, so the few slow ones cost little.
    """
    factor = winsorized_consistency_factor(winsor_sigma)
    result = sigma.copy()
    todo = xp.arange(sigma.shape[0])
    current = sigma
    for _ in range(_WINSOR_MAX_ITERATIONS):
        image = factor * _winsorized_std(
            samples, start[todo], stop[todo], centre[todo], current, cols[todo], winsor_sigma, xp
        )
        result[todo] = image
        unsettled = xp.abs(image - current) > _WINSOR_TOLERANCE * current
        unsettled &= image > _WINSOR_COLLAPSED * xp.abs(centre[todo])
        todo, current = todo[unsettled], image[unsettled]
        if todo.size == 0:
            break
    return result


def _winsorized_std(
    samples: _SortedSamples, start: Array, stop: Array, centre: Array, sigma: Array, cols: Array,
    winsor_sigma: float, xp: Any,
) -> Array:
    """Sample std of the values of [start, stop) clamped to centre ± winsor_sigma·σ."""
    values = samples.values
    clamp_low = centre - winsor_sigma * sigma
    clamp_high = centre + winsor_sigma * sigma
    first_inside = _first_failing(values, clamp_low, start, stop, False, cols, xp)
    first_above = _first_failing(values, clamp_high, first_inside, stop, True, cols, xp)
    n_low = (first_inside - start).astype(xp.float64)
    n_high = (stop - first_above).astype(xp.float64)
    reference = samples.reference[cols]
    low_deviation = clamp_low - reference
    high_deviation = clamp_high - reference
    inner_sum, inner_sq = samples.range_sums(first_inside, first_above, cols)
    total = n_low * low_deviation + inner_sum + n_high * high_deviation
    total_sq = n_low * low_deviation**2 + inner_sq + n_high * high_deviation**2
    return _std_from_sums(stop - start, total, total_sq, 1, xp)


def linear_fit_clip_mask(
    cube: Array, kappa_low: float, kappa_high: float, max_iterations: int | None, xp: Any = np
) -> Array:
    """Linear-fit clipping (Siril-style) along axis 0; True = rejected.

    Per sample: sort the kept values, fit value = a + b·rank (rank 0..n−1 among the kept values,
    least squares), σ = mean |residual|, reject values whose residual is below −κlow·σ or above
    +κhigh·σ; repeat up to ``max_iterations`` times or until nothing changes. Samples with
    fewer than 3 kept values are not clipped. Rejected values stay rejected.

    Works on one row per sample (the transposed chunk); after the first iteration only the
    samples that just lost a value are refitted. Peak temporaries per chunk of S ≤ 2²⁰ values
    (2²⁴ on the GPU): the int64 sort order (2·S float32-equivalents), the sorted values,
    deviations, ranks and residuals (S each) and two bool masks, ≈ 7·S.
    """
    n_rows = cube.shape[0]
    iterations = _iterations(max_iterations, n_rows)
    if n_rows == 0 or cube.size == 0 or iterations < 1:
        return ~xp.isfinite(cube)
    columns = _as_columns(cube)
    mask = xp.empty(columns.shape, dtype=bool)
    for chunk in _column_chunks(n_rows, columns.shape[1], xp):
        samples = xp.ascontiguousarray(columns[:, chunk].T)  # (P, N): one row per sample
        order = xp.argsort(samples, axis=-1)
        samples.sort(axis=-1)  # equals samples[order] value for value (ties are equal values)
        kept = _linear_fit_kept(samples, kappa_low, kappa_high, iterations, xp)
        del samples
        rejected = xp.empty(kept.shape, dtype=bool)
        row_offsets = (xp.arange(kept.shape[0]) * n_rows)[:, None]
        rejected.reshape(-1)[(order + row_offsets).reshape(-1)] = ~kept.reshape(-1)  # back to frame order
        mask[:, chunk] = rejected.T
    return mask.reshape(cube.shape)


def _linear_fit_kept(sorted_rows: Array, kappa_low: float, kappa_high: float, iterations: int, xp: Any) -> Array:
    """Kept flags (P, N) of linear-fit clipping on rows sorted ascending (NaN last)."""
    kept = xp.isfinite(sorted_rows)
    count = kept.sum(axis=-1)
    # Deviations from each row's middle finite value keep the float32 work arrays precise.
    first_finite = (sorted_rows == -xp.inf).sum(axis=-1)
    middle = xp.clip(first_finite + (count - 1) // 2, 0, sorted_rows.shape[1] - 1)
    reference = xp.take_along_axis(sorted_rows, middle[:, None], axis=-1)
    deviation = xp.where(kept, sorted_rows - reference, 0.0).astype(xp.float32, copy=False)
    rows = xp.nonzero(count >= _MIN_SAMPLES_TO_REJECT)[0]
    row_kept, row_deviation = kept[rows], deviation[rows]
    for _ in range(iterations):
        reject = _linear_fit_rejects(row_kept, row_deviation, kappa_low, kappa_high, xp)
        changed = reject.any(axis=-1)
        rows, row_kept, row_deviation = rows[changed], row_kept[changed], row_deviation[changed]
        if rows.size == 0:
            break
        row_kept &= ~reject[changed]
        row_deviation *= row_kept
        kept[rows] = row_kept
        keep_going = row_kept.sum(axis=-1) >= _MIN_SAMPLES_TO_REJECT
        rows, row_kept, row_deviation = rows[keep_going], row_kept[keep_going], row_deviation[keep_going]
    return kept


def _linear_fit_rejects(kept: Array, deviation: Array, kappa_low: float, kappa_high: float, xp: Any) -> Array:
    """One linear-fit clipping pass over rows (sorted, deviation 0 where not kept): the rejects."""
    count = kept.sum(axis=-1).astype(xp.float64)
    rank = xp.cumsum(kept, axis=-1, dtype=xp.int32).astype(xp.float32)  # int cumsum: far faster in numpy
    rank -= 1.0  # rank among the kept values; unused where not kept
    sum_y = deviation.sum(axis=-1, dtype=xp.float64)
    sum_ry = (rank * deviation).sum(axis=-1, dtype=xp.float64)
    # Ranks are 0..n−1, so their sums are closed forms.
    sum_r = count * (count - 1.0) / 2.0
    sum_rr = (count - 1.0) * count * (2.0 * count - 1.0) / 6.0
    denominator = count * sum_rr - sum_r * sum_r
    has_line = denominator > 0
    slope = xp.where(has_line, (count * sum_ry - sum_r * sum_y) / xp.where(has_line, denominator, 1.0), 0.0)
    intercept = xp.where(count > 0, (sum_y - slope * sum_r) / xp.maximum(count, 1.0), 0.0)
    residual = rank
    residual *= -slope.astype(xp.float32)[:, None]
    residual -= intercept.astype(xp.float32)[:, None]
    residual += deviation  # deviation − (intercept + slope·rank)
    residual *= kept  # 0 where not kept (never rejected again)
    sigma = xp.abs(residual).sum(axis=-1, dtype=xp.float64) / xp.maximum(count, 1.0)
    eligible = (count >= _MIN_SAMPLES_TO_REJECT) & (sigma > 0)
    low = xp.where(eligible, -kappa_low * sigma, -xp.inf).astype(xp.float32)[:, None]
    high = xp.where(eligible, kappa_high * sigma, xp.inf).astype(xp.float32)[:, None]
    reject = residual < low
    reject |= residual > high
    return reject


def rejection_mask(cube: Array, params: StackParams, xp: Any = np) -> Array:
    """The rejection mask (True = rejected or non-finite) of ``params.rejection`` along axis 0."""
    if params.rejection == "kappa_sigma":
        return kappa_sigma_mask(cube, params.kappa_low, params.kappa_high, params.max_iterations, xp)
    if params.rejection == "winsorized_sigma_clip":
        return winsorized_sigma_clip_mask(
            cube, params.kappa_low, params.kappa_high, params.max_iterations, params.winsor_sigma, xp
        )
    if params.rejection == "linear_fit_clip":
        return linear_fit_clip_mask(cube, params.kappa_low, params.kappa_high, params.max_iterations, xp)
    return ~xp.isfinite(cube)


def _fused_rejection_bounds(cube: Array, params: StackParams, xp: Any) -> tuple[Array, Array] | None:
    """The kept range of every column as float64 (lower, upper), from the GPU's fused rejection
    kernels (kappa-sigma bounds; the winsorized lowest and highest kept values, exact in float64),
    so that the mask of :func:`rejection_mask` is ``~((value >= lower) & (value <= upper))``.
    ``None`` for NumPy, for the other rejections and for columns the kernels do not take."""
    if xp is np or params.rejection not in ("kappa_sigma", "winsorized_sigma_clip"):
        return None
    n_rows = cube.shape[0]
    iterations = _iterations(params.max_iterations, n_rows)
    if n_rows == 0 or cube.size == 0 or iterations < 1:
        return None
    columns = _as_columns(cube)
    lower = xp.empty(columns.shape[1], dtype=xp.float64)
    upper = xp.empty(columns.shape[1], dtype=xp.float64)
    for chunk in _column_chunks(n_rows, columns.shape[1], xp, max(_CHUNK_SAMPLES_GPU, columns.size // _FUSED_CHUNK_SHARE)):
        values = columns[:, chunk]
        if params.rejection == "kappa_sigma":
            bounds = _fused_kappa_sigma(values, params.kappa_low, params.kappa_high, iterations, xp)
        else:
            bounds = _fused_winsorized(values, params.kappa_low, params.kappa_high, iterations, params.winsor_sigma, xp)
        if bounds is None:
            return None
        lower[chunk], upper[chunk] = bounds
    return lower, upper


def _fused_stack(
    cube: Array, params: StackParams, frame_weights: Array | None, xp: Any
) -> tuple[Array, Array, Array, Array] | None:
    """:func:`stack_cube`'s (data, weight, count, rejected) from the GPU's fused kernels when its
    rejection keeps a range per column and it combines by the mean: the bounds, then one pass
    for the sums (:func:`.gpu.fused_combine_within_bounds`) instead of the mask and ~20 passes
    over the cube. The same numbers as the xp path; ``None`` where it does not apply."""
    if xp is np or params.combine != "mean" or cube.ndim != 4 or not cube.flags.c_contiguous:
        return None
    bounds = None
    if params.rejection != "none":
        bounds = _fused_rejection_bounds(cube, params, xp)
        if bounds is None:
            return None
    from .gpu import fused_combine_within_bounds

    return fused_combine_within_bounds(cube, bounds, frame_weights, xp)


# -------------------------------------------------------------------------------- combine


def _nanmedian_axis0(values: Array, xp: Any) -> Array:
    """Median along axis 0 ignoring NaN (NaN where none): one sort and two gathers.

    numpy's nanmedian along a short axis goes through masked arrays and is ~10× slower.
    """
    shape = values.shape[1:]
    columns = _as_columns(values)
    if columns.shape[0] == 0:
        return xp.full(shape, xp.nan, dtype=xp.float32)
    ordered = _sort_columns(columns, xp)
    count = xp.isfinite(ordered).sum(axis=0)
    start = xp.zeros(count.shape, dtype=xp.int64)
    cols = xp.arange(count.shape[0])
    return _range_median(ordered, start, start + count, cols, xp).astype(xp.float32).reshape(shape)


def _channel_weights(weights: Array | None, channel: int, n_frames: int, xp: Any) -> Array:
    """Weights of one channel, broadcastable against (N, h, w)."""
    if weights is None:
        return xp.ones((n_frames, 1, 1), dtype=xp.float32)
    weights = xp.asarray(weights, dtype=xp.float32)
    if weights.ndim == 1:
        return weights[:, None, None]
    if weights.ndim == 4:
        return weights[:, channel]
    return weights  # (N, h, w): per-pixel weights shared by the channels


def combine(
    cube: Array, mask: Array | None, weights: Array | None, method: str, xp: Any = np
) -> tuple[Array, Array, Array]:
    """Combine the kept samples of a (N, C, h, w) cube → (data (C,h,w), weight_sum (h,w), count (h,w)).

    Kept = finite, not masked (``mask`` True = rejected; None = keep every finite value) and of
    positive weight. ``weights``: None (all 1), (N,), (N, h, w) or (N, C, h, w). ``method``:
    "mean" = weighted mean; "median" = unweighted median of the kept values. ``weight_sum`` and
    ``count`` are the sums of weights and the numbers of kept samples, averaged over channels.
    Pixels with nothing kept are NaN with weight 0 and count 0. Accumulation in float64.

    Peak temporaries: per channel two float32 (N, h, w) arrays and one bool (N, h, w); the
    median sorts one more float32 copy.
    """
    if method not in COMBINE_METHODS:
        raise ConfigError("config_error_invalid_value", key="stacking_final_combine", value=repr(method),
                          allowed=", ".join(COMBINE_METHODS))
    n_frames, n_channels, height, width = cube.shape
    data = xp.empty((n_channels, height, width), dtype=xp.float32)
    weight_total = xp.zeros((height, width), dtype=xp.float64)
    count_total = xp.zeros((height, width), dtype=xp.float64)
    for channel in range(n_channels):
        values = cube[:, channel]
        keep = xp.isfinite(values)
        if mask is not None:
            keep &= ~mask[:, channel]
        channel_weights = _channel_weights(weights, channel, n_frames, xp)
        keep &= channel_weights > 0  # also drops NaN weights
        kept_weights = xp.where(keep, channel_weights, 0.0).astype(xp.float32, copy=False)
        weight_sum = kept_weights.sum(axis=0, dtype=xp.float64)
        count_total += keep.sum(axis=0)
        weight_total += weight_sum
        if method == "mean":
            weighted = xp.where(keep, values, 0.0).astype(xp.float32, copy=False)
            weighted *= kept_weights
            del kept_weights
            value_sum = weighted.sum(axis=0, dtype=xp.float64)
            del weighted
            has_weight = weight_sum > 0
            mean = value_sum / xp.where(has_weight, weight_sum, 1.0)
            data[channel] = xp.where(has_weight, mean, xp.nan)
        else:
            del kept_weights
            data[channel] = _nanmedian_axis0(xp.where(keep, values, xp.nan), xp)
    n = max(n_channels, 1)
    return data, (weight_total / n).astype(xp.float32), (count_total / n).astype(xp.float32)


def stack_cube(
    cube: Array,
    params: StackParams = StackParams(),
    weights: Array | None = None,
    pixel_weights: Array | None = None,
    xp: Any = np,
) -> StackResult:
    """Reject (per channel) and combine a (N, C, h, w) cube of normalised frames.

    ``weights`` (N,) are per-frame weights (e.g. :func:`noise_weights`), ignored when
    ``params.weighting == "none"``; ``pixel_weights`` (N, h, w) (e.g. footprints) always
    multiply them. Peak memory: the rejection mask (1 byte per value) plus the larger of the
    rejection and combine temporaries (see :func:`kappa_sigma_mask`, :func:`combine`).
    """
    if cube.ndim != 4:
        raise ValueError(f"stack_cube needs a (N, C, h, w) cube, got shape {cube.shape}")
    n_frames, n_channels, height, width = cube.shape
    frame_weights = None
    if weights is not None and params.weighting != "none":
        frame_weights = xp.asarray(weights, dtype=xp.float32).reshape(n_frames)
    combined_weights = frame_weights
    if pixel_weights is not None:
        pixel = xp.asarray(pixel_weights, dtype=xp.float32)
        combined_weights = pixel if frame_weights is None else pixel * frame_weights[:, None, None]
    fused = _fused_stack(cube, params, frame_weights, xp) if pixel_weights is None else None
    if fused is not None:
        data, weight, count, rejected = fused
        return StackResult(data=data, weight=weight, count=count, rejected=rejected)
    mask = rejection_mask(cube, params, xp)
    data, weight, count = combine(cube, mask, combined_weights, params.combine, xp)
    rejected = xp.zeros((height, width), dtype=xp.float64)
    for channel in range(n_channels):
        rejected += (mask[:, channel] & xp.isfinite(cube[:, channel])).sum(axis=0)
    rejected = (rejected / max(n_channels, 1)).astype(xp.float32)
    return StackResult(data=data, weight=weight, count=count, rejected=rejected)


# ------------------------------------------------------------------ weights and statistics


def robust_sigma(values: Array, xp: Any = np, axis: int | tuple[int, ...] | None = None) -> Array:
    """1.4826 × median absolute deviation from the median, ignoring NaN (NaN where none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        centre = xp.nanmedian(values, axis=axis, keepdims=True)
        return MAD_TO_SIGMA * xp.nanmedian(xp.abs(values - centre), axis=axis)


def noise_weights(noise_sigma: Array, xp: Any = np) -> Array:
    """Per-frame weights 1/σ² normalised to mean 1 over the frames with a valid σ (finite, > 0).

    Frames without a valid σ get weight 0; if no frame has one, all weights are 1.
    """
    sigma = xp.asarray(noise_sigma, dtype=xp.float64)
    valid = xp.isfinite(sigma) & (sigma > 0)
    inverse_variance = xp.where(valid, 1.0 / xp.where(valid, sigma, 1.0) ** 2, 0.0)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return xp.ones(sigma.shape, dtype=xp.float64)
    return inverse_variance * (n_valid / inverse_variance.sum())


def _least_squares_line(x: Array, y: Array, kept: Array, xp: Any) -> tuple[Array, Array, Array]:
    """Gain, offset of y ≈ gain·x + offset over the kept points (last axis), and where it is defined."""
    n = kept.sum(axis=-1).astype(xp.float64)
    safe_n = xp.maximum(n, 1.0)
    mean_x = xp.where(kept, x, 0.0).sum(axis=-1) / safe_n
    mean_y = xp.where(kept, y, 0.0).sum(axis=-1) / safe_n
    dx = xp.where(kept, x - mean_x[..., None], 0.0)
    dy = xp.where(kept, y - mean_y[..., None], 0.0)
    sxx = (dx * dx).sum(axis=-1)
    sxy = (dx * dy).sum(axis=-1)
    defined = (n >= 2) & (sxx > 0)
    gain = sxy / xp.where(defined, sxx, 1.0)
    return gain, mean_y - gain * mean_x, defined


def _resistant_line(x: Array, y: Array, valid: Array, xp: Any) -> tuple[Array, Array]:
    """Tukey's resistant line: slope between the medians of the lowest and highest thirds in x.

    Insensitive to a minority of outliers, it seeds the clipping of :func:`robust_linear_fit`.
    Without any spread in x the gain is 1 and the offset the median of y − x.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty groups
        ordered = xp.sort(xp.where(valid, x, xp.nan), axis=-1)
        n = valid.sum(axis=-1)
        last = max(x.shape[-1] - 1, 0)
        third = (n - 1) // 3
        low_cut = xp.take_along_axis(ordered, xp.clip(third, 0, last)[..., None], axis=-1)
        high_cut = xp.take_along_axis(ordered, xp.clip(n - 1 - third, 0, last)[..., None], axis=-1)
        left = valid & (x <= low_cut)
        right = valid & (x >= high_cut)
        x_left = xp.nanmedian(xp.where(left, x, xp.nan), axis=-1)
        x_right = xp.nanmedian(xp.where(right, x, xp.nan), axis=-1)
        y_left = xp.nanmedian(xp.where(left, y, xp.nan), axis=-1)
        y_right = xp.nanmedian(xp.where(right, y, xp.nan), axis=-1)
        spread = x_right - x_left
        has_spread = spread > 0
        gain = xp.where(has_spread, (y_right - y_left) / xp.where(has_spread, spread, 1.0), 1.0)
        offset = xp.nanmedian(xp.where(valid, y - gain[..., None] * x, xp.nan), axis=-1)
    return gain, xp.where(n > 0, offset, 0.0)


def robust_linear_fit(
    x: Array, y: Array, xp: Any = np, kappa: float = 3.0, iterations: int = 5
) -> tuple[Array, Array]:
    """Fit y ≈ gain·x + offset along the last axis, robust to outliers; NaN pairs are ignored.

    Seeded by Tukey's resistant line, then ``iterations`` rounds of: residual scale =
    1.4826·MAD of all valid residuals, keep |residual − median| ≤ kappa·scale, least squares on
    the kept points. Leading axes are independent fits (e.g. frames × channels); a 1-D input
    gives 0-d arrays. With no spread in x, gain = 1 and offset = median(y − x).
    """
    x = xp.asarray(x, dtype=xp.float64)
    y = xp.asarray(y, dtype=xp.float64)
    x, y = xp.broadcast_arrays(x, y)
    valid = xp.isfinite(x) & xp.isfinite(y)
    gain, offset = _resistant_line(x, y, valid, xp)
    kept = valid
    for _ in range(iterations):
        residual = xp.where(valid, y - (gain[..., None] * x + offset[..., None]), xp.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            centre = xp.nanmedian(residual, axis=-1, keepdims=True)
            scale = MAD_TO_SIGMA * xp.nanmedian(xp.abs(residual - centre), axis=-1, keepdims=True)
        new_kept = valid & (xp.abs(residual - centre) <= kappa * scale)
        new_gain, new_offset, defined = _least_squares_line(x, y, new_kept, xp)
        gain = xp.where(defined, new_gain, gain)
        offset = xp.where(defined, new_offset, offset)
        if bool(xp.all(new_kept == kept)):
            break
        kept = new_kept
    return gain, offset


# ----------------------------------------------------------------------- normalisation


def sky_level(images: Array, xp: Any = np) -> Array:
    """Sky background of images (..., C, H, W) → (..., C): the median of each plane, ignoring NaN.

    Smart-telescope frames are dominated by sky, so the plain median is a stable estimate.
    """
    planes = images.reshape(images.shape[:-2] + (-1,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return xp.nanmedian(planes, axis=-1)


def sky_offsets(sky_levels: Array, xp: Any = np, reference: Array | None = None) -> Array:
    """Offsets (N, C) that bring every frame's sky level (N, C) to ``reference`` (C,).

    ``reference`` defaults to the median sky level over the frames. Use with gains of 1 in
    :func:`apply_normalisation` ("sky_mean" normalisation).
    """
    levels = xp.asarray(sky_levels, dtype=xp.float64)
    if reference is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reference = xp.nanmedian(levels, axis=0)
    offsets = xp.asarray(reference, dtype=xp.float64) - levels
    return xp.where(xp.isfinite(offsets), offsets, 0.0)


def apply_normalisation(cube: Array, gains: Array | None, offsets: Array | None, xp: Any = np) -> Array:
    """Normalise a (N, C, h, w) cube in place, x' = gain·x + offset, and return it.

    ``gains`` and ``offsets`` are (N, C) or (N,) (None: 1 and 0). NaN stays NaN. No temporaries
    beyond the (N, C) factors.
    """
    for factors, operation in ((gains, "multiply"), (offsets, "add")):
        if factors is None:
            continue
        factors = xp.asarray(factors, dtype=cube.dtype)
        if factors.ndim == 1:
            factors = factors[:, None]
        factors = factors.reshape(factors.shape + (1,) * (cube.ndim - 2))
        if operation == "multiply":
            cube *= factors
        else:
            cube += factors
    return cube

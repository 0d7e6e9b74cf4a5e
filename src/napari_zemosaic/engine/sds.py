"""ZeSupaDupStack (SDS): batches of frames → mega-tiles → one coverage-weighted stack.

Why
---
A Seestar night is thousands of 10-second frames. SDS cuts them into batches, stacks each
batch into a *mega-tile* with Mosaic-First restricted to the batch, and then stacks the
few mega-tiles. The final combination sees tens of mega-tiles instead of thousands of
frames, and each batch is an independent work unit.

Batch policy (one helper for the run, ``zemosaic plan`` and the napari preview)
-----------------------------------------------------------------------------
:func:`build_sds_batches` measures coverage on a grid laid over the global canvas (cells of
``cell_px`` canvas pixels, at most :data:`MAX_GRID_CELLS` a side). Each frame's *true*
footprint (its outline through its own WCS, SIP included, projected into the canvas) is
rasterised onto that grid with an even-odd scanline fill: a cell is covered when its centre
is inside the polygon. The denominator is the number of cells inside the *union* of all
valid footprints (the padded canvas rectangle would make a 0.92 threshold unreachable on
rotated or multi-panel mosaics). Frames are then taken in input order:

1. add the frame to the current batch and OR its cells into the batch's coverage;
2. close the batch when it holds at least ``min_batch_size`` frames **and** covers at least
   ``coverage_threshold`` of the union; otherwise force-close it at ``target_batch_size``;
3. at the end, leftovers smaller than ``min_batch_size`` merge into the last batch (a lone
   leftover batch is kept when there is no earlier batch: one frame gives one batch of one).

No pixel is read: the helper costs a few milliseconds per frame.

Preplan
-------
``preplan_master_groups`` (lists of frame paths) are used as the batches when they cover
every valid frame exactly once (:func:`resolve_preplan`); otherwise a warning says why and
the policy runs.

Run (:func:`run_sds`)
---------------------
* **Mega-tiles (P3).** For each batch, Mosaic-First stacks the batch's frames onto the
  batch's bounding box of the canvas (a crop, never a full canvas per batch). The result
  (data, coverage weight, frame count and a blending feather) is written to one raw float32
  file in the cache and dropped from memory; only the tile's coarse block-mean copy stays for
  photometry, and the batch frames' coarse pieces (for the frame-level solve of P4.5) go to one
  ``.npz`` beside it, read back in P4.5 only, so what a finished batch keeps in memory does not
  grow with its frames (measured in ``benchmarks/RESULTS.md``). :func:`build_megatile` is a
  function of the batch's frames, the canvas crop and the config only, so it can run elsewhere
  (:func:`megatile_unit`).
* **Mega-tile photometry (P4.5).** Gain, offset (and plane tilt, the photometry model's third
  term) of each mega-tile, per channel, are solved jointly over the overlap graph by
  :func:`.photometry.solve_normalisation`, each mega-tile being one piece and only cells that
  at least two mega-tiles cover taking part. The solution is anchored on the best-covered
  mega-tile (gain 1, offset 0); the overall flux scale then follows Mosaic-First's convention
  over the frames (median frame gain 1, median offset 0), so switching SDS on does not change
  the mosaic's brightness.
* **Final stack (P5).** The canvas is cut into blocks; per block the windows of the
  mega-tiles touching it are read from disk (seeks, no memory maps), corrected and stacked by
  :func:`.stack.stack_cube` with per-pixel weights = the mega-tile's coverage weight map,
  scaled by its measured noise when noise weighting is on (inverse variance) and tapered over
  a sixteenth of a frame at the mega-tile's edge, so a residual level difference between
  mega-tiles becomes a ramp, not a seam. Rejection across mega-tiles is applied only where at
  least 3 overlap; with 1–2 values a weighted mean is taken. Peak memory: the output canvas
  plus one block cube, whatever the number of batches.
* **Low-coverage masking.** Border pixels whose frame count is below ``sds_min_coverage_keep``
  of the *local* expected coverage (the count max-filtered over about an eighth of a frame, the
  dither scale, not the global maximum) are masked, so ragged dither and rotation edges do not
  leave noisy fringes; a panel's interior next to a deeper overlap keeps a ratio of about 1/2,
  and a dip inside the mosaic is never turned into a hole.

Failures
--------
Anything SDS cannot do raises :class:`SdsError` (a locale key and its parameters); the
pipeline logs ``sds_failed_fallback_mosaic_first``, records the fallback and runs Mosaic-First
(:func:`record_sds_fallback`). A batch that raises is logged as ``sds_error_batch_exception``.

Test hook: the internal config key ``_sds_inject_failure_batch`` (an int, the 1-based batch
number shown in the logs) makes that batch's unit raise, to exercise the fallback.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..events import Event, Reporter
from .canvas import BBox, Canvas, crop_canvas, footprint_polygon, frame_bboxes_on_canvas
from .photometry import PHOTOMETRY_BIN_PX
from .preplan import load_preplan, preplan_groups, resolved_path
from .quality import noise_per_unit_weight, tile_quality, tile_weight

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext
    from .frames import FrameInfo
    from .mosaic_first import CanvasStack
    from .photometry import CoarsePiece, Normalisation


#: Largest side of the coverage grid, in cells.
MAX_GRID_CELLS = 512
#: Outline points per frame edge used for the footprint polygon.
FOOTPRINT_POINTS_PER_EDGE = 8
#: Fewest overlapping mega-tiles for which rejection across mega-tiles is applied.
MIN_TILES_FOR_REJECTION = 3
#: Residual clip of the mega-tile photometry fits (sigmas). Mega-tiles are deep stacks whose
#: trails and hot pixels were already rejected inside their batch; what a 3-sigma clip of the sky
#: noise removes between them is mostly the star cells that carry the gain, which biases it
#: (measured: 1.113 instead of 1.02 on a panel-overlap strip). A wide clip keeps them.
MEGATILE_PHOTOMETRY_KAPPA = 10.0

#: The local expected coverage is the frame count around a pixel within (frame short side / this).
EXPECTED_COVERAGE_WINDOW_DIVISOR = 8
#: Planes stored per mega-tile besides the data channels: coverage weight, frame count, feather.
N_EXTRA_PLANES = 3
#: Width of the blending taper at a mega-tile's coverage edge: frame short side / this.
FEATHER_DIVISOR = 16
#: Smallest feather factor, so a pixel only one mega-tile covers is never lost.
FEATHER_FLOOR = 1e-3
#: Config key of the failure-injection test hook (1-based batch number).
INJECT_FAILURE_KEY = "_sds_inject_failure_batch"

# Reasons (locale keys) carried by sds_error_no_valid_batches / sds_warn_preplan_unused.
REASON_NO_FRAMES = "sds_reason_no_frames"
REASON_NO_VALID_WCS = "sds_reason_no_valid_wcs"
REASON_INVALID_WCS = "sds_reason_invalid_wcs"
REASON_EMPTY_GRID = "sds_reason_empty_coverage_grid"
REASON_NOT_SEESTAR = "sds_reason_not_seestar"
REASON_EMPTY_MEGATILES = "sds_reason_empty_megatiles"
REASON_PREPLAN_MALFORMED = "sds_reason_preplan_malformed"
REASON_PREPLAN_UNREADABLE = "sds_reason_preplan_unreadable"
REASON_PREPLAN_UNKNOWN = "sds_reason_preplan_unknown_frames"
REASON_PREPLAN_DUPLICATE = "sds_reason_preplan_duplicate_frames"
REASON_PREPLAN_INCOMPLETE = "sds_reason_preplan_incomplete"


class SdsError(Exception):
    """SDS cannot run or failed: a locale key and its parameters (the run falls back to Mosaic-First)."""

    def __init__(self, key: str, /, **params: Any) -> None:
        self.key = key
        self.params = params
        super().__init__(f"{key}: {params}")


class SdsInjectedFailure(RuntimeError):
    """Raised by a batch unit when the ``_sds_inject_failure_batch`` test hook names it."""


# ---------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class SdsPolicy:
    """The batch policy values (seed §3.1), coerced like the seed: sizes at least 1, target ≥ min."""

    coverage_threshold: float = 0.92
    min_batch_size: int = 5
    target_batch_size: int = 10
    min_coverage_keep: float = 0.4

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SdsPolicy":
        default = cls()
        threshold = _as_float(config.get("sds_coverage_threshold"), default.coverage_threshold)
        min_size = max(1, _as_int(config.get("sds_min_batch_size"), default.min_batch_size))
        target = max(1, _as_int(config.get("sds_target_batch_size"), default.target_batch_size))
        keep = _as_float(config.get("sds_min_coverage_keep"), default.min_coverage_keep)
        return cls(
            coverage_threshold=min(max(threshold, 0.0), 1.0),
            min_batch_size=min_size,
            target_batch_size=max(target, min_size),
            min_coverage_keep=min(max(keep, 0.0), 1.0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "coverage_threshold": self.coverage_threshold,
            "min_batch_size": self.min_batch_size,
            "target_batch_size": self.target_batch_size,
            "min_coverage_keep": self.min_coverage_keep,
        }


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _as_float(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


# --------------------------------------------------------------------------- coverage grid


@dataclass(frozen=True)
class CoverageGrid:
    """A grid of ``cell_px``-pixel cells over the canvas; cell ``(i, j)`` is centred on canvas pixel
    ``((j + 0.5)·cell_px − 0.5, (i + 0.5)·cell_px − 0.5)``."""

    shape: tuple[int, int]
    cell_px: int

    @classmethod
    def for_canvas(cls, canvas_shape: tuple[int, int], max_cells: int = MAX_GRID_CELLS) -> "CoverageGrid":
        height, width = int(canvas_shape[0]), int(canvas_shape[1])
        if height <= 0 or width <= 0:
            raise SdsError("sds_error_no_valid_batches", reason=REASON_EMPTY_GRID, detail=f"canvas {width}x{height}")
        cell = max(1, math.ceil(max(height, width) / max_cells))
        return cls((math.ceil(height / cell), math.ceil(width / cell)), cell)

    def to_grid(self, polygon_px: np.ndarray) -> np.ndarray:
        """Canvas pixel (x, y) → grid coordinates where cell centres are integers."""
        return (np.asarray(polygon_px, dtype=np.float64) + 0.5) / self.cell_px - 0.5


@dataclass(frozen=True)
class Footprint:
    """The cells covered by one frame: ``mask`` placed at grid row ``row0``, column ``col0``."""

    row0: int
    col0: int
    mask: np.ndarray  # (rows, cols) bool

    @property
    def n_cells(self) -> int:
        return int(self.mask.sum())

    def add_to(self, grid: np.ndarray) -> None:
        rows, cols = self.mask.shape
        grid[self.row0 : self.row0 + rows, self.col0 : self.col0 + cols] |= self.mask


def rasterise_polygon(polygon: np.ndarray, grid_shape: tuple[int, int]) -> Footprint | None:
    """Cells of a ``(rows, cols)`` grid whose centres lie inside ``polygon`` (grid coordinates,
    ``(K, 2)`` x/y, implicitly closed), by the even-odd rule. ``None`` when no cell is inside.

    Scanline fill, vectorised over rows: each row centre ``y = i`` is crossed by the edges whose
    endpoints straddle it (half-open rule, so a vertex on the line counts once); sorted
    crossings pair up into inside spans ``[x_a, x_b)``, and a cell is inside when its column falls
    in one of its row's spans (a convex outline has one span per row, so one comparison pass).
    """
    rows_total, cols_total = int(grid_shape[0]), int(grid_shape[1])
    poly = np.asarray(polygon, dtype=np.float64)
    if poly.ndim != 2 or poly.shape[0] < 3 or not np.all(np.isfinite(poly)):
        return None
    xs, ys = poly[:, 0], poly[:, 1]
    row0 = max(0, int(math.ceil(ys.min())))
    row1 = min(rows_total, int(math.floor(ys.max())) + 1)
    col0 = max(0, int(math.ceil(xs.min())))
    col1 = min(cols_total, int(math.floor(xs.max())) + 1)
    if row0 >= row1 or col0 >= col1:
        return None
    scan_y = np.arange(row0, row1, dtype=np.float64)[:, None]  # (R, 1)
    x_a, y_a = xs[None, :], ys[None, :]
    x_b, y_b = np.roll(xs, -1)[None, :], np.roll(ys, -1)[None, :]
    crosses = (y_a <= scan_y) != (y_b <= scan_y)  # (R, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x_a + (scan_y - y_a) * (x_b - x_a) / (y_b - y_a)
    x_cross = np.sort(np.where(crosses, x_cross, np.inf), axis=1)
    n_pairs = x_cross.shape[1] // 2
    starts, ends = x_cross[:, 0 : 2 * n_pairs : 2], x_cross[:, 1 : 2 * n_pairs : 2]
    valid = np.isfinite(starts) & np.isfinite(ends)
    columns = np.arange(col0, col1, dtype=np.float64)[None, :]
    mask = np.zeros((row1 - row0, col1 - col0), dtype=bool)
    for pair in np.flatnonzero(valid.any(axis=0)):
        # Cell j is inside the span when x_a <= j < x_b; rows without this span compare against NaN.
        first = np.where(valid[:, pair], starts[:, pair], np.nan)[:, None]
        last = np.where(valid[:, pair], ends[:, pair], np.nan)[:, None]
        mask |= (columns >= first) & (columns < last)
    if not mask.any():
        return None
    return Footprint(row0, col0, mask)


def _wcs_and_shape(item: Any) -> tuple[Any, tuple[int, int] | None]:
    """``(wcs, shape)`` of a FrameInfo-like object or of a ``(wcs, shape)`` pair."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        wcs, shape = item
    else:
        wcs, shape = getattr(item, "wcs", None), getattr(item, "shape", None)
    if shape is None:
        return wcs, None
    return wcs, (int(shape[0]), int(shape[1]))


def frame_footprints(
    frames_or_wcs: Sequence[Any], canvas: Canvas, grid: CoverageGrid
) -> tuple[dict[int, Footprint], list[tuple[int, str]]]:
    """Footprint of every frame on the grid, and ``(index, reason)`` for the frames without one."""
    footprints: dict[int, Footprint] = {}
    invalid: list[tuple[int, str]] = []
    for index, item in enumerate(frames_or_wcs):
        wcs, shape = _wcs_and_shape(item)
        if wcs is None or shape is None or min(shape) <= 0:
            invalid.append((index, REASON_NO_VALID_WCS))
            continue
        try:
            polygon = footprint_polygon(wcs, shape, canvas.wcs, FOOTPRINT_POINTS_PER_EDGE)
        except Exception:  # a WCS astropy cannot evaluate is just as unusable as a missing one
            invalid.append((index, REASON_INVALID_WCS))
            continue
        footprint = rasterise_polygon(grid.to_grid(polygon), grid.shape)
        if footprint is None:
            invalid.append((index, REASON_INVALID_WCS))
            continue
        footprints[index] = footprint
    return footprints, invalid


# ------------------------------------------------------------------------------ batch plan


@dataclass
class SdsBatchPlan:
    """SDS batches (frame indices in input order) and how much of the union each covers."""

    batches: list[list[int]]
    coverage: list[float]  # per batch: covered cells / cells inside the union footprint
    denominator: int  # cells inside the union footprint of the valid frames
    grid_shape: tuple[int, int]
    cell_px: int
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (frame index, reason key)
    policy: SdsPolicy | None = None
    source: str = "policy"  # "policy" | "preplan"

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def to_report(self, frames: Sequence[Any] | None = None) -> dict[str, Any]:
        """The ``sds`` section of ``run_report.json`` / ``zemosaic plan --json`` (batches only)."""

        def name(index: int) -> Any:
            path = getattr(frames[index], "path", None) if frames is not None else None
            return str(path) if path is not None else index

        return {
            "policy": self.policy.to_dict() if self.policy else None,
            "source": self.source,
            "denominator": self.denominator,
            "grid_shape": list(self.grid_shape),
            "cell_px": self.cell_px,
            "batches": [
                {"size": len(batch), "coverage_fraction": round(float(cov), 6), "frames": [name(i) for i in batch]}
                for batch, cov in zip(self.batches, self.coverage)
            ],
            "invalid": [{"frame": name(i), "reason_key": reason} for i, reason in self.invalid],
        }


def apply_batch_policy(
    order: Sequence[int],
    footprints: Mapping[int, Footprint],
    grid_shape: tuple[int, int],
    denominator: int,
    coverage_threshold: float,
    min_batch_size: int,
    target_batch_size: int,
) -> tuple[list[list[int]], list[float]]:
    """Seed §3.2 on precomputed footprints: the batches and their coverage fractions."""
    min_size = max(1, int(min_batch_size))
    target = max(min_size, int(target_batch_size))
    batches: list[list[int]] = []
    coverages: list[float] = []
    last_grid: np.ndarray | None = None  # coverage of the last closed batch (for the leftover merge)
    current: list[int] = []
    grid = np.zeros(grid_shape, dtype=bool)
    covered = 0
    for index in order:
        current.append(index)
        footprints[index].add_to(grid)
        covered = int(grid.sum())
        fraction = covered / denominator
        if len(current) >= min_size and fraction >= coverage_threshold or len(current) >= target:
            batches.append(current)
            coverages.append(fraction)
            last_grid, current, grid = grid, [], np.zeros(grid_shape, dtype=bool)
    if current:
        if len(current) < min_size and batches and last_grid is not None:
            batches[-1] = batches[-1] + current
            coverages[-1] = int((last_grid | grid).sum()) / denominator
        else:
            batches.append(current)
            coverages.append(covered / denominator)
    return batches, coverages


def _grid_and_footprints(
    frames_or_wcs: Sequence[Any], canvas: Canvas
) -> tuple[CoverageGrid, dict[int, Footprint], list[tuple[int, str]], int]:
    if len(frames_or_wcs) == 0:
        raise SdsError("sds_error_no_valid_batches", reason=REASON_NO_FRAMES, detail="")
    grid = CoverageGrid.for_canvas(canvas.shape)
    footprints, invalid = frame_footprints(frames_or_wcs, canvas, grid)
    if not footprints:
        raise SdsError(
            "sds_error_no_valid_batches", reason=REASON_NO_VALID_WCS, detail=f"0 of {len(frames_or_wcs)} frames"
        )
    union = np.zeros(grid.shape, dtype=bool)
    for footprint in footprints.values():
        footprint.add_to(union)
    denominator = int(union.sum())
    if denominator <= 0:  # pragma: no cover - every footprint has at least one cell
        raise SdsError("sds_error_no_valid_batches", reason=REASON_EMPTY_GRID, detail="")
    return grid, footprints, invalid, denominator


def build_sds_batches(
    frames_or_wcs: Sequence[Any],
    canvas: Canvas,
    coverage_threshold: float = 0.92,
    min_batch_size: int = 5,
    target_batch_size: int = 10,
) -> SdsBatchPlan:
    """SDS batches of ``frames_or_wcs`` (FrameInfo-like objects with ``.wcs``/``.shape``, or
    ``(wcs, (H, W))`` pairs) on ``canvas`` by the coverage + min + target policy (module docstring).

    Frames without a usable WCS are listed in ``plan.invalid`` and left out of the batches.
    Raises :class:`SdsError` ``sds_error_no_valid_batches`` when no frame has a usable footprint.
    """
    policy = SdsPolicy.from_config(
        {
            "sds_coverage_threshold": coverage_threshold,
            "sds_min_batch_size": min_batch_size,
            "sds_target_batch_size": target_batch_size,
        }
    )
    grid, footprints, invalid, denominator = _grid_and_footprints(frames_or_wcs, canvas)
    batches, coverages = apply_batch_policy(
        sorted(footprints),
        footprints,
        grid.shape,
        denominator,
        policy.coverage_threshold,
        policy.min_batch_size,
        policy.target_batch_size,
    )
    return SdsBatchPlan(batches, coverages, denominator, grid.shape, grid.cell_px, invalid, policy, "policy")


def measure_batches(frames_or_wcs: Sequence[Any], canvas: Canvas, batches: Sequence[Sequence[int]]) -> SdsBatchPlan:
    """A plan for given batches (a preplan): the coverage fraction of each on the same grid."""
    grid, footprints, invalid, denominator = _grid_and_footprints(frames_or_wcs, canvas)
    kept: list[list[int]] = []
    coverages: list[float] = []
    for batch in batches:
        members = sorted(i for i in batch if i in footprints)
        if not members:
            continue
        covered = np.zeros(grid.shape, dtype=bool)
        for index in members:
            footprints[index].add_to(covered)
        kept.append(members)
        coverages.append(int(covered.sum()) / denominator)
    return SdsBatchPlan(kept, coverages, denominator, grid.shape, grid.cell_px, invalid, None, "preplan")


# --------------------------------------------------------------------------------- preplan


def _path_index(frames: Sequence[Any]) -> tuple[dict[str, int], dict[str, int]]:
    """Frame index by resolved path, and by file name when that name is unique."""
    by_path: dict[str, int] = {}
    by_name: dict[str, int] = {}
    duplicate_names: set[str] = set()
    for index, info in enumerate(frames):
        path = Path(str(getattr(info, "path", "")))
        by_path[resolved_path(path)] = index
        if path.name in by_name:
            duplicate_names.add(path.name)
        by_name[path.name] = index
    for name in duplicate_names:
        by_name.pop(name, None)
    return by_path, by_name


def resolve_preplan(
    config: Mapping[str, Any], frames: Sequence[Any], reporter: Reporter | None = None
) -> list[list[int]] | None:
    """The preplanned batches as frame indices, or ``None`` (no preplan, or one that cannot be used).

    A preplan is used only when its groups cover every frame with a valid WCS exactly once and name
    no other file; then ``sds_info_preplan_used`` is logged. A preplan that cannot be used logs
    ``sds_warn_preplan_unused`` with the reason. No preplan: nothing is logged.
    """
    raw = config.get("preplan_master_groups")
    if raw is None or (isinstance(raw, (list, tuple, str)) and len(raw) == 0):
        return None

    def refuse(reason: str, detail: str) -> None:
        if reporter is not None:
            reporter.warning("sds_warn_preplan_unused", reason=reason, detail=detail)

    try:
        loaded = load_preplan(raw)
    except (OSError, ValueError) as exc:
        refuse(REASON_PREPLAN_UNREADABLE, f"{type(exc).__name__}: {exc}")
        return None
    groups = preplan_groups(loaded)
    if groups is None:
        refuse(REASON_PREPLAN_MALFORMED, "expected lists of frame paths")
        return None
    by_path, by_name = _path_index(frames)
    batches: list[list[int]] = []
    seen: set[int] = set()
    unknown: list[str] = []
    duplicates: list[str] = []
    for group in groups:
        batch: list[int] = []
        for item in group:
            index = by_path.get(resolved_path(item), by_name.get(Path(item).name))
            if index is None:
                unknown.append(item)
            elif index in seen:
                duplicates.append(item)
            else:
                seen.add(index)
                batch.append(index)
        batches.append(sorted(batch))
    if unknown:
        refuse(REASON_PREPLAN_UNKNOWN, f"{len(unknown)} (e.g. {unknown[0]})")
        return None
    if duplicates:
        refuse(REASON_PREPLAN_DUPLICATE, f"{len(duplicates)} (e.g. {duplicates[0]})")
        return None
    valid = {i for i, info in enumerate(frames) if _wcs_and_shape(info)[0] is not None}
    missing = sorted(valid - seen)
    if missing:
        refuse(REASON_PREPLAN_INCOMPLETE, f"{len(missing)} of {len(valid)} frames are in no group")
        return None
    batches = [batch for batch in batches if batch]
    if reporter is not None:
        reporter.info("sds_info_preplan_used", batches=len(batches), frames=len(seen))
    return batches


def plan_sds(
    frames: Sequence[Any], canvas: Canvas, config: Mapping[str, Any], reporter: Reporter | None = None
) -> SdsBatchPlan:
    """The batches a run would use: the preplan when usable, else the coverage policy.

    The single entry point for the run, ``zemosaic plan --json`` and the napari SDS preview.
    """
    policy = SdsPolicy.from_config(config)
    preplan = resolve_preplan(config, frames, reporter)
    if preplan is not None:
        plan = measure_batches(frames, canvas, preplan)
        plan.policy = policy
        return plan
    plan = build_sds_batches(
        frames, canvas, policy.coverage_threshold, policy.min_batch_size, policy.target_batch_size
    )
    plan.policy = policy
    return plan


def sds_applicable(frames: Sequence[Any]) -> tuple[bool, str]:
    """SDS runs only when every usable frame is Seestar: ``(True, "")`` or ``(False, reason_key)``.

    The reason for non-Seestar data is ``sds_info_disabled_not_seestar`` (params ``non_seestar``,
    ``frames``: see :func:`non_seestar_count`).
    """
    if len(frames) == 0:
        return False, REASON_NO_FRAMES
    if non_seestar_count(frames):
        return False, "sds_info_disabled_not_seestar"
    return True, ""


def non_seestar_count(frames: Iterable[Any]) -> int:
    return sum(1 for info in frames if not bool(getattr(info, "is_seestar", False)))


def record_sds_fallback(reporter: Reporter, exc: BaseException) -> dict[str, Any]:
    """Log ``sds_failed_fallback_mosaic_first`` for ``exc`` and return the report's fallback entry."""
    if isinstance(exc, SdsError):
        reason = str(exc.params.get("reason") or exc.key)
        detail = f"{exc.key}: " + ", ".join(f"{k}={v}" for k, v in exc.params.items())
    else:
        reason = f"{type(exc).__name__}: {exc}"
        detail = reason
    reporter.warning("sds_failed_fallback_mosaic_first", reason=reason)
    return {"from": "sds", "to": "mosaic_first", "reason_key": "sds_failed_fallback_mosaic_first", "detail": detail}


# ------------------------------------------------------------------------------- mega-tiles


@dataclass
class MegaTile:
    """A stacked batch on disk: planes ``0..C-1`` data, ``C`` coverage weight, ``C+1`` frame count,
    ``C+2`` feather (0…1, the blending taper near the tile's coverage edge)."""

    batch: int  # 0-based batch index
    bbox: BBox  # on the global canvas
    path: Path | None  # raw float32 (C + 3, h, w), C-order; None when nothing was stacked
    n_channels: int
    coarse: "CoarsePiece | None"
    noise_per_unit_weight: float  # σ of a pixel of unit coverage weight (NaN: unknown)
    median_weight: float
    frames_used: list[int]  # global frame indices
    frames_failed: list[tuple[int, str, str]]
    frame_norm: "Normalisation | None" = None  # the used frames' correction inside the batch (crop coordinates)
    frame_coarse: "dict[int, CoarsePiece] | None" = None  # per used frame (global index), on the canvas' coarse grid
    quality: "dict[str, float] | None" = None  # tile quality gate (engine/quality.py): score and its terms
    #: ``frame_coarse`` spilled to disk (:meth:`spill_frame_coarse`); read back by :meth:`frame_coarse_pieces`.
    frame_coarse_path: Path | None = None
    sha256: str | None = None  # of the tile file, computed while writing it (None: not known)

    def spill_frame_coarse(self, path: Path) -> None:
        """Write ``frame_coarse`` to ``path`` (one ``.npz``) and drop it from memory.

        A finished batch then keeps no per-frame arrays: the pieces are read back only by the
        mega-tile photometry (P4.5), so the memory held between batches does not grow with the
        number of frames already stacked.
        """
        if not self.frame_coarse:
            return
        indices = sorted(self.frame_coarse)
        pieces = [self.frame_coarse[i] for i in indices]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                indices=np.array(indices, dtype=np.int64),
                origins=np.array([(p.y0, p.x0) for p in pieces], dtype=np.int64).reshape(-1, 2),
                shapes=np.array([p.data.shape for p in pieces], dtype=np.int64).reshape(-1, 3),
                cells=np.concatenate([np.asarray(p.data, dtype=np.float32).ravel() for p in pieces]),
            )
        tmp.replace(path)
        self.frame_coarse_path = path
        self.frame_coarse = None

    def frame_coarse_pieces(self) -> "dict[int, CoarsePiece] | None":
        """The per-frame coarse pieces, from memory or read back from the spill file (``None``: none)."""
        from .photometry import CoarsePiece

        if self.frame_coarse is not None or self.frame_coarse_path is None:
            return self.frame_coarse
        with np.load(self.frame_coarse_path) as stored:
            indices, origins, shapes, cells = stored["indices"], stored["origins"], stored["shapes"], stored["cells"]
        pieces: dict[int, CoarsePiece] = {}
        start = 0
        for index, (y0, x0), shape in zip(indices, origins, shapes):
            size = int(np.prod(shape))
            pieces[int(index)] = CoarsePiece(int(y0), int(x0), cells[start : start + size].reshape(tuple(shape)))
            start += size
        return pieces

    @property
    def shape(self) -> tuple[int, int]:
        return self.bbox[1] - self.bbox[0], self.bbox[3] - self.bbox[2]

    def read_window(self, box: BBox) -> np.ndarray:
        """Planes ``(C + 3, h, w)`` of the canvas window ``box`` (inside this tile), read with seeks."""
        assert self.path is not None
        height, width = self.shape
        y0, y1 = box[0] - self.bbox[0], box[1] - self.bbox[0]
        x0, x1 = box[2] - self.bbox[2], box[3] - self.bbox[2]
        planes = np.empty((self.n_channels + N_EXTRA_PLANES, y1 - y0, x1 - x0), dtype=np.float32)
        with open(self.path, "rb") as handle:
            for plane in range(self.n_channels + N_EXTRA_PLANES):
                handle.seek(((plane * height + y0) * width) * 4)
                rows = np.fromfile(handle, dtype=np.float32, count=(y1 - y0) * width)
                planes[plane] = rows.reshape(y1 - y0, width)[:, x0:x1]
        return planes


def feather_map(covered: np.ndarray, feather_px: float, xp: Any = np) -> np.ndarray:
    """0…1 taper: distance to the nearest uncovered pixel over ``feather_px``, floored at
    :data:`FEATHER_FLOOR`. Where mega-tiles overlap, each fades out towards its own edge, so a
    residual level difference between two tiles becomes a ramp over ``feather_px`` instead of a
    step; where one tile is alone the floor leaves its value untouched.

    With CuPy (``xp``) the exact transform runs on the device (cupyx's, float64 distances): the
    same integer squared distances and correctly rounded square roots as SciPy's, so the same
    map, in milliseconds instead of about half a second for a 6 Mpx tile. Returned on the host.
    """
    if feather_px <= 0:
        return np.ones(covered.shape, dtype=np.float32)
    if xp is np:
        from scipy.ndimage import distance_transform_edt
    else:
        from cupyx.scipy.ndimage import distance_transform_edt
    distance = distance_transform_edt(xp.pad(xp.asarray(covered), 1))[1:-1, 1:-1]
    feather = xp.clip(distance / float(feather_px), FEATHER_FLOOR, 1.0).astype(xp.float32)
    return feather if xp is np else feather.get()


def feather_width_px(frames: Sequence[Any], canvas: Canvas) -> float:
    """The blending width on the canvas: a sixteenth of the frames' median short side."""
    if not frames:
        return 0.0
    shorter = float(np.median([min(info.shape) for info in frames]))
    return shorter * _canvas_per_frame_pixel(frames, canvas) / FEATHER_DIVISOR


def batch_bbox(frames: Sequence[Any], canvas: Canvas) -> BBox | None:
    """Union of the frames' bounding boxes on the canvas (end-exclusive), ``None`` if none touches it."""
    boxes = frame_bboxes_on_canvas([info.wcs for info in frames], [info.shape for info in frames], canvas)
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    array = np.array(boxes)
    return int(array[:, 0].min()), int(array[:, 1].max()), int(array[:, 2].min()), int(array[:, 3].max())


def build_megatile(
    frames: Sequence["FrameInfo"],
    frame_indices: Sequence[int],
    batch: int,
    canvas: Canvas,
    ctx: "RunContext",
    n_channels: int,
    out_dir: Path,
    feather_px: float = 0.0,
) -> Generator[Event, None, MegaTile]:
    """One SDS work unit: Mosaic-First of the batch on its crop of the canvas, written to ``out_dir``.

    ``frames`` are the batch's frames (global indices ``frame_indices``); ``feather_px`` is the
    blending width (:func:`feather_width_px`). Only the coarse copy for photometry stays in memory
    once the tile is on disk. :func:`stack_megatile` then :func:`finish_megatile`.
    """
    stacked = yield from stack_megatile(frames, frame_indices, batch, canvas, ctx, n_channels)
    if isinstance(stacked, MegaTile):
        return stacked
    return finish_megatile(stacked, frame_indices, batch, n_channels, out_dir, feather_px, ctx.xp("stack"))


def stack_megatile(
    frames: Sequence["FrameInfo"],
    frame_indices: Sequence[int],
    batch: int,
    canvas: Canvas,
    ctx: "RunContext",
    n_channels: int,
) -> Generator[Event, None, "MegaTile | tuple[CanvasStack, BBox]"]:
    """The batch stacked on its crop of the canvas (the GPU's part of a mega-tile), with the
    crop's box; an empty :class:`MegaTile` when the batch has nothing to stack."""
    from .mosaic_first import mosaic_first

    inject = ctx.config.get(INJECT_FAILURE_KEY)
    if inject is not None and not isinstance(inject, bool) and _as_int(inject, -1) == batch + 1:
        raise SdsInjectedFailure(f"{INJECT_FAILURE_KEY}={inject}")
    bbox = batch_bbox(frames, canvas)
    empty = MegaTile(batch, (0, 0, 0, 0), None, n_channels, None, float("nan"), 0.0, [], [])
    if bbox is None:
        return empty
    # Start the crop on the canvas' coarse photometry grid, so the batch's coarse pieces are
    # cells of the global coarse grid too.
    bbox = (bbox[0] - bbox[0] % PHOTOMETRY_BIN_PX, bbox[1], bbox[2] - bbox[2] % PHOTOMETRY_BIN_PX, bbox[3])
    sub_canvas = crop_canvas(canvas, (slice(bbox[0], bbox[1]), slice(bbox[2], bbox[3])))
    stack = yield from mosaic_first(frames, sub_canvas, ctx, n_channels, label=f"_sds_{batch:04d}")
    if not stack.frames_used or not (stack.weight > 0).any():
        empty.frames_failed = [(int(frame_indices[i]), key, detail) for i, key, detail in stack.frames_failed]
        return empty
    return stack, bbox


def finish_megatile(
    stacked: "tuple[CanvasStack, BBox]",
    frame_indices: Sequence[int],
    batch: int,
    n_channels: int,
    out_dir: Path,
    feather_px: float,
    xp: Any = np,
) -> MegaTile:
    """A stacked batch made a mega-tile (the host's part: pure, thread-safe): its file (data,
    weight, count, feather), checksum, coarse cells, noise, quality and its frames' photometry."""
    from .photometry import coarse_piece

    stack, bbox = stacked
    failed = [(int(frame_indices[i]), key, detail) for i, key, detail in stack.frames_failed]
    data = np.where(stack.weight[None] > 0, stack.data, np.nan).astype(np.float32)
    weight = np.where(np.isfinite(data).all(axis=0), stack.weight, 0.0).astype(np.float32)
    path = out_dir / f"megatile_{batch:04d}.f32"
    tmp = path.with_suffix(".tmp")
    # The resume manifest's checksum, taken from the bytes as they are written: the run's
    # process (on a cluster, the one all tiles come back to) need not read the file again.
    digest = hashlib.sha256()
    with open(tmp, "wb") as handle:
        for plane in (data, weight, stack.count.astype(np.float32), feather_map(weight > 0, feather_px, xp)):
            plane = np.ascontiguousarray(plane, dtype=np.float32)
            digest.update(memoryview(plane).cast("B"))
            plane.tofile(handle)
    tmp.replace(path)
    used = list(stack.frames_used)
    tile = MegaTile(
        batch=batch,
        bbox=bbox,
        path=path,
        n_channels=n_channels,
        coarse=coarse_piece(data, bbox, PHOTOMETRY_BIN_PX),
        noise_per_unit_weight=noise_per_unit_weight(data, weight),
        median_weight=float(np.median(weight[weight > 0])),
        frames_used=[int(frame_indices[i]) for i in used],
        frames_failed=failed,
        frame_norm=stack.normalisation.subset(used),
        frame_coarse=_frames_coarse_on_canvas(stack, frame_indices, bbox),
        quality=tile_quality(data, weight).to_dict(),
        sha256=digest.hexdigest(),
    )
    # Per-frame photometry pieces wait on disk until P4.5 (a finished batch keeps no per-frame arrays).
    tile.spill_frame_coarse(out_dir / f"megatile_{batch:04d}_frames.npz")
    return tile


class MegatileUnits:
    """Resume bookkeeping of the SDS mega-tiles (``ctx.manifest``; inert without one).

    A mega-tile unit is the tile file, its frames' coarse pieces and a small ``.npz`` of what
    the later phases need (the tile's coarse cells and its frames' normalisation inside the
    batch). Its signature holds the member frames (so a policy change that moves frames
    between batches invalidates exactly the batches whose membership changed), their global
    indices and quality metrics, the canvas, the feather width and the stacking settings.
    """

    def __init__(self, ctx: "RunContext", canvas: Canvas, n_channels: int, feather_px: float) -> None:
        self.manifest = getattr(ctx, "manifest", None)
        self.canvas = canvas
        self.n_channels = n_channels
        self.feather_px = float(feather_px)

    @property
    def active(self) -> bool:
        return self.manifest is not None

    def _signature(self, frames: Sequence["FrameInfo"], indices: Sequence[int], batch: int) -> str:
        return self.manifest.signature("megatile", {
            "frames": list(frames),
            "indices": [int(i) for i in indices],
            "fwhm": [info.metrics.get("fwhm_px") for info in frames],
            "batch": int(batch),
            "canvas": self.canvas,
            "channels": self.n_channels,
            "feather_px": self.feather_px,
        })

    def load(self, frames: Sequence["FrameInfo"], indices: Sequence[int], batch: int) -> MegaTile | None:
        if not self.active:
            return None
        record = self.manifest.lookup_record("megatile", batch, self._signature(frames, indices, batch))
        if record is None:
            return None
        from .photometry import CoarsePiece, Normalisation

        meta = record.meta
        try:
            with np.load(record.paths[1], allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
            norm = Normalisation(
                arrays["gains"], arrays["offsets"], arrays["tilts"], arrays["centres"], int(meta["bin_px"]),
                int(meta["iterations"]), bool(meta["converged"]), arrays["constrained"], str(meta["mode"]), [],
                arrays["clipped"],
            )
            return MegaTile(
                batch=batch,
                bbox=tuple(int(v) for v in meta["bbox"]),  # type: ignore[arg-type]
                path=record.paths[0],
                n_channels=self.n_channels,
                coarse=CoarsePiece(int(arrays["coarse_origin"][0]), int(arrays["coarse_origin"][1]), arrays["coarse"]),
                noise_per_unit_weight=float("nan") if meta["noise"] is None else float(meta["noise"]),
                median_weight=float(meta["median_weight"]),
                frames_used=[int(i) for i in meta["frames_used"]],
                frames_failed=[(int(i), str(key), str(detail)) for i, key, detail in meta["frames_failed"]],
                frame_norm=norm,
                quality=meta.get("quality"),
                frame_coarse_path=record.paths[2] if len(record.paths) > 2 else None,
            )
        except (OSError, KeyError, ValueError, TypeError, IndexError):
            self.manifest.forget("megatile", batch)
            return None

    def record(self, frames: Sequence["FrameInfo"], indices: Sequence[int], tile: MegaTile, out_dir: Path) -> None:
        """Record a finished mega-tile (an empty batch, with no file, is not a unit)."""
        if not self.active or tile.path is None or tile.coarse is None or tile.frame_norm is None:
            return
        from .resume import save_unit_arrays

        norm = tile.frame_norm
        sidecar = out_dir / f"megatile_{tile.batch:04d}_unit.npz"
        digest = save_unit_arrays(
            sidecar, coarse=tile.coarse.data, coarse_origin=np.array([tile.coarse.y0, tile.coarse.x0]),
            gains=norm.gains, offsets=norm.offsets, tilts=norm.tilts, centres=norm.centres,
            constrained=norm.constrained, clipped=norm.clipped,
        )
        paths = [tile.path, sidecar] + ([tile.frame_coarse_path] if tile.frame_coarse_path is not None else [])
        self.manifest.record(
            "megatile", tile.batch, self._signature(frames, indices, tile.batch), paths,
            sha256=[tile.sha256, digest, None] if len(paths) == 3 else [tile.sha256, digest],  # type: ignore[list-item]
            meta={
                "bbox": list(tile.bbox), "noise": tile.noise_per_unit_weight, "median_weight": tile.median_weight,
                "frames_used": tile.frames_used, "frames_failed": [list(item) for item in tile.frames_failed],
                "quality": tile.quality, "bin_px": norm.bin_px, "iterations": norm.iterations,
                "converged": norm.converged, "mode": norm.mode,
            },
        )


def _frames_coarse_on_canvas(stack: Any, frame_indices: Sequence[int], bbox: BBox) -> "dict[int, CoarsePiece] | None":
    """The batch frames' coarse pieces moved from the crop's coarse grid to the canvas' one.

    Mosaic-First computes them for its own photometry; they are used when its result carries
    them (``CanvasStack.coarse``: frame index in the batch → piece), ``None`` otherwise.
    """
    from .photometry import CoarsePiece

    coarse = getattr(stack, "coarse", None)
    if not coarse:
        return None
    row, col = bbox[0] // PHOTOMETRY_BIN_PX, bbox[2] // PHOTOMETRY_BIN_PX
    return {
        int(frame_indices[local]): CoarsePiece(piece.y0 + row, piece.x0 + col, piece.data)
        for local, piece in coarse.items()
        if local in stack.frames_used
    }


def megatile_unit(
    frames: Sequence["FrameInfo"],
    frame_indices: Sequence[int],
    batch: int,
    canvas: Canvas,
    config: dict[str, Any],
    cache_dir: Path,
    n_channels: int = 3,
    feather_px: float = 0.0,
) -> MegaTile:
    """:func:`build_megatile` as a plain function (its own reporter and context), e.g. for a Dask worker."""
    from .context import RunContext

    ctx = RunContext(dict(config), Reporter(), Path(cache_dir), Path(cache_dir))
    generator = build_megatile(
        frames, frame_indices, batch, canvas, ctx, n_channels, ctx.make_cache_dir("sds"), feather_px
    )
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


# ---------------------------------------------------------------------- mega-tile photometry


def megatile_terms_from_frames(
    tiles: Sequence[MegaTile], canvas_shape: tuple[int, int], method: str
) -> "Normalisation | None":
    """Mega-tile corrections derived from one frame-level solve over every frame of every batch.

    This is Mosaic-First's own photometric solve (the same coarse pieces, the same overlap graph
    of frames), so panel-to-panel scales are carried by the many frame pairs across each overlap,
    not by one pair of mega-tiles. For frame ``j`` of batch ``b``, the batch solve says
    ``raw_j = g_j·tile_b + o_j + t_j·(X − c_j)`` and the global one ``raw_j = γ_j·sky + ω_j +
    τ_j·(X − c_j)``, so ``tile_b = (γ_j/g_j)·sky + ((ω_j − o_j) + (τ_j − t_j)·(X − c_j))/g_j``:
    every frame estimates its tile's gain and plane; the median over the batch is kept.
    ``None`` when some mega-tile lacks its frames' coarse pieces.
    """
    from .photometry import Normalisation, solve_normalisation

    if not tiles or any(t.frame_norm is None or t.coarse is None for t in tiles):
        return None
    frame_coarse = [t.frame_coarse_pieces() for t in tiles]  # read back from the cache when spilled
    if any(pieces is None for pieces in frame_coarse):
        return None
    owners = [
        (slot, index) for slot, tile in enumerate(tiles) for index in tile.frames_used if index in frame_coarse[slot]
    ]
    if len(owners) < 2:
        return None
    coarse_shape = (-(-canvas_shape[0] // PHOTOMETRY_BIN_PX), -(-canvas_shape[1] // PHOTOMETRY_BIN_PX))
    pieces = [frame_coarse[slot][index] for slot, index in owners]
    del frame_coarse
    frames = solve_normalisation(pieces, coarse_shape, method, bin_px=PHOTOMETRY_BIN_PX)
    del pieces
    n_channels = tiles[0].n_channels
    result = Normalisation.identity(len(tiles), n_channels, PHOTOMETRY_BIN_PX)
    for slot, tile in enumerate(tiles):
        inner = tile.frame_norm
        assert inner.bin_px == PHOTOMETRY_BIN_PX
        _, hc, wc = tile.coarse.data.shape
        centre = np.array([tile.coarse.x0 + (wc - 1) / 2.0, tile.coarse.y0 + (hc - 1) / 2.0])
        origin = np.array([tile.bbox[2], tile.bbox[0]], dtype=np.float64) / PHOTOMETRY_BIN_PX
        gains, tilts, offsets = [], [], []
        for number, (owner, index) in enumerate(owners):
            if owner != slot:
                continue
            local = tile.frames_used.index(index)
            g, o, t = inner.gains[local], inner.offsets[local], inner.tilts[local]
            frame_centre = inner.centres[local] + origin
            tilt = (frames.tilts[number] - t) / g[:, None]
            # the global solve's offsets sit at its piece centre (the same frame, the same cells)
            shift = frame_centre - frames.centres[number]
            offset_here = frames.offsets[number] + frames.tilts[number] @ shift
            gains.append(frames.gains[number] / g)
            tilts.append(tilt)
            offsets.append((offset_here - o) / g + tilt @ (centre - frame_centre))
        if gains:
            result.gains[slot] = np.median(gains, axis=0)
            result.tilts[slot] = np.median(tilts, axis=0)
            result.offsets[slot] = np.median(offsets, axis=0)
        result.centres[slot] = centre
    result.iterations, result.converged = frames.iterations, frames.converged
    result.constrained = np.ones(len(tiles), bool)
    return result


def solve_megatile_photometry(
    tiles: Sequence[MegaTile], canvas_shape: tuple[int, int], method: str, reference: int
) -> "Normalisation":
    """Per-channel gain, offset (and plane tilt, as the photometry model has it) of each mega-tile,
    solved jointly over the overlap graph, in the gauge where tile ``reference`` is unchanged."""
    from .photometry import Normalisation, solve_normalisation

    n_channels = tiles[0].n_channels if tiles else 1
    coarse_shape = (-(-canvas_shape[0] // PHOTOMETRY_BIN_PX), -(-canvas_shape[1] // PHOTOMETRY_BIN_PX))
    if len(tiles) < 2 or method == "none":
        return Normalisation.identity(len(tiles), n_channels, PHOTOMETRY_BIN_PX)
    pieces = overlap_pieces([tile.coarse for tile in tiles], coarse_shape)
    solved = solve_normalisation(pieces, coarse_shape, method, bin_px=PHOTOMETRY_BIN_PX, kappa=MEGATILE_PHOTOMETRY_KAPPA)
    return rebase_normalisation(solved, reference)


def overlap_pieces(pieces: Sequence["CoarsePiece"], coarse_shape: tuple[int, int]) -> list["CoarsePiece"]:
    """The coarse pieces with every cell that no other piece covers set to NaN: only overlaps
    carry information between mega-tiles. Piece shapes (hence plane-term centres) are kept."""
    from .photometry import CoarsePiece

    depth = np.zeros(coarse_shape, dtype=np.int32)
    for piece in pieces:
        if piece.data.size:
            _, hc, wc = piece.data.shape
            depth[piece.y0 : piece.y0 + hc, piece.x0 : piece.x0 + wc] += np.isfinite(piece.data).all(axis=0)
    result = []
    for piece in pieces:
        if piece.data.size == 0:
            result.append(piece)
            continue
        _, hc, wc = piece.data.shape
        shared = depth[piece.y0 : piece.y0 + hc, piece.x0 : piece.x0 + wc] >= 2
        result.append(CoarsePiece(piece.y0, piece.x0, np.where(shared[None], piece.data, np.nan).astype(np.float32)))
    return result


def rebase_normalisation(norm: "Normalisation", reference: int) -> "Normalisation":
    """The same solution in the gauge where piece ``reference`` has gain 1, offset 0 and no tilt.

    With ``raw_i = g_i·sky + o_i + t_i·(X − c_i)``, set ``sky' = g_r·sky + o_r + t_r·(X − c_r)``:
    ``g_i' = g_i/g_r``, ``t_i' = t_i − g_i'·t_r``, ``o_i' = o_i − g_i'·(o_r + t_r·(c_i − c_r))``.
    """
    from .photometry import Normalisation

    gains = np.asarray(norm.gains, dtype=np.float64)
    offsets = np.asarray(norm.offsets, dtype=np.float64)
    tilts = np.asarray(norm.tilts, dtype=np.float64)
    centres = np.asarray(norm.centres, dtype=np.float64)
    new_gains = gains / gains[reference]
    new_tilts = tilts - new_gains[:, :, None] * tilts[reference][None]
    shift = centres - centres[reference]  # (N, 2) coarse (x, y)
    drift = np.einsum("ck,nk->nc", tilts[reference], shift)  # t_r·(c_i − c_r), (N, C)
    new_offsets = offsets - new_gains * (offsets[reference][None] + drift)
    return Normalisation(
        new_gains, new_offsets, new_tilts, centres.copy(), norm.bin_px, norm.iterations, norm.converged,
        np.asarray(norm.constrained).copy(),
    )


def match_frame_gauge(
    n_frames: int, n_channels: int, tiles: Sequence[MegaTile], tile_norm: "Normalisation"
) -> "Normalisation":
    """``tile_norm`` moved to Mosaic-First's gauge over the frames: median frame gain 1, median
    frame tilt/gain 0 and median frame offset/gain 0 per channel (frames seen through their tiles).

    The gauge is a symmetry of the model (``sky' = a·sky + p·X + b`` leaves every prediction
    unchanged), so this changes only the overall flux scale and zero point: SDS and Mosaic-First
    mosaics of the same frames come out on the same scale.
    """
    from .photometry import Normalisation

    norm = Normalisation(
        np.array(tile_norm.gains, dtype=np.float64), np.array(tile_norm.offsets, dtype=np.float64),
        np.array(tile_norm.tilts, dtype=np.float64), np.array(tile_norm.centres, dtype=np.float64),
        tile_norm.bin_px, tile_norm.iterations, tile_norm.converged, np.asarray(tile_norm.constrained).copy(),
    )
    used = [i for tile in tiles for i in tile.frames_used]
    if not used:
        return norm

    def frames() -> "Normalisation":
        composed = compose_frame_normalisation(n_frames, n_channels, tiles, norm)
        return composed.subset(used)

    # sky' = a·sky: G → G/a.
    norm.gains /= np.median(frames().gains, axis=0)[None, :]
    # sky' = sky + p·X: T → T − G·p, O → O − G·(p·C).
    composed = frames()
    slope = np.median(composed.tilts / composed.gains[:, :, None], axis=0)  # (C, 2)
    norm.offsets -= norm.gains * np.einsum("ck,nk->nc", slope, norm.centres)
    norm.tilts -= norm.gains[:, :, None] * slope[None]
    # sky' = sky + b: O → O − G·b.
    composed = frames()
    zero = np.median(composed.offsets / composed.gains, axis=0)
    norm.offsets -= norm.gains * zero[None, :]
    return norm


def compose_frame_normalisation(
    n_frames: int, n_channels: int, tiles: Sequence[MegaTile], tile_norm: "Normalisation"
) -> "Normalisation":
    """Each frame's correction onto the final flux scale, through its mega-tile (for the report).

    ``raw_j = g_j·tile + o_j + t_j·(X − c_j)`` inside the batch and ``tile = G·sky + O + T·(X − C)``
    give ``raw_j = g_j·G·sky + (o_j + g_j·O + g_j·T·(c_j − C)) + (t_j + g_j·T)·(X − c_j)``.
    Batch-local coarse coordinates are moved to the canvas by the tile's origin.
    """
    from .photometry import Normalisation

    bin_px = next((t.frame_norm.bin_px for t in tiles if t.frame_norm is not None), PHOTOMETRY_BIN_PX)
    result = Normalisation.identity(n_frames, n_channels, bin_px)
    # The tile terms in the frames' coarse units (tilt per cell, centre in cells).
    to_frame_units = bin_px / tile_norm.bin_px
    for slot, tile in enumerate(tiles):
        inner = tile.frame_norm
        if inner is None:
            continue
        assert inner.bin_px == bin_px
        big_g, big_o = tile_norm.gains[slot], tile_norm.offsets[slot]
        big_t = tile_norm.tilts[slot] * to_frame_units
        big_c = (tile_norm.centres[slot] + 0.5) / to_frame_units - 0.5
        origin = np.array([tile.bbox[2], tile.bbox[0]], dtype=np.float64) / bin_px
        for local, index in enumerate(tile.frames_used):
            g, o, t = inner.gains[local], inner.offsets[local], inner.tilts[local]
            centre = inner.centres[local] + origin
            result.gains[index] = g * big_g
            result.offsets[index] = o + g * big_o + g * (big_t @ (centre - big_c))
            result.tilts[index] = t + g[:, None] * big_t
            result.centres[index] = centre
    result.iterations, result.converged = tile_norm.iterations, tile_norm.converged
    return result


def reference_tile(tiles: Sequence[MegaTile], coverage: Sequence[float]) -> int:
    """The best-covered mega-tile: highest coverage fraction, then the deepest (median weight)."""
    keys = [(round(float(coverage[t.batch]), 6), t.median_weight) for t in tiles]
    return int(max(range(len(tiles)), key=lambda i: keys[i]))


# ------------------------------------------------------------------------------ final stack


def expected_coverage(count: np.ndarray, window_px: int) -> np.ndarray:
    """The local expected coverage: the frame count max-filtered over ``window_px``.

    Computed on a grid of ``window_px / 4`` cells (cheap on any canvas) and expanded back.
    The window is on the scale of the dither, much smaller than an overlap strip between
    panels, so the single-depth interior of a panel next to a deeper overlap keeps a ratio of
    about 1/2, while the ragged edges left by dithering and field rotation fall far below it.
    """
    from scipy.ndimage import maximum_filter

    height, width = count.shape
    window_px = max(int(window_px), 4)
    step = max(1, window_px // 4)
    rows, cols = -(-height // step), -(-width // step)
    padded = np.zeros((rows * step, cols * step), dtype=np.float32)
    padded[:height, :width] = count
    coarse = padded.reshape(rows, step, cols, step).max(axis=(1, 3))
    local = maximum_filter(coarse, size=3, mode="nearest")  # ± one cell: a window of about 3·step
    return np.repeat(np.repeat(local, step, axis=0), step, axis=1)[:height, :width]


def low_coverage_mask(count: np.ndarray, window_px: int, keep_fraction: float) -> np.ndarray:
    """Covered pixels below ``keep_fraction`` of the local expected coverage that belong to the
    mosaic's ragged border: a low region is masked only where it touches uncovered sky, so a
    dip inside the mosaic (a panel corner between deeper overlaps) never becomes a hole.

    Connectivity is decided on the coarse grid of :func:`expected_coverage` (cheap at any size).
    """
    from scipy.ndimage import binary_dilation, label

    local = expected_coverage(count, window_px)
    covered = count > 0
    low = covered & (count < keep_fraction * local)
    del local
    if not low.any():
        return low
    height, width = count.shape
    step = max(1, max(int(window_px), 4) // 4)
    rows, cols = -(-height // step), -(-width // step)

    def coarse_any(mask: np.ndarray) -> np.ndarray:
        padded = np.zeros((rows * step, cols * step), dtype=bool)
        padded[:height, :width] = mask
        return padded.reshape(rows, step, cols, step).any(axis=(1, 3))

    low_cells = coarse_any(low)
    empty_cells = np.pad(coarse_any(~covered), 1, constant_values=True)  # beyond the canvas is empty too
    labels, _ = label(low_cells, structure=np.ones((3, 3), dtype=bool))
    touching = binary_dilation(empty_cells, structure=np.ones((3, 3), dtype=bool))[1:-1, 1:-1] & low_cells
    border_ids = np.unique(labels[touching])
    border_cells = np.isin(labels, border_ids[border_ids > 0])
    expanded = np.repeat(np.repeat(border_cells, step, axis=0), step, axis=1)[:height, :width]
    return low & expanded


#: Threads that read and correct the mega-tiles' windows of a final-stack block.
WINDOW_THREADS = 8


def _ordered_map(function: Callable[[int], Any], count: int, threads: int | None = None) -> Iterator[Any]:
    """``function(0), …, function(count - 1)`` in order, computed on up to ``threads`` threads
    with at most twice as many results waiting (memory stays bounded)."""
    threads = min(WINDOW_THREADS if threads is None else threads, os.cpu_count() or 1, max(1, count))
    if threads <= 1:
        yield from (function(index) for index in range(count))
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zemosaic-windows") as pool:
        waiting: collections.deque[Future] = collections.deque()
        for index in range(count):
            waiting.append(pool.submit(function, index))
            if len(waiting) >= 2 * threads:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()


def stack_final_block(
    tiles: Sequence[MegaTile],
    box: BBox,
    n_channels: int,
    norm: "Normalisation",
    weight_scales: np.ndarray,
    params_reject: Any,
    params_plain: Any,
    xp: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack the windows of ``tiles`` over canvas block ``box``: data, coverage weight, frame count
    (in the run's process, or in an ``sds_block`` task on a worker with the worker's ``xp``).

    ``norm`` is aligned with ``tiles``: tile ``i`` is corrected to ``(tile − plane_i) / gain_i``.
    """
    from .stack import stack_cube

    y0, y1, x0, x1 = box
    cube = np.full((len(tiles), n_channels, y1 - y0, x1 - x0), np.nan, dtype=np.float32)
    pixel_weights = np.zeros((len(tiles), y1 - y0, x1 - x0), dtype=np.float32)
    frame_count = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    coverage_sum = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)

    def window(slot: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        tile = tiles[slot]
        inner = (max(y0, tile.bbox[0]), min(y1, tile.bbox[1]), max(x0, tile.bbox[2]), min(x1, tile.bbox[3]))
        planes = tile.read_window(inner)
        region = (slice(inner[0] - y0, inner[1] - y0), slice(inner[2] - x0, inner[3] - x0))
        covered = planes[n_channels] > 0
        coverage = np.where(covered, planes[n_channels] * weight_scales[slot], 0.0)
        plane = norm.background_plane(slot, inner[0], inner[2], inner[1] - inner[0], inner[3] - inner[2], np)
        corrected = (planes[:n_channels] - plane) / np.asarray(norm.gains[slot], dtype=np.float32)[:, None, None]
        return (region, np.where(covered[None], corrected, np.nan), coverage * planes[n_channels + 2], coverage,
                np.where(covered, planes[n_channels + 1], 0.0))

    # Tiles' windows are read and corrected side by side (reads and NumPy release the GIL); the
    # sums take them in slot order, so the float32 totals are those of one loop.
    for slot, (region, values, weights, coverage, count) in enumerate(_ordered_map(window, len(tiles))):
        cube[(slot, slice(None), *region)] = values
        pixel_weights[(slot, *region)] = weights
        coverage_sum[region] += coverage
        frame_count[region] += count
    n_overlap = (pixel_weights > 0).sum(axis=0)
    if xp is not np:
        cube, pixel_weights = xp.asarray(cube), xp.asarray(pixel_weights)
    deep = n_overlap >= MIN_TILES_FOR_REJECTION
    results = []
    for params, wanted in ((params_reject, deep), (params_plain, ~deep & (n_overlap > 0))):
        if wanted.any():
            result = stack_cube(cube, params, weights=None, pixel_weights=pixel_weights, xp=xp)
            arrays = (result.data, result.weight)
            if xp is not np:
                arrays = tuple(a.get() for a in arrays)
            results.append((wanted, arrays))
    data = np.full((n_channels, y1 - y0, x1 - x0), np.nan, dtype=np.float32)
    for wanted, (part_data, _) in results:
        data = np.where(wanted[None], part_data, data)
    # Reported coverage: the unfeathered weights of the mega-tiles (the feather only blends).
    kept = np.isfinite(data).all(axis=0)
    weight = np.where(kept, coverage_sum, 0.0).astype(np.float32)
    frame_count = np.where(kept, frame_count, 0.0).astype(np.float32)
    return data, weight, frame_count


def _tile_for_block_task(tile: MegaTile) -> MegaTile:
    """The tile as a final-stack task needs it: its file and geometry, not its photometry."""
    return dataclasses.replace(tile, coarse=None, frame_norm=None, frame_coarse=None)


# ---------------------------------------------------------------------------------- the run


@dataclass
class SdsOutcome:
    """What :func:`run_sds` returns: the final stack (Mosaic-First compatible), the plan and the
    ``sds`` section of ``run_report.json``."""

    stack: "CanvasStack"
    plan: SdsBatchPlan
    report: dict[str, Any]


def _log_plan(reporter: Reporter, plan: SdsBatchPlan) -> None:
    reporter.info("sds_info_batches_built", count=len(plan.batches), sizes=", ".join(map(str, plan.sizes)))
    for number, (batch, coverage) in enumerate(zip(plan.batches, plan.coverage), start=1):
        reporter.debug(
            "sds_debug_batch_coverage_summary",
            batch=number,
            count=len(plan.batches),
            size=len(batch),
            coverage=float(coverage),
            denominator=plan.denominator,
        )


#: The phases a nested Mosaic-First run (a batch's stack) times into the run's context.
NESTED_PHASES = ("P3", "P4.5", "P5")


@contextlib.contextmanager
def _batches_timed(ctx: "RunContext", into: dict[str, float]) -> Iterator[None]:
    """Time the batch loop as the run's P3 (the mega-tiles). The batches' own Mosaic-First runs
    add their P3, P4.5 and P5 to the run's timings as they go; those are moved to ``into`` (where
    the batches' time went), so that the run's P4.5 and P5 say what SDS itself spent on its
    mega-tile photometry and its final stack."""
    before = {phase: ctx.timings_s.get(phase) for phase in NESTED_PHASES}
    started = time.perf_counter()
    try:
        yield
    finally:
        for phase, value in before.items():
            now = ctx.timings_s.pop(phase, None)
            if now is not None and now != value:
                into[phase] = round(now - (value or 0.0), 4)
            if value is not None:
                ctx.timings_s[phase] = value
        ctx.timings_s["P3"] = round(ctx.timings_s.get("P3", 0.0) + time.perf_counter() - started, 4)


def run_sds(
    frames: Sequence["FrameInfo"], canvas: Canvas, ctx: "RunContext", n_channels: int = 3
) -> Generator[Event, None, SdsOutcome]:
    """The SDS workflow on ``frames`` over the global ``canvas`` (module docstring).

    Yields events; returns an :class:`SdsOutcome`. Raises :class:`SdsError` (or any exception of
    a batch) when SDS cannot finish: the caller falls back to Mosaic-First.
    """
    from .mosaic_first import CanvasStack, _blocks_touched, plan_block_side
    from .stack import StackParams

    config, reporter = ctx.config, ctx.reporter
    policy = SdsPolicy.from_config(config)
    reporter.info("sds_info_start", entries=len(frames))
    reporter.info(
        "sds_info_batch_policy",
        coverage_threshold=policy.coverage_threshold,
        min_batch_size=policy.min_batch_size,
        target_batch_size=policy.target_batch_size,
    )
    applicable, _ = sds_applicable(frames)
    if not applicable:
        reason = REASON_NO_FRAMES if not frames else REASON_NOT_SEESTAR
        error = SdsError("sds_error_no_valid_batches", reason=reason, detail=f"{non_seestar_count(frames)} of {len(frames)}")
        reporter.error(error.key, **error.params)
        raise error

    # --- P2: batches ------------------------------------------------------------------------
    with ctx.timed("P2"):
        try:
            plan = plan_sds(frames, canvas, config, reporter)
        except SdsError as exc:
            reporter.error(exc.key, **exc.params)
            raise
        if plan.invalid:  # never drop frames silently: Mosaic-First takes them all
            error = SdsError("sds_error_no_valid_batches", reason=REASON_INVALID_WCS,
                             detail=f"{len(plan.invalid)} of {len(frames)} frames")
            reporter.error(error.key, **error.params)
            raise error
        _log_plan(reporter, plan)
    yield from ctx.drain()

    # --- P3: one mega-tile per batch -----------------------------------------------------------
    out_dir = ctx.make_cache_dir("sds")
    feather_px = feather_width_px(frames, canvas)
    tiles: list[MegaTile] = []
    failed: list[tuple[int, str, str]] = []
    from .distributed import LOCAL, megatile_task, submit_units

    units = MegatileUnits(ctx, canvas, n_channels, feather_px)
    reused = {number: tile for number, batch in enumerate(plan.batches, start=1)
              if (tile := units.load([frames[i] for i in batch], batch, number - 1)) is not None}
    remote = submit_units(ctx, "megatile", megatile_task, [  # None without a scheduler
        (f"megatile-{number:04d}", None if number in reused else (
            [frames[i] for i in batch], list(batch), number - 1, canvas, ctx.config, str(ctx.cache_dir), n_channels,
            feather_px))
        for number, batch in enumerate(plan.batches, start=1)
    ])  # its waits are the batch loop's, timed as P3 below
    def batch_failed(number: int, exc: Exception) -> Generator[Event, None, None]:
        from .context import RunCancelled

        if isinstance(exc, RunCancelled):
            raise exc
        error = f"{type(exc).__name__}: {exc}"
        reporter.error("sds_error_batch_exception", batch=number, error=error)
        yield from ctx.drain()
        raise SdsError("sds_error_batch_exception", batch=number, error=error) from exc

    def accept(number: int, batch_frames: list[Any], batch: Sequence[int], tile: MegaTile) -> Generator[Event, None, None]:
        try:
            if number not in reused:
                units.record(batch_frames, batch, tile, out_dir)
        except Exception as exc:
            yield from batch_failed(number, exc)
        failed.extend(tile.frames_failed)
        if tile.path is not None:
            tiles.append(tile)
            height, width = tile.shape
            reporter.info("sds_info_megatile", batch=number, count=len(plan.batches), frames=len(tile.frames_used),
                          width=width, height=height)
        reporter.progress("P3", number, len(plan.batches), "progress_batches")
        yield from ctx.drain()

    def finish_here(stacked: Any, batch: Sequence[int], number: int) -> MegaTile:
        with ctx.policy.device() if ctx.policy is not None else contextlib.nullcontext():
            return finish_megatile(stacked, batch, number - 1, n_channels, out_dir, feather_px, ctx.xp("stack"))

    # A stacked batch is made a mega-tile (file, checksum, quality: the host's share) on a thread
    # while the next batch stacks; tiles are still taken in batch order.
    finishing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zemosaic-megatile") if remote is None else None
    pending: tuple[int, list[Any], Sequence[int], Future] | None = None

    def take_pending() -> Generator[Event, None, None]:
        nonlocal pending
        if pending is None:
            return
        number, batch_frames, batch, job = pending
        pending = None
        try:
            tile = job.result()
        except Exception as exc:
            yield from batch_failed(number, exc)
        yield from accept(number, batch_frames, batch, tile)

    batch_timings: dict[str, float] = {}
    try:
        with _batches_timed(ctx, batch_timings):
            for number, batch in enumerate(plan.batches, start=1):
                batch_frames = [frames[i] for i in batch]
                stacked = None
                try:
                    tile = reused.get(number)
                    if remote is not None:  # a task on the run's scheduler (engine/distributed.py), taken in order
                        result = yield from remote.result(number - 1)
                        tile = tile if result == LOCAL else result
                    elif tile is None:
                        stacked = yield from stack_megatile(batch_frames, batch, number - 1, canvas, ctx, n_channels)
                        if isinstance(stacked, MegaTile):
                            tile, stacked = stacked, None
                except Exception as exc:
                    yield from batch_failed(number, exc)
                yield from take_pending()
                if stacked is not None:
                    assert finishing is not None
                    pending = (number, batch_frames, batch, finishing.submit(finish_here, stacked, batch, number))
                    continue
                yield from accept(number, batch_frames, batch, tile)
            yield from take_pending()
    finally:
        if finishing is not None:
            finishing.shutdown(wait=True, cancel_futures=True)
    if units.active:
        for kind in ("megatile", "reproject", "block"):
            units.manifest.log_summary(kind, reporter)
    if not tiles:
        error = SdsError("sds_error_no_valid_batches", reason=REASON_EMPTY_MEGATILES, detail=f"{len(plan.batches)}")
        reporter.error(error.key, **error.params)
        raise error

    # --- P4.5: mega-tile photometry ----------------------------------------------------------------
    with ctx.timed("P4.5"):
        reference = reference_tile(tiles, plan.coverage)
        method = config["stacking_normalize_method"]
        from_frames = megatile_terms_from_frames(tiles, canvas.shape, method) if method != "none" else None
        if from_frames is not None:
            tile_norm = rebase_normalisation(from_frames, reference)
        else:
            tile_norm = solve_megatile_photometry(tiles, canvas.shape, method, reference)
        photometry_source = "frames" if from_frames is not None else "megatiles"
        if method != "none":
            tile_norm = match_frame_gauge(len(frames), n_channels, tiles, tile_norm)
        for tile, gain, offset in zip(tiles, tile_norm.gains, tile_norm.offsets):
            reporter.debug("sds_debug_megatile_correction", batch=tile.batch + 1,
                           gain=", ".join(f"{g:.4f}" for g in gain), offset=", ".join(f"{o:.2f}" for o in offset))
        reporter.info("sds_info_photometry", reference=tiles[reference].batch + 1,
                      gain_min=float(np.min(tile_norm.gains)), gain_max=float(np.max(tile_norm.gains)))
    yield from ctx.drain()

    # Inverse-variance scaling of each tile's coverage map: after dividing by its gain a tile's
    # unit-weight σ is noise/gain; relative to the reference tile's, so weights stay in its units.
    params = StackParams.from_config(config)
    scales = np.ones(len(tiles))
    if params.weighting == "noise_variance":
        sigma = np.array([t.noise_per_unit_weight for t in tiles]) / np.mean(tile_norm.gains, axis=1)
        good = np.isfinite(sigma) & (sigma > 0)
        if good.all():
            scales = (sigma[reference] / sigma) ** 2
    # Tile quality gate: a poor mega-tile (patchy coverage, sky disparity, few stars) is
    # down-weighted, never dropped, so it cannot leave a hole.
    gate = np.array([tile_weight(t.quality["score"]) if t.quality else 1.0 for t in tiles])
    scales = scales * gate
    params_plain = StackParams.from_config({**config, "stacking_rejection_algorithm": "none"})

    # --- P5: final stack, block by block -----------------------------------------------------------
    height, width = canvas.shape
    out_data = np.full((n_channels, height, width), np.nan, dtype=np.float32)
    out_weight = np.zeros((height, width), dtype=np.float32)
    out_count = np.zeros((height, width), dtype=np.float32)
    side = plan_block_side([t.bbox for t in tiles], n_channels + N_EXTRA_PLANES, canvas.shape, ctx.budget_bytes)
    blocks = sorted({block for t in tiles for block in _blocks_touched(t.bbox, side)})
    reporter.info("sds_info_final_stack", megatiles=len(tiles), width=width, height=height, block=side)
    xp = ctx.xp("stack")
    from .distributed import read_block_result, sds_block_task

    with ctx.timed("P5"):
        jobs: list[tuple[BBox, list[int]]] = []
        for by, bx in blocks:
            box = (by * side, min((by + 1) * side, height), bx * side, min((bx + 1) * side, width))
            jobs.append((box, [i for i, t in enumerate(tiles) if t.bbox[0] < box[1] and t.bbox[1] > box[0]
                               and t.bbox[2] < box[3] and t.bbox[3] > box[2]]))  # fmt: skip
        # With a scheduler every block is a task (the tiles are files in the shared cache);
        # results are taken in block order, so the mosaic does not depend on the workers.
        light = [_tile_for_block_task(t) for t in tiles]
        remote = submit_units(ctx, "sds_block", sds_block_task, [
            (f"sds-block-{number:04d}", (
                [light[i] for i in members], box, n_channels, tile_norm.subset(members), scales[members], params,
                params_plain, ctx.config, str(ctx.cache_dir), str(out_dir / f"final_{number:04d}.f32"),
            ) if members else None)
            for number, (box, members) in enumerate(jobs, start=1)
        ])  # fmt: skip
        for number, (box, members) in enumerate(jobs, start=1):
            if members:
                if remote is not None:
                    path = yield from remote.result(number - 1)
                    data, weight, count = read_block_result(path, n_channels, box)
                else:
                    data, weight, count = stack_final_block(
                        [tiles[i] for i in members], box, n_channels, tile_norm.subset(members),
                        scales[members], params, params_plain, xp,
                    )
                out_data[:, box[0] : box[1], box[2] : box[3]] = data
                out_weight[box[0] : box[1], box[2] : box[3]] = weight
                out_count[box[0] : box[1], box[2] : box[3]] = count
            reporter.progress("P5", number, len(blocks), "progress_blocks")
            yield from ctx.drain()

        # Low-coverage masking relative to the local expected coverage.
        masked = 0
        if policy.min_coverage_keep > 0 and (out_weight > 0).any():
            shorter = float(np.median([min(info.shape) for info in frames]))
            window = int(shorter * _canvas_per_frame_pixel(frames, canvas) / EXPECTED_COVERAGE_WINDOW_DIVISOR)
            low = low_coverage_mask(out_count, window, policy.min_coverage_keep)
            masked = int(low.sum())
            out_data[:, low] = np.nan
            out_weight[low] = 0.0
            out_count[low] = 0.0
            del low
        reporter.info("sds_info_low_coverage_masked", pixels=masked, keep=policy.min_coverage_keep)
    yield from ctx.drain()

    # With the run's unit manifest the tiles stay until the run ends (a run killed in P6 reuses
    # them); its ``cache_retention`` removes them then.
    if config.get("cache_retention", "run_end") != "keep" and not units.active:
        for tile in tiles:
            if tile.path is not None:
                tile.path.unlink(missing_ok=True)
            if tile.frame_coarse_path is not None:
                tile.frame_coarse_path.unlink(missing_ok=True)

    used = sorted(i for t in tiles for i in t.frames_used)
    normalisation = compose_frame_normalisation(len(frames), n_channels, tiles, tile_norm)
    stack = CanvasStack(
        canvas=canvas,
        data=out_data,
        weight=out_weight,
        count=out_count,
        normalisation=normalisation,
        frames_used=used,
        frames_failed=sorted(failed),
        block_side=side,
        spilled=True,
    )
    report = plan.to_report(frames)
    tile_by_batch = {tile.batch: (tile, slot) for slot, tile in enumerate(tiles)}
    for number, entry in enumerate(report["batches"]):
        found = tile_by_batch.get(number)
        if found is None:
            entry.update({"bbox": None, "gain": None, "offset": None, "frames_used": 0})
            continue
        tile, slot = found
        entry.update({
            "bbox": list(tile.bbox),
            "gain": [round(float(g), 6) for g in tile_norm.gains[slot]],
            "offset": [round(float(o), 4) for o in tile_norm.offsets[slot]],
            "tilt": [[round(float(t), 6) for t in pair] for pair in tile_norm.tilts[slot]],
            "frames_used": len(tile.frames_used),
            "weight_scale": round(float(scales[slot]), 6),
            "quality": tile.quality,
            "quality_weight": round(float(gate[slot]), 4),
        })
    report.update({
        "reference_batch": tiles[reference].batch,
        "photometry_source": photometry_source,
        "block_side": side,
        "masked_pixels": masked,
        "batch_stack_timings_s": batch_timings,
    })
    return SdsOutcome(stack=stack, plan=plan, report=report)


def _canvas_per_frame_pixel(frames: Sequence[Any], canvas: Canvas) -> float:
    """Canvas pixels per frame pixel (frames and canvas usually share the scale: about 1)."""
    from .canvas import pixel_scale_arcsec

    try:
        frame_scale = float(np.median([pixel_scale_arcsec(info.wcs) for info in frames]))
        return frame_scale / pixel_scale_arcsec(canvas.wcs)
    except Exception:  # pragma: no cover - a WCS without a scale: assume equal scales
        return 1.0

"""Photometric normalisation: bring frames (or tiles) to one flux scale.

Each frame ``i`` sees the sky through its own transparency, adds its own sky glow, and
that glow has its own gradient (moon, light dome, dew). On the common canvas, per channel,

    frame_i(X, Y) = gain_i · sky(X, Y) + c_i + a_i·X + b_i·Y

with (X, Y) canvas coordinates (in coarse cells). The plane terms matter: without them a
gradient that differs between frames is mistaken for a gain change.

Everything is fitted on what frames have in common, at a coarse resolution (block means of
fully covered cells: cheap, insensitive to PSF differences), on an overlap graph:

1. **Edges.** Each frame is linked to the frames it overlaps most (``neighbours`` per frame),
   plus the best links between otherwise disconnected groups, so panels are always tied.
2. **Pairwise fits.** On the common cells of an edge (i, j), a sigma-clipped fit of
   ``frame_i = r·frame_j + plane`` and of ``frame_j = r'·frame_i + plane`` gives the gain
   ratio ``g_i/g_j = sqrt(r/r')`` (symmetric, so noise in either frame does not bias it).
3. **Gains.** ``log g_i − log g_j = log ratio_ij`` for all edges, solved by weighted least
   squares (weights = common cells), gauge: median gain 1.
4. **Planes.** With gains known, ``frame_i/g_i − frame_j/g_j`` on the common cells is a plane:
   the difference of the frames' planes. Each plane coefficient is again a graph least
   squares problem (gauge: median 0).

All steps are linear and direct (no slow alternating iterations); the graph has O(N·k)
edges, so thousands of frames are solved in seconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from .photometry_device import DevicePairFits

NORMALISATION_METHODS = ("none", "sky_mean", "linear_fit")

#: Coarse cell (canvas pixels) on which frames, tiles and mega-tiles are compared.
PHOTOMETRY_BIN_PX = 16

# Floor on the uncertainty of one pairwise gain ratio (PSF and sampling differences between
# frames), so that no single edge dominates the graph however many cells it has.
SYSTEMATIC_LOG_GAIN = 0.002


@dataclass
class CoarsePiece:
    """A frame's block-mean image on the coarse canvas grid; NaN where a cell is not fully covered."""

    y0: int
    x0: int
    data: np.ndarray  # (C, hc, wc) float32


@dataclass
class Normalisation:
    """Per-frame, per-channel correction: ``corrected = (raw − offset − tilts·(X−Xc, Y−Yc)) / gain``.

    Tilts are per coarse cell; ``centres`` are the frame centres in coarse cells; ``bin_px``
    converts canvas pixels to coarse cells.
    """

    gains: np.ndarray  # (N, C)
    offsets: np.ndarray  # (N, C)
    tilts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 2)))  # (N, C, 2) per coarse cell (x, y)
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (N, 2) coarse (x, y)
    bin_px: int = 16
    iterations: int = 0
    converged: bool = True
    constrained: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) had enough cells
    mode: str = ""  # what was solved: the method, or "offset_only" after the under-constrained fallback
    anchors: list[int] = field(default_factory=list)  # the gauge piece of each connected group, largest group first
    clipped: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) a gain hit ``gain_limits``

    @classmethod
    def identity(cls, n_frames: int, n_channels: int, bin_px: int = 16) -> "Normalisation":
        return cls(
            np.ones((n_frames, n_channels)),
            np.zeros((n_frames, n_channels)),
            np.zeros((n_frames, n_channels, 2)),
            np.zeros((n_frames, 2)),
            bin_px,
            0,
            True,
            np.ones(n_frames, bool),
        )

    def subset(self, indices: Sequence[int]) -> "Normalisation":
        idx = np.asarray(indices, dtype=int)
        return Normalisation(
            self.gains[idx], self.offsets[idx], self.tilts[idx], self.centres[idx], self.bin_px,
            self.iterations, self.converged, self.constrained[idx] if self.constrained.size else self.constrained,
            self.mode, [], self.clipped[idx] if self.clipped.size else self.clipped,
        )

    def background_plane(self, frame: int, y0: int, x0: int, height: int, width: int, xp=np):
        """The additive term of ``frame`` over canvas pixels [y0:y0+h, x0:x0+w]: (C, h, w)."""
        cols = (xp.arange(x0, x0 + width, dtype=xp.float64) + 0.5) / self.bin_px - 0.5 - self.centres[frame, 0]
        rows = (xp.arange(y0, y0 + height, dtype=xp.float64) + 0.5) / self.bin_px - 0.5 - self.centres[frame, 1]
        tilt = xp.asarray(self.tilts[frame])
        offset = xp.asarray(self.offsets[frame])
        plane = offset[:, None, None] + tilt[:, 0, None, None] * cols[None, None, :] + tilt[:, 1, None, None] * rows[None, :, None]
        return plane.astype(xp.float32)

    def to_report(self, index: int) -> dict[str, list[float]]:
        return {
            "gain": [round(float(v), 6) for v in self.gains[index]],
            "offset": [round(float(v), 4) for v in self.offsets[index]],
            "tilt": [[round(float(t), 6) for t in pair] for pair in self.tilts[index]],
        }


def coarse_piece(
    data: np.ndarray, bbox: tuple[int, int, int, int], bin_px: int, statistic: str = "mean"
) -> CoarsePiece:
    """Block means of a resampled piece on the coarse grid aligned to canvas multiples of ``bin_px``.

    A coarse cell is kept only when every pixel in it is covered, so frame edges
    (partially covered cells) never bias the fit. ``statistic="median"`` gives block medians
    instead: the diffuse light (sky, nebula) of each cell without its stars.
    """
    y0, _, x0, _ = bbox
    channels, height, width = data.shape
    cy0, cx0 = -(-y0 // bin_px), -(-x0 // bin_px)  # first cell fully inside the piece
    top, left = cy0 * bin_px - y0, cx0 * bin_px - x0
    n_rows, n_cols = (height - top) // bin_px, (width - left) // bin_px
    if n_rows <= 0 or n_cols <= 0:
        return CoarsePiece(cy0, cx0, np.zeros((channels, 0, 0), np.float32))
    view = data[:, top : top + n_rows * bin_px, left : left + n_cols * bin_px]
    blocks = view.reshape(channels, n_rows, bin_px, n_cols, bin_px)
    if statistic == "median":
        cells = blocks.transpose(0, 1, 3, 2, 4).reshape(channels, n_rows, n_cols, bin_px * bin_px)
        # np.median propagates NaN too: the same "fully covered" rule as the mean.
        return CoarsePiece(cy0, cx0, np.median(cells, axis=-1).astype(np.float32))
    if statistic != "mean":
        raise ValueError(f"unknown coarse statistic {statistic!r}")
    if not isinstance(data, np.ndarray):  # on the GPU: one kernel, not a reduction and a cast
        from .gpu import fused_block_means

        means = fused_block_means(data, top, left, n_rows, n_cols, bin_px)
        if means is not None:
            return CoarsePiece(cy0, cx0, means)
    # A plain mean propagates NaN, which is exactly the "fully covered" rule.
    return CoarsePiece(cy0, cx0, blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32))


def _piece_bounds(pieces: Sequence[CoarsePiece]) -> np.ndarray:
    """(N, 4) int: y0, y1, x0, x1 of every piece on the coarse grid (empty pieces have y1 = y0)."""
    bounds = np.zeros((len(pieces), 4), dtype=np.int64)
    for index, piece in enumerate(pieces):
        _, hc, wc = piece.data.shape
        bounds[index] = (piece.y0, piece.y0 + hc, piece.x0, piece.x0 + wc)
    return bounds


def _piece_centres(pieces: Sequence[CoarsePiece]) -> np.ndarray:
    bounds = _piece_bounds(pieces)
    return np.stack([(bounds[:, 2] + bounds[:, 3] - 1) / 2.0, (bounds[:, 0] + bounds[:, 1] - 1) / 2.0], axis=1)


def _strongest_overlaps(area: np.ndarray, neighbours: int, min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the overlaps each row of ``area`` keeps: every overlap of at least
    ``min_cells`` cells when there are at most ``neighbours``; else half the strongest and half
    spread evenly over the weaker ones (panel-to-panel overlaps are weak but are what ties the
    panels' flux scales together), ranked by area, then by column from the highest."""
    eligible = area >= min_cells
    counts = eligible.sum(axis=1)
    few = counts <= neighbours
    row_of, column = np.nonzero(eligible & few[:, None])
    many = np.flatnonzero(~few)
    if many.size:
        # Descending area, ties from the highest column: one sort of area·columns + column, unique
        # keys (twice as fast as a stable argsort of the areas).
        n_columns = area.shape[1]
        keys = area[many].astype(np.int64) * n_columns + np.arange(n_columns)
        keys.sort(axis=1)
        ranked = keys[:, ::-1] % n_columns
        strong = neighbours - neighbours // 2
        positions = [np.broadcast_to(np.arange(strong), (many.size, strong))]
        if neighbours // 2:
            spread = np.linspace(np.full(many.size, strong), counts[many] - 1, neighbours // 2, axis=1)
            positions.append(spread.round().astype(int))
        picked = np.take_along_axis(ranked, np.concatenate(positions, axis=1), axis=1)
        row_of = np.concatenate([row_of, np.repeat(many, picked.shape[1])])
        column = np.concatenate([column, picked.ravel()])
    return row_of, column


def overlap_edges(bounds: np.ndarray, neighbours: int = 8, min_cells: int = 12) -> list[tuple[int, int]]:
    """Edges of the overlap graph: each frame's largest overlaps, plus links between components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(bounds)
    edges: set[tuple[int, int]] = set()
    best_between: dict[tuple[int, int], tuple[float, int, int]] = {}
    for start in range(0, n, 512):  # rows in chunks: memory O(512·N)
        rows = bounds[start : start + 512]
        height = np.minimum(rows[:, None, 1], bounds[None, :, 1]) - np.maximum(rows[:, None, 0], bounds[None, :, 0])
        width = np.minimum(rows[:, None, 3], bounds[None, :, 3]) - np.maximum(rows[:, None, 2], bounds[None, :, 2])
        area = np.clip(height, 0, None) * np.clip(width, 0, None)
        local = np.arange(len(rows))
        area[local, start + local] = 0
        row_of, column = _strongest_overlaps(area, neighbours, min_cells)
        first, second = start + row_of, column
        edges.update(zip(np.minimum(first, second).tolist(), np.maximum(first, second).tolist()))
    if not edges:
        return []
    pairs = np.array(sorted(edges))
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    n_components, labels = connected_components(graph, directed=False)
    if n_components > 1:
        # Tie components together by their largest mutual overlaps (panels are few, so this is cheap).
        for start in range(0, n, 512):
            rows = bounds[start : start + 512]
            height = np.minimum(rows[:, None, 1], bounds[None, :, 1]) - np.maximum(rows[:, None, 0], bounds[None, :, 0])
            width = np.minimum(rows[:, None, 3], bounds[None, :, 3]) - np.maximum(rows[:, None, 2], bounds[None, :, 2])
            area = np.clip(height, 0, None) * np.clip(width, 0, None)
            for local, row in enumerate(area):
                i = start + local
                other = (labels != labels[i]) & (row >= min_cells)
                for j in np.flatnonzero(other):
                    key = (min(labels[i], labels[j]), max(labels[i], labels[j]))
                    if row[j] > best_between.get(key, (0, 0, 0))[0]:
                        best_between[key] = (float(row[j]), min(i, int(j)), max(i, int(j)))
        edges.update((i, j) for _, i, j in best_between.values())
    return sorted(edges)


def _common_cells(a: CoarsePiece, b: CoarsePiece, channel: int) -> tuple[np.ndarray, ...] | None:
    """Values of both pieces and the cell coordinates (X, Y) on their common, valid cells."""
    _, ha, wa = a.data.shape
    _, hb, wb = b.data.shape
    y0, y1 = max(a.y0, b.y0), min(a.y0 + ha, b.y0 + hb)
    x0, x1 = max(a.x0, b.x0), min(a.x0 + wa, b.x0 + wb)
    if y1 <= y0 or x1 <= x0:
        return None
    va = a.data[channel, y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    vb = b.data[channel, y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    valid = np.isfinite(va) & np.isfinite(vb)
    rows, cols = np.nonzero(valid)  # row-major, like the values
    return (
        va[valid].astype(np.float64), vb[valid].astype(np.float64),
        (cols + x0).astype(np.float64), (rows + y0).astype(np.float64),
    )


def _mad_keep(residual: np.ndarray, kappa: float) -> np.ndarray:
    centre = np.median(residual)
    sigma = 1.4826 * np.median(np.abs(residual - centre))
    return np.abs(residual - centre) <= kappa * max(sigma, 1e-12)


def _clipped_lstsq(
    design: np.ndarray, target: np.ndarray, kappa: float, iterations: int = 4, kept: np.ndarray | None = None
) -> np.ndarray | None:
    fit = _clipped_lstsq_with_variance(design, target, kappa, iterations, kept)
    return None if fit is None else fit[0]


def _clip_loop(
    design: np.ndarray, target: np.ndarray, kappa: float, iterations: int, kept: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray]:
    """Least squares with iterative kappa-sigma clipping of residuals (sigma from the MAD).

    Returns the last solution and the samples it was fitted on (solution None: too few samples).
    """
    kept = np.ones(target.size, bool) if kept is None else kept
    solution = None
    final_kept = kept
    for _ in range(iterations):
        if kept.sum() < design.shape[1] + 3:
            break
        solution, *_ = np.linalg.lstsq(design[kept], target[kept], rcond=None)
        final_kept = kept
        residual = target - design @ solution
        centre = np.median(residual[kept])
        sigma = 1.4826 * np.median(np.abs(residual[kept] - centre))
        new_kept = np.abs(residual - centre) <= kappa * max(sigma, 1e-12)
        if np.array_equal(new_kept, kept):
            break
        kept = new_kept
    return solution, final_kept


def _clipped_lstsq_with_variance(
    design: np.ndarray, target: np.ndarray, kappa: float, iterations: int = 4, kept: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Clipped least squares (:func:`_clip_loop`) and the variances of its coefficients.

    ``kept`` seeds the clipping (e.g. from a resistant fit), so high-leverage outliers such as a
    satellite trail never get to pull the first solution.
    """
    solution, final_kept = _clip_loop(design, target, kappa, iterations, kept)
    if solution is None:
        return None
    used = design[final_kept]
    residual = target[final_kept] - used @ solution
    dof = max(1, used.shape[0] - used.shape[1])
    try:
        covariance = np.linalg.inv(used.T @ used) * float(residual @ residual) / dof
    except np.linalg.LinAlgError:
        return None
    return solution, np.diag(covariance)


def _clipped_keep(design: np.ndarray, target: np.ndarray, kappa: float, iterations: int = 4) -> np.ndarray | None:
    """The samples :func:`_clipped_lstsq` keeps (None when too few remain to fit)."""
    solution, final_kept = _clip_loop(design, target, kappa, iterations, None)
    return None if solution is None else final_kept


def _kept_sigma(design: np.ndarray, target: np.ndarray, kept: np.ndarray) -> float:
    """Robust σ of the residual of the edge's own fit on its kept samples (its noise level)."""
    solution, *_ = np.linalg.lstsq(design[kept], target[kept], rcond=None)
    residual = target[kept] - design[kept] @ solution
    sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    return sigma if sigma > 0 and np.isfinite(sigma) else 1.0


def _joint_plane_solve(
    n: int,
    rows: Sequence[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, float]],
    fit_tilt: bool,
    anchor_priority: Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Planes ``c + a·X + b·Y`` of every piece from all edges' kept cells at once.

    Each row ``(i, j, X, Y, d, σ)`` says ``plane_i − plane_j = d`` at cells (X, Y), with noise σ:
    one weighted least-squares problem in 3N unknowns (N without tilt), sparse normal equations.
    Gauge per connected group: the anchor (first of ``anchor_priority`` in it) has no plane, or,
    without one, the group's median coefficients are 0.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    k = 3 if fit_tilt else 1
    x_all = np.concatenate([r[2] for r in rows])
    y_all = np.concatenate([r[3] for r in rows])
    x_ref, y_ref = float(np.mean(x_all)), float(np.mean(y_all))  # centred coordinates: a well-conditioned system
    data, row_index, col_index, targets, weights = [], [], [], [], []
    row = 0
    for i, j, x, y, d, sigma in rows:
        m = d.size
        ids = np.arange(row, row + m)
        terms = [np.ones(m), x - x_ref, y - y_ref][:k]
        for t, values in enumerate(terms):
            data += [values, -values]
            row_index += [ids, ids]
            col_index += [np.full(m, i * k + t), np.full(m, j * k + t)]
        targets.append(d)
        weights.append(np.full(m, 1.0 / sigma**2))
        row += m
    design = coo_matrix(
        (np.concatenate(data), (np.concatenate(row_index), np.concatenate(col_index))), shape=(row, n * k)
    ).tocsr()
    w = np.concatenate(weights)
    target = np.concatenate(targets)
    normal = (design.T.multiply(w)) @ design
    rhs = design.T @ (w * target)
    ridge = 1e-9 * float(normal.diagonal().max() or 1.0)
    solution = spsolve((normal + ridge * _identity(n * k)).tocsc(), rhs).reshape(n, k)
    edges = np.array([(r[0], r[1]) for r in rows])
    labels = _components(n, edges)
    anchors = _component_anchors(labels, anchor_priority)
    for label in np.unique(labels):
        members = labels == label
        anchor = anchors.get(int(label))
        solution[members] -= solution[anchor] if anchor is not None else np.median(solution[members], axis=0)
    full = np.zeros((n, 3))
    full[:, :k] = solution
    c, a, b = full[:, 0], full[:, 1], full[:, 2]
    return c - a * x_ref - b * y_ref, a, b  # back to absolute coarse coordinates


def _theil_sen_seed(x: np.ndarray, y: np.ndarray, max_pairs: int = 20000) -> tuple[float, float]:
    """Median slope between bright and faint cells of ``x`` (Theil–Sen, robust to leverage outliers).

    Pairing the brightest quarter with the faintest half keeps every slope anchored on real signal
    (stars, nebula), not on sky noise, while trails in either frame stay a minority. The pairs are
    :func:`_theil_sen_positions` in the x-sorted order (stable: ties keep their sample order).
    """
    n = x.size
    first, second = _theil_sen_positions(n, {}, max_pairs)
    if first.size == 0:
        return 1.0, float(np.median(y - x))
    order = np.argsort(x, kind="stable")
    run = x[order[first]] - x[order[second]]
    usable = run > 0
    if not usable.any():
        return 1.0, float(np.median(y - x))
    gain = float(np.median((y[order[first]] - y[order[second]])[usable] / run[usable]))
    return gain, float(np.median(y - gain * x))


def _pair_gain_ratio(
    va: np.ndarray, vb: np.ndarray, x: np.ndarray, y: np.ndarray, kappa: float, fit_plane: bool
) -> tuple[float, float] | None:
    """log(g_a / g_b) and its variance, from symmetric clipped fits of a on b and b on a."""
    ones = np.ones_like(va)
    extra = [ones, x - x.mean(), y - y.mean()] if fit_plane else [ones]
    # Robust seeds: cells that one frame alone is bright in (trails, hot spots) are out from the start.
    gain_f, offset_f = _theil_sen_seed(vb, va)
    gain_b, offset_b = _theil_sen_seed(va, vb)
    seed = _mad_keep(va - (gain_f * vb + offset_f), kappa) & _mad_keep(vb - (gain_b * va + offset_b), kappa)
    forward = _clipped_lstsq_with_variance(np.stack([vb, *extra], axis=1), va, kappa, kept=seed)
    backward = _clipped_lstsq_with_variance(np.stack([va, *extra], axis=1), vb, kappa, kept=seed)
    if forward is None or backward is None or forward[0][0] <= 0 or backward[0][0] <= 0:
        return None
    (slope_f, *_), (var_f, *_) = forward
    (slope_b, *_), (var_b, *_) = backward
    log_ratio = 0.5 * (np.log(slope_f) - np.log(slope_b))
    variance = 0.25 * (var_f / slope_f**2 + var_b / slope_b**2) + SYSTEMATIC_LOG_GAIN**2
    return float(log_ratio), float(variance)


# --- batched pair fits ---------------------------------------------------------------------
# The same fits as :func:`_pair_gain_ratio` and :func:`_clipped_lstsq`, for many edges at once:
# each edge's samples are one row of padded (edges, cells) arrays, medians are one partition of
# the whole batch, least squares are centred normal equations solved for all rows together, and
# chunks of edges run in worker processes or on threads (:class:`_PairFitRunner`).
# Results equal the per-edge path to floating-point noise; a row whose normal matrix is too badly
# conditioned for normal equations (e.g. all its cells in one column) is refitted per edge.

#: Most edges fitted together: a few (2·``PAIR_CHUNK``, 3, cells) float64 arrays, some MB per chunk in flight.
PAIR_CHUNK = 32
#: Most threads fitting chunks at once (where no worker processes run). NumPy releases the GIL in
#: the partitions, gathers and sums, but the many mid-sized calls keep the gain small (the earlier
#: batched code: 2.1x over per-edge with 8 threads on a 16-core host, 1.5-1.7x with one thread on a
#: 2-core box).
MAX_PAIR_THREADS = 4
#: Fewer cores than this: one thread (on a 2-core machine the threads gained nothing measurable).
MIN_CORES_FOR_THREADS = 4
#: Worst condition number (scaled, centred normal matrix) accepted by the batched least squares.
_BATCH_MAX_CONDITION = 1e8
#: Theil–Sen slopes sampled per seed (``max_pairs`` of :func:`_theil_sen_seed`).
_THEIL_SEN_PAIRS = 20000
#: Sample counts whose Theil–Sen pairings a cache keeps: edges are chunked by overlap size, so a few
#: dozen counts cover the chunks in flight, and a thread pool or worker process holds at most ~20 MB
#: of pairings whatever the spread of overlap sizes (one entry per count in use made it grow with it).
_THEIL_SEN_CACHE_SIZE = 64


class _RowMedians:
    """Per-row medians of (E, M) arrays under one mask, the filler laid out once for every array.

    ``medians(values)[r] == np.median(values[r][mask[r]])`` (NaN for a row with nothing): every row's
    masked entries become -inf/+inf fillers, as many -inf as bring its middle element(s) to the same
    column for all rows, so one partition of the whole batch finds them. The clipping asks for two
    medians per mask (centre, then spread) and a seed for six: the fillers (a cumulative sum and two
    selections over the batch) are laid out once per mask instead of once per median.
    """

    def __init__(self, mask: np.ndarray) -> None:
        rows, width = mask.shape
        count = mask.sum(axis=1)
        lower = (np.maximum(count, 1) - 1) // 2
        self.k = int(lower.max()) if rows else 0
        filler = np.ones((rows, width + 2), bool)
        filler[:, :width] = ~mask
        rank = np.cumsum(filler, axis=1) - 1
        self.template = np.where(filler, np.where(rank < (self.k - lower)[:, None], -np.inf, np.inf), 0.0)
        self.mask = mask
        self.odd = count % 2 == 1
        self.empty = count == 0

    def __call__(self, values: np.ndarray) -> np.ndarray:
        padded = self.template.copy()
        np.copyto(padded[:, : values.shape[1]], values, where=self.mask)
        k = self.k
        padded.partition((k, k + 1), axis=1)
        median = np.where(self.odd, padded[:, k], (padded[:, k] + padded[:, k + 1]) / 2)
        median[self.empty] = np.nan
        return median


class _SortedRowMedians:
    """:class:`_RowMedians` for another array module (CuPy): one sort of the batch, masked entries last.

    The same order statistics and the same mean of the two middle values, so the same numbers as
    ``np.median`` of each row's masked values. On CuPy, float64 rows go to the radix-select kernel
    :func:`.gpu.fused_masked_row_medians` (the same numbers, no sort); the sort is its reference.
    """

    def __init__(self, mask: Any, xp: Any) -> None:
        count = mask.sum(axis=1)
        self.xp = xp
        self.mask = mask
        self.lower = ((xp.maximum(count, 1) - 1) // 2)[:, None]
        self.upper = (count // 2)[:, None]
        self.empty = count == 0

    def __call__(self, values: Any) -> Any:
        from .gpu import fused_masked_row_medians

        xp = self.xp
        fused = fused_masked_row_medians(values, self.mask, xp)  # the same medians, one kernel
        if fused is not None:
            return fused
        ordered = xp.sort(xp.where(self.mask, values, xp.inf), axis=1)
        low = xp.take_along_axis(ordered, self.lower, axis=1)[:, 0]
        high = xp.take_along_axis(ordered, self.upper, axis=1)[:, 0]
        return xp.where(self.empty, xp.nan, (low + high) / 2)


def _row_medians(mask: Any, xp: Any = np) -> "_RowMedians | _SortedRowMedians":
    """The per-row masked medians of ``xp``'s arrays (see :class:`_RowMedians`)."""
    return _RowMedians(mask) if xp is np else _SortedRowMedians(mask, xp)


def _masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, ``np.median(values[r][mask[r]])`` (NaN for a row with nothing), one partition for all rows."""
    return _RowMedians(mask)(values)


#: Fewest values for which :func:`exact_median` brackets the median (below, one partition is as fast).
_BRACKET_MIN_VALUES = 2048
#: Every how many values :func:`exact_median` samples to place its bracket.
_BRACKET_STRIDE = 8


def exact_median(values: np.ndarray) -> float:
    """``np.median(values)`` of a 1-D float array, bit for bit, partitioning only a narrow bracket.

    A partition of all values (the 20 000 slopes of a Theil–Sen seed) was the seeds' largest cost.
    A strided sample (the slopes come in random pair order) places a bracket [lo, hi] that holds the
    middle rank(s) with a margin of about 3σ of the sample's rank; counting the values below, inside
    and above it checks that exactly, and only the values inside (a few %) are partitioned. Order
    statistics are exact, so the result is the same number; a bracket that missed, or NaN, falls
    back to ``np.median``.
    """
    n = values.size
    if n < _BRACKET_MIN_VALUES:
        return float(np.median(values))
    lower, upper = (n - 1) // 2, n // 2
    sample = values[::_BRACKET_STRIDE].copy()
    m = sample.size
    margin = int(1.5 * np.sqrt(m)) + 2  # 3σ of the rank of the median in a sample of m (σ = √m / 2)
    ranks = (max(0, (m - 1) // 2 - margin), min(m - 1, m // 2 + margin))
    sample.partition(ranks)
    lo, hi = sample[ranks[0]], sample[ranks[1]]
    below = np.count_nonzero(values < lo)
    above = np.count_nonzero(values > hi)
    inside = values[(values >= lo) & (values <= hi)]
    if below + inside.size + above != n or not below <= lower <= upper < below + inside.size:
        return float(np.median(values))
    low_rank, high_rank = lower - below, upper - below
    inside.partition((low_rank, high_rank))
    # np.median's arithmetic: the middle value, or the mean of the two middle values.
    return float(inside[low_rank]) if low_rank == high_rank else float((inside[low_rank] + inside[high_rank]) / 2)


def _batched_lstsq(
    columns: Any, target: Any, kept: Any, xp: Any = np
) -> tuple[Any, Any, Any, Any]:
    """Least squares ``target ≈ intercept + Σ_q beta_q·columns_q`` of every row on its ``kept`` samples.

    ``columns`` (E, q, M) are the non-constant columns, sample axis last: the centring and the sums
    run along contiguous rows of M samples (a trailing axis of 3 or 4 made every step a slow
    strided loop). Returns beta (E, q), intercept (E,), the diagonal of the inverse normal matrix
    of beta (E, q), and the rows too ill-conditioned for this path (E,).
    """
    q = columns.shape[1]
    weight = kept.astype(xp.float64)
    count = xp.maximum(weight.sum(axis=1), 1.0)
    # Batched matrix products, not einsum: CuPy maps them straight to batched BLAS calls (its
    # einsum took 1.5x as long on an H100), NumPy runs them as fast as its einsum.
    mean_c = xp.matmul(columns, weight[:, :, None])[:, :, 0] / count[:, None]
    mean_t = (weight * target).sum(axis=1) / count
    centred = columns - mean_c[:, :, None]
    centred *= weight[:, None, :]  # in place: one (E, q, M) temporary, not two
    gram = xp.matmul(centred, centred.transpose(0, 2, 1))
    rhs = xp.matmul(centred, (target - mean_t[:, None])[:, :, None])[:, :, 0]
    scale = xp.sqrt(xp.diagonal(gram, axis1=1, axis2=2))
    bad = ~xp.all(xp.isfinite(scale) & (scale > 0), axis=1) | ~xp.all(xp.isfinite(rhs), axis=1)
    scale = xp.where(bad[:, None], 1.0, scale)
    identity = xp.eye(q)
    scaled = xp.where(bad[:, None, None], identity, gram / (scale[:, :, None] * scale[:, None, :]))
    eig = xp.linalg.eigvalsh(scaled)
    bad |= ~(eig[:, 0] > eig[:, -1] / _BATCH_MAX_CONDITION)
    scaled = xp.where(bad[:, None, None], identity, scaled)
    inverse = xp.linalg.inv(scaled)
    beta = xp.matmul(inverse, (rhs / scale)[:, :, None])[:, :, 0] / scale
    intercept = mean_t - (beta * mean_c).sum(axis=1)
    return beta, intercept, xp.diagonal(inverse, axis1=1, axis2=2) / scale**2, bad


def _batched_clip_loop(
    columns: Any,
    target: Any,
    valid: Any,
    kept: Any | None,
    kappa: float,
    iterations: int = 4,
    xp: Any = np,
) -> tuple[Any, Any, Any, Any, Any]:
    """:func:`_clip_loop` on every row of a batch (design: a constant and ``columns`` (E, q, M)), then
    the variance of beta_0 (:func:`_clipped_lstsq_with_variance`).

    Returns beta (E, q) and intercepts (E,) (NaN: too few samples), the variances of beta_0 (E,),
    whether a row has a solution (E,), and the rows to refit per edge (E,: ill-conditioned).
    """
    rows, q, _ = columns.shape
    p = q + 1
    kept = valid.copy() if kept is None else kept & valid
    beta = xp.full((rows, q), xp.nan)
    intercept = xp.full(rows, xp.nan)
    inverse_diag = xp.full((rows, q), xp.nan)
    final_kept = kept.copy()
    solved = xp.zeros(rows, bool)
    odd = xp.zeros(rows, bool)
    active = xp.ones(rows, bool)
    for _ in range(iterations):
        active &= kept.sum(axis=1) >= p + 3
        index = xp.flatnonzero(active)
        if index.size == 0:
            break
        if index.size == rows:  # every row still clipping (the first pass): no copies
            sub_columns, sub_target, sub_kept = columns, target, kept.copy()
        else:
            sub_columns, sub_target, sub_kept = columns[index], target[index], kept[index]
        fit, constant, diag, bad = _batched_lstsq(sub_columns, sub_target, sub_kept, xp)
        odd[index[bad]] = True
        active[index[bad]] = False
        beta[index], intercept[index], inverse_diag[index] = fit, constant, diag
        final_kept[index] = sub_kept
        solved[index] = True
        residual = sub_target - constant[:, None] - xp.matmul(fit[:, None, :], sub_columns)[:, 0, :]
        medians = _row_medians(sub_kept, xp)
        centre = medians(residual)
        deviation = xp.abs(residual - centre[:, None])
        sigma = 1.4826 * medians(deviation)
        new_kept = valid[index] & (deviation <= kappa * xp.maximum(sigma, 1e-12)[:, None])
        converged = xp.all(new_kept == sub_kept, axis=1)
        kept[index] = new_kept
        active[index[converged]] = False
    residual = target - xp.nan_to_num(intercept)[:, None] - xp.matmul(xp.nan_to_num(beta)[:, None, :], columns)[:, 0, :]
    rss = xp.where(final_kept, residual, 0.0)
    rss = (rss * rss).sum(axis=1)
    dof = xp.maximum(1, final_kept.sum(axis=1) - p)
    variance = inverse_diag[:, 0] * rss / dof
    return beta, intercept, variance, solved & ~odd, odd


@functools.lru_cache(maxsize=4)
def _theil_sen_uniforms(pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed uniform variates in [0, 1) that place a seed's sampled pairs (deterministic: same data,
    same answer), one array for the bright side and one for the faint side."""
    rng = np.random.default_rng(0)
    bright, faint = rng.random(pairs), rng.random(pairs)
    bright.flags.writeable = faint.flags.writeable = False
    return bright, faint


def _theil_sen_pairs(n: Any, xp: Any = np, pairs: int = _THEIL_SEN_PAIRS) -> tuple[Any, Any, Any]:
    """The (bright, faint) positions in x-sorted order that a Theil–Sen seed pairs, for sample counts
    ``n`` (R, 1): (first, second, used), each (R, ``pairs``).

    Every bright sample (the top quarter) with every faint one (the bottom half) when that makes at
    most ``pairs`` pairs (the first faint·bright of the row used); otherwise ``pairs`` pairs placed
    by :func:`_theil_sen_uniforms`. A formula of n alone: the host takes it per count
    (:func:`_theil_sen_positions`), the GPU for all rows at once (:func:`_batched_theil_sen_rows`).
    """
    faint, start = xp.maximum(1, n // 2), xp.maximum(1, (3 * n) // 4)
    bright = n - start
    k = xp.arange(pairs, dtype=xp.int64)[None, :]
    u_bright, u_faint = (xp.asarray(u) for u in _theil_sen_uniforms(pairs))
    sampled = faint * bright > pairs
    every = xp.maximum(bright, 1)
    first = xp.where(sampled, start + xp.minimum((u_bright[None, :] * bright).astype(xp.int64), bright - 1), start + k % every)
    second = xp.where(sampled, xp.minimum((u_faint[None, :] * faint).astype(xp.int64), faint - 1), k // every)
    used = (bright > 0) & (sampled | (k < faint * bright))
    return xp.where(used, first, 0), xp.where(used, second, 0), used


def _theil_sen_positions(
    n: int, cache: dict[int, tuple[np.ndarray, np.ndarray]], pairs: int = _THEIL_SEN_PAIRS
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_theil_sen_pairs` of one sample count, the used pairs only (as 1-D position arrays).

    ``cache`` keeps the pairings of the last ``_THEIL_SEN_CACHE_SIZE`` sample counts (320 kB each).
    """
    found = cache.get(n) if pairs == _THEIL_SEN_PAIRS else None
    if found is not None:
        return found
    first, second, used = _theil_sen_pairs(np.array([[n]], dtype=np.int64), np, pairs)
    positions = (first[used].astype(np.intp), second[used].astype(np.intp))
    if pairs != _THEIL_SEN_PAIRS:
        return positions
    if len(cache) >= _THEIL_SEN_CACHE_SIZE:
        try:
            cache.pop(next(iter(cache)), None)  # the oldest count: chunks come sorted by overlap size
        except (RuntimeError, StopIteration):  # another thread changed it meanwhile: no matter
            pass
    cache[n] = positions
    return positions


def _batched_theil_sen(
    x: Any, y: Any, medians: Any, count: Any, cache: dict, xp: Any = np
) -> tuple[Any, Any]:
    """:func:`_theil_sen_seed` of every row: gains (E,) and offsets (E,); ``medians`` holds the valid mask.

    On NumPy row by row (20 000 slopes per row: small arrays stay in cache, where a batch of them
    would not), with the pairings precomputed per sample count instead of drawn for every edge. Each
    row's (x, y) travel as one complex array, so one gather per side of the pairs gives both the
    run (real part) and the rise (imaginary part), exactly; the median is :func:`exact_median`.
    On another module (CuPy) all rows at once (:func:`_batched_theil_sen_rows`): the same pairs,
    slopes and medians.
    """
    if xp is not np:
        gain = _batched_theil_sen_rows(x, y, medians.mask, count, xp)
        return gain, medians(y - gain[:, None] * x)
    rows = x.shape[0]
    gain = np.ones(rows)
    for r in range(rows):
        n = int(count[r])
        first, second = _theil_sen_positions(n, cache)
        if first.size == 0:
            continue
        xr = x[r, :n]
        order = np.argsort(xr, kind="stable")  # as _theil_sen_seed sorts: ties in sample order
        points = np.empty(n, np.complex128)
        points.real = xr[order]
        points.imag = y[r, :n][order]
        delta = points.take(first) - points.take(second)
        run, rise = delta.real, delta.imag
        usable = run > 0
        if usable.all():  # the usual case: no copies
            gain[r] = exact_median(rise / run)
        elif usable.any():
            gain[r] = exact_median(rise[usable] / run[usable])
    offset = medians(y - gain[:, None] * x)
    return gain, offset


def _batched_theil_sen_rows(x: Any, y: Any, valid: Any, count: Any, xp: Any, pairs: int = _THEIL_SEN_PAIRS) -> Any:
    """The Theil–Sen gains of every row at once: :func:`_theil_sen_pairs` of each row's count, a
    stable sort of each row's valid samples, and one masked median of the slopes."""
    order = xp.argsort(xp.where(valid, x, xp.inf), axis=1, kind="stable")  # ties in sample order, padding last
    xs = xp.take_along_axis(x, order, axis=1)
    ys = xp.take_along_axis(y, order, axis=1)
    first, second, used = _theil_sen_pairs(count.astype(xp.int64)[:, None], xp, pairs)
    run = xp.take_along_axis(xs, first, axis=1) - xp.take_along_axis(xs, second, axis=1)
    rise = xp.take_along_axis(ys, first, axis=1) - xp.take_along_axis(ys, second, axis=1)
    usable = used & (run > 0)
    slope = xp.where(usable, rise / xp.where(usable, run, 1.0), 0.0)
    gain = _SortedRowMedians(usable, xp)(slope)
    return xp.where(usable.any(axis=1), gain, 1.0)


def _batched_mad_keep(residual: Any, medians: Any, kappa: float, xp: Any = np) -> Any:
    centre = medians(residual)
    deviation = xp.abs(residual - centre[:, None])
    sigma = 1.4826 * medians(deviation)
    return medians.mask & (deviation <= kappa * xp.maximum(sigma, 1e-12)[:, None])


def _pad_samples(samples: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """(va, vb, x, y) of each edge as padded (E, M) arrays, the valid mask and the counts."""
    count = np.array([s[0].size for s in samples])
    width = int(count.max())
    arrays = [np.zeros((len(samples), width)) for _ in range(4)]
    for r, sample in enumerate(samples):
        for array, values in zip(arrays, sample):
            array[r, : values.size] = values
    valid = np.arange(width)[None, :] < count[:, None]
    return (*arrays, valid, count)


def _gain_ratio_fits(
    va: Any, vb: Any, x: Any, y: Any, valid: Any, count: Any, kappa: float, cache: dict, xp: Any = np
) -> tuple[Any, Any, Any, Any]:
    """The fits of :func:`_pair_gain_ratio` (``fit_plane=True``) on padded (E, M) samples (each row's
    valid samples first): slopes (2E, 3), variances of the first slope (2E,), solved and ill-conditioned
    rows (2E,); rows 0..E-1 fit a on b (forward), rows E..2E-1 b on a (backward)."""
    rows = va.shape[0]
    xc = xp.where(valid, x - (x.sum(axis=1) / count)[:, None], 0.0)
    yc = xp.where(valid, y - (y.sum(axis=1) / count)[:, None], 0.0)
    medians = _row_medians(valid, xp)  # six medians under the same mask
    gain_f, offset_f = _batched_theil_sen(vb, va, medians, count, cache, xp)
    gain_b, offset_b = _batched_theil_sen(va, vb, medians, count, cache, xp)
    seed = _batched_mad_keep(va - (gain_f[:, None] * vb + offset_f[:, None]), medians, kappa, xp)
    seed &= _batched_mad_keep(vb - (gain_b[:, None] * va + offset_b[:, None]), medians, kappa, xp)
    # Forward fits (a on b) in the first rows, backward (b on a) in the next: one batch of 2E rows.
    columns = xp.empty((2 * rows, 3, va.shape[1]))
    columns[:rows, 0], columns[rows:, 0] = vb, va
    columns[:rows, 1] = columns[rows:, 1] = xc
    columns[:rows, 2] = columns[rows:, 2] = yc
    target = xp.concatenate([va, vb])
    both_valid = xp.concatenate([valid, valid])
    slopes, _, variance, solved, odd = _batched_clip_loop(
        columns, target, both_valid, xp.concatenate([seed, seed]), kappa, xp=xp
    )
    return slopes, variance, solved, odd


def _gain_ratio_results(
    slopes: np.ndarray, variance: np.ndarray, solved: np.ndarray, odd: np.ndarray,
    refit: Callable[[int], "tuple[float, float] | None"],
) -> list[tuple[float, float] | None]:
    """Per edge, log(g_a / g_b) and its variance from :func:`_gain_ratio_fits`' host arrays (None: no
    fit); an ill-conditioned edge is fitted again by ``refit(row)`` (the per-edge code)."""
    rows = odd.size // 2
    results: list[tuple[float, float] | None] = []
    for r in range(rows):
        if odd[r] or odd[rows + r]:
            results.append(refit(r))
            continue
        slope_f, slope_b = slopes[r, 0], slopes[rows + r, 0]
        if not (solved[r] and solved[rows + r]) or not (slope_f > 0 and slope_b > 0):
            results.append(None)
            continue
        log_ratio = 0.5 * (np.log(slope_f) - np.log(slope_b))
        var = 0.25 * (variance[r] / slope_f**2 + variance[rows + r] / slope_b**2) + SYSTEMATIC_LOG_GAIN**2
        results.append((float(log_ratio), float(var)))
    return results


def _batched_pair_gain_ratios(
    samples: Sequence[tuple[np.ndarray, ...]], kappa: float, cache: dict
) -> list[tuple[float, float] | None]:
    """:func:`_pair_gain_ratio` (``fit_plane=True``) of every edge's common cells."""
    va, vb, x, y, valid, count = _pad_samples(samples)
    slopes, variance, solved, odd = _gain_ratio_fits(va, vb, x, y, valid, count, kappa, cache)
    return _gain_ratio_results(
        slopes, variance, solved, odd, lambda r: _pair_gain_ratio(*samples[r], kappa=kappa, fit_plane=True)
    )


def _plane_fits(
    va: Any, vb: Any, x: Any, y: Any, valid: Any, gain_a: Any, gain_b: Any, kappa: float, xp: Any = np
) -> tuple[Any, Any, Any, Any]:
    """The clipped fits of ``va/g_a − vb/g_b = c + a·X + b·Y`` on padded (E, M) samples, ``gain_a``,
    ``gain_b`` (E,): tilts (E, 2), constants (E,), solved and ill-conditioned rows (E,)."""
    difference = xp.where(valid, va / gain_a[:, None] - vb / gain_b[:, None], 0.0)
    tilts, constant, _, solved, odd = _batched_clip_loop(xp.stack([x, y], axis=1), difference, valid, None, kappa, xp=xp)
    return tilts, constant, solved, odd


def _plane_fit_results(
    tilts: np.ndarray, constant: np.ndarray, solved: np.ndarray, odd: np.ndarray,
    refit: Callable[[int], "np.ndarray | None"],
) -> list[np.ndarray | None]:
    """Per edge, (c, a, b) from :func:`_plane_fits`' host arrays (None: no fit); an ill-conditioned
    edge is fitted again by ``refit(row)`` (the per-edge code)."""
    return [
        refit(r) if odd[r] else (np.array([constant[r], tilts[r, 0], tilts[r, 1]]) if solved[r] else None)
        for r in range(odd.size)
    ]


def _plane_refit(va: np.ndarray, vb: np.ndarray, x: np.ndarray, y: np.ndarray, gain_a: float, gain_b: float, kappa: float):
    """:func:`_clipped_lstsq` of one edge's plane (an ill-conditioned row of a batch)."""
    return _clipped_lstsq(np.stack([np.ones_like(x), x, y], axis=1), va / gain_a - vb / gain_b, kappa)


def _batched_plane_fits(
    samples: Sequence[tuple[np.ndarray, ...]], edges: Sequence[tuple[int, int]], gains: np.ndarray, kappa: float
) -> list[np.ndarray | None]:
    """:func:`_clipped_lstsq` of ``va/g_i − vb/g_j = c + a·X + b·Y`` for every edge: (c, a, b) or None."""
    va, vb, x, y, valid, _ = _pad_samples(samples)
    index = np.array(edges, dtype=int).reshape(-1, 2)
    gain_a, gain_b = gains[index[:, 0]], gains[index[:, 1]]
    tilts, constant, solved, odd = _plane_fits(va, vb, x, y, valid, gain_a, gain_b, kappa)
    return _plane_fit_results(
        tilts, constant, solved, odd, lambda r: _plane_refit(*samples[r], gain_a[r], gain_b[r], kappa)
    )


# --- where the batched pair fits run ------------------------------------------------------------
# A solve's pair fits are tasks of up to ``PAIR_CHUNK`` edges of one channel: the task gathers its
# edges' common cells itself (so only the chunks being fitted hold samples) and fits them batched.
# Tasks run on threads in this process, or, for large solves on machines with many cores, in worker
# processes that hold the solve's pieces in shared memory: the fits are many mid-sized NumPy calls
# that hold the GIL between them, so threads scale poorly (2.1x with 8 threads on 16 cores) where
# processes do not. Either way every edge is fitted by the same code on the same numbers.

#: Where the batched pair fits run: "auto" (worker processes for solves of at least
#: ``MIN_EDGES_FOR_PROCESSES`` edges on machines of at least ``MIN_CORES_FOR_PROCESSES`` cores, where
#: processes can start; threads otherwise), "threads", or "processes" (whenever they can start).
PAIR_EXECUTOR = "auto"
#: Fewest cores for worker processes ("auto").
MIN_CORES_FOR_PROCESSES = 4
#: Fewest overlap edges for worker processes ("auto"): starting them (and, the first time in a
#: process, the forkserver) costs more than a smaller solve takes on threads.
MIN_EDGES_FOR_PROCESSES = 512
#: Most worker processes for one solve.
MAX_PAIR_PROCESSES = 32
#: Fewest edges per task in worker processes (smaller chunks, for balance over many workers, pay
#: NumPy's per-call costs on too few rows).
MIN_PROCESS_CHUNK = 8

#: Fewest overlap edges whose pair fits run on the GPU when the solve is given CuPy: below, the host
#: fits them in less time than the GPU's kernels take to compile the first time on a machine (about
#: 25 s of NVRTC, cached on disk by CuPy afterwards).
DEVICE_MIN_EDGES = 512

PairTask = tuple[str, str, int, list[tuple[int, int, int]], "np.ndarray | None"]  # kind, set, channel, (k, i, j), gains


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _run_pair_task(
    pieces: Sequence[CoarsePiece], task: PairTask, kappa: float, min_cells: int, cache: dict
) -> list[tuple[int, int, int, int, object]]:
    """One task's fits: ``(k, i, j, cells, result)`` for its edges with at least ``min_cells`` common cells.

    ``kind`` "gain": :func:`_batched_pair_gain_ratios`; "plane": :func:`_batched_plane_fits` with
    the channel's ``gains`` (N,).
    """
    kind, _, channel, edges, gains = task
    kept, samples = [], []
    for k, i, j in edges:
        common = _common_cells(pieces[i], pieces[j], channel)
        if common is not None and common[0].size >= min_cells:
            kept.append((k, i, j))
            samples.append(common)
    if not samples:
        return []
    if kind == "gain":
        results = _batched_pair_gain_ratios(samples, kappa, cache)
    else:
        results = _batched_plane_fits(samples, [(i, j) for _, i, j in kept], gains, kappa)
    return [(k, i, j, common[0].size, result) for (k, i, j), common, result in zip(kept, samples, results)]


# State of a worker process: the pieces of the solve (views of the shared memory) and its seeds' pairings.
_WORKER: dict = {}


def _init_pair_worker(shm_name: str, layout: dict, kappa: float, min_cells: int) -> None:
    import sys
    from multiprocessing import shared_memory

    # The parent owns (and unlinks) the memory: a worker only maps it.
    extra = {"track": False} if sys.version_info >= (3, 13) else {}
    shm = shared_memory.SharedMemory(name=shm_name, **extra)
    pieces = {
        key: [
            CoarsePiece(y0, x0, np.ndarray(shape, np.dtype(dtype), buffer=shm.buf, offset=offset))
            for offset, shape, dtype, y0, x0 in entries
        ]
        for key, entries in layout.items()
    }
    _WORKER.update(shm=shm, pieces=pieces, kappa=kappa, min_cells=min_cells, cache={})


def _pair_task_in_worker(task: PairTask) -> list[tuple[int, int, int, int, object]]:
    return _run_pair_task(_WORKER["pieces"][task[1]], task, _WORKER["kappa"], _WORKER["min_cells"], _WORKER["cache"])


def _share_pieces(piece_sets: dict[str, Sequence[CoarsePiece]]):
    """All pieces in one shared-memory block (one copy however many workers read them) and its layout."""
    from multiprocessing import shared_memory

    layout: dict[str, list[tuple]] = {}
    total = 0
    for key, pieces in piece_sets.items():
        entries = []
        for piece in pieces:
            entries.append((total, piece.data.shape, piece.data.dtype.str, piece.y0, piece.x0))
            total += -(-piece.data.nbytes // 64) * 64  # 64-byte aligned, like NumPy's own buffers
        layout[key] = entries
    shm = shared_memory.SharedMemory(create=True, size=max(total, 1))
    for key, pieces in piece_sets.items():
        for piece, (offset, shape, dtype, _, _) in zip(pieces, layout[key]):
            np.ndarray(shape, np.dtype(dtype), buffer=shm.buf, offset=offset)[...] = piece.data
    return shm, layout


def _processes_can_start() -> bool:
    """Worker processes can start here: not inside a daemonic process (a Dask worker: processes cannot
    have children there), and ``__main__`` can be imported again by a child (stdin scripts cannot)."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return False
    from .mosaic_first import _main_module_is_importable  # the project's process conventions

    return _main_module_is_importable()


class _PairFitRunner:
    """Runs the batched pair fits of one solve (all its passes): on threads, or in worker processes.

    Use as a context manager: worker processes and the shared memory are released on exit. A
    process pool that breaks (or cannot start) leaves the remaining work to threads.
    """

    def __init__(self, piece_sets: dict[str, Sequence[CoarsePiece]], kappa: float, min_cells: int, n_edges: int) -> None:
        self.piece_sets = piece_sets
        self.kappa = kappa
        self.min_cells = min_cells
        self.cache: dict = {}  # Theil–Sen pairings of the threads
        self.pool = None
        self.shm = None
        cpus = _cpu_count()
        mode = PAIR_EXECUTOR
        if mode not in ("auto", "threads", "processes"):
            raise ValueError(f"unknown pair executor {mode!r}")
        wanted = mode == "processes" or (
            mode == "auto" and cpus >= MIN_CORES_FOR_PROCESSES and n_edges >= MIN_EDGES_FOR_PROCESSES
        )
        self.workers = 1
        if wanted and _processes_can_start():
            self._start_pool(min(cpus, MAX_PAIR_PROCESSES, max(1, -(-n_edges // MIN_PROCESS_CHUNK))))

    @property
    def kind(self) -> str:
        return "processes" if self.pool is not None else "threads"

    def _start_pool(self, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        from .worker_env import process_context

        try:
            self.workers = workers
            self.shm, layout = _share_pieces(self.piece_sets)
            self.pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=process_context(), initializer=_init_pair_worker,
                initargs=(self.shm.name, layout, self.kappa, self.min_cells),
            )
        except (OSError, ValueError):  # no shared memory here (e.g. a full /dev/shm): threads
            self.close()

    def close(self) -> None:
        self.workers = 1
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None

    def __enter__(self) -> "_PairFitRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gain_ratios(self, key: str, channels: Sequence[int], edges: Sequence[tuple[int, int]]) -> list[list[tuple]]:
        """:func:`_batched_pair_gain_ratios` of every edge on each channel: per channel, ``(i, j, cells, fit)``
        in edge order (edges with fewer than ``min_cells`` common cells left out)."""
        return self._run("gain", key, channels, edges, None)

    def plane_fits(
        self, key: str, channels: Sequence[int], edges: Sequence[tuple[int, int]], gains: np.ndarray
    ) -> list[list[tuple]]:
        """:func:`_batched_plane_fits` with ``gains`` (N, C): per channel, ``(i, j, cells, coefficients)``."""
        return self._run("plane", key, channels, edges, gains)

    def _run(self, kind: str, key: str, channels: Sequence[int], edges, gains) -> list[list[tuple]]:
        tasks = self._tasks(kind, key, channels, edges, gains)
        done: list[list] = []
        if self.pool is not None:
            from concurrent.futures.process import BrokenProcessPool

            try:
                done = list(self.pool.map(_pair_task_in_worker, tasks))
            except (BrokenProcessPool, OSError):  # a worker died (killed, out of memory): finish on threads
                self.close()
        if self.pool is None:
            done = self._run_on_threads(key, tasks)
        by_channel: dict[int, list] = {channel: [] for channel in channels}
        for task, results in zip(tasks, done):
            by_channel[task[2]].extend(results)
        return [[fit[1:] for fit in sorted(by_channel[channel], key=lambda fit: fit[0])] for channel in channels]

    def _tasks(self, kind: str, key: str, channels: Sequence[int], edges, gains) -> list[PairTask]:
        # Edges of similar overlap share a chunk: each chunk's arrays are padded to its largest overlap.
        bounds = _piece_bounds(self.piece_sets[key])
        pairs = np.array(edges, dtype=np.int64).reshape(-1, 2)
        first, second = bounds[pairs[:, 0]], bounds[pairs[:, 1]]
        height = np.minimum(first[:, 1], second[:, 1]) - np.maximum(first[:, 0], second[:, 0])
        width = np.minimum(first[:, 3], second[:, 3]) - np.maximum(first[:, 2], second[:, 2])
        order = np.argsort(np.clip(height, 0, None) * np.clip(width, 0, None), kind="stable")
        indexed = [(int(k), int(pairs[k, 0]), int(pairs[k, 1])) for k in order]
        size = PAIR_CHUNK
        if self.pool is not None:
            # About four tasks per worker: the last round of tasks leaves few workers idle.
            size = min(PAIR_CHUNK, max(MIN_PROCESS_CHUNK, -(-len(indexed) * len(channels) // (4 * self.workers))))
        chunks = [indexed[start : start + size] for start in range(0, len(indexed), size)]
        return [
            (kind, key, channel, chunk, None if gains is None else np.asarray(gains[:, channel], np.float64))
            for channel in channels
            for chunk in chunks
        ]

    def _run_on_threads(self, key: str, tasks: list[PairTask]) -> list[list]:
        from concurrent.futures import ThreadPoolExecutor

        pieces = self.piece_sets[key]

        def run(task: PairTask) -> list:
            return _run_pair_task(pieces, task, self.kappa, self.min_cells, self.cache)

        cpus = _cpu_count()
        workers = min(len(tasks), cpus, MAX_PAIR_THREADS) if cpus >= MIN_CORES_FOR_THREADS else 1
        if workers <= 1:
            return [run(task) for task in tasks]
        # Tasks gather their own samples: only the chunks being fitted hold them, whatever the number of edges.
        with ThreadPoolExecutor(workers, thread_name_prefix="zemosaic-photometry") as pool:
            return list(pool.map(run, tasks))


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label of every node (isolated nodes get their own label)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(edges) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _graph_solve(
    n: int,
    edges: np.ndarray,
    differences: np.ndarray,
    weights: np.ndarray,
    anchor_priority: Sequence[int] | None = None,
) -> np.ndarray:
    """x minimising Σ w (x_i − x_j − d_ij)² with a gauge on each connected component.

    Gauge: median(x) = 0 on each component, or, with ``anchor_priority``, x = 0 at the first
    listed node of each component (components without a listed node keep the median gauge).

    ``differences`` of shape ``(E, K)`` solve K problems on the same graph and weights (e.g. the
    three plane coefficients of an edge) with one factorisation; the result is then ``(n, K)``,
    each column what a call with that column alone gives.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    differences = np.asarray(differences, dtype=np.float64)
    columns = differences.reshape(len(differences), -1)
    if len(edges) == 0:
        return np.zeros((n,) + differences.shape[1:])
    i, j = edges[:, 0], edges[:, 1]
    laplacian = coo_matrix(
        (np.concatenate([weights, weights, -weights, -weights]), (np.concatenate([i, j, i, j]), np.concatenate([i, j, j, i]))),
        shape=(n, n),
    ).tocsc()
    # A tiny ridge makes each component's system non-singular (it pins the component mean near 0).
    ridge = 1e-9 * float(weights.max())
    factors = splu(laplacian + ridge * _identity(n), permc_spec="COLAMD")
    labels = _components(n, edges)
    anchors = _component_anchors(labels, anchor_priority)
    solution = np.empty((n, columns.shape[1]))
    for k in range(columns.shape[1]):
        weighted = weights * columns[:, k]
        rhs = np.bincount(i, weighted, minlength=n) - np.bincount(j, weighted, minlength=n)
        solution[:, k] = factors.solve(rhs)
        for label in np.unique(labels):
            members = labels == label
            anchor = anchors.get(int(label))
            solution[members, k] -= solution[anchor, k] if anchor is not None else np.median(solution[members, k])
    return solution.reshape((n,) + differences.shape[1:])


def _solve_plane_graphs(
    n: int, graphs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], priority: Sequence[int] | None
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each channel's plane coefficients (c, a, b) over the graph from its ``(edges, (E, 3)
    differences, weights)``: channels whose edges and weights are the same (the usual case: every
    channel fitted on the same cells) share one factorisation, with the numbers of a solve each."""
    solved: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    groups: dict[tuple[bytes, bytes, tuple[int, ...]], list[int]] = {}
    for channel, (edges, _, weights) in graphs.items():
        groups.setdefault((edges.tobytes(), weights.tobytes(), edges.shape), []).append(channel)
    for channels in groups.values():
        edges, _, weights = graphs[channels[0]]
        together = _graph_solve(n, edges, np.concatenate([graphs[c][1] for c in channels], axis=1), weights, priority)
        for k, channel in enumerate(channels):
            c, a, b = together[:, 3 * k : 3 * k + 3].T
            solved[channel] = (c, a, b)
    return solved


def _component_anchors(labels: np.ndarray, priority: Sequence[int] | None) -> dict[int, int]:
    """The first node of ``priority`` in each component: {component label: node}."""
    anchors: dict[int, int] = {}
    for node in priority or ():
        anchors.setdefault(int(labels[int(node)]), int(node))
    return anchors


def _identity(n: int):
    from scipy.sparse import identity

    return identity(n, format="csc")


def connectivity_order(n: int, edges: Sequence[tuple[int, int]], cells: Sequence[float]) -> list[int]:
    """Nodes from best to least connected: most overlap neighbours, then most common cells, then index."""
    degree = np.zeros(n)
    total = np.zeros(n)
    for (i, j), count in zip(edges, cells):
        degree[i] += 1
        degree[j] += 1
        total[i] += count
        total[j] += count
    return sorted(range(n), key=lambda k: (-degree[k], -total[k], k))


def fit_gain_ratio(
    va: np.ndarray, vb: np.ndarray, x: np.ndarray, y: np.ndarray, kappa: float = 3.0, fit_plane: bool = True
) -> tuple[float, float] | None:
    """Gain ratio ``a/b`` of two images of the same sky and the σ of its logarithm (None: no fit).

    ``va``, ``vb`` are matched samples (e.g. coarse cells) at coordinates ``x``, ``y``; the fit is
    the symmetric sigma-clipped one of :func:`solve_normalisation` (``a = r·b + plane`` both ways),
    so additive differences (sky level and gradient) never pass for a gain.
    """
    if va.size < (6 if fit_plane else 4):
        return None
    fit = _pair_gain_ratio(va, vb, x, y, kappa=kappa, fit_plane=fit_plane)
    if fit is None or not np.isfinite(fit[0]) or not np.isfinite(fit[1]):
        return None
    return float(np.exp(fit[0])), float(np.sqrt(fit[1]))


def _under_constrained(n: int, sample_edges: np.ndarray, gain_edges: np.ndarray) -> bool:
    """True when the gain edges leave apart pieces that the overlaps tie together."""
    if len(sample_edges) == 0:
        return False
    nodes = np.unique(sample_edges)
    sample_labels = _components(n, sample_edges)[nodes]
    gain_labels = _components(n, gain_edges if len(gain_edges) else np.zeros((0, 2), int))[nodes]
    return len(np.unique(gain_labels)) > len(np.unique(sample_labels))


#: With ``offset_only_fallback``, a pairwise gain this uncertain (σ of log gain) ties nothing.
MAX_LOG_GAIN_SIGMA = 0.05


MAX_CELLS_PER_PIECE = 3000


def coarsening_factor(pieces: Sequence[CoarsePiece]) -> int:
    """Power of two that brings the median piece to at most ``MAX_CELLS_PER_PIECE`` cells."""
    sizes = [p.data.shape[1] * p.data.shape[2] for p in pieces if p.data.size]
    if not sizes:
        return 1
    factor = 1
    while float(np.median(sizes)) / factor**2 > MAX_CELLS_PER_PIECE:
        factor *= 2
    return factor


def coarsened_pieces(pieces: Sequence[CoarsePiece]) -> tuple[list[CoarsePiece], int]:
    """The pieces :func:`solve_normalisation` fits, and the factor of their cells
    (:func:`coarsening_factor`): large frames get fewer, bigger cells, which keep the pairwise fits
    fast without losing the signal. Pieces coarsened ahead of a solve, by the factor that solve
    would use, are solved as it would with ``bin_px`` times the factor."""
    factor = coarsening_factor(pieces)
    if factor == 1:
        return list(pieces), 1
    return _coarser_pieces(pieces, factor), factor


#: Cells of the padded stack :func:`_coarser_pieces` coarsens at once: a few pieces, small enough to
#: stay in the processor's cache (larger stacks took twice as long).
COARSEN_CHUNK_CELLS = 2**18


def _coarser_pieces(pieces: Sequence[CoarsePiece], factor: int) -> list[CoarsePiece]:
    """``coarse_piece(piece.data, (piece.y0, 0, piece.x0, 0), factor)`` of every piece on the coarse grid.

    The whole blocks of a few pieces at a time (``COARSEN_CHUNK_CELLS``) are copied into one padded
    stack, whose block means are ``factor²`` strided float64 sums, in the block's row-major order,
    then one division: the same numbers (tested against :func:`coarse_piece`) in a third of the
    NumPy calls of a piece at a time. (P4.5 waits for this while P2's metrics are digested on
    another thread: each call gives the GIL away and queues to take it back.)
    """
    coarser: list[CoarsePiece] = []
    chunk: list[tuple[CoarsePiece, int, int, int, int, int, int]] = []
    chunk_cells = 0
    for piece in pieces:
        channels, height, width = piece.data.shape
        cy0, cx0 = -(-piece.y0 // factor), -(-piece.x0 // factor)
        top, left = cy0 * factor - piece.y0, cx0 * factor - piece.x0
        n_rows, n_cols = max((height - top) // factor, 0), max((width - left) // factor, 0)
        cells = channels * n_rows * n_cols * factor * factor
        if chunk and chunk_cells + cells > COARSEN_CHUNK_CELLS:
            coarser.extend(_coarsen_chunk(chunk, factor))
            chunk, chunk_cells = [], 0
        chunk.append((piece, cy0, cx0, top, left, n_rows, n_cols))
        chunk_cells += cells
    if chunk:
        coarser.extend(_coarsen_chunk(chunk, factor))
    return coarser


def _coarsen_chunk(chunk: Sequence[tuple[CoarsePiece, int, int, int, int, int, int]], factor: int) -> list[CoarsePiece]:
    """The coarser pieces of ``chunk`` (piece, first coarser cell, offset of its first whole block,
    whole blocks): their blocks in one zero-padded stack, whose padding no kept cell reads."""
    channels = max(entry[0].data.shape[0] for entry in chunk)
    rows = max(entry[5] for entry in chunk)
    cols = max(entry[6] for entry in chunk)
    dtype = np.result_type(*[entry[0].data.dtype for entry in chunk])
    stack = np.zeros((len(chunk), channels, rows * factor, cols * factor), dtype=dtype)
    for slot, (piece, _, _, top, left, n_rows, n_cols) in enumerate(chunk):
        stack[slot, : piece.data.shape[0], : n_rows * factor, : n_cols * factor] = piece.data[
            :, top : top + n_rows * factor, left : left + n_cols * factor
        ]
    total = stack[:, :, ::factor, ::factor].astype(np.float64)
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                total += stack[:, :, dy::factor, dx::factor]
    total /= factor * factor
    means = total.astype(np.float32)
    return [
        CoarsePiece(cy0, cx0, means[slot, : piece.data.shape[0], :n_rows, :n_cols] if n_rows and n_cols
                    else np.zeros((piece.data.shape[0], 0, 0), np.float32))
        for slot, (piece, cy0, cx0, _, _, n_rows, n_cols) in enumerate(chunk)
    ]


def solve_normalisation(
    pieces: Sequence[CoarsePiece],
    grid_shape: tuple[int, int] | None = None,
    method: str = "linear_fit",
    *,
    bin_px: int = 16,
    neighbours: int = 8,
    min_cells: int = 12,
    kappa: float = 3.0,
    anchor: int | str | None = None,
    gain_limits: tuple[float, float] | None = None,
    offset_only_fallback: bool = False,
    max_log_gain_sigma: float = MAX_LOG_GAIN_SIGMA,
    fixed_gains: np.ndarray | None = None,
    plane_solve: str = "graph",
    shared_gain: bool = False,
    pair_fits: str = "batched",
    gains_only: bool = False,
    xp: Any = np,
    device_budget_bytes: int = 0,
) -> Normalisation:
    """Per-frame gains, offsets and tilts that put every piece on one flux scale (see module docstring).

    ``grid_shape`` is accepted for callers that know the coarse canvas; the solve does not need it.

    Options (all off by default, so the frame-level solve is unchanged):

    * ``anchor`` — the gauge. ``None``: median gain 1 and median plane 0 on each connected group
      of pieces. ``"best_connected"``: on each group, the piece with the most overlap neighbours
      (then the most common cells) keeps gain 1, offset 0 and no tilt; an int names that piece
      for its group (the others still use their best-connected piece). ``anchors`` records them.
    * ``gain_limits`` — ``(low, high)``: gains are clipped into this range (relative to the
      gauge) before the planes are solved; ``clipped`` marks the pieces that hit a limit.
    * ``offset_only_fallback`` — when the reliable pairwise gains (σ of log gain at most
      ``max_log_gain_sigma``) do not tie together the pieces the overlaps connect, the gains
      cannot be solved: every gain stays 1 and only offsets are solved (``mode = "offset_only"``).
    * ``fixed_gains`` — ``(N, C)`` gains known from elsewhere (e.g. solved on other pieces of the
      same tiles): only the offsets and planes are solved, with these gains.
    * ``shared_gain`` — one gain per piece for all channels, fitted on the luminance (the sum of
      the channels); offsets and planes stay per channel. Haze and thin cloud dim all colours
      alike, and the luminance has the best signal, so the weak links between panels are not
      left to the faintest channel (on the demo night: ±0.7 % instead of up to 2.8 % in blue).
    * ``plane_solve`` — ``"graph"``: each edge's plane is fitted alone and each coefficient is
      solved over the graph on its own (fast, for thousands of frames). ``"joint"``: one weighted
      least-squares problem over every kept common cell of every edge, all planes at once
      (:func:`_joint_plane_solve`). Long, narrow overlaps (panel seams) leave a pairwise tilt across
      them nearly undetermined; the joint solve takes each direction from where it is measured,
      so such tilts cannot leak into the other seams. For a few pieces (tiles, mega-tiles).
    * ``pair_fits`` — ``"batched"``: the pairwise fits of many edges at once (:func:`_batched_pair_gain_ratios`,
      :func:`_batched_plane_fits`), in worker processes on machines of many cores (``PAIR_EXECUTOR``,
      :class:`_PairFitRunner`); ``"reference"``: one edge after another, in this thread. Same results to
      floating-point noise; the reference is kept for comparison (``benchmarks/bench_photometry.py``).
    * ``gains_only`` — stop once the gains are solved (offsets, tilts and ``constrained`` stay unset).
    * ``xp`` — CuPy: the batched pair fits of a solve of at least ``DEVICE_MIN_EDGES`` edges run on the
      GPU (:class:`.photometry_device.DevicePairFits`, batches of edges within ``device_budget_bytes``);
      the graph solves stay on the host, and so do the fits of smaller solves.
    """
    if pair_fits not in ("batched", "reference"):
        raise ValueError(f"unknown pair_fits {pair_fits!r}")
    if plane_solve not in ("graph", "joint"):
        raise ValueError(f"unknown plane_solve {plane_solve!r}")
    pieces, factor = coarsened_pieces(pieces)
    bin_px *= factor
    n_channels = next((p.data.shape[0] for p in pieces if p.data.size), 1)
    luminance = None
    if shared_gain and fixed_gains is None and method == "linear_fit" and len(pieces) > 1:
        luminance = [CoarsePiece(p.y0, p.x0, p.data.sum(axis=0, keepdims=True)) for p in pieces]
    # One overlap graph for the luminance and the channels (the same piece bounds).
    edge_list = overlap_edges(_piece_bounds(pieces), neighbours, min_cells) if method != "none" and len(pieces) >= 2 else []
    options = dict(
        bin_px=bin_px, min_cells=min_cells, kappa=kappa, anchor=anchor, gain_limits=gain_limits,
        offset_only_fallback=offset_only_fallback, max_log_gain_sigma=max_log_gain_sigma, plane_solve=plane_solve,
    )
    piece_sets = {"pieces": pieces} if luminance is None else {"pieces": pieces, "luminance": luminance}
    # Only gain fits and the planes that go with them are batched (other methods fit per edge).
    batched = pair_fits == "batched" and method == "linear_fit" and bool(edge_list)
    runner: "_PairFitRunner | DevicePairFits | None" = None
    if batched and xp is not np and len(edge_list) >= DEVICE_MIN_EDGES:
        from .photometry_device import DevicePairFits

        runner = DevicePairFits(piece_sets, kappa, min_cells, xp, device_budget_bytes)
    elif batched:
        runner = _PairFitRunner(piece_sets, kappa, min_cells, len(edge_list))
    try:
        if luminance is not None:
            grey = _solve_pieces(luminance, "luminance", method, edge_list, runner, None, gains_only=True, **options)
            fixed_gains = np.repeat(grey.gains[:, :1], n_channels, axis=1)
        return _solve_pieces(pieces, "pieces", method, edge_list, runner, fixed_gains, gains_only=gains_only, **options)
    finally:
        if runner is not None:
            runner.close()


def _set_planes(result: Normalisation, channel: int, c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Store a channel's solved planes ``c + a·X + b·Y`` (corrected units, frame/gain) in frame
    units: tilts, and offsets at each frame's centre."""
    gains = result.gains[:, channel]
    result.tilts[:, channel, 0] = a * gains
    result.tilts[:, channel, 1] = b * gains
    result.offsets[:, channel] = (c + a * result.centres[:, 0] + b * result.centres[:, 1]) * gains


def _solve_pieces(
    pieces: Sequence[CoarsePiece],
    key: str,
    method: str,
    edge_list: Sequence[tuple[int, int]],
    runner: "_PairFitRunner | DevicePairFits | None",
    fixed_gains: np.ndarray | None,
    *,
    bin_px: int,
    min_cells: int,
    kappa: float,
    anchor: int | str | None,
    gain_limits: tuple[float, float] | None,
    offset_only_fallback: bool,
    max_log_gain_sigma: float,
    plane_solve: str,
    gains_only: bool,
) -> Normalisation:
    """:func:`solve_normalisation` of (already coarsened) ``pieces`` over ``edge_list``; with a ``runner``
    the pair fits are batched there (``key`` names the pieces in it), otherwise one edge at a time."""
    n_frames = len(pieces)
    n_channels = next((p.data.shape[0] for p in pieces if p.data.size), 1)
    result = Normalisation.identity(n_frames, n_channels, bin_px)
    result.centres = _piece_centres(pieces)
    result.mode = method
    result.clipped = np.zeros(n_frames, bool)
    if method == "none" or n_frames < 2:
        result.anchors = list(range(n_frames)) if anchor is not None else []
        return result
    fit_gain = method == "linear_fit"

    def edge_samples(channel: int) -> Iterator[tuple[int, int, tuple[np.ndarray, ...]]]:
        # Recomputed on each pass (slicing is cheap): keeping every edge's cells for every channel
        # would make memory grow with the number of frames.
        for i, j in edge_list:
            common = _common_cells(pieces[i], pieces[j], channel)
            if common is not None and common[0].size >= min_cells:
                yield i, j, common

    # The edges with enough common cells, for the gauge and the under-constrained test only (a pass
    # over every edge's cells: skipped when neither is asked for, as in Mosaic-First's solve).
    edge_sizes = [(i, j, common[0].size) for i, j, common in edge_samples(0)] if anchor is not None or offset_only_fallback else []
    sample_edges = np.array([(i, j) for i, j, _ in edge_sizes], dtype=int).reshape(-1, 2)
    priority: list[int] | None = None
    if anchor is not None:
        priority = connectivity_order(n_frames, [tuple(e) for e in sample_edges], [size for _, _, size in edge_sizes])
        if isinstance(anchor, (int, np.integer)) and not isinstance(anchor, bool):
            priority = [int(anchor)] + [k for k in priority if k != int(anchor)]

    gain_fits: list[list[tuple[int, int, float, float]]] = [[] for _ in range(n_channels)]
    if fixed_gains is not None:
        result.gains = np.array(fixed_gains, dtype=np.float64).reshape(n_frames, n_channels)
    batched = runner is not None
    if fit_gain and fixed_gains is None:
        batched_fits = runner.gain_ratios(key, range(n_channels), edge_list) if batched else []
        for channel in range(n_channels):
            if batched:
                fitted = batched_fits[channel]
            else:
                fitted = [
                    (i, j, common[0].size, _pair_gain_ratio(*common, kappa=kappa, fit_plane=True))
                    for i, j, common in edge_samples(channel)
                ]
            for i, j, _, fit in fitted:
                if fit is not None and np.isfinite(fit[0]) and np.isfinite(fit[1]):
                    if offset_only_fallback and np.sqrt(fit[1]) > max_log_gain_sigma:
                        continue  # too uncertain to tie two pieces' gains together
                    gain_fits[channel].append((i, j, fit[0], fit[1]))
        if offset_only_fallback and any(
            _under_constrained(n_frames, sample_edges, np.array([(i, j) for i, j, _, _ in fits], dtype=int).reshape(-1, 2))
            for fits in gain_fits
        ):
            fit_gain = False
            result.mode = "offset_only"

    constrained = np.zeros(n_frames, bool)
    for channel in range(n_channels):
        fits = gain_fits[channel]
        if fit_gain and fits and fixed_gains is None:
            gain_edges = np.array([(i, j) for i, j, _, _ in fits])
            log_ratios = np.array([f[2] for f in fits])
            gain_weights = np.array([1.0 / f[3] for f in fits], float)
            log_gain = _graph_solve(n_frames, gain_edges, log_ratios, gain_weights, priority)
            gains = np.exp(log_gain)
            if gain_limits is not None:
                low, high = float(gain_limits[0]), float(gain_limits[1])
                outside = (gains < low) | (gains > high)
                result.clipped |= outside
                gains = np.clip(gains, low, high)
            result.gains[:, channel] = gains
    batched_planes = batched and fit_gain and plane_solve == "graph"
    # Every channel's planes at once (their gains are all known): one pass of tasks for the runner.
    plane_fits = runner.plane_fits(key, range(n_channels), edge_list, result.gains) if batched_planes and not gains_only else []
    plane_graphs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for channel in range(n_channels) if not gains_only else ():
        gains = result.gains[:, channel]
        plane_edges, plane_diffs, plane_weights = [], [], []
        joint_rows: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, float]] = []
        if batched_planes:
            for i, j, cells, coefficients in plane_fits[channel]:
                if coefficients is None:
                    continue
                plane_edges.append((i, j))
                plane_diffs.append(coefficients)
                plane_weights.append(cells)
                constrained[i] = constrained[j] = True
        for i, j, (va, vb, x, y) in (() if batched_planes else edge_samples(channel)):
            difference = va / gains[i] - vb / gains[j]
            design = np.stack([np.ones_like(x), x, y], axis=1) if fit_gain else np.ones((x.size, 1))
            if plane_solve == "joint":
                kept = _clipped_keep(design, difference, kappa)
                if kept is None:
                    continue
                residual_sigma = _kept_sigma(design, difference, kept)
                joint_rows.append((i, j, x[kept], y[kept], difference[kept], residual_sigma))
                constrained[i] = constrained[j] = True
                continue
            coefficients = _clipped_lstsq(design, difference, kappa)
            if coefficients is None:
                continue
            full = np.zeros(3)
            full[: coefficients.size] = coefficients
            plane_edges.append((i, j))
            plane_diffs.append(full)
            plane_weights.append(va.size)
            constrained[i] = constrained[j] = True
        if joint_rows:
            _set_planes(result, channel, *_joint_plane_solve(n_frames, joint_rows, fit_gain, priority))
        elif plane_edges:
            plane_graphs[channel] = (np.array(plane_edges), np.array(plane_diffs), np.array(plane_weights, float))
    for channel, (c, a, b) in _solve_plane_graphs(n_frames, plane_graphs, priority).items():
        _set_planes(result, channel, c, a, b)
    if priority is not None:
        labels = _components(n_frames, sample_edges)
        sizes = np.bincount(labels)
        # Largest group first: its anchor sets the flux scale of most of the mosaic.
        result.anchors = sorted(_component_anchors(labels, priority).values(), key=lambda k: (-sizes[labels[k]], k))
    result.constrained = constrained
    result.iterations = 1
    return result

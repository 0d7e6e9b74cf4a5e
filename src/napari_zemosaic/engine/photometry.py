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

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

NORMALISATION_METHODS = ("none", "sky_mean", "linear_fit")

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


def coarse_piece(data: np.ndarray, bbox: tuple[int, int, int, int], bin_px: int) -> CoarsePiece:
    """Block means of a resampled piece on the coarse grid aligned to canvas multiples of ``bin_px``.

    A coarse cell is kept only when every pixel in it is covered, so frame edges
    (partially covered cells) never bias the fit.
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
        for local, row in enumerate(area):
            i = start + local
            row[i] = 0
            candidates = np.flatnonzero(row >= min_cells)
            if candidates.size > neighbours:
                # Half the strongest overlaps, half spread over the weaker ones: panel-to-panel
                # overlaps are weak but are what ties the panels' flux scales together.
                ranked = candidates[np.argsort(row[candidates], kind="stable")[::-1]]
                strong = neighbours - neighbours // 2
                spread = np.linspace(strong, ranked.size - 1, neighbours // 2).round().astype(int)
                candidates = np.unique(np.concatenate([ranked[:strong], ranked[spread]]))
            edges.update((min(i, int(j)), max(i, int(j))) for j in candidates)
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
    va = a.data[channel, y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0].astype(np.float64)
    vb = b.data[channel, y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0].astype(np.float64)
    rows, cols = np.mgrid[y0:y1, x0:x1]
    valid = np.isfinite(va) & np.isfinite(vb)
    return va[valid], vb[valid], cols[valid].astype(np.float64), rows[valid].astype(np.float64)


def _mad_keep(residual: np.ndarray, kappa: float) -> np.ndarray:
    centre = np.median(residual)
    sigma = 1.4826 * np.median(np.abs(residual - centre))
    return np.abs(residual - centre) <= kappa * max(sigma, 1e-12)


def _clipped_lstsq(
    design: np.ndarray, target: np.ndarray, kappa: float, iterations: int = 4, kept: np.ndarray | None = None
) -> np.ndarray | None:
    fit = _clipped_lstsq_with_variance(design, target, kappa, iterations, kept)
    return None if fit is None else fit[0]


def _clipped_lstsq_with_variance(
    design: np.ndarray, target: np.ndarray, kappa: float, iterations: int = 4, kept: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Least squares with iterative kappa-sigma clipping of residuals (sigma from the MAD).

    ``kept`` seeds the clipping (e.g. from a resistant fit), so high-leverage outliers such as a
    satellite trail never get to pull the first solution.
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


def _theil_sen_seed(x: np.ndarray, y: np.ndarray, max_pairs: int = 20000) -> tuple[float, float]:
    """Median slope between bright and faint cells of ``x`` (Theil–Sen, robust to leverage outliers).

    Pairing the brightest quarter with the faintest half keeps every slope anchored on real signal
    (stars, nebula), not on sky noise, while trails in either frame stay a minority.
    """
    order = np.argsort(x)
    n = x.size
    faint, bright = order[: max(1, n // 2)], order[max(1, (3 * n) // 4) :]
    if bright.size == 0:
        return 1.0, float(np.median(y - x))
    if faint.size * bright.size > max_pairs:
        rng = np.random.default_rng(0)  # deterministic: same data, same answer
        first = rng.choice(bright, max_pairs)
        second = rng.choice(faint, max_pairs)
    else:
        first, second = (grid.ravel() for grid in np.meshgrid(bright, faint))
    run = x[first] - x[second]
    usable = run > 0
    if not usable.any():
        return 1.0, float(np.median(y - x))
    gain = float(np.median((y[first] - y[second])[usable] / run[usable]))
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


def _graph_solve(n: int, edges: np.ndarray, differences: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """x minimising Σ w (x_i − x_j − d_ij)² with median(x) = 0 on each connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import spsolve

    if len(edges) == 0:
        return np.zeros(n)
    i, j = edges[:, 0], edges[:, 1]
    laplacian = coo_matrix(
        (np.concatenate([weights, weights, -weights, -weights]), (np.concatenate([i, j, i, j]), np.concatenate([i, j, j, i]))),
        shape=(n, n),
    ).tocsc()
    rhs = np.bincount(i, weights * differences, minlength=n) - np.bincount(j, weights * differences, minlength=n)
    # A tiny ridge makes each component's system non-singular (it pins the component mean near 0).
    ridge = 1e-9 * float(weights.max())
    solution = spsolve(laplacian + ridge * _identity(n), rhs)
    graph = coo_matrix((np.ones(len(edges)), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    for label in np.unique(labels):
        members = labels == label
        solution[members] -= np.median(solution[members])
    return np.asarray(solution)


def _identity(n: int):
    from scipy.sparse import identity

    return identity(n, format="csc")


def solve_normalisation(
    pieces: Sequence[CoarsePiece],
    grid_shape: tuple[int, int] | None = None,
    method: str = "linear_fit",
    *,
    bin_px: int = 16,
    neighbours: int = 8,
    min_cells: int = 12,
    kappa: float = 3.0,
) -> Normalisation:
    """Per-frame gains, offsets and tilts that put every piece on one flux scale (see module docstring).

    ``grid_shape`` is accepted for callers that know the coarse canvas; the solve does not need it.
    """
    n_frames = len(pieces)
    n_channels = next((p.data.shape[0] for p in pieces if p.data.size), 1)
    result = Normalisation.identity(n_frames, n_channels, bin_px)
    result.centres = _piece_centres(pieces)
    if method == "none" or n_frames < 2:
        return result
    edge_list = overlap_edges(_piece_bounds(pieces), neighbours, min_cells)
    fit_gain = method == "linear_fit"
    constrained = np.zeros(n_frames, bool)
    for channel in range(n_channels):
        gain_edges, log_ratios, gain_weights = [], [], []
        samples: list[tuple[int, int, tuple[np.ndarray, ...]]] = []
        for i, j in edge_list:
            common = _common_cells(pieces[i], pieces[j], channel)
            if common is None or common[0].size < min_cells:
                continue
            samples.append((i, j, common))
            if fit_gain:
                fit = _pair_gain_ratio(*common, kappa=kappa, fit_plane=True)
                if fit is not None and np.isfinite(fit[0]) and np.isfinite(fit[1]):
                    gain_edges.append((i, j))
                    log_ratios.append(fit[0])
                    gain_weights.append(1.0 / fit[1])
        if fit_gain and gain_edges:
            log_gain = _graph_solve(n_frames, np.array(gain_edges), np.array(log_ratios), np.array(gain_weights, float))
            result.gains[:, channel] = np.exp(log_gain)
        gains = result.gains[:, channel]
        plane_edges, plane_diffs, plane_weights = [], [], []
        for i, j, (va, vb, x, y) in samples:
            difference = va / gains[i] - vb / gains[j]
            design = np.stack([np.ones_like(x), x, y], axis=1) if fit_gain else np.ones((x.size, 1))
            coefficients = _clipped_lstsq(design, difference, kappa)
            if coefficients is None:
                continue
            full = np.zeros(3)
            full[: coefficients.size] = coefficients
            plane_edges.append((i, j))
            plane_diffs.append(full)
            plane_weights.append(va.size)
            constrained[i] = constrained[j] = True
        if plane_edges:
            edges_array, diffs, weights = np.array(plane_edges), np.array(plane_diffs), np.array(plane_weights, float)
            # Planes in corrected units (frame/gain): c + a·X + b·Y; convert to frame units.
            c, a, b = (_graph_solve(n_frames, edges_array, diffs[:, k], weights) for k in range(3))
            result.tilts[:, channel, 0] = a * gains
            result.tilts[:, channel, 1] = b * gains
            # offsets are stored at the frame centre: c + a·Xc + b·Yc
            result.offsets[:, channel] = (c + a * result.centres[:, 0] + b * result.centres[:, 1]) * gains
    result.constrained = constrained
    result.iterations = 1
    return result

"""The pair fits of a photometric solve on the GPU (the ``intertile`` stage of P4.5).

:class:`DevicePairFits` has the interface of :class:`.photometry._PairFitRunner` (``gain_ratios``,
``plane_fits``, ``close``): :func:`.photometry.solve_normalisation` hands it the same edges and
gets the same results back, so the graph solves around it do not change. What differs is where
the fits run. The solve's coarse pieces go to the device once, in one flat buffer; each edge's
common cells are gathered there, in the row-major order the host code uses, valid cells first;
and the batched fits of :mod:`.photometry` (``_gain_ratio_fits``, ``_plane_fits``: the same code
the host runs, given CuPy as ``xp``) fit hundreds of edges per launch. Only a few numbers per edge
come back. An edge whose normal matrix is ill-conditioned is refitted on the host by the per-edge
code, as the host batches do.

On a 16-core host the pair fits took 0.6–0.9 s of a 500-frame run in 16 worker processes, on the
critical path between the reprojection (P3) and the block stacks (P5).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .photometry import (
    _THEIL_SEN_PAIRS,
    CoarsePiece,
    _gain_ratio_fits,
    _gain_ratio_results,
    _pair_gain_ratio,
    _plane_fit_results,
    _plane_fits,
    _plane_refit,
)

#: Device bytes per common cell of one edge in flight: its samples, the clipping's (2, 3, M) design
#: and its temporaries, the sorted copies of the medians (counted from the array algebra).
BYTES_PER_CELL = 480
#: Device bytes per edge for its Theil–Sen seeds: pair positions, gathered runs and rises, slopes
#: and their sorted copy, per sampled pair.
BYTES_PER_SEED_PAIR = 112
#: Most edges in one batch: each batch costs hundreds of kernel launches, so the fewer the better,
#: within the budget.
MAX_BATCH_ROWS = 8192


def edge_bytes(cells: int) -> int:
    """Device bytes one edge of ``cells`` common cells needs in a batch (gain fits: the larger case)."""
    return BYTES_PER_CELL * max(1, int(cells)) + BYTES_PER_SEED_PAIR * _THEIL_SEN_PAIRS


def min_device_bytes(pieces: Sequence[CoarsePiece]) -> int:
    """The smallest device working set of a solve of ``pieces``: the pieces, twice (the luminance
    beside the channels), and one batch of one edge as large as the largest piece."""
    largest = max((p.data.shape[-2] * p.data.shape[-1] for p in pieces), default=1)
    return 2 * sum(int(p.data.nbytes) for p in pieces) + edge_bytes(largest)


def _host(array: Any) -> np.ndarray:
    """A device array's values on the host (NumPy arrays as they are: the class also runs on NumPy, for tests)."""
    return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else np.asarray(array)


class _DevicePieces:
    """A solve's pieces on the device: one flat buffer, and each piece's place and extent on the host."""

    def __init__(self, pieces: Sequence[CoarsePiece], xp: Any) -> None:
        dtype = np.result_type(*[p.data.dtype for p in pieces]) if pieces else np.dtype(np.float32)
        shapes = np.array([p.data.shape for p in pieces], dtype=np.int64).reshape(-1, 3)
        sizes = shapes.prod(axis=1)
        self.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.height, self.width = shapes[:, 1], shapes[:, 2]
        self.y0 = np.array([p.y0 for p in pieces], dtype=np.int64)
        self.x0 = np.array([p.x0 for p in pieces], dtype=np.int64)
        flat = np.concatenate([np.asarray(p.data, dtype).ravel() for p in pieces]) if pieces else np.zeros(0, dtype)
        self.buffer = xp.asarray(flat)
        self.xp = xp

    def overlaps(self, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, ...]:
        """(y0, x0, rows, cols) of each pair's common rectangle on the coarse grid (rows, cols ≥ 0)."""
        y0 = np.maximum(self.y0[first], self.y0[second])
        x0 = np.maximum(self.x0[first], self.x0[second])
        rows = np.minimum(self.y0[first] + self.height[first], self.y0[second] + self.height[second]) - y0
        cols = np.minimum(self.x0[first] + self.width[first], self.x0[second] + self.width[second]) - x0
        return y0, x0, np.clip(rows, 0, None), np.clip(cols, 0, None)

    def _starts(self, piece: np.ndarray, channel: np.ndarray, y0: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """Buffer index of cell (y0, x0) of ``channel`` in each ``piece``."""
        width = self.width[piece]
        return self.offset[piece] + channel * self.height[piece] * width + (y0 - self.y0[piece]) * width + (x0 - self.x0[piece])

    def common_cells(
        self, first: np.ndarray, second: np.ndarray, channel: np.ndarray
    ) -> tuple[Any, Any, Any, Any, Any, Any]:
        """:func:`.photometry._common_cells` of every pair on the device, as padded rows: va, vb, X, Y
        (float64, each row's valid cells first, in row-major order), the valid mask and the counts."""
        xp = self.xp
        y0, x0, rows, cols = self.overlaps(first, second)
        cells = rows * cols
        span = max(1, int(cells.max()) if cells.size else 1)
        position = xp.arange(span, dtype=xp.int64)[None, :]
        width = xp.asarray(np.maximum(cols, 1))[:, None]
        row, col = position // width, position % width
        inside = position < xp.asarray(cells)[:, None]
        values = []
        for piece in (first, second):
            start = xp.asarray(self._starts(piece, channel, y0, x0))[:, None]
            index = xp.where(inside, start + row * xp.asarray(self.width[piece])[:, None] + col, 0)
            values.append(self.buffer[index])
        valid = inside & xp.isfinite(values[0]) & xp.isfinite(values[1])
        count = valid.sum(axis=1)
        packed = int(count.max()) if count.size else 0
        target_col = xp.cumsum(valid, axis=1) - 1
        target_row = xp.broadcast_to(xp.arange(valid.shape[0])[:, None], valid.shape)
        where = (target_row[valid], target_col[valid])
        coordinates = (col + xp.asarray(x0)[:, None], row + xp.asarray(y0)[:, None])
        out = []
        for source in (*values, *coordinates):
            array = xp.zeros((valid.shape[0], max(packed, 1)))
            array[where] = source[valid].astype(xp.float64)
            out.append(array)
        mask = xp.arange(max(packed, 1))[None, :] < count[:, None]
        return (*out, mask, count)


class DevicePairFits:
    """The batched pair fits of one solve on the GPU (the interface of :class:`.photometry._PairFitRunner`).

    ``budget_bytes`` bounds the device memory of one batch of edges (:func:`edge_bytes` each).
    """

    kind = "device"

    def __init__(
        self, piece_sets: dict[str, Sequence[CoarsePiece]], kappa: float, min_cells: int, xp: Any, budget_bytes: int
    ) -> None:
        self.xp = xp
        self.kappa = kappa
        self.min_cells = min_cells
        self.budget_bytes = int(budget_bytes)
        self.pieces = {key: _DevicePieces(pieces, xp) for key, pieces in piece_sets.items()}

    def close(self) -> None:
        self.pieces = {}

    def __enter__(self) -> "DevicePairFits":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _batches(self, key: str, rows: np.ndarray) -> list[np.ndarray]:
        """Row indices of (edge, channel) rows in batches: sorted by overlap (tight padding), each
        within the budget and :data:`MAX_BATCH_ROWS`."""
        device = self.pieces[key]
        _, _, height, width = device.overlaps(rows[:, 0], rows[:, 1])
        cells = height * width
        order = np.argsort(cells, kind="stable")
        batches, start = [], 0
        while start < order.size:
            stop = start + 1
            # Grow while the batch (padded to its largest overlap, the last one: sorted) fits.
            while stop < order.size and stop - start < MAX_BATCH_ROWS and (stop - start + 1) * edge_bytes(cells[order[stop]]) <= self.budget_bytes:
                stop += 1
            batches.append(order[start:stop])
            start = stop
        return batches

    def _rows(self, channels: Sequence[int], edges: Sequence[tuple[int, int]]) -> np.ndarray:
        """(i, j, channel, edge index) of every edge on every channel."""
        pairs = np.array(edges, dtype=np.int64).reshape(-1, 2)
        return np.concatenate([
            np.column_stack([pairs, np.full(len(pairs), channel), np.arange(len(pairs))]) for channel in channels
        ]) if len(pairs) else np.zeros((0, 4), np.int64)

    def _host_row(self, samples: tuple[Any, ...], r: int, count: int) -> tuple[np.ndarray, ...]:
        """One row's (va, vb, X, Y) on the host: an ill-conditioned edge, refitted per edge."""
        return tuple(_host(array[r, :count]) for array in samples[:4])

    def _fit(self, kind: str, key: str, channels: Sequence[int], edges, gains: np.ndarray | None) -> list[list[tuple]]:
        rows = self._rows(channels, edges)
        found: dict[int, list[tuple]] = {channel: [] for channel in channels}
        xp = self.xp
        for batch in self._batches(key, rows) if len(rows) else ():
            first, second, channel, edge = (rows[batch, column] for column in range(4))
            samples = self.pieces[key].common_cells(first, second, channel)
            count = _host(samples[5])
            keep = np.flatnonzero(count >= self.min_cells)
            if keep.size == 0:
                continue
            if keep.size < count.size:
                keep_device = xp.asarray(keep)
                samples = tuple(array[keep_device] for array in samples)
            count = count[keep]
            first, second, channel, edge = first[keep], second[keep], channel[keep], edge[keep]
            if kind == "gain":
                fitted = _gain_ratio_fits(*samples, self.kappa, {}, xp)
                slopes, variance, solved, odd = (_host(array) for array in fitted)
                results = _gain_ratio_results(
                    slopes, variance, solved, odd,
                    lambda r: _pair_gain_ratio(*self._host_row(samples, r, count[r]), kappa=self.kappa, fit_plane=True),
                )
            else:
                gain_a, gain_b = gains[first, channel], gains[second, channel]
                fitted = _plane_fits(*samples[:5], xp.asarray(gain_a), xp.asarray(gain_b), self.kappa, xp)
                tilts, constant, solved, odd = (_host(array) for array in fitted)
                results = _plane_fit_results(
                    tilts, constant, solved, odd,
                    lambda r: _plane_refit(*self._host_row(samples, r, count[r]), gain_a[r], gain_b[r], self.kappa),
                )
            for r, result in enumerate(results):
                found[int(channel[r])].append((int(edge[r]), int(first[r]), int(second[r]), int(count[r]), result))
        return [[fit[1:] for fit in sorted(found[channel], key=lambda fit: fit[0])] for channel in channels]

    def gain_ratios(self, key: str, channels: Sequence[int], edges: Sequence[tuple[int, int]]) -> list[list[tuple]]:
        """:meth:`.photometry._PairFitRunner.gain_ratios` on the device."""
        return self._fit("gain", key, channels, edges, None)

    def plane_fits(
        self, key: str, channels: Sequence[int], edges: Sequence[tuple[int, int]], gains: np.ndarray
    ) -> list[list[tuple]]:
        """:meth:`.photometry._PairFitRunner.plane_fits` on the device (every channel in the same batches)."""
        return self._fit("plane", key, channels, edges, np.asarray(gains, np.float64))

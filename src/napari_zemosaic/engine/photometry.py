"""Photometric normalisation: bring frames (or tiles) to one flux scale.

Each frame ``i`` sees the sky through its own transparency and adds its own sky
glow, so on the common canvas, per channel,

    frame_i(cell) = gain_i · sky(cell) + offset_i.

Both ``gain`` (haze, clouds) and ``offset`` (moon, dew, light pollution) are fitted
on what the frames have in common, at a coarse resolution (block means of fully
covered cells: cheap, and insensitive to sub-pixel PSF differences). The unknown
``sky`` and the per-frame ``(gain, offset)`` are solved jointly by alternating
least squares: ``sky`` is the weighted mean of the corrected frames, then each
frame's ``(gain, offset)`` is a robust (sigma-clipped) line fit of the frame
against ``sky``. Overlaps carry the scale from panel to panel, so two panels with
different haze end on one scale. The gauge (an overall scale and zero point) is
fixed by giving the median frame gain 1 and the median offset 0.

Memory: the sky accumulator is the coarse canvas (canvas / bin²) and each frame
keeps only its coarse piece, so the solve costs a few kB per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .stack import robust_linear_fit

NORMALISATION_METHODS = ("none", "sky_mean", "linear_fit")


@dataclass
class CoarsePiece:
    """A frame's block-mean image on the coarse canvas grid; NaN where a cell is not fully covered."""

    y0: int
    x0: int
    data: np.ndarray  # (C, hc, wc) float32


@dataclass
class Normalisation:
    """Per-frame, per-channel affine correction: ``corrected = (raw - offset) / gain``."""

    gains: np.ndarray  # (N, C)
    offsets: np.ndarray  # (N, C)
    iterations: int = 0
    converged: bool = True
    constrained: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) had enough overlap cells

    def as_stack_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """``(gain', offset')`` with ``corrected = gain'·raw + offset'`` (the form the stacker applies)."""
        inverse = 1.0 / self.gains
        return inverse.astype(np.float32), (-self.offsets * inverse).astype(np.float32)

    @classmethod
    def identity(cls, n_frames: int, n_channels: int) -> "Normalisation":
        return cls(
            np.ones((n_frames, n_channels)), np.zeros((n_frames, n_channels)), 0, True, np.ones(n_frames, bool)
        )


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


def _accumulate_sky(
    pieces: Sequence[CoarsePiece], gains: np.ndarray, offsets: np.ndarray, weights: np.ndarray, grid_shape: tuple[int, int]
) -> np.ndarray:
    """Weighted mean of the corrected coarse pieces: the current estimate of the sky."""
    n_channels = gains.shape[1]
    total = np.zeros((n_channels, *grid_shape))
    norm = np.zeros((n_channels, *grid_shape))
    for index, piece in enumerate(pieces):
        if piece.data.size == 0:
            continue
        _, hc, wc = piece.data.shape
        corrected = (piece.data - offsets[index][:, None, None]) / gains[index][:, None, None]
        valid = np.isfinite(corrected)
        region = (slice(None), slice(piece.y0, piece.y0 + hc), slice(piece.x0, piece.x0 + wc))
        total[region] += np.where(valid, corrected, 0.0) * weights[index]
        norm[region] += valid * weights[index]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, total / np.where(norm > 0, norm, 1.0), np.nan)


def _fit_piece(
    piece: CoarsePiece, sky: np.ndarray, channel: int, method: str, min_cells: int
) -> tuple[float, float] | None:
    _, hc, wc = piece.data.shape
    reference = sky[channel, piece.y0 : piece.y0 + hc, piece.x0 : piece.x0 + wc].ravel()
    values = piece.data[channel].ravel()
    valid = np.isfinite(reference) & np.isfinite(values)
    if valid.sum() < min_cells:
        return None
    reference, values = reference[valid], values[valid]
    if method == "sky_mean":
        return 1.0, float(np.median(values - reference))
    gain, offset = robust_linear_fit(reference.astype(np.float64), values.astype(np.float64), np)
    gain, offset = float(gain), float(offset)
    if not np.isfinite(gain) or gain <= 0.05:
        return None
    return gain, offset


def solve_normalisation(
    pieces: Sequence[CoarsePiece],
    grid_shape: tuple[int, int],
    method: str = "linear_fit",
    weights: np.ndarray | None = None,
    *,
    max_iterations: int = 200,
    tolerance: float = 1e-5,
    min_cells: int = 8,
) -> Normalisation:
    """Per-frame gains and offsets that put every piece on one flux scale (see module docstring)."""
    n_frames = len(pieces)
    n_channels = next((p.data.shape[0] for p in pieces if p.data.size), 1)
    result = Normalisation.identity(n_frames, n_channels)
    if method == "none" or n_frames < 2:
        return result
    weights = np.ones(n_frames) if weights is None else np.asarray(weights, dtype=np.float64)
    gains, offsets = result.gains, result.offsets
    constrained = np.zeros(n_frames, bool)
    for iteration in range(1, max_iterations + 1):
        sky = _accumulate_sky(pieces, gains, offsets, weights, grid_shape)
        new_gains, new_offsets = gains.copy(), offsets.copy()
        for index, piece in enumerate(pieces):
            if piece.data.size == 0:
                continue
            for channel in range(n_channels):
                fit = _fit_piece(piece, sky, channel, method, min_cells)
                if fit is not None:
                    new_gains[index, channel], new_offsets[index, channel] = fit
                    constrained[index] = True
        # Gauge (exact symmetries of the model): sky → a·sky + b leaves the data unchanged
        # with gain → gain/a and offset → offset − gain·b/a. Fix median gain 1, median offset 0.
        new_gains /= np.median(new_gains, axis=0)
        new_offsets -= new_gains * np.median(new_offsets / new_gains, axis=0)
        change = float(np.max(np.abs(new_gains - gains)))
        gains, offsets = new_gains, new_offsets
        if change < tolerance:
            return Normalisation(gains, offsets, iteration, True, constrained)
    return Normalisation(gains, offsets, max_iterations, False, constrained)

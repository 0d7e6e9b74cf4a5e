"""Mosaic-First: every frame goes straight onto the global canvas, robust stacking per pixel.

Memory strategy (peak set by ``max_memory_mb`` and the canvas size, not by the frame count):

1. **Block plan.** The canvas is cut into square blocks. For each frame we know its
   bounding box on the canvas, hence which blocks it touches and the largest number of
   frames ``n_max`` over any block. The block side is the largest one for which a block
   cube (``n_max × C × side²`` float32, times the stacker's temporaries) fits in half the
   budget. More frames → smaller blocks, never more memory.
2. **Reprojection pass (P3), each frame read once.** A bounded pool of threads loads,
   hot-pixel-corrects, debayers and reprojects frames (only their bounding box). Each
   reprojected frame is cut along block edges and its pieces go to a :class:`PieceStore`:
   kept in RAM when all pieces fit in a quarter of the budget, otherwise appended to one
   spill file per block under ``OUTPUT/.zemosaic_cache/`` (plain ``write`` calls, not
   memory maps, so spilled pages never count against the resident set). A block-mean
   copy at coarse resolution is kept for photometry (a few kB per frame).
3. **Photometric normalisation (P4.5).** Gains and offsets per frame and channel are
   solved on the coarse copies (:mod:`.photometry`), so haze or a cloudy frame is
   brought to the common flux scale before rejection.
4. **Block stacking (P5).** Blocks are processed one at a time: the pieces of the frames
   touching it are pasted into a NaN-filled cube, normalised, and stacked by the common
   engine (:func:`.stack.stack_cube`: rejection, weights, combine). Results go into the
   canvas-sized output arrays.

Every frame reprojection and every block stack is a pure function of serialisable
inputs (paths, WCS headers, config), so the same units can later run elsewhere.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import numpy as np

from ..events import Event
from .canvas import Canvas, frame_bbox_on_canvas
from .context import RunContext
from .frames import FrameError, FrameInfo, estimate_background_noise, load_frame
from .photometry import CoarsePiece, Normalisation, coarse_piece, solve_normalisation
from .reproject import reproject_frame
from .stack import StackParams, noise_weights, stack_cube

BBox = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive, canvas pixels

# The stacker holds the cube plus about three cube-sized temporaries (mask, sorted copy, work).
STACK_WORKSPACE_FACTOR = 4
PHOTOMETRY_BIN_PX = 16


@dataclass
class ReprojectedFrame:
    """The output of one frame's reprojection unit."""

    index: int
    bbox: BBox
    data: np.ndarray  # (C, h, w) float32, NaN outside the frame
    noise: np.ndarray  # (C,) robust background sigma of the raw frame


@dataclass
class CanvasStack:
    """A stacked canvas (or canvas cut-out): data, weighted coverage and kept-frame count."""

    canvas: Canvas
    data: np.ndarray  # (C, H, W) float32
    weight: np.ndarray  # (H, W) float32, sum of frame weights kept per pixel
    count: np.ndarray  # (H, W) float32, frames kept per pixel
    normalisation: Normalisation
    frames_used: list[int] = field(default_factory=list)
    frames_failed: list[tuple[int, str, str]] = field(default_factory=list)  # (index, reason_key, detail)
    block_side: int = 0
    spilled: bool = False


# --------------------------------------------------------------------------------- planning


def _blocks_touched(bbox: BBox, side: int) -> Iterator[tuple[int, int]]:
    y0, y1, x0, x1 = bbox
    for by in range(y0 // side, (y1 - 1) // side + 1):
        for bx in range(x0 // side, (x1 - 1) // side + 1):
            yield by, bx


def plan_block_side(
    bboxes: Sequence[BBox], n_channels: int, canvas_shape: tuple[int, int], budget_bytes: int
) -> int:
    """Largest block side (a multiple of 32, 32…1024) whose stacking cube fits in half the budget."""
    height, width = canvas_shape
    side = 1024
    while side > 32:
        counts: dict[tuple[int, int], int] = {}
        for bbox in bboxes:
            for key in _blocks_touched(bbox, side):
                counts[key] = counts.get(key, 0) + 1
        n_max = max(counts.values(), default=1)
        cube_bytes = n_max * n_channels * min(side, height) * min(side, width) * 4 * STACK_WORKSPACE_FACTOR
        if cube_bytes <= budget_bytes // 2:
            return side
        side //= 2
    return 32


# ------------------------------------------------------------------------------ piece store


class PieceStore:
    """Frame pieces grouped by canvas block, in RAM or spilled to one append-only file per block."""

    def __init__(self, spill_dir: Path | None) -> None:
        self.spill_dir = spill_dir
        self._memory: dict[tuple[int, int], list[tuple[int, int, int, np.ndarray]]] = {}
        self._index: dict[tuple[int, int], list[tuple[int, int, int, tuple[int, ...], int]]] = {}

    @property
    def spilled(self) -> bool:
        return self.spill_dir is not None

    def _path(self, block: tuple[int, int]) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"block_{block[0]:04d}_{block[1]:04d}.f32"

    def add(self, block: tuple[int, int], frame_index: int, y0: int, x0: int, piece: np.ndarray) -> None:
        piece = np.ascontiguousarray(piece, dtype=np.float32)
        if self.spill_dir is None:
            self._memory.setdefault(block, []).append((frame_index, y0, x0, piece))
            return
        path = self._path(block)
        with open(path, "ab") as handle:
            offset = handle.tell()
            handle.write(piece.tobytes())
        self._index.setdefault(block, []).append((frame_index, y0, x0, piece.shape, offset))

    def pieces(self, block: tuple[int, int]) -> list[tuple[int, int, int, np.ndarray]]:
        """The block's pieces sorted by frame index (order-independent results)."""
        if self.spill_dir is None:
            return sorted(self._memory.get(block, []), key=lambda item: item[0])
        entries = sorted(self._index.get(block, []), key=lambda item: item[0])
        result = []
        if entries:
            with open(self._path(block), "rb") as handle:
                for frame_index, y0, x0, shape, offset in entries:
                    handle.seek(offset)
                    count = int(np.prod(shape))
                    data = np.frombuffer(handle.read(count * 4), dtype=np.float32).reshape(shape)
                    result.append((frame_index, y0, x0, data))
        return result

    def frame_indices(self, block: tuple[int, int]) -> list[int]:
        source = self._memory if self.spill_dir is None else self._index
        return sorted({entry[0] for entry in source.get(block, [])})

    def drop(self, block: tuple[int, int]) -> None:
        self._memory.pop(block, None)
        if self.spill_dir is not None:
            self._index.pop(block, None)
            self._path(block).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- work units


def reproject_unit(
    info: FrameInfo, index: int, canvas: Canvas, config: dict[str, Any], xp: Any = np, n_channels: int = 3
) -> ReprojectedFrame | None:
    """Load one frame and resample it onto its bounding box of the canvas (pure work unit)."""
    data = load_frame(
        info,
        hot_pixel_correction=bool(config["hot_pixel_correction"]),
        hot_pixel_sigma=float(config["hot_pixel_sigma"]),
        xp=np,
    )
    if data.shape[0] != n_channels:  # a mono frame in a colour mosaic: same signal in R, G and B
        data = np.repeat(data[:1], n_channels, axis=0)
    noise = np.asarray(estimate_background_noise(data, np), dtype=np.float64)
    if xp is not np:
        data = xp.asarray(data)
    result = reproject_frame(
        data,
        info.wcs,
        canvas.wcs,
        canvas.shape,
        method=config["resample_method"],
        tol_px=float(config["control_grid_tolerance_px"]),
        xp=xp,
    )
    if result is None:
        return None
    bbox, out, _footprint = result
    if xp is not np:
        out = out.get()
    return ReprojectedFrame(index, tuple(int(v) for v in bbox), np.asarray(out, dtype=np.float32), noise)


def stack_block(
    pieces: Sequence[tuple[int, int, int, np.ndarray]],
    block_box: BBox,
    n_channels: int,
    normalisation: Normalisation,
    weights: np.ndarray,
    params: StackParams,
    xp: Any = np,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack the pieces of one canvas block (pure work unit): returns data, weight, count.

    ``normalisation`` and ``weights`` are aligned with ``pieces`` (slot i ↔ piece i).
    """
    y0, y1, x0, x1 = block_box
    cube = xp.full((len(pieces), n_channels, y1 - y0, x1 - x0), xp.nan, dtype=xp.float32)
    for slot, (_, py0, px0, piece) in enumerate(pieces):
        _, ph, pw = piece.shape
        plane = normalisation.background_plane(slot, py0, px0, ph, pw, xp)
        gain = xp.asarray(normalisation.gains[slot], dtype=xp.float32)[:, None, None]
        cube[slot, :, py0 - y0 : py0 - y0 + ph, px0 - x0 : px0 - x0 + pw] = (xp.asarray(piece) - plane) / gain
    result = stack_cube(cube, params, weights=xp.asarray(weights), xp=xp)
    arrays = (result.data, result.weight, result.count)
    if xp is not np:
        arrays = tuple(array.get() for array in arrays)
    return arrays  # type: ignore[return-value]


# ------------------------------------------------------------------------------- the stage


def _worker_count(config: dict[str, Any]) -> int:
    requested = int(config.get("num_workers") or 0)
    return requested if requested > 0 else max(1, min(8, os.cpu_count() or 1))


def _frame_weights(config: dict[str, Any], noises: np.ndarray, norm: Normalisation) -> np.ndarray:
    """Weights of the normalised frames: 1/σ² where σ is the noise after dividing by the gain."""
    if config["stacking_weighting_method"] != "noise_variance":
        return np.ones(len(noises), dtype=np.float32)
    sigma = np.nanmean(noises / norm.gains, axis=1)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.nanmedian(sigma))
    return np.asarray(noise_weights(sigma, np), dtype=np.float32)


def _split_into_blocks(
    frame: ReprojectedFrame, side: int, store: PieceStore, canvas_shape: tuple[int, int]
) -> None:
    y0, y1, x0, x1 = frame.bbox
    for by, bx in _blocks_touched(frame.bbox, side):
        sy0, sy1 = max(y0, by * side), min(y1, (by + 1) * side, canvas_shape[0])
        sx0, sx1 = max(x0, bx * side), min(x1, (bx + 1) * side, canvas_shape[1])
        piece = frame.data[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        if np.isfinite(piece).any():
            store.add((by, bx), frame.index, sy0, sx0, piece)


def mosaic_first(
    frames: Sequence[FrameInfo], canvas: Canvas, ctx: RunContext, n_channels: int = 3, label: str = ""
) -> Generator[Event, None, CanvasStack]:
    """Stack ``frames`` onto ``canvas`` (see the module docstring). Yields events; returns the stack."""
    config = ctx.config
    budget = ctx.budget_bytes
    bboxes: dict[int, BBox] = {}
    for index, info in enumerate(frames):
        bbox = frame_bbox_on_canvas(info.wcs, info.shape, canvas)
        if bbox is not None:
            bboxes[index] = tuple(int(v) for v in bbox)  # type: ignore[assignment]
    side = plan_block_side(list(bboxes.values()), n_channels, canvas.shape, budget)
    piece_bytes = sum((b[1] - b[0]) * (b[3] - b[2]) for b in bboxes.values()) * n_channels * 4
    spill = piece_bytes > budget // 4
    store = PieceStore(ctx.make_cache_dir(f"mosaic_first{label}") if spill else None)
    ctx.reporter.info(
        "mf_info_plan",
        frames=len(frames),
        canvas=f"{canvas.shape[1]}x{canvas.shape[0]}",
        block=side,
        budget_mb=budget // 2**20,
        storage="disk" if spill else "ram",
    )
    yield from ctx.drain()

    # --- P3: reproject every frame once ---------------------------------------------------
    coarse_shape = (-(-canvas.shape[0] // PHOTOMETRY_BIN_PX), -(-canvas.shape[1] // PHOTOMETRY_BIN_PX))
    coarse: dict[int, CoarsePiece] = {}
    noises: dict[int, np.ndarray] = {}
    failed: list[tuple[int, str, str]] = []
    xp_reproject = ctx.xp("reproject")
    workers = _worker_count(config)
    todo = [i for i in range(len(frames)) if i in bboxes]
    done = 0
    with ctx.timed("P3"), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zemosaic-reproject") as pool:
        pending: dict[Future, int] = {}
        queue = iter(todo)
        try:
            while True:
                while len(pending) < 2 * workers:
                    index = next(queue, None)
                    if index is None:
                        break
                    future = pool.submit(reproject_unit, frames[index], index, canvas, config, xp_reproject, n_channels)
                    pending[future] = index
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    done += 1
                    try:
                        frame = future.result()
                    except FrameError as exc:
                        failed.append((index, exc.reason_key, exc.detail))
                        ctx.reporter.warning(exc.reason_key, path=str(frames[index].path), detail=exc.detail)
                        frame = None
                    if frame is not None:
                        _split_into_blocks(frame, side, store, canvas.shape)
                        coarse[index] = coarse_piece(frame.data, frame.bbox, PHOTOMETRY_BIN_PX)
                        noises[index] = frame.noise
                    ctx.reporter.progress("P3", done, len(todo), "progress_frames", name=frames[index].path.name)
                yield from ctx.drain()
        except BaseException:
            for future in pending:
                future.cancel()
            raise

    used = sorted(coarse)
    # --- P4.5: photometric normalisation of the frames --------------------------------------
    with ctx.timed("P4.5"):
        norm_used = solve_normalisation(
            [coarse[i] for i in used], coarse_shape, config["stacking_normalize_method"], bin_px=PHOTOMETRY_BIN_PX
        )
        ctx.reporter.info(
            "mf_info_normalisation",
            method=config["stacking_normalize_method"],
            iterations=norm_used.iterations,
            gain_min=float(np.min(norm_used.gains)) if used else 1.0,
            gain_max=float(np.max(norm_used.gains)) if used else 1.0,
        )
    yield from ctx.drain()

    normalisation = Normalisation.identity(len(frames), n_channels, PHOTOMETRY_BIN_PX)
    noise_all = np.ones((len(frames), n_channels))
    for slot, index in enumerate(used):
        normalisation.gains[index] = norm_used.gains[slot]
        normalisation.offsets[index] = norm_used.offsets[slot]
        normalisation.tilts[index] = norm_used.tilts[slot]
        normalisation.centres[index] = norm_used.centres[slot]
        noise_all[index] = noises[index]
    normalisation.iterations, normalisation.converged = norm_used.iterations, norm_used.converged
    weights = _frame_weights(config, noise_all, normalisation)

    # --- P5: stack block by block ----------------------------------------------------------
    height, width = canvas.shape
    out_data = np.full((n_channels, height, width), np.nan, dtype=np.float32)
    out_weight = np.zeros((height, width), dtype=np.float32)
    out_count = np.zeros((height, width), dtype=np.float32)
    params = StackParams.from_config(config)
    blocks = sorted({block for i in used for block in _blocks_touched(bboxes[i], side)})
    xp_stack = ctx.xp("stack")
    with ctx.timed("P5"):
        for number, block in enumerate(blocks, start=1):
            pieces = store.pieces(block)
            if pieces:
                idx = np.array([p[0] for p in pieces])
                by, bx = block
                box = (by * side, min((by + 1) * side, height), bx * side, min((bx + 1) * side, width))
                data, weight, count = stack_block(
                    pieces, box, n_channels, normalisation.subset(idx), weights[idx], params, xp_stack
                )
                out_data[:, box[0] : box[1], box[2] : box[3]] = data
                out_weight[box[0] : box[1], box[2] : box[3]] = weight
                out_count[box[0] : box[1], box[2] : box[3]] = count
            store.drop(block)
            ctx.reporter.progress("P5", number, len(blocks), "progress_blocks")
            yield from ctx.drain()

    return CanvasStack(
        canvas=canvas,
        data=out_data,
        weight=out_weight,
        count=out_count,
        normalisation=normalisation,
        frames_used=used,
        frames_failed=failed,
        block_side=side,
        spilled=spill,
    )

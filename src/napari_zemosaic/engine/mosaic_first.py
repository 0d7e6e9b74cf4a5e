"""Mosaic-First: every frame goes straight onto the global canvas, robust stacking per pixel.

Memory strategy (peak set by ``max_memory_mb`` and the canvas size, not by the frame count):

1. **Block plan.** The canvas is cut into square blocks. For each frame we know its
   bounding box on the canvas, hence which blocks it touches and the largest number of
   frames ``n_max`` over any block. The block side is the largest one for which a block
   cube (``n_max × C × side²`` float32, times the stacker's temporaries) fits in half the
   budget. More frames → smaller blocks, never more memory.
2. **Reprojection pass (P3), each frame read once** (on the GPU, a night larger than the
   device holds is read once per pass: see *On the GPU*). A bounded pool of threads loads,
   hot-pixel-corrects, debayers and reprojects frames (only their bounding box). Each
   reprojected frame is cut along block edges and its pieces go to a :class:`PieceStore`:
   kept in RAM when all pieces fit in a quarter of the budget, otherwise written to one
   spill file per piece under ``OUTPUT/.zemosaic_cache/`` (plain ``write`` calls, not
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

Resume
------
With the run's unit manifest (:class:`MosaicUnits`, :mod:`.resume`), each finished frame
of a spilling run (its coarse cells, noise and the list of its spilled pieces) and each
stacked block is recorded (in-memory runs are small: they resume at the block level). A rerun into the same OUTPUT reuses the frames whose signature still matches
(adopting their spilled pieces), solves the photometry again from the coarse cells (cheap
and exact), reuses the blocks whose frames, normalisation, weights and stacking settings
are unchanged, and resamples again only the frames that the remaining blocks still need.
A block that cannot be stacked at once for lack of host memory is stacked in strips
(:func:`stack_block_on_host`).

On the GPU
----------
When the run's :class:`~.gpu.ComputePolicy` exists, every frame unit and every block
stack goes through :meth:`~.gpu.ComputePolicy.run_stage` (stage ``reproject``, with the
nested ``debayer`` step, and stage ``stack``), which owns the decisions, the OOM retries
with smaller chunks and the whole-stage CPU fallbacks. The CPU path is the one above,
unchanged. When ``reproject`` runs on the GPU, P3 becomes a two-stage pipeline:

* **Readers** (:func:`prepare_frame_on_host`) read and decode the FITS file (the compact
  uint16 array, BZERO applied exactly) and compute the control grid of the canvas → frame
  mapping with astropy (SIP exact). Both are CPU work held by the GIL, so for large runs
  they run in a pool of processes (:data:`PROCESS_READERS_MIN_FRAMES`), small ones in threads.
* **Device workers** (a few threads, each on its own CUDA stream so that one thread's
  kernels overlap another's Python and transfers) take the host frame through one device
  pass: upload of the uint16 pixels, hot pixels and debayer (stage ``debayer``), background
  noise, bilinear/bicubic/Lanczos sampling of the control grid in row chunks sized from
  the GPU budget (``chunk_scale`` shrinks them after an OOM), and the coarse block means
  for photometry. Only the noise and the coarse means (a few kB) come back to the host.
  Pixels a reader left in the file are read into pinned memory by loader threads while
  the frame waits for its device thread, whose copy to the device is then asynchronous;
  with pieces kept on the device the device thread also cuts them into blocks. The hot
  pixels, debayer and noise of every frame of one kind are the same kernels on the same
  shapes: they are recorded once per device thread as a CUDA graph and replayed
  (:class:`_FramePrepGraphs`); the run's thread finishes a queued frame once the device has
  run it, after handing the readers' answers on.

Pieces stay in GPU memory when the stack stage is on the GPU too and all pieces fit in
:data:`DEVICE_STORE_SHARE` of the GPU budget (``storage=gpu`` in the plan message). When they do not, but the blocks
can be grouped, in row-major order, into at most :data:`MAX_DEVICE_PASSES` groups whose
pieces each fit (:func:`plan_device_passes`), the night is stacked in passes
(``storage=gpu`` with ``passes`` > 1): the first P3 keeps the first group's pieces (copies,
so that each frame's box is freed at once) and does everything else P3 does for every frame
(P2's planes, the photometry's coarse cells); after P4.5 the group is stacked, and each next
group's frames are read and resampled again for its blocks only, then stacked. Reading is
what bounds P3, and reading a frame again costs less than taking its pieces to host memory
and back. Otherwise each reprojected frame is copied back once and stored as on the CPU.
P5 stacks each block on the GPU in strips of rows sized from the GPU budget and the stack
kernel's bytes per pixel (:func:`.gpu.kernel_bytes_per_pixel`), so a small card or a forced-down budget
(``gpu_memory_limit_mb``) gives the same mosaic with more strips. Pools are freed at the
stage boundaries (:meth:`~.gpu.ComputePolicy.end_stage`). The photometric solve of P4.5 is one
unit of the ``intertile`` stage (:func:`solve_photometry`): on the GPU its pair fits run in
batches on the device (:mod:`.photometry_device`) when the solve has enough edges to pay.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Protocol, Sequence

import numpy as np

from ..events import Event
from .canvas import BBox, Canvas, frame_bbox_on_canvas, frame_bboxes_on_canvas
from .context import RunContext
from .debayer import correct_hot_pixels, debayer_bilinear
from .frames import (
    REASON_ALL_NAN,
    REASON_UNREADABLE,
    FrameError,
    FrameInfo,
    PrefetchedRaw,
    RawPixels,
    _read_raw_image,
    _scaled_pixels,
    _to_chw,
    estimate_background_noise,
    header_values_from_file,
    load_frame,
    stamped_identity,
    validate_wcs,
)
from .gpu import (
    CapturedWork,
    WorkerStreams,
    capture_work,
    chunk_slices,
    download_packed_async,
    fused_column_coverage,
    is_device_module,
    kernel_bytes_per_pixel,
    plan_chunks,
    reserve_pool_block,
    to_device,
    to_host,
)
from .photometry import (
    PHOTOMETRY_BIN_PX,
    CoarsePiece,
    Normalisation,
    coarse_piece,
    coarsened_pieces,
    coarsening_factor,
    solve_normalisation,
)
from .resume import ensure_free_space, frame_token, write_raw_atomic
from .worker_env import process_context
from .reproject import (
    ControlGrid,
    _check_method,
    _MapExpander,
    _prepare_source,
    _rows_per_chunk,
    compute_control_grid,
    control_points,
    reproject_frame,
    sample_rows,
)
from .stack import StackParams, noise_weights, stack_cube


# The stacker holds the cube plus about three cube-sized temporaries (mask, sorted copy, work).
STACK_WORKSPACE_FACTOR = 4

#: GPU runs with at least this many frames read them in a process pool (below: threads,
#: whose start costs nothing). Reading and the astropy mapping hold the GIL.
PROCESS_READERS_MIN_FRAMES = 48
#: Device worker threads of the GPU reprojection (config ``gpu_threads``, 0 = this). The
#: device pass is a few hundred small kernels per frame, bound by the host's launch overhead,
#: so more threads mostly contend for the GIL: on an H100, 500 frames went through P3 at
#: 29.8 frames/s with 1 thread and 27.4 with 3 (benchmarks/bench_gpu.py).
DEFAULT_GPU_THREADS = 1
#: Threads that read the pixels readers left in their files into pinned memory (P3 on the GPU).
LOADER_THREADS = 2
#: Smallest sampling chunk (rows) and stacking strip (rows) a GPU unit may be cut into.
MIN_SAMPLE_ROWS = 8
MIN_STACK_ROWS = 8
#: Share of the GPU budget that the reprojected pieces may occupy to stay on the device; P5
#: stacks in strips sized from what is left. On one H100 (budget 63 GB), 1000 full-size frames
#: (42 GB of pieces) took 4.7-5.5 s in one pass at 0.7, against 6.7-7.0 s in two at 0.5.
DEVICE_STORE_SHARE = 0.7
#: Most passes over the frames when their pieces do not fit on the device at once (each pass
#: after the first reads and resamples again the frames that touch its blocks). On one H100,
#: 1000 frames whose pieces went to host memory instead ran at 14 frames/s.
MAX_DEVICE_PASSES = 4
#: Threads that record stacked blocks of an in-memory store (each record is a file of about
#: 20 MB for a 1024 px block and its SHA-256: one thread fell behind P5 on one H100 host).
BLOCK_WRITERS = 2


class FrameVerdicts(Protocol):
    """Quality verdicts reached while P3 runs (see ``pipeline._QualityBeside``)."""

    def rejected(self, frames: Sequence[FrameInfo]) -> Generator[Event, None, set[int]]:
        """Indices into ``frames`` to drop; yields the run's events while it waits."""
        ...


@dataclass
class ReprojectedFrame:
    """The output of one frame's reprojection unit."""

    index: int
    bbox: BBox
    data: Any  # (C, h, w) float32, NaN outside the frame (NumPy, or CuPy on the GPU path)
    noise: np.ndarray  # (C,) robust background sigma of the raw frame
    coarse: CoarsePiece | None = None  # block means for photometry, when computed with the data
    #: The non-empty per-block pieces ``(block, y0, x0, piece)``, when the device thread cut them
    #: (views of ``data`` on the device; :func:`_cut_device_pieces`).
    pieces: list[tuple[tuple[int, int], int, int, Any]] | None = None


@dataclass
class HostFrame:
    """A frame read and decoded on the host, with its canvas mapping: a reader's output."""

    index: int
    pixels: np.ndarray  # scaled pixels in file order (uint16 when exact), before float conversion
    may_hold_nan: bool
    grid: ControlGrid  # canvas → frame control grid over the frame's bounding box
    read_s: float = 0.0  # seconds spent reading and decoding the file
    grid_s: float = 0.0  # seconds spent computing the control grid
    file_identity: Any = None  # a reader process's frames.stamped_identity of the file
    resume_token: Any = None  # and its resume.frame_token of the frame


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
    coarse: dict[int, CoarsePiece] = field(default_factory=dict)  # per-frame block means (SDS photometry)


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


def block_piece_bytes(
    bboxes: Sequence[BBox], side: int, canvas_shape: tuple[int, int], n_channels: int
) -> dict[tuple[int, int], int]:
    """Bytes of the float32 pieces each block will hold (every frame box cut along block edges)."""
    per_block: dict[tuple[int, int], int] = {}
    for bbox in bboxes:
        rows, cols = _piece_layout(bbox, side, canvas_shape)
        for by, top, bottom in rows:
            for bx, left, right in cols:
                per_block[(by, bx)] = per_block.get((by, bx), 0) + (bottom - top) * (right - left) * n_channels * 4
    return per_block


def plan_device_passes(
    per_block: dict[tuple[int, int], int], store_bytes: int, max_passes: int = MAX_DEVICE_PASSES
) -> list[set[tuple[int, int]]] | None:
    """The blocks in row-major order, grouped into passes whose pieces each fit in ``store_bytes``
    (each group as full as it goes). None when all pieces fit at once, when one block alone does
    not fit, or when more than ``max_passes`` passes would be needed."""
    if store_bytes <= 0 or sum(per_block.values()) <= store_bytes:
        return None
    passes: list[set[tuple[int, int]]] = []
    current: set[tuple[int, int]] = set()
    held = 0
    for block in sorted(per_block):
        size = per_block[block]
        if size > store_bytes:
            return None
        if current and held + size > store_bytes:
            passes.append(current)
            current, held = set(), 0
        current.add(block)
        held += size
    passes.append(current)
    return passes if len(passes) <= max_passes else None


# ------------------------------------------------------------------------------ piece store


class PieceStore:
    """Frame pieces grouped by canvas block, in RAM or spilled to one file per piece.

    With ``on_device=True`` (and no spill folder) pieces that arrive as device arrays stay on
    the device (views of a frame's device data: the pieces partition it, so it is freed once
    all the blocks it touches are dropped).
    Anything else is kept as a host copy, as without a GPU.

    Spilled pieces live in ``spill_dir/b{row}_{col}/{frame name}.f32`` (plain writes renamed
    into place, never memory maps, so spilled pages do not count against the resident set).
    ``names`` maps frame indices to names that do not depend on the frame's position in the
    run (a resumed run adopts the pieces an interrupted one left, :meth:`adopt`). ``only``,
    when set, restricts :meth:`add` to those blocks (a resumed run recomputing a few blocks).
    """

    def __init__(self, spill_dir: Path | None, on_device: bool = False, names: dict[int, str] | None = None) -> None:
        self.spill_dir = spill_dir
        self.on_device = bool(on_device) and spill_dir is None
        self.names = names or {}
        self.only: set[tuple[int, int]] | None = None
        #: Device pieces are copied instead of kept as views of their frame's box (a night
        #: stacked in passes keeps only some blocks' pieces: the box is then freed at once).
        self.copy_device_pieces = False
        #: Keep spilled files when a block is dropped (a kept cache: a rerun with other stacking
        #: settings then stacks again without resampling).
        self.keep_files = False
        # block -> frame index -> (y0, x0, piece) in RAM, or (y0, x0, shape, path) when spilled
        self._entries: dict[tuple[int, int], dict[int, tuple[Any, ...]]] = {}

    @property
    def spilled(self) -> bool:
        return self.spill_dir is not None

    def piece_path(self, block: tuple[int, int], frame_index: int) -> Path:
        assert self.spill_dir is not None
        name = self.names.get(frame_index, f"f{frame_index:06d}")
        return self.spill_dir / f"b{block[0]:04d}_{block[1]:04d}" / f"{name}.f32"

    def add(self, block: tuple[int, int], frame_index: int, y0: int, x0: int, piece: Any) -> None:
        if self.only is not None and block not in self.only:
            return
        if not (self.on_device and not isinstance(piece, np.ndarray)):
            piece = np.ascontiguousarray(to_host(piece), dtype=np.float32)
        elif self.copy_device_pieces:
            piece = piece.copy()
        if self.spill_dir is None:
            self._entries.setdefault(block, {})[frame_index] = (y0, x0, piece)
            return
        path = self.piece_path(block, frame_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_raw_atomic(path, piece)
        self._entries.setdefault(block, {})[frame_index] = (y0, x0, tuple(piece.shape), path)

    def adopt(self, block: tuple[int, int], frame_index: int, y0: int, x0: int, shape: tuple[int, ...]) -> bool:
        """Take over a spilled piece written by an earlier run; False when its file is missing or short."""
        if self.spill_dir is None:
            return False
        path = self.piece_path(block, frame_index)
        try:
            if path.stat().st_size != int(np.prod(shape)) * 4:
                return False
        except OSError:
            return False
        self._entries.setdefault(block, {})[frame_index] = (y0, x0, tuple(shape), path)
        return True

    def has(self, block: tuple[int, int], frame_index: int) -> bool:
        return frame_index in self._entries.get(block, {})

    def frame_pieces(self, frame_index: int) -> list[list[int]]:
        """``[row, col, y0, x0, *shape]`` of every spilled piece of a frame (recorded for resume)."""
        return [
            [block[0], block[1], entry[0], entry[1], *entry[2]]
            for block, entries in sorted(self._entries.items())
            if (entry := entries.get(frame_index)) is not None and len(entry) == 4
        ]

    def pieces(self, block: tuple[int, int]) -> list[tuple[int, int, int, Any]]:
        """The block's pieces sorted by frame index (order-independent results)."""
        entries = sorted(self._entries.get(block, {}).items())
        if self.spill_dir is None:
            return [(index, y0, x0, piece) for index, (y0, x0, piece) in entries]
        return [
            (index, y0, x0, np.fromfile(path, dtype=np.float32).reshape(shape))
            for index, (y0, x0, shape, path) in entries
        ]

    def frame_indices(self, block: tuple[int, int]) -> list[int]:
        return sorted(self._entries.get(block, {}))

    def drop_frame(self, frame_index: int) -> None:
        """Forget a frame's pieces (one the quality rules rejected after it was resampled).

        Spilled files stay until their block is dropped: a resumed run may adopt them."""
        for entries in self._entries.values():
            entries.pop(frame_index, None)

    def drop(self, block: tuple[int, int]) -> None:
        self._entries.pop(block, None)
        if self.spill_dir is not None and not self.keep_files:
            shutil.rmtree(self.spill_dir / f"b{block[0]:04d}_{block[1]:04d}", ignore_errors=True)


# ----------------------------------------------------------------------------- work units


def reproject_unit(
    info: FrameInfo, index: int, canvas: Canvas, config: dict[str, Any], xp: Any = np, n_channels: int = 3
) -> ReprojectedFrame | None:
    """Load one frame and resample it onto its bounding box of the canvas (pure work unit).

    With NumPy this is the CPU path. With CuPy the frame is read on the host and then takes
    one device pass (:func:`reproject_host_frame`); the result is copied back to the host.
    """
    if xp is not np:
        host = prepare_frame_on_host(info, index, canvas, float(config["control_grid_tolerance_px"]))
        if host is None:
            return None
        frame = reproject_host_frame(host, info, config, n_channels, xp)
        frame.data = to_host(frame.data)
        return frame
    data = load_frame(
        info,
        hot_pixel_correction=bool(config["hot_pixel_correction"]),
        hot_pixel_sigma=float(config["hot_pixel_sigma"]),
        xp=np,
    )
    if data.shape[0] != n_channels:  # a mono frame in a colour mosaic: same signal in R, G and B
        data = np.repeat(data[:1], n_channels, axis=0)
    noise = np.asarray(estimate_background_noise(data, np), dtype=np.float64)
    result = reproject_frame(
        data,
        info.wcs,
        canvas.wcs,
        canvas.shape,
        method=config["resample_method"],
        tol_px=float(config["control_grid_tolerance_px"]),
        xp=np,
    )
    if result is None:
        return None
    bbox, out, _footprint = result
    return ReprojectedFrame(index, tuple(int(v) for v in bbox), np.asarray(out, dtype=np.float32), noise)


def prepare_frame_on_host(
    info: FrameInfo, index: int, canvas: Canvas, tol_px: float, bbox: BBox | None = None, defer_pixels: bool = False
) -> HostFrame | None:
    """Read and decode one frame and compute its canvas control grid (reader unit, CPU only).

    Pure and picklable (it runs in reader processes). ``None`` when the frame misses the
    canvas. Raises :class:`FrameError` for unreadable files, as :func:`load_frame` does.
    With ``defer_pixels`` (reader processes) the integer formats that need no general scaling
    come as a :class:`~.frames.RawPixels` (where they lie in the file) instead of the pixels:
    :func:`frame_pixels` reads them in the receiving process, so megabytes do not go through
    the pipe and the receiver's unpickling.
    """
    from .frames import raw_pixel_plan

    started = time.perf_counter()
    plan = raw_pixel_plan(info) if defer_pixels else None
    if plan is not None:
        pixels: Any = plan
        may_hold_nan = False
    else:
        raw, header = _read_raw_image(info)
        pixels, may_hold_nan = _scaled_pixels(raw, header)
        pixels = np.ascontiguousarray(pixels)
    read_done = time.perf_counter()
    if bbox is None:
        bbox = frame_bbox_on_canvas(info.wcs, info.shape, canvas, margin=2)
    if bbox is None:
        return None
    grid = compute_control_grid(info.wcs, info.shape, canvas.wcs, bbox, tol_px=tol_px)
    return HostFrame(index, pixels, bool(may_hold_nan), grid, read_done - started, time.perf_counter() - read_done)


def frame_pixels(
    host: HostFrame, info: FrameInfo, config: dict[str, Any], n_channels: int, xp: Any,
    checks: list[Any] | None = None, raw_sink: Callable[[FrameInfo, Any, Any], None] | None = None,
) -> Any:
    """The frame as float32 ``(C, H, W)`` on ``xp``: hot pixels, debayer, mono → colour.

    The same steps as :func:`.frames.load_frame` after its read, applied to the host
    pixels of a reader: the compact array is what travels to the device (pixels a reader
    left in the file, a :class:`~.frames.RawPixels`, are read here and decoded on ``xp``).
    ``checks``: nothing waits for the device; device flags are appended there, and the result
    is final only if every one reads 0 (``debayer.correct_hot_pixels``' ``deferred``).
    ``raw_sink(info, pixels, xp)`` is handed the decoded pixels ``(C, H, W)`` as read, before
    anything changes them (the device measurement of P2).
    """
    data = decoded_frame(host, info, xp, raw_sink)
    if host.may_hold_nan and not bool(xp.isfinite(data).any()):
        raise FrameError(REASON_ALL_NAN, "no finite pixel", path=str(info.path))
    return corrected_colour(data, info, config, n_channels, xp, checks)


def decoded_frame(
    host: HostFrame, info: FrameInfo, xp: Any, raw_sink: Callable[[FrameInfo, Any, Any], None] | None = None,
    float_into: Any = None,
) -> Any:
    """The frame's pixels as read, float32 ``(C, H, W)`` on ``xp`` (see :func:`frame_pixels`),
    written into ``float_into`` (an array of as many elements) when given."""
    pixels, as_float = host.pixels, None
    if isinstance(pixels, PrefetchedRaw):  # the float copy from the decoding kernel
        pixels, as_float = pixels.load(xp, with_float=True, float_into=float_into)
    elif isinstance(pixels, RawPixels):
        pixels = pixels.load(xp)
    try:
        data = _to_chw(xp.asarray(pixels), info.layout, info.shape, xp)
        as_float = None if as_float is None else _to_chw(as_float, info.layout, info.shape, xp)
    except ValueError as exc:
        raise FrameError(REASON_UNREADABLE, str(exc), path=str(info.path)) from None
    if raw_sink is not None:
        raw_sink(info, data, xp)
    if as_float is None and float_into is not None:
        as_float = float_into.reshape(data.shape)
        as_float[...] = data
    return data.astype(xp.float32, copy=False) if as_float is None else as_float


def corrected_colour(
    data: Any, info: FrameInfo, config: dict[str, Any], n_channels: int, xp: Any, checks: list[Any] | None = None
) -> Any:
    """:func:`frame_pixels`' corrections of the pixels as read: hot pixels, debayer, mono → colour."""
    if info.layout == "cfa" and info.bayer_pattern:
        plane = data[0]
        if bool(config["hot_pixel_correction"]):
            plane, _fixed = correct_hot_pixels(  # the count would cost a host sync
                plane, info.bayer_pattern, float(config["hot_pixel_sigma"]), xp, count_fixed=False, deferred=checks
            )
        data = debayer_bilinear(plane, info.bayer_pattern, xp)
    if data.shape[0] != n_channels:  # a mono frame in a colour mosaic: same signal in R, G and B
        data = xp.repeat(data[:1], n_channels, axis=0)
    return data


def corrections_and_noise(
    plane: Any, info: FrameInfo, config: dict[str, Any], n_channels: int, xp: Any
) -> tuple[Any, Any, Any]:
    """What :class:`_FramePrepGraphs` records: the decoded plane's :func:`corrected_colour`, its
    noise per channel, and the hot-pixel status (``None`` where none is computed), on the device
    and without a wait."""
    statuses: list[Any] = []
    data = corrected_colour(_to_chw(plane, info.layout, info.shape, xp), info, config, n_channels, xp, statuses)
    return data, estimate_background_noise(data, xp), (statuses[0] if statuses else None)


@dataclass
class PreparedOnDevice:
    """A frame's corrected pixels ``(C, H, W)`` and their noise per channel, both on the device."""

    data: Any
    noise: Any


class _FramePrepGraphs:
    """P3's corrections and noise of a frame (:func:`corrected_colour`, then
    :func:`.frames.estimate_background_noise`) as one CUDA graph per device thread and kind of
    frame (:func:`.gpu.capture_work`): every Seestar frame of a night runs the same few dozen
    kernels on the same shapes, so their Python and their calls into CUDA, a third of P3's device
    thread, are paid once. The frame is decoded into the graph's input, and the graph's outputs
    are read by the frame's later kernels on the same stream before the next replay.

    Only the queued path takes it (``checks`` given: the hot-pixel status is read when the frame
    is finished, and a frame whose status asks for it is redone eagerly). Where a graph cannot be
    captured, the reason is logged once and the frames of that kind run eagerly.
    """

    def __init__(self, config: dict[str, Any], n_channels: int, reporter: Any) -> None:
        self._config, self._n_channels, self._reporter = config, n_channels, reporter
        self._local = threading.local()
        self._lock = threading.Lock()
        self._captured: list[CapturedWork] = []
        self.replays = 0

    def prepare(
        self, host: HostFrame, info: FrameInfo, xp: Any, checks: list[Any],
        raw_sink: Callable[[FrameInfo, Any, Any], None] | None,
    ) -> PreparedOnDevice | None:
        """The frame through its graph, or ``None`` (nothing done) where it takes none."""
        if not is_device_module(xp) or host.may_hold_nan:  # an all-NaN frame is refused after a host wait
            return None
        pixels = host.pixels
        raw_shape = tuple(int(size) for size in (pixels.plan if isinstance(pixels, PrefetchedRaw) else pixels).shape)
        key = (raw_shape, tuple(info.shape), info.layout, info.bayer_pattern)
        graphs: dict[tuple[Any, ...], CapturedWork | None] = self._local.__dict__.setdefault("graphs", {})
        captured = graphs.get(key, False)
        if captured is None:
            return None
        plane = xp.empty(raw_shape, dtype=xp.float32) if captured is False else captured.inputs
        decoded_frame(host, info, xp, raw_sink, float_into=plane)
        if captured is False:
            captured = graphs[key] = self._capture(plane, info, xp)
        if captured is None:  # the frame is decoded already: the same work, kernel by kernel
            data, noise, status = corrections_and_noise(plane, info, self._config, self._n_channels, xp)
        else:
            data, noise, status = captured.replay(xp.cuda.get_current_stream())
            with self._lock:
                self.replays += 1
        if status is not None:
            checks.append(status)
        return PreparedOnDevice(data, noise)

    def _capture(self, plane: Any, info: FrameInfo, xp: Any) -> CapturedWork | None:
        work = partial(corrections_and_noise, info=info, config=self._config, n_channels=self._n_channels, xp=xp)
        captured = capture_work(work, plane, xp)
        if isinstance(captured, str):
            self._reporter.debug("mf_debug_gpu_graph_declined", name=info.path.name, reason=captured)
            return None
        with self._lock:
            self._captured.append(captured)
        return captured

    def close(self) -> None:
        """Let every graph go (the device threads' streams are synchronised)."""
        with self._lock:
            captured, self._captured = self._captured, []
        for work in captured:
            work.close()


def sample_control_grid(
    data: Any, grid: ControlGrid, method: str, xp: Any, rows_per_chunk: int, may_hold_nan: bool = True,
    grid_on_device: Any = None,
) -> tuple[Any, Any]:
    """Resample ``data`` (C, H, W) over the grid's bounding box, ``rows_per_chunk`` rows at a time.

    The loop of :func:`.reproject.reproject_frame` with the chunk size chosen by the caller
    (from the GPU budget); every output pixel is computed independently, so the chunking
    never changes a value. ``may_hold_nan=False``: ``data`` is known to hold no NaN.
    ``grid_on_device``: the grid's control points already on the device (see :class:`_MapExpander`).
    """
    _check_method(method)
    source = _prepare_source(data, xp, may_hold_nan)
    expander = _MapExpander(grid, xp, grid_on_device=grid_on_device)
    height, width = grid.shape
    out = xp.empty((source.flat.shape[0], height, width), dtype=xp.float32)
    footprint = xp.empty((height, width), dtype=xp.float32)
    rows = max(1, int(rows_per_chunk))
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        sample_rows(expander, source, method, r0, r1, out[:, r0:r1], footprint[r0:r1], xp)
    return out, footprint


def _frame_prep_bytes(info: FrameInfo, n_channels: int) -> int:
    """Device bytes of the per-frame pixel preparation (upload, hot pixels, debayer)."""
    pixels = int(info.shape[0]) * int(info.shape[1])
    per_pixel = kernel_bytes_per_pixel("hot_pixels") + kernel_bytes_per_pixel("debayer", channels=n_channels)
    return pixels * per_pixel


def _reproject_fixed_bytes(info: FrameInfo, grid: ControlGrid, n_channels: int) -> int:
    """Device bytes held during sampling whatever the chunk: the frame, its NaN mask, the output."""
    frame = int(info.shape[0]) * int(info.shape[1]) * (4 * n_channels + 1)
    height, width = grid.shape
    return frame + height * width * 4 * (n_channels + 1)


def reproject_unit_min_bytes(host: HostFrame, info: FrameInfo, config: dict[str, Any], n_channels: int) -> int:
    """The smallest working set of a device unit: its largest non-chunkable step."""
    _, width = host.grid.shape
    rows = min(MIN_SAMPLE_ROWS, host.grid.shape[0])
    chunk = rows * width * kernel_bytes_per_pixel("reproject", channels=n_channels, method=config["resample_method"])
    return max(_frame_prep_bytes(info, n_channels), _reproject_fixed_bytes(info, host.grid, n_channels) + chunk)


def _scaled_rows(rows: int, total: int, chunk_scale: float, min_rows: int) -> int:
    """``rows`` shrunk by ``chunk_scale`` (after an OOM), never under ``min_rows``, chunks evened out."""
    if chunk_scale >= 1.0:
        return rows
    scaled = max(min(min_rows, total), int(rows * chunk_scale))
    return plan_chunks(total, 1, scaled, min_items=min(min_rows, total))


def reproject_host_frame(
    host: HostFrame,
    info: FrameInfo,
    config: dict[str, Any],
    n_channels: int,
    xp: Any,
    budget_bytes: int | None = None,
    prepare: Callable[[], Any] | None = None,
    chunk_scale: float = 1.0,
    host_stats: bool = True,
) -> ReprojectedFrame:
    """One pass of a read frame on ``xp``: pixels, noise, sampling, coarse block means.

    ``budget_bytes`` sizes the sampling chunks (``None``: the module default of
    :mod:`.reproject` for ``xp``); ``chunk_scale`` < 1 (after an OOM) shrinks them further.
    ``prepare`` replaces :func:`frame_pixels` (the GPU path runs it as its own ``debayer``
    unit); it may give a :class:`PreparedOnDevice`, whose noise is then not measured again.
    ``data`` stays on ``xp``; noise and coarse means are host arrays, or, with
    ``host_stats=False``, stay on ``xp`` too (:func:`_stats_to_host` brings them over later,
    so that the device thread waits for the device once per frame).
    """
    data = prepare() if prepare is not None else frame_pixels(host, info, config, n_channels, xp)
    if isinstance(data, PreparedOnDevice):
        data, noise = data.data, data.noise
    else:
        data = to_device(data, xp)
        noise = estimate_background_noise(data, xp)
    if host_stats:
        noise = np.asarray(to_host(noise), dtype=np.float64)
    height, width = host.grid.shape
    if budget_bytes is None:
        rows = _rows_per_chunk(width, xp, height)
    else:
        per_row = width * kernel_bytes_per_pixel("reproject", channels=n_channels, method=config["resample_method"])
        free_for_chunks = int(budget_bytes) - _reproject_fixed_bytes(info, host.grid, n_channels)
        rows = plan_chunks(height, per_row, free_for_chunks, min_items=MIN_SAMPLE_ROWS)
    rows = _scaled_rows(rows, height, chunk_scale, MIN_SAMPLE_ROWS)
    # A frame read ahead by a loader brought its control points to the device with its pixels.
    staged_grid = host.pixels.extra_on_device if isinstance(host.pixels, PrefetchedRaw) else None
    out, _footprint = sample_control_grid(
        data, host.grid, config["resample_method"], xp, rows, host.may_hold_nan, grid_on_device=staged_grid
    )
    del data, _footprint
    bbox = tuple(int(v) for v in host.grid.bbox)
    coarse = coarse_piece(out, bbox, PHOTOMETRY_BIN_PX)
    frame = ReprojectedFrame(host.index, bbox, out, noise, coarse)  # type: ignore[arg-type]
    return _stats_to_host(frame) if host_stats else frame


def _stats_to_host(frame: ReprojectedFrame) -> ReprojectedFrame:
    """The frame with its noise (float64) and coarse means (float32) as host arrays."""
    frame.noise = np.asarray(to_host(frame.noise), dtype=np.float64)
    if frame.coarse is not None:
        frame.coarse = CoarsePiece(frame.coarse.y0, frame.coarse.x0, np.asarray(to_host(frame.coarse.data), dtype=np.float32))
    return frame


def stack_block(
    pieces: Sequence[tuple[int, int, int, Any]],
    block_box: BBox,
    n_channels: int,
    normalisation: Normalisation,
    weights: np.ndarray,
    params: StackParams,
    xp: Any = np,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack the pieces of one canvas block (pure work unit): returns data, weight, count.

    ``normalisation`` and ``weights`` are aligned with ``pieces`` (slot i ↔ piece i).
    Pieces may live on the host or the device; the results are host arrays.
    """
    cube = normalised_cube(pieces, block_box, n_channels, normalisation, xp)
    result = stack_cube(cube, params, weights=xp.asarray(weights), xp=xp)
    return to_host(result.data), to_host(result.weight), to_host(result.count)


def normalised_cube(
    pieces: Sequence[tuple[int, int, int, Any]],
    block_box: BBox,
    n_channels: int,
    normalisation: Normalisation,
    xp: Any = np,
    fused: bool = True,
) -> Any:
    """The (N, C, h, w) float32 cube of a block: each piece minus its background plane, over its
    gain, NaN where a frame does not cover. On the GPU (``fused``) one kernel per piece
    (:func:`.gpu.fused_place_pieces`) writes the same values as the xp loop below."""
    y0, y1, x0, x1 = block_box
    cube = xp.full((len(pieces), n_channels, y1 - y0, x1 - x0), xp.nan, dtype=xp.float32)
    if fused and xp is not np:
        from .gpu import fused_place_pieces

        if fused_place_pieces(cube, pieces, y0, x0, normalisation, xp):
            return cube
    for slot, (_, py0, px0, piece) in enumerate(pieces):
        _, ph, pw = piece.shape
        plane = normalisation.background_plane(slot, py0, px0, ph, pw, xp)
        gain = xp.asarray(normalisation.gains[slot], dtype=xp.float32)[:, None, None]
        cube[slot, :, py0 - y0 : py0 - y0 + ph, px0 - x0 : px0 - x0 + pw] = (to_device(piece, xp) - plane) / gain
    return cube


def _crop_pieces(
    pieces: Sequence[tuple[int, int, int, Any]], box: BBox
) -> tuple[list[tuple[int, int, int, Any]], list[int]]:
    """The parts of ``pieces`` inside ``box`` (views) and the slots of the pieces that touch it."""
    y0, y1, x0, x1 = box
    cropped, slots = [], []
    for slot, (frame_index, py0, px0, piece) in enumerate(pieces):
        _, ph, pw = piece.shape
        top, bottom, left, right = max(y0, py0), min(y1, py0 + ph), max(x0, px0), min(x1, px0 + pw)
        if top < bottom and left < right:
            cropped.append((frame_index, top, left, piece[:, top - py0 : bottom - py0, left - px0 : right - px0]))
            slots.append(slot)
    return cropped, slots


def stack_block_in_strips(
    pieces: Sequence[tuple[int, int, int, Any]],
    block_box: BBox,
    n_channels: int,
    normalisation: Normalisation,
    weights: np.ndarray,
    params: StackParams,
    xp: Any,
    budget_bytes: int,
    chunk_scale: float = 1.0,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`stack_block` in strips of rows whose stacking workspace fits ``budget_bytes``.

    ``chunk_scale`` < 1 (after an OOM) shrinks the planned strips further. Stacking is per
    pixel, so strips give the values of the whole block; a strip's cube holds only the
    pieces that touch it. ``stats["strips"]`` (if given) counts the strips stacked.
    """
    y0, y1, x0, x1 = block_box
    height, width = y1 - y0, x1 - x0
    per_row = width * kernel_bytes_per_pixel(
        "stack", channels=n_channels, frames=len(pieces), rejection=params.rejection, combine=params.combine
    )
    rows = plan_chunks(height, per_row, budget_bytes, min_items=MIN_STACK_ROWS)
    rows = _scaled_rows(rows, height, chunk_scale, MIN_STACK_ROWS)
    if stats is not None:
        stats["strips"] = stats.get("strips", 0) + -(-height // rows)
    if rows >= height:
        return stack_block(pieces, block_box, n_channels, normalisation, weights, params, xp)
    data = np.full((n_channels, height, width), np.nan, dtype=np.float32)
    weight = np.zeros((height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.float32)
    for rows_slice in chunk_slices(height, rows):
        strip = (y0 + rows_slice.start, y0 + rows_slice.stop, x0, x1)
        cropped, slots = _crop_pieces(pieces, strip)
        if not cropped:
            continue
        strip_data, strip_weight, strip_count = stack_block(
            cropped, strip, n_channels, normalisation.subset(slots), np.asarray(weights)[slots], params, xp
        )
        data[:, rows_slice] = strip_data
        weight[rows_slice] = strip_weight
        count[rows_slice] = strip_count
    return data, weight, count


def stack_block_min_bytes(n_pieces: int, block_box: BBox, n_channels: int, params: StackParams) -> int:
    """The smallest working set of a GPU block stack: one strip of :data:`MIN_STACK_ROWS` rows."""
    y0, y1, x0, x1 = block_box
    rows = min(MIN_STACK_ROWS, y1 - y0)
    per_pixel = kernel_bytes_per_pixel(
        "stack", channels=n_channels, frames=n_pieces, rejection=params.rejection, combine=params.combine
    )
    return rows * (x1 - x0) * per_pixel


def stack_block_on_host(
    pieces: Sequence[tuple[int, int, int, Any]],
    block_box: BBox,
    n_channels: int,
    normalisation: Normalisation,
    weights: np.ndarray,
    params: StackParams,
    on_split: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`stack_block` with NumPy; when the host runs out of memory (``MemoryError``), the
    block is stacked again in strips, halving their budget until they fit. Stacking is per pixel,
    so the values are those of the whole block. ``on_split(budget_bytes)`` hears each retry; the
    error is raised again once a strip of :data:`MIN_STACK_ROWS` rows does not fit either."""
    try:
        return stack_block(pieces, block_box, n_channels, normalisation, weights, params, np)
    except MemoryError:
        pass
    smallest = stack_block_min_bytes(len(pieces), block_box, n_channels, params)  # one strip of the fewest rows
    budget = max(smallest, smallest * ((block_box[1] - block_box[0]) // MIN_STACK_ROWS) // 2)  # half the block
    while True:
        if on_split is not None:
            on_split(budget)
        try:
            return stack_block_in_strips(pieces, block_box, n_channels, normalisation, weights, params, np, budget)
        except MemoryError:
            if budget <= smallest:
                raise
            budget = max(smallest, budget // 2)


# ------------------------------------------------------------------------------- the stage


def _worker_count(config: dict[str, Any]) -> int:
    requested = int(config.get("num_workers") or 0)
    return requested if requested > 0 else max(1, min(8, os.cpu_count() or 1))


def _gpu_thread_count(config: dict[str, Any]) -> int:
    try:
        requested = int(config.get("gpu_threads") or 0)
    except (TypeError, ValueError):
        requested = 0
    return requested if requested > 0 else DEFAULT_GPU_THREADS


#: Reader processes feeding the device threads by default. A reader maps a frame's control grid
#: in ~4 ms, so a few keep up with the device; more only take cores from P2's measurement and the
#: device thread beside them (one H100 host of 16 cores, whole runs of 500 frames: 6 readers
#: 112-125 frames/s, 14 readers 97-118, 4 readers 101-107).
MAX_DEFAULT_READERS = 6


def _reader_count(config: dict[str, Any]) -> int:
    requested = int(config.get("num_workers") or 0)
    # Leave cores to the device threads and the main thread of this process.
    return requested if requested > 0 else max(1, min(MAX_DEFAULT_READERS, (os.cpu_count() or 1) - 2))


def _main_module_is_importable() -> bool:
    """Whether child processes can re-import ``__main__`` (they do; stdin scripts cannot be)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


_READER_CANVAS: Canvas | None = None  # the canvas of a reader process (set once by its initializer)


def _init_reader_process(canvas: Canvas) -> None:
    global _READER_CANVAS
    _READER_CANVAS = canvas


#: A reader's answer when the frame's WCS cannot be rebuilt from its header (sent again whole).
NEEDS_WCS = "needs_wcs"


def _wcs_fingerprint(wcs: Any) -> tuple[Any, ...] | None:
    """Everything the pixel mapping of a (TAN/SIP/PV) WCS depends on, as exact bytes, and its
    celestial frame (the rest of what the frame's resume digest holds: :func:`.resume.frame_token`).

    ``None`` for WCSs with lookup-table distortions (those always travel whole).
    """
    if wcs is None or any(getattr(wcs, name, None) is not None for name in ("cpdis1", "cpdis2", "det2im1", "det2im2")):
        return None
    core = wcs.wcs
    arrays = [core.crval, core.crpix, wcs.pixel_scale_matrix, [core.lonpole, core.latpole]]
    sip = wcs.sip
    if sip is not None:
        arrays += [sip.crpix, sip.a, sip.b, sip.ap, sip.bp]
    return (
        tuple(core.ctype),
        tuple(str(unit) for unit in core.cunit),
        tuple(core.get_pv()),
        tuple(b"" if a is None else np.asarray(a, dtype=np.float64).tobytes() for a in arrays),
        (str(core.radesys), repr(float(core.equinox))),  # repr: a NaN equinox equals itself
    )


def _prepare_in_reader_process(
    info: FrameInfo, index: int, tol_px: float, bbox: BBox | None, fingerprint: tuple[Any, ...] | None = None
) -> HostFrame | str | None:
    """:func:`prepare_frame_on_host` with the canvas the process received once (not per task).

    A frame may come without its WCS (pickling a WCS costs the main process milliseconds
    per frame): the reader then rebuilds it from the header, exactly as the header pass
    did, and uses it only if its ``fingerprint`` matches; otherwise it answers
    :data:`NEEDS_WCS` and the frame is sent again with its WCS (e.g. a plate-solved one).
    """
    assert _READER_CANVAS is not None, "reader process started without its canvas"
    if info.wcs is None:
        header = info.header if info.header is not None else header_values_from_file(info.path, info.hdu_index)
        wcs = validate_wcs(header, info.shape)[0] if header is not None else None
        if wcs is None or _wcs_fingerprint(wcs) != fingerprint:
            return NEEDS_WCS
        info = replace(info, wcs=wcs)
    host = prepare_frame_on_host(info, index, _READER_CANVAS, tol_px, bbox, defer_pixels=True)
    if host is not None:  # the file's resume identity and digest, here beside the read (see FrameInfo)
        host.file_identity = stamped_identity(info.path)
        if host.file_identity is not None:
            host.resume_token = frame_token(replace(info, file_identity=host.file_identity))
    return host


def _reader_executor(
    config: dict[str, Any], n_frames: int, canvas: Canvas
) -> tuple[Executor, Callable[..., Future], str, int]:
    """Readers for the GPU path: processes for large runs on several cores, else threads.

    Returns the executor, ``submit(info, index, tol_px, bbox)``, the kind and the count.
    """
    readers = _reader_count(config)
    if n_frames >= PROCESS_READERS_MIN_FRAMES and readers >= 2 and _main_module_is_importable():
        pool = ProcessPoolExecutor(
            max_workers=readers, mp_context=process_context(), initializer=_init_reader_process, initargs=(canvas,)
        )

        def submit_to_process(
            info: FrameInfo, index: int, tol_px: float, bbox: BBox | None, whole: bool = False
        ) -> Future:
            fingerprint = None if whole or info.header is None else _wcs_fingerprint(info.wcs)
            if fingerprint is not None:
                light = replace(info, wcs=None, header=None)  # the reader rebuilds both from the file
                return pool.submit(_prepare_in_reader_process, light, index, tol_px, bbox, fingerprint)
            return pool.submit(_prepare_in_reader_process, info, index, tol_px, bbox)

        return pool, submit_to_process, "processes", readers
    readers = max(1, min(readers, 4))
    threads = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="zemosaic-reader")

    def submit_to_thread(
        info: FrameInfo, index: int, tol_px: float, bbox: BBox | None, whole: bool = False
    ) -> Future:
        return threads.submit(prepare_frame_on_host, info, index, canvas, tol_px, bbox)

    return threads, submit_to_thread, "threads", readers


def _frame_weights(
    config: dict[str, Any], noises: np.ndarray, norm: Normalisation, fwhm: np.ndarray | None = None
) -> np.ndarray:
    """Weights of the normalised frames: 1/σ² where σ is the noise after dividing by the gain;
    ``noise_fwhm`` also favours sharp frames by (median FWHM / FWHM)²."""
    method = config["stacking_weighting_method"]
    if method not in ("noise_variance", "noise_fwhm"):
        return np.ones(len(noises), dtype=np.float32)
    sigma = np.nanmean(noises / norm.gains, axis=1)
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.nanmedian(sigma))
    weights = np.asarray(noise_weights(sigma, np), dtype=np.float64)
    if method == "noise_fwhm" and fwhm is not None:
        from .quality import fwhm_factors

        weights = weights * fwhm_factors(fwhm)
        weights = weights / weights[weights > 0].mean() if (weights > 0).any() else weights
    return weights.astype(np.float32)


class MosaicUnits:
    """Resume bookkeeping of one Mosaic-First call (``ctx.manifest``; inert without one).

    Two unit kinds: ``reproject`` per frame (its coarse photometry cells and noise, plus the
    list of its spilled pieces when the store spills: a resumed run adopts them instead of
    resampling the frame again) and ``block`` per canvas block (the stacked block). A block's
    signature holds its frames, the canvas, its box and the normalisation and weights it
    applies, so a stacking setting or a changed frame set invalidates exactly the blocks it
    touches; the per-frame units depend only on the frame, the canvas and the pixel settings.
    """

    def __init__(self, ctx: RunContext, frames: Sequence[FrameInfo], canvas: Canvas, label: str, n_channels: int) -> None:
        self.manifest = getattr(ctx, "manifest", None)
        self.frames = frames
        self.canvas = canvas
        self.label = label or "_main"
        self.n_channels = n_channels
        self.folder = ctx.cache_dir / "units" / f"mosaic_first{self.label}"
        self._tokens: dict[int, str] = {}

    @property
    def active(self) -> bool:
        return self.manifest is not None

    def token(self, index: int) -> str:
        """A short digest of the frame's identity (file, HDU, shape, WCS), computed once per run."""
        if index not in self._tokens:
            self._tokens[index] = self.manifest.frame_digest(self.frames[index])
        return self._tokens[index]

    def names(self, indices: Sequence[int]) -> dict[int, str]:
        return {index: self.token(index) for index in indices} if self.active else {}

    def _frame_key(self, index: int) -> str:
        return f"{self.label}:{self.frames[index].path}"

    def _reproject_signature(self, index: int, bbox: BBox) -> str:
        return self.manifest.signature(
            "reproject",
            {"frame": self.token(index), "canvas": self.canvas, "bbox": list(bbox), "channels": self.n_channels},
        )

    def load_frame(self, index: int, bbox: BBox) -> tuple[CoarsePiece, np.ndarray, list[list[int]] | None] | None:
        """(coarse cells, noise, spilled pieces or None) of a finished frame unit, else None."""
        if not self.active:
            return None
        record = self.manifest.lookup_record("reproject", self._frame_key(index), self._reproject_signature(index, bbox))
        if record is None:
            return None
        from .resume import load_unit_arrays

        try:
            arrays = load_unit_arrays(record.path)
            coarse = CoarsePiece(int(arrays["origin"][0]), int(arrays["origin"][1]), arrays["coarse"])
            noise = np.asarray(arrays["noise"], dtype=np.float64)
        except (OSError, KeyError, ValueError):
            self.manifest.forget("reproject", self._frame_key(index))
            return None
        pieces = record.meta.get("pieces")
        return coarse, noise, pieces if isinstance(pieces, list) else None

    def save_frame(self, frame: ReprojectedFrame, coarse: CoarsePiece, pieces: list[list[int]] | None) -> None:
        if not self.active:
            return
        from .resume import save_unit_arrays

        path = self.folder / "frames" / f"{self.token(frame.index)}.npz"
        digest = save_unit_arrays(
            path, durable=False, coarse=coarse.data, origin=np.array([coarse.y0, coarse.x0]), noise=np.asarray(frame.noise)
        )
        self.manifest.record(
            "reproject", self._frame_key(frame.index), self._reproject_signature(frame.index, frame.bbox), path,
            sha256=digest, meta={"pieces": pieces},
        )

    def block_signature(self, box: BBox, members: Sequence[int], norm: Normalisation, weights: np.ndarray) -> str:
        return self.manifest.signature("block", {
            "canvas": self.canvas,
            "box": list(box),
            "channels": self.n_channels,
            "frames": [self.token(index) for index in members],
            "gains": norm.gains, "offsets": norm.offsets, "tilts": norm.tilts, "centres": norm.centres,
            "bin_px": norm.bin_px,
            "weights": np.asarray(weights, dtype=np.float32),
        })

    def _block_key(self, block: tuple[int, int]) -> str:
        return f"{self.label}:{block[0]},{block[1]}"

    def load_block(self, block: tuple[int, int], signature: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self.active:
            return None
        record = self.manifest.lookup_record("block", self._block_key(block), signature)
        if record is None:
            return None
        from .resume import load_unit_arrays

        try:
            arrays = load_unit_arrays(record.path)
            return arrays["data"], arrays["weight"], arrays["count"]
        except (OSError, KeyError, ValueError):
            self.manifest.forget("block", self._block_key(block))
            return None

    def save_block(self, block: tuple[int, int], signature: str, data: np.ndarray, weight: np.ndarray, count: np.ndarray,
                   durable: bool = True) -> None:
        """Record a stacked block. ``durable`` (a spilled store, whose pieces of the block are
        dropped next): the file survives a power cut and the record is on disk before this returns.
        Otherwise the file is written without fsync (a damaged one fails its hash when a rerun
        looks it up, and the block is stacked again) and the manifest is written when it is due."""
        if not self.active:
            return
        from .resume import save_unit_arrays

        path = self.folder / "blocks" / f"block_{block[0]:04d}_{block[1]:04d}.npz"
        digest = save_unit_arrays(path, durable=durable, data=data, weight=weight, count=count)
        self.manifest.record("block", self._block_key(block), signature, path, sha256=digest)
        if durable:
            self.manifest.flush()


def _split_into_blocks(
    frame: ReprojectedFrame, side: int, store: PieceStore, canvas_shape: tuple[int, int]
) -> None:
    if frame.pieces is None and not isinstance(frame.data, np.ndarray):
        frame.pieces = _cut_device_pieces(frame, side, canvas_shape)
    if frame.pieces is not None:
        for block, sy0, sx0, piece in frame.pieces:
            store.add(block, frame.index, sy0, sx0, piece)
        if store.copy_device_pieces and frame.pieces and not isinstance(frame.pieces[0][3], np.ndarray):
            # The copies run on this thread's stream; the box they read returns to the pool of
            # the device thread's stream once the frame is dropped, and is reused there.
            _array_module(frame.pieces[0][3]).cuda.get_current_stream().synchronize()
        return
    y0, y1, x0, x1 = frame.bbox
    for by, bx in _blocks_touched(frame.bbox, side):
        sy0, sy1 = max(y0, by * side), min(y1, (by + 1) * side, canvas_shape[0])
        sx0, sx1 = max(x0, bx * side), min(x1, (bx + 1) * side, canvas_shape[1])
        piece = frame.data[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        if np.isfinite(piece).any():
            store.add((by, bx), frame.index, sy0, sx0, piece)


def _piece_layout(bbox: BBox, side: int, canvas_shape: tuple[int, int]) -> tuple[list[tuple[int, int, int]], ...]:
    """The block rows and columns a frame's box crosses: ``(block, start, stop)`` in box coordinates."""
    y0, y1, x0, x1 = bbox
    rows = [(by, max(y0, by * side) - y0, min(y1, (by + 1) * side, canvas_shape[0]) - y0)
            for by in range(y0 // side, (y1 - 1) // side + 1)]
    cols = [(bx, max(x0, bx * side) - x0, min(x1, (bx + 1) * side, canvas_shape[1]) - x0)
            for bx in range(x0 // side, (x1 - 1) // side + 1)]
    return rows, cols


def _column_coverage(data: Any, cols: Sequence[tuple[int, int, int]], x0: int, side: int) -> Any:
    """(n_cols, h) bool on the data's module: which box rows of each block column hold a finite value
    (``x0``: the box's first canvas column; ``side``: the block side).

    On the GPU one kernel (:func:`.gpu.fused_column_coverage`); else one coverage reduction per
    block column."""
    xp = _array_module(data)
    fused = fused_column_coverage(data, x0, side, len(cols), xp)
    if fused is not None:
        return fused
    covered = xp.isfinite(data).any(axis=0)  # (h, w): some channel finite
    return xp.stack([covered[:, left:right].any(axis=1) for _, left, right in cols])


def _pieces_from_coverage(
    frame: ReprojectedFrame, rows: Sequence[tuple[int, int, int]], cols: Sequence[tuple[int, int, int]],
    per_column: np.ndarray,
) -> list[tuple[tuple[int, int], int, int, Any]]:
    """The frame's non-empty per-block pieces as views of its data (the pieces partition the box,
    so they hold the same memory, freed once the last block the frame touches is stacked)."""
    y0, _, x0, _ = frame.bbox
    pieces = []
    for by, top, bottom in rows:
        for column, (bx, left, right) in enumerate(cols):
            if bottom > top and right > left and per_column[column, top:bottom].any():
                pieces.append(((by, bx), y0 + top, x0 + left, frame.data[:, top:bottom, left:right]))
    return pieces


def _cut_device_pieces(
    frame: ReprojectedFrame, side: int, canvas_shape: tuple[int, int]
) -> list[tuple[tuple[int, int], int, int, Any]]:
    """A device frame's non-empty per-block pieces, as views of its data, with one host sync."""
    rows, cols = _piece_layout(frame.bbox, side, canvas_shape)
    return _pieces_from_coverage(frame, rows, cols, to_host(_column_coverage(frame.data, cols, frame.bbox[2], side)))


@dataclass
class _QueuedFrame:
    """A frame whose device work is queued and not waited for (P3 on the GPU, pieces kept there).

    Its host copies (noise, coarse means, block coverage, the checks of :func:`frame_pixels`)
    fill once ``done`` has passed: :func:`_finish_queued` reads them. ``host`` keeps the frame's
    page-locked pixels alive until their copy to the device has run.
    """

    host: HostFrame
    frame: ReprojectedFrame
    done: Any  # CUDA event recorded after the copies (None: host arrays, copied already)
    noise: np.ndarray
    coarse: np.ndarray | None
    coverage: np.ndarray
    checks: list[np.ndarray]
    rows: list[tuple[int, int, int]]
    cols: list[tuple[int, int, int]]


def _queue_frame_results(
    host: HostFrame, frame: ReprojectedFrame, checks: list[Any], side: int, canvas_shape: tuple[int, int], xp: Any,
    stream: Any,
) -> _QueuedFrame:
    """Queue the copies of a device frame's results to the host behind its kernels, on
    ``stream`` (the current one; ``None`` for host arrays, copied at once), and an event after
    them: the device thread goes on to the next frame."""
    rows, cols = _piece_layout(frame.bbox, side, canvas_shape)
    results = [_column_coverage(frame.data, cols, frame.bbox[2], side), frame.noise, *checks]
    if frame.coarse is not None:
        results.append(frame.coarse.data)
    coverage, noise, *host_checks = download_packed_async(results, xp)  # one copy for them all
    coarse = host_checks.pop() if frame.coarse is not None else None
    done = stream.record() if stream is not None else None
    return _QueuedFrame(host, frame, done, noise, coarse, coverage, host_checks, rows, cols)


def _device_has_run(queued: _QueuedFrame) -> bool:
    """Whether the device has passed the frame's event (without waiting; host arrays: always)."""
    return queued.done is None or bool(queued.done.done)


def _finish_queued_or_redo(
    queued: _QueuedFrame, redo: Callable[[HostFrame], Future], reporter: Any = None
) -> ReprojectedFrame | Future:
    """:func:`_finish_queued`, or ``redo(host)`` (the waiting path, whose unit goes through
    ``run_stage`` and its fallbacks) when a check asks for it or the device reports an error
    at the wait."""
    try:
        frame = _finish_queued(queued)
    except FrameError:
        raise
    except Exception as exc:  # an asynchronous device error: the waiting path reports it or recovers
        if reporter is not None:
            reporter.debug("mf_debug_frame_redone", index=queued.host.index, reason=f"{type(exc).__name__}: {exc}")
        return redo(queued.host)
    return redo(queued.host) if frame is None else frame


def _finish_queued(queued: _QueuedFrame) -> ReprojectedFrame | None:
    """The frame with host statistics and its pieces, once its device work has run (waits for it).
    ``None`` when a check of :func:`frame_pixels` says the frame must be computed again by the
    waiting path."""
    if queued.done is not None:
        queued.done.synchronize()
    if any(int(check.reshape(-1)[0]) != 0 for check in queued.checks):
        return None
    frame = queued.frame
    frame.noise = np.array(queued.noise, dtype=np.float64)
    if frame.coarse is not None and queued.coarse is not None:
        frame.coarse = CoarsePiece(frame.coarse.y0, frame.coarse.x0, np.array(queued.coarse, dtype=np.float32))
    frame.pieces = _pieces_from_coverage(frame, queued.rows, queued.cols, np.array(queued.coverage))
    return frame


def _array_module(array: Any) -> Any:
    """``numpy`` for host arrays, else the module of the array's type (``cupy``)."""
    if isinstance(array, np.ndarray):
        return np
    import importlib

    return importlib.import_module(type(array).__module__.split(".")[0])


def mosaic_first(
    frames: Sequence[FrameInfo],
    canvas: Canvas,
    ctx: RunContext,
    n_channels: int = 3,
    label: str = "",
    verdicts: FrameVerdicts | None = None,
) -> Generator[Event, None, CanvasStack]:
    """Stack ``frames`` onto ``canvas`` (see the module docstring). Yields events; returns the stack.

    ``verdicts``: quality verdicts still being reached while P3 resamples every frame; the
    frames they reject are dropped after P3, before the photometric solve.
    """
    config = ctx.config
    policy = ctx.policy
    budget = ctx.budget_bytes
    bboxes: dict[int, BBox] = {}
    boxes = frame_bboxes_on_canvas([info.wcs for info in frames], [info.shape for info in frames], canvas)
    for index, bbox in enumerate(boxes):
        if bbox is not None:
            bboxes[index] = tuple(int(v) for v in bbox)  # type: ignore[assignment]
    side = plan_block_side(list(bboxes.values()), n_channels, canvas.shape, budget)
    piece_bytes = sum((b[1] - b[0]) * (b[3] - b[2]) for b in bboxes.values()) * n_channels * 4
    gpu_reproject = policy is not None and policy.uses_gpu("reproject")
    from .distributed import executor_of, reproject_frames_remote, stack_blocks_remote

    device_passes: list[set[tuple[int, int]]] | None = None
    per_block: dict[tuple[int, int], int] = {}
    on_device = False
    if gpu_reproject and policy.uses_gpu("stack"):
        device_store = int(policy.gpu_budget_bytes() * DEVICE_STORE_SHARE)
        on_device = piece_bytes <= device_store
        if not on_device and executor_of(ctx) is None:
            per_block = block_piece_bytes(list(bboxes.values()), side, canvas.shape, n_channels)
            device_passes = plan_device_passes(per_block, device_store, MAX_DEVICE_PASSES)
            on_device = device_passes is not None

    # On a scheduler the blocks are stacked by tasks that read their pieces from the cache.
    spill = not on_device and (piece_bytes > budget // 4 or executor_of(ctx) is not None)
    units = MosaicUnits(ctx, frames, canvas, label, n_channels)
    spill_dir = None
    if spill:
        spill_dir = ctx.make_cache_dir(f"mosaic_first{label}")
        ensure_free_space(spill_dir, piece_bytes)
    # Only spilled pieces are files named after their frames; the other stores need no names.
    store = PieceStore(spill_dir, on_device=on_device, names=units.names(sorted(bboxes)) if spill else None)
    store.keep_files = spill and units.active and config.get("cache_retention") == "keep"
    if device_passes is not None:
        store.copy_device_pieces = True
        store.only = device_passes[0]
    ctx.reporter.info(
        "mf_info_plan",
        frames=len(frames),
        canvas=f"{canvas.shape[1]}x{canvas.shape[0]}",
        block=side,
        budget_mb=budget // 2**20,
        storage="gpu" if on_device else "disk" if spill else "ram",
    )
    if device_passes is not None:
        ctx.reporter.info("mf_info_device_passes", passes=len(device_passes), pieces_mb=piece_bytes // 2**20,
                          device_mb=device_store // 2**20)
    yield from ctx.drain()

    # --- P3: reproject every frame once (frames finished by an interrupted run are reused) ----
    coarse: dict[int, CoarsePiece] = {}
    noises: dict[int, np.ndarray] = {}
    failed: list[tuple[int, str, str]] = []
    missing_pieces: dict[int, set[tuple[int, int]]] = {}  # reused frame -> blocks whose piece is gone
    todo = []
    for index in sorted(bboxes):
        # Frame units only pay when their pixels were spilled (and can be adopted); in-memory
        # runs are small and resume at the block level.
        finished = units.load_frame(index, bboxes[index]) if spill else None
        if finished is None:
            todo.append(index)
            continue
        coarse[index], noises[index], pieces = finished
        if pieces is None:
            missing_pieces[index] = set(_blocks_touched(bboxes[index], side))
            continue
        # Pieces of blocks stacked before the interruption were dropped: only the others matter.
        gone = {(row, col) for row, col, y0, x0, *shape in pieces
                if not store.adopt((row, col), index, y0, x0, tuple(shape))}
        if gone:
            missing_pieces[index] = gone

    def accept(frame: ReprojectedFrame) -> None:
        _split_into_blocks(frame, side, store, canvas.shape)
        if frame.index in coarse:  # a second pass for blocks still to stack: photometry is known
            return
        coarse[frame.index] = frame.coarse or coarse_piece(frame.data, frame.bbox, PHOTOMETRY_BIN_PX)
        noises[frame.index] = frame.noise
        if spill:
            units.save_frame(frame, coarse[frame.index], store.frame_pieces(frame.index))

    def reject(index: int, exc: FrameError) -> None:
        failed.append((index, exc.reason_key, exc.detail))
        ctx.reporter.warning(exc.reason_key, path=str(frames[index].path), detail=exc.detail)

    def accept_remote(index: int, frame_coarse: CoarsePiece, noise: np.ndarray, pieces: list[list[int]]) -> None:
        for row, col, y0, x0, *shape in pieces:  # written by the task under this run's names
            if store.only is None or (row, col) in store.only:
                store.adopt((row, col), index, y0, x0, tuple(shape))
        if index in coarse:
            return
        coarse[index], noises[index] = frame_coarse, noise
        units.save_frame(ReprojectedFrame(index, bboxes[index], None, noise), frame_coarse, store.frame_pieces(index))

    def reproject(indices: list[int], measure: bool = True,
                  on_failure: Callable[[int, FrameError], None] | None = None) -> Generator[Event, None, None]:
        reject_frame = on_failure or reject
        if executor_of(ctx) is not None and spill:  # one task per frame (engine/distributed.py)
            yield from reproject_frames_remote(
                ctx, frames, indices, canvas, n_channels, side, store, accept_remote,
                lambda index, key, detail: reject_frame(index, FrameError(key, detail)),
            )
        elif gpu_reproject:
            if device_passes is not None:  # the pieces kept are copies made on this thread's stream
                reserve_pool_block(sum(per_block[block] for block in store.only or ()), policy.xp_for("reproject"))
            yield from _reproject_frames_gpu(frames, indices, bboxes, canvas, ctx, n_channels, on_device, side, accept,
                                             reject_frame, measurer if measure else None,
                                             reserve_outputs=device_passes is None)
        else:
            yield from _reproject_frames_cpu(frames, indices, canvas, ctx, n_channels, accept, reject_frame)

    # P2 on the device, when it runs beside: the raw planes the device threads decode are measured there.
    measurer = getattr(verdicts, "device_measurer", None)
    # The short GIL slices of P3 stay until P2's verdicts: its measuring thread, which only sends
    # the last batch to the measuring process, must not queue for 5 ms slices behind the threads
    # that digest P2's metrics and compute the resume tokens.
    restore_slices = _shorten_gil_slices(P3_SWITCH_INTERVAL_S) if measurer is not None else (lambda: None)
    try:
        try:
            with ctx.timed("P3"):
                yield from reproject(todo)
        finally:
            if measurer is not None:
                measurer.finish()
        if units.active and not label:  # nested calls (SDS batches, classic tiles): their workflow says it
            units.manifest.log_summary("reproject", ctx.reporter)

        # While this thread waits for P2's verdicts (its process is idle then), a thread computes,
        # for every frame P3 kept, what P5's block signatures name the frames by (their resume tokens)
        # and the pieces P4.5 fits (coarsened as the solve would): once P2's last planes are on
        # their way to the measuring process, whose hand-over this pure Python would delay.
        ahead = _PhotometryAhead(coarse)

        def compute_ahead() -> None:
            if measurer is not None:
                measurer.wait_handed_over()
            units.names(ahead.kept)
            ahead.coarsen()

        tokens = threading.Thread(target=compute_ahead, name="zemosaic-tokens", daemon=True)
        tokens.start()
        rejected: set[int] = set()
        if verdicts is not None:
            rejected = yield from verdicts.rejected(frames)
    finally:
        restore_slices()
    for index in rejected:
        coarse.pop(index, None)
        noises.pop(index, None)
        missing_pieces.pop(index, None)
        store.drop_frame(index)
    failed = [entry for entry in failed if entry[0] not in rejected]

    coarse_shape = (-(-canvas.shape[0] // PHOTOMETRY_BIN_PX), -(-canvas.shape[1] // PHOTOMETRY_BIN_PX))
    used = sorted(coarse)
    # --- P4.5: photometric normalisation of the frames --------------------------------------
    with ctx.timed("P4.5"):
        tokens.join()
        pieces, bin_px = ahead.pieces(used, coarse)
        norm_used = solve_photometry(policy, pieces, coarse_shape, config["stacking_normalize_method"], bin_px)
        ctx.reporter.info(
            "mf_info_normalisation",
            method=config["stacking_normalize_method"],
            iterations=norm_used.iterations,
            gain_min=float(np.min(norm_used.gains)) if used else 1.0,
            gain_max=float(np.max(norm_used.gains)) if used else 1.0,
        )
    yield from ctx.drain()
    if ctx.manifest is not None:  # deferred resume units: P5 waits on the device more than on the GIL
        ctx.manifest.start_deferred()

    normalisation = Normalisation.identity(len(frames), n_channels, PHOTOMETRY_BIN_PX)
    noise_all = np.ones((len(frames), n_channels))
    for slot, index in enumerate(used):
        normalisation.gains[index] = norm_used.gains[slot]
        normalisation.offsets[index] = norm_used.offsets[slot]
        normalisation.tilts[index] = norm_used.tilts[slot]
        normalisation.centres[index] = norm_used.centres[slot]
        noise_all[index] = noises[index]
    normalisation.iterations, normalisation.converged = norm_used.iterations, norm_used.converged
    fwhm = np.array([info.metrics.get("fwhm_px", np.nan) for info in frames], dtype=np.float64)
    # Normalised over the stacked frames only, so frames that failed or were rejected do not scale them.
    weights = np.ones(len(frames), dtype=np.float32)
    if used:
        weights[used] = _frame_weights(config, noise_all[used], normalisation.subset(used), fwhm[used])

    # --- P5: stack block by block ----------------------------------------------------------
    height, width = canvas.shape
    out_data = np.full((n_channels, height, width), np.nan, dtype=np.float32)
    out_weight = np.zeros((height, width), dtype=np.float32)
    out_count = np.zeros((height, width), dtype=np.float32)
    params = StackParams.from_config(config)
    blocks = sorted({block for i in used for block in _blocks_touched(bboxes[i], side)})

    def box_of(block: tuple[int, int]) -> BBox:
        by, bx = block
        return (by * side, min((by + 1) * side, height), bx * side, min((bx + 1) * side, width))

    def place(block: tuple[int, int], data: np.ndarray, weight: np.ndarray, count: np.ndarray) -> None:
        box = box_of(block)
        out_data[:, box[0] : box[1], box[2] : box[3]] = data
        out_weight[box[0] : box[1], box[2] : box[3]] = weight
        out_count[box[0] : box[1], box[2] : box[3]] = count

    signatures: dict[tuple[int, int], str] = {}
    if units.active:
        touching: dict[tuple[int, int], list[int]] = {}
        for index in used:
            for block in _blocks_touched(bboxes[index], side):
                touching.setdefault(block, []).append(index)
        still_to_stack = []
        for block in blocks:
            members = touching[block]
            signatures[block] = units.block_signature(box_of(block), members, normalisation.subset(members), weights[members])
            finished_block = units.load_block(block, signatures[block])
            if finished_block is None:
                still_to_stack.append(block)
                continue
            place(block, *finished_block)
            store.drop(block)
        blocks = still_to_stack
        # Frames whose pixels are gone are resampled again, for the blocks still to stack only.
        remaining = set(blocks)
        again = sorted(i for i, gone in missing_pieces.items() if remaining & gone)
        if again:
            store.only = set(blocks)
            with ctx.timed("P3"):
                yield from reproject(again)
            store.only = None
    if policy is not None:
        policy.end_stage("reproject")

    if executor_of(ctx) is not None and store.spilled and blocks:  # one task per block (engine/distributed.py)

        def finish_block(block: tuple[int, int], data: np.ndarray, weight: np.ndarray, count: np.ndarray) -> None:
            place(block, data, weight, count)
            if block in signatures:
                units.save_block(block, signatures[block], data, weight, count)

        with ctx.timed("P5"):
            yield from stack_blocks_remote(ctx, store, blocks, box_of, n_channels, normalisation, weights, params,
                                           finish_block)  # fmt: skip
        blocks = []  # nothing left for the loop below
    strip_stats: dict[str, int] = {}

    def host_split(block: tuple[int, int]) -> Callable[[int], None]:
        def said(budget_bytes: int) -> None:
            ctx.reporter.warning("mf_warn_host_memory_split", block=f"{block[0]},{block[1]}",
                                 budget_mb=round(budget_bytes / 2**20, 1))
        return said

    # Blocks of an in-memory store are recorded by writer threads while the next ones stack
    # (their pieces are not on disk, so the record need not precede the drop). The last records
    # of a run are written while it writes its outputs: the manifest waits for them when it closes
    # (and logs the blocks' summary then); nested runs wait here.
    writer = (ThreadPoolExecutor(BLOCK_WRITERS, thread_name_prefix="zemosaic-units")
              if units.active and not store.spilled else None)
    defer_records = writer is not None and not label
    saving: list[Future] = []
    def stack_one(block: tuple[int, int], pieces: list[tuple[int, int, int, Any]], concurrent: int
                  ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, int]] | None:
        if not pieces:
            return None
        idx = np.array([p[0] for p in pieces])
        block_norm, block_weights = normalisation.subset(idx), weights[idx]
        stats: dict[str, int] = {}
        if policy is None:
            return stack_block_on_host(pieces, box_of(block), n_channels, block_norm, block_weights, params,
                                       on_split=host_split(block)), stats
        return _stack_block_unit(policy, pieces, box_of(block), n_channels, block_norm, block_weights, params, stats,
                                 on_split=host_split(block), concurrent=concurrent), stats

    # A night stacked in passes: each group of blocks after the first has its frames resampled
    # again (for its blocks only) before it is stacked.
    block_passes = [blocks] if device_passes is None else [[b for b in blocks if b in group] for group in device_passes]
    stacked_count = 0
    try:
        for position, pass_blocks in enumerate(block_passes):
            if not pass_blocks:
                continue
            if position > 0 and device_passes is not None:
                store.only = device_passes[position]
                again = [i for i in used if any(b in store.only for b in _blocks_touched(bboxes[i], side))]

                def missing_from_pass(index: int, exc: FrameError, number: int = position + 1) -> None:
                    # The frame is in the blocks stacked before (and stays used): only this
                    # group's blocks go without it, which the log says.
                    ctx.reporter.warning(exc.reason_key, path=str(frames[index].path), detail=exc.detail)
                    ctx.reporter.warning("mf_warn_frame_missing_from_pass", path=str(frames[index].path),
                                         number=number, passes=len(block_passes))

                with ctx.timed("P3"):
                    yield from reproject(again, measure=False, on_failure=missing_from_pass)
                policy.end_stage("reproject")
            with ctx.timed("P5"):
                # Nested runs (SDS batches, classic tiles) stack one block at a time: their few blocks do
                # not pay for new threads and streams each call (whose pools would strand memory).
                stacked_blocks = _stack_blocks_in_order(store, pass_blocks, policy, stack_one, threaded=not label)
                for block, outcome in stacked_blocks:
                    if outcome is not None:
                        (data, weight, count), stats = outcome
                        for key, value in stats.items():
                            strip_stats[key] = strip_stats.get(key, 0) + value
                        place(block, data, weight, count)
                        if block in signatures and writer is not None:
                            saving.append(writer.submit(units.save_block, block, signatures[block], data, weight,
                                                        count, durable=False))
                        elif block in signatures:
                            units.save_block(block, signatures[block], data, weight, count)
                    store.drop(block)
                    stacked_count += 1
                    ctx.reporter.progress("P5", stacked_count, len(blocks), "progress_blocks")
                    yield from ctx.drain()
        store.only = None
        if not defer_records:
            with ctx.timed("P5"):
                for job in saving:
                    job.result()
    except BaseException:
        if writer is not None:
            writer.shutdown(wait=True, cancel_futures=True)
        raise
    if writer is not None:
        writer.shutdown(wait=False)
        if defer_records:
            units.manifest.defer("block", lambda: [job.result() for job in saving])
    if units.active and not label and not defer_records:
        units.manifest.log_summary("block", ctx.reporter)
    if policy is not None:
        policy.end_stage("stack")
        if strip_stats.get("gpu_blocks"):
            ctx.reporter.debug("mf_debug_gpu_p5", blocks=strip_stats["gpu_blocks"], strips=strip_stats["strips"],
                               budget_mb=policy.gpu_budget_bytes() // 2**20)

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
        coarse=coarse,
    )


# ------------------------------------------------------------------------- P3, both backends


class _PhotometryAhead:
    """The pieces P4.5 fits, coarsened as its solve would (:func:`.photometry.coarsened_pieces`)
    for every frame P3 kept (:attr:`kept`), while the run waits for P2's verdicts (:meth:`coarsen`);
    :meth:`pieces` then takes those of the frames kept after P2."""

    def __init__(self, coarse: dict[int, CoarsePiece]) -> None:
        self.kept = sorted(coarse)
        self._raw = [coarse[i] for i in self.kept]
        self._coarser: dict[int, CoarsePiece] = {}
        self._factor = 1

    def coarsen(self) -> None:
        pieces, self._factor = coarsened_pieces(self._raw)
        self._coarser = dict(zip(self.kept, pieces))

    def pieces(self, used: Sequence[int], coarse: dict[int, CoarsePiece]) -> tuple[list[CoarsePiece], int]:
        """``(pieces, bin_px)`` for P4.5's solve of the frames ``used`` (after :meth:`coarsen`): the
        coarsened pieces when the solve of ``used`` alone coarsens them by the same factor, else
        the pieces as P3 made them."""
        raw = [coarse[i] for i in used]
        if self._factor > 1 and coarsening_factor(raw) == self._factor and all(i in self._coarser for i in used):
            return [self._coarser[i] for i in used], PHOTOMETRY_BIN_PX * self._factor
        return raw, PHOTOMETRY_BIN_PX


def solve_photometry(
    policy: Any, pieces: Sequence[CoarsePiece], coarse_shape: tuple[int, int], method: str,
    bin_px: int = PHOTOMETRY_BIN_PX,
) -> Normalisation:
    """The frames' photometric solve (:func:`.photometry.solve_normalisation`, one gain per frame for
    all channels) as one unit of the ``intertile`` stage: its pair fits on the GPU when the policy
    puts that stage there (:mod:`.photometry_device`), on the host's processes otherwise.
    ``bin_px``: the canvas pixels of a cell of ``pieces``."""

    def solve(xp: Any = np, chunk_scale: float = 1.0) -> Normalisation:
        budget = int(policy.gpu_budget_bytes() * chunk_scale) if xp is not np else 0
        return solve_normalisation(
            pieces, coarse_shape, method, bin_px=bin_px, shared_gain=True, xp=xp, device_budget_bytes=budget
        )

    if policy is None:
        return solve()
    from .photometry_device import min_device_bytes

    try:
        return policy.run_stage("intertile", solve, solve, estimate_bytes=min_device_bytes(pieces))
    finally:
        policy.end_stage("intertile")


def _reproject_frames_cpu(
    frames: Sequence[FrameInfo],
    todo: list[int],
    canvas: Canvas,
    ctx: RunContext,
    n_channels: int,
    accept: Callable[[ReprojectedFrame], None],
    reject: Callable[[int, FrameError], None],
) -> Generator[Event, None, None]:
    """P3 on the CPU: a bounded pool of threads, each running whole :func:`reproject_unit` s."""
    config, policy = ctx.config, ctx.policy
    workers = _worker_count(config)

    def unit(index: int) -> ReprojectedFrame | None:
        cpu = lambda xp=np: reproject_unit(frames[index], index, canvas, config, np, n_channels)  # noqa: E731
        if policy is None:
            return cpu()
        # The stage is on the CPU here (or fell back): run_stage counts the unit and runs ``cpu``.
        return policy.run_stage("reproject", lambda xp, chunk_scale: cpu(), cpu)

    done = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zemosaic-reproject") as pool:
        pending: dict[Future, int] = {}
        queue = iter(todo)
        try:
            while True:
                while len(pending) < 2 * workers:
                    index = next(queue, None)
                    if index is None:
                        break
                    pending[pool.submit(unit, index)] = index
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = pending.pop(future)
                    done += 1
                    try:
                        frame = future.result()
                    except FrameError as exc:
                        reject(index, exc)
                        frame = None
                    if frame is not None:
                        accept(frame)
                    ctx.reporter.progress("P3", done, len(todo), "progress_frames", name=frames[index].path.name)
                yield from ctx.drain()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


#: How old a reading of the device's free memory P3's units may size their chunks with: frames
#: follow each other every few milliseconds, and each reading is a driver call of the device thread.
P3_BUDGET_MAX_AGE_S = 0.25

#: What a P3 unit gave when it raised a :class:`FrameError` (the frame is rejected).
_REJECTED = object()

#: How long the run's thread waits for a reader's answer or a device unit before it looks again
#: whether the device has run the queued frames (its CUDA events cannot be waited on beside futures).
P3_FINISH_POLL_S = 0.001

#: P3 replays each frame's corrections and noise as a captured CUDA graph (:class:`_FramePrepGraphs`);
#: off, every frame runs them kernel by kernel (the same results; the tests compare both).
P3_CAPTURE_GRAPHS = True

#: The interpreter's thread switch interval while device threads feed the GPU. A device thread
#: gives the GIL up at each wait for the device and must then not queue for Python's default
#: 5 ms slice behind a thread running Python (P2's result handling, the run's loop, loaders).
#: With P2 measured beside P3 it stays until P2's verdicts (see :func:`mosaic_first`).
P3_SWITCH_INTERVAL_S = 0.0005


def _shorten_gil_slices(seconds: float) -> Callable[[], None]:
    """``sys.setswitchinterval(seconds)`` unless already shorter; returns what restores the previous value."""
    previous = sys.getswitchinterval()
    if previous <= seconds:
        return lambda: None
    sys.setswitchinterval(seconds)
    return lambda: sys.setswitchinterval(previous)


def _reproject_frames_gpu(
    frames: Sequence[FrameInfo],
    todo: list[int],
    bboxes: dict[int, BBox],
    canvas: Canvas,
    ctx: RunContext,
    n_channels: int,
    on_device: bool,
    side: int,
    accept: Callable[[ReprojectedFrame], None],
    reject: Callable[[int, FrameError], None],
    measurer: Any = None,
    reserve_outputs: bool = True,
) -> Generator[Event, None, None]:
    """P3 with the GPU: readers (processes or threads) feed device threads (see the module docstring).

    ``measurer`` (a :class:`~.quality_device.DeviceMeasurer`) is offered each raw plane decoded
    on the device. ``reserve_outputs``: the device threads reserve pool memory for the boxes
    of all frames (kept until P5 as views); not when the store copies the pieces it keeps."""
    config, policy = ctx.config, ctx.policy
    tol_px = float(config["control_grid_tolerance_px"])
    device_threads = _gpu_thread_count(config)
    streams = WorkerStreams(policy.xp_for("reproject"))
    readers, submit_read, reader_kind, n_readers = _reader_executor(config, len(todo), canvas)
    timing = {"read_s": 0.0, "grid_s": 0.0, "device_s": 0.0}
    # The frames' outputs stay on the device until P5: each device thread's pool gets its share
    # as one block first (see gpu.reserve_pool_block).
    output_bytes = sum((bboxes[i][1] - bboxes[i][0]) * (bboxes[i][3] - bboxes[i][2]) for i in todo) * n_channels * 4
    reserved = threading.local()
    graphs = (_FramePrepGraphs(config, n_channels, ctx.reporter)
              if P3_CAPTURE_GRAPHS and on_device and not policy.memory_limit_bytes else None)

    def device_unit(host: HostFrame, queue: bool = True) -> ReprojectedFrame | _QueuedFrame:
        """One frame through the device; with ``queue`` (pieces kept on the device) nothing is
        waited for: the run's thread finishes the returned :class:`_QueuedFrame`."""
        info = frames[host.index]
        started = time.perf_counter()

        def on_gpu(xp: Any, chunk_scale: float) -> ReprojectedFrame | _QueuedFrame:
            with streams.scope() as stream:
                if on_device and reserve_outputs and not getattr(reserved, "done", False):
                    reserved.done = True
                    reserve_pool_block(output_bytes // device_threads, xp)
                checks: list[Any] | None = [] if queue and on_device else None

                def prepare_on(xp: Any) -> Any:
                    device = xp is not np
                    raw_sink = measurer.offer if device and measurer is not None else None
                    if device and checks is not None and graphs is not None:
                        prepared = graphs.prepare(host, info, xp, checks, raw_sink)
                        if prepared is not None:
                            return prepared
                    return frame_pixels(host, info, config, n_channels, xp, checks if device else None,
                                        raw_sink=raw_sink)

                budget = policy.gpu_budget_bytes(device_threads, max_age_s=P3_BUDGET_MAX_AGE_S)
                prepare = lambda: policy.run_stage(  # noqa: E731 - nested unit of the debayer stage
                    "debayer", lambda xp, chunk_scale: prepare_on(xp), prepare_on
                )
                frame = reproject_host_frame(host, info, config, n_channels, xp, budget, prepare, chunk_scale,
                                             host_stats=False)
                if checks is not None:
                    return _queue_frame_results(host, frame, checks, side, canvas.shape, xp, stream)
                if not on_device:
                    frame.data = to_host(frame.data)  # waits for this worker's stream
                    return _stats_to_host(frame)
                frame.pieces = _cut_device_pieces(frame, side, canvas.shape)  # waits for the stream
                if stream is not None:
                    stream.synchronize()  # other threads read the pieces next
                return _stats_to_host(frame)

        def on_cpu(xp: Any = np) -> ReprojectedFrame:
            return reproject_host_frame(host, info, config, n_channels, np)

        try:
            return policy.run_stage(
                "reproject", on_gpu, on_cpu, estimate_bytes=reproject_unit_min_bytes(host, info, config, n_channels)
            )
        finally:
            timing["device_s"] += time.perf_counter() - started

    done = 0
    in_flight = n_readers + 2 * device_threads
    device_pool = ThreadPoolExecutor(max_workers=device_threads, thread_name_prefix="zemosaic-gpu")
    # Pixels the readers left in their files are read into pinned memory by loader threads as
    # soon as the reader answers, so the device threads only copy (asynchronously) and decode.
    loaders = ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="zemosaic-load")
    reading: dict[Future, int] = {}
    computing: dict[Future, int] = {}
    # Frames whose device work is queued, in order: finished once the device has run them, so
    # that the run's thread hands the readers' answers to the loaders and the device thread
    # first instead of waiting for the device (the loaders would then start late).
    finishing: deque[tuple[int, _QueuedFrame]] = deque()
    queue = iter(todo)
    restore_slices = _shorten_gil_slices(P3_SWITCH_INTERVAL_S)

    def counted(index: int, frame: ReprojectedFrame | None) -> None:
        nonlocal done
        if frame is not None:
            with policy.device():  # pieces not cut by the device thread are cut here
                accept(frame)
        done += 1
        ctx.reporter.progress("P3", done, len(todo), "progress_frames", name=frames[index].path.name)

    def redo_waiting(host: HostFrame) -> Future:
        return device_pool.submit(device_unit, host, False)

    def outcome(index: int, get: Callable[[], Any]) -> Any:
        """``get()``, or :data:`_REJECTED` once a :class:`FrameError` it raised has rejected the frame."""
        try:
            return get()
        except FrameError as exc:
            reject(index, exc)
            counted(index, None)
            return _REJECTED

    try:
        while True:
            while len(reading) + len(computing) + len(finishing) < in_flight:
                index = next(queue, None)
                if index is None:
                    break
                future = submit_read(frames[index], index, tol_px, bboxes[index])
                reading[future] = index
            if not reading and not computing and not finishing:
                break
            finished: set[Future] = set()
            if reading or computing:
                finished, _ = wait([*reading, *computing], return_when=FIRST_COMPLETED,
                                   timeout=P3_FINISH_POLL_S if finishing else None)
            for future in sorted(finished, key=lambda future: future in computing):  # the answers first
                if future in reading:
                    index = reading.pop(future)
                    host = outcome(index, future.result)
                    if host is _REJECTED:
                        continue
                    if isinstance(host, str):  # the reader needs the frame's own WCS: send it whole
                        reading[submit_read(frames[index], index, tol_px, bboxes[index], True)] = index
                        continue
                    if host is None:
                        counted(index, None)
                        continue
                    timing["read_s"] += host.read_s
                    timing["grid_s"] += host.grid_s
                    if host.file_identity is not None:
                        frames[index].file_identity = host.file_identity
                        frames[index].resume_token = host.resume_token
                    if isinstance(host.pixels, RawPixels):
                        host.pixels = PrefetchedRaw(
                            host.pixels, loaders.submit(host.pixels.read_for_device, control_points(host.grid))
                        )
                    computing[device_pool.submit(device_unit, host)] = index
                    continue
                index = computing.pop(future)
                frame = outcome(index, future.result)
                if frame is _REJECTED:
                    continue
                if isinstance(frame, _QueuedFrame):
                    finishing.append((index, frame))
                else:
                    counted(index, frame)
            # Frames the device has run; all of them, waiting, once nothing else is under way.
            while finishing and (not (reading or computing) or _device_has_run(finishing[0][1])):
                index, queued = finishing.popleft()
                frame = outcome(index, partial(_finish_queued_or_redo, queued, redo_waiting, ctx.reporter))
                if frame is _REJECTED:
                    continue
                if isinstance(frame, Future):  # the frame goes again, through the waiting path
                    computing[frame] = index
                    continue
                counted(index, frame)
                del frame
            yield from ctx.drain()
    except BaseException:
        for future in [*reading, *computing]:
            future.cancel()
        raise
    finally:
        device_pool.shutdown(wait=True, cancel_futures=True)
        loaders.shutdown(wait=True, cancel_futures=True)
        readers.shutdown(wait=True, cancel_futures=True)
        streams.close()
        if graphs is not None:
            graphs.close()
        restore_slices()
    ctx.reporter.debug(
        "mf_debug_gpu_p3",
        frames=len(todo),
        readers=n_readers,
        reader_kind=reader_kind,
        read_s=round(timing["read_s"], 2),
        grid_s=round(timing["grid_s"], 2),
        device_threads=device_threads,
        device_s=round(timing["device_s"], 2),
        graphed=0 if graphs is None else graphs.replays,
        storage="gpu" if on_device else "host",
    )
    ctx.extras.setdefault("mosaic_first_gpu", []).append(
        {"frames": len(todo), "readers": n_readers, "reader_kind": reader_kind, "device_threads": device_threads,
         "storage": "gpu" if on_device else "host", "graph_replays": 0 if graphs is None else graphs.replays,
         **{k: round(v, 3) for k, v in timing.items()}}
    )
    yield from ctx.drain()


# ------------------------------------------------------------------------------- P5 helpers


def _block_pieces(
    store: PieceStore, blocks: list[tuple[int, int]], policy: Any
) -> Iterator[tuple[tuple[int, int], list[tuple[int, int, int, Any]]]]:
    """``(block, pieces)`` in order; a spilled store read one block ahead while a GPU stacks."""
    if not (store.spilled and policy is not None and policy.uses_gpu("stack")) or len(blocks) < 2:
        for block in blocks:
            yield block, store.pieces(block)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zemosaic-prefetch") as prefetch:
        upcoming = prefetch.submit(store.pieces, blocks[0])
        for position, block in enumerate(blocks):
            pieces = upcoming.result()
            if position + 1 < len(blocks):
                upcoming = prefetch.submit(store.pieces, blocks[position + 1])
            yield block, pieces


#: Blocks stacked at once on the GPU (threads): one thread's launches overlap the other's wait
#: for its results.
P5_GPU_THREADS = 2


def _stack_blocks_in_order(
    store: PieceStore,
    blocks: list[tuple[int, int]],
    policy: Any,
    stack_one: Callable[[tuple[int, int], list[tuple[int, int, int, Any]], int], Any],
    threaded: bool = True,
) -> Iterator[tuple[tuple[int, int], Any]]:
    """``(block, stack_one(block, pieces, concurrent))`` in block order.

    Blocks whose pieces are in memory (host or device) are stacked :data:`P5_GPU_THREADS` at a
    time on threads when the GPU stacks (each planning with its share of the device budget);
    otherwise one after the other, a spilled store's pieces read one block ahead.
    """
    threaded = threaded and policy is not None and policy.uses_gpu("stack") and not store.spilled and len(blocks) > 1
    if not threaded:
        for block, pieces in _block_pieces(store, blocks, policy):
            yield block, stack_one(block, pieces, 1)
        return
    streams = WorkerStreams(policy.xp_for("stack"))

    def on_thread(block: tuple[int, int]) -> Any:
        with policy.device(), streams.scope():
            return stack_one(block, store.pieces(block), P5_GPU_THREADS)

    pool = ThreadPoolExecutor(max_workers=P5_GPU_THREADS, thread_name_prefix="zemosaic-stack")
    try:
        pending = [pool.submit(on_thread, block) for block in blocks[:P5_GPU_THREADS]]
        for position, block in enumerate(blocks):
            outcome = pending[position].result()
            upcoming = position + P5_GPU_THREADS
            if upcoming < len(blocks):
                pending.append(pool.submit(on_thread, blocks[upcoming]))
            pending[position] = None  # type: ignore[call-overload]
            yield block, outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        streams.close()


def _stack_block_unit(
    policy: Any,
    pieces: Sequence[tuple[int, int, int, Any]],
    box: BBox,
    n_channels: int,
    normalisation: Normalisation,
    weights: np.ndarray,
    params: StackParams,
    stats: dict[str, int] | None = None,
    on_split: Callable[[int], None] | None = None,
    concurrent: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block stack through the policy: GPU strips sized from the budget (its share when
    ``concurrent`` blocks stack at once), or the CPU (:func:`stack_block_on_host`: strips too
    when the host runs out of memory)."""

    def on_gpu(xp: Any, chunk_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        budget = policy.gpu_budget_bytes(concurrent)
        attempt: dict[str, int] = {}
        result = stack_block_in_strips(
            pieces, box, n_channels, normalisation, weights, params, xp, budget, chunk_scale, attempt
        )
        if stats is not None:  # only the attempt that succeeded counts
            stats["strips"] = stats.get("strips", 0) + attempt.get("strips", 0)
            stats["gpu_blocks"] = stats.get("gpu_blocks", 0) + 1
        return result

    def on_cpu(xp: Any = np) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return stack_block_on_host(pieces, box, n_channels, normalisation, weights, params, on_split)

    estimate = stack_block_min_bytes(len(pieces), box, n_channels, params)
    return policy.run_stage("stack", on_gpu, on_cpu, estimate_bytes=estimate)

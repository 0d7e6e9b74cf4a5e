"""The single source of truth for GPU use: availability, memory, chunk sizes, decisions, fallbacks.

Policy
------
Every numerical kernel of the engine is written once, for an array module ``xp``
(``numpy`` or ``cupy``). This module decides, once per run, which module each *stage*
gets, and it is the only place that talks to CuPy's device and memory APIs.

Stages (:data:`STAGES`) and the config flag that asks for the GPU (:data:`STAGE_FLAGS`):

=============  ===================  ===========================================================
stage          config flag          why this flag
=============  ===================  ===========================================================
``debayer``    ``use_gpu_phase5``   per-frame pixel preparation (hot pixels + debayer) feeding
                                    the reprojection: the frame stays on the device from CFA
                                    to canvas pixels
``reproject``  ``use_gpu_phase5``   resampling onto the canvas (seed: "reprojection/assembly")
``stack``      ``stack_use_gpu``    rejection and combine (``use_gpu_stack`` is its alias)
``assembly``   ``use_gpu_phase5``   final assembly of tiles / mega-tiles
``intertile``  ``use_gpu_phase5``   photometric harmonisation on overlaps (phase 4.5)
=============  ===================  ===========================================================

The CLI's ``--gpu auto|on|off`` and the napari Run widget only change those config keys
(:func:`config_overrides_for_gpu_mode`); :meth:`ComputePolicy.from_config` turns the config
into one :class:`ComputePolicy` per run. A stage runs on the GPU when it was requested and
the GPU is usable. It runs on the CPU only for one of these reasons, each logged with a
``gpu_fallback_*`` key and recorded for ``run_report.json``:

* ``gpu_fallback_unavailable`` — CuPy is missing or unusable (no device, no driver, a
  kernel does not compile or run); the parameter ``reason`` says which.
* ``gpu_fallback_insufficient_memory`` — the smallest chunk of the stage does not fit in
  the allowed GPU memory (``estimated_mb`` vs ``allowed_mb``).
* ``gpu_fallback_runtime_error`` — the GPU raised an error. An out-of-memory error is
  first retried with smaller chunks (the ``chunk_scale`` passed to the GPU function is
  halved, up to :data:`MAX_OOM_RETRIES` times, pools freed in between); only when that
  fails, or for any other GPU error, does the stage fall back.
* ``gpu_fallback_env_override`` — an environment variable below forces the CPU.

A fallback covers a whole stage: the unit that failed is recomputed entirely on the CPU
(never half a channel), and every later unit of that stage in this run goes to the CPU too,
so a stage never flip-flops between devices. With ``gpu_strict`` (``--gpu on``) nothing falls
back: :class:`GpuUnavailableError` is raised with a locale key and its parameters.

Memory
------
Allowed bytes = (``memGetInfo`` free + bytes the CuPy pool holds but does not use − a
reserve for the CUDA context, cuBLAS/cuFFT workspaces and fragmentation) × the safety
fraction (``gpu_safety_fraction``, default 0.8). With a memory limit (config
``gpu_memory_limit_mb`` or ``ZEMOSAIC_GPU_MEMORY_LIMIT_MB``) the usable part is at most
the limit minus what the pool already hands out. :func:`plan_chunks` and
:func:`plan_block_side` size frame batches and canvas blocks from that budget and a
bytes-per-pixel model of each kernel (:func:`kernel_bytes_per_pixel`). CuPy's pools are
freed at stage boundaries (:meth:`ComputePolicy.end_stage`) and before an OOM retry,
never after every kernel (that would force a ``cudaMalloc`` per kernel).

Devices are selected with ``cupy.cuda.Device(gpu_device_id)`` around each GPU call, inside
the calling (worker) thread — CUDA's current device is per host thread. ``CUDA_VISIBLE_DEVICES``
is never rewritten.

Environment overrides (each one is logged when it changes something)
--------------------------------------------------------------------
``ZEMOSAIC_FORCE_CPU``             any value but ``""``, ``0``, ``false``, ``no``, ``off``:
                                   every stage on the CPU.
``ZEMOSAIC_FORCE_CPU_INTERTILE``   same, for the ``intertile`` stage only.
``ZEMOSAIC_GPU_SAFETY_FRACTION``   a number in [0.05, 1.0] that replaces ``gpu_safety_fraction``;
                                   an invalid value is ignored with a warning.
``ZEMOSAIC_GPU_MEMORY_LIMIT_MB``   a positive number of MB that replaces the config key
                                   ``gpu_memory_limit_mb``: the most device memory this run's
                                   CuPy pool may hold (0 or unset: no limit but the device's).
                                   Use it to share a GPU with other programs, or to check that
                                   a small card gets the same mosaic through smaller chunks.
The environment wins over ``gpu_strict``: it is the user's explicit escape hatch.

State
-----
Nothing that depends on a run outlives it: decisions, OOM hints (the chunk scale that
worked), fallbacks and unit counts live on the :class:`ComputePolicy` instance. The
only module-level state mirrors process-wide CUDA facts: which devices already have their
CuPy pool warmed up, and a probe cache that :meth:`ComputePolicy.from_config` refreshes at
the start of every run (``gpu_is_available(refresh=True)``).

CPU/GPU parity tolerances
-------------------------
:data:`PARITY_TOLERANCES` documents how close the two backends must be; the GPU parity
tests (``pytest -m gpu``) use these numbers. They are scaled to the data and its noise:
both backends run the same float32 algorithm, so differences come only from summation
order, fused multiply-adds and decisions taken exactly at a threshold.

This module imports without CuPy; nothing here imports napari or Qt.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..config import GPU_STACK_ALIASES, validate_config
from .context import UserError

STAGES: tuple[str, ...] = ("debayer", "reproject", "stack", "assembly", "intertile")

STAGE_FLAGS: dict[str, str] = {
    "debayer": "use_gpu_phase5",
    "reproject": "use_gpu_phase5",
    "stack": "stack_use_gpu",
    "assembly": "use_gpu_phase5",
    "intertile": "use_gpu_phase5",
}

ENV_FORCE_CPU = "ZEMOSAIC_FORCE_CPU"
ENV_FORCE_CPU_INTERTILE = "ZEMOSAIC_FORCE_CPU_INTERTILE"
ENV_SAFETY_FRACTION = "ZEMOSAIC_GPU_SAFETY_FRACTION"
ENV_MEMORY_LIMIT_MB = "ZEMOSAIC_GPU_MEMORY_LIMIT_MB"
#: Config key of the GPU memory limit in MB (0 = none); the environment variable wins.
CONFIG_MEMORY_LIMIT_KEY = "gpu_memory_limit_mb"
SAFETY_FRACTION_RANGE = (0.05, 1.0)

DEFAULT_SAFETY_FRACTION = 0.8
# OOM retries per unit: chunk scale 1 → 1/2 → 1/4 → 1/8 → 1/16 before giving up.
MAX_OOM_RETRIES = 4
# Kept free for the CUDA context, cuBLAS/cuFFT workspaces and pool fragmentation.
GPU_RESERVE_BYTES = 256 * 2**20
# Longest error text kept in a log parameter / report entry.
_MAX_ERROR_CHARS = 300

MB = 2**20

PARITY_TOLERANCES: dict[str, dict[str, float]] = {
    # Bilinear debayer: pairwise sums scaled by 0.5 / 0.25, only rounding can differ.
    "debayer": {"atol_of_peak": 1e-6},
    # Same medians and thresholds; the corrected frames may differ only where a candidate
    # sits exactly on a threshold (fraction of pixels), values elsewhere only by rounding.
    "hot_pixels": {"mask_mismatch_fraction": 1e-4, "atol_of_peak": 1e-6},
    # Dense pixel map, per coordinate, in ulps of the map's dtype at that coordinate: the
    # y-interpolation top + f·(bottom − top) may be fused into one FMA on the GPU.
    "control_grid": {"ulps": 2.0},
    # Sampling the same map on both: 1e-3 σ of the noise plus float32 rounding of up to 36
    # weighted taps (36 · 2⁻²⁴ · Σ|w| ≈ 3e-6 of the peak); NaN masks agree but for pixels
    # exactly on the frame edge.
    "sample": {"atol_of_noise": 1e-3, "atol_of_peak": 4e-6, "nan_mismatch_fraction": 1e-5},
    # Map + sampling end to end: "sample" plus (largest image gradient) × (map tolerance).
    "reproject": {"nan_mismatch_fraction": 1e-4},
    # Stacked values: where the kept counts agree, float32 summation order only
    # (atol_of_stack_noise · σ/√N plus rtol · |value|); a sample exactly on a κ threshold may
    # flip on at most flip_fraction of the pixels, moving the mean by ≤ (κ + 1)·σ/(n − 1).
    "stack": {"atol_of_stack_noise": 1e-2, "rtol": 1e-5, "flip_fraction": 1e-3},
}

# Bytes of device memory per pixel held at the peak of each kernel, inputs and temporaries
# included, counted from the array algebra of the xp kernels (each temporary of the
# expression chain, int64 gather indices, CuPy's sort workspace) and checked against the
# CuPy pool's high-water mark on an H100 (``tests/engine/test_gpu_parity.py``). Per CFA
# pixel for ``debayer`` / ``hot_pixels``; per pixel of a sampling chunk for ``reproject``
# (the bounding-box output itself is counted by the caller); per canvas pixel of a block
# strip for ``stack`` (see :func:`kernel_bytes_per_pixel`).
_BYTES_PER_PIXEL_BASE: dict[str, int] = {
    "debayer": 12,  # uint16 upload, float32 plane, reflect-padded copy
    "hot_pixels": 48,  # plane, padded copy, corrected copy, row minima, excess, candidate tables
    # Bilinear sampling of one chunk pixel: float32 map_x/map_y and their expansion
    # temporaries (24), clamped coordinates, cells and fractions (24), four float32 weights
    # (16), four int64 flat indices (32), masks (6), gather temporaries (16).
    "reproject": 120,
    "assembly": 20,  # float64 maps for the tile pixels + coverage (float32)
    "intertile": 8,  # overlap mask and weights
}
_BYTES_PER_PIXEL_CHANNEL: dict[str, int] = {
    "debayer": 16,  # output plane + interpolation temporaries per channel
    "hot_pixels": 0,
    "reproject": 12,  # gathered tap values and products per channel (float32)
    "assembly": 12,  # sum, weight-sum, incoming tile pixel per channel
    "intertile": 24,  # two tiles' overlap pixels and their sorted copies
}
# Separable kernels: per tap an int64 index and a float32 weight along each axis, plus one
# int64 flat index per tap of the square (16 for bicubic, 36 for Lanczos-3) and temporaries.
_RESAMPLE_EXTRA_BYTES: dict[str, int] = {"bilinear": 0, "bicubic": 256, "lanczos3": 480}
# Device bytes per stacked value (one frame, one channel, one pixel) at the peak of each
# rejection: the cube (4), the mask (1), the transposed sorted copies (8), CuPy's segmented
# sort (int64 keys + workspace, ~20) and, once sorted, two float64 prefix-sum tables (16)
# — the sort workspace is gone by then, so the larger phase counts. Linear-fit clipping
# adds an int64 argsort order and its workspace. The median combine sorts once more.
_STACK_BYTES_PER_VALUE: dict[str, int] = {
    "none": 12,
    "kappa_sigma": 40,
    "winsorized_sigma_clip": 40,
    "linear_fit_clip": 64,
}
_STACK_MEDIAN_EXTRA_PER_VALUE = 16
# Per canvas pixel and channel of a stacked strip: the uploaded piece, its background plane
# and the normalised copy (12), the float32 output and float64 accumulators (12).
_STACK_BYTES_PER_PIXEL_CHANNEL = 24
# CPU block plan of Mosaic-First (host memory): the cube plus three cube-sized temporaries.
STACK_WORKSPACE_FACTOR = 4


# ----------------------------------------------------------------------------- errors


class GpuUnavailableError(UserError):
    """The GPU was required (``gpu_strict`` / ``--gpu on``) but cannot be used.

    Carries a locale key and its parameters, like every user-facing engine error. It is a
    :class:`~napari_zemosaic.engine.context.UserError`: the user asked for something this
    machine cannot do, so the pipeline reports it as such and the CLI exits with code 2.
    """

    def __init__(self, key: str, **params: Any) -> None:
        super().__init__(key, **params)


def _describe(exc: BaseException, context: str = "") -> str:
    """A short, single-line text for an exception, for log parameters and the report."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    if context:
        text = f"{context} ({text})"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
    """True for device (or host) allocation failures, which smaller chunks may avoid.

    ``cupy.cuda.memory.OutOfMemoryError`` subclasses ``MemoryError``; cuBLAS, cuFFT and
    the CUDA runtime report allocation failures as their own error types whose message
    says so (``cudaErrorMemoryAllocation: out of memory``, ``CUFFT_ALLOC_FAILED``...).
    """
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "alloc_failed" in text or "memoryallocation" in text


_ENGINE_PASSTHROUGH = (("context", "RunCancelled"), ("context", "UserError"), ("frames", "FrameError"))


def _engine_passthrough_errors() -> tuple[type[BaseException], ...]:
    """Engine exceptions that say nothing about the GPU (cancel, user error, bad frame).

    Looked up in ``sys.modules`` rather than imported: a module that is not loaded cannot
    have raised its exception, and this keeps ``gpu`` free of import cycles.
    """
    package = __name__.rpartition(".")[0]
    found: list[type[BaseException]] = []
    for module_name, attribute in _ENGINE_PASSTHROUGH:
        module = sys.modules.get(f"{package}.{module_name}")
        candidate = getattr(module, attribute, None) if module is not None else None
        if isinstance(candidate, type) and issubclass(candidate, BaseException):
            found.append(candidate)
    return tuple(found)


# ----------------------------------------------------------------------------- CuPy access


def _import_cupy() -> tuple[Any | None, str]:
    """``(cupy, "")`` or ``(None, reason)``; never raises."""
    if importlib.util.find_spec("cupy") is None:
        return None, "cupy is not installed"
    try:
        module = importlib.import_module("cupy")
    except Exception as exc:  # a broken install raises ImportError, OSError, RuntimeError...
        return None, _describe(exc, "cupy failed to import")
    return module, ""


def cupy_or_none() -> Any | None:
    """The ``cupy`` module, or ``None`` when it is not installed or does not import."""
    module, _reason = _import_cupy()
    return module


def device_scope(device_id: int = 0) -> AbstractContextManager[Any]:
    """``cupy.cuda.Device(device_id)`` as a context manager (a no-op without CuPy).

    Use it inside the thread that runs GPU work: CUDA's current device is per thread.
    """
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return nullcontext()
    return cupy.cuda.Device(device_id)


_probe_lock = threading.Lock()
_probe_cache: dict[int, tuple[bool, str]] = {}


def _probe_device(device_id: int) -> tuple[bool, str]:
    """Import CuPy, check the device exists, compile and run a tiny kernel on it."""
    cupy, reason = _import_cupy()
    if cupy is None:
        return False, reason
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver / no device: CUDARuntimeError
        return False, _describe(exc, "cupy found no CUDA device")
    if count <= device_id:
        return False, f"cupy sees {count} CUDA device(s); gpu_device_id={device_id} does not exist"
    try:
        with cupy.cuda.Device(device_id):
            kernel = cupy.ElementwiseKernel("float32 x", "float32 y", "y = x * 2.0f + 1.0f", "zemosaic_gpu_probe")
            values = cupy.arange(64, dtype=cupy.float32)
            result = cupy.asnumpy(kernel(values))
    except Exception as exc:  # NVRTC compile errors, CUDA driver errors, missing libraries
        return False, _describe(exc, "cupy could not compile or run a test kernel")
    expected = np.arange(64, dtype=np.float32) * 2 + 1
    if not np.array_equal(result, expected):
        return False, "cupy test kernel returned wrong values"
    return True, ""


def gpu_is_available(device_id: int = 0, *, refresh: bool = False) -> tuple[bool, str]:
    """``(True, "")`` when CuPy imports, the device exists and a tiny kernel compiles and runs.

    Otherwise ``(False, reason)``. The answer is cached per device until ``refresh=True``
    (each run's :class:`ComputePolicy` refreshes it, so a run never reuses another run's answer).
    """
    with _probe_lock:
        if refresh or device_id not in _probe_cache:
            _probe_cache[device_id] = _probe_device(device_id)
        return _probe_cache[device_id]


def reset_gpu_probe_cache() -> None:
    """Forget cached availability answers (the next :func:`gpu_is_available` probes again)."""
    with _probe_lock:
        _probe_cache.clear()


def _version_text(code: int) -> str:
    """CUDA's integer versions (12040) as text (12.4)."""
    return f"{code // 1000}.{(code % 1000) // 10}"


def gpu_memory_info(device_id: int = 0) -> dict[str, Any] | None:
    """Memory and identity of a device, or ``None`` without CuPy.

    Keys: ``device_id``, ``name``, ``compute_capability``, ``total_bytes``, ``free_bytes``
    (``memGetInfo``), ``pool_free_bytes`` / ``pool_used_bytes`` (CuPy's default pool),
    ``cupy_version``, ``cuda_runtime_version``, ``cuda_driver_version``.
    CUDA errors propagate: call it after :func:`gpu_is_available` said yes.
    """
    cupy = cupy_or_none()
    if cupy is None:
        return None
    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device(device_id)
    with device:
        free_bytes, total_bytes = runtime.memGetInfo()
        pool = cupy.get_default_memory_pool()
        properties = runtime.getDeviceProperties(device_id)
        name = properties.get("name", b"")
        return {
            "device_id": int(device_id),
            "name": name.decode(errors="replace") if isinstance(name, bytes) else str(name),
            "compute_capability": str(device.compute_capability),
            "total_bytes": int(total_bytes),
            "free_bytes": int(free_bytes),
            "pool_free_bytes": int(pool.free_bytes()),
            "pool_used_bytes": int(pool.used_bytes()),
            "cupy_version": str(cupy.__version__),
            "cuda_runtime_version": _version_text(int(runtime.runtimeGetVersion())),
            "cuda_driver_version": _version_text(int(runtime.driverGetVersion())),
        }


def gpu_free_memory(device_id: int = 0) -> dict[str, int] | None:
    """The live numbers the memory budget needs, cheaply (no device-property query).

    ``{"total_bytes", "free_bytes", "pool_free_bytes", "pool_used_bytes"}`` or ``None``
    without CuPy.
    """
    cupy = cupy_or_none()
    if cupy is None:
        return None
    with cupy.cuda.Device(device_id):
        free_bytes, total_bytes = cupy.cuda.runtime.memGetInfo()
        pool = cupy.get_default_memory_pool()
        pool_free, pool_used = pool.free_bytes(), pool.used_bytes()
    return {"total_bytes": int(total_bytes), "free_bytes": int(free_bytes), "pool_free_bytes": int(pool_free),
            "pool_used_bytes": int(pool_used)}


def allowed_bytes_from_info(info: Mapping[str, Any] | None, safety_fraction: float, limit_bytes: int = 0) -> int:
    """(free + pool free − reserve) × safety fraction; 0 without device information.

    With ``limit_bytes`` > 0 the usable part is also at most ``limit_bytes`` minus the
    bytes the pool already hands out (``pool_used_bytes``).
    """
    if not info:
        return 0
    reserve = min(GPU_RESERVE_BYTES, int(info.get("total_bytes", 0)) // 10)
    usable = int(info.get("free_bytes", 0)) + int(info.get("pool_free_bytes", 0)) - reserve
    if int(limit_bytes) > 0:
        usable = min(usable, int(limit_bytes) - int(info.get("pool_used_bytes", 0)))
    return max(0, int(usable * float(safety_fraction)))


def gpu_memory_sufficient(
    estimated_bytes: int, safety_fraction: float = DEFAULT_SAFETY_FRACTION, device_id: int = 0,
    limit_bytes: int = 0,
) -> bool:
    """True when ``estimated_bytes`` fit in the allowed share of the device's free memory.

    Free memory counts what ``memGetInfo`` reports plus what CuPy's pool holds unused
    (the pool hands those blocks out again), minus a fixed reserve; ``limit_bytes`` caps it
    (see :func:`allowed_bytes_from_info`). False without CuPy.
    """
    info = gpu_free_memory(device_id)
    return info is not None and int(estimated_bytes) <= allowed_bytes_from_info(info, safety_fraction, limit_bytes)


_pool_lock = threading.Lock()
_pools_ready: set[int] = set()


def ensure_cupy_pool_initialized(device_id: int = 0) -> None:
    """Create the CUDA context and CuPy's default memory pools on ``device_id``, once.

    Idempotent and thread-safe: concurrent callers wait for the first one. Does nothing
    without CuPy. CuPy's allocator is left as it is (the default pool unless the user set
    another, e.g. RMM), so this never fights an allocator chosen outside the engine.
    """
    cupy = cupy_or_none()
    if cupy is None:
        return
    with _pool_lock:
        if device_id in _pools_ready:
            return
        with cupy.cuda.Device(device_id):
            cupy.get_default_memory_pool()
            cupy.get_default_pinned_memory_pool()
            # One small allocation creates the context and the pool's arena on this device.
            cupy.zeros(1, dtype=cupy.float32).sum()
        _pools_ready.add(device_id)


def free_cupy_memory_pools(device_id: int | None = None) -> None:
    """Return the unused blocks of CuPy's device and pinned pools to the driver.

    Call at stage boundaries (and before an OOM retry), not after every kernel. With
    ``device_id=None`` the pool of the calling thread's current device is freed.
    Arrays still referenced are not freed. Does nothing without CuPy.
    """
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return
    scope = nullcontext() if device_id is None else cupy.cuda.Device(device_id)
    with scope:
        cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------- host/device


def to_host(array: Any) -> np.ndarray:
    """A NumPy array from a NumPy or CuPy array (copies device arrays to the host)."""
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy.asnumpy(array)
    return np.asarray(array)


def to_device(array: Any, xp: Any) -> Any:
    """``array`` as an array of module ``xp`` (a no-op when it already is one)."""
    if xp is np:
        return to_host(array)
    return xp.asarray(array)


def is_device_module(xp: Any) -> bool:
    """True when ``xp`` is CuPy (an array module with CUDA streams), not NumPy."""
    return xp is not np and getattr(xp, "cuda", None) is not None


class WorkerStreams:
    """One non-blocking CUDA stream per worker thread, so threads overlap on one device.

    CuPy's pool keeps freed blocks per stream, so each worker keeps *its* stream for the
    whole stage (a stream per unit would strand the blocks of every finished unit). A
    non-blocking stream does not wait for the legacy default stream: whoever hands device
    arrays from a worker to another stream synchronises first (:meth:`synchronize`, or a
    host copy, which waits for the worker's stream). With NumPy every scope is a no-op.
    """

    def __init__(self, xp: Any) -> None:
        self._cupy = xp if is_device_module(xp) else None
        self._local = threading.local()
        self._streams: list[Any] = []
        self._lock = threading.Lock()

    def scope(self) -> AbstractContextManager[Any]:
        """The calling thread's stream as a context manager (created on first use)."""
        if self._cupy is None:
            return nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._cupy.cuda.Stream(non_blocking=True)
            self._local.stream = stream
            with self._lock:
                self._streams.append(stream)
        return stream

    def synchronize(self) -> None:
        """Wait for the work queued on every worker stream."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.synchronize()

    def close(self) -> None:
        """Synchronise and forget the streams (end of the stage)."""
        self.synchronize()
        with self._lock:
            self._streams.clear()


# ----------------------------------------------------------------------------- chunk planning


def kernel_bytes_per_pixel(
    kernel: str,
    *,
    channels: int = 3,
    frames: int = 1,
    method: str = "bilinear",
    rejection: str = "kappa_sigma",
    combine: str = "mean",
) -> int:
    """Peak device bytes per pixel of one kernel (see the tables at the top of the module).

    ``kernel`` is a stage name or ``hot_pixels``. For ``stack`` a pixel of a canvas block
    strip holds ``frames × channels`` values, each costing the ``rejection``'s peak
    workspace (plus a second sort for the ``median`` combine), and per channel the uploaded
    pieces and the outputs. For ``reproject`` and ``assembly`` the resampling ``method``
    adds its wider tap temporaries. Unknown methods or rejections get the largest figure.
    """
    channels = max(1, int(channels))
    if kernel == "stack":
        per_value = _STACK_BYTES_PER_VALUE.get(rejection, max(_STACK_BYTES_PER_VALUE.values()))
        if combine == "median":
            per_value += _STACK_MEDIAN_EXTRA_PER_VALUE
        return max(1, int(frames)) * channels * per_value + channels * _STACK_BYTES_PER_PIXEL_CHANNEL + 16
    if kernel not in _BYTES_PER_PIXEL_BASE:
        raise ValueError(f"unknown kernel {kernel!r}")
    total = _BYTES_PER_PIXEL_BASE[kernel] + _BYTES_PER_PIXEL_CHANNEL[kernel] * channels
    if kernel in ("reproject", "assembly"):
        total += _RESAMPLE_EXTRA_BYTES.get(method, max(_RESAMPLE_EXTRA_BYTES.values()))
    return total


def plan_chunks(total_items: int, bytes_per_item: int, budget_bytes: int, min_items: int = 1) -> int:
    """Items per chunk so that one chunk fits in ``budget_bytes``, chunks balanced.

    The result lies in ``[min(min_items, total_items), total_items]`` (0 when there is
    nothing to do). Chunks are evened out: 10 items with room for 9 give 2 chunks of 5,
    not 9 + 1. When even ``min_items`` does not fit, ``min_items`` is returned: whether that
    is acceptable is the caller's memory check (``ComputePolicy.run_stage(estimate_bytes=...)``).
    """
    total_items = int(total_items)
    if total_items <= 0:
        return 0
    floor_items = max(1, min(int(min_items), total_items))
    fitting = int(budget_bytes) // max(1, int(bytes_per_item))
    per_chunk = max(floor_items, min(fitting, total_items))
    chunks = math.ceil(total_items / per_chunk)
    return max(floor_items, math.ceil(total_items / chunks))


def chunk_slices(total_items: int, items_per_chunk: int) -> list[slice]:
    """Consecutive slices covering ``range(total_items)`` with at most ``items_per_chunk`` each."""
    step = max(1, int(items_per_chunk))
    return [slice(start, min(start + step, total_items)) for start in range(0, max(0, total_items), step)]


BLOCK_ALIGN = 32


def plan_block_side(bytes_per_pixel: int, budget_bytes: int, max_side: int, min_side: int = 64) -> int:
    """Side of a square canvas block whose ``side² × bytes_per_pixel`` fits in ``budget_bytes``.

    Clamped to ``[min(min_side, max_side), max_side]`` and, below ``max_side``, rounded
    down to a multiple of 32 (whole warps per row) but never under ``min_side``. As with
    :func:`plan_chunks`, the minimum is returned even when it does not fit; the caller's
    memory check decides.
    """
    max_side = max(1, int(max_side))
    floor_side = min(max(1, int(min_side)), max_side)
    fitting = math.isqrt(max(0, int(budget_bytes)) // max(1, int(bytes_per_pixel)))
    if fitting >= max_side:
        return max_side
    aligned = fitting - fitting % BLOCK_ALIGN if fitting >= BLOCK_ALIGN else fitting
    return max(floor_side, aligned)


# ----------------------------------------------------------------------------- decisions


def config_overrides_for_gpu_mode(mode: str) -> dict[str, Any]:
    """Config keys for the CLI's ``--gpu auto|on|off`` (and the Run widget's choice).

    ``auto`` keeps the config's flags; ``on`` asks for the GPU everywhere and fails rather
    than falling back (``gpu_strict``); ``off`` runs everything on the CPU.
    """
    mode = str(mode).strip().lower()
    if mode == "auto":
        return {}
    if mode == "on":
        return {"use_gpu_phase5": True, "stack_use_gpu": True, "use_gpu_stack": True, "gpu_strict": True}
    if mode == "off":
        return {"use_gpu_phase5": False, "stack_use_gpu": False, "use_gpu_stack": False, "gpu_strict": False}
    raise ValueError(f"unknown GPU mode {mode!r} (auto, on, off)")


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _jsonable(value: Any) -> Any:
    """Log/report parameters as plain JSON types (numpy scalars, tuples, paths → str)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


@dataclass(frozen=True)
class GpuBackend:
    """What :class:`ComputePolicy` needs from the device. The default talks to CuPy.

    Tests of the *decision logic* may pass a stand-in (no device is touched by those tests);
    everything numerical is checked on a real GPU by the ``gpu``-marked parity tests.
    """

    probe: Callable[[int], tuple[bool, str]] = lambda device_id: gpu_is_available(device_id, refresh=True)
    memory_info: Callable[[int], dict[str, Any] | None] = gpu_memory_info
    free_memory: Callable[[int], dict[str, int] | None] = gpu_free_memory
    array_module: Callable[[], Any] = cupy_or_none
    init_pools: Callable[[int], None] = ensure_cupy_pool_initialized
    free_pools: Callable[[int], None] = free_cupy_memory_pools
    device_scope: Callable[[int], AbstractContextManager[Any]] = device_scope


def _stage_list(stages: Iterable[str]) -> str:
    names = list(stages)
    return ", ".join(names) if names else "-"


@dataclass(eq=False)
class ComputePolicy:
    """The per-run GPU/CPU decision for every stage, with its fallbacks and OOM hints.

    Build it once per run with :meth:`from_config`; hang it on the run object. All its
    methods are thread-safe (worker threads call :meth:`run_stage` concurrently).
    """

    device_id: int = 0
    safety_fraction: float = DEFAULT_SAFETY_FRACTION
    strict: bool = False
    memory_limit_bytes: int = 0  # 0: no limit but the device's
    requested: dict[str, bool] = field(default_factory=lambda: {stage: False for stage in STAGES})
    decisions: dict[str, str] = field(default_factory=lambda: {stage: "cpu" for stage in STAGES})
    reporter: Any = None
    backend: GpuBackend = field(default_factory=GpuBackend)
    device_info: dict[str, Any] | None = None
    unavailable_reason: str = ""
    max_oom_retries: int = MAX_OOM_RETRIES
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    gpu_errors: list[dict[str, Any]] = field(default_factory=list)
    env_overrides: dict[str, str] = field(default_factory=dict)
    _gpu_xp: Any = None
    _units: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {"gpu": 0, "cpu": 0} for s in STAGES})
    _chunk_scale: dict[str, float] = field(default_factory=lambda: {stage: 1.0 for stage in STAGES})
    _oom_retries: dict[str, int] = field(default_factory=lambda: {stage: 0 for stage in STAGES})
    _fell_back: set[str] = field(default_factory=set)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        reporter: Any = None,
        env: Mapping[str, str] | None = None,
        *,
        availability: Callable[[], tuple[bool, str]] | None = None,
        backend: GpuBackend | None = None,
    ) -> ComputePolicy:
        """Decide every stage for one run from the config, the environment and the device.

        ``availability`` / ``backend`` replace the CuPy probe and device calls; they exist
        to test the decision logic without a GPU and are not meant for production use.
        Raises :class:`GpuUnavailableError` when ``gpu_strict`` and the GPU cannot be used.
        """
        env = os.environ if env is None else env
        # A legacy config that only sets use_gpu_stack must win over the default of stack_use_gpu.
        present_aliases = [key for key in GPU_STACK_ALIASES if key in config]
        config = validate_config(config, explicit_keys=present_aliases)
        backend = backend or GpuBackend()
        if availability is not None:
            probe = availability
            backend = GpuBackend(
                probe=lambda _device_id: probe(),
                memory_info=backend.memory_info,
                free_memory=backend.free_memory,
                array_module=backend.array_module,
                init_pools=backend.init_pools,
                free_pools=backend.free_pools,
                device_scope=backend.device_scope,
            )
        policy = cls(
            device_id=int(config["gpu_device_id"]),
            safety_fraction=float(config["gpu_safety_fraction"]),
            strict=bool(config["gpu_strict"]),
            requested={stage: bool(config[STAGE_FLAGS[stage]]) for stage in STAGES},
            reporter=reporter,
            backend=backend,
        )
        policy._apply_safety_env(env, float(config["gpu_safety_fraction"]))
        policy._apply_memory_limit(env, config.get(CONFIG_MEMORY_LIMIT_KEY, 0))
        wanted = [stage for stage in STAGES if policy.requested[stage]]
        wanted = policy._apply_force_cpu_env(env, wanted)
        if wanted:
            policy._decide_gpu(wanted)
        return policy

    def _apply_safety_env(self, env: Mapping[str, str], config_value: float) -> None:
        raw = env.get(ENV_SAFETY_FRACTION, "").strip()
        if not raw:
            return
        low, high = SAFETY_FRACTION_RANGE
        invalid = {"variable": ENV_SAFETY_FRACTION, "value": raw, "minimum": low, "maximum": high}
        try:
            value = float(raw)
        except ValueError:
            self._log("warning", "gpu_warning_env_safety_fraction_invalid", **invalid)
            return
        if not (low <= value <= high):  # also rejects NaN
            self._log("warning", "gpu_warning_env_safety_fraction_invalid", **invalid)
            return
        self.safety_fraction = value
        self.env_overrides[ENV_SAFETY_FRACTION] = raw
        self._log("info", "gpu_info_env_safety_fraction", variable=ENV_SAFETY_FRACTION, value=value,
                  config_value=config_value)

    def _apply_memory_limit(self, env: Mapping[str, str], config_value: Any) -> None:
        """``gpu_memory_limit_mb`` from the config, replaced by ``ZEMOSAIC_GPU_MEMORY_LIMIT_MB`` (logged)."""
        try:
            limit_mb = max(0.0, float(config_value or 0))
        except (TypeError, ValueError):
            self._log("warning", "gpu_warning_memory_limit_invalid", variable=CONFIG_MEMORY_LIMIT_KEY,
                      value=str(config_value))
            limit_mb = 0.0
        raw = env.get(ENV_MEMORY_LIMIT_MB, "").strip()
        if raw:
            try:
                value = float(raw)
                if not (value > 0 and math.isfinite(value)):
                    raise ValueError(raw)
            except ValueError:
                self._log("warning", "gpu_warning_memory_limit_invalid", variable=ENV_MEMORY_LIMIT_MB, value=raw)
            else:
                limit_mb = value
                self.env_overrides[ENV_MEMORY_LIMIT_MB] = raw
                self._log("info", "gpu_info_env_memory_limit", variable=ENV_MEMORY_LIMIT_MB, value=value)
        self.memory_limit_bytes = int(limit_mb * MB)

    def _apply_force_cpu_env(self, env: Mapping[str, str], wanted: list[str]) -> list[str]:
        """Drop the stages an environment variable forces onto the CPU (logged)."""
        for variable, stages in ((ENV_FORCE_CPU, STAGES), (ENV_FORCE_CPU_INTERTILE, ("intertile",))):
            if not _env_flag(env, variable):
                continue
            self.env_overrides[variable] = env[variable]
            forced = [stage for stage in wanted if stage in stages]
            if forced:
                self.record_fallback(forced, "gpu_fallback_env_override", level="info", variable=variable)
                wanted = [stage for stage in wanted if stage not in forced]
            else:
                self._log("info", "gpu_info_env_override_noop", variable=variable)
        return wanted

    def _decide_gpu(self, wanted: list[str]) -> None:
        ok, reason = self.backend.probe(self.device_id)
        gpu_xp = None
        if ok:
            gpu_xp = self.backend.array_module()
            if gpu_xp is None:
                ok, reason = False, "cupy did not import after a successful probe"
        if ok:
            try:
                self.backend.init_pools(self.device_id)
                self.device_info = self.backend.memory_info(self.device_id)
            except Exception as exc:  # the device vanished or the driver failed between calls
                ok, reason = False, _describe(exc, "cupy could not query the device")
                self._note_gpu_error("*", reason)
        if not ok:
            self.unavailable_reason = reason
            if self.strict:
                raise GpuUnavailableError("gpu_error_unavailable_strict", stages=_stage_list(wanted), reason=reason)
            self.record_fallback(wanted, "gpu_fallback_unavailable", reason=reason)
            return
        self._gpu_xp = gpu_xp
        for stage in wanted:
            self.decisions[stage] = "gpu"

    # ------------------------------------------------------------------ queries

    @staticmethod
    def _check_stage(stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown compute stage {stage!r}; expected one of {STAGES}")

    def uses_gpu(self, stage: str) -> bool:
        """Whether ``stage`` currently runs on the GPU (false after its fallback)."""
        self._check_stage(stage)
        with self._lock:
            return self.decisions[stage] == "gpu"

    def xp_for(self, stage: str) -> Any:
        """The array module of ``stage``: ``cupy`` when it runs on the GPU, else ``numpy``.

        Ask per work unit: after a fallback the answer changes to ``numpy``.
        """
        return self._gpu_xp if self.uses_gpu(stage) else np

    @property
    def any_gpu(self) -> bool:
        with self._lock:
            return any(decision == "gpu" for decision in self.decisions.values())

    def gpu_budget_bytes(self, concurrent_units: int = 1) -> int:
        """Bytes a GPU unit may plan to use now: free × safety fraction (0 when no stage is on the GPU).

        Live: asks the device each call. Divide among ``concurrent_units`` units running at once.
        """
        if not self.any_gpu:
            return 0
        info = self.backend.free_memory(self.device_id)
        allowed = allowed_bytes_from_info(info, self.safety_fraction, self.memory_limit_bytes)
        return allowed // max(1, int(concurrent_units))

    def chunk_scale(self, stage: str) -> float:
        """The chunk scale the next GPU unit of ``stage`` starts with (smaller after an OOM)."""
        self._check_stage(stage)
        with self._lock:
            return self._chunk_scale[stage]

    def device(self) -> AbstractContextManager[Any]:
        """Context selecting this run's device in the calling thread (use it in worker threads)."""
        return self.backend.device_scope(self.device_id) if self.any_gpu else nullcontext()

    # ------------------------------------------------------------------ running

    def run_stage(
        self,
        stage: str,
        gpu_fn: Callable[..., Any],
        cpu_fn: Callable[..., Any],
        *,
        estimate_bytes: int | None = None,
        shrink: Callable[[float], float | None] | None = None,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> Any:
        """Run one work unit of ``stage`` on its backend, handling OOM and fallbacks.

        * CPU stage: ``cpu_fn(xp=numpy)``.
        * GPU stage: ``gpu_fn(xp=cupy, chunk_scale=s)`` inside this run's device scope, where
          ``s`` (≤ 1) scales the chunk budget (``policy.gpu_budget_bytes() * s``).
        * ``estimate_bytes`` is the unit's *minimal* working set (its smallest chunk): when it
          exceeds :meth:`gpu_budget_bytes`, the stage falls back (or, strict, raises) without
          trying.
        * On an out-of-memory error the pools are freed and the unit is retried with
          ``shrink(s)`` (default ``s / 2``; ``None`` or no decrease stops), up to
          ``max_oom_retries`` times; the scale that worked is kept for the next units.
        * Any other GPU error, or OOM after the retries: ``gpu_fallback_runtime_error``, the
          whole unit is recomputed by ``cpu_fn`` and the rest of the stage runs on the CPU.
        * Exceptions that are not about the device propagate unchanged: :class:`GpuUnavailableError`,
          the engine's cancel request, user and bad-frame errors (``RunCancelled``, ``UserError``,
          ``FrameError``) and the types in ``passthrough``. Anything else raised by ``gpu_fn`` is
          treated as a GPU error; if it was a plain bug, ``cpu_fn`` raises it again.
        """
        self._check_stage(stage)
        if not self.uses_gpu(stage):
            return self._run_cpu(stage, cpu_fn)
        if estimate_bytes is not None:
            allowed = self.gpu_budget_bytes()
            if int(estimate_bytes) > allowed:
                self._fallback(stage, "gpu_fallback_insufficient_memory", "gpu_error_insufficient_memory_strict",
                               estimated_mb=round(int(estimate_bytes) / MB, 1), allowed_mb=round(allowed / MB, 1))
                return self._run_cpu(stage, cpu_fn)
        shrink = shrink or (lambda scale: scale / 2.0)
        scale = self.chunk_scale(stage)
        attempt = 0
        while True:
            failure: tuple[bool, str] | None = None
            try:
                with self.backend.device_scope(self.device_id):
                    result = gpu_fn(xp=self._gpu_xp, chunk_scale=scale)
            except (GpuUnavailableError, *_engine_passthrough_errors(), *passthrough):
                raise
            except Exception as exc:  # GPU errors of every kind: CUDA, NVRTC, cuBLAS, OOM, unsupported ops
                failure = (is_out_of_memory(exc), _describe(exc))
                self._note_gpu_error(stage, failure[1], chunk_scale=scale)
            if failure is None:
                with self._lock:
                    self._units[stage]["gpu"] += 1
                    self._chunk_scale[stage] = min(self._chunk_scale[stage], scale)
                return result
            # The exception and its traceback (which pinned the unit's device arrays) are gone
            # now, so freeing the pools really returns that memory before the next attempt.
            self.backend.free_pools(self.device_id)
            out_of_memory, error = failure
            next_scale = shrink(scale) if out_of_memory else None
            if out_of_memory and attempt < self.max_oom_retries and next_scale is not None and next_scale < scale:
                attempt += 1
                with self._lock:
                    self._oom_retries[stage] += 1
                self._log("info", "gpu_info_oom_retry", stage=stage, attempt=attempt,
                          max_attempts=self.max_oom_retries, chunk_scale=round(next_scale, 6))
                scale = next_scale
                continue
            if out_of_memory:
                error = f"{error} [after {attempt} retries with smaller chunks]"
            self._fallback(stage, "gpu_fallback_runtime_error", "gpu_error_runtime_strict", error=error)
            return self._run_cpu(stage, cpu_fn)

    def _run_cpu(self, stage: str, cpu_fn: Callable[..., Any]) -> Any:
        result = cpu_fn(xp=np)
        with self._lock:
            self._units[stage]["cpu"] += 1
        return result

    def _fallback(self, stage: str, key: str, strict_key: str, **params: Any) -> None:
        """Move ``stage`` to the CPU for the rest of the run (logged), or raise when strict."""
        if self.strict:
            raise GpuUnavailableError(strict_key, stages=stage, **params)
        with self._lock:
            if stage in self._fell_back:  # another worker already moved this stage: one record
                return
            self._fell_back.add(stage)
        self.record_fallback(stage, key, **params)

    def record_fallback(self, stage: str | Sequence[str], key: str, *, level: str = "warning", **params: Any) -> None:
        """Put ``stage`` (or several) on the CPU for the rest of the run; log and record why.

        The record goes to ``run_report.json`` (``compute.gpu_fallbacks``); the log event
        carries ``key`` with ``stages`` and ``params``.
        """
        stages = [stage] if isinstance(stage, str) else list(stage)
        for name in stages:
            self._check_stage(name)
        with self._lock:
            units_on_gpu = {name: self._units[name]["gpu"] for name in stages}
            for name in stages:
                self.decisions[name] = "cpu"
                self._fell_back.add(name)
            self.fallbacks.append({
                "stages": stages,
                "key": key,
                "params": _jsonable(params),
                "units_on_gpu_before": units_on_gpu,
            })
        self._log(level, key, stages=_stage_list(stages), **params)

    def _note_gpu_error(self, stage: str, error: str, **details: Any) -> None:
        """Keep every GPU error of the run (also the retried ones) and log it at debug level."""
        with self._lock:
            self.gpu_errors.append({"stage": stage, "error": error, **_jsonable(details)})
        self._log("debug", "gpu_debug_gpu_error", stage=stage, error=error)

    def end_stage(self, stage: str | None = None) -> None:
        """Stage boundary: release CuPy's unused pool blocks (only if the GPU was used)."""
        if stage is not None:
            self._check_stage(stage)
        with self._lock:
            used = any(units["gpu"] for units in self._units.values()) or self.any_gpu
        if used and self._gpu_xp is not None:
            self.backend.free_pools(self.device_id)

    # ------------------------------------------------------------------ reporting

    def _log(self, level: str, key: str, **params: Any) -> None:
        if self.reporter is not None:
            self.reporter.log(level, key, **params)

    def backend_by_stage(self) -> dict[str, str]:
        """``gpu``, ``cpu`` or ``gpu_then_cpu`` (some units ran on the GPU before a fallback)."""
        with self._lock:
            result = {}
            for stage in STAGES:
                if self.decisions[stage] == "gpu":
                    result[stage] = "gpu"
                elif stage in self._fell_back and self._units[stage]["gpu"] > 0:
                    result[stage] = "gpu_then_cpu"
                else:
                    result[stage] = "cpu"
            return result

    def _gpu_report(self) -> dict[str, Any] | None:
        info = self.device_info
        if info is None:
            return None
        with self._lock:
            return _jsonable({
                "device_id": self.device_id,
                "name": info.get("name", ""),
                "compute_capability": info.get("compute_capability", ""),
                "total_mb": round(int(info.get("total_bytes", 0)) / MB, 1),
                "free_mb_at_start": round(int(info.get("free_bytes", 0)) / MB, 1),
                "cupy_version": info.get("cupy_version", ""),
                "cuda_runtime_version": info.get("cuda_runtime_version", ""),
                "cuda_driver_version": info.get("cuda_driver_version", ""),
                "safety_fraction": self.safety_fraction,
                "memory_limit_mb": round(self.memory_limit_bytes / MB, 1),
                "strict": self.strict,
                "units_by_stage": {stage: dict(units) for stage, units in self._units.items()},
                "chunk_scale_by_stage": dict(self._chunk_scale),
                "oom_retries_by_stage": dict(self._oom_retries),
                "errors": list(self.gpu_errors),
            })

    def to_report(self) -> dict[str, Any]:
        """``compute`` section of ``run_report.json``: backend_by_stage, gpu, gpu_fallbacks."""
        with self._lock:
            fallbacks = [dict(entry) for entry in self.fallbacks]
        return {
            "backend_by_stage": self.backend_by_stage(),
            "gpu": self._gpu_report(),
            "gpu_fallbacks": _jsonable(fallbacks),
        }

    def summary_start(self, reporter: Any = None) -> dict[str, Any]:
        """Log the GPU summary of the run start (device, memory, versions, decision per stage)."""
        reporter = reporter or self.reporter
        if reporter is not None:
            info = self.device_info
            if info is not None:
                reporter.log(
                    "info", "gpu_summary_device",
                    device_id=self.device_id,
                    name=info.get("name", ""),
                    free_mb=round(int(info.get("free_bytes", 0)) / MB),
                    total_mb=round(int(info.get("total_bytes", 0)) / MB),
                    budget_mb=round(allowed_bytes_from_info(info, self.safety_fraction, self.memory_limit_bytes) / MB),
                    safety_fraction=self.safety_fraction,
                    cupy_version=info.get("cupy_version", ""),
                    cuda_version=info.get("cuda_runtime_version", ""),
                )
            elif self.unavailable_reason:
                reporter.log("info", "gpu_summary_no_device", reason=self.unavailable_reason)
            else:
                reporter.log("info", "gpu_summary_gpu_not_used")
            backends = self.backend_by_stage()
            reporter.log(
                "info", "gpu_summary_stages",
                gpu_stages=_stage_list(s for s in STAGES if backends[s] == "gpu"),
                cpu_stages=_stage_list(s for s in STAGES if backends[s] != "gpu"),
            )
        return self.to_report()

    def summary_end(self, reporter: Any = None) -> dict[str, Any]:
        """Log which backend each stage used and how many fallbacks happened."""
        reporter = reporter or self.reporter
        report = self.to_report()
        if reporter is not None:
            with self._lock:
                units = {stage: dict(counts) for stage, counts in self._units.items()}
            for stage, backend in report["backend_by_stage"].items():
                reporter.log("info", "gpu_summary_end_stage", stage=stage, backend=backend,
                             gpu_units=units[stage]["gpu"], cpu_units=units[stage]["cpu"])
            reporter.log("info", "gpu_summary_end_fallbacks", count=len(report["gpu_fallbacks"]))
        return report

    def close(self) -> None:
        """End of run: release the pools this run filled."""
        self.end_stage()


__all__ = [
    "STAGES",
    "STAGE_FLAGS",
    "PARITY_TOLERANCES",
    "ComputePolicy",
    "GpuBackend",
    "GpuUnavailableError",
    "WorkerStreams",
    "allowed_bytes_from_info",
    "chunk_slices",
    "config_overrides_for_gpu_mode",
    "cupy_or_none",
    "device_scope",
    "ensure_cupy_pool_initialized",
    "free_cupy_memory_pools",
    "gpu_free_memory",
    "gpu_is_available",
    "gpu_memory_info",
    "gpu_memory_sufficient",
    "is_device_module",
    "is_out_of_memory",
    "kernel_bytes_per_pixel",
    "plan_block_side",
    "plan_chunks",
    "reset_gpu_probe_cache",
    "to_device",
    "to_host",
]

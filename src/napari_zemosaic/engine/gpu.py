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
``quality``    ``use_gpu_phase5``   frame metrics (P2) measured on the raw planes the
                                    resampling decoded on the device (engine/quality_device.py)
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

import ctypes
import importlib
import importlib.util
import math
import os
import sys
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..config import GPU_STACK_ALIASES, validate_config
from .context import UserError
from .worker_env import ENV_FORCE_CPU, env_flag

STAGES: tuple[str, ...] = ("debayer", "reproject", "stack", "assembly", "intertile", "quality")

STAGE_FLAGS: dict[str, str] = {
    "debayer": "use_gpu_phase5",
    "reproject": "use_gpu_phase5",
    "stack": "stack_use_gpu",
    "assembly": "use_gpu_phase5",
    "intertile": "use_gpu_phase5",
    "quality": "use_gpu_phase5",
}

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
    imported = sys.modules.get("cupy")  # device threads ask often: no import machinery then
    if imported is not None:
        return imported, ""
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


#: Page-locked staging buffers of :func:`upload_async` with the event after their copy: a buffer
#: handed back to CuPy's pinned pool before its copy ran could be refilled under it.
_staged_uploads: list[tuple[Any, np.ndarray]] = []
_staging_lock = threading.Lock()
#: Staging buffers kept before the oldest are checked (a few kB each).
STAGED_UPLOADS_KEPT = 64


def upload_async(host: Any, xp: Any) -> Any:
    """A small host array on ``xp`` without waiting for the device.

    From pageable memory a CUDA copy first waits for everything queued on the stream (a hidden
    host sync); from page-locked memory it is queued like a kernel. On CuPy the values are
    staged in CuPy's pinned pool and copied on the current stream; the staging buffer is kept
    until the copy has run. Elsewhere ``xp.asarray``.
    """
    host = np.ascontiguousarray(host)
    if not is_device_module(xp):
        return xp.asarray(host)
    import cupyx

    staged = cupyx.empty_pinned(host.shape, dtype=host.dtype)
    staged[...] = host
    device = xp.empty(host.shape, dtype=host.dtype)
    stream = xp.cuda.get_current_stream()
    device.data.copy_from_host_async(staged.ctypes.data_as(ctypes.c_void_p), host.nbytes, stream)
    copied = stream.record()
    with _staging_lock:
        # Oldest first; asking an event is a driver call, so only while the oldest have passed.
        while len(_staged_uploads) > STAGED_UPLOADS_KEPT and _staged_uploads[0][0].done:
            _staged_uploads.pop(0)
        _staged_uploads.append((copied, staged))
    return device


def reserve_pool_block(nbytes: int, xp: Any) -> None:
    """Have CuPy's pool hold one free block of ``nbytes`` for the current stream.

    The pool cuts later allocations on this stream from it (and joins them again when freed),
    so a stage that keeps many large arrays does not ask the driver for memory array by array
    (each ``cudaMalloc`` costs the calling thread a GIL-free wait). A no-op on NumPy.
    """
    if is_device_module(xp) and nbytes > 0:
        block = xp.empty(int(nbytes), dtype=xp.uint8)
        del block


def download_async(array: Any, xp: Any) -> np.ndarray:
    """A host array that receives ``array`` once the current stream reaches this point.

    On CuPy a page-locked buffer filled by a copy queued on the current stream: read it only
    after that stream (or an event recorded after this call) has been waited for. Elsewhere a
    plain copy, ready at once.
    """
    if not is_device_module(xp) or isinstance(array, np.ndarray):
        return np.array(array)
    import cupyx

    array = xp.ascontiguousarray(array)
    host = cupyx.empty_pinned(array.shape, dtype=array.dtype)
    if array.nbytes:
        array.data.copy_to_host_async(host.ctypes.data_as(ctypes.c_void_p), array.nbytes,
                                     xp.cuda.get_current_stream())
    return host


#: Most device arrays :func:`download_packed_async` gathers with one kernel (its arguments).
PACKED_ARRAYS_MAX = 8
_PACKED_ALIGN = 8

_GATHER_SOURCE = r"""
// gpu.download_packed_async: the bytes of up to 8 device arrays side by side in one buffer, array i
// at byte offset start_i (8-byte aligned, ascending), so that one copy takes them all to the host.
extern "C" __global__ void zemosaic_gather_bytes(
    const unsigned long long p0, const unsigned long long p1, const unsigned long long p2, const unsigned long long p3,
    const unsigned long long p4, const unsigned long long p5, const unsigned long long p6, const unsigned long long p7,
    const long long s0, const long long s1, const long long s2, const long long s3,
    const long long s4, const long long s5, const long long s6, const long long s7,
    const long long n0, const long long n1, const long long n2, const long long n3,
    const long long n4, const long long n5, const long long n6, const long long n7,
    const int count, const long long total, unsigned char* __restrict__ out)
{
    const unsigned long long sources[8] = {p0, p1, p2, p3, p4, p5, p6, p7};
    const long long starts[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
    const long long sizes[8] = {n0, n1, n2, n3, n4, n5, n6, n7};
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        int i = count - 1;
        while (i > 0 && k < starts[i]) --i;
        const long long at = k - starts[i];
        if (at < sizes[i]) out[k] = ((const unsigned char*)sources[i])[at];
    }
}
"""


def _packed_layout(arrays: Sequence[Any]) -> tuple[list[int], int]:
    """Byte offsets of ``arrays`` packed side by side (each :data:`_PACKED_ALIGN`-aligned), and the total."""
    starts, total = [], 0
    for array in arrays:
        total = -(-total // _PACKED_ALIGN) * _PACKED_ALIGN
        starts.append(total)
        total += int(array.nbytes)
    return starts, total


def download_packed_async(arrays: Sequence[Any], xp: Any) -> list[np.ndarray]:
    """:func:`download_async` of several small device arrays with one kernel and one copy.

    A device thread's CUDA calls each give the GIL away and wait to take it back, so a frame's
    results (noise, coarse means, coverage, checks) come over together: gathered into one device
    buffer, copied once into one page-locked buffer, of which the returned arrays are views (same
    shapes and dtypes). Read them only once the current stream has passed this point. NumPy arrays,
    or more than :data:`PACKED_ARRAYS_MAX` arrays, go one by one through :func:`download_async`.
    """
    if not is_device_module(xp) or not arrays or len(arrays) > PACKED_ARRAYS_MAX \
            or any(isinstance(array, np.ndarray) for array in arrays):
        return [download_async(array, xp) for array in arrays]
    import cupyx

    arrays = [xp.ascontiguousarray(array) for array in arrays]
    starts, total = _packed_layout(arrays)
    host = cupyx.empty_pinned((max(total, 1),), dtype=np.uint8)
    if total:
        packed = xp.empty(total, dtype=xp.uint8)
        padding = PACKED_ARRAYS_MAX - len(arrays)
        pointers = [np.uint64(array.data.ptr) for array in arrays] + [np.uint64(0)] * padding
        offsets = [np.int64(start) for start in starts] + [np.int64(total)] * padding
        sizes = [np.int64(array.nbytes) for array in arrays] + [np.int64(0)] * padding
        _launch_1d(_fused_function(xp, _GATHER_SOURCE, "zemosaic_gather_bytes"), total,
                   (*pointers, *offsets, *sizes, np.int32(len(arrays)), np.int64(total), packed))
        packed.data.copy_to_host_async(host.ctypes.data_as(ctypes.c_void_p), total, xp.cuda.get_current_stream())
    return [host[start : start + array.nbytes].view(np.dtype(array.dtype)).reshape(array.shape)
            for start, array in zip(starts, arrays)]


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


class CapturedWork:
    """Device work recorded once as a CUDA graph (:func:`capture_work`) and replayed.

    A replay runs the same kernels on the same device memory: whoever fills :attr:`inputs`
    before a replay and reads :attr:`outputs` after it (on the same stream, before the next
    replay) gets what the work itself would have given, for one launch instead of its Python
    and its dozens of calls into CUDA. The memory lives in a pool of its own that nothing else
    allocates from, so the blocks the work freed during the capture are not handed to anyone
    else while the graph may still write them.
    """

    def __init__(self, graph: Any, inputs: Any, outputs: Any, pool: Any) -> None:
        self._graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self._pool = pool

    def replay(self, stream: Any) -> Any:
        """Queue the work on ``stream``; its :attr:`outputs` once that stream has run it."""
        self._graph.launch(stream)
        return self.outputs

    def close(self) -> None:
        """Let the graph and its memory go (call once the streams that replayed it are synchronised)."""
        self._graph = self.inputs = self.outputs = None
        self._pool.free_all_blocks()


def capture_work(work: Callable[[Any], Any], inputs: Any, xp: Any) -> CapturedWork | str:
    """``work(inputs)`` (device work on the current stream that never waits for the device)
    captured as a :class:`CapturedWork`, or the reason it cannot be, as a string: no CuPy, the
    legacy default stream (it cannot be captured), or an operation of the work that CUDA does not
    capture (a copy to the host, a synchronisation).

    ``work`` runs once before the capture, on the real ``inputs``: that compiles its kernels and
    fills the graph's own pool with the blocks the work asks for, so the capture allocates nothing
    from the driver."""
    if not is_device_module(xp):
        return "not on a CUDA device"
    stream = xp.cuda.get_current_stream()
    if int(stream.ptr) == 0:
        return "the legacy default stream"
    pool = xp.cuda.MemoryPool()
    try:
        with xp.cuda.using_allocator(pool.malloc):
            work(inputs)
            stream.synchronize()
            stream.begin_capture()
            try:
                outputs = work(inputs)
            finally:
                graph = stream.end_capture()
    except Exception as exc:  # not capturable: the caller runs the work itself and logs why
        stream.synchronize()
        pool.free_all_blocks()
        return f"{type(exc).__name__}: {exc}"
    return CapturedWork(graph, inputs, outputs, pool)


# ----------------------------------------------------------------------------- fused CUDA kernels
#
# A few hot loops of the xp-generic kernels are one CUDA kernel on the GPU instead of hundreds
# of small CuPy calls (each costs ~10-40 µs of host time, so a pass of many calls is bound by
# the host, not the device). Each computes *the same function* as its xp-generic twin, to the
# bit: the same float32/float64 operations in the same order, compiled without fused
# multiply-adds (``--fmad=false``), and every one has a CPU parity test in
# ``tests/engine/test_gpu_parity.py``. Callers use the fused kernel only through
# :func:`fused_kernels` and keep the xp path for NumPy and for shapes a kernel does not cover.

_FUSED_OPTIONS = ("--fmad=false",)

_PREFIX_SUMS_SOURCE = r"""
// stack._sorted_samples' float64 prefix sums of one sorted column (n values), of the deviations
// from ``reference`` (the column's middle value) and of their squares: prefix[0] = 0, then one
// sum per value, row-major like the sorted values.
__device__ __forceinline__ void zm_prefix_sums(
    const float* __restrict__ sorted_values, double* __restrict__ prefix, double* __restrict__ prefix_sq,
    const long long n_cols, const long long col, const int n, const float reference)
{
    double sum = 0.0, sum_sq = 0.0;
    prefix[col] = 0.0;
    prefix_sq[col] = 0.0;
    for (int i = 0; i < n; ++i) {
        const float d = __fsub_rn(sorted_values[(long long)i * n_cols + col], reference);
        sum = __dadd_rn(sum, (double)d);
        sum_sq = __dadd_rn(sum_sq, (double)__fmul_rn(d, d));
        prefix[(long long)(i + 1) * n_cols + col] = sum;
        prefix_sq[(long long)(i + 1) * n_cols + col] = sum_sq;
    }
}

// The median of the sorted window [start, stop) of a column, as NumPy's (mean of the two middles).
__device__ __forceinline__ double zm_window_median(
    const float* __restrict__ sorted_values, const long long n_cols, const long long col, const int start, const int stop)
{
    const int m = stop - start;
    const double below = (double)sorted_values[(long long)(start + (m - 1) / 2) * n_cols + col];
    const double above = (double)sorted_values[(long long)(start + m / 2) * n_cols + col];
    return __dmul_rn(0.5, __dadd_rn(below, above));
}
"""

_KAPPA_SIGMA_SOURCE = _PREFIX_SUMS_SOURCE + r"""
#define ZM_INF __int_as_float(0x7f800000)
#define ZM_NAN __longlong_as_double(0x7ff8000000000000ULL)
#define ZM_SORT_MAX_GROUP 32
#define ZM_SORT_LOADS 4

// One block per group of `group` adjacent columns: gather each column's finite values into its
// slice of shared memory (threads side by side read side-by-side columns of a row: one memory
// transaction for the group instead of one per value), bitonic-sort every slice (padded with +inf
// to the group's power of two) in the same passes, and write them to sorted_out (n_rows, n_cols)
// row-major, with their counts. Same order as NumPy's sort of the finite values (NaN last).
extern "C" __global__ void zemosaic_sort_finite_columns(
    const float* __restrict__ values, const long long row_stride, const long long col_stride,
    const int n_rows, const long long n_cols, const int group, const int slice,
    float* __restrict__ sorted_out, int* __restrict__ counts)
{
    extern __shared__ float s[];
    __shared__ int count[ZM_SORT_MAX_GROUP];
    __shared__ int size;
    const int lane = threadIdx.x % group, rows_per_pass = blockDim.x / group;
    for (long long col0 = (long long)blockIdx.x * group; col0 < n_cols; col0 += (long long)gridDim.x * group) {
        if (threadIdx.x < group) count[threadIdx.x] = 0;
        __syncthreads();
        const long long col = col0 + lane;
        if (col < n_cols && threadIdx.x < rows_per_pass * group) {
            float* mine = s + lane * slice;
            // ZM_SORT_LOADS rows read before any is stored: the reads' latency overlaps.
            for (int i0 = threadIdx.x / group; i0 < n_rows; i0 += ZM_SORT_LOADS * rows_per_pass) {
                float loaded[ZM_SORT_LOADS];
#pragma unroll
                for (int u = 0; u < ZM_SORT_LOADS; ++u) {
                    const int i = i0 + u * rows_per_pass;
                    loaded[u] = i < n_rows ? values[(long long)i * row_stride + col * col_stride] : ZM_INF;
                }
#pragma unroll
                for (int u = 0; u < ZM_SORT_LOADS; ++u) {
                    if (isfinite(loaded[u])) { mine[atomicAdd(&count[lane], 1)] = loaded[u]; }
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int widest = 0;
            for (int c = 0; c < group; ++c) widest = max(widest, count[c]);
            int pow2 = 1;
            while (pow2 < widest) pow2 <<= 1;
            size = pow2;
        }
        __syncthreads();
        const int n_size = size;
        for (int c = 0; c < group; ++c)
            for (int i = count[c] + threadIdx.x; i < n_size; i += blockDim.x) s[c * slice + i] = ZM_INF;
        __syncthreads();
        const int half = n_size >> 1;
        int half_shift = 0;
        while ((1 << half_shift) < half) ++half_shift;
        for (int k = 2; k <= n_size; k <<= 1) {
            for (int j = k >> 1; j > 0; j >>= 1) {
                for (int p = threadIdx.x; p < group * half; p += blockDim.x) {
                    const int c = p >> half_shift, q = p & (half - 1);
                    const int i = ((q & ~(j - 1)) << 1) | (q & (j - 1));
                    float* column = s + c * slice;
                    const float a = column[i], b = column[i + j];
                    if ((a > b) == ((i & k) == 0)) { column[i] = b; column[i + j] = a; }
                }
                __syncthreads();
            }
        }
        if (col < n_cols && threadIdx.x < rows_per_pass * group) {
            const float* mine = s + lane * slice;
            const int n = count[lane];
            for (int i = threadIdx.x / group; i < n; i += rows_per_pass) sorted_out[(long long)i * n_cols + col] = mine[i];
            if (threadIdx.x < group) counts[col] = n;
        }
        __syncthreads();
    }
}

// One thread per column of sorted finite values: the prefix sums and the kappa-sigma iteration
// of stack._sorted_samples / stack._kappa_sigma_bounds, operation for operation.
extern "C" __global__ void zemosaic_kappa_sigma_sorted(
    const float* __restrict__ sorted_values, const int* __restrict__ counts, const long long n_cols,
    double* __restrict__ prefix, double* __restrict__ prefix_sq,
    const double kappa_low, const double kappa_high, const int iterations,
    double* __restrict__ lower_out, double* __restrict__ upper_out)
{
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= n_cols) return;
#define S(i) sorted_values[(long long)(i) * n_cols + col]
#define P(i) prefix[(long long)(i) * n_cols + col]
#define Q(i) prefix_sq[(long long)(i) * n_cols + col]
    const int n = counts[col];
    double lower = ZM_NAN, upper = ZM_NAN;
    if (n > 0) {
        zm_prefix_sums(sorted_values, prefix, prefix_sq, n_cols, col, n, S((n - 1) / 2));
        int start = 0, stop = n;
        for (int it = 0; it < iterations; ++it) {
            const int m = stop - start;
            const double centre = zm_window_median(sorted_values, n_cols, col, start, stop);
            const double total = __dsub_rn(P(stop), P(start));
            const double total_sq = __dsub_rn(Q(stop), Q(start));
            const double dm = (double)m;
            double squares = __dsub_rn(total_sq, __ddiv_rn(__dmul_rn(total, total), fmax(dm, 1.0)));
            if (squares < 0.0) squares = 0.0;
            const double sigma = __dsqrt_rn(__ddiv_rn(squares, fmax(dm, 1.0)));
            lower = __dsub_rn(centre, __dmul_rn(kappa_low, sigma));
            upper = __dadd_rn(centre, __dmul_rn(kappa_high, sigma));
            int new_start = start;
            while (new_start < stop && (double)S(new_start) < lower) ++new_start;
            int new_stop = stop;
            while (new_stop > new_start && !((double)S(new_stop - 1) <= upper)) --new_stop;
            if (!((new_start != start || new_stop != stop) && new_stop > new_start)) break;
            start = new_start;
            stop = new_stop;
        }
    }
    lower_out[col] = lower;
    upper_out[col] = upper;
#undef S
#undef P
#undef Q
}
"""

_WINSORIZED_SOURCE = _PREFIX_SUMS_SOURCE + r"""
#define ZM_INF __int_as_float(0x7f800000)

// stack._first_failing on one sorted column: the first k in [lo, hi] where
// (value < bound) — (value <= bound) if inclusive — is false (a binary search: the predicate
// is true then false along sorted values).
__device__ __forceinline__ int zm_first_failing(
    const float* __restrict__ s, const long long n_cols, const long long col,
    int lo, int hi, const double bound, const bool inclusive)
{
    while (lo < hi) {
        const int mid = lo + ((hi - lo) >> 1);
        const double v = (double)s[(long long)mid * n_cols + col];
        const bool passes = inclusive ? (v <= bound) : (v < bound);
        if (passes) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// stack._std_from_sums
__device__ __forceinline__ double zm_std(const int count, const double total, const double total_sq, const int ddof)
{
    const double n = (double)count;
    double squares = __dsub_rn(total_sq, __ddiv_rn(__dmul_rn(total, total), fmax(n, 1.0)));
    if (squares < 0.0) squares = 0.0;
    return n > (double)ddof ? __dsqrt_rn(__ddiv_rn(squares, fmax(__dsub_rn(n, (double)ddof), 1.0))) : 0.0;
}

// One thread per column of sorted finite values (zemosaic_sort_finite_columns): the prefix sums
// of stack._sorted_samples and the loops of stack._winsorized_range / _winsorized_sigma /
// _winsorized_std, operation for operation. Writes the lowest and highest kept value of every
// column (+inf / -inf when nothing is kept), which is what stack._outside_range compares against.
extern "C" __global__ void zemosaic_winsorized_sorted(
    const float* __restrict__ sorted_values, const int* __restrict__ counts, const long long n_cols,
    double* __restrict__ prefix, double* __restrict__ prefix_sq,
    const double kappa_low, const double kappa_high, const int iterations, const double winsor_sigma,
    const double factor, const double tolerance, const double collapsed, const int max_winsor,
    const int min_samples, float* __restrict__ lowest_out, float* __restrict__ highest_out)
{
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= n_cols) return;
#define S(i) sorted_values[(long long)(i) * n_cols + col]
#define P(i) prefix[(long long)(i) * n_cols + col]
#define Q(i) prefix_sq[(long long)(i) * n_cols + col]
    const int n = counts[col];
    int final_start = 0, final_stop = n;
    if (n >= min_samples) {
        const float reference_f = S((n - 1) / 2);
        const double reference = (double)reference_f;
        zm_prefix_sums(sorted_values, prefix, prefix_sq, n_cols, col, n, reference_f);
        int start = 0, stop = n;
        for (int it = 0; it < iterations; ++it) {
            const int m = stop - start;
            const double centre = zm_window_median(sorted_values, n_cols, col, start, stop);
            double sigma = zm_std(m, __dsub_rn(P(stop), P(start)), __dsub_rn(Q(stop), Q(start)), 1);
            double current = sigma;
            for (int w = 0; w < max_winsor; ++w) {
                const double clamp_low = __dsub_rn(centre, __dmul_rn(winsor_sigma, current));
                const double clamp_high = __dadd_rn(centre, __dmul_rn(winsor_sigma, current));
                const int first_inside = zm_first_failing(sorted_values, n_cols, col, start, stop, clamp_low, false);
                const int first_above = zm_first_failing(sorted_values, n_cols, col, first_inside, stop, clamp_high, true);
                const double n_low = (double)(first_inside - start);
                const double n_high = (double)(stop - first_above);
                const double low_deviation = __dsub_rn(clamp_low, reference);
                const double high_deviation = __dsub_rn(clamp_high, reference);
                const double inner_sum = __dsub_rn(P(first_above), P(first_inside));
                const double inner_sq = __dsub_rn(Q(first_above), Q(first_inside));
                const double total = __dadd_rn(__dadd_rn(__dmul_rn(n_low, low_deviation), inner_sum),
                                               __dmul_rn(n_high, high_deviation));
                const double total_sq = __dadd_rn(
                    __dadd_rn(__dmul_rn(n_low, __dmul_rn(low_deviation, low_deviation)), inner_sq),
                    __dmul_rn(n_high, __dmul_rn(high_deviation, high_deviation)));
                const double image = __dmul_rn(factor, zm_std(m, total, total_sq, 1));
                sigma = image;
                const bool unsettled = fabs(__dsub_rn(image, current)) > __dmul_rn(tolerance, current)
                                       && image > __dmul_rn(collapsed, fabs(centre));
                if (!unsettled) break;
                current = image;
            }
            const int new_start = zm_first_failing(sorted_values, n_cols, col, start, stop,
                                                   __dsub_rn(centre, __dmul_rn(kappa_low, sigma)), false);
            const int new_stop = zm_first_failing(sorted_values, n_cols, col, new_start, stop,
                                                  __dadd_rn(centre, __dmul_rn(kappa_high, sigma)), true);
            final_start = new_start;
            final_stop = new_stop;
            if (!((new_start != start || new_stop != stop) && new_stop - new_start >= min_samples)) break;
            start = new_start;
            stop = new_stop;
        }
    }
    const bool empty = final_stop <= final_start;
    lowest_out[col] = empty ? ZM_INF : S(final_start);
    highest_out[col] = empty ? -ZM_INF : S(final_stop - 1);
#undef S
#undef P
#undef Q
}
"""

_HOT_PIXEL_SOURCE = r"""
#define ZM_INFINITY __int_as_float(0x7f800000)
// NaN-propagating min/max, as numpy.minimum / numpy.maximum.
__device__ __forceinline__ float zm_min(float a, float b) { return isnan(a) ? a : (isnan(b) ? b : fminf(a, b)); }
__device__ __forceinline__ float zm_max(float a, float b) { return isnan(a) ? a : (isnan(b) ? b : fmaxf(a, b)); }
__device__ __forceinline__ int zm_reflect(int i, int n) { i = i < 0 ? -i : i; return i > n - 1 ? 2 * (n - 1) - i : i; }

// debayer.median_of_8: the same comparator network, the same float32 rounding.
__device__ __forceinline__ float zm_median8(float v0, float v1, float v2, float v3, float v4, float v5, float v6, float v7)
{
    float a0, a1, a2, a3, b0, b1, b2, b3, t;
    a0 = zm_min(v0, v1); a1 = zm_max(v0, v1); a2 = zm_min(v2, v3); a3 = zm_max(v2, v3);
    t = zm_min(a0, a2); a2 = zm_max(a0, a2); a0 = t;
    t = zm_min(a1, a3); a3 = zm_max(a1, a3); a1 = t;
    t = zm_min(a1, a2); a2 = zm_max(a1, a2); a1 = t;
    b0 = zm_min(v4, v5); b1 = zm_max(v4, v5); b2 = zm_min(v6, v7); b3 = zm_max(v6, v7);
    t = zm_min(b0, b2); b2 = zm_max(b0, b2); b0 = t;
    t = zm_min(b1, b3); b3 = zm_max(b1, b3); b1 = t;
    t = zm_min(b1, b2); b2 = zm_max(b1, b2); b1 = t;
    const float fourth = zm_min(zm_min(zm_min(a3, b3), zm_max(a0, b2)), zm_min(zm_max(a1, b1), zm_max(a2, b0)));
    const float fifth = zm_min(zm_min(zm_max(a0, b3), zm_max(a1, b2)), zm_min(zm_max(a2, b1), zm_max(a3, b0)));
    return __fmul_rn(__fadd_rn(fourth, fifth), 0.5f);
}

// Median of the 8 same-colour neighbours of (y, x), reflect-padded like numpy.pad(mode="reflect").
__device__ __forceinline__ float zm_same_colour_median(const float* p, int y, int x, int h, int w)
{
    const int ym = zm_reflect(y - 2, h), yp = zm_reflect(y + 2, h), xm = zm_reflect(x - 2, w), xp = zm_reflect(x + 2, w);
    const long long rm = (long long)ym * w, r0 = (long long)y * w, rp = (long long)yp * w;
    return zm_median8(p[rm + xm], p[rm + x], p[rm + xp], p[r0 + xm], p[r0 + xp], p[rp + xm], p[rp + x], p[rp + xp]);
}

// debayer._residual_noise_by_colour: value - median8 on the strided subsample of each phase, the
// phases' samples one after the other in out, slot s holding phase phase_s (n_s values).
extern "C" __global__ void zemosaic_hot_residuals(
    const float* __restrict__ plane, const int h, const int w, const int step,
    const int rows0, const int cols0, const int rows1, const int cols1,
    const long long n0, const long long n1, const long long n2, const long long n3,
    const int phase0, const int phase1, const int phase2, const int phase3, float* __restrict__ out)
{
    const long long total = n0 + n1 + n2 + n3;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        long long local = k;
        int phase = phase0;
        if (local >= n0) { local -= n0; phase = phase1; if (local >= n1) { local -= n1; phase = phase2; if (local >= n2) { local -= n2; phase = phase3; } } }
        const int dy = phase >> 1, dx = phase & 1;
        const int cols = dx ? cols1 : cols0;
        const int a = (int)(local / cols), b = (int)(local % cols);
        const int y = dy + 2 * step * a, x = dx + 2 * step * b;
        out[k] = __fsub_rn(plane[(long long)y * w + x], zm_same_colour_median(plane, y, x, h, w));
    }
}

// debayer.correct_hot_pixels stage 1: (value - min8) x (1 / noise of the colour), float32.
extern "C" __global__ void zemosaic_hot_excess(
    const float* __restrict__ plane, const int h, const int w, const float* __restrict__ inverse_noise,
    float* __restrict__ excess, unsigned long long* __restrict__ n_fixed)
{
    // The fix kernel, next on the stream, counts from 0 (one memset call fewer for the device thread).
    if (blockIdx.x == 0 && threadIdx.x == 0) *n_fixed = 0ULL;
    const long long total = (long long)h * w;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const int y = (int)(k / w), x = (int)(k % w);
        const int ym = zm_reflect(y - 2, h), yp = zm_reflect(y + 2, h), xm = zm_reflect(x - 2, w), xp = zm_reflect(x + 2, w);
        const long long rm = (long long)ym * w, r0 = (long long)y * w, rp = (long long)yp * w;
        const float above = zm_min(zm_min(plane[rm + xm], plane[rm + x]), plane[rm + xp]);
        const float below = zm_min(zm_min(plane[rp + xm], plane[rp + x]), plane[rp + xp]);
        float m = zm_min(above, below);
        m = zm_min(m, plane[r0 + xm]);
        m = zm_min(m, plane[r0 + xp]);
        excess[k] = __fmul_rn(__fsub_rn(plane[k], m), inverse_noise[((y & 1) << 1) | (x & 1)]);
    }
}

// debayer.correct_hot_pixels stages 2 and 3 for pixel k: a candidate (excess > sigma, the pixels
// NumPy's path gathers with flatnonzero) gets its exact median, z and isolation test; the value it
// keeps is returned, and *fixed says whether that is its median.
__device__ __forceinline__ float zm_hot_fixed_value(
    const float* __restrict__ plane, const float* __restrict__ excess, const long long k, const int h, const int w,
    const float* __restrict__ noise, const float sigma, const float isolation_fraction, const float isolation_floor,
    bool* fixed)
{
    *fixed = false;
    if (!(excess[k] > sigma)) return plane[k];
    const int y = (int)(k / w), x = (int)(k % w);
    const float median = zm_same_colour_median(plane, y, x, h, w);
    const float z = __fdiv_rn(__fsub_rn(plane[k], median), noise[((y & 1) << 1) | (x & 1)]);
    if (!(z > sigma)) return plane[k];
    // Second largest excess of the 8 immediate neighbours, NaN sorting last (as numpy.sort).
    float first = -ZM_INFINITY, second = -ZM_INFINITY;
    int nans = 0;
    for (int oy = -1; oy <= 1; ++oy) {
        for (int ox = -1; ox <= 1; ++ox) {
            if (oy == 0 && ox == 0) continue;
            const float e = excess[(long long)zm_reflect(y + oy, h) * w + zm_reflect(x + ox, w)];
            if (isnan(e)) { ++nans; continue; }
            if (e > first) { second = first; first = e; } else if (e > second) { second = e; }
        }
    }
    const float support = nans >= 2 ? __int_as_float(0x7fc00000) : (nans == 1 ? first : second);
    const float limit = zm_max(__fmul_rn(isolation_fraction, z), isolation_floor);
    if (!(support < limit)) return plane[k];
    *fixed = true;
    return median;
}

// Every pixel of `corrected` written (the plane's value, or a hot pixel's median, counted), so that
// it needs no copy of the plane first. status != 0 (zemosaic_hot_noise found a colour without noise
// figure): no correction, `corrected` is the plane.
extern "C" __global__ void zemosaic_hot_fix(
    const float* __restrict__ plane, const float* __restrict__ excess, const int h, const int w,
    const float* __restrict__ noise, const float sigma, const float isolation_fraction, const float isolation_floor,
    const int* __restrict__ status, float* __restrict__ corrected, unsigned long long* __restrict__ n_fixed)
{
    const bool active = *status == 0;
    const long long total = (long long)h * w;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        if (!active) { corrected[k] = plane[k]; continue; }
        bool fixed;
        corrected[k] = zm_hot_fixed_value(plane, excess, k, h, w, noise, sigma, isolation_fraction, isolation_floor, &fixed);
        if (fixed) atomicAdd(n_fixed, 1ULL);
    }
}

// debayer._robust_sigmas_on_gpu's noise of each colour from its (finite count, median, MAD) row of
// zemosaic_median_mad_rows, laid out by Bayer phase (row_of_phase): table[p] = fl32(1 / noise),
// table[4 + p] = fl32(noise), as the host computes them from Python floats. status: 0; 1 when a
// colour has no finite residual (NumPy's path then corrects nothing); 2 when a colour's MAD is 0
// (its noise is the mean-deviation fallback, computed on the host by the caller).
extern "C" __global__ void zemosaic_hot_noise(
    const double* __restrict__ stats, const int n_rows, const int row0, const int row1, const int row2,
    const int row3, float* __restrict__ table, int* __restrict__ status)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int code = 0;
    for (int r = 0; r < n_rows; ++r) if (stats[3 * r] == 0.0) code = 1;
    for (int r = 0; code == 0 && r < n_rows; ++r) if (!(__dmul_rn(1.4826, stats[3 * r + 2]) > 0.0)) code = 2;
    const int row_of_phase[4] = {row0, row1, row2, row3};
    for (int p = 0; p < 4; ++p) {
        const double* row = stats + 3 * row_of_phase[p];
        const double sigma = __dmul_rn(1.4826, row[2]);
        const double magnitude = fabs(row[1]);
        // float32 eps x max(1.0, |median|), and Python's max(sigma, floor).
        const double floor = __dmul_rn(1.1920928955078125e-07, magnitude > 1.0 ? magnitude : 1.0);
        const double noise = floor > sigma ? floor : sigma;
        table[p] = __double2float_rn(__ddiv_rn(1.0, noise));
        table[4 + p] = __double2float_rn(noise);
    }
    *status = code;
}

// debayer.debayer_bilinear, one pixel's three channels: its own colour copied, the others the
// pairwise means (a + b) x 0.5 and ((a + b) + (c + d)) x 0.25 in float32, reflect-padded by one.
// c00..c11: channel (0 R, 1 G, 2 B) of the phases (0, 0), (0, 1), (1, 0), (1, 1).
extern "C" __global__ void zemosaic_debayer_bilinear(
    const float* __restrict__ plane, const int h, const int w,
    const int c00, const int c01, const int c10, const int c11, float* __restrict__ rgb)
{
    const long long total = (long long)h * w;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const int y = (int)(k / w), x = (int)(k % w);
        const int dy = y & 1, dx = x & 1;
        const int colour = dy ? (dx ? c11 : c10) : (dx ? c01 : c00);
        const long long r0 = (long long)y * w;
        const long long ru = (long long)zm_reflect(y - 1, h) * w, rd = (long long)zm_reflect(y + 1, h) * w;
        const int xl = zm_reflect(x - 1, w), xr = zm_reflect(x + 1, w);
        const float left = plane[r0 + xl], right = plane[r0 + xr], up = plane[ru + x], down = plane[rd + x];
        rgb[colour * total + k] = plane[k];
        if (colour == 1) {
            // The other site of this row of the cell says which colour runs along the row.
            const int row_colour = dy ? (dx ? c10 : c11) : (dx ? c00 : c01);
            rgb[row_colour * total + k] = __fmul_rn(__fadd_rn(left, right), 0.5f);
            rgb[(2 - row_colour) * total + k] = __fmul_rn(__fadd_rn(up, down), 0.5f);
        } else {
            const float cross = __fadd_rn(__fadd_rn(left, right), __fadd_rn(up, down));
            const float diagonal = __fadd_rn(__fadd_rn(plane[ru + xl], plane[ru + xr]),
                                             __fadd_rn(plane[rd + xl], plane[rd + xr]));
            rgb[total + k] = __fmul_rn(cross, 0.25f);
            rgb[(2 - colour) * total + k] = __fmul_rn(diagonal, 0.25f);
        }
    }
}
"""


def _launch_1d(function: Any, n_items: int, args: tuple[Any, ...], block: int = 256) -> None:
    grid = max(1, min(-(-int(n_items) // block), 1 << 20))
    function((grid,), (block,), args)


def fused_hot_pixel_residuals(
    plane: Any, step: int, xp: Any, groups: Sequence[Sequence[int]] = ((0,), (1,), (2,), (3,))
) -> list[Any] | None:
    """``value - median8`` of each phase's strided subsample (``debayer._residual_noise_by_colour``),
    from one kernel: one float32 array per group of phases (row-major over the Bayer cell; every
    phase in one group), the samples of a group's phases one after the other in it. ``None`` when
    not on CuPy."""
    if not is_device_module(xp) or plane.ndim != 2 or plane.dtype != xp.float32 or not plane.flags.c_contiguous:
        return None
    height, width = (int(v) for v in plane.shape)
    shapes = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        shapes.append((-(-(-(-(height - dy) // 2)) // step), -(-(-(-(width - dx) // 2)) // step)))
    order = [int(phase) for group in groups for phase in group]
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"groups {groups!r} must hold each Bayer phase 0-3 once")
    sizes = [shapes[phase][0] * shapes[phase][1] for phase in order]
    out = xp.empty(sum(sizes), dtype=xp.float32)
    function = _fused_function(xp, _HOT_PIXEL_SOURCE, "zemosaic_hot_residuals")
    _launch_1d(function, sum(sizes), (
        plane, np.int32(height), np.int32(width), np.int32(step), np.int32(shapes[0][0]), np.int32(shapes[0][1]),
        np.int32(shapes[1][0]), np.int32(shapes[1][1]), *(np.int64(size) for size in sizes),
        *(np.int32(phase) for phase in order), out,
    ))
    ends = np.cumsum([len(group) for group in groups])
    bounds = np.cumsum([0, *sizes])
    return [out[int(bounds[end - len(group)]) : int(bounds[end])] for group, end in zip(groups, ends)]


def fused_hot_pixel_noise(stats: Any, row_of_phase: Sequence[int], xp: Any) -> tuple[Any, Any]:
    """The noise table of :func:`fused_hot_pixel_fix` and its status from the (R, 3) rows of
    :func:`fused_median_mad_on_device` (one row per colour; ``row_of_phase``: the row of each Bayer
    phase, row-major over the cell), on the device, nothing waited for: ``(table, status)``, float32
    (8,) and int32 (1,). Status 0: the table holds every colour's noise; 1: a colour has no finite
    residual (the fix then leaves the plane as it is, as NumPy's path); 2: a colour's MAD is 0, so its
    noise is the mean-deviation fallback, which the caller computes on the host."""
    table = xp.empty(8, dtype=xp.float32)
    status = xp.empty(1, dtype=xp.int32)
    function = _fused_function(xp, _HOT_PIXEL_SOURCE, "zemosaic_hot_noise")
    function((1,), (1,), (stats, np.int32(stats.shape[0]), *(np.int32(row) for row in row_of_phase), table, status))
    return table, status


def fused_hot_pixel_fix(
    plane: Any, noise_by_phase: Any, sigma: float, isolation_fraction: float, isolation_floor: float,
    xp: Any, *, status: Any = None,
) -> tuple[Any, Any]:
    """Stages 1–3 of ``debayer.correct_hot_pixels`` in two kernels over the whole plane (no
    candidate list, so nothing waits on the host): ``(corrected, n_fixed)``, ``n_fixed`` a uint64
    (1,) device counter (reading it is a copy that waits for the kernels).

    ``noise_by_phase``: the four phases' noise (row-major over the Bayer cell) as Python floats, or
    the device table of :func:`fused_hot_pixel_noise`, whose ``status`` then says on the device
    whether to correct at all.
    """
    height, width = (int(v) for v in plane.shape)
    if isinstance(noise_by_phase, (list, tuple)):
        # As NumPy computes ``excess *= 1.0 / noise`` and ``z / noise_table``: float32 operands.
        values = [1.0 / value for value in noise_by_phase] + list(noise_by_phase)
        noise_by_phase = upload_async(np.array(values, dtype=np.float32), xp)
        status = xp.zeros(1, dtype=xp.int32)
    excess = xp.empty_like(plane)
    fixed = xp.empty(1, dtype=xp.uint64)  # zeroed by the first kernel
    _launch_1d(_fused_function(xp, _HOT_PIXEL_SOURCE, "zemosaic_hot_excess"), height * width,
               (plane, np.int32(height), np.int32(width), noise_by_phase[:4], excess, fixed))
    corrected = xp.empty_like(plane)  # every pixel written by the fix
    _launch_1d(_fused_function(xp, _HOT_PIXEL_SOURCE, "zemosaic_hot_fix"), height * width, (
        plane, excess, np.int32(height), np.int32(width), noise_by_phase[4:], np.float32(sigma),
        np.float32(isolation_fraction), np.float32(isolation_floor), status, corrected, fixed,
    ))
    return corrected, fixed


_BAYER_CHANNELS = {"R": 0, "G": 1, "B": 2}
_BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def fused_debayer_bilinear(plane: Any, pattern_name: str, xp: Any) -> Any | None:
    """``debayer.debayer_bilinear`` in one kernel: the (3, H, W) float32 RGB cube of a (H, W) float32
    C-contiguous CFA plane, the same values to the bit; ``None`` when not on CuPy or the plane is
    not laid out so (the caller then runs the xp path)."""
    if not is_device_module(xp) or plane.ndim != 2 or plane.dtype != xp.float32 or not plane.flags.c_contiguous:
        return None
    name = str(pattern_name).strip().upper()
    height, width = (int(v) for v in plane.shape)
    if name not in _BAYER_PATTERNS or height < 2 or width < 2:
        return None
    rgb = xp.empty((3, height, width), dtype=xp.float32)
    _launch_1d(_fused_function(xp, _HOT_PIXEL_SOURCE, "zemosaic_debayer_bilinear"), height * width, (
        plane, np.int32(height), np.int32(width), *(np.int32(_BAYER_CHANNELS[colour]) for colour in name), rgb,
    ))
    return rgb


_SELECT_SOURCE = r"""
// Exact order statistics of the rows of debayer._robust_sigma and frames._clipped_mad_sigma without
// sorting: one thread block (blockDim.x == ZM_THREADS) per row, radix select on order-preserving
// uint32 keys of the float32 values. Each pass sweeps the row once, counts in a shared-memory
// histogram the keys still in the running (bits 31-21, then 20-10 under the bin found so far,
// then 9-0) and locates the bin of the wanted rank with a block-wide prefix sum; three passes
// give the key itself. Selecting on keys compares values exactly as a sort does (-0 before +0),
// so the medians are numpy.median's values.
#define ZM_THREADS 1024
#define ZM_WARPS (ZM_THREADS / 32)  // 32: one warp scans the warps' sums in zm_block_scan
// Keys of -FLT_MAX and FLT_MAX: a value is finite exactly when its key lies in between.
#define ZM_KEY_LOWEST 0x00800000u
#define ZM_KEY_HIGHEST 0xff7fffffu
#define ZM_NONE 0xffffffffu

// |v - m| as NumPy rounds it: float32 subtraction, then the absolute value.
__device__ __forceinline__ float zm_dev(float v, float m) { return fabsf(__fsub_rn(v, m)); }

// Median of a float32 multiset as numpy.median: the middle value, or fl32(fl32(a + b) / 2).
__device__ __forceinline__ float zm_mid(float a, float b, bool even) { return even ? __fdiv_rn(__fadd_rn(a, b), 2.0f) : a; }

// Order-preserving key: a before b in a float sort exactly when key(a) < key(b).
__device__ __forceinline__ unsigned int zm_key(float f)
{
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float zm_value(unsigned int key)
{
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The elements of a row that take part in a selection, and what they are ranked by.
struct ZmSelection {
    unsigned int low, high;           // values whose keys lie in [low, high] ...
    bool clipped;                     // ... and, if clipped, zm_dev(v, clip_centre) <= clip_limit
    float clip_centre, clip_limit;
    bool deviation;                   // ranked by the value, or by zm_dev(v, centre)
    float centre;
};

struct ZmScratch {
    unsigned int hist[2048];
    unsigned int warp_sums[ZM_WARPS];
    unsigned int bin, rank, in_bin, low, high, next;
};

// One sweep of the row: hist[b] = how many taking-part elements have key bits [shift, shift + bits)
// equal to b and the bits above equal to `prefix` (all of them when shift + bits == 32). With
// `bounds`, s->low / s->high get the lowest and highest value key taking part.
__device__ void zm_histogram(const float* __restrict__ v, const long long n, const ZmSelection sel,
                             const int shift, const int bits, const unsigned int prefix, const bool bounds,
                             ZmScratch* s)
{
    if (bounds) {
        __syncthreads();  // every thread has read the last selection's bounds
        if (threadIdx.x == 0) { s->low = ZM_NONE; s->high = 0u; }
    }
    // The last pass's counts were all read before the barrier that ended its zm_locate.
    for (int b = threadIdx.x; b < (1 << bits); b += ZM_THREADS) s->hist[b] = 0u;
    __syncthreads();
    const unsigned int mask = (1u << bits) - 1u;
    const bool below_prefix = shift + bits < 32;
    unsigned int low = ZM_NONE, high = 0u, run_bin = 0u, run = 0u;
    for (long long i = threadIdx.x; i < n; i += ZM_THREADS) {
        const float x = v[i];
        const unsigned int kx = zm_key(x);
        if (kx < sel.low || kx > sel.high) continue;
        if (sel.clipped && !(zm_dev(x, sel.clip_centre) <= sel.clip_limit)) continue;
        low = kx < low ? kx : low;
        high = kx > high ? kx : high;
        const unsigned int key = sel.deviation ? zm_key(zm_dev(x, sel.centre)) : kx;
        if (below_prefix && (key >> (shift + bits)) != prefix) continue;
        const unsigned int b = (key >> shift) & mask;
        // Ties come in runs (integer data, flat rows): one shared atomic per run, not per element.
        if (b != run_bin) {
            if (run > 0u) atomicAdd(&s->hist[run_bin], run);
            run_bin = b;
            run = 0u;
        }
        ++run;
    }
    if (run > 0u) atomicAdd(&s->hist[run_bin], run);
    if (bounds && low <= high) {
        atomicMin(&s->low, low);
        atomicMax(&s->high, high);
    }
    __syncthreads();
}

// Inclusive prefix sum of one count per thread over the block; *total gets the block's sum.
__device__ __forceinline__ unsigned int zm_block_scan(unsigned int x, unsigned int* total, ZmScratch* s)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int d = 1; d < 32; d <<= 1) {
        const unsigned int y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= d) x += y;
    }
    if (lane == 31) s->warp_sums[warp] = x;
    __syncthreads();
    unsigned int w = s->warp_sums[lane];
    for (int d = 1; d < 32; d <<= 1) {
        const unsigned int y = __shfl_up_sync(0xffffffffu, w, d);
        if (lane >= d) w += y;
    }
    const unsigned int before = __shfl_sync(0xffffffffu, w, (warp + 31) & 31);
    *total = __shfl_sync(0xffffffffu, w, 31);
    return warp > 0 ? x + before : x;
}

// After zm_histogram over `bins` bins: the bin holding the rank-th smallest counted key (rank
// ZM_NONE: the lower middle one, (count - 1) / 2) in s->bin, its rank among the keys of that bin
// in s->rank and their number in s->in_bin. Returns how many keys were counted.
__device__ unsigned int zm_locate(const int bins, unsigned int rank, ZmScratch* s)
{
    const int per_thread = bins / ZM_THREADS;
    const int first = threadIdx.x * per_thread;
    unsigned int own = 0u;
    for (int j = 0; j < per_thread; ++j) own += s->hist[first + j];
    unsigned int total;
    const unsigned int through = zm_block_scan(own, &total, s);
    if (rank == ZM_NONE) rank = total > 0u ? (total - 1u) / 2u : 0u;
    if (rank >= through - own && rank < through) {
        unsigned int r = rank - (through - own);
        int b = first;
        while (r >= s->hist[b]) { r -= s->hist[b]; ++b; }
        s->bin = b;
        s->rank = r;
        s->in_bin = s->hist[b];
    }
    __syncthreads();
    return total;
}

// Smallest key above `key` among the taking-part elements (one more sweep).
__device__ unsigned int zm_smallest_above(const float* __restrict__ v, const long long n, const ZmSelection sel,
                                          const unsigned int key, ZmScratch* s)
{
    __syncthreads();  // every thread has read s->next
    if (threadIdx.x == 0) s->next = ZM_NONE;
    __syncthreads();
    unsigned int best = ZM_NONE;
    for (long long i = threadIdx.x; i < n; i += ZM_THREADS) {
        const float x = v[i];
        const unsigned int kx = zm_key(x);
        if (kx < sel.low || kx > sel.high) continue;
        const unsigned int k = sel.deviation ? zm_key(zm_dev(x, sel.centre)) : kx;
        if (k > key && k < best) best = k;
    }
    atomicMin(&s->next, best);
    __syncthreads();
    return s->next;
}

// The keys of ranks (m - 1) / 2 and m / 2 of the m taking-part elements (the same key when m is
// odd): the pair numpy.median averages. Returns m; stops after the first pass, keys unset, when
// m < min_count or m == stop_count. *low / *high: the lowest and highest value key taking part,
// so that [*low, *high] alone selects the same elements afterwards (a clip keeps an interval of
// the values: fl32(v - m) is monotone in v).
__device__ unsigned int zm_middle_keys(const float* __restrict__ v, const long long n, const ZmSelection sel,
                                       const unsigned int min_count, const unsigned int stop_count, ZmScratch* s,
                                       unsigned int* first_key, unsigned int* second_key,
                                       unsigned int* low, unsigned int* high)
{
    zm_histogram(v, n, sel, 21, 11, 0u, true, s);
    const unsigned int m = zm_locate(2048, ZM_NONE, s);
    *low = s->low;
    *high = s->high;
    if (m < min_count || m == stop_count) return m;
    ZmSelection kept = sel;
    kept.low = *low;
    kept.high = *high;
    kept.clipped = false;
    unsigned int prefix = s->bin, rank = s->rank;
    zm_histogram(v, n, kept, 10, 11, prefix, false, s);
    zm_locate(2048, rank, s);
    prefix = (prefix << 11) | s->bin;
    rank = s->rank;
    zm_histogram(v, n, kept, 0, 10, prefix, false, s);
    zm_locate(1024, rank, s);
    const unsigned int bin = s->bin;
    const unsigned int key = (prefix << 10) | bin;
    *first_key = key;
    *second_key = key;
    if ((m & 1u) == 0u && s->rank + 1u >= s->in_bin) {
        // Rank m / 2 holds a larger key: the next non-empty bin of the last pass, else (it lies
        // under another prefix) the smallest larger key of the row.
        if (threadIdx.x == 0) s->next = ZM_NONE;
        __syncthreads();
        const unsigned int own_bin = threadIdx.x;
        if (own_bin > bin && s->hist[own_bin] > 0u) atomicMin(&s->next, own_bin);
        __syncthreads();
        const unsigned int next_bin = s->next;
        *second_key = next_bin != ZM_NONE ? (prefix << 10) | next_bin : zm_smallest_above(v, n, kept, key, s);
    }
    return m;
}

// debayer._robust_sigma's two medians of each row: out[row] = (finite count, median, median absolute
// deviation), the medians as numpy.median computes them in float32 (NaN, NaN without a finite value).
// The row of this block: v, n values (float32, contiguous).
__device__ __forceinline__ void zm_median_mad_row(const float* __restrict__ v, const long long n, double* __restrict__ out)
{
    __shared__ ZmScratch s;
    const ZmSelection finite = {ZM_KEY_LOWEST, ZM_KEY_HIGHEST, false, 0.0f, 0.0f, false, 0.0f};
    unsigned int first, second, low, high;
    const unsigned int size = zm_middle_keys(v, n, finite, 1u, ZM_NONE, &s, &first, &second, &low, &high);
    double centre = __longlong_as_double(0x7ff8000000000000ULL), mad = centre;
    if (size > 0u) {
        const bool even = (size & 1u) == 0u;
        const float median = zm_mid(zm_value(first), zm_value(second), even);
        const ZmSelection deviations = {low, high, false, 0.0f, 0.0f, true, median};
        zm_middle_keys(v, n, deviations, 1u, ZM_NONE, &s, &first, &second, &low, &high);
        centre = (double)median;
        mad = (double)zm_mid(zm_value(first), zm_value(second), even);
    }
    if (threadIdx.x == 0) {
        out[3 * blockIdx.x] = (double)size;
        out[3 * blockIdx.x + 1] = centre;
        out[3 * blockIdx.x + 2] = mad;
    }
}

// rows[2 r], rows[2 r + 1]: address and length of row r.
extern "C" __global__ void __launch_bounds__(ZM_THREADS) zemosaic_median_mad_rows(
    const long long* __restrict__ rows, double* __restrict__ out)
{
    zm_median_mad_row((const float*)rows[2 * blockIdx.x], rows[2 * blockIdx.x + 1], out);
}

// The same for at most four rows, their addresses and lengths passed with the launch (no table
// to copy to the device first).
extern "C" __global__ void __launch_bounds__(ZM_THREADS) zemosaic_median_mad_rows4(
    const long long row0, const long long n0, const long long row1, const long long n1,
    const long long row2, const long long n2, const long long row3, const long long n3, double* __restrict__ out)
{
    const long long row = blockIdx.x == 0 ? row0 : blockIdx.x == 1 ? row1 : blockIdx.x == 2 ? row2 : row3;
    const long long n = blockIdx.x == 0 ? n0 : blockIdx.x == 1 ? n1 : blockIdx.x == 2 ? n2 : n3;
    zm_median_mad_row((const float*)row, n, out);
}

// frames._clipped_mad_sigma of each row (row r at rows + r x row_stride, n values): the finite
// values, median, sigma = 1.4826 x MAD, keep |v - median| <= fl32(clip x sigma), repeat. The kept
// values of an iteration are those of the previous one inside the new clip (the first pass of the
// next median counts them); NumPy's stops: fewer than 8 values, sigma not > 0, nothing clipped.
extern "C" __global__ void __launch_bounds__(ZM_THREADS) zemosaic_clipped_mad_sigma(
    const float* __restrict__ rows, const long long row_stride, const long long n, const double clip,
    const int iterations, double* __restrict__ sigma_out)
{
    __shared__ ZmScratch s;
    const float* v = rows + (long long)blockIdx.x * row_stride;
    ZmSelection values = {ZM_KEY_LOWEST, ZM_KEY_HIGHEST, false, 0.0f, 0.0f, false, 0.0f};
    double sigma = __longlong_as_double(0x7ff8000000000000ULL);
    unsigned int previous = ZM_NONE;
    for (int it = 0; it < iterations; ++it) {
        unsigned int first, second, low, high, dev_low, dev_high;
        const unsigned int size = zm_middle_keys(v, n, values, 8u, previous, &s, &first, &second, &low, &high);
        if (size < 8u || size == previous) break;
        const bool even = (size & 1u) == 0u;
        const float median = zm_mid(zm_value(first), zm_value(second), even);
        const ZmSelection deviations = {low, high, false, 0.0f, 0.0f, true, median};
        zm_middle_keys(v, n, deviations, 1u, ZM_NONE, &s, &first, &second, &dev_low, &dev_high);
        sigma = __dmul_rn(1.4826, (double)zm_mid(zm_value(first), zm_value(second), even));
        if (!(sigma > 0.0)) break;
        const float limit = __double2float_rn(__dmul_rn(clip, sigma));
        values = {low, high, true, median, limit, false, 0.0f};
        previous = size;
    }
    if (threadIdx.x == 0) sigma_out[blockIdx.x] = sigma;
}
"""

#: Threads per block of the selection kernels (ZM_THREADS in :data:`_SELECT_SOURCE`).
_SELECT_THREADS = 1024
#: Longest row the selection kernels take: their counts are uint32 (ZM_NONE excluded).
_SELECT_MAX_VALUES = 2**31 - 1


def _float32_row(row: Any, xp: Any) -> Any:
    """``row`` as a contiguous 1-D float32 device array (itself when it already is one)."""
    row = row.ravel()
    if row.dtype == xp.float32 and row.flags.c_contiguous:
        return row
    return xp.ascontiguousarray(row, dtype=xp.float32)


#: Rows :func:`fused_median_mad_on_device` passes with the launch (zemosaic_median_mad_rows4).
_ROWS_PASSED = 4


def fused_median_mad_on_device(rows: Sequence[Any], xp: Any) -> Any | None:
    """``(finite count, median, MAD)`` of each 1-D float32 device array as a float64 (R, 3) device
    array, as ``numpy.median`` gives them in float32 (NaN, NaN for a row without a finite value):
    one kernel reading the rows in place (their addresses passed with it, or a table of them for
    more than :data:`_ROWS_PASSED` rows), nothing waited for. ``None``
    when not on CuPy or a row is longer than :data:`_SELECT_MAX_VALUES`."""
    if not is_device_module(xp) or not rows:
        return None
    rows = [_float32_row(row, xp) for row in rows]  # CuPy's pool reuses their memory only after the kernel
    if any(int(row.size) > _SELECT_MAX_VALUES for row in rows):
        return None
    out = xp.empty((len(rows), 3), dtype=xp.float64)
    if len(rows) <= _ROWS_PASSED:  # a device thread's CUDA calls wait for the GIL: one copy fewer
        passed = [value for row in rows for value in (np.int64(row.data.ptr), np.int64(row.size))]
        passed += [np.int64(0)] * (2 * _ROWS_PASSED - len(passed))
        function = _fused_function(xp, _SELECT_SOURCE, "zemosaic_median_mad_rows4")
        function((len(rows),), (_SELECT_THREADS,), (*passed, out))
        return out
    table = upload_async(np.array([[int(row.data.ptr), int(row.size)] for row in rows], dtype=np.int64), xp)
    function = _fused_function(xp, _SELECT_SOURCE, "zemosaic_median_mad_rows")
    function((len(rows),), (_SELECT_THREADS,), (table, out))
    return out


def fused_median_mad(rows: Sequence[Any], xp: Any) -> list[tuple[int, float, float]] | None:
    """:func:`fused_median_mad_on_device` read back: ``(finite count, median, MAD)`` per row, the
    medians as Python floats (one copy to the host, which waits for the kernel)."""
    out = fused_median_mad_on_device(rows, xp)
    if out is None:
        return None
    return [(int(count), float(centre), float(mad)) for count, centre, mad in out.get()]


def fused_clipped_mad_sigmas(rows: Any, clip: float, iterations: int, xp: Any) -> Any | None:
    """``frames._clipped_mad_sigma`` of each row of ``rows`` (R, n) float32 on the GPU: one kernel,
    one block per row; float64 (R,) on the device, nothing waited for. ``None`` when not on CuPy
    or the rows are longer than :data:`_SELECT_MAX_VALUES`."""
    if not is_device_module(xp) or rows.ndim != 2 or rows.dtype != xp.float32:
        return None
    n_rows, n = (int(v) for v in rows.shape)
    if n > _SELECT_MAX_VALUES:
        return None
    sigmas = xp.empty(n_rows, dtype=xp.float64)
    if n_rows == 0:
        return sigmas
    itemsize = rows.itemsize
    if rows.strides[1] != itemsize or rows.strides[0] % itemsize or rows.strides[0] < 0:
        rows = xp.ascontiguousarray(rows)
    row_stride = int(rows.strides[0]) // itemsize
    function = _fused_function(xp, _SELECT_SOURCE, "zemosaic_clipped_mad_sigma")
    function((n_rows,), (_SELECT_THREADS,),
             (rows, np.int64(row_stride), np.int64(n), np.float64(clip), np.int32(min(int(iterations), 2**31 - 1)),
              sigmas))
    return sigmas


_COMBINE_SOURCE = r"""
// stack.stack_cube's combine ("mean") and rejected count of a (N, C, P) cube whose rejection is a
// kept range per column (c, p): kept = finite, lower <= value <= upper (compared in float64, as
// NumPy compares float32 values with float64 bounds) and weight > 0. One thread per pixel p:
// channels in order and frames in order, the float64 sums accumulated one frame after the other
// as NumPy's reductions along axis 0 do, the float32 products v x w rounded first.
extern "C" __global__ void zemosaic_combine_within_bounds(
    const float* __restrict__ cube, const long long n_frames, const int channels, const long long pixels,
    const double* __restrict__ lower, const double* __restrict__ upper, const int bounded,
    const float* __restrict__ weights, const int weighted,
    float* __restrict__ data, float* __restrict__ weight_out, float* __restrict__ count_out,
    float* __restrict__ rejected_out)
{
    const double nan = __longlong_as_double(0x7ff8000000000000ULL);
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pixels; p += (long long)gridDim.x * blockDim.x) {
        double weight_total = 0.0, count_total = 0.0, rejected_total = 0.0;
        for (int c = 0; c < channels; ++c) {
            const long long column = (long long)c * pixels + p;
            const double lo = bounded ? lower[column] : 0.0, hi = bounded ? upper[column] : 0.0;
            double weight_sum = 0.0, value_sum = 0.0;
            long long kept = 0, rejected = 0;
            for (long long n = 0; n < n_frames; ++n) {
                const float v = cube[(n * channels + c) * pixels + p];
                if (!isfinite(v)) continue;
                if (bounded && !((double)v >= lo && (double)v <= hi)) { ++rejected; continue; }
                const float w = weighted ? weights[n] : 1.0f;
                if (!(w > 0.0f)) continue;
                ++kept;
                weight_sum = __dadd_rn(weight_sum, (double)w);
                value_sum = __dadd_rn(value_sum, (double)__fmul_rn(v, w));
            }
            data[column] = weight_sum > 0.0 ? __double2float_rn(__ddiv_rn(value_sum, weight_sum)) : (float)nan;
            count_total = __dadd_rn(count_total, (double)kept);
            weight_total = __dadd_rn(weight_total, weight_sum);
            rejected_total = __dadd_rn(rejected_total, (double)rejected);
        }
        const double n = (double)(channels > 1 ? channels : 1);
        weight_out[p] = __double2float_rn(__ddiv_rn(weight_total, n));
        count_out[p] = __double2float_rn(__ddiv_rn(count_total, n));
        rejected_out[p] = __double2float_rn(__ddiv_rn(rejected_total, n));
    }
}
"""


def fused_combine_within_bounds(
    cube: Any, bounds: tuple[Any, Any] | None, frame_weights: Any | None, xp: Any
) -> tuple[Any, Any, Any, Any] | None:
    """``stack.combine(cube, mask, frame_weights, "mean")`` and ``stack_cube``'s rejected count in
    one kernel, for a rejection mask that keeps a range per column: ``bounds`` = (lower, upper)
    float64 over the (C·h·w) columns of the (N, C, h, w) float32 cube (None: every finite value
    kept). ``frame_weights``: float32 (N,) or None. Returns (data (C, h, w), weight, count,
    rejected (h, w)) with NumPy's values to the bit, without the mask or the per-channel
    temporaries; ``None`` when not on CuPy or the cube is not laid out as the kernel reads it."""
    if not is_device_module(xp) or cube.ndim != 4 or cube.dtype != xp.float32 or not cube.flags.c_contiguous:
        return None
    n_frames, channels, height, width = (int(v) for v in cube.shape)
    pixels = height * width
    if bounds is not None:
        lower, upper = (xp.ascontiguousarray(b, dtype=xp.float64) for b in bounds)
        if lower.shape != (channels * pixels,) or upper.shape != (channels * pixels,):
            return None
    else:
        lower = upper = xp.empty(1, dtype=xp.float64)
    if frame_weights is not None:
        weights = xp.ascontiguousarray(frame_weights, dtype=xp.float32).reshape(-1)
        if weights.shape != (n_frames,):
            return None
    else:
        weights = xp.empty(1, dtype=xp.float32)
    data = xp.empty((channels, height, width), dtype=xp.float32)
    weight, count, rejected = (xp.empty((height, width), dtype=xp.float32) for _ in range(3))
    if pixels == 0:
        return data, weight, count, rejected
    _launch_1d(_fused_function(xp, _COMBINE_SOURCE, "zemosaic_combine_within_bounds"), pixels, (
        cube, np.int64(n_frames), np.int32(channels), np.int64(pixels), lower, upper, np.int32(bounds is not None),
        weights, np.int32(frame_weights is not None), data, weight, count, rejected,
    ))
    return data, weight, count, rejected


_COVERAGE_SOURCE = r"""
// mosaic_first._column_coverage: out[col, y] = 1 when some channel of pixel (y, x) of a frame's
// box is finite, col being the block column of canvas x0 + x (out zeroed beforehand; every
// writer writes the same 1).
extern "C" __global__ void zemosaic_column_coverage(
    const float* __restrict__ data, const int channels, const int h, const int w, const int x0, const int side,
    unsigned char* __restrict__ out)
{
    const long long total = (long long)h * w;
    const int first = x0 / side;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        bool finite = false;
        for (int c = 0; c < channels && !finite; ++c) finite = isfinite(data[c * total + k]);
        if (finite) {
            const int y = (int)(k / w), x = (int)(k % w);
            out[(long long)((x0 + x) / side - first) * h + y] = 1;
        }
    }
}
"""


def fused_column_coverage(data: Any, x0: int, side: int, n_cols: int, xp: Any) -> Any | None:
    """``mosaic_first._column_coverage`` in one kernel: (n_cols, h) bool, which rows of each block
    column of a (C, h, w) float32 box starting at canvas column ``x0`` hold a finite value.
    ``None`` when not on CuPy or ``data`` is not C-contiguous float32."""
    if not is_device_module(xp) or data.ndim != 3 or data.dtype != xp.float32 or not data.flags.c_contiguous:
        return None
    channels, height, width = (int(v) for v in data.shape)
    out = xp.zeros((int(n_cols), height), dtype=xp.bool_)
    if height * width:
        _launch_1d(_fused_function(xp, _COVERAGE_SOURCE, "zemosaic_column_coverage"), height * width, (
            data, np.int32(channels), np.int32(height), np.int32(width), np.int32(x0), np.int32(side), out,
        ))
    return out


_BLOCK_MEANS_SOURCE = r"""
// photometry.coarse_piece's block means of a (C, h, w) float32 piece: cell (c, i, j) is the float64
// mean of the bin x bin pixels from row top + i x bin, column left + j x bin, as float32 (NaN when
// one of them is NaN, as NumPy's mean). One thread per cell.
extern "C" __global__ void zemosaic_block_means(
    const float* __restrict__ data, const int h, const int w, const int top, const int left, const int bin,
    const int n_rows, const int n_cols, const long long cells, float* __restrict__ out)
{
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < cells; k += (long long)gridDim.x * blockDim.x) {
        const long long per_channel = (long long)n_rows * n_cols;
        const long long c = k / per_channel;
        const int i = (int)((k % per_channel) / n_cols), j = (int)(k % n_cols);
        const float* cell = data + (c * h + top + (long long)i * bin) * w + left + (long long)j * bin;
        double total = 0.0;
        for (int y = 0; y < bin; ++y)
            for (int x = 0; x < bin; ++x) total += (double)cell[(long long)y * w + x];
        out[k] = __double2float_rn(total / (double)(bin * bin));
    }
}
"""


def fused_block_means(data: Any, top: int, left: int, n_rows: int, n_cols: int, bin_px: int) -> Any | None:
    """``photometry.coarse_piece``'s means on the GPU in one kernel: (C, n_rows, n_cols) float32 of
    the ``bin_px`` blocks of a (C, h, w) float32 CuPy array from (``top``, ``left``), each summed in
    float64. ``None`` when ``data`` is not a C-contiguous float32 CuPy array."""
    cupy = cupy_or_none()
    if cupy is None or not isinstance(data, cupy.ndarray) or data.ndim != 3 or data.dtype != cupy.float32 \
            or not data.flags.c_contiguous:
        return None
    channels, height, width = (int(v) for v in data.shape)
    out = cupy.empty((channels, int(n_rows), int(n_cols)), dtype=cupy.float32)
    if out.size:
        _launch_1d(_fused_function(cupy, _BLOCK_MEANS_SOURCE, "zemosaic_block_means"), int(out.size), (
            data, np.int32(height), np.int32(width), np.int32(top), np.int32(left), np.int32(bin_px),
            np.int32(n_rows), np.int32(n_cols), np.int64(out.size), out,
        ))
    return out


_DECODE_SOURCE = r"""
// frames.RawPixels.load on the device, in place: a FITS 16-bit value read as native uint16
// gets its two bytes swapped (big-endian file) and, for BZERO 32768, its top bit flipped.
extern "C" __global__ void zemosaic_decode_big_endian_16(
    unsigned short* __restrict__ values, const long long n, const unsigned short flip)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const unsigned short v = values[i];
        values[i] = (unsigned short)(((v >> 8) | (v << 8)) ^ flip);
    }
}

// The same, and the decoded values as float32 too (uint16 values, or the int16 the bits are when
// the sign is not flipped): the frame's float copy without a second pass.
extern "C" __global__ void zemosaic_decode_big_endian_16_float(
    unsigned short* __restrict__ values, const long long n, const unsigned short flip, float* __restrict__ as_float)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const unsigned short v = values[i];
        const unsigned short decoded = (unsigned short)(((v >> 8) | (v << 8)) ^ flip);
        values[i] = decoded;
        as_float[i] = flip ? (float)decoded : (float)(short)decoded;
    }
}
"""


def fused_decode_big_endian_16(values: Any, flip_sign: bool, xp: Any, as_float: Any = None) -> Any | None:
    """``values`` (uint16 on CuPy: a 16-bit FITS image's bytes as read) decoded in place in one
    kernel: bytes swapped, then the sign bit flipped for BZERO 32768 (the uint16 values) or not
    (the int16 bits). ``as_float`` (float32, as many values): also receives the decoded values
    (as uint16 or int16) in the same kernel. Returns ``values``; ``None`` when not on CuPy or not
    contiguous uint16 (or ``as_float`` not contiguous float32 of that size)."""
    if not is_device_module(xp) or values.dtype != xp.uint16 or not values.flags.c_contiguous:
        return None
    if as_float is not None and (as_float.dtype != xp.float32 or not as_float.flags.c_contiguous
                                 or as_float.size != values.size):
        return None
    flip = np.uint16(0x8000 if flip_sign else 0)
    if values.size and as_float is None:
        _launch_1d(_fused_function(xp, _DECODE_SOURCE, "zemosaic_decode_big_endian_16"), int(values.size),
                   (values, np.int64(values.size), flip))
    elif values.size:
        _launch_1d(_fused_function(xp, _DECODE_SOURCE, "zemosaic_decode_big_endian_16_float"), int(values.size),
                   (values, np.int64(values.size), flip, as_float))
    return values


_PLACE_PIECE_SOURCE = r"""
// mosaic_first.stack_block's placement of the pieces of one block: cube[slot, c, oy + y, ox + x] =
// (piece[c, y, x] - float32(photometry.Normalisation.background_plane)) / float32(gain), the
// plane in float64 as NumPy computes it: (offset + t0 * col) + t1 * row. One launch for every
// piece of the block: blockIdx.y is the piece, whose row of `table` holds its address, strides
// (elements), shape, place in the block, canvas origin and slot.
extern "C" __global__ void zemosaic_place_pieces(
    const long long* __restrict__ table, const int channels, float* __restrict__ cube,
    const int block_h, const int block_w, const double bin_px, const double* __restrict__ centres,
    const double* __restrict__ offsets, const double* __restrict__ tilts, const float* __restrict__ gains)
{
    const long long* d = table + 11LL * blockIdx.y;
    const float* __restrict__ piece = (const float*)d[0];
    const long long sc = d[1], sy = d[2], sx = d[3];
    const int ph = (int)d[4], pw = (int)d[5], oy = (int)d[6], ox = (int)d[7];
    const int canvas_y0 = (int)d[8], canvas_x0 = (int)d[9];
    const long long slot = d[10];
    float* __restrict__ cube_slot = cube + slot * channels * block_h * block_w;
    const double centre_x = centres[2 * slot], centre_y = centres[2 * slot + 1];
    const double* __restrict__ slot_offsets = offsets + slot * channels;
    const double* __restrict__ slot_tilts = tilts + slot * channels * 2;
    const float* __restrict__ slot_gains = gains + slot * channels;
    const long long total = (long long)channels * ph * pw;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
        const int x = (int)(k % pw);
        const int y = (int)((k / pw) % ph);
        const int c = (int)(k / ((long long)pw * ph));
        const double col = __dsub_rn(__dsub_rn(__ddiv_rn(__dadd_rn((double)(canvas_x0 + x), 0.5), bin_px), 0.5), centre_x);
        const double row = __dsub_rn(__dsub_rn(__ddiv_rn(__dadd_rn((double)(canvas_y0 + y), 0.5), bin_px), 0.5), centre_y);
        const double plane = __dadd_rn(__dadd_rn(slot_offsets[c], __dmul_rn(slot_tilts[2 * c], col)),
                                       __dmul_rn(slot_tilts[2 * c + 1], row));
        const float value = piece[c * sc + y * sy + x * sx];
        cube_slot[((long long)c * block_h + oy + y) * block_w + ox + x] =
            __fdiv_rn(__fsub_rn(value, __double2float_rn(plane)), slot_gains[c]);
    }
}
"""

#: Most pieces one placement launch takes (CUDA's limit on a grid's second dimension).
_PLACE_MAX_PIECES = 65535


def fused_place_pieces(
    cube: Any, pieces: Sequence[tuple[int, int, int, Any]], y0: int, x0: int, normalisation: Any, xp: Any
) -> bool:
    """Write every normalised piece into ``cube`` (N, C, h, w) on the GPU in one kernel launch
    (``stack_block``'s loop without its ~18 small calls and 3 host→device copies per piece; the
    pieces' table and the normalisation reach the device without waiting for it). False
    (nothing written) when not on CuPy."""
    if not is_device_module(xp) or cube.dtype != xp.float32 or not cube.flags.c_contiguous:
        return False
    n_slots, channels, block_h, block_w = (int(v) for v in cube.shape)
    if not pieces:
        return True
    offsets = upload_async(np.ascontiguousarray(normalisation.offsets[:n_slots, :channels], dtype=np.float64), xp)
    tilts = upload_async(np.ascontiguousarray(normalisation.tilts[:n_slots, :channels], dtype=np.float64), xp)
    gains = upload_async(np.ascontiguousarray(normalisation.gains[:n_slots, :channels]).astype(np.float32), xp)
    centres = upload_async(np.ascontiguousarray(normalisation.centres[:n_slots], dtype=np.float64), xp)
    on_device = []  # referenced until the launch: CuPy's pool reuses their memory only after it
    rows = []
    for slot, (_, py0, px0, piece) in enumerate(pieces):
        piece = to_device(piece, xp)
        if piece.dtype != xp.float32:
            piece = piece.astype(xp.float32)
        on_device.append(piece)
        _, ph, pw = (int(v) for v in piece.shape)
        strides = [int(v) // piece.itemsize for v in piece.strides]
        rows.append([int(piece.data.ptr), *strides, ph, pw, py0 - y0, px0 - x0, py0, px0, slot])
    largest = max(channels * row[4] * row[5] for row in rows)
    function = _fused_function(xp, _PLACE_PIECE_SOURCE, "zemosaic_place_pieces")
    for first in range(0, len(rows), _PLACE_MAX_PIECES):
        batch = rows[first : first + _PLACE_MAX_PIECES]
        table = upload_async(np.array(batch, dtype=np.int64), xp)
        function((max(1, min(-(-largest // 256), 4096)), len(batch)), (256,), (
            table, np.int32(channels), cube, np.int32(block_h), np.int32(block_w),
            np.float64(normalisation.bin_px), centres, offsets, tilts, gains,
        ))
    return True


_BILINEAR_SOURCE = r"""
// reproject._bilinear_into for one pixel of a row chunk: the inside test, the clamped cell, the
// four float32 weights and the gathers summed in NumPy's order, the NaN-mask rule.
__device__ __forceinline__ float zm_gather(const float* p, long long tl, long long tr, long long bl, long long br,
                                           float w00, float w01, float w10, float w11)
{
    return __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(w00, p[tl]), __fmul_rn(w01, p[tr])), __fmul_rn(w10, p[bl])),
                     __fmul_rn(w11, p[br]));
}

__device__ __forceinline__ void zm_bilinear_pixel(
    const float* __restrict__ flat, const long long plane, const int channels, const float* __restrict__ bad,
    const int has_bad, const int height, const int width, const float x, const float y, const long long k,
    float* __restrict__ out, const long long out_stride, float* __restrict__ footprint)
{
    const float nan = __int_as_float(0x7fc00000);
    const bool inside = (x >= -0.5f) && (x <= (float)width - 0.5f) && (y >= -0.5f) && (y <= (float)height - 0.5f);
    const float xc = fminf(fmaxf(inside ? x : 0.0f, 0.0f), (float)(width - 1));
    const float yc = fminf(fmaxf(inside ? y : 0.0f, 0.0f), (float)(height - 1));
    const float cx = fminf(floorf(xc), (float)(width - 2 > 0 ? width - 2 : 0));
    const float cy = fminf(floorf(yc), (float)(height - 2 > 0 ? height - 2 : 0));
    const float fx = __fsub_rn(xc, cx), fy = __fsub_rn(yc, cy);
    const float gx = __fsub_rn(1.0f, fx), gy = __fsub_rn(1.0f, fy);
    const float w00 = __fmul_rn(gx, gy), w01 = __fmul_rn(fx, gy), w10 = __fmul_rn(gx, fy), w11 = __fmul_rn(fx, fy);
    const long long tl = (long long)cy * width + (long long)cx;
    const long long tr = tl + (width > 1 ? 1 : 0);
    const long long bl = tl + (height > 1 ? width : 0);
    const long long br = bl + (width > 1 ? 1 : 0);
    bool valid = inside;
    if (has_bad) valid = valid && (zm_gather(bad, tl, tr, bl, br, w00, w01, w10, w11) <= 0.0f);
    for (int c = 0; c < channels; ++c) {
        out[c * out_stride + k] = valid ? zm_gather(flat + c * plane, tl, tr, bl, br, w00, w01, w10, w11) : nan;
    }
    footprint[k] = valid ? 1.0f : 0.0f;
}

// Sampling at a dense map (map_x, map_y), n pixels.
extern "C" __global__ void zemosaic_bilinear(
    const float* __restrict__ flat, const long long plane, const int channels, const float* __restrict__ bad,
    const int has_bad, const int height, const int width, const float* __restrict__ map_x,
    const float* __restrict__ map_y, const long long n, float* __restrict__ out, const long long out_stride,
    float* __restrict__ footprint)
{
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        zm_bilinear_pixel(flat, plane, channels, bad, has_bad, height, width, map_x[k], map_y[k], k, out, out_stride,
                          footprint);
    }
}

// reproject._MapExpander's cell and fraction of a box offset: min(offset // step, points - 2) and
// (offset - cell * step) / step in float64.
__device__ __forceinline__ long long zm_cell(const long long offset, const long long step, const long long points,
                                             double* frac)
{
    long long cell = offset / step;
    if (cell > points - 2) cell = points - 2;
    *frac = __ddiv_rn((double)(offset - cell * step), (double)step);
    return cell;
}

// reproject._MapExpander._along_x at one column: left + frac * (right - left) in float64, cast to float32.
__device__ __forceinline__ float zm_along_x(const double* grid, const long long row, const long long nx,
                                            const long long cell, const double frac)
{
    const double left = grid[row * nx + cell], right = grid[row * nx + cell + 1];
    return __double2float_rn(__dadd_rn(left, __dmul_rn(frac, __dsub_rn(right, left))));
}

// Sampling at the map of reproject._MapExpander.rows(r0, r0 + n / cols), the expander's control rows,
// cells and fractions computed here from the control grid itself (float64 (ny, nx) per coordinate):
// neither the dense map nor any expander array is made.
extern "C" __global__ void zemosaic_bilinear_control(
    const float* __restrict__ flat, const long long plane, const int channels, const float* __restrict__ bad,
    const int has_bad, const int height, const int width, const double* __restrict__ grid_x,
    const double* __restrict__ grid_y, const long long ny, const long long nx, const long long step,
    const long long r0, const int cols, const long long n, float* __restrict__ out, const long long out_stride,
    float* __restrict__ footprint)
{
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (long long)gridDim.x * blockDim.x) {
        double row_frac64, col_frac;
        const long long cy = zm_cell(r0 + k / cols, step, ny, &row_frac64);
        const long long cx = zm_cell(k % cols, step, nx, &col_frac);
        const float frac = __double2float_rn(row_frac64);
        const float x0 = zm_along_x(grid_x, cy, nx, cx, col_frac), x1 = zm_along_x(grid_x, cy + 1, nx, cx, col_frac);
        const float y0 = zm_along_x(grid_y, cy, nx, cx, col_frac), y1 = zm_along_x(grid_y, cy + 1, nx, cx, col_frac);
        const float x = __fadd_rn(x0, __fmul_rn(frac, __fsub_rn(x1, x0)));
        const float y = __fadd_rn(y0, __fmul_rn(frac, __fsub_rn(y1, y0)));
        zm_bilinear_pixel(flat, plane, channels, bad, has_bad, height, width, x, y, k, out, out_stride, footprint);
    }
}
"""


def fused_bilinear_control_into(
    flat: Any, bad: Any | None, height: int, width: int, grid_xy: Any, step: int, box_shape: tuple[int, int],
    r0: int, r1: int, out: Any, footprint: Any, xp: Any,
) -> bool:
    """``reproject._MapExpander.rows(r0, r1)`` then :func:`fused_bilinear_into` in one kernel that
    makes neither the dense map nor the expander's arrays: it computes them from ``grid_xy``
    (2, ny, nx) float64 on the device (the control grid's source x and y) with its ``step`` over a
    box of ``box_shape``, the same values to the bit. False (nothing written) when not on CuPy or
    the arrays are not laid out as the kernel reads them (the caller then runs the dense path)."""
    if not is_device_module(xp):
        return False
    arrays = [flat, footprint] + ([] if bad is None else [bad])
    if any(a.dtype != xp.float32 or not a.flags.c_contiguous for a in arrays):
        return False
    if grid_xy.dtype != xp.float64 or grid_xy.ndim != 3 or grid_xy.shape[0] != 2 or not grid_xy.flags.c_contiguous:
        return False
    _, ny, nx = (int(v) for v in grid_xy.shape)
    height_box, cols = (int(v) for v in box_shape)
    r0, r1 = int(r0), int(r1)
    if ny < 2 or nx < 2 or int(step) < 1 or not 0 <= r0 <= r1 <= height_box:
        return False
    channels = int(flat.shape[0])
    if not _bilinear_output_fits(out, footprint, channels, r1 - r0, cols, xp):
        return False
    n = (r1 - r0) * cols
    if n == 0:
        return True
    _launch_1d(_fused_function(xp, _BILINEAR_SOURCE, "zemosaic_bilinear_control"), n, (
        flat, np.int64(flat.shape[1]), np.int32(channels), flat if bad is None else bad, np.int32(bad is not None),
        np.int32(height), np.int32(width), grid_xy[0], grid_xy[1], np.int64(ny), np.int64(nx), np.int64(step),
        np.int64(r0), np.int32(cols), np.int64(n), out, np.int64(out.strides[0] // out.itemsize), footprint,
    ))
    return True


def _bilinear_output_fits(out: Any, footprint: Any, channels: int, rows: int, cols: int, xp: Any) -> bool:
    """Whether ``out`` (C, rows, cols) float32 has C-contiguous planes (any plane stride) and
    ``footprint`` is (rows, cols): the layout the bilinear kernels write."""
    if out.dtype != xp.float32 or out.ndim != 3 or tuple(out.shape) != (channels, rows, cols):
        return False
    item = out.itemsize
    return out.strides[2] == item and out.strides[1] == cols * item and tuple(footprint.shape) == (rows, cols)


def fused_bilinear_into(flat: Any, bad: Any | None, height: int, width: int, x: Any, y: Any, out: Any,
                        footprint: Any, xp: Any) -> bool:
    """``reproject._bilinear_into`` in one kernel: False (nothing written) when not on CuPy or the
    arrays are not laid out as the kernel reads them (the caller then runs the xp path)."""
    if not is_device_module(xp):
        return False
    arrays = [flat, x, y, footprint] + ([] if bad is None else [bad])
    if any(a.dtype != xp.float32 or not a.flags.c_contiguous for a in arrays):
        return False
    channels = int(flat.shape[0])
    rows, cols = (int(v) for v in x.shape)
    if not _bilinear_output_fits(out, footprint, channels, rows, cols, xp):
        return False
    n = rows * cols
    _launch_1d(_fused_function(xp, _BILINEAR_SOURCE, "zemosaic_bilinear"), n, (
        flat, np.int64(flat.shape[1]), np.int32(channels), flat if bad is None else bad, np.int32(bad is not None),
        np.int32(height), np.int32(width), x, y, np.int64(n), out, np.int64(out.strides[0] // out.itemsize), footprint,
    ))
    return True


#: Largest sample depth (frames per pixel) the fused sort takes: a column is padded to the next
#: power of two, and 8192 floats (32 KB) stay under the 48 KB of shared memory a block gets
#: without asking (12 * 1024 rows, the former limit, padded to 64 KB: that launch was refused).
FUSED_SORT_MAX_ROWS = 8 * 1024
#: Shared memory of one block of the fused sort when it sorts several adjacent columns together
#: (at most FUSED_SORT_MAX_GROUP, the kernel's ZM_SORT_MAX_GROUP); a deeper column sorts alone.
FUSED_SORT_GROUP_BYTES = 32 * 1024
FUSED_SORT_MAX_GROUP = 32

_fused_lock = threading.Lock()
_fused_modules: dict[tuple[int, str], Any] = {}


_fused_functions: dict[tuple[int, int, str], Any] = {}


def _fused_function(cupy: Any, source: str, name: str) -> Any:
    """A compiled function of a fused kernel source, cached per device (compiled once).

    The function handles are cached too: looking one up is a driver call, which releases the
    GIL, and a device thread that gives the GIL away waits for it behind the run's other threads.
    """
    device = int(cupy.cuda.runtime.getDevice())
    function = _fused_functions.get((device, id(source), name))
    if function is not None:
        return function
    key = (device, source[:64] + str(len(source)))
    with _fused_lock:
        module = _fused_modules.get(key)
        if module is None:
            module = cupy.RawModule(code=source, options=_FUSED_OPTIONS)
            _fused_modules[key] = module
        function = module.get_function(name)
        _fused_functions[(device, id(source), name)] = function
    return function


_ROW_MEDIAN64_SOURCE = r"""
// photometry's masked row medians (np.median of each row's masked float64 values) without sorting:
// one block of ZM64_THREADS threads per row, radix select on order-preserving uint64 keys, eight
// passes of 8 bits per selected rank. A warp counts equal bins with one shared atomic per bin
// (__match_any_sync): most values of a row share their high bytes.
#define ZM64_THREADS 256

__device__ __forceinline__ unsigned long long zm64_key(double v)
{
    const unsigned long long u = (unsigned long long)__double_as_longlong(v);
    return (u >> 63) ? ~u : (u | 0x8000000000000000ULL);
}

__device__ __forceinline__ double zm64_value(unsigned long long key)
{
    return __longlong_as_double((long long)((key >> 63) ? (key & 0x7fffffffffffffffULL) : ~key));
}

// The key of rank `rank` (0-based, ascending) among the masked values of one row.
__device__ unsigned long long zm64_select(const double* __restrict__ v, const unsigned char* __restrict__ m,
                                          const long long width, unsigned int rank,
                                          unsigned int* hist, unsigned int* scan, unsigned long long* shared_prefix,
                                          unsigned int* shared_rank)
{
    unsigned long long prefix = 0ULL;
    const int lane = threadIdx.x & 31;
    for (int shift = 56; shift >= 0; shift -= 8) {
        hist[threadIdx.x] = 0u;
        __syncthreads();
        const unsigned long long high_mask = shift == 56 ? 0ULL : ~((1ULL << (shift + 8)) - 1ULL);
        for (long long base = 0; base < width; base += ZM64_THREADS) {
            const long long i = base + threadIdx.x;
            unsigned int bin = 0xffffffffu;  // not counted
            if (i < width && m[i]) {
                const unsigned long long key = zm64_key(v[i]);
                if ((key & high_mask) == prefix) bin = (unsigned int)((key >> shift) & 0xffULL);
            }
            const unsigned int peers = __match_any_sync(0xffffffffu, bin);
            if (bin != 0xffffffffu && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        // Inclusive prefix sum of the 256 bins (Hillis-Steele in shared memory).
        unsigned int x = hist[threadIdx.x];
        scan[threadIdx.x] = x;
        __syncthreads();
        for (int d = 1; d < ZM64_THREADS; d <<= 1) {
            const unsigned int y = threadIdx.x >= d ? scan[threadIdx.x - d] : 0u;
            __syncthreads();
            scan[threadIdx.x] += y;
            __syncthreads();
        }
        const unsigned int through = scan[threadIdx.x], before = through - x;
        if (x > 0u && rank >= before && rank < through) {
            *shared_prefix = prefix | ((unsigned long long)threadIdx.x << shift);
            *shared_rank = rank - before;
        }
        __syncthreads();
        prefix = *shared_prefix;
        rank = *shared_rank;
        __syncthreads();
    }
    return prefix;
}

// out[r] = np.median(values[r][mask[r]]) (NaN for a row with nothing): the middle value, or
// fl64(fl64(a + b) / 2) of the two middle ones, as NumPy's mean of two values.
extern "C" __global__ void __launch_bounds__(ZM64_THREADS) zemosaic_masked_row_medians(
    const double* __restrict__ values, const unsigned char* __restrict__ mask, const long long width,
    double* __restrict__ out)
{
    __shared__ unsigned int hist[ZM64_THREADS], scan[ZM64_THREADS], count, shared_rank;
    __shared__ unsigned long long shared_prefix;
    const double* v = values + (long long)blockIdx.x * width;
    const unsigned char* m = mask + (long long)blockIdx.x * width;
    if (threadIdx.x == 0) count = 0u;
    __syncthreads();
    unsigned int own = 0u;
    for (long long i = threadIdx.x; i < width; i += ZM64_THREADS) own += m[i] ? 1u : 0u;
    for (int d = 16; d > 0; d >>= 1) own += __shfl_down_sync(0xffffffffu, own, d);
    if ((threadIdx.x & 31) == 0) atomicAdd(&count, own);
    __syncthreads();
    const unsigned int n = count;
    if (n == 0u) {
        if (threadIdx.x == 0) out[blockIdx.x] = __longlong_as_double(0x7ff8000000000000LL);
        return;
    }
    const double low = zm64_value(zm64_select(v, m, width, (n - 1u) / 2u, hist, scan, &shared_prefix, &shared_rank));
    double median = low;
    if ((n & 1u) == 0u) {
        const double high = zm64_value(zm64_select(v, m, width, n / 2u, hist, scan, &shared_prefix, &shared_rank));
        median = __ddiv_rn(__dadd_rn(low, high), 2.0);
    }
    if (threadIdx.x == 0) out[blockIdx.x] = median;
}
"""

#: Threads per block of :data:`_ROW_MEDIAN64_SOURCE` (ZM64_THREADS).
_ROW_MEDIAN64_THREADS = 256


def fused_masked_row_medians(values: Any, mask: Any, xp: Any) -> Any | None:
    """Per row of ``values`` (R, W) float64, ``np.median`` of the values where ``mask`` (R, W) is
    true (NaN for a row with none), as a float64 (R,) device array: one kernel, one block per row,
    nothing waited for. ``None`` when not on CuPy, or the shapes or types are not these."""
    if not is_device_module(xp) or values.ndim != 2 or values.dtype != xp.float64 or mask.shape != values.shape:
        return None
    rows, width = (int(v) for v in values.shape)
    if rows == 0 or width >= 2**31:
        return None
    values = xp.ascontiguousarray(values)
    mask = xp.ascontiguousarray(mask, dtype=xp.bool_)
    out = xp.empty(rows, dtype=xp.float64)
    function = _fused_function(xp, _ROW_MEDIAN64_SOURCE, "zemosaic_masked_row_medians")
    function((rows,), (_ROW_MEDIAN64_THREADS,), (values, mask, np.int64(width), out))
    return out


_ADAPTIVE_MOMENTS_SOURCE = r"""
// quality._adaptive_moments for many stamps in one launch: one block per star, the iterations
// inside the kernel. Each iteration is the xp code's: float32 weights exp(-q/2) of the pixel
// offsets from the current centroid times the masked stamp, float64 sums of w, w·ox, w·oy,
// (w·ox)·ox, (w·oy)·oy, (w·ox)·oy (block reduction: another summation order than NumPy's), then
// the same float64 update, checks and clipping by thread 0.
#define ZAM_THREADS 128
extern "C" __global__ void zemosaic_adaptive_moments(
    const float* __restrict__ masked, const float* __restrict__ dx, const float* __restrict__ dy,
    const double* __restrict__ start, long long n_pixels, int iterations, double ratio,
    double convergence, double limit, double* __restrict__ out, bool* __restrict__ converged_out)
{
    __shared__ double partial[6][ZAM_THREADS];
    __shared__ double state[5];   // cx, cy, cxx, cyy, cxy
    __shared__ float inverse[5];  // ixx, iyy, ixy, cx, cy as float32
    __shared__ int go;
    const long long star = blockIdx.x;
    const int tid = threadIdx.x;
    const float* values = masked + star * n_pixels;
    const double gain = (ratio + 1.0) / ratio;
    bool converged = false;
    if (tid == 0) {
        const double* s = start + star * 5;
        double cxx = fmin(fmax(s[2], 0.5), 25.0);
        double cyy = fmin(fmax(s[3], 0.5), 25.0);
        double bound = 0.9 * sqrt(cxx * cyy);
        state[0] = s[0]; state[1] = s[1]; state[2] = cxx; state[3] = cyy;
        state[4] = fmin(fmax(s[4], -bound), bound);
        go = 1;
    }
    __syncthreads();
    for (int it = 0; it < iterations; ++it) {
        if (!go) break;
        if (tid == 0) {
            double wxx = ratio * state[2], wyy = ratio * state[3], wxy = ratio * state[4];
            double det = wxx * wyy - wxy * wxy;
            inverse[0] = (float)(wyy / det); inverse[1] = (float)(wxx / det); inverse[2] = (float)(-wxy / det);
            inverse[3] = (float)state[0]; inverse[4] = (float)state[1];
        }
        __syncthreads();
        const float ixx = inverse[0], iyy = inverse[1], ixy2 = 2.0f * inverse[2];
        double t = 0.0, sx = 0.0, sy = 0.0, sxx = 0.0, syy = 0.0, sxy = 0.0;
        for (long long p = tid; p < n_pixels; p += ZAM_THREADS) {
            float ox = dx[p] - inverse[3];
            float oy = dy[p] - inverse[4];
            float q = ixx * ox * ox;
            q += ixy2 * ox * oy;
            q += iyy * oy * oy;
            q *= -0.5f;
            float w = expf(q) * values[p];
            float wx = w * ox, wy = w * oy;
            t += (double)w; sx += (double)wx; sy += (double)wy;
            sxx += (double)(wx * ox); syy += (double)(wy * oy); sxy += (double)(wx * oy);
        }
        partial[0][tid] = t; partial[1][tid] = sx; partial[2][tid] = sy;
        partial[3][tid] = sxx; partial[4][tid] = syy; partial[5][tid] = sxy;
        __syncthreads();
        for (int width = ZAM_THREADS / 2; width > 0; width >>= 1) {
            if (tid < width) {
                for (int k = 0; k < 6; ++k) partial[k][tid] += partial[k][tid + width];
            }
            __syncthreads();
        }
        if (tid == 0) {
            double total = partial[0][0];
            bool alive = total > 0.0;
            if (!alive) total = 1.0;
            double mx = partial[1][0] / total, my = partial[2][0] / total;
            double nxx = gain * (partial[3][0] / total - mx * mx);
            double nyy = gain * (partial[4][0] / total - my * my);
            double nxy = gain * (partial[5][0] / total - mx * my);
            alive = alive && nxx > 0.05 && nyy > 0.05 && nxx * nyy - nxy * nxy > 0.0025;
            alive = alive && nxx < limit * limit && nyy < limit * limit;
            double change = fabs(nxx - state[2]) + fabs(nyy - state[3]) + fabs(nxy - state[4]);
            double step = hypot(mx, my) * gain;
            bool done = alive && change < convergence * (state[2] + state[3]) && step < convergence;
            if (alive) {
                state[2] = nxx; state[3] = nyy; state[4] = nxy;
                state[0] += fmin(fmax(gain * mx, -1.0), 1.0);
                state[1] += fmin(fmax(gain * my, -1.0), 1.0);
            }
            alive = alive && fabs(state[0]) < limit && fabs(state[1]) < limit;
            if (done && alive) converged = true;
            go = (alive && !done) ? 1 : 0;
        }
        __syncthreads();
    }
    if (tid == 0) {
        out[star * 3 + 0] = state[2]; out[star * 3 + 1] = state[3]; out[star * 3 + 2] = state[4];
        converged_out[star] = converged;
    }
}
"""


def fused_adaptive_moments(
    masked: Any, dx: Any, dy: Any, start: Any, iterations: int, ratio: float, convergence: float, xp: Any
) -> tuple[Any, Any, Any, Any] | None:
    """``quality._adaptive_moments`` of stamps ``masked`` (S, P) float32 (values × valid), pixel
    offsets ``dx``, ``dy`` (P,) and starting points ``start`` (S, 5) float64 in one launch: one
    block per star. Returns device arrays (cxx, cyy, cxy, converged), or ``None`` when not on
    CuPy or the shapes or types are not these. The float64 sums run in another order than
    NumPy's (a block reduction): the moments agree to ~1e-12, not to the bit."""
    if not is_device_module(xp) or masked.ndim != 2 or masked.dtype != xp.float32 or start.shape != (masked.shape[0], 5):
        return None
    n_stars, n_pixels = (int(v) for v in masked.shape)
    if n_stars == 0 or n_pixels == 0:
        return None
    masked = xp.ascontiguousarray(masked)
    dx32 = xp.ascontiguousarray(xp.asarray(dx, dtype=xp.float32))
    dy32 = xp.ascontiguousarray(xp.asarray(dy, dtype=xp.float32))
    start = xp.ascontiguousarray(xp.asarray(start, dtype=xp.float64))
    limit = float(np.max(np.abs(np.asarray(dx.get() if hasattr(dx, "get") else dx))))
    out = xp.empty((n_stars, 3), dtype=xp.float64)
    converged = xp.empty(n_stars, dtype=xp.bool_)
    function = _fused_function(xp, _ADAPTIVE_MOMENTS_SOURCE, "zemosaic_adaptive_moments")
    function(
        (n_stars,), (128,),
        (masked, dx32, dy32, start, np.int64(n_pixels), np.int32(iterations), np.float64(ratio),
         np.float64(convergence), np.float64(limit), out, converged),
    )
    return out[:, 0], out[:, 1], out[:, 2], converged


#: Deepest column the register sort takes (:data:`_WARP_SORT_TEMPLATE`: 32 values per lane of a
#: warp); deeper ones go to the shared-memory network of :data:`_KAPPA_SIGMA_SOURCE`.
FUSED_WARP_SORT_MAX_ROWS = 1024
#: Columns (one warp each) of a block of the register sort: as many as fit their slices in
#: 48 KB of shared memory (a power of two, at most 32).
_WARP_SORT_SHARED_BYTES = 48 * 1024

# ZM_E is set first (the module cache tells sources apart by their start).
_WARP_SORT_TEMPLATE = r"""#define ZM_E {elems}
#define ZM_S (32 * ZM_E)
#define ZM_COLUMNS {columns}
#define ZM_INF __int_as_float(0x7f800000)
#define ZM_LOADS 4
// Column slices in shared memory: one spare word after every 32 values, so that the 32 lanes of a
// warp reading their ZM_E consecutive values hit 32 banks; a slice length of 32 / ZM_COLUMNS
// modulo 32, so that the ZM_COLUMNS columns x 32 / ZM_COLUMNS rows a warp reads or writes at the
// edges hit 32 banks too.
#define ZM_PAD(i) ((i) + ((i) >> 5))
#define ZM_SLICE ((((ZM_S + ZM_E) + 31) / 32) * 32 + 32 / ZM_COLUMNS)

// The bitonic network of zemosaic_sort_finite_columns (compare-exchanges swapping when
// (a > b) == ascending, padding +inf) on one column of n values by one warp, E consecutive values
// per lane held in registers (32 E >= n): exchanges of pairs less than E apart stay in a lane's
// registers, the others pass through shuffles; no shared memory and no block barrier between the
// network's steps. Reads and writes the column's slice.
template <int E, int LOG_S>
__device__ __forceinline__ void zm_warp_sort(float* column, const int n, const int lane)
{{
    float v[E];
#pragma unroll
    for (int r = 0; r < E; ++r) {{
        const int g = lane * E + r;
        v[r] = g < n ? column[ZM_PAD(g)] : ZM_INF;
    }}
#pragma unroll
    for (int kb = 1; kb <= LOG_S; ++kb) {{
        const int k = 1 << kb;
#pragma unroll
        for (int jb = kb - 1; jb >= 0; --jb) {{
            const int j = 1 << jb;
            if (j >= E) {{
                // The partner is in lane ^ (j / E), at the same register.
                const int lane_j = j / E;
                const bool low = (lane & lane_j) == 0;
                const bool ascending = ((lane * E) & k) == 0;
#pragma unroll
                for (int r = 0; r < E; ++r) {{
                    const float other = __shfl_xor_sync(0xffffffffu, v[r], lane_j);
                    const float a = low ? v[r] : other, b = low ? other : v[r];
                    const bool swap = (a > b) == ascending;
                    v[r] = low == swap ? b : a;
                }}
            }} else {{
#pragma unroll
                for (int r = 0; r < E; ++r) {{
                    if ((r & j) == 0) {{
                        const bool ascending = ((lane * E + r) & k) == 0;
                        const float a = v[r], b = v[r + j];
                        const bool swap = (a > b) == ascending;
                        v[r] = swap ? b : a;
                        v[r + j] = swap ? a : b;
                    }}
                }}
            }}
        }}
    }}
#pragma unroll
    for (int r = 0; r < E; ++r) {{
        const int g = lane * E + r;
        if (g < n) column[ZM_PAD(g)] = v[r];
    }}
}}

// Each column's finite values sorted, a warp per column (zm_warp_sort, its network the power of
// two of 32 or more that holds the column's count), with their counts; columns of at most
// 32 ZM_E values.
extern "C" __global__ void zemosaic_warp_sort_finite_columns(
    const float* __restrict__ values, const long long row_stride, const long long col_stride,
    const int n_rows, const long long n_cols, float* __restrict__ sorted_out, int* __restrict__ counts)
{{
    __shared__ float s[ZM_COLUMNS * ZM_SLICE];
    __shared__ int count[ZM_COLUMNS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // At the edges, threads side by side take columns side by side (one memory transaction for
    // the block's columns of a row).
    const int edge_col = threadIdx.x % ZM_COLUMNS, edge_row = threadIdx.x / ZM_COLUMNS;
    const int rows_per_pass = blockDim.x / ZM_COLUMNS;
    for (long long col0 = (long long)blockIdx.x * ZM_COLUMNS; col0 < n_cols; col0 += (long long)gridDim.x * ZM_COLUMNS) {{
        if (threadIdx.x < ZM_COLUMNS) count[threadIdx.x] = 0;
        __syncthreads();
        const long long col = col0 + edge_col;
        float* slice = s + edge_col * ZM_SLICE;
        if (col < n_cols) {{
            // ZM_LOADS rows read before any is stored: the reads' latency overlaps (this pass is
            // bound by it, not by the bandwidth).
            for (int i0 = edge_row; i0 < n_rows; i0 += ZM_LOADS * rows_per_pass) {{
                float loaded[ZM_LOADS];
#pragma unroll
                for (int u = 0; u < ZM_LOADS; ++u) {{
                    const int i = i0 + u * rows_per_pass;
                    loaded[u] = i < n_rows ? values[(long long)i * row_stride + col * col_stride] : ZM_INF;
                }}
#pragma unroll
                for (int u = 0; u < ZM_LOADS; ++u) {{
                    if (isfinite(loaded[u])) {{
                        const int at = atomicAdd(&count[edge_col], 1);  // once: ZM_PAD repeats its argument
                        slice[ZM_PAD(at)] = loaded[u];
                    }}
                }}
            }}
        }}
        __syncthreads();
        const int n = count[warp];  // the same in the whole warp: so is the branch taken
        float* column = s + warp * ZM_SLICE;
        if (n <= 1) {{
        }} else if (n <= 32) {{
            zm_warp_sort<1, 5>(column, n, lane);
#if ZM_E >= 2
        }} else if (n <= 64) {{
            zm_warp_sort<2, 6>(column, n, lane);
#endif
#if ZM_E >= 4
        }} else if (n <= 128) {{
            zm_warp_sort<4, 7>(column, n, lane);
#endif
#if ZM_E >= 8
        }} else if (n <= 256) {{
            zm_warp_sort<8, 8>(column, n, lane);
#endif
#if ZM_E >= 16
        }} else if (n <= 512) {{
            zm_warp_sort<16, 9>(column, n, lane);
#endif
#if ZM_E >= 32
        }} else {{
            zm_warp_sort<32, 10>(column, n, lane);
#endif
        }}
        __syncthreads();
        if (col < n_cols) {{
            const int m = count[edge_col];
            for (int i = edge_row; i < m; i += rows_per_pass) sorted_out[(long long)i * n_cols + col] = slice[ZM_PAD(i)];
            if (threadIdx.x < ZM_COLUMNS) counts[col] = m;
        }}
        __syncthreads();
    }}
}}
"""
_warp_sort_sources: dict[int, str] = {}


def _warp_sort_columns(elems: int) -> int:
    """Columns of a block of the register sort at ``elems`` values per lane (their slices, of
    about 33 ``elems`` floats each, within :data:`_WARP_SORT_SHARED_BYTES`; 8 at most: blocks of
    256 threads, whose registers leave room for more blocks, on one H100 faster than 16)."""
    columns = 8
    while columns > 1 and columns * 4 * (32 * elems + elems + 32 + 32 // columns) > _WARP_SORT_SHARED_BYTES:
        columns //= 2
    return columns


def _warp_sort_source(elems: int) -> str:
    """:data:`_WARP_SORT_TEMPLATE` for ``elems`` values per lane (one string per size, as the
    function cache keys on the source object)."""
    source = _warp_sort_sources.get(elems)
    if source is None:
        source = _WARP_SORT_TEMPLATE.format(elems=elems, columns=_warp_sort_columns(elems))
        source = _warp_sort_sources.setdefault(elems, source)
    return source


def _sort_finite_columns_in_registers(values: Any, sorted_values: Any, counts: Any, xp: Any) -> None:
    """The register sort of columns at most :data:`FUSED_WARP_SORT_MAX_ROWS` deep (compiled for the
    launch's depth, the shared memory of its slices; each column's network fits its own count)."""
    n_rows, n_cols = (int(v) for v in values.shape)
    elems = 1
    while 32 * elems < n_rows:
        elems <<= 1
    sort = _fused_function(xp, _warp_sort_source(elems), "zemosaic_warp_sort_finite_columns")
    itemsize = values.itemsize
    columns = _warp_sort_columns(elems)
    sort(
        (min(-(-n_cols // columns), 1 << 22),), (32 * columns,),
        (values, np.int64(values.strides[0] // itemsize), np.int64(values.strides[1] // itemsize),
         np.int32(n_rows), np.int64(n_cols), sorted_values, counts),
    )


def _sorted_finite_columns(values: Any, xp: Any) -> tuple[Any, Any, Any, Any] | None:
    """The fused clipping kernels' shared first step: every column's finite values sorted (a warp
    per column in registers up to :data:`FUSED_WARP_SORT_MAX_ROWS` values, a block's shared memory
    beyond) and their counts, with empty float64 prefix-sum tables for the second kernel. ``None`` where the kernels decline: not CuPy, not 2-D float32,
    columns deeper than :data:`FUSED_SORT_MAX_ROWS` (shared memory) or nothing to sort."""
    if not is_device_module(xp) or values.ndim != 2 or values.dtype != xp.float32:
        return None
    n_rows, n_cols = (int(v) for v in values.shape)
    if n_rows < 1 or n_rows > FUSED_SORT_MAX_ROWS or n_cols == 0:
        return None
    sorted_values = xp.empty((n_rows, n_cols), dtype=xp.float32)
    counts = xp.empty(n_cols, dtype=xp.int32)
    if n_rows <= FUSED_WARP_SORT_MAX_ROWS:
        _sort_finite_columns_in_registers(values, sorted_values, counts, xp)
    else:
        _sort_finite_columns_in_shared_memory(values, sorted_values, counts, xp)
    prefix = xp.empty((n_rows + 1, n_cols), dtype=xp.float64)
    prefix_sq = xp.empty((n_rows + 1, n_cols), dtype=xp.float64)
    return sorted_values, counts, prefix, prefix_sq


def _sort_finite_columns_in_shared_memory(values: Any, sorted_values: Any, counts: Any, xp: Any) -> None:
    """The shared-memory network of :data:`_KAPPA_SIGMA_SOURCE` (one block per group of columns),
    for columns of up to :data:`FUSED_SORT_MAX_ROWS` values, each group padded to its widest count."""
    n_rows, n_cols = (int(v) for v in values.shape)
    size = 1
    while size < n_rows:
        size <<= 1
    # Adjacent columns share a block while their slices fit FUSED_SORT_GROUP_BYTES: their reads
    # and writes are then side by side in memory, and a pass of the network sorts them all.
    group = int(max(1, min(FUSED_SORT_MAX_GROUP, FUSED_SORT_GROUP_BYTES // (4 * size), n_cols)))
    threads = max(32, min(512, group * size // 2))  # at least one per column of the group (≤ 32)
    sort = _fused_function(xp, _KAPPA_SIGMA_SOURCE, "zemosaic_sort_finite_columns")
    itemsize = values.itemsize
    sort(
        (min(-(-n_cols // group), 1 << 22),), (threads,),
        (values, np.int64(values.strides[0] // itemsize), np.int64(values.strides[1] // itemsize),
         np.int32(n_rows), np.int64(n_cols), np.int32(group), np.int32(size), sorted_values, counts),
        shared_mem=4 * size * group,
    )


#: Threads per block of the per-column iteration kernels (one thread per column).
_COLUMN_BLOCK = 128


def _clip_sorted_columns(
    values: Any, kappa_low: float, kappa_high: float, iterations: int, xp: Any,
    source: str, kernel: str, out_dtype: Any, extra: tuple[Any, ...] = (),
) -> tuple[Any, Any] | None:
    """The shared sort, then one thread per column of ``kernel`` (in ``source``) writing two
    ``out_dtype`` results per column; ``extra`` are the kernel's arguments after the iteration
    count. ``None`` where the sort declines (not CuPy, columns too deep)."""
    columns = _sorted_finite_columns(values, xp)
    if columns is None:
        return None
    sorted_values, counts, prefix, prefix_sq = columns
    n_cols = int(values.shape[1])
    first, second = xp.empty(n_cols, dtype=out_dtype), xp.empty(n_cols, dtype=out_dtype)
    iterate = _fused_function(xp, source, kernel)
    iterate(
        (-(-n_cols // _COLUMN_BLOCK),), (_COLUMN_BLOCK,),
        (sorted_values, counts, np.int64(n_cols), prefix, prefix_sq, np.float64(kappa_low), np.float64(kappa_high),
         np.int32(min(int(iterations), 2**31 - 1)), *extra, first, second),
    )
    return first, second


def fused_kappa_sigma_bounds(
    values: Any, kappa_low: float, kappa_high: float, iterations: int, xp: Any
) -> tuple[Any, Any] | None:
    """Final (lower, upper) float64 bounds of every column of ``values`` (N, P) float32 on the GPU.

    The same numbers as ``stack._kappa_sigma_bounds(stack._sorted_samples(values))`` (NaN
    bounds for columns without a finite value), from two kernel launches instead of a sort and
    O(N) small calls. ``None`` when ``xp`` is not CuPy or the columns are too deep for the
    shared-memory sort (:data:`FUSED_SORT_MAX_ROWS`): the caller then runs the xp path.
    """
    return _clip_sorted_columns(values, kappa_low, kappa_high, iterations, xp, _KAPPA_SIGMA_SOURCE,
                                "zemosaic_kappa_sigma_sorted", xp.float64)


def fused_winsorized_range_values(
    values: Any, kappa_low: float, kappa_high: float, iterations: int, winsor_sigma: float, xp: Any
) -> tuple[Any, Any] | None:
    """(lowest, highest) float32 kept value of every column of ``values`` (N, P) float32 on the GPU
    after winsorized sigma clipping: the values of ``stack._winsorized_range`` at its final
    [start, stop) (+inf / −inf for a column that keeps nothing), to the bit, from two kernel
    launches instead of the xp loops (tens of small calls and a host sync per σ iteration).
    ``None`` where :func:`fused_kappa_sigma_bounds` declines (not CuPy, too deep): the caller
    then runs the xp path.
    """
    from . import stack

    extra = (np.float64(winsor_sigma), np.float64(stack.winsorized_consistency_factor(winsor_sigma)),
             np.float64(stack._WINSOR_TOLERANCE), np.float64(stack._WINSOR_COLLAPSED),
             np.int32(stack._WINSOR_MAX_ITERATIONS), np.int32(stack._MIN_SAMPLES_TO_REJECT))
    return _clip_sorted_columns(values, kappa_low, kappa_high, iterations, xp, _WINSORIZED_SOURCE,
                                "zemosaic_winsorized_sorted", xp.float32, extra)


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
    #: The last device memory reading (perf_counter time, info) for :meth:`gpu_budget_bytes`' ``max_age_s``.
    _memory_reading: tuple[float, Any] | None = field(default=None, repr=False)

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
            if not env_flag(env, variable):
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

    def gpu_budget_bytes(self, concurrent_units: int = 1, max_age_s: float = 0.0) -> int:
        """Bytes a GPU unit may plan to use now: free × safety fraction (0 when no stage is on the GPU).

        Live: asks the device, unless a reading younger than ``max_age_s`` seconds is at hand (a
        device thread sizing frame after frame: each reading is a driver call that gives the GIL
        away). Divide among ``concurrent_units`` units running at once.
        """
        if not self.any_gpu:
            return 0
        now = time.perf_counter()
        reading = self._memory_reading
        if reading is not None and max_age_s > 0.0 and now - reading[0] < max_age_s:
            info = reading[1]
        else:
            info = self.backend.free_memory(self.device_id)
            self._memory_reading = (now, info)
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
            self._memory_reading = None  # the next budget reads the device again
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
    "FUSED_SORT_MAX_ROWS",
    "fused_bilinear_control_into",
    "fused_bilinear_into",
    "fused_debayer_bilinear",
    "fused_clipped_mad_sigmas",
    "fused_column_coverage",
    "fused_combine_within_bounds",
    "fused_hot_pixel_fix",
    "fused_hot_pixel_noise",
    "fused_hot_pixel_residuals",
    "fused_kappa_sigma_bounds",
    "fused_winsorized_range_values",
    "fused_masked_row_medians",
    "fused_adaptive_moments",
    "fused_median_mad",
    "fused_median_mad_on_device",
    "fused_place_pieces",
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
    "upload_async",
    "download_async",
    "download_packed_async",
    "fused_block_means",
    "fused_decode_big_endian_16",
    "reserve_pool_block",
]

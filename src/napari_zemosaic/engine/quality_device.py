"""P2 on the GPU, beside P3: each frame's raw plane, decoded on the device for the resampling,
is measured there too, in batches (:func:`.quality.measure_planes` with CuPy).

Mosaic-First's device threads hand every raw CFA plane they decode to :meth:`DeviceMeasurer.offer`
(no copy and no wait: an event on their stream marks when the plane is ready). A thread of the
run gathers the planes into batches of up to ``MAX_BATCH_FRAMES``; each batch is one unit of
the ``quality`` stage of the run's :class:`~.gpu.ComputePolicy` (out-of-memory retries with
smaller batches, then a logged fallback to the host).

**Where a batch is measured.** By a *measuring process* with a CUDA context of its own
(:class:`MeasuringProcess`): the run's thread copies the batch's planes, device to device, into
memory the two processes share (:class:`SharedPlanes`: CUDA IPC memory; shared host memory with
NumPy) and sends the frames' names; the process measures and sends the metrics back. The run's
process keeps its GIL for P3's device thread (measured on one H100: a measuring *thread* held
the GIL 77 % of P3 and slowed it down by half, a second context beside P3 costs it about 5 %),
so the batches are measured as they fill, while P3 runs. The run starts that process before
its header pass (:func:`early_measuring_process`): its start (a CUDA context, the imports, the
measurement's kernels loaded or compiled, about 1-2 s) overlaps P1 and P3 instead of following
P3. Where no process can start (no CUDA IPC, a ``__main__`` children cannot import; logged), the
run's thread measures the batches itself, once P3 has ended when all planes fit in a share of
the budget (``HOLD_SHARE``).

:meth:`DeviceMeasurer.measure` is the ``measure`` of :func:`.quality.measure_frames`: it waits
for the end of P3 and the frame's batch, and measures on the host (:func:`.quality.measure_one`,
reading the file again) whatever never reached the device: frames read some other way, frames
P3 rejected, batches of a stage that fell back.

The metrics are those of the host's measurement of the same planes (the same code;
``tests/engine/test_detect.py`` compares the two with ``-m gpu``); the host's cores stay with
the resampling's readers and device threads instead of a pool of measuring processes.
"""

from __future__ import annotations

import importlib
import threading
import time
from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np

from .quality import FrameMetrics, _pixel_scale, _write_star_file, green_parity, measure_one, measure_planes

#: Device bytes a frame's measurement holds per sensor pixel (its raw plane, the binned image,
#: the sorted meshes, the smoothed image, labels and the stamps), for the batch size.
MEASURE_BYTES_PER_PIXEL = 32
#: Frames measured together at most: enough to amortise the launches, few enough that the last
#: partial batch, measured once P3 has finished, is short.
MAX_BATCH_FRAMES = 64
#: Share of the device budget a batch may plan for (the resampling holds the rest).
BUDGET_SHARE = 0.25
#: Without a measuring process: share of the device budget the raw planes of all frames may hold
#: until P3 has ended. Measured beside P3 in the run's process, the measuring thread's Python
#: competes with the device thread for the GIL (one H100: P3 2.5 s against 1.3-1.6 s alone), so
#: the planes wait when they fit, and are measured in batches once the device thread is done.
HOLD_SHARE = 0.25
#: Bytes per sensor pixel of the shared buffer (16-bit raw planes; wider ones go fewer at a time).
SHARED_BYTES_PER_PIXEL = 2
#: Seconds the measuring thread waits for a new measuring process to say it is ready (its
#: warm-up compiles the measurement's kernels on a machine that never ran them: ~30 s on one H100).
START_TIMEOUT_S = 180.0
#: Seconds the run waits for the measuring process to end before ending it.
CLOSE_TIMEOUT_S = 5.0


class MeasuringProcessError(RuntimeError):
    """The measuring process failed: the error it reported (its text says when it was an
    out-of-memory error, which :func:`.gpu.is_out_of_memory` reads), or its end."""


# ----------------------------------------------------------------------- memory of both processes


def plane_view(buffer: Any, n_planes: int, shape: tuple[int, ...], dtype: Any) -> Any:
    """``n_planes`` planes of ``shape`` and ``dtype`` at the start of a flat uint8 ``buffer``."""
    dtype = np.dtype(dtype)
    nbytes = n_planes * int(np.prod(shape)) * dtype.itemsize
    return buffer[:nbytes].view(dtype).reshape((n_planes, *shape))


class SharedPlanes:
    """A byte buffer the run's process writes planes into and the measuring process reads:
    device memory exported through CUDA IPC with CuPy, shared host memory with NumPy.

    :attr:`handle` (picklable) is what :func:`open_shared` takes in the other process."""

    def __init__(self, nbytes: int, xp: Any) -> None:
        from .gpu import is_device_module

        self.nbytes = int(nbytes)
        if is_device_module(xp):
            self._memory: Any = xp.cuda.Memory(self.nbytes)  # cudaMalloc: IPC exports whole allocations
            handle = xp.cuda.runtime.ipcGetMemHandle(self._memory.ptr)
            self.handle: tuple[str, Any, int] = ("cuda", bytes(handle), self.nbytes)
            self.array = xp.ndarray((self.nbytes,), dtype=xp.uint8, memptr=xp.cuda.MemoryPointer(self._memory, 0))
        else:
            from multiprocessing import shared_memory

            self._memory = shared_memory.SharedMemory(create=True, size=max(1, self.nbytes))
            self.handle = ("host", self._memory.name, self.nbytes)
            self.array = np.ndarray((self.nbytes,), dtype=np.uint8, buffer=self._memory.buf)

    def planes(self, n_planes: int, shape: tuple[int, ...], dtype: Any) -> Any:
        return plane_view(self.array, n_planes, shape, dtype)

    def capacity(self, shape: tuple[int, ...], dtype: Any) -> int:
        """How many planes of ``shape`` and ``dtype`` the buffer holds."""
        return self.nbytes // max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)

    def close(self) -> None:
        """Release the buffer (after the measuring process has let it go)."""
        self.array = None
        if isinstance(self.handle[1], str):
            self._memory.close()
            self._memory.unlink()
        self._memory = None


def open_shared(handle: tuple[str, Any, int], xp: Any) -> tuple[Any, Any]:
    """In the measuring process: ``(flat uint8 array, close)`` for a :attr:`SharedPlanes.handle`."""
    kind, key, nbytes = handle
    if kind == "cuda":
        pointer = xp.cuda.runtime.ipcOpenMemHandle(key)
        memory = xp.cuda.UnownedMemory(pointer, nbytes, None)
        array = xp.ndarray((nbytes,), dtype=xp.uint8, memptr=xp.cuda.MemoryPointer(memory, 0))
        return array, lambda: xp.cuda.runtime.ipcCloseMemHandle(pointer)
    from multiprocessing import shared_memory

    # The run's process owns the block and unlinks it; the resource tracker both processes share
    # (they descend from one) sees this process's registration of the same name as a no-op.
    shared = shared_memory.SharedMemory(name=key)
    return np.ndarray((nbytes,), dtype=np.uint8, buffer=shared.buf), shared.close


# ----------------------------------------------------------------------- the measuring process


def _warm_up(xp: Any, shape: tuple[int, int], parity: int | None) -> None:
    """Measure a synthetic star field of ``shape`` once: CuPy loads (or, on a machine that never
    ran them, compiles) the measurement's kernels and the libraries it imports are loaded here,
    before the first batch of the run waits on them (about 2 s in a new process on one H100).
    The kernels do not depend on the plane's size."""
    rng = np.random.default_rng(0)
    height, width = shape
    sky = rng.normal(1000.0, 10.0, shape)
    offsets = np.arange(-8, 9)
    star = 3000.0 * np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / 8.0)
    for x, y in zip(rng.integers(20, width - 20, 40), rng.integers(20, height - 20, 40)):
        sky[y - 8 : y + 9, x - 8 : x + 9] += star
    plane = xp.asarray(np.clip(sky, 0, 65535).astype(np.uint16)[None])
    measure_planes(plane, 1, parity, [FrameMetrics()], xp)


#: What the measuring process warms up on when the frames are not known yet: a Seestar sub.
SEESTAR_WARM_UP = ((1080, 1920), 0)


def _serve(connection: Any, device_id: int, module_name: str, warm_up: tuple[tuple[int, int], int | None] | None) -> None:
    """The measuring process. Warms up (:func:`_warm_up` on ``warm_up``, a plane shape and green
    parity, unless None) and says ``("started",)``; opens the buffer of the ``("open", handle)``
    it then receives and says ``("ready",)``; then answers each request ``(n_planes, shape,
    dtype, green parity, paths)`` about the planes at the start of the buffer with ``("ok",
    metrics)``, and each ``("stars", [(path, star file), ...])`` with ``("ok", [SHA-256 or None,
    ...])`` after writing the star lists it measured for those paths (:func:`.quality._write_star_file`;
    None: not measured here, or not written), until it receives ``None``. A failure is answered
    ``("error", text)``: at the start or the opening it ends the process, in a request the
    process goes on."""
    from .gpu import _describe, free_cupy_memory_pools, is_device_module

    xp = importlib.import_module(module_name)
    on_device = is_device_module(xp)
    with xp.cuda.Device(device_id) if on_device else nullcontext():
        if warm_up is not None:
            try:
                _warm_up(xp, *warm_up)
            except Exception as exc:  # the run measures in its own process instead
                connection.send(("error", _describe(exc, "the measurement's warm-up failed")))
                return
        connection.send(("started",))
        message = connection.recv()
        if message is None:
            return
        try:
            buffer, close = open_shared(message[1], xp)
        except Exception as exc:  # no CUDA IPC here: the run measures in its own process
            connection.send(("error", _describe(exc, "the shared planes could not be opened")))
            return
        connection.send(("ready",))
        measured: dict[str, FrameMetrics] = {}  # by path, for the star files asked for later
        try:
            while True:
                request = connection.recv()
                if request is None:
                    return
                if request[0] == "stars":
                    connection.send(("ok", _write_star_files(measured, request[1])))
                    continue
                n_planes, shape, dtype, parity, paths = request
                try:
                    metrics = [FrameMetrics(path=path) for path in paths]
                    measure_planes(plane_view(buffer, n_planes, shape, dtype), 1, parity, metrics, xp)
                    measured.update(zip(paths, metrics))
                    reply: tuple[Any, ...] = ("ok", metrics)
                except Exception as exc:  # reported to the run, whose policy retries or falls back
                    reply = ("error", _describe(exc))
                    if on_device:
                        free_cupy_memory_pools(device_id)
                connection.send(reply)
        finally:
            buffer = None
            close()


def _write_star_files(measured: dict[str, FrameMetrics], files: Sequence[tuple[str, str]]) -> list[str | None]:
    """The star lists of ``measured`` frames written to their files (``(path, star file)`` pairs):
    each file's SHA-256, or None where the frame was not measured here or was not written."""
    from pathlib import Path

    return [None if path not in measured else _write_star_file(Path(star_file), measured[path])
            for path, star_file in files]


class MeasuringProcess:
    """A measuring process (:func:`_serve`) and the buffer it reads the planes from.

    Started (and warming up) at once; :meth:`attach` waits for it and gives it its buffer.
    ``module_name``: the array module both sides use (``cupy``, or ``numpy`` for the host
    stand-in); ``warm_up``: see :func:`_serve`."""

    def __init__(self, device_id: int, module_name: str, warm_up: tuple[tuple[int, int], int | None] | None = None) -> None:
        from .worker_env import process_context

        self._module_name = module_name
        self.shared: SharedPlanes | None = None
        self._closed = self._stopped = False
        self._lock = threading.Lock()
        context = process_context()
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, int(device_id), module_name, warm_up), name="zemosaic-quality-gpu", daemon=True
        )
        self._start_error: BaseException | None = None
        # Process.start() waits for the forkserver, which imports the engine and CuPy when it is
        # new (a second or more in a new program): the run's thread goes on with the header
        # pass meanwhile, whose own readers wait for the same server on a thread too.
        self._starter = threading.Thread(target=self._start, args=(child,), name="zemosaic-quality-start", daemon=True)
        self._starter.start()

    def _start(self, child: Any) -> None:
        try:
            self._process.start()
        except BaseException as exc:  # given to the caller of attach(), which falls back
            self._start_error = exc
        finally:
            child.close()

    def _wait_started(self, timeout_s: float) -> None:
        self._starter.join(timeout_s)
        if self._starter.is_alive():
            raise MeasuringProcessError(f"the measuring process was not started within {timeout_s:g} s")
        if self._start_error is not None:
            error = self._start_error
            raise MeasuringProcessError(f"the measuring process did not start: {type(error).__name__}: {error}")

    def attach(self, nbytes: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait (at most ``timeout_s``) for the process to have started, then give it a buffer of
        ``nbytes`` (:attr:`shared`); raises :class:`MeasuringProcessError`."""
        began = time.monotonic()
        self._wait_started(timeout_s)
        if not self._connection.poll(max(0.0, timeout_s - (time.monotonic() - began))):
            raise MeasuringProcessError(f"the measuring process was not ready within {timeout_s:g} s")
        reply = self._receive()
        if reply[0] != "started":
            raise MeasuringProcessError(reply[1])
        self._open(SharedPlanes(nbytes, importlib.import_module(self._module_name)))

    def _open(self, shared: SharedPlanes) -> None:
        self.shared = shared
        self._ask(("open", shared.handle), "ready")

    def _ask(self, message: Any, expected: str) -> Any:
        """Send ``message`` and return the answer's payload when it is ``(expected, ...)``; raises
        :class:`MeasuringProcessError` with the process's error text, or when it has ended."""
        with self._lock:
            try:
                self._connection.send(message)
            except OSError as exc:
                raise MeasuringProcessError(f"the measuring process ended: {type(exc).__name__}") from None
            reply = self._receive()
        if reply[0] != expected:
            raise MeasuringProcessError(reply[1])
        return reply[1] if len(reply) > 1 else None

    def _receive(self) -> tuple[Any, ...]:
        try:
            return self._connection.recv()
        except (EOFError, OSError) as exc:
            raise MeasuringProcessError(
                f"the measuring process ended (exit code {self._process.exitcode}): {type(exc).__name__}"
            ) from None

    def measure(self, n_planes: int, shape: tuple[int, ...], dtype: Any, parity: int | None,
                paths: Sequence[str]) -> list[FrameMetrics]:
        """Metrics of the first ``n_planes`` planes of the shared buffer (written and synchronised
        by the caller), one per path; raises :class:`MeasuringProcessError`."""
        return self._ask((n_planes, tuple(shape), np.dtype(dtype).str, parity, list(paths)), "ok")

    def write_star_files(self, files: Sequence[tuple[str, str]]) -> list[str | None]:
        """Have the process write the star lists it measured: ``(path, star file)`` pairs in, each
        file's SHA-256 (None: not measured there, or not written) out; raises
        :class:`MeasuringProcessError`."""
        return self._ask(("stars", [(str(path), str(star_file)) for path, star_file in files]), "ok")

    def stop(self, wait: bool = True) -> None:
        """Tell the process to end once its current request is answered (waiting at most
        ``CLOSE_TIMEOUT_S`` for it; not at all without ``wait``: a request in flight then keeps
        it up), without waiting for its end: :meth:`close` does."""
        if self._stopped or not self._process.is_alive():
            return
        if self._lock.acquire(timeout=CLOSE_TIMEOUT_S) if wait else self._lock.acquire(blocking=False):
            try:
                self._connection.send(None)
                self._stopped = True
            except OSError:
                pass
            finally:
                self._lock.release()

    def close(self) -> None:
        """End the process (waiting for a batch it measures, at most ``CLOSE_TIMEOUT_S``; at once
        when it was never attached), then release the buffer. Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        self._starter.join(START_TIMEOUT_S)
        if self._process.is_alive():
            if self.shared is not None:
                self.stop()
                self._process.join(CLOSE_TIMEOUT_S)
            # Never given its buffer (a run that failed or measured elsewhere), it holds nothing
            # of the run's: not waiting for its warm-up, which on a machine that never ran the
            # measurement compiles its kernels for many seconds.
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
        self._connection.close()
        if self.shared is not None:
            self.shared.close()


def early_measuring_process(config: dict[str, Any], policy: Any, scheduler: Any) -> MeasuringProcess | None:
    """A measuring process started (and warming up on a Seestar sub) before the header pass, for
    the run whose P2 will likely measure on the device beside P3: Mosaic-First asked for (or
    ``auto`` without SDS), the GPU resampling and measuring, no scheduler. Its start then
    overlaps P1 instead of P3. None otherwise, or where none can start (the measurer then
    starts its own, or measures in the run's process)."""
    from .gpu import is_device_module
    from .mosaic_first import _main_module_is_importable

    if policy is None or scheduler is not None or config.get("quality_beside_reprojection", "auto") == "off":
        return None
    if config.get("workflow") not in ("mosaic_first", "auto") or (config.get("workflow") == "auto" and config.get("sds_mode")):
        return None
    if not (policy.uses_gpu("reproject") and policy.uses_gpu("quality")):
        return None
    if not is_device_module(policy.backend.array_module()) or not _main_module_is_importable():
        return None
    try:
        return MeasuringProcess(policy.device_id, "cupy", SEESTAR_WARM_UP)
    except Exception as exc:  # no process: the measurer decides again, and says why
        if getattr(policy, "reporter", None) is not None:
            policy.reporter.debug("quality_debug_no_measuring_process", reason=f"{type(exc).__name__}: {exc}")
        return None


# ----------------------------------------------------------------------- the run's side


class DeviceMeasurer:
    """Measures on the device the raw planes P3's device threads offer; see the module docstring.

    ``separate_process``: measure in a measuring process when one starts (else, or when False,
    in the run's process); ``process``: one started already (:func:`early_measuring_process`),
    which the measurer uses and, in :meth:`close`, tells to end."""

    def __init__(self, frames: Sequence[Any], policy: Any, separate_process: bool = True,
                 process: MeasuringProcess | None = None) -> None:
        self._policy = policy
        self._frames = list(frames)
        self._slot = {id(info): index for index, info in enumerate(self._frames)}
        self._results: dict[int, FrameMetrics] = {}
        self._ready = [threading.Event() for _ in self._frames]
        self._pending: list[tuple[int, Any, Any]] = []  # (frame index, raw plane, ready event)
        self._pending_bytes = 0
        #: Planes beyond this many device bytes waiting are not kept (their frames are measured
        #: on the host): a measurement that falls behind P3 never takes P3's memory.
        self._pending_limit = HOLD_SHARE * policy.gpu_budget_bytes()
        self._closed = False
        self._final_batch = False
        #: Set once the last planes are on their way to the measuring process (or the measuring
        #: thread has ended): P2's digestion of the metrics and the run's threads that wait for
        #: it start then, so their pure Python does not hold up that last hand-over.
        self._handed_over = threading.Event()
        self._abandoned = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._separate = separate_process
        self._started = process
        self._process: MeasuringProcess | None = None
        #: Seconds the measuring thread spent on batches, how many, where (``run``: this process,
        #: ``process``: a measuring process), and the planes not kept for want of device memory
        #: (``left_to_host``: measured on the host). Logged as ``quality_debug_device``.
        self.timing: dict[str, Any] = {"batches": 0, "frames": 0, "measure_s": 0.0, "where": "run", "left_to_host": 0}
        self._thread = threading.Thread(target=self._work, name="zemosaic-quality-gpu", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- P3's side

    def offer(self, info: Any, plane: Any, xp: Any) -> None:
        """A device thread's freshly decoded raw plane ``(H, W)`` or ``(1, H, W)`` of ``info``, still
        being written on its stream: recorded with an event, measured later. Anything but an integer CFA plane
        of a frame of this run is left to the host."""
        index = self._slot.get(id(info))
        if index is None or getattr(info, "layout", "") != "cfa" or not getattr(info, "bayer_pattern", None):
            return
        if plane.ndim == 3 and plane.shape[0] == 1:
            plane = plane[0]
        if plane.ndim != 2 or np.dtype(plane.dtype).kind not in "ui":
            return
        ready = xp.cuda.Event(disable_timing=True)
        ready.record()
        with self._changed:
            if self._closed:
                return
            if self._pending_bytes + plane.nbytes > self._pending_limit:
                self.timing["left_to_host"] += 1
                return
            self._pending.append((index, plane, ready))
            self._pending_bytes += plane.nbytes
            self._changed.notify()

    def finish(self) -> None:
        """No more planes will come (P3 has ended): the last batch is measured now."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def wait_handed_over(self, timeout: float | None = None) -> bool:
        """Wait until the last planes have been handed to the measuring process, or the
        measuring thread has ended (after :meth:`finish`); False if ``timeout`` passed first."""
        return self._handed_over.wait(timeout)

    def close(self) -> None:
        """After P5, or at the run's failure: frames still waited for are given up (no host
        measurement starts any more) and the measuring thread is joined. A process this measurer
        started is ended; the one started for it (``process``) is told to end (once it has
        written the star files it is writing, :meth:`write_star_files`), and the run joins it
        after writing its outputs. (The process stays up through P4.5 and P5, idle, so that the
        teardown of its context and memory does not fall in them.)"""
        self._abandoned = True
        self.finish()
        self._thread.join()
        if self._started is not None:
            self._started.stop(wait=False)  # star files it may be writing: the run closes it later
        elif self._process is not None:
            self._process.close()

    # ----------------------------------------------------------------- P2's side

    def measure(self, info: Any) -> FrameMetrics:
        """``info``'s metrics: from the device once P3 has ended and its batch is done, else
        measured on the host. (What P2's thread does with each frame's metrics holds the run's
        GIL: it waits until P3's device thread is done with it, and the last planes have been
        handed over.)"""
        index = self._slot[id(info)]
        self._handed_over.wait()
        self._ready[index].wait()
        if self._error is not None:  # a strict run's GPU error, or a bug: the run fails with it
            raise self._error
        metrics = self._results.pop(index, None)
        if metrics is None:
            return FrameMetrics(path=str(info.path)) if self._abandoned else measure_one(info)
        scale = _pixel_scale(info)
        if scale and np.isfinite(metrics.fwhm_px):
            metrics.fwhm_arcsec = metrics.fwhm_px * scale
        return metrics

    def write_star_files(self, files: dict[int, Any]) -> dict[int, str]:
        """The star lists of frames (index -> star file) written by the measuring process that
        measured them, off this process's GIL (500 small files held the run's GIL about 1 s
        beside P5 and P6 on one H100 host): index -> SHA-256 of each file written. Frames it did
        not measure, or every frame when there is no such process or it fails, are left out
        (the caller writes them). Waits for the measuring thread's end."""
        self._thread.join()
        process = self._process
        if process is None or not files:
            return {}
        indices = list(files)
        try:
            digests = process.write_star_files([(str(self._frames[i].path), files[i]) for i in indices])
        except MeasuringProcessError:
            return {}
        finally:
            if self._abandoned and self._started is not None:  # closed meanwhile: end it now
                self._started.stop(wait=False)
        return {index: digest for index, digest in zip(indices, digests) if digest is not None}

    # ----------------------------------------------------------------- the measuring thread

    def _work(self) -> None:
        try:
            with self._policy.device():
                batch_frames = self._batch_frames(1.0)
                if self._separate or self._started is not None:
                    self._process = self._start_process(batch_frames)
                held = self._process is None and self._raw_bytes() <= HOLD_SHARE * self._policy.gpu_budget_bytes()
            while True:
                with self._changed:
                    while not self._closed and (held or len(self._pending) < batch_frames):
                        self._changed.wait()
                    # At most one batch at a time: the planes that came in meanwhile wait for the
                    # next, rather than make a short part of their own (a part costs about 37 ms
                    # beside its frames' 1.5 ms each on one H100: 12 parts instead of 8 for 500 frames).
                    batch = self._pending if held else self._pending[:batch_frames]
                    self._pending = self._pending[len(batch):]
                    self._pending_bytes = sum(item[1].nbytes for item in self._pending)
                    self._final_batch = self._closed and not self._pending  # no plane is offered once closed
                    if not batch and self._closed:
                        return
                if self._abandoned:
                    return
                self._measure(batch)
        except BaseException as exc:  # raised again by measure(), in P2's thread
            self._error = exc
        finally:
            reporter = getattr(self._policy, "reporter", None)
            if reporter is not None and (self.timing["batches"] or self.timing["left_to_host"]):
                reporter.debug("quality_debug_device", **{**self.timing, "measure_s": round(self.timing["measure_s"], 2)})
            for ready in self._ready:  # whatever was not measured here is measured on the host
                ready.set()
            self._handed_over.set()

    def _start_process(self, batch_frames: int) -> MeasuringProcess | None:
        """The measuring process (the one started early, else a new one), given its buffer; or
        None (logged) where none starts."""
        from .gpu import _describe, is_device_module
        from .mosaic_first import _main_module_is_importable

        reason = None
        if not is_device_module(self._policy.backend.array_module()):
            reason = "the run's array module is not CuPy"
        elif self._started is None and not _main_module_is_importable():
            reason = "child processes cannot import this program's __main__"
        else:
            shaped = [info for info in self._frames if getattr(info, "shape", None)]
            pixels = max((int(np.prod(info.shape[-2:])) for info in shaped), default=1080 * 1920)
            process = self._started
            try:
                if process is None:
                    warm_up = (tuple(shaped[0].shape[-2:]), green_parity(shaped[0].bayer_pattern)) if shaped else None
                    process = MeasuringProcess(self._policy.device_id, "cupy", warm_up)
                process.attach(batch_frames * pixels * SHARED_BYTES_PER_PIXEL)
            except Exception as exc:  # no CUDA IPC, no process: the run's thread measures
                reason = _describe(exc)
                if process is not None:
                    process.close()
            else:
                self.timing["where"] = "process"
                return process
        reporter = getattr(self._policy, "reporter", None)
        if reporter is not None:
            reporter.debug("quality_debug_no_measuring_process", reason=reason)
        return None

    def _raw_bytes(self) -> int:
        """Device bytes of every frame's raw 16-bit plane."""
        return sum(2 * int(np.prod(info.shape[-2:])) for info in self._frames if getattr(info, "shape", None))

    def _batch_frames(self, chunk_scale: float) -> int:
        shape = next((info.shape for info in self._frames if getattr(info, "shape", None)), (1080, 1920))
        per_frame = MEASURE_BYTES_PER_PIXEL * int(np.prod(shape[-2:]))
        allowed = self._policy.gpu_budget_bytes() * BUDGET_SHARE * chunk_scale
        return int(min(MAX_BATCH_FRAMES, max(1, allowed // per_frame)))

    def _measure(self, batch: list[tuple[int, Any, Any]]) -> None:
        groups: dict[tuple[Any, ...], list[tuple[int, Any, Any]]] = {}
        for item in batch:
            info = self._frames[item[0]]
            parity = green_parity(info.bayer_pattern)
            groups.setdefault((item[1].shape, item[1].dtype.str, parity), []).append(item)
        for (_, _, parity), members in groups.items():
            started = time.perf_counter()
            results = self._policy.run_stage(
                "quality",
                lambda xp, chunk_scale: self._on_device(members, parity, xp, chunk_scale),
                lambda xp=np: {},  # the host measures these frames from their files (measure)
            )
            self.timing["measure_s"] += time.perf_counter() - started
            self.timing["batches"] += 1
            self.timing["frames"] += len(results)
            for index, metrics in results.items():
                self._results[index] = metrics
            for index, _, _ in members:
                self._ready[index].set()

    def _on_device(self, members: list[tuple[int, Any, Any]], parity: int | None, xp: Any, chunk_scale: float) -> dict[int, FrameMetrics]:
        """Metrics of planes of one shape, type and parity, by the measuring process or here."""
        stream = xp.cuda.Stream(non_blocking=True)
        results: dict[int, FrameMetrics] = {}
        size = self._batch_frames(chunk_scale)
        if self._process is not None:
            size = min(size, self._process.shared.capacity(members[0][1].shape, members[0][1].dtype))
        with stream:
            for _, _, ready in members:
                stream.wait_event(ready)
            for start in range(0, len(members), max(1, size)):
                part = members[start : start + max(1, size)]
                metrics = self._measure_part(part, parity, xp, stream)
                results.update({index: metric for (index, _, _), metric in zip(part, metrics)})
        stream.synchronize()
        return results

    def _measure_part(self, part: list[tuple[int, Any, Any]], parity: int | None, xp: Any, stream: Any) -> list[FrameMetrics]:
        paths = [str(self._frames[index].path) for index, _, _ in part]
        planes = [plane for _, plane, _ in part]
        process = self._process
        if process is None or process.shared.capacity(planes[0].shape, planes[0].dtype) < len(planes):
            metrics = [FrameMetrics(path=path) for path in paths]
            measure_planes(xp.stack(planes), 1, parity, metrics, xp)
            return metrics
        xp.stack(planes, out=process.shared.planes(len(planes), planes[0].shape, planes[0].dtype))
        stream.synchronize()  # the other process reads the buffer next
        if self._final_batch:
            self._handed_over.set()
        return process.measure(len(planes), planes[0].shape, planes[0].dtype, parity, paths)

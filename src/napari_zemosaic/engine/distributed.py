"""Scale-out: the run's work units on a Dask cluster (optional ``distributed`` extra).

Choice (config ``scheduler``, CLI ``--scheduler``, the Run widget)
-----------------------------------------------------------------
``none``              everything in this process (the default; no Dask import at all).
``local``             a :class:`distributed.LocalCluster` of worker *processes* started for the
                      run and stopped after it: ``scheduler_workers`` workers (0 = one per GPU
                      when the run uses the GPU, else one per CPU core), ``scheduler_threads_per_worker``
                      threads each, ``scheduler_memory_limit_mb`` each (0 = the machine's memory
                      shared between the workers).
``tcp://HOST:PORT``   an existing cluster (``dask scheduler`` / ``dask worker``); its workers must
                      see the run's cache folder at the same path (a shared file system), and
                      should be started with ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=
                      "{'MALLOC_TRIM_THRESHOLD_': None}"`` (see :func:`_worker_environment`).
``inline``            the distributed code path without Dask: units run in this process, one by
                      one, when their result is asked for (tests, and a check that a cluster run
                      and a plain run agree).

Without the ``distributed`` extra, ``local`` and addresses stop the run with a message that
says how to install it (``pip install 'napari-zemosaic[distributed]'``).

What runs where
---------------
A *unit* is a top-level function ``fn(reporter, *args)`` of picklable arguments (frame
descriptions with their WCS, canvas grids, the config dict, cache paths) that writes its large
output into the run's cache folder and returns small metadata. These kinds are submitted:

* ``solve`` — one direct plate solve of a frame without WCS (:func:`solve_frame_task`; the
  solver's clustering, star detection and WCS propagation stay in the run's process);
* ``metrics`` — one frame's quality metrics (:func:`measure_frame_task`, the per-frame work of the
  quality filter; :func:`.quality.measure_frames` keeps the order, progress and transparency);
* ``reproject`` — one Mosaic-First frame (:func:`reproject_frame_task`): its pieces are written
  to the shared spill folder and adopted by the run;
* ``megatile`` — one SDS batch (:func:`megatile_task`, around :func:`.sds.build_megatile`);
* ``master_tile`` — one classic pointing group (:func:`master_tile_task`, around
  :func:`.classic.build_master_tile`; a finished tile in the cache is reused as without Dask);
* ``block`` — one Mosaic-First canvas block (:func:`stack_block_task`): the piece store is forced
  to spill to the cache, each task reads its block's spill file and writes the stacked block
  next to it;
* ``sds_block`` — one block of the SDS final stack (:func:`sds_block_task`): it reads the windows of
  the mega-tile files it needs and writes the stacked block to the cache.

Reductions stay in the run's process and stay streaming: the photometric solves work on the
coarse block means the units return, the final stacks read the unit files window by window.
Still in the run's process: the header pass (P1: its FrameInfo, WCS included, would cost as
much to send back as to build), star detection for the solver, the mega-tile/tile photometry
and the final classic assembly. On a ``local`` cluster of GPU workers the quality metrics also stay
in the run's own worker processes (:func:`measures_in_run_process`).

Events, failures, determinism
-----------------------------
Each unit runs with its own :class:`~napari_zemosaic.events.Reporter`; its log events travel
back with the result and are emitted on the run's reporter, so the CLI, the log file and napari
see them. Results are taken in submission order (progress counts units in that order), so the
mosaic is the same whatever the number of workers and whichever finishes first. While waiting the
run checks its cancel request every :data:`POLL_S` seconds; cancelling (or any error) cancels the
run's outstanding tasks. A unit that raises is retried ``scheduler_retries`` times; a worker that
dies has its tasks rescheduled by Dask on the others. Every attempt is counted in a small file of
the cache (``scheduler/attempts``), so the report says how many retries a unit needed.
``run_report.json`` → ``scheduler``: ``{kind, address, workers, threads_per_worker,
memory_limit_mb, gpus, gpu_resource, tasks: [{key, kind, worker, pid, seconds, cpu_seconds, retries, status,
reason, phases}]}`` (``seconds``: the unit's wall time on its worker; ``cpu_seconds``: its worker
process's CPU time meanwhile; ``phases``: the unit's own phase timings, e.g. a mega-tile's P3/P4.5/P5).

GPUs
----
With a GPU run on a ``local`` cluster there is one worker per device; a worker plugin pins
worker *i* to device *i* (the unit's config gets ``gpu_device_id``) and each unit builds its own
:class:`~.gpu.ComputePolicy`, so the GPU policy (decisions, OOM retries, CPU fallbacks) applies
inside each worker. Each such worker offers one ``GPU`` resource and the GPU unit kinds
(:data:`GPU_UNIT_KINDS`) ask for it, so a worker runs one GPU unit at a time while its other
threads (by default the host's cores shared between the workers) serve that unit's readers;
workers of an external cluster started with ``--resources GPU=1`` are used the same way. Workers of an external cluster are pinned by ``ZEMOSAIC_WORKER_GPU_DEVICE``
in their environment (e.g. set by the script that starts them), else they use ``gpu_device_id``.
"""

from __future__ import annotations

import abc
import importlib.util
import os
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Sequence

import numpy as np

from ..events import Event, LogEvent, Reporter

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext

#: Seconds between two checks of the cancel request while a unit is awaited.
POLL_S = 0.2
#: The Dask worker resource a GPU worker offers (one per device) and GPU units ask for.
GPU_RESOURCE = "GPU"
#: Unit kinds that hold a GPU while they run (when the run uses the GPU).
GPU_UNIT_KINDS = frozenset({"reproject", "block", "megatile", "master_tile", "sds_block"})
#: How long a run waits for an external scheduler to answer.
CONNECT_TIMEOUT_S = 20.0
#: Install hint shown when the ``distributed`` extra is missing.
INSTALL_HINT = "pip install 'napari-zemosaic[distributed]'"
#: Environment variable that pins a worker of an external cluster to a CUDA device.
WORKER_GPU_ENV = "ZEMOSAIC_WORKER_GPU_DEVICE"
#: Test hook (config key): the unit with this key kills its own worker process on its first
#: attempt (``os.kill(getpid(), SIGKILL)``), i.e. a worker dies in the middle of a task.
KILL_WORKER_HOOK = "_scheduler_kill_worker_in_task"

SCHEDULER_NONE, SCHEDULER_LOCAL, SCHEDULER_INLINE = "none", "local", "inline"


def distributed_available() -> bool:
    """Whether ``dask.distributed`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("distributed") is not None and importlib.util.find_spec("dask") is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


def check_scheduler(value: Any) -> str:
    """Config check of ``scheduler``: ``none``, ``local``, ``inline`` or a scheduler address."""
    from ..config import scheduler_choice

    return scheduler_choice(value)


# ------------------------------------------------------------------------------ task records


@dataclass
class TaskRecord:
    """One unit as ``run_report.json`` lists it."""

    key: str
    kind: str
    worker: str | None = None
    pid: int | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None
    retries: int = 0
    status: str = "pending"  # pending | ok | failed | cancelled
    reason: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # the unit's own phase timings (its P3, P4.5, P5…)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "kind": self.kind, "worker": self.worker, "pid": self.pid,
            "seconds": None if self.seconds is None else round(float(self.seconds), 4),
            "cpu_seconds": None if self.cpu_seconds is None else round(float(self.cpu_seconds), 4),
            "retries": int(self.retries), "status": self.status, "reason": self.reason,
            "phases": {phase: round(float(value), 4) for phase, value in self.phases.items()},
        }  # fmt: skip


@dataclass
class UnitResult:
    """What a task sends back: the unit's (small) value, where and how long it ran, its log."""

    value: Any
    seconds: float
    worker: str
    pid: int
    attempt: int
    events: list[LogEvent] = field(default_factory=list)
    cpu_seconds: float = 0.0  # CPU time of the worker process while the unit ran (all its threads)
    phases: dict[str, float] = field(default_factory=dict)  # timings of the unit's RunContext, if it made one


# ------------------------------------------------------------------------- worker-side state

_PINNED_DEVICE: int | None = None  # this worker process's CUDA device (set by the GPU plugin)
_UNIT = threading.local()  # .ctx: the RunContext of the unit running in this thread (its timings)


def worker_gpu_device() -> int | None:
    """The CUDA device this worker is pinned to (plugin, else ``ZEMOSAIC_WORKER_GPU_DEVICE``), or ``None``."""
    if _PINNED_DEVICE is not None:
        return _PINNED_DEVICE
    value = os.environ.get(WORKER_GPU_ENV, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        return None


def pin_worker_device(worker: Any, n_devices: int) -> int:
    """Pin this worker process to CUDA device ``(worker number) mod n_devices`` (local clusters name
    their workers 0, 1, …; a restarted worker keeps its name, hence its device)."""
    global _PINNED_DEVICE
    try:
        number = int(str(worker.name).rsplit("-", 1)[-1])
    except ValueError:
        number = 0
    _PINNED_DEVICE = number % max(1, int(n_devices))
    return _PINNED_DEVICE


def gpu_pin_plugin(n_devices: int) -> Any:
    """A ``distributed.WorkerPlugin`` that pins each worker to its GPU (:func:`pin_worker_device`)."""
    from distributed import WorkerPlugin

    class GpuPinPlugin(WorkerPlugin):
        name = "napari-zemosaic-gpu-pin"

        def __init__(self, devices: int) -> None:
            self.devices = devices

        def setup(self, worker: Any) -> None:
            from napari_zemosaic.engine.distributed import pin_worker_device

            pin_worker_device(worker, self.devices)

    return GpuPinPlugin(n_devices)


def _worker_identity() -> tuple[str, int, int | None, int | None]:
    """(address or a local name, pid, memory limit in bytes, threads) of the process running a task."""
    try:
        from distributed import get_worker

        worker = get_worker()
        limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        threads = getattr(getattr(worker, "state", None), "nthreads", None) or getattr(worker, "nthreads", None)
        return str(worker.address), os.getpid(), int(limit) if limit else None, int(threads) if threads else None
    except Exception:  # not inside a Dask worker: the inline executor
        return "inline", os.getpid(), None, None


def _count_attempt(attempts_dir: str | None, key: str) -> int:
    """Append one byte to the unit's attempt file; the file size is the attempt number."""
    if not attempts_dir:
        return 1
    path = Path(attempts_dir) / f"{key}.attempts"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as handle:
            handle.write(b".")
            return int(handle.tell())
    except OSError:  # an unwritable cache only loses the retry count
        return 1


def attempts_of(attempts_dir: str | None, key: str) -> int:
    if not attempts_dir:
        return 1
    try:
        return max(1, (Path(attempts_dir) / f"{key}.attempts").stat().st_size)
    except OSError:
        return 1


def run_unit(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], meta: dict[str, Any]) -> UnitResult:
    """Task body on a worker: count the attempt, run ``fn(reporter, *args, **kwargs)``, time it."""
    attempt = _count_attempt(meta.get("attempts_dir"), meta["token_key"])
    if meta.get("kill_worker") and attempt == 1:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        time.sleep(30)  # pragma: no cover - the signal ends the process
    worker, pid, _, _ = _worker_identity()
    reporter = Reporter()
    _UNIT.ctx = None
    started, cpu_started = time.perf_counter(), time.process_time()
    value = fn(reporter, *args, **kwargs)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    unit_ctx, _UNIT.ctx = getattr(_UNIT, "ctx", None), None
    phases = dict(unit_ctx.timings_s) if unit_ctx is not None else {}
    return UnitResult(value, seconds, worker, pid, attempt, list(reporter.log_events), cpu_seconds, phases)


# --------------------------------------------------------------------------------- executors


class UnitExecutor(abc.ABC):
    """Where units run: :class:`InlineExecutor` (this process) or :class:`DaskExecutor`."""

    kind = "inline"
    address: str | None = None

    def __init__(self, cache_dir: Path, retries: int = 0) -> None:
        self.cache_dir = Path(cache_dir)
        self.retries = max(0, int(retries))
        self.token = uuid.uuid4().hex[:8]
        self.report: dict[str, Any] = {
            "kind": self.kind, "address": self.address, "workers": 1, "threads_per_worker": 1,
            "memory_limit_mb": None, "gpus": 0, "tasks": [],
        }  # fmt: skip
        self._lock = threading.Lock()

    @property
    def attempts_dir(self) -> str:
        return str(self.cache_dir / "scheduler" / "attempts")

    def dask_key(self, key: str) -> str:
        return f"zemosaic-{self.token}-{key}"

    @abc.abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any, key: str, kind: str, config: dict | None = None,
               **kwargs: Any) -> Any:  # fmt: skip
        """Start ``fn(reporter, *args)`` as unit ``key``; returns a handle."""

    @abc.abstractmethod
    def done(self, handle: Any, timeout: float) -> bool:
        """Whether the unit has finished, waiting at most ``timeout`` seconds."""

    @abc.abstractmethod
    def outcome(self, handle: Any) -> UnitResult:
        """The unit's result; raises the unit's exception when it failed (after its retries)."""

    def cancel(self, handles: Sequence[Any]) -> None:
        pass

    def as_completed(self, handles: Sequence[Any]) -> Iterator[Any]:
        """Handles in the order they finish (inline: in submission order)."""
        yield from handles

    def record(self, record: TaskRecord) -> None:
        with self._lock:
            self.report["tasks"].append(record.to_dict())

    def worker_pids(self) -> dict[str, int]:
        return {"inline": os.getpid()}

    def close(self) -> None:
        pass

    def _meta(self, key: str, config: dict | None) -> dict[str, Any]:
        hook = (config or {}).get(KILL_WORKER_HOOK)
        return {"token_key": self.dask_key(key), "attempts_dir": self.attempts_dir,
                "kill_worker": hook is not None and str(hook) == key}  # fmt: skip


class InlineExecutor(UnitExecutor):
    """Units run in this process when their result is asked for (no Dask)."""

    kind = "inline"

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, kind: str, config: dict | None = None,
               **kwargs: Any) -> Any:  # fmt: skip
        meta = self._meta(key, config)
        meta["kill_worker"] = False  # never kill the run's own process
        return {"fn": fn, "args": args, "kwargs": kwargs, "meta": meta, "result": None, "error": None, "ran": False}

    def done(self, handle: Any, timeout: float) -> bool:
        return True

    def outcome(self, handle: Any) -> UnitResult:
        if not handle["ran"]:
            handle["ran"] = True
            for _ in range(self.retries + 1):
                try:
                    handle["result"], handle["error"] = run_unit(handle["fn"], handle["args"], handle["kwargs"],
                                                                 handle["meta"]), None
                    break
                except Exception as exc:  # retried like on a cluster
                    handle["error"] = exc
        if handle["error"] is not None:
            raise handle["error"]
        return handle["result"]


class DaskExecutor(UnitExecutor):
    """Units as ``distributed`` futures (``retries``; dead workers' tasks are rescheduled by Dask)."""

    def __init__(self, client: Any, cluster: Any, cache_dir: Path, retries: int, kind: str, gpus: int = 0) -> None:
        self.kind = kind
        self.client = client
        self.cluster = cluster
        self.address = str(client.scheduler.address) if client.scheduler is not None else None
        super().__init__(cache_dir, retries)
        info = client.scheduler_info()
        workers = info.get("workers", {})
        self.report.update({
            "kind": kind,
            "address": self.address,
            "workers": len(workers),
            "threads_per_worker": max((w.get("nthreads", 1) for w in workers.values()), default=1),
            "memory_limit_mb": min((int(w.get("memory_limit") or 0) // 2**20 for w in workers.values()), default=None),
            "gpus": gpus,
        })
        # Workers that offer the GPU resource (a local GPU cluster, or `dask worker --resources GPU=1`)
        # take the GPU units one at a time each; their other threads stay free for CPU work.
        self.gpu_resource = any(GPU_RESOURCE in (w.get("resources") or {}) for w in workers.values())
        self.report["gpu_resource"] = self.gpu_resource

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, kind: str, config: dict | None = None,
               **kwargs: Any) -> Any:  # fmt: skip
        resources = {GPU_RESOURCE: 1} if self.gpu_resource and kind in GPU_UNIT_KINDS and _uses_gpu(config) else None
        return self.client.submit(run_unit, fn, args, kwargs, self._meta(key, config), key=self.dask_key(key),
                                  retries=self.retries, pure=False, resources=resources)  # fmt: skip

    def done(self, handle: Any, timeout: float) -> bool:
        from distributed import wait

        try:
            wait([handle], timeout=timeout)
        except Exception:  # the wait timed out
            pass
        return bool(handle.done())

    def outcome(self, handle: Any) -> UnitResult:
        return handle.result()

    def cancel(self, handles: Sequence[Any]) -> None:
        pending = [h for h in handles if not h.done()]
        if pending:
            try:
                self.client.cancel(pending)
            except Exception:  # the client is already closing
                pass

    def as_completed(self, handles: Sequence[Any]) -> Iterator[Any]:
        from distributed import as_completed

        yield from as_completed(list(handles))

    def worker_pids(self) -> dict[str, int]:
        return dict(self.client.run(os.getpid))

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


# ------------------------------------------------------------------------------- opening one


def _uses_gpu(config: dict[str, Any] | None) -> bool:
    return bool(config) and bool(config.get("use_gpu_phase5") or config.get("stack_use_gpu"))


def _gpu_devices(config: dict[str, Any]) -> int:
    """CUDA devices a local cluster should use: 0 unless the run asks for the GPU and CuPy sees some."""
    if not _uses_gpu(config):
        return 0
    if os.environ.get("ZEMOSAIC_FORCE_CPU", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return 0
    if importlib.util.find_spec("cupy") is None:
        return 0
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver, no device
        return 0


def local_cluster_size(config: dict[str, Any], gpus: int = 0) -> tuple[int, int, int]:
    """(workers, threads per worker, memory limit MB per worker) of a ``local`` cluster."""
    from .context import available_memory_mb

    cores = os.cpu_count() or 1
    threads = int(config.get("scheduler_threads_per_worker") or 0)
    workers = int(config.get("scheduler_workers") or 0)
    if workers <= 0:
        workers = gpus if gpus > 0 else max(1, cores // max(1, threads))
    if threads <= 0:
        # A GPU worker runs one GPU unit at a time (the GPU resource); its threads serve that
        # unit's readers and CPU-side work, so the host's cores are shared between the workers.
        threads = max(1, cores // workers) if gpus > 0 else 1
    memory = int(config.get("scheduler_memory_limit_mb") or 0)
    if memory <= 0:
        try:
            import psutil

            total = int(psutil.virtual_memory().total / 2**20)
        except Exception:  # psutil missing: what is available now
            total = available_memory_mb()
        memory = max(256, int(0.9 * total) // workers)
    return workers, threads, memory


#: Environment variable Dask sets in its worker processes before they start.
_DASK_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"


@contextmanager
def _worker_environment() -> Iterator[None]:
    """Start local workers without Dask's ``MALLOC_TRIM_THRESHOLD_=65536``.

    Setting it turns off glibc's adaptive mmap threshold, so every array above 64 KiB is a fresh
    mmap whose pages fault in again; the stacking code allocates many such short-lived arrays and
    ran 2.5× slower in a worker than in a plain process (same unit, same machine). The thread
    caps (OMP/MKL/OpenBLAS = 1 per worker process) are kept.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop(_DASK_MALLOC_TRIM, None)
    # An earlier cluster of this process may have left Dask's value in our own environment.
    if os.environ.get(_DASK_MALLOC_TRIM) == "65536":
        del os.environ[_DASK_MALLOC_TRIM]
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        yield


def start_local_cluster(workers: int, threads: int = 1, memory_mb: int | None = None, gpu_workers: bool = False) -> Any:
    """A :class:`distributed.LocalCluster` of worker processes, started the way ``scheduler: local`` does.

    ``gpu_workers``: every worker offers one :data:`GPU_RESOURCE` (its pinned device).
    """
    import logging

    from distributed import LocalCluster

    extra: dict[str, Any] = {"resources": {GPU_RESOURCE: 1}} if gpu_workers else {}
    with _worker_environment():
        return LocalCluster(
            n_workers=workers, threads_per_worker=threads, processes=True,
            memory_limit=f"{memory_mb}MiB" if memory_mb else "auto", dashboard_address=None,
            silence_logs=logging.ERROR, **extra,
        )  # fmt: skip


def open_scheduler(config: dict[str, Any], reporter: Reporter, cache_dir: Path) -> UnitExecutor | None:
    """The run's executor from ``config["scheduler"]``; ``None`` for ``none`` (plain in-process run).

    Raises :class:`~.context.UserError` when Dask is missing or the scheduler cannot be reached.
    """
    from .context import UserError

    choice = check_scheduler(config.get("scheduler", SCHEDULER_NONE))
    retries = int(config.get("scheduler_retries", 2))
    if choice == SCHEDULER_NONE:
        return None
    if choice == SCHEDULER_INLINE:
        reporter.info("scheduler_info_inline")
        return InlineExecutor(cache_dir, retries)
    if not distributed_available():
        raise UserError("scheduler_error_not_installed", scheduler=choice, hint=INSTALL_HINT)
    from distributed import Client

    if choice == SCHEDULER_LOCAL:
        gpus = _gpu_devices(config)
        workers, threads, memory_mb = local_cluster_size(config, gpus)
        try:
            cluster = start_local_cluster(workers, threads, memory_mb, gpu_workers=gpus > 0)
        except Exception as exc:  # e.g. worker processes that cannot start (a script read from stdin)
            raise UserError("scheduler_error_connect", address=choice, detail=f"{type(exc).__name__}: {exc}") from None
        client = Client(cluster, set_as_default=False)
        if gpus:
            client.register_plugin(gpu_pin_plugin(gpus))
            reporter.info("scheduler_info_gpu_workers", workers=workers, gpus=gpus)
        executor = DaskExecutor(client, cluster, cache_dir, retries, SCHEDULER_LOCAL, gpus)
        reporter.info("scheduler_info_local", workers=workers, threads=threads, memory_mb=memory_mb,
                      address=executor.address)  # fmt: skip
        return executor
    try:
        client = Client(choice, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except Exception as exc:  # unreachable, refused, wrong protocol
        raise UserError("scheduler_error_connect", address=choice, detail=f"{type(exc).__name__}: {exc}") from None
    executor = DaskExecutor(client, None, cache_dir, retries, "external")
    reporter.info("scheduler_info_connected", address=choice, workers=executor.report["workers"])
    if not executor.report["workers"]:
        reporter.warning("scheduler_warn_no_workers", address=choice)
    return executor


def scheduler_report(executor: UnitExecutor | None) -> dict[str, Any]:
    """The ``scheduler`` section of ``run_report.json`` (a live dict: tasks are added as they end)."""
    if executor is None:
        return {"kind": SCHEDULER_NONE, "address": None, "workers": 0, "tasks": []}
    return executor.report


def close_scheduler(ctx: Any) -> None:
    """Stop the run's executor (a local cluster stops; an external one only loses this client)."""
    executor = getattr(ctx, "executor", None)
    if executor is None:
        return
    ctx.executor = None
    try:
        executor.close()
    except Exception:  # pragma: no cover - closing must never hide the run's own outcome
        pass


def executor_of(ctx: Any) -> UnitExecutor | None:
    return getattr(ctx, "executor", None)


# ------------------------------------------------------------------------ units of one loop


#: What :meth:`RemoteUnits.result` returns for a unit that was not submitted.
LOCAL = "local"


class RemoteUnits:
    """The units of one loop, submitted at once; results are taken back in submission order.

    :meth:`result` is a generator: it polls the unit (checking the run's cancel request every
    :data:`POLL_S`), emits the unit's log events on the run's reporter, records its timing and
    returns its value, or raises its exception. Any error, cancel or close of the waiting
    generator cancels the units still outstanding (``cancel_on_error=False`` keeps them running
    when the caller goes on without a failed unit).
    """

    def __init__(self, ctx: Any, executor: UnitExecutor, kind: str, keys: list[str], handles: list[Any],
                 cancel_on_error: bool = True, phase: str | None = None) -> None:  # fmt: skip
        self.ctx = ctx
        self.phase = phase
        self.executor = executor
        self.kind = kind
        self.keys = keys
        self.handles = handles
        self.cancel_on_error = cancel_on_error
        self._taken: set[int] = set()  # units taken back (or recorded as failed/cancelled)

    def __len__(self) -> int:
        return len(self.handles)

    def cancel_rest(self) -> None:
        """Cancel the units not taken back yet; the report lists them as ``cancelled``."""
        self.executor.cancel([h for i, h in enumerate(self.handles) if i not in self._taken and h is not None])
        for index, key in enumerate(self.keys):
            if index not in self._taken:
                self._taken.add(index)
                self.executor.record(TaskRecord(key, self.kind, status="cancelled"))

    def result(self, index: int) -> Generator[Event, None, Any]:
        if self.phase is None:
            return (yield from self._result(index))
        with self.ctx.timed(self.phase):
            return (yield from self._result(index))

    def _result(self, index: int) -> Generator[Event, None, Any]:
        handle, key = self.handles[index], self.keys[index]
        if handle is None:  # not submitted: the caller does this unit itself (e.g. reused from the cache)
            self._taken.add(index)
            return LOCAL
        record = TaskRecord(key, self.kind)
        try:
            while not self.executor.done(handle, POLL_S):
                yield from self.ctx.drain()  # raises RunCancelled on a cancel request
            try:
                unit = self.executor.outcome(handle)
            except Exception as exc:
                self._taken.add(index)
                record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
                record.retries = attempts_of(self.executor.attempts_dir, self.executor.dask_key(key)) - 1
                self.executor.record(record)
                self.ctx.reporter.error("scheduler_error_task_failed", unit=key, attempts=record.retries + 1,
                                        error=record.reason)  # fmt: skip
                if self.cancel_on_error:
                    self.cancel_rest()
                raise
            self._taken.add(index)
            for event in unit.events:
                self.ctx.reporter.emit(event)
            record.worker, record.pid, record.seconds = unit.worker, unit.pid, unit.seconds
            record.cpu_seconds, record.phases = unit.cpu_seconds, dict(unit.phases)
            attempts = max(unit.attempt, attempts_of(self.executor.attempts_dir, self.executor.dask_key(key)))
            record.retries, record.status = attempts - 1, "ok"
            self.executor.record(record)
            if record.retries:
                self.ctx.reporter.warning("scheduler_warn_task_retried", unit=key, retries=record.retries)
            self.ctx.reporter.debug("scheduler_debug_task_done", unit=key, worker=unit.worker,
                                    seconds=round(unit.seconds, 3))  # fmt: skip
            yield from self.ctx.drain()
        except BaseException:  # cancel, close of the run, or a failure the caller does not go on from
            if not (record.status == "failed" and not self.cancel_on_error):
                self.cancel_rest()
            raise
        return unit.value


def submit_units(
    ctx: Any,
    kind: str,
    fn: Callable[..., Any],
    calls: Sequence[tuple[str, tuple]],
    cancel_on_error: bool = True,
    phase: str | None = None,
) -> RemoteUnits | None:
    """Submit ``fn(reporter, *args)`` for every ``(key, args)`` of ``calls`` on the run's executor.

    ``None`` when the run has no executor (the caller runs its units in-process as before).
    With ``phase``, the time spent waiting for the results is added to that phase's timing.
    A call whose ``args`` is ``None`` is not submitted: its result is :data:`LOCAL`.
    """
    executor = executor_of(ctx)
    if executor is None:
        return None
    handles = [None if args is None else executor.submit(fn, *args, key=key, kind=kind, config=ctx.config)
               for key, args in calls]  # fmt: skip
    return RemoteUnits(ctx, executor, kind, [key for key, _ in calls], handles, cancel_on_error, phase)


# ------------------------------------------------------------------------------ the units


def _unit_context(reporter: Reporter, config: dict[str, Any], cache_dir: str | Path) -> "RunContext":
    """The context a unit runs in on a worker: its config (device, memory) and its own policy."""
    from .context import RunContext

    config = dict(config)
    device = worker_gpu_device()
    if device is not None:
        config["gpu_device_id"] = device
    _, _, limit, threads = _worker_identity()
    if limit and not int(config.get("max_memory_mb") or 0):
        config["max_memory_mb"] = max(256, limit // 2**20 // 2)  # half the worker's limit, as on a machine
    if threads and not int(config.get("num_workers") or 0):
        config["num_workers"] = threads  # a worker's share of the cores: its threads, not the machine's
    ctx = RunContext(config, reporter, Path(cache_dir), Path(cache_dir))
    _UNIT.ctx = ctx
    if (config.get("use_gpu_phase5") or config.get("stack_use_gpu")) and importlib.util.find_spec("cupy") is not None:
        try:
            from .gpu import ComputePolicy

            ctx.policy = ComputePolicy.from_config(config, reporter=reporter)
        except ImportError:  # pragma: no cover - minimal installs
            ctx.policy = None
    return ctx


def _drive(generator: Generator[Event, None, Any]) -> Any:
    from .pipeline import drain

    return drain(generator)


def megatile_task(
    reporter: Reporter,
    frames: Sequence[Any],
    frame_indices: Sequence[int],
    batch: int,
    canvas: Any,
    config: dict[str, Any],
    cache_dir: str,
    n_channels: int,
    feather_px: float,
) -> Any:
    """One SDS mega-tile (:func:`.sds.build_megatile`); the tile file lands in ``cache_dir/sds``."""
    from .sds import build_megatile

    ctx = _unit_context(reporter, config, cache_dir)
    return _drive(build_megatile(frames, frame_indices, batch, canvas, ctx, n_channels, ctx.make_cache_dir("sds"),
                                 feather_px))  # fmt: skip


def master_tile_task(
    reporter: Reporter,
    frames: Sequence[Any],
    frame_indices: Sequence[int],
    index: int,
    tile: Any,
    config: dict[str, Any],
    cache_dir: str,
    n_channels: int,
) -> Any:
    """One classic master tile (:func:`.classic.build_master_tile`) written to ``cache_dir/classic``:
    returns the tile and its inner stacking timings (``classic_tile_timings_s``)."""
    from .classic import build_master_tile

    ctx = _unit_context(reporter, config, cache_dir)
    tile_result = _drive(build_master_tile(frames, frame_indices, index, tile, ctx, n_channels,
                                           ctx.make_cache_dir("classic")))  # fmt: skip
    return tile_result, dict(ctx.extras.get("classic_tile_timings_s", {}))


def measure_frame_task(reporter: Reporter, info: Any) -> Any:
    """P1/P2 per-frame work: one frame's quality metrics (:func:`.quality.measure_one`)."""
    from .quality import measure_one

    return measure_one(info)


class RemoteCall:
    """A plain function that runs ``task(reporter, *args)`` as a ``kind`` task on the executor and
    waits for it in the calling thread: callers that already run their units on a thread pool
    (the quality pass, the plate solver) keep their order, progress and cancellation."""

    def __init__(self, executor: UnitExecutor, config: dict[str, Any], task: Callable[..., Any], kind: str) -> None:
        self.executor = executor
        self.config = config
        self.task = task
        self.kind = kind
        self._numbers: dict[str, int] = {}
        self._lock = threading.Lock()

    def _key(self, name: str) -> str:
        with self._lock:
            number = self._numbers.setdefault(name, len(self._numbers) + 1)
        return f"{self.kind}-{number:05d}"

    def call(self, name: str, *args: Any) -> Any:
        """The task's value; ``name`` (a frame path) numbers the task key stably within the run."""
        key = self._key(name)
        handle = self.executor.submit(self.task, *args, key=key, kind=self.kind, config=self.config)
        record = TaskRecord(key, self.kind)
        try:
            unit = self.executor.outcome(handle)
        except BaseException as exc:
            self.executor.cancel([handle])
            record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
            record.retries = attempts_of(self.executor.attempts_dir, self.executor.dask_key(key)) - 1
            self.executor.record(record)
            raise
        record.worker, record.pid = unit.worker, unit.pid
        record.seconds, record.cpu_seconds = unit.seconds, unit.cpu_seconds
        record.retries = max(unit.attempt, attempts_of(self.executor.attempts_dir, self.executor.dask_key(key))) - 1
        record.status = "ok"
        self.executor.record(record)
        return unit.value


class _RemoteMeasure(RemoteCall):
    """``measure`` for :func:`.quality.measure_frames`: each frame is a ``metrics`` task."""

    def __init__(self, executor: UnitExecutor, config: dict[str, Any]) -> None:
        super().__init__(executor, config, measure_frame_task, "metrics")

    def __call__(self, info: Any) -> Any:
        return self.call(str(getattr(info, "path", "")), info)


def solve_frame_task(reporter: Reporter, solver: Any, info: Any, stars: Any, settings: Any, work_dir: str) -> Any:
    """P1 per-frame work: one plate solve (:func:`.astrometry._solve_direct`) in a scratch folder
    of the shared cache. A cancelled run stops waiting for it; the solver's own timeout bounds it."""
    from .astrometry import _solve_direct

    return _solve_direct(solver, info, stars, settings, Path(work_dir), threading.Event())


def solve_options(executor: UnitExecutor | None, config: dict[str, Any]) -> tuple[Callable[..., Any] | None, int]:
    """``(solve function, concurrent solves)`` for the plate solver: ``(None, 0)`` without a
    scheduler (it runs its own solver processes); with one, every direct solve is a ``solve`` task."""
    if executor is None:
        return None, 0
    threads = int(executor.report.get("workers") or 1) * int(executor.report.get("threads_per_worker") or 1)
    remote = RemoteCall(executor, config, solve_frame_task, "solve")

    def solve(solver: Any, info: Any, stars: Any, settings: Any, work_dir: Path, cancel: threading.Event) -> Any:
        return remote.call(str(info.path), solver, info, stars, settings, str(work_dir))

    return solve, 1 if isinstance(executor, InlineExecutor) else max(2, 2 * threads)


def measure_options(executor: UnitExecutor | None, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, keyword arguments)`` for :func:`.quality.measure_frames`: unchanged without a
    scheduler; with one, every frame is a ``metrics`` task and as many are in flight as the
    cluster has threads (twice, so that no worker waits for the next frame)."""
    if executor is None or measures_in_run_process(executor):
        return config, {}
    threads = int(executor.report.get("workers") or 1) * int(executor.report.get("threads_per_worker") or 1)
    in_flight = 1 if isinstance(executor, InlineExecutor) else max(2, 2 * threads)
    return {**config, "num_workers": in_flight}, {"measure": _RemoteMeasure(executor, config)}


def measures_in_run_process(executor: UnitExecutor | None) -> bool:
    """Whether per-frame metrics stay in the run's own process pool despite a scheduler: a local
    cluster of GPU workers is one worker per device on this very host, whose threads share one
    interpreter each (the measurement is GIL-bound there), while the run's pool has a process per
    core (measured on 2 GPUs: 9.2 s as tasks, 3.9 s in the pool, 400 frames)."""
    if executor is None:
        return False
    return executor.report.get("kind") == SCHEDULER_LOCAL and int(executor.report.get("gpus") or 0) > 0


def _master_tile_signature(ctx: Any, members: Sequence[Any], tile: Any, n_channels: int) -> str:
    return ctx.manifest.signature("master_tile", {"frames": list(members), "tile": tile, "channels": n_channels})


def submit_master_tiles(
    ctx: Any, groups: Sequence[Sequence[int]], frames: Sequence[Any], n_channels: int
) -> RemoteUnits | None:
    """One ``master_tile`` task per group, except the tiles the run's resume manifest can reuse
    (those are read back in this process, as without a scheduler). ``None`` without a scheduler."""
    from .classic import tile_canvas

    if executor_of(ctx) is None:
        return None
    manifest = getattr(ctx, "manifest", None)
    calls: list[tuple[str, tuple | None]] = []
    for number, members_idx in enumerate(groups, start=1):
        members = [frames[i] for i in members_idx]
        tile = tile_canvas(members)
        reusable = manifest is not None and manifest.lookup(
            "master_tile", number - 1, _master_tile_signature(ctx, members, tile, n_channels)
        ) is not None
        args = None if reusable else (members, list(members_idx), number - 1, tile, ctx.config, str(ctx.cache_dir),
                                      n_channels)  # fmt: skip
        calls.append((f"master_tile-{number:04d}", args))
    return submit_units(ctx, "master_tile", master_tile_task, calls, cancel_on_error=False)


def master_tile_result(
    remote: RemoteUnits,
    index: int,
    members: Sequence[Any],
    frame_indices: Sequence[int],
    tile: Any,
    ctx: Any,
    n_channels: int,
    out_dir: Path,
) -> Generator[Event, None, Any]:
    """The master tile of unit ``index`` (recorded in the resume manifest when it was built on a
    worker). A unit that failed on every attempt gives an empty tile whose frames are excluded with
    ``frame_excluded_unit_failed`` (the run goes on without it)."""
    from .classic import MasterTile, build_master_tile
    from .context import RunCancelled

    try:
        value = yield from remote.result(index)
    except RunCancelled:
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        failed = [(int(i), "frame_excluded_unit_failed", detail) for i in frame_indices]
        return MasterTile(index, [], failed, None, tile, n_channels)
    if value == LOCAL:
        return (yield from build_master_tile(members, frame_indices, index, tile, ctx, n_channels, out_dir))
    master, timings = value
    totals = ctx.extras.setdefault("classic_tile_timings_s", {})
    for phase, seconds in timings.items():
        totals[phase] = totals.get(phase, 0.0) + seconds
    manifest = getattr(ctx, "manifest", None)
    if manifest is not None and master.path is not None and not master.reused:
        manifest.record("master_tile", index, _master_tile_signature(ctx, members, tile, n_channels), master.path)
    return master


@dataclass(frozen=True)
class BlockJob:
    """A Mosaic-First block to stack from its spilled pieces: everything a worker needs."""

    block: tuple[int, int]
    box: tuple[int, int, int, int]
    spill_dir: str
    entries: tuple  # the store's entries of the block, by frame index: (frame, (y0, x0, shape, path))
    result_path: str


def stack_block_task(
    reporter: Reporter,
    job: BlockJob,
    n_channels: int,
    normalisation: Any,
    weights: np.ndarray,
    params: Any,
    config: dict[str, Any],
    cache_dir: str,
) -> tuple[str, tuple[int, int, int, int]]:
    """Read the block's spilled pieces, stack them (:func:`.mosaic_first.stack_block`, or through the
    worker's GPU policy), write ``data, weight, count`` as raw float32 to ``result_path``."""
    from .mosaic_first import PieceStore, _stack_block_unit, stack_block

    store = PieceStore(Path(job.spill_dir))
    store._entries[job.block] = dict(job.entries)
    pieces = store.pieces(job.block)
    ctx = _unit_context(reporter, config, cache_dir)
    if ctx.policy is None:
        data, weight, count = stack_block(pieces, job.box, n_channels, normalisation, weights, params, np)
    else:
        data, weight, count = _stack_block_unit(ctx.policy, pieces, job.box, n_channels, normalisation, weights, params)
        ctx.policy.end_stage("stack")
    return write_block_result(job.result_path, data, weight, count), job.box


def write_block_result(path: str | Path, data: np.ndarray, weight: np.ndarray, count: np.ndarray) -> str:
    """A stacked block as one raw float32 file (data planes, weight, count), written atomically."""
    path = Path(path)
    temp = path.with_suffix(".tmp")
    with open(temp, "wb") as handle:
        for array in (data, weight, count):
            np.ascontiguousarray(array, dtype=np.float32).tofile(handle)
    temp.replace(path)
    return str(path)


def read_block_result(path: str | Path, n_channels: int, box: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, weight, count)`` of a block written by :func:`write_block_result`; the file is removed."""
    h, w = box[1] - box[0], box[3] - box[2]
    raw = np.fromfile(path, dtype=np.float32)
    Path(path).unlink(missing_ok=True)
    plane = h * w
    return (raw[: n_channels * plane].reshape(n_channels, h, w), raw[n_channels * plane : (n_channels + 1) * plane].reshape(h, w),
            raw[(n_channels + 1) * plane :].reshape(h, w))  # fmt: skip


def sds_block_task(
    reporter: Reporter,
    tiles: Sequence[Any],
    box: tuple[int, int, int, int],
    n_channels: int,
    normalisation: Any,
    weight_scales: np.ndarray,
    params_reject: Any,
    params_plain: Any,
    config: dict[str, Any],
    cache_dir: str,
    result_path: str,
) -> str:
    """One block of the SDS final stack (:func:`.sds.stack_final_block`) from the mega-tile files
    of the shared cache, where the worker's GPU policy puts stacking; written to ``result_path``."""
    from .sds import stack_final_block

    ctx = _unit_context(reporter, config, cache_dir)
    data, weight, count = stack_final_block(tiles, box, n_channels, normalisation, weight_scales, params_reject,
                                            params_plain, ctx.xp("stack"))  # fmt: skip
    if ctx.policy is not None:
        ctx.policy.end_stage("stack")
    return write_block_result(result_path, data, weight, count)


def reproject_frame_task(
    reporter: Reporter,
    info: Any,
    index: int,
    canvas: Any,
    config: dict[str, Any],
    n_channels: int,
    side: int,
    spill_dir: str,
    name: str | None,
) -> tuple[str, Any, Any, Any]:
    """Mosaic-First P3 for one frame (:func:`.mosaic_first.reproject_unit`): its pieces are written
    to the shared spill folder under the run's names; returns ``("ok", coarse, noise, pieces)``
    (pieces as ``[row, col, y0, x0, *shape]``), or ``("error", reason_key, detail, None)`` for a
    frame that cannot be used (not retried: the frame is the problem, not the worker)."""
    from .frames import FrameError
    from .mosaic_first import PieceStore, _split_into_blocks, coarse_piece, reproject_unit
    from .photometry import PHOTOMETRY_BIN_PX

    try:
        frame = reproject_unit(info, index, canvas, config, np, n_channels)
    except FrameError as exc:
        return "error", exc.reason_key, exc.detail, None
    store = PieceStore(Path(spill_dir), names={index: name} if name else None)
    _split_into_blocks(frame, side, store, canvas.shape)
    coarse = frame.coarse or coarse_piece(frame.data, frame.bbox, PHOTOMETRY_BIN_PX)
    return "ok", coarse, np.asarray(frame.noise), store.frame_pieces(index)


def reproject_frames_remote(
    ctx: Any,
    frames: Sequence[Any],
    indices: Sequence[int],
    canvas: Any,
    n_channels: int,
    side: int,
    store: Any,
    accept: Callable[[int, Any, np.ndarray, list[list[int]]], None],
    reject: Callable[[int, str, str], None],
) -> Generator[Event, None, None]:
    """Mosaic-First P3 on the executor: one task per frame, results taken in submission order (so
    the mosaic does not depend on which worker finished first); ``accept(index, coarse, noise,
    pieces)`` adopts the pieces the task wrote, ``reject(index, reason_key, detail)`` an unusable frame."""
    assert store.spilled, "pieces travel from the workers as spill files"
    calls = [(f"reproject-{index:05d}", (frames[index], index, canvas, ctx.config, n_channels, side,
                                         str(store.spill_dir), store.names.get(index)))
             for index in indices]  # fmt: skip
    remote = submit_units(ctx, "reproject", reproject_frame_task, calls, phase=None)
    assert remote is not None
    for number, index in enumerate(indices, start=1):
        status, first, second, pieces = yield from remote.result(number - 1)
        if status == "ok":
            accept(index, first, second, pieces)
        else:
            reject(index, first, second)
        ctx.reporter.progress("P3", number, len(indices), "progress_frames", name=Path(str(frames[index].path)).name)
        yield from ctx.drain()


def stack_blocks_remote(
    ctx: Any,
    store: Any,
    blocks: Sequence[tuple[int, int]],
    box_of: Callable[[tuple[int, int]], tuple[int, int, int, int]],
    n_channels: int,
    normalisation: Any,
    weights: np.ndarray,
    params: Any,
    finish_block: Callable[[tuple[int, int], np.ndarray, np.ndarray, np.ndarray], None],
) -> Generator[Event, None, None]:
    """Mosaic-First P5 on the executor: one task per block of a spilled store; each stacked block is
    handed to ``finish_block(block, data, weight, count)`` in block order, then dropped from the store."""
    assert store.spilled, "blocks travel to workers as spill files"
    calls, jobs = [], []
    for block in blocks:
        entries = tuple(sorted(store._entries.get(block, {}).items()))
        if not entries:
            continue
        idx = np.array([frame for frame, _ in entries])
        folder = Path(store.spill_dir)
        result = folder / f"stacked_{block[0]:04d}_{block[1]:04d}.f32"
        job = BlockJob(tuple(block), tuple(box_of(block)), str(folder), entries, str(result))
        calls.append((f"block-{block[0]:04d}-{block[1]:04d}", (job, n_channels, normalisation.subset(idx), weights[idx],
                                                                params, ctx.config, str(ctx.cache_dir))))  # fmt: skip
        jobs.append(job)
    remote = submit_units(ctx, "block", stack_block_task, calls)
    assert remote is not None
    done = 0
    for number, block in enumerate(blocks, start=1):
        if done < len(jobs) and jobs[done].block == tuple(block):
            path, box = yield from remote.result(done)
            done += 1
            finish_block(block, *read_block_result(path, n_channels, box))
        store.drop(block)
        ctx.reporter.progress("P5", number, len(blocks), "progress_blocks")
        yield from ctx.drain()


# ------------------------------------------------------------------------- a diagnostic unit


def echo_unit(reporter: Reporter, value: Any, delay_s: float = 0.0, fail_first: int = 0, marker: str = "") -> Any:
    """A tiny unit for checks and tests: logs, sleeps ``delay_s``, raises on its first ``fail_first``
    attempts (counted in the file ``marker``), returns ``value``."""
    reporter.debug("scheduler_debug_echo", value=str(value))
    if fail_first and marker:
        with open(marker, "ab") as handle:
            handle.write(b".")
            attempt = handle.tell()
        if attempt <= fail_first:
            raise RuntimeError(f"echo_unit failure {attempt} of {fail_first}")
    if delay_s:
        time.sleep(delay_s)
    return value

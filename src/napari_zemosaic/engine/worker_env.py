"""The engine's worker processes: how they start (:func:`process_context`, its forkserver started
early by :func:`start_process_server`) and their environment, set before they import NumPy.

This module stays light (no NumPy, no engine import): the command line starts the forkserver
with it before the engine loads, so that the server's imports overlap the program's own.

The forkserver of :func:`process_context` imports :mod:`._worker_preload` first,
which calls :func:`limit_native_threads`, so every reader, measuring and pair-fit process it forks
starts with native math libraries limited to one thread each. A run already keeps one process per core busy; with OpenBLAS / OpenMP sizing
their own pools to every core on top, a 16-core host ran 12 measuring processes with 16 threads
each beside the resampling, which then waited for cores (measured on one H100 host: P2 and P3
both about 10 % slower). A value the user set is kept. Nothing here touches the run's own
process.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from typing import Any

#: Thread-count variables of the native libraries NumPy, SciPy and astropy may load.
SINGLE_THREAD_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def limit_native_threads(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """One thread per native library in this process, where the user did not choose."""
    for name in SINGLE_THREAD_VARIABLES:
        environ.setdefault(name, "1")


#: What the forkserver imports before it forks anything: the engine's worker modules (the first
#: one limits the native libraries' threads before NumPy loads), and what the frame measurement
#: imports lazily (SciPy's k-d tree, with scipy.special and scipy.linalg, about 0.4 s, and its
#: ndimage). A measuring process or quality worker that imported them itself was ready that much
#: later (one H100: the measuring process's warm-up took 0.99 s, 0.43 s of it in these imports).
SERVER_PRELOAD = (
    "napari_zemosaic.engine._worker_preload",
    "napari_zemosaic.engine.mosaic_first",
    "napari_zemosaic.engine.quality",
    "scipy.spatial",
    "scipy.ndimage",
)
#: The environment variable that keeps every stage on the CPU (see :mod:`.gpu`).
ENV_FORCE_CPU = "ZEMOSAIC_FORCE_CPU"
#: Also imported by a forkserver started for a run on the GPU: a measuring process forked from
#: it has them loaded (measured on one H100: ready 1.23 s after its start instead of 1.75 s), cuBLAS's
#: library included (the background fit's first matrix product loaded it: 0.13 s). A missing
#: module is skipped by the server.
DEVICE_PRELOAD = ("cupy", "cupyx", "cupyx.scipy.ndimage", "cupy_backends.cuda.libs.cublas")


def process_context() -> Any:
    """forkserver where it exists (no fork of a process holding a CUDA context and threads)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Forked readers (and quality workers) start with the engine imported, their native
        # libraries limited to one thread; no effect once the server runs.
        context.set_forkserver_preload(list(SERVER_PRELOAD))
        return context
    return multiprocessing.get_context("spawn")


def start_process_server(device: bool = False) -> None:
    """Have the forkserver of :func:`process_context` start now, without waiting for it: a new
    server imports the engine (about 1 s), and with ``device`` CuPy too (where it is installed),
    while the program does something else. Does nothing where processes are spawned, or once the
    server runs (its imports are those of its start)."""
    context = process_context()
    if context.get_start_method() != "forkserver":
        return
    if device and importlib.util.find_spec("cupy") is not None:
        context.set_forkserver_preload([*SERVER_PRELOAD, *DEVICE_PRELOAD])
    from multiprocessing import forkserver

    forkserver.ensure_running()


def wants_device(config: dict[str, Any], environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether a run of ``config`` asks for the GPU's resampling (``use_gpu_phase5``) and the
    environment does not force the CPU (:data:`ENV_FORCE_CPU`)."""
    return bool(config.get("use_gpu_phase5")) and not env_flag(environ, ENV_FORCE_CPU)


def env_flag(environ: Any, name: str) -> bool:
    """An environment switch: set to anything but ``""``, ``0``, ``false``, ``no`` or ``off``."""
    return environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")

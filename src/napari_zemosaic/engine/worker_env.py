"""Environment of the engine's worker processes, set before they import NumPy.

The forkserver of :func:`.mosaic_first._process_context` imports :mod:`._worker_preload` first,
which calls :func:`limit_native_threads`, so every reader, measuring and pair-fit process it forks
starts with native math libraries limited to one thread each. A run already keeps one process per core busy; with OpenBLAS / OpenMP sizing
their own pools to every core on top, a 16-core host ran 12 measuring processes with 16 threads
each beside the resampling, which then waited for cores (measured on one H100 host: P2 and P3
both about 10 % slower). A value the user set is kept. Nothing here touches the run's own
process.
"""

from __future__ import annotations

import os

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


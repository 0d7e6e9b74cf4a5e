"""Imported first by the engine's forkserver, before NumPy: see :mod:`.worker_env`."""

from .worker_env import limit_native_threads

limit_native_threads()

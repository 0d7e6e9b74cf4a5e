"""Per-run state: config, reporter, cache folder, memory budget, compute backends.

Everything that must not outlive a run (GPU decisions, OOM hints, caches, timings)
hangs off a :class:`RunContext`, so napari can run many jobs in one process.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..events import Event, Reporter


class RunCancelled(Exception):
    """Raised at the next checkpoint after a cancel request."""


class UserError(Exception):
    """A problem the user can fix (bad arguments, nothing usable): a locale key and its parameters."""

    def __init__(self, key: str, /, **params: Any) -> None:
        self.key = key
        self.params = params
        super().__init__(f"{key}: {params}")


def available_memory_mb() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available / 2**20)
    except Exception:  # psutil missing or unsupported platform: assume a small laptop
        return 4096


def memory_budget_bytes(config: dict[str, Any]) -> int:
    """``max_memory_mb`` or, when 0, half the memory available now."""
    megabytes = int(config.get("max_memory_mb") or 0) or max(512, available_memory_mb() // 2)
    return megabytes * 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far."""
    try:
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak_kb / 1024.0
    except Exception:  # pragma: no cover - Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20  # type: ignore[attr-defined]


@dataclass
class RunContext:
    config: dict[str, Any]
    reporter: Reporter
    output_dir: Path
    cache_dir: Path
    policy: Any = None  # engine.gpu.ComputePolicy when available
    cancel_event: threading.Event = field(default_factory=threading.Event)
    timings_s: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    manifest: Any = None  # engine.resume.UnitManifest: finished work units, for resuming
    executor: Any = None  # engine.distributed.UnitExecutor when work units run on a scheduler

    @property
    def budget_bytes(self) -> int:
        return memory_budget_bytes(self.config)

    def xp(self, stage: str) -> Any:
        """The array module for ``stage`` (numpy unless the compute policy put it on the GPU)."""
        if self.policy is None:
            return np
        return self.policy.xp_for(stage)

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise RunCancelled()

    def drain(self) -> Iterator[Event]:
        """Yield the events logged since the last drain; raise if a cancel was requested."""
        yield from self.reporter.pop_pending()
        self.check_cancelled()

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[phase] = round(self.timings_s.get(phase, 0.0) + time.perf_counter() - start, 4)

    def make_cache_dir(self, name: str) -> Path:
        path = self.cache_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

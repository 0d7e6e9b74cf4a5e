"""A stack-sampling profiler of every thread of this process, by run phase.

cProfile follows one thread and inflates pure-Python code many times over; the GPU path's time is
spread over the run's thread, the device thread(s) and pool threads that share one GIL. This
sampler looks at all of them every few milliseconds (``sys._current_frames``), so the shares it
reports are shares of wall time, with little overhead, and it attributes them to the run's phases
(the intervals :meth:`RunContext.timed` measures).

    sampler = ThreadSampler(interval_s=0.005)
    with sampler.phases_recorded(), sampler.running():
        run()
    print(sampler.report())
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

# Innermost frames that mean "this thread waits" (for a lock, a queue, a pipe, a process).
IDLE_FUNCTIONS = {"wait", "acquire", "_wait_for_tstate_lock", "select", "poll", "get", "_recv", "_recv_bytes",
                  "recv_bytes", "accept", "sleep", "join", "_worker"}


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("napari_zemosaic", "cupy", "numpy", "astropy", "concurrent", "multiprocessing", "json"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])
    return "/".join(parts[-2:])


class ThreadSampler:
    """Samples every thread's stack; :meth:`report` summarises them per phase and thread."""

    def __init__(self, interval_s: float = 0.005, depth: int = 48) -> None:
        self.interval_s = interval_s
        self.depth = depth
        self.samples: list[tuple[float, str, tuple[tuple[str, str, int], ...]]] = []
        self.phases: list[tuple[str, float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ sampling
    def _loop(self) -> None:
        own = threading.get_ident()
        while not self._stop.is_set():
            now = time.perf_counter()
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == own:
                    continue
                stack = []
                while frame is not None and len(stack) < self.depth:
                    code = frame.f_code
                    stack.append((code.co_filename, code.co_name, frame.f_lineno))
                    frame = frame.f_back
                self.samples.append((now, names.get(ident, str(ident)), tuple(stack)))
            self._stop.wait(self.interval_s)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()

    @contextlib.contextmanager
    def phases_recorded(self) -> Iterator[None]:
        """Record the intervals of :meth:`RunContext.timed` (wrapped for the duration)."""
        from napari_zemosaic.engine.context import RunContext

        original = RunContext.timed
        phases = self.phases

        @contextlib.contextmanager
        def timed(ctx: Any, phase: str) -> Iterator[None]:
            start = time.perf_counter()
            with original(ctx, phase):
                yield
            phases.append((phase, start, time.perf_counter()))

        RunContext.timed = timed  # type: ignore[method-assign]
        try:
            yield
        finally:
            RunContext.timed = original  # type: ignore[method-assign]

    # ------------------------------------------------------------------------------ report
    def _phase_of(self, when: float) -> str:
        # Innermost (shortest) interval holding the instant: nested timings name the inner phase.
        best = None
        for name, start, end in self.phases:
            if start <= when <= end and (best is None or end - start < best[2] - best[1]):
                best = (name, start, end)
        return best[0] if best else "-"

    def report(self, top: int = 8) -> str:
        by_phase: dict[str, dict[str, list[tuple[tuple[str, str, int], ...]]]] = collections.defaultdict(
            lambda: collections.defaultdict(list))
        for when, thread, stack in self.samples:
            by_phase[self._phase_of(when)][_thread_kind(thread)].append(stack)
        lines = [f"samples every {self.interval_s * 1e3:.0f} ms; per phase and thread kind: "
                 "share busy, then where (innermost project line; innermost frame)"]
        for phase in sorted(by_phase, key=lambda p: min((s for n, s, _ in self.phases if n == p), default=1e18)):
            lines.append(f"== {phase}")
            for thread, stacks in sorted(by_phase[phase].items(), key=lambda item: -len(item[1])):
                busy = [s for s in stacks if s and s[0][1] not in IDLE_FUNCTIONS]
                threads_seen = len(stacks)
                lines.append(f"  {thread}: {len(busy)}/{threads_seen} samples busy")
                own = collections.Counter()
                inner = collections.Counter()
                for stack in busy:
                    inner[f"{_short(stack[0][0])}:{stack[0][1]}"] += 1
                    for filename, function, line in stack:
                        if "napari_zemosaic" in filename:
                            own[f"{_short(filename)}:{line} {function}"] += 1
                            break
                for label, counter in (("project", own), ("innermost", inner)):
                    for where, count in counter.most_common(top):
                        lines.append(f"    {label:9s} {count:5d}  {where}")
        return "\n".join(lines)


def _thread_kind(name: str) -> str:
    # Pool threads are numbered (zemosaic-gpu_0, ThreadPoolExecutor-3_1): one line per kind.
    stem = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
    return stem

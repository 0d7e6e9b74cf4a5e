"""P2 on the GPU, beside P3: each frame's raw plane, decoded on the device for the resampling,
is measured there too, in batches (:func:`.quality.measure_planes` with CuPy).

Mosaic-First's device threads hand every raw CFA plane they decode to :meth:`DeviceMeasurer.offer`
(no copy and no wait: an event on their stream marks when the plane is ready). A thread of the
run measures the planes once P3 has ended when they all fit in a share of the device budget
(``HOLD_SHARE``), else as they come; a batch at a time on its own stream, as one unit of the ``quality``
stage of the run's :class:`~.gpu.ComputePolicy` (out-of-memory retries with smaller batches,
then a logged fallback to the host). :meth:`DeviceMeasurer.measure` is the ``measure`` of
:func:`.quality.measure_frames`: it waits for the frame's batch, and measures on the host
(:func:`.quality.measure_one`, reading the file again) whatever never reached the device: frames
read some other way, frames P3 rejected, batches of a stage that fell back.

The metrics are those of the host's measurement of the same planes (the same code;
``tests/engine/test_detect.py`` compares the two with ``-m gpu``); the host's cores stay with
the resampling's readers and device threads instead of a pool of measuring processes.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import numpy as np

from .quality import FrameMetrics, _pixel_scale, green_parity, measure_one, measure_planes

#: Device bytes a frame's measurement holds per sensor pixel (its raw plane, the binned image,
#: the sorted meshes, the smoothed image, labels and the stamps), for the batch size.
MEASURE_BYTES_PER_PIXEL = 32
#: Frames measured together at most: enough to amortise the launches, few enough that the last
#: partial batch, measured once P3 has finished, is short.
MAX_BATCH_FRAMES = 64
#: Share of the device budget a batch may plan for (the resampling holds the rest).
BUDGET_SHARE = 0.25
#: Share of the device budget the raw planes of all frames may hold until P3 has ended. Measured
#: beside P3, the measuring thread's Python competes with the device thread for the run's GIL
#: (one H100: P3 2.5 s against 1.3-1.6 s alone), so the planes wait when they fit, and are
#: measured in batches once the device thread is done.
HOLD_SHARE = 0.25


class DeviceMeasurer:
    """Measures on the device the raw planes P3's device threads offer; see the module docstring."""

    def __init__(self, frames: Sequence[Any], policy: Any) -> None:
        self._policy = policy
        self._frames = list(frames)
        self._slot = {id(info): index for index, info in enumerate(self._frames)}
        self._results: dict[int, FrameMetrics] = {}
        self._ready = [threading.Event() for _ in self._frames]
        self._pending: list[tuple[int, Any, Any]] = []  # (frame index, raw plane, ready event)
        self._closed = False
        self._abandoned = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        #: Seconds the measuring thread spent on batches, and how many (for the run's debug log).
        self.timing = {"batches": 0, "frames": 0, "measure_s": 0.0}
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
            self._pending.append((index, plane, ready))
            self._changed.notify()

    def finish(self) -> None:
        """No more planes will come (P3 has ended): the last batch is measured now."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def close(self) -> None:
        """End of the run, or its failure: frames still waited for are given up (no host
        measurement starts any more), and the measuring thread is joined."""
        self._abandoned = True
        self.finish()
        self._thread.join()

    # ----------------------------------------------------------------- P2's side

    def measure(self, info: Any) -> FrameMetrics:
        """``info``'s metrics: from the device once its batch is done, else measured on the host."""
        index = self._slot[id(info)]
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

    # ----------------------------------------------------------------- the measuring thread

    def _work(self) -> None:
        try:
            with self._policy.device():
                batch_frames = self._batch_frames(1.0)
                held = self._raw_bytes() <= HOLD_SHARE * self._policy.gpu_budget_bytes()
            while True:
                with self._changed:
                    while not self._closed and (held or len(self._pending) < batch_frames):
                        self._changed.wait()
                    batch, self._pending = self._pending, []
                    if not batch and self._closed:
                        return
                self._measure(batch)
        except BaseException as exc:  # raised again by measure(), in P2's thread
            self._error = exc
        finally:
            for ready in self._ready:  # whatever was not measured here is measured on the host
                ready.set()

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
        stream = xp.cuda.Stream(non_blocking=True)
        results: dict[int, FrameMetrics] = {}
        size = self._batch_frames(chunk_scale)
        with stream:
            for _, _, ready in members:
                stream.wait_event(ready)
            for start in range(0, len(members), size):
                part = members[start : start + size]
                metrics = [FrameMetrics(path=str(self._frames[index].path)) for index, _, _ in part]
                measure_planes(xp.stack([plane for _, plane, _ in part]), 1, parity, metrics, xp)
                results.update({index: metric for (index, _, _), metric in zip(part, metrics)})
        stream.synchronize()
        return results

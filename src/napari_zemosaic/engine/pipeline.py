"""The run: ingest → filter → canvas → stacking → assembly → outputs, as a generator of events.

``iter_run`` yields :class:`~napari_zemosaic.events.ProgressEvent` and
:class:`~napari_zemosaic.events.LogEvent` objects and returns a :class:`MosaicResult`
(``StopIteration.value``), so the CLI, napari thread workers and scripts all drive the
same code. Closing the generator (or a cancel request) stops at the next event: the
report says ``cancelled`` and no final file is left half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import gc
import hashlib
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import numpy as np

from .. import __version__
from ..config import validate_config
from ..events import Event, LogEvent, LogFileListener, Reporter
from .canvas import Canvas, autocrop_slices, build_canvas, crop_canvas
from .context import RunCancelled, RunContext, UserError, peak_rss_mb
from .frames import FrameError, FrameInfo, iter_frame_infos, scan_inputs
from .mosaic_first import CanvasStack, mosaic_first
from .resume import ensure_free_space
from .outputs import (
    OutputError,
    alpha_from_coverage,
    check_output_dir,
    contiguous_copy,
    write_json,
    write_preview_png,
    write_science_fits,
)

WORKFLOWS_AVAILABLE = ("mosaic_first", "sds", "classic")
#: Cores the quality measurement leaves to the resampling when both run at once.
CORES_LEFT_TO_RESAMPLING = 4
#: Threads that collect the device measurer's metrics for P2 (:class:`.quality_device.DeviceMeasurer`):
#: they only wait, unless frames fall back to the host. With one per core, a dozen threads woke as
#: each batch came back and queued for the GIL, with the run's other threads, at P2's end.
DEVICE_MEASURE_THREADS = 2


@dataclass
class ExcludedFrame:
    path: str
    reason_key: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason_key": self.reason_key, "detail": self.detail}


@dataclass
class IngestResult:
    """P1: every file found, the usable frames and the excluded ones with their reasons."""

    found: list[Path]
    usable: list[FrameInfo]
    excluded: list[ExcludedFrame]
    warnings: list[dict[str, Any]] = field(default_factory=list)
    astrometry: list[dict[str, Any]] = field(default_factory=list)  # per frame: how it got its WCS

    @property
    def all_seestar(self) -> bool:
        return bool(self.usable) and all(info.is_seestar for info in self.usable)


@dataclass
class MosaicResult:
    status: str
    output_dir: Path
    report: dict[str, Any]
    science_path: Path | None = None
    preview_path: Path | None = None
    report_path: Path | None = None
    log_path: Path | None = None
    data: np.ndarray | None = None  # (C, H, W) linear
    alpha: np.ndarray | None = None
    coverage: np.ndarray | None = None  # (H, W) weighted frame count (the COVERAGE extension)
    count: np.ndarray | None = None  # (H, W) frames kept per pixel after rejection
    canvas: Canvas | None = None
    frames: list[FrameInfo] = field(default_factory=list)

    @property
    def wcs(self) -> Any:
        return None if self.canvas is None else self.canvas.wcs


# ----------------------------------------------------------------------------------- P1


def ingest(
    input_dir: Path,
    output_dir: Path | None,
    config: dict[str, Any],
    reporter: Reporter,
    include: Iterable[str | Path] | None = None,
    solve_cache_dir: Path | None = None,
    executor: Any = None,
) -> Generator[Event, None, IngestResult]:
    """Scan INPUT, read headers only, validate WCS; unusable files are excluded with a reason.

    With ``solve_cache_dir`` (a run's cache folder) frames without a valid WCS are plate-solved
    or given one by star matching (``solve_missing_wcs``); without it they are excluded.
    """
    if not input_dir.is_dir():
        raise UserError("input_error_missing", path=str(input_dir))
    found = scan_inputs(input_dir, output_dir)
    if include is not None:
        wanted = {str(Path(p).resolve()) for p in include}
        found = [p for p in found if str(p.resolve()) in wanted]
    reporter.info("ingest_info_found", count=len(found), path=str(input_dir))
    readable: list[FrameInfo] = []
    excluded: list[ExcludedFrame] = []
    # Many files are read by reader processes beside this one; the outcomes still come in order,
    # one per file, each as read_frame_info gives it. Closing this generator stops the readers.
    outcomes = iter_frame_infos(
        found,
        auto_detect_seestar=bool(config["auto_detect_seestar"]),
        force_seestar_mode=bool(config["force_seestar_mode"]),
        workers=int(config.get("num_workers") or 0),
    )
    with contextlib.closing(outcomes):
        for number, (path, outcome) in enumerate(zip(found, outcomes), start=1):
            if isinstance(outcome, FrameError):
                excluded.append(ExcludedFrame(str(path), outcome.reason_key, outcome.detail))
                reporter.warning(outcome.reason_key, path=str(path), detail=outcome.detail)
            else:
                readable.append(outcome)
            reporter.progress("P1", number, len(found), "progress_files", name=path.name)
            yield from reporter.pop_pending()
    astrometry: list[dict[str, Any]] = []
    if solve_cache_dir is not None and config["solve_missing_wcs"] and any(info.wcs is None for info in readable):
        readable, solve_failures, astrometry = yield from _solve_missing(
            readable, config, solve_cache_dir, reporter, executor
        )
        excluded.extend(solve_failures)
    usable: list[FrameInfo] = []
    for info in readable:
        if info.wcs is None:
            reason = info.wcs_reason or "frame_excluded_no_wcs"
            detail = info.wcs_detail or ""
            excluded.append(ExcludedFrame(str(info.path), reason, detail))
            reporter.warning(reason, path=str(info.path), detail=detail)
        else:
            usable.append(info)
    warnings: list[dict[str, Any]] = []
    sizes = sorted({info.shape for info in usable})
    if len(sizes) > 1:
        text = ", ".join(f"{w}x{h}" for h, w in sizes)
        warnings.append({"key": "frames_warn_mixed_sizes", "sizes": text})
        reporter.warning("frames_warn_mixed_sizes", sizes=text)
    reporter.info("ingest_info_summary", used=len(usable), excluded=len(excluded))
    yield from reporter.pop_pending()
    return IngestResult(found, usable, excluded, warnings, astrometry)


def _solve_missing(
    frames: list[FrameInfo], config: dict[str, Any], cache_dir: Path, reporter: Reporter, executor: Any = None
) -> Generator[Event, None, tuple[list[FrameInfo], list[ExcludedFrame], list[dict[str, Any]]]]:
    """Plate-solve or propagate a WCS to every frame that lacks one; failures are excluded with the reason."""
    from .astrometry import frame_with_wcs, solve_missing

    outcomes = yield from solve_missing(frames, config, cache_dir, reporter, executor)
    solved: list[FrameInfo] = []
    failures: list[ExcludedFrame] = []
    methods: list[dict[str, Any]] = []
    for info, outcome in zip(frames, outcomes):
        methods.append(outcome.to_dict())
        if outcome.wcs is not None and outcome.method != "header":
            solved.append(frame_with_wcs(info, outcome.wcs, outcome.wcs_status))
        elif outcome.wcs is None and info.wcs is None:
            # solve_missing has already logged the failure with its reason
            reason = outcome.reason_key or "frame_excluded_no_wcs"
            failures.append(ExcludedFrame(str(info.path), reason, outcome.report_detail))
        else:
            solved.append(info)
    return solved, failures, methods


# ----------------------------------------------------------------------------------- P2


def choose_workflow(requested: str, config: dict[str, Any], ingest_result: IngestResult) -> tuple[str, list[dict]]:
    """The workflow to run and the fallbacks taken to get there (design.md §2)."""
    fallbacks: list[dict[str, Any]] = []
    seestar = ingest_result.all_seestar
    if requested == "auto":
        if config["sds_mode"] and seestar:
            wanted = "sds"
        elif seestar:
            wanted = "mosaic_first"
        else:
            wanted = "classic"
    else:
        wanted = requested
    if wanted not in WORKFLOWS_AVAILABLE:
        fallbacks.append(
            {"from": wanted, "to": "mosaic_first", "reason_key": "workflow_fallback_not_available", "detail": wanted}
        )
        wanted = "mosaic_first"
    return wanted, fallbacks


def output_channels(frames: Sequence[FrameInfo]) -> int:
    """1 when every frame is mono, else 3 (mono frames are then repeated into R, G and B)."""
    return 1 if all(info.n_channels == 1 and info.layout == "mono" for info in frames) else 3


# ------------------------------------------------------------------------------- the run


def _provenance(config: dict[str, Any], workflow: str, n_frames: int) -> dict[str, tuple[Any, str]]:
    return {
        "WORKFLOW": (workflow, "napari-zemosaic workflow"),
        "NCOMBINE": (n_frames, "frames combined"),
        "NORMMETH": (config["stacking_normalize_method"], "photometric normalisation"),
        "WEIGHTS": (config["stacking_weighting_method"], "frame weighting"),
        "REJECT": (config["stacking_rejection_algorithm"], "pixel rejection"),
        "KAPPALO": (config["stacking_kappa_low"], "rejection kappa low"),
        "KAPPAHI": (config["stacking_kappa_high"], "rejection kappa high"),
        "COMBINE": (config["stacking_final_combine"], "combine method"),
        "RESAMPLE": (config["resample_method"], "resampling kernel"),
    }


class _FrozenHeap:
    """The objects alive at a point of a run kept out of the garbage collector's full passes
    (:func:`gc.freeze`) until :meth:`close`, the run's end.

    A run allocates hundreds of thousands of objects that live to its end (each frame's header
    cards, records and metrics), so the collector's full passes come back during the run, and
    each walks the whole heap, the program's modules included, holding the GIL: 50-60 ms each
    in a GPU run on one H100 host; a header pass of 520 files and 200 000 records took 4-5 of
    them, 0.35-0.43 s in all, on a development box, and 0.06 s with the heap frozen. Frozen
    objects are still freed by their reference counts; only cycles among them wait for
    :meth:`close`. Nothing is done where the program had frozen objects itself (the freeze is
    the process's).
    """

    def __init__(self) -> None:
        self.active = gc.get_freeze_count() == 0

    def freeze(self) -> None:
        """Keep every object alive now out of the full passes (again: the newer ones too)."""
        if self.active:
            gc.freeze()

    def close(self) -> None:
        """Give every frozen object back to the collector."""
        if self.active:
            self.active = False
            gc.unfreeze()


class _Run:
    """State and report of one run (helper of :func:`iter_run`)."""

    def __init__(self, input_dir: Path, output_dir: Path, config: dict[str, Any], ctx: RunContext) -> None:
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.config = config
        self.ctx = ctx
        self.started = time.time()
        #: P2's measuring process started before the header pass (engine/quality_device.py), or None.
        self.measuring_process: Any = None
        self.frozen_heap = _FrozenHeap()
        self.report: dict[str, Any] = {
            "status": "running",
            "version": __version__,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "input_dir": str(input_dir),
            "output_dir": str(output_dir),
            "workflow_requested": config["workflow"],
            "workflow_used": None,
            "fallbacks": [],
            "config": config,
            "frames": {"found": 0, "used": 0, "excluded": [], "warnings": []},
            "sds": None,
            "canvas": None,
            "compute": {"backend_by_stage": {}, "gpu": None, "gpu_fallbacks": []},
            "timings_s": ctx.timings_s,
            "peak_rss_mb": None,
            "outputs": {},
        }

    @property
    def base(self) -> str:
        return self.config["output_basename"]

    def report_path(self) -> Path:
        return self.output_dir / "run_report.json"

    def finish(self, status: str, error: dict[str, Any] | None = None) -> None:
        self.report["status"] = status
        if error:
            self.report["error"] = error
        manifest = self.ctx.manifest
        if manifest is not None:
            if status != "ok":
                try:  # what finished stays recorded for the next run into this OUTPUT
                    manifest.close(success=False)
                except Exception:  # a full disk here must not hide the run's own error
                    pass
            self.report["resume"] = manifest.report()
        self.report["elapsed_s"] = round(time.time() - self.started, 3)
        self.report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if self.ctx.policy is not None:
            self.report["compute"] = self.ctx.policy.summary_end() if status == "ok" else self.ctx.policy.to_report()
        self.report["outputs"].setdefault("log", str(self.output_dir / "zemosaic.log"))
        try:
            write_json(self.report_path(), self.report)
            self.report["outputs"]["report"] = str(self.report_path())
        except OSError:
            pass  # the folder vanished or filled up: the caller still gets the report in memory


def _build_policy(config: dict[str, Any], reporter: Reporter) -> Any:
    """The per-run GPU/CPU decision (engine/gpu.py); None means "numpy everywhere"."""
    try:
        from .gpu import ComputePolicy
    except ImportError:  # gpu.py is optional in minimal installs
        return None
    return ComputePolicy.from_config(config, reporter=reporter)


def iter_run(
    input_dir: str | Path,
    output_dir: str | Path,
    config: dict[str, Any] | None = None,
    *,
    include: Iterable[str | Path] | None = None,
    listeners: Sequence[Callable[[Event], None]] = (),
    cancel_event: threading.Event | None = None,
) -> Generator[Event, None, MosaicResult]:
    """Run the whole pipeline; yields events, returns the :class:`MosaicResult`.

    ``include`` restricts the run to these input files (the napari Frame filter's selection).
    Raises :class:`UserError` for problems the user can fix (exit code 2 in the CLI).
    """
    input_dir, output_dir = Path(input_dir).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    config = validate_config(config or {})
    try:
        check_output_dir(output_dir)
    except OutputError as exc:
        raise UserError(exc.key, **exc.params) from None
    from .resume import RunLock

    # One run per OUTPUT at a time; taken before the log is opened so a refused run touches nothing.
    lock = RunLock(output_dir, version=__version__).acquire()
    try:
        log_listener = LogFileListener(str(output_dir / "zemosaic.log"), config["language"], mode="w")
    except BaseException:
        lock.release()  # napari lives on: a folder must never stay locked by a run that never started
        raise
    reporter = Reporter([log_listener, *listeners])
    lock.emit_warnings(reporter)
    cache_dir = Path(config["cache_dir"]) if config["cache_dir"] else output_dir / ".zemosaic_cache"
    ctx = RunContext(config, reporter, output_dir, cache_dir, cancel_event=cancel_event or threading.Event())
    run = _Run(input_dir, output_dir, config, ctx)
    try:
        reporter.info("run_info_start", version=__version__, input=str(input_dir), output=str(output_dir))
        from .distributed import open_scheduler, scheduler_report

        with ctx.timed("setup"):  # the GPU's start and a local cluster's: outside every phase
            from .worker_env import start_process_server, wants_device

            start_process_server(wants_device(config))  # its imports overlap the GPU's start
            _open_manifest(run, lock)
            ctx.policy = _build_policy(config, reporter)
            if ctx.policy is not None:
                ctx.policy.summary_start()
            ctx.executor = open_scheduler(config, reporter, ctx.cache_dir)  # None: every unit runs here
        run.report["scheduler"] = scheduler_report(ctx.executor)
        yield from ctx.drain()
        result = yield from _run_body(run, include)
        return result
    except UserError as exc:
        reporter.error(exc.key, **exc.params)
        run.finish("failed", {"key": exc.key, "params": exc.params})
        yield from reporter.pop_pending()
        raise
    except (RunCancelled, GeneratorExit, KeyboardInterrupt):
        reporter.warning("run_warn_cancelled")
        run.finish("cancelled")
        raise
    except Exception as exc:
        reporter.error("run_error_internal", error=f"{type(exc).__name__}: {exc}")
        run.finish("failed", {"key": "run_error_internal", "detail": traceback.format_exc()})
        raise
    finally:
        from .distributed import close_scheduler

        close_scheduler(ctx)
        log_listener.close()
        lock.release()


@contextlib.contextmanager
def _disk_full_as_message(folder: Path, needed_bytes: int) -> Iterator[None]:
    """A write that hits a full disk becomes ``disk_error_insufficient_space`` (the writers leave
    no partial file under a final name), not an internal error."""
    from .resume import InsufficientSpaceError

    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            raise
        raise InsufficientSpaceError(folder, needed_bytes, shutil.disk_usage(folder).free) from None


def _write_outputs_side_by_side(write_science: Callable[[], Any], write_preview: Callable[[], Any], preview: Path) -> None:
    """The science FITS and the preview written at once (the FITS is mostly I/O and byte swapping,
    the preview's stretch and PNG compression mostly release the GIL); each writer is atomic on
    its own. When the science file fails the preview goes too: no run leaves a preview without
    its mosaic."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="zemosaic-preview") as pool:
        preview_job = pool.submit(write_preview)
        try:
            write_science()
        except BaseException:
            with contextlib.suppress(Exception):
                preview_job.result()
            preview.unlink(missing_ok=True)
            raise
        preview_job.result()


def _count_wcs_units(manifest: Any, astrometry: Sequence[dict[str, Any]]) -> None:
    """Solved WCS live in the solver's own cache (``cache/wcs``); count them with the other units."""
    if manifest is None:
        return
    for entry in astrometry:
        method = entry.get("method")
        if method == "cached":
            manifest.note("wcs", entry["path"], "reused")
        elif method in ("solved", "propagated"):
            manifest.note("wcs", entry["path"], "computed")
    manifest.log_summary("wcs")


def _open_manifest(run: _Run, lock: Any) -> None:
    """Clear what a killed run was writing (the lock proves it is dead) and load its finished units."""
    from .resume import UnitManifest, clean_interrupted_writes

    ctx = run.ctx
    removed = clean_interrupted_writes(run.output_dir, ctx.cache_dir)
    if removed:
        ctx.reporter.info("resume_info_partial_removed", count=len(removed))
    ctx.manifest = UnitManifest.for_run(ctx, __version__)
    ctx.manifest.emit_pending()
    run.report["resume"] = ctx.manifest.report()


def _run_body(run: _Run, include: Iterable[str | Path] | None) -> Generator[Event, None, MosaicResult]:
    from .quality_device import early_measuring_process

    # P2's measuring process on the device, when P2 will likely run there beside P3: its start
    # (a CUDA context, the measurement's kernels) overlaps the header pass.
    run.measuring_process = early_measuring_process(run.config, run.ctx.policy, run.ctx.executor)
    run.frozen_heap.freeze()  # the program's modules and state: the bulk of the heap
    try:
        return (yield from _run_stages(run, include))
    finally:
        run.frozen_heap.close()
        if run.measuring_process is not None:
            run.measuring_process.close()


def _run_stages(run: _Run, include: Iterable[str | Path] | None) -> Generator[Event, None, MosaicResult]:
    ctx, config, reporter = run.ctx, run.config, run.ctx.reporter

    # P1 ------------------------------------------------------------------------------
    with ctx.timed("P1"):
        ingested = yield from ingest(run.input_dir, run.output_dir, config, reporter, include, ctx.cache_dir,
                                     ctx.executor)
    frames_report = run.report["frames"]
    frames_report["found"] = len(ingested.found)
    frames_report["excluded"] = [e.to_dict() for e in ingested.excluded]
    frames_report["warnings"] = ingested.warnings
    frames_report["astrometry"] = ingested.astrometry
    _count_wcs_units(ctx.manifest, ingested.astrometry)
    if not ingested.usable:
        raise UserError("run_error_no_usable_frames", found=len(ingested.found), excluded=len(ingested.excluded))

    # P4: the global canvas ------------------------------------------------------------
    # Laid out from every frame the header pass kept, so quality verdicts never move it: P3 may
    # then resample frames while P2 still measures them, and a changed quality rule keeps the
    # resampled frames of a resumed run. The autocrop trims what only rejected frames covered.
    frames = ingested.usable
    with ctx.timed("P4"):
        canvas = build_canvas(
            [info.wcs for info in frames],
            [info.shape for info in frames],
            pixel_scale_arcsec=float(config["canvas_pixel_scale_arcsec"]),
            padding_pct=float(config["canvas_padding_pct"]),
        )
        reporter.info("canvas_info_built", width=canvas.shape[1], height=canvas.shape[0])
    yield from ctx.drain()
    run.frozen_heap.freeze()  # and the frames' records, headers and WCS, which live to the run's end
    n_channels = output_channels(frames)

    # P2, then P3 / P4.5 / P5: stacking -------------------------------------------------
    if _quality_alongside_reprojection(run, ingested):
        stacked = yield from _mosaic_first_beside_quality(run, ingested, canvas, n_channels)
    else:
        with ctx.timed("P2"):
            ingested.usable = yield from _quality_filter(run, ingested.usable)
        if not ingested.usable:
            raise UserError(
                "run_error_no_usable_frames", found=len(ingested.found), excluded=len(frames_report["excluded"])
            )
        _choose_and_report_workflow(run, ingested)
        yield from ctx.drain()
        frames = ingested.usable
        stacked = yield from _stack_with_workflow(run, frames, canvas, n_channels)
    for index, key, detail in stacked.frames_failed:
        frames_report["excluded"].append(ExcludedFrame(str(frames[index].path), key, detail).to_dict())
    used_frames = [frames[i] for i in stacked.frames_used]
    frames_report["used"] = len(used_frames)
    frames_report["normalisation"] = [
        {"path": str(frames[i].path), **stacked.normalisation.to_report(i)} for i in stacked.frames_used
    ]
    if not used_frames:
        raise UserError("run_error_no_usable_frames", found=len(ingested.found), excluded=len(frames_report["excluded"]))

    with ctx.timed("P5"):
        data, weight, count, canvas = _crop(stacked, config)
        alpha = alpha_from_coverage(weight, data)
        run.report["canvas"] = canvas.to_dict()
        run.report["canvas"]["block_side"] = stacked.block_side
        run.report["canvas"]["spilled"] = stacked.spilled
    yield from ctx.drain()

    # P6: outputs -------------------------------------------------------------------------
    with ctx.timed("P6"):
        science = run.output_dir / f"{run.base}_science.fits"
        preview = run.output_dir / f"{run.base}_preview.png"
        # Science FITS (data + alpha + coverage planes) and a preview: say so before writing any.
        needed = data.nbytes + alpha.nbytes + weight.nbytes + 2**20
        with _disk_full_as_message(run.output_dir, needed):
            ensure_free_space(run.output_dir, needed)
            percentiles = tuple(float(p) for p in config["preview_stretch_percentiles"][:2])
            _write_outputs_side_by_side(
                lambda: write_science_fits(science, data, alpha, weight, canvas.header(),
                                           _provenance(config, run.report["workflow_used"], len(used_frames))),
                lambda: write_preview_png(preview, data, alpha, int(config["preview_max_side"]), percentiles),  # type: ignore[arg-type]
                preview,
            )  # fmt: skip
        run.report["outputs"].update({"science": str(science), "preview": str(preview)})
        reporter.info("run_info_outputs", science=str(science), preview=str(preview))
    reporter.info("run_info_done", frames=len(used_frames), seconds=round(time.time() - run.started, 1))
    with ctx.timed("cleanup"):  # the cache's removal (cache_retention)
        ctx.manifest.close(success=True)
    run.finish("ok")
    yield from ctx.drain()
    return MosaicResult(
        status="ok",
        output_dir=run.output_dir,
        report=run.report,
        science_path=science,
        preview_path=preview,
        report_path=run.report_path(),
        log_path=run.output_dir / "zemosaic.log",
        data=data,
        alpha=alpha,
        coverage=weight,
        count=count,
        canvas=canvas,
        frames=used_frames,
    )


def judge_frames(
    frames: list[FrameInfo], config: dict[str, Any], reporter: Reporter, executor: Any = None, manifest: Any = None,
    measure: Any = None, defer_units: bool = False, star_writer: Any = None,
) -> Generator[Event, None, tuple[list[Any], list[Any]]]:
    """Quality metrics of every frame (stored on ``FrameInfo.metrics``) and the rules' decisions.

    With the run's ``executor`` (engine/distributed.py) each frame is measured by a task;
    ``measure`` (one frame's metrics) replaces the default measurement otherwise. With
    ``defer_units`` the ``metrics`` resume units (star files, signatures, records) are written on
    a thread once the metrics are known (:meth:`~.resume.UnitManifest.defer`), not as they come;
    ``star_writer`` then writes the star files of the frames it measured (:class:`_MetricsUnits`).
    """
    from .distributed import measure_options, measures_in_run_process
    from .quality import REASON_NO_VALID_PIXELS, REASON_UNREADABLE, apply_quality_rules, measure_frames

    if measures_in_run_process(executor):
        reporter.info("scheduler_info_metrics_local")
    measure_config, options = measure_options(executor, config)
    if measure is not None and "measure" not in options:
        options["measure"] = measure
    units = _MetricsUnits(manifest, frames, defer=defer_units, star_writer=star_writer) if manifest is not None else None
    metrics = yield from measure_frames(frames, measure_config, reporter, units=units, **options)
    if units is not None:
        units.record(metrics)
    for info, metric in zip(frames, metrics):
        info.metrics = metric.filter_values()
    decisions = apply_quality_rules(metrics, config)
    for index, metric in enumerate(metrics):
        # Unreadable pixels are not a quality verdict: the loader excludes those frames with the exact reason.
        if getattr(metric, "reason", None) in (REASON_NO_VALID_PIXELS, REASON_UNREADABLE):
            decisions[index] = dataclasses.replace(decisions[index], accepted=True)
    return metrics, decisions


def _metrics_signature(manifest: Any, info: FrameInfo) -> str:
    # The frame by its digest: the same content as the frame itself, and where a reader process
    # already computed it (Mosaic-First's P3), no canonical form of the frame is made again in
    # this process (500 of them were a third of the deferred records' Python beside P5).
    return manifest.signature("metrics", {"frame": manifest.frame_digest(info)})


class _MetricsUnits:
    """The ``metrics`` resume units of one :func:`judge_frames`: a frame's star list in a small
    ``.npz``, its scalar metrics in the manifest record.

    :func:`~.quality.measure_frames` calls :meth:`load` for each frame just before it would send
    it to its pool (the signature, computed once a frame, overlaps the measurement of the frames
    sent before); the worker that measures a frame writes its star file (:meth:`star_file`), and
    :meth:`store` takes note of it as the frame comes back (or writes it here, e.g. for a frame
    measured by a scheduler's task); :meth:`record` records the units in frame order once the
    transparency, part of the record, is known.

    ``star_writer`` (deferred units): ``{frame index: star file}`` -> ``{frame index: SHA-256}`` of
    the files it wrote, e.g. :meth:`.quality_device.DeviceMeasurer.write_star_files`, whose
    measuring process holds the star lists and a GIL of its own; :meth:`record` writes the others.
    """

    def __init__(self, manifest: Any, frames: Sequence[FrameInfo], defer: bool = False,
                 star_writer: Callable[[dict[int, Path]], dict[int, str]] | None = None) -> None:
        from collections import Counter

        from .quality import FrameMetrics

        self.defer = defer
        self.star_writer = star_writer
        self.manifest = manifest
        self.frames = frames
        self.folder = manifest.cache_dir / "units" / "metrics"
        self.signatures: dict[int, str] = {}
        self.known: set[int] = set()
        self.written: dict[int, tuple[Path, str]] = {}  # index -> (star file, its SHA-256)
        self.paths: dict[int, Path] = {}
        self.scalar_fields = {f.name for f in dataclasses.fields(FrameMetrics)} - {"stars"}
        # A manifest that came with no unit at all (a first run into OUTPUT, resume off) has none
        # to look up: the frames go to the pool at once, their signatures are computed as they
        # come back (for the record).
        self.may_reuse = bool(manifest.previous_units)
        # Frames that share an input path share a unit (its key and file): their star files are
        # written at record time, in frame order, so that the last record names the file in place.
        self.shared_keys = {key for key, count in Counter(str(info.path) for info in frames).items() if count > 1}

    def signature(self, index: int) -> str:
        if index not in self.signatures:
            self.signatures[index] = _metrics_signature(self.manifest, self.frames[index])
        return self.signatures[index]

    def star_file(self, index: int) -> Path | None:
        """Where the worker that measures frame ``index`` writes its star list (one name per input
        path; none when the units are deferred: :meth:`record` writes them)."""
        if self.defer or str(self.frames[index].path) in self.shared_keys:
            return None
        return self._star_path(index)

    def _star_path(self, index: int) -> Path:
        if index not in self.paths:
            name = hashlib.sha256(str(self.frames[index].path).encode("utf-8")).hexdigest()[:24]
            self.paths[index] = self.folder / f"{name}.npz"
        return self.paths[index]

    def load(self, index: int) -> Any:
        """The metrics an earlier run into this OUTPUT measured for frame ``index``, if still valid."""
        from .quality import FrameMetrics, StarList
        from .resume import load_unit_arrays

        if not self.may_reuse:
            return None
        unit_key = str(self.frames[index].path)
        record = self.manifest.lookup_record("metrics", unit_key, self.signature(index))
        if record is None:
            # An outdated record goes now: its star file is rewritten during the measurement, long
            # before the new record (a run killed in between must not leave a record whose file
            # changed under it).
            self.manifest.forget("metrics", unit_key)
            return None
        try:
            stars = load_unit_arrays(record.path)
            values = {key: (float("nan") if value is None and key not in ("reason",) else value)
                      for key, value in record.meta.items() if key in self.scalar_fields}
            metric = FrameMetrics(**values, stars=StarList(stars["x"], stars["y"], stars["flux"]))
        except (OSError, KeyError, ValueError, TypeError):
            self.manifest.forget("metrics", unit_key)
            return None
        self.known.add(index)
        return metric

    def store(self, index: int, metric: Any, star_sha256: str | None = None) -> None:
        """As a measured frame comes back: note the star file its worker wrote (``star_sha256``),
        else write it here. Not for an unreadable frame (not a finished unit), nor for frames
        that share their input path (see ``shared_keys``)."""
        from .quality import UNRECORDED_REASONS

        if self.defer or index in self.known or metric.reason in UNRECORDED_REASONS or str(self.frames[index].path) in self.shared_keys:
            return
        self.written[index] = self._write(index, metric) if star_sha256 is None else (self._star_path(index), star_sha256)
        self.signature(index)  # for the record, while the pool measures the other frames

    def _write(self, index: int, metric: Any) -> tuple[Path, str]:
        from .resume import save_unit_arrays

        path = self._star_path(index)
        return path, save_unit_arrays(path, durable=False, x=metric.stars.x, y=metric.stars.y, flux=metric.stars.flux)

    def record(self, metrics: Sequence[Any]) -> None:
        """Record every frame measured by this run (transparency included), in frame order; on a
        thread when the units are deferred."""
        if self.defer:
            self.manifest.defer("metrics", lambda: self._record(metrics))
            return
        self._record(metrics)
        self.manifest.log_summary("metrics")

    def _record(self, metrics: Sequence[Any]) -> None:
        from .quality import UNRECORDED_REASONS

        if self.star_writer is not None:
            wanted = {index: self._star_path(index) for index, (info, metric) in enumerate(zip(self.frames, metrics))
                      if index not in self.known and index not in self.written and metric.reason not in UNRECORDED_REASONS
                      and str(info.path) not in self.shared_keys}
            for index, digest in self.star_writer(wanted).items():
                self.written[index] = (wanted[index], digest)
        for index, (info, metric) in enumerate(zip(self.frames, metrics)):
            if index in self.known or metric.reason in UNRECORDED_REASONS:
                continue  # an unreadable frame is not a finished unit: the loader says why, every run
            path, digest = self.written.get(index) or self._write(index, metric)
            values = {f.name: getattr(metric, f.name) for f in dataclasses.fields(metric) if f.name != "stars"}
            self.manifest.record("metrics", str(info.path), self.signature(index), path, sha256=digest, meta=values)
            if self.defer:
                # Beside P5, whose stacking threads give the GIL away at each kernel launch and
                # queue to take it back: without a pause here they waited up to a switch interval
                # (5 ms) per launch behind these records (one H100: P5 0.46-0.70 s against 0.39-0.49 s).
                time.sleep(0)


def _quality_filter(
    run: _Run, frames: list[FrameInfo], reporter: Any = None, workers: int = 0, measure: Any = None,
    star_writer: Any = None,
) -> Generator[Event, None, list[FrameInfo]]:
    """Measure every frame (stars, FWHM, elongation, background, transparency) and apply the rules.

    Rejected frames are listed with the rule, the value and the threshold; nothing is deleted.
    ``reporter``: the run's by default (a :class:`_QuietReporter` when this runs on a thread);
    ``workers`` > 0 sizes the measuring pool when the config leaves it automatic; ``measure``
    replaces the measurement of one frame (:func:`~.quality.measure_frames`' ``measure``), and
    ``star_writer`` writes the star files of the frames it measured (see :class:`_MetricsUnits`).
    """
    from .quality import excluded_entries

    ctx, config = run.ctx, run.config
    reporter = reporter if reporter is not None else ctx.reporter
    measure_config = {**config, "num_workers": workers} if workers > 0 and not config.get("num_workers") else config
    metrics, decisions = yield from judge_frames(
        frames, measure_config, reporter, ctx.executor, ctx.manifest, measure, defer_units=measure is not None,
        star_writer=star_writer,
    )
    run.report["frames"]["metrics"] = [
        {**metric.to_dict(), "decision": decision.to_dict()} for metric, decision in zip(metrics, decisions)
    ]
    if not config["quality_rejection"]:
        return frames
    rejected = excluded_entries(metrics, decisions)
    for entry in rejected:
        reporter.warning(entry["reason_key"], path=entry["path"], **entry.get("params", {}))
    run.report["frames"]["excluded"].extend(rejected)
    reporter.info("quality_info_rejected", rejected=len(rejected), frames=len(frames))
    yield from reporter.pop_pending()
    ctx.check_cancelled()
    return [info for info, decision in zip(frames, decisions) if decision.accepted]


def _choose_and_report_workflow(run: _Run, ingested: IngestResult) -> str:
    with run.ctx.timed("P2"):
        workflow, fallbacks = choose_workflow(run.config["workflow"], run.config, ingested)
        for fallback in fallbacks:
            run.ctx.reporter.warning(fallback["reason_key"], workflow=fallback["from"], to=fallback["to"])
        run.report["fallbacks"].extend(fallbacks)
        run.report["workflow_used"] = workflow
        run.ctx.reporter.info("run_info_workflow", workflow=workflow, frames=len(ingested.usable))
    return workflow


def _quality_alongside_reprojection(run: _Run, ingested: IngestResult) -> bool:
    """Whether P2 measures on a thread while Mosaic-First resamples every frame (P3).

    Only when the workflow is Mosaic-First whatever P2 rejects (a subset of Seestar frames is
    still Seestar), frames run in this process (no scheduler), and, with ``auto``, the GPU
    resamples: the measurement then has the host's cores while the device resamples.
    """
    setting = run.config.get("quality_beside_reprojection", "auto")
    if setting == "off" or run.ctx.executor is not None:
        return False
    if choose_workflow(run.config["workflow"], run.config, ingested)[0] != "mosaic_first":
        return False
    if setting == "on":
        return True
    policy = run.ctx.policy
    return policy is not None and policy.uses_gpu("reproject")


class _QuietReporter:
    """The run's reporter for a generator driven on a thread: it logs and reports progress as
    usual, but leaves the events for the run's own generator to yield, in one stream."""

    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reporter, name)

    def pop_pending(self) -> list[Event]:
        return []


class _QualityBeside:
    """P2 (:func:`_quality_filter`) driven on a thread; :meth:`rejected` waits for its verdicts.

    Mosaic-First calls :meth:`rejected` after resampling every frame (``verdicts``), drops the
    frames it names and stacks the others, as if P2 had run first. :meth:`close` stops the
    measurement at its next frame (a failed or cancelled run).
    """

    def __init__(self, run: _Run, ingested: IngestResult) -> None:
        self._run, self._ingested = run, ingested
        self._frames = list(ingested.usable)
        #: With the GPU resampling and the ``quality`` stage on the GPU, the frames are measured
        #: on the device from the raw planes P3 decodes there (engine/quality_device.py).
        self.device_measurer = None
        policy = run.ctx.policy
        if policy is not None and policy.uses_gpu("reproject") and policy.uses_gpu("quality"):
            from .quality_device import DeviceMeasurer

            self.device_measurer = DeviceMeasurer(self._frames, policy, process=run.measuring_process)
        self._stop = threading.Event()
        self._accepted: list[FrameInfo] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._measure, name="zemosaic-quality", daemon=True)
        self._thread.start()

    def _measure(self) -> None:
        ctx = self._run.ctx
        # Fewer measuring processes than cores: the device thread, its loaders and the grid
        # readers need cores of their own, or the resampling they feed slows down more than
        # the measurement gains (measured on one H100 host of 16 cores).
        workers = max(1, (os.cpu_count() or 1) - CORES_LEFT_TO_RESAMPLING)
        if self.device_measurer is not None:
            workers = min(workers, DEVICE_MEASURE_THREADS)
        measure = None if self.device_measurer is None else self.device_measurer.measure
        star_writer = None if self.device_measurer is None else self.device_measurer.write_star_files
        measuring = _quality_filter(self._run, self._frames, _QuietReporter(ctx.reporter), workers, measure,
                                    star_writer)
        try:
            with ctx.timed("P2"):
                while True:
                    if self._stop.is_set() or ctx.cancel_event.is_set():
                        measuring.close()
                        return
                    try:
                        next(measuring)
                    except StopIteration as stop:
                        self._accepted = stop.value
                        return
        except BaseException as exc:  # raised in the run's thread by rejected()
            self._error = exc

    def rejected(self, frames: Sequence[FrameInfo]) -> Generator[Event, None, set[int]]:
        """Indices into ``frames`` (the frames given to P3) that P2 rejected; yields events meanwhile.

        Raises what P2 raised, and ``run_error_no_usable_frames`` when it rejected every frame."""
        ctx = self._run.ctx
        while self._thread.is_alive():
            self._thread.join(0.05)
            yield from ctx.drain()
        yield from ctx.drain()
        if self._error is not None:
            raise self._error
        assert self._accepted is not None
        self._ingested.usable = self._accepted
        if not self._accepted:
            raise UserError("run_error_no_usable_frames", found=len(self._ingested.found),
                            excluded=len(self._run.report["frames"]["excluded"]))
        kept = {id(info) for info in self._accepted}
        return {index for index, info in enumerate(frames) if id(info) not in kept}

    def close(self) -> None:
        if self.device_measurer is not None:
            self.device_measurer.close()
        self._stop.set()
        self._thread.join()


def _mosaic_first_beside_quality(
    run: _Run, ingested: IngestResult, canvas: Canvas, n_channels: int
) -> Generator[Event, None, CanvasStack]:
    """Mosaic-First over every frame the header pass kept, with P2 measuring on a thread."""
    quality = _QualityBeside(run, ingested)
    try:
        _choose_and_report_workflow(run, ingested)
        yield from run.ctx.drain()
        return (yield from mosaic_first(list(ingested.usable), canvas, run.ctx, n_channels, verdicts=quality))
    finally:
        quality.close()


def _stack_with_workflow(
    run: _Run, frames: list[FrameInfo], canvas: Canvas, n_channels: int
) -> Generator[Event, None, CanvasStack]:
    """P3–P5 of the chosen workflow; SDS never crashes a run: any SDS failure falls back to Mosaic-First."""
    ctx, reporter = run.ctx, run.ctx.reporter
    if run.report["workflow_used"] == "sds":
        from .sds import non_seestar_count, record_sds_fallback, run_sds, sds_applicable

        if sds_applicable(frames)[0]:
            try:
                outcome = yield from run_sds(frames, canvas, ctx, n_channels)
            except (RunCancelled, GeneratorExit, KeyboardInterrupt):
                raise
            except Exception as exc:  # logged with its reason and recorded in the report's fallbacks
                run.report["fallbacks"].append(record_sds_fallback(reporter, exc))
                run.report["workflow_used"] = "mosaic_first"
                yield from ctx.drain()
            else:
                run.report["sds"] = outcome.report
                return outcome.stack
        else:
            # Not all Seestar: SDS is off and the normal workflow for such data runs on every frame.
            reporter.info("sds_info_disabled_not_seestar", non_seestar=non_seestar_count(frames), frames=len(frames))
            run.report["workflow_used"] = "classic"
            yield from ctx.drain()
    if run.report["workflow_used"] == "classic":
        from .classic import run_classic

        outcome = yield from run_classic(frames, canvas, ctx, n_channels)
        run.report["classic"] = outcome.report
        return outcome.stack
    return (yield from mosaic_first(frames, canvas, ctx, n_channels))


def _crop(stacked: CanvasStack, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, Canvas]:
    data, weight, count, canvas = stacked.data, stacked.weight, stacked.count, stacked.canvas
    if not config["autocrop"]:
        return data, weight, count, canvas
    covered = weight > 0
    if not covered.any():
        return data, weight, count, canvas
    rows, cols = autocrop_slices(covered, int(config["autocrop_margin_px"]))
    return (
        contiguous_copy(data[:, rows, cols]),
        contiguous_copy(weight[rows, cols]),
        contiguous_copy(count[rows, cols]),
        crop_canvas(canvas, (rows, cols)),
    )


def drain(generator: Generator[Event, None, Any], on_event: Callable[[Event], None] | None = None) -> Any:
    """Run an engine generator to the end; ``on_event`` sees every event; returns its result."""
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)


def run(
    input_dir: str | Path,
    output_dir: str | Path,
    config: dict[str, Any] | None = None,
    on_event: Callable[[Event], None] | None = None,
    **kwargs: Any,
) -> MosaicResult:
    """Drain :func:`iter_run` (for scripts and tests); ``on_event`` sees every event."""
    return drain(iter_run(input_dir, output_dir, config, **kwargs), on_event)


def log_messages(events: Iterable[Event]) -> list[LogEvent]:
    return [event for event in events if isinstance(event, LogEvent)]

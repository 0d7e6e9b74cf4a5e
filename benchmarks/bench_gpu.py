"""GPU benchmarks: resampling, stacking and end-to-end Mosaic-First on an NVIDIA GPU.

Three measurements, each a side-by-side comparison taken in one run (medians after a warm-up):

* ``resample`` — one full-size frame (1080×1920×3 float32, TAN-SIP, rotated 10°) resampled onto
  a canvas cut-out (the frames and grid of ``bench_resample.py``): ``reproject.reproject_interp``
  (CPU), our ``reproject_frame`` on NumPy (CPU) and on CuPy (GPU, frame already on the device,
  control grid computed on the host as in the pipeline), plus the device sampling alone and the
  GPU run including the host→device copy of the frame. Rates in output Mpx/s (3 channels each).
* ``stack`` — ``stack_cube`` with kappa-sigma and winsorized clipping on a 100×3×1080×1920 cube
  (sky + noise, NaN bands of partial coverage, outliers): GPU on the whole cube, CPU on a
  1/8 row slice (same values per sample), as values/s.
* ``strip`` (not in the default set) — the cube of one P5 block strip (500 frames × 3 × 256 ×
  1024, each frame a band of columns, NaN elsewhere): ``stack_cube`` and its fused sort alone.
* ``e2e`` — ``zemosaic``'s pipeline (Mosaic-First, kappa-sigma) on N full-size demo frames
  written to disk first (process pool). Reports frames/s, the phases, the P3 breakdown
  (reading and decoding vs canvas mapping vs device work) and the read-only ceiling: the same
  reader pool reading and decoding every file with nothing else to do. ``--cli-runs K`` adds K
  command-line runs (``zemosaic run FRAMES OUT --gpu on``), each a new process timed whole:
  imports, CUDA's start and the worker processes' server included.

    python benchmarks/bench_gpu.py --out results/ [--frames 500] [--only resample stack e2e] [--quick]

Writes ``gpu_bench.json`` (and a log) to ``--out``; prints a short table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RESULTS: dict[str, Any] = {}
STAGE_REJECTION = "none"  # rejection of the Mosaic-First stage runs (--stage-rejection)
PIPELINE_ONLY = False  # --pipeline-only: e2e runs only the whole pipeline (--pipeline-repeats times)
PIPELINE_REPEATS = 1
KEEP_PAGE_CACHE = False  # --keep-page-cache: the stage runs start from a warm page cache
PROFILE = False  # --profile: cProfile of the main thread during the last --pipeline-only run
SAMPLE = False  # --sample: every thread's stacks sampled during the last --pipeline-only run
STEP_TIMES = False  # --step-times: the device unit's steps timed during the last --pipeline-only run
MARKS = False  # --marks: chosen calls and the collector's passes timed during the last --pipeline-only run
CLI_RUNS = 0  # --cli-runs: command-line runs after the --pipeline-only runs, each a new process
PIPELINE_SET: dict[str, Any] = {}  # --set KEY=VALUE: config of the --pipeline-only runs (JSON values)


def log(message: str) -> None:
    print(message, flush=True)


def save(out: Path) -> None:
    (out / "gpu_bench.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        import cupy

        properties = cupy.cuda.runtime.getDeviceProperties(0)
        free, total = cupy.cuda.runtime.memGetInfo()
        info.update({
            "gpu": properties["name"].decode() if isinstance(properties["name"], bytes) else str(properties["name"]),
            "gpu_total_mb": round(total / 2**20),
            "cupy": cupy.__version__,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        })
    except Exception as exc:  # a CPU-only machine: the GPU parts are skipped
        info["gpu"] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        import astropy

        info["astropy"] = astropy.__version__
    except ImportError:
        pass
    return info


def gpu_time(function: Callable[[], Any], repeats: int, warmup: bool = True) -> tuple[float, list[float], Any]:
    """Median wall seconds of a GPU function (synchronised), after one warm-up unless told not to."""
    import cupy

    result = None
    if warmup:
        result = function()
        cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def cpu_time(function: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    result = function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


# ------------------------------------------------------------------------------ resampling


def bench_resample(repeats: int, cpu_repeats: int) -> dict[str, Any]:
    import cupy
    from reproject import reproject_interp

    from bench_resample import FRAME_SHAPE, make_canvas_cutout, make_frame_data, make_frame_wcs
    from napari_zemosaic.engine.mosaic_first import sample_control_grid
    from napari_zemosaic.engine.reproject import compute_control_grid, reproject_frame

    frame_wcs = make_frame_wcs()
    data = make_frame_data()
    cutout = make_canvas_cutout(frame_wcs)
    shape_out = (data.shape[0], *cutout.shape)
    out_mpx = cutout.shape[0] * cutout.shape[1] / 1e6

    ref_s, ref_times, (ref, _) = cpu_time(
        lambda: reproject_interp((data, frame_wcs), cutout.wcs, shape_out=shape_out, order="bilinear"), cpu_repeats
    )
    cpu_s, cpu_times, (bbox, cpu_out, _) = cpu_time(
        lambda: reproject_frame(data, frame_wcs, cutout.wcs, cutout.shape, xp=np), cpu_repeats
    )
    device_data = cupy.asarray(data)
    gpu_s, gpu_times, (gbbox, gpu_out, _) = gpu_time(
        lambda: reproject_frame(device_data, frame_wcs, cutout.wcs, cutout.shape, xp=cupy), repeats
    )
    upload_s, upload_times, _ = gpu_time(
        lambda: reproject_frame(cupy.asarray(data), frame_wcs, cutout.wcs, cutout.shape, xp=cupy)[1].get(), repeats
    )
    grid = compute_control_grid(frame_wcs, FRAME_SHAPE, cutout.wcs, bbox)
    sample_s, sample_times, _ = gpu_time(
        lambda: sample_control_grid(device_data, grid, "bilinear", cupy, 1 << 30), repeats
    )
    difference = float(np.nanmax(np.abs(cupy.asnumpy(gpu_out) - cpu_out)))
    y0, y1, x0, x1 = bbox
    box_mpx = (y1 - y0) * (x1 - x0) / 1e6
    rows = {
        "reproject_interp_cpu": {"median_s": ref_s, "times_s": ref_times, "mpx_per_s": out_mpx / ref_s},
        "ours_cpu": {"median_s": cpu_s, "times_s": cpu_times, "mpx_per_s": box_mpx / cpu_s},
        "ours_gpu": {"median_s": gpu_s, "times_s": gpu_times, "mpx_per_s": box_mpx / gpu_s},
        "ours_gpu_with_upload_and_download": {"median_s": upload_s, "mpx_per_s": box_mpx / upload_s},
        "ours_gpu_sampling_only": {"median_s": sample_s, "times_s": sample_times, "mpx_per_s": box_mpx / sample_s},
    }
    return {
        "frame_shape": list(data.shape),
        "output_shape": list(shape_out),
        "bbox_px": [y1 - y0, x1 - x0],
        "rates": rows,
        "gpu_vs_reproject_interp": ref_s / gpu_s * (box_mpx / out_mpx),
        "gpu_vs_ours_cpu": cpu_s / gpu_s,
        "gpu_sampling_vs_reproject_interp": (box_mpx / sample_s) / (out_mpx / ref_s),
        "max_abs_gpu_minus_cpu": difference,
        "bbox_equal": list(gbbox) == list(bbox),
    }


# ------------------------------------------------------------------------------ stacking


def make_cube_on_device(n_frames: int, shape: tuple[int, int], seed: int = 1) -> Any:
    """(N, 3, H, W) float32 on the device: sky + noise, partial coverage (NaN bands), outliers."""
    import cupy

    rng = cupy.random.default_rng(seed)
    height, width = shape
    sky = cupy.asarray(np.array([1000.0, 900.0, 800.0], dtype=np.float32))[:, None, None]
    cube = cupy.empty((n_frames, 3, height, width), dtype=cupy.float32)
    host_rng = np.random.default_rng(seed)
    for frame in range(n_frames):
        cube[frame] = sky + 10.0 * rng.standard_normal((3, height, width), dtype=cupy.float32)
        cut = int(host_rng.integers(0, width // 5))
        if frame % 2:
            cube[frame, :, :, :cut] = cupy.nan
        else:
            cube[frame, :, :cut // 2, :] = cupy.nan
        if frame % 10 == 3:  # a satellite trail: 50 σ along a diagonal band
            rows = cupy.arange(height)
            cube[frame, :, rows, (rows * width // height) % width] += 500.0
    return cube


def bench_stack(
    n_frames: int, shape: tuple[int, int], repeats: int, cpu_rows: int, full_cube_limit_s: float = 60.0
) -> dict[str, Any]:
    import cupy

    from napari_zemosaic.engine import gpu
    from napari_zemosaic.engine.stack import StackParams, stack_cube

    cube = make_cube_on_device(n_frames, shape)
    weights = np.random.default_rng(2).uniform(0.5, 1.5, n_frames).astype(np.float32)
    device_weights = cupy.asarray(weights)
    values = cube.size
    results: dict[str, Any] = {"cube_shape": list(cube.shape), "values": int(values), "cpu_rows": cpu_rows}
    small = cube[:, :, :64, :256].copy()
    host_slice = cupy.asnumpy(cube[:, :, :cpu_rows, :])
    device_slice = cube[:, :, :cpu_rows, :].copy()
    for rejection in ("kappa_sigma", "winsorized_sigma_clip"):
        params = StackParams(rejection=rejection)
        stack_cube(small, params, weights=device_weights, xp=cupy)  # compile the kernels
        pool = cupy.get_default_memory_pool()
        # The same slice as the CPU first: it says whether the whole cube fits the time limit.
        slice_s, _, slice_result = gpu_time(
            lambda: stack_cube(device_slice, params, weights=device_weights, xp=cupy), 1, warmup=False
        )
        gpu_slice = cupy.asnumpy(slice_result.data)
        del slice_result
        target = cube if slice_s * values / device_slice.size <= full_cube_limit_s else device_slice
        pool.free_all_blocks()
        before = pool.total_bytes()
        timed_repeats = repeats if slice_s < 5.0 else 1  # a slow rejection: one timed run is enough
        gpu_s, gpu_times, result = gpu_time(
            lambda: stack_cube(target, params, weights=device_weights, xp=cupy), timed_repeats, warmup=False
        )
        high_water = pool.total_bytes() - before
        del result
        cpu_s, cpu_times, cpu_result = cpu_time(lambda: stack_cube(host_slice, params, weights=weights, xp=np), 1)
        finite = np.isfinite(cpu_result.data) & np.isfinite(gpu_slice)
        model = gpu.kernel_bytes_per_pixel("stack", channels=3, frames=n_frames, rejection=rejection)
        results[rejection] = {
            "gpu_cube_shape": list(target.shape),
            "gpu_median_s": gpu_s,
            "gpu_times_s": gpu_times,
            "gpu_values_per_s": target.size / gpu_s,
            "gpu_slice_s": slice_s,
            "gpu_pool_high_water_mb": round(high_water / 2**20),
            "gpu_model_mb": round(model * shape[0] * shape[1] / 2**20),
            "cpu_slice_s": cpu_s,
            "cpu_values_per_s": host_slice.size / cpu_s,
            "cpu_full_cube_s_extrapolated": values / (host_slice.size / cpu_s),
            "gpu_speedup": (target.size / gpu_s) / (host_slice.size / cpu_s),
            "max_abs_gpu_minus_cpu": float(np.max(np.abs(gpu_slice[finite] - cpu_result.data[finite]))),
        }
        log(f"stack {rejection}: GPU {gpu_s:.2f} s on {list(target.shape)} ({target.size / gpu_s / 1e6:.0f} Mvalues/s), "
            f"CPU {host_slice.size / cpu_s / 1e6:.1f} Mvalues/s, pool high water {high_water / 2**30:.1f} GiB")
        pool.free_all_blocks()
    del cube, device_slice
    return results


def bench_strip(n_frames: int, repeats: int) -> dict[str, Any]:
    """The cube of one P5 block strip (``n_frames`` × 3 × 256 × 1024): each frame covers a band of
    columns, NaN elsewhere, as dithered frames on a block. ``stack_cube`` (kappa-sigma, weights)
    and its fused sort alone, for a wide and a narrow band (62 % and 25 % of the values finite)."""
    import cupy

    from napari_zemosaic.engine import gpu
    from napari_zemosaic.engine.stack import StackParams, stack_cube

    height, width = 256, 1024
    results: dict[str, Any] = {}
    params = StackParams()
    for cover in (0.625, 0.25):
        cube = cupy.random.default_rng(1).standard_normal((n_frames, 3, height, width), dtype=cupy.float32)
        cube = cube * 10 + 100
        span = int(width * cover)
        for frame in range(n_frames):
            start = int(np.random.default_rng(frame).integers(0, width - span + 1))
            cube[frame, :, :, :start] = cupy.nan
            cube[frame, :, :, start + span:] = cupy.nan
        weights = cupy.asarray(np.random.default_rng(2).uniform(0.5, 1.5, n_frames).astype(np.float32))
        columns = cube.reshape(n_frames, -1)
        stack_s, stack_times, _ = gpu_time(lambda: stack_cube(cube, params, weights=weights, xp=cupy), repeats)
        sort_s, sort_times, _ = gpu_time(lambda: gpu._sorted_finite_columns(columns, cupy), repeats)
        # The shared-memory network alone, which the register sort replaces up to its depth.
        sorted_out = cupy.empty(columns.shape, dtype=cupy.float32)
        counts = cupy.empty(columns.shape[1], dtype=cupy.int32)
        shared_s, shared_times, _ = gpu_time(
            lambda: gpu._sort_finite_columns_in_shared_memory(columns, sorted_out, counts, cupy), repeats
        )
        finite = float(cupy.isfinite(cube).mean())
        results[f"cover_{cover}"] = {"finite_share": finite, "values": int(cube.size), "stack_cube_s": stack_s,
                                     "stack_cube_times_s": stack_times, "sort_s": sort_s, "sort_times_s": sort_times,
                                     "shared_memory_sort_s": shared_s, "shared_memory_sort_times_s": shared_times}
        log(f"strip {list(cube.shape)}, {100 * finite:.0f} % finite: stack_cube {stack_s * 1e3:.2f} ms "
            f"({cube.size / stack_s / 1e9:.1f} Gvalues/s), fused sort {sort_s * 1e3:.2f} ms "
            f"(the shared-memory sort alone {shared_s * 1e3:.2f} ms)")
        del sorted_out, counts
        del cube, columns
    return results


# ------------------------------------------------------------------------------ device pass


def launch_overhead_us(repeats: int = 2000) -> dict[str, float]:
    """Host time per CuPy call on small arrays: what bounds a pass made of many small kernels."""
    import cupy

    a = cupy.ones(1024, dtype=cupy.float32)
    b = cupy.ones(1024, dtype=cupy.float32)
    (a + b).sum()
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        c = a + b
    cupy.cuda.Device().synchronize()
    add = (time.perf_counter() - start) / repeats * 1e6
    start = time.perf_counter()
    for _ in range(repeats // 4):
        float(c.sum())
    sync = (time.perf_counter() - start) / (repeats // 4) * 1e6
    start = time.perf_counter()
    for _ in range(repeats // 4):
        cupy.median(a)
    median = (time.perf_counter() - start) / (repeats // 4) * 1e6
    return {"elementwise_call_us": add, "reduce_and_sync_us": sync, "median_1k_us": median}


def bench_device_pass(frames_dir: Path, n_frames: int, thread_counts: list[int]) -> dict[str, Any]:
    """Where the device time of one frame goes, and device units/s with several threads."""
    import cupy
    from concurrent.futures import ThreadPoolExecutor

    from napari_zemosaic.config import default_config
    from napari_zemosaic.engine import frames as frames_module
    from napari_zemosaic.engine import gpu, mosaic_first
    from napari_zemosaic.engine.canvas import build_canvas
    from napari_zemosaic.engine.debayer import correct_hot_pixels, debayer_bilinear
    from napari_zemosaic.engine.photometry import coarse_piece

    config = default_config()
    paths = sorted(frames_dir.glob("*.fit"))[:n_frames]
    infos = [frames_module.read_frame_info(path) for path in paths]
    canvas = build_canvas([i.wcs for i in infos], [i.shape for i in infos])
    hosts = [mosaic_first.prepare_frame_on_host(info, index, canvas, 0.01) for index, info in enumerate(infos)]
    gpu.ensure_cupy_pool_initialized(0)
    sync = cupy.cuda.Device().synchronize

    def step_times(host: Any, info: Any) -> dict[str, float]:
        marks: dict[str, float] = {}
        last = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal last
            sync()
            now = time.perf_counter()
            marks[name] = (now - last) * 1e3
            last = now

        pixels = cupy.asarray(host.pixels)
        mark("upload_ms")
        data = frames_module._to_chw(pixels, info.layout, info.shape, cupy).astype(cupy.float32)
        mark("convert_ms")
        plane, _ = correct_hot_pixels(data[0], info.bayer_pattern, 8.0, cupy)
        mark("hot_pixels_ms")
        data = debayer_bilinear(plane, info.bayer_pattern, cupy)
        mark("debayer_ms")
        frames_module.estimate_background_noise(data, cupy).get()
        mark("noise_ms")
        out, _ = mosaic_first.sample_control_grid(data, host.grid, "bilinear", cupy, 1 << 30)
        mark("sampling_ms")
        piece = coarse_piece(out, host.grid.bbox, mosaic_first.PHOTOMETRY_BIN_PX)
        cupy.asnumpy(piece.data)
        mark("coarse_ms")
        store = mosaic_first.PieceStore(None, on_device=True)
        frame = mosaic_first.ReprojectedFrame(host.index, tuple(host.grid.bbox), out, np.ones(3))
        mosaic_first._split_into_blocks(frame, 1024, store, canvas.shape)
        mark("split_ms")
        return marks

    for host, info in zip(hosts[:3], infos[:3]):
        step_times(host, info)  # compile every kernel
    steps = [step_times(host, info) for host, info in zip(hosts, infos)]
    breakdown = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
    breakdown["total_ms"] = sum(breakdown.values())

    def unit(host: Any, streams: Any) -> None:
        with streams.scope():
            frame = mosaic_first.reproject_host_frame(host, infos[host.index], config, 3, cupy, 32 * 2**30)
            cupy.asnumpy(frame.coarse.data)
            stream = cupy.cuda.get_current_stream()
            stream.synchronize()

    throughput = {}
    for threads in thread_counts:
        streams = gpu.WorkerStreams(cupy)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda h: unit(h, streams), hosts[: 2 * threads]))  # warm every thread's stream
            start = time.perf_counter()
            list(pool.map(lambda h: unit(h, streams), hosts))
            elapsed = time.perf_counter() - start
        streams.close()
        throughput[str(threads)] = len(hosts) / elapsed
        log(f"device units, {threads} threads: {len(hosts) / elapsed:.1f} frames/s")
    return {"frames": len(hosts), "breakdown_ms": breakdown, "units_per_s_by_threads": throughput,
            "launch_overhead": launch_overhead_us()}


# ------------------------------------------------------------------------------ end to end

_NIGHT: Any = None


def _render_one(position: int) -> None:
    from napari_zemosaic.engine import demo

    plan = _NIGHT.frames[position]
    path = Path(_NIGHT_DIR) / plan.truth.file_name
    demo._write_fits_atomic(path, demo._render_frame(_NIGHT, plan), demo._frame_header(_NIGHT.spec, plan))


_NIGHT_DIR = ""


def generate_frames(directory: Path, n_frames: int, panels: tuple[int, int], workers: int) -> float:
    """Write a demo night with a pool of forked processes (run before CUDA is initialised)."""
    global _NIGHT, _NIGHT_DIR
    from napari_zemosaic.engine import demo

    directory.mkdir(parents=True, exist_ok=True)
    per_panel = -(-n_frames // (panels[0] * panels[1]))
    spec = demo.DemoSpec(panels=panels, frames_per_panel=per_panel, scale=1.0, seed=7)
    start = time.perf_counter()
    _NIGHT = demo._plan_night(spec)
    _NIGHT_DIR = str(directory)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_render_one, range(len(_NIGHT.frames)), chunksize=4)
    return time.perf_counter() - start


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean cached pages (root only), so that reads really hit the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_only_rates(frames_dir: Path, single: int) -> dict[str, Any]:
    """Reading and decoding alone: astropy in one process, and the GPU path's reader pool."""
    from concurrent.futures import ProcessPoolExecutor

    from napari_zemosaic.engine import mosaic_first, worker_env
    from napari_zemosaic.engine.canvas import build_canvas
    from napari_zemosaic.engine.frames import _read_raw_image, _scaled_pixels, read_frame_info

    paths = sorted(frames_dir.glob("*.fit"))
    start = time.perf_counter()
    infos = [read_frame_info(path) for path in paths]
    header_s = time.perf_counter() - start
    start = time.perf_counter()
    for info in infos[:single]:
        raw, header = _read_raw_image(info)
        _scaled_pixels(raw, header)
    one_process = single / (time.perf_counter() - start)
    canvas = build_canvas([i.wcs for i in infos], [i.shape for i in infos])
    readers = mosaic_first._reader_count({})
    with ProcessPoolExecutor(readers, mp_context=worker_env.process_context()) as pool:
        list(pool.map(mosaic_first.prepare_frame_on_host, infos[:readers], range(readers),
                      [canvas] * readers, [0.01] * readers))  # start the workers
        start = time.perf_counter()
        hosts = list(pool.map(mosaic_first.prepare_frame_on_host, infos, range(len(infos)),
                              [canvas] * len(infos), [0.01] * len(infos), chunksize=2))
        pool_s = time.perf_counter() - start
    return {
        "frames": len(paths),
        "header_pass_frames_per_s": len(paths) / header_s,
        "astropy_read_decode_one_process_frames_per_s": one_process,
        "reader_pool_processes": readers,
        "reader_pool_frames_per_s": len(paths) / pool_s,
        "reader_pool_read_s_per_frame": statistics.median(h.read_s for h in hosts),
        "reader_pool_grid_s_per_frame": statistics.median(h.grid_s for h in hosts),
    }


def stage_run(infos: list[Any], canvas: Any, work: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Mosaic-First alone (P3, P4.5, P5) on frames already ingested, with its own GPU policy."""
    from napari_zemosaic.config import validate_config
    from napari_zemosaic.engine.context import RunContext
    from napari_zemosaic.engine.gpu import ComputePolicy
    from napari_zemosaic.engine.mosaic_first import mosaic_first
    from napari_zemosaic.events import Reporter

    settings = validate_config({"language": "en", **config})
    reporter = Reporter()
    policy = ComputePolicy.from_config(settings, reporter)
    ctx = RunContext(settings, reporter, work, work / "cache", policy=policy)
    start = time.perf_counter()
    generator = mosaic_first(infos, canvas, ctx, 3)
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            stacked = stop.value
            break
    wall = time.perf_counter() - start
    policy.close()
    details = {e.key: e.params for e in reporter.log_events if e.key.startswith(("mf_debug", "mf_info_plan", "quality_debug"))}
    return {"config": config, "frames": len(stacked.frames_used), "wall_s": wall,
            "frames_per_s": len(stacked.frames_used) / wall, "timings_s": dict(ctx.timings_s),
            "p3_frames_per_s": len(stacked.frames_used) / ctx.timings_s["P3"], "details": details,
            "compute": policy.to_report()}


def e2e_run(
    frames_dir: Path, out: Path, config: dict[str, Any], include: list[Path] | None = None, limit_s: float = 1e9
) -> dict[str, Any]:
    """The whole pipeline; stopped (closed, as a cancel) once ``limit_s`` have passed."""
    from napari_zemosaic.engine.pipeline import drain, iter_run

    events: list[Any] = []
    start = time.perf_counter()
    generator = iter_run(frames_dir, out, {"language": "en", "workflow": "mosaic_first", **config}, include=include)

    def on_event(event: Any) -> None:
        events.append(event)
        if time.perf_counter() - start > limit_s:
            raise TimeoutError

    with _phase_spans(start) as spans:
        try:
            result = drain(generator, on_event)
        except TimeoutError:
            generator.close()
            phases = [getattr(event, "phase", "") for event in events]
            report = json.loads((out / "run_report.json").read_text())
            return {"config": config, "stopped_after_s": time.perf_counter() - start,
                    "phase": next((phase for phase in reversed(phases) if phase), ""),
                    "timings_s": report.get("timings_s"), "frames_found": report["frames"]["found"]}
    wall = time.perf_counter() - start
    log(f"timeline (s from the run's start; {wall:.2f} s in all): "
        + ", ".join(f"{phase} {t0:.2f}-{t1:.2f}" for phase, t0, t1 in spans))
    used = result.report["frames"]["used"]
    details = {e.key: e.params for e in events if getattr(e, "key", "").startswith(("mf_debug", "mf_info_plan", "quality_debug"))}
    timings = result.report["timings_s"]
    return {
        "config": config,
        "frames": used,
        "wall_s": wall,
        "frames_per_s": used / wall,
        "frames_per_s_after_ingest": used / max(1e-9, wall - timings.get("P1", 0.0)),
        "p3_frames_per_s": used / max(1e-9, timings.get("P3", 0.0)),
        "timings_s": timings,
        "phase_spans_s": spans,
        "details": details,
        "compute": result.report["compute"],
        "canvas": result.report["canvas"]["shape"],
        "peak_rss_mb": result.report["peak_rss_mb"],
    }


@contextlib.contextmanager
def _phase_spans(start: float) -> Iterator[list[tuple[str, float, float]]]:
    """Record every ``RunContext.timed`` span (phase, start, end; seconds after ``start``), in
    the order they end: where the whole run's time goes, and what lies between the phases."""
    from napari_zemosaic.engine.context import RunContext

    spans: list[tuple[str, float, float]] = []
    original = RunContext.timed

    @contextlib.contextmanager
    def recorded(self: Any, phase: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            with original(self, phase):
                yield
        finally:
            spans.append((phase, begin - start, time.perf_counter() - start))

    RunContext.timed = recorded  # type: ignore[method-assign]
    try:
        yield spans
    finally:
        RunContext.timed = original  # type: ignore[method-assign]


#: Functions of engine/mosaic_first.py timed by --step-times (called through its module globals).
TIMED_STEPS = ("reproject_host_frame", "frame_pixels", "correct_hot_pixels", "debayer_bilinear",
               "estimate_background_noise", "sample_control_grid", "coarse_piece", "_cut_device_pieces", "accept_frame")


@contextlib.contextmanager
def _calls_timed(
    targets: list[tuple[Any, str, str]], on_call: Callable[[str, float, float], None]
) -> Iterator[None]:
    """Wrap each ``(owner, attribute, label)`` of ``targets`` (a module's function or a class's
    method, called through its owner) so that ``on_call(label, start, end)`` sees every call, in
    the calling thread, until the block ends."""
    originals = []
    for owner, attribute, label in targets:
        function = getattr(owner, attribute)
        originals.append((owner, attribute, function))

        def timed(*args: Any, _function: Any = function, _label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                on_call(_label, start, time.perf_counter())

        setattr(owner, attribute, timed)
    try:
        yield
    finally:
        for owner, attribute, function in reversed(originals):
            setattr(owner, attribute, function)


@contextlib.contextmanager
def _step_timers() -> Iterator[dict[str, list[float]]]:
    """Wrap :data:`TIMED_STEPS` with wall-clock accumulators for the duration of the block.

    Nested steps count in both (``reproject_host_frame`` holds most others); ``accept_frame`` is the
    run's thread filing a finished frame (``mosaic_first._split_into_blocks``)."""
    from napari_zemosaic.engine import mosaic_first

    totals: dict[str, list[float]] = {}
    names = {"accept_frame": "_split_into_blocks"}
    lock = threading.Lock()

    def add(label: str, start: float, end: float) -> None:
        with lock:
            entry = totals.setdefault(label, [0.0, 0])
            entry[0] += end - start
            entry[1] += 1

    with _calls_timed([(mosaic_first, names.get(label, label), label) for label in TIMED_STEPS], add):
        yield totals


#: What --marks times in the last run (module, owner in it or "", attribute): the header pass's
#: reads, P2's parts and its end, what runs while the run waits for P2's verdicts, P4.5's steps,
#: P5's blocks and the deferred metric records. Called through their owners, so the wrappers see
#: every call.
MARKED_CALLS = (
    ("frames", "", "_read_outcome"),
    ("frames", "", "_unship"),
    ("quality_device", "DeviceMeasurer", "_measure_part"),
    ("quality_device", "DeviceMeasurer", "finish"),
    ("quality_device", "DeviceMeasurer", "write_star_files"),
    ("quality", "", "assign_transparency"),
    ("mosaic_first", "MosaicUnits", "names"),
    ("mosaic_first", "_PhotometryAhead", "coarsen"),
    ("photometry", "", "overlap_edges"),
    ("photometry_device", "DevicePairFits", "gain_ratios"),
    ("photometry_device", "DevicePairFits", "plane_fits"),
    ("photometry", "", "_graph_solve"),
    ("mosaic_first", "", "_stack_block_unit"),
    ("pipeline", "_MetricsUnits", "_record"),
)
#: Marks printed call by call (the others only as counts and totals).
MARKS_IN_FULL = {"_measure_part", "finish", "write_star_files", "assign_transparency", "names", "coarsen",
                 "overlap_edges", "gain_ratios", "plane_fits", "_stack_block_unit", "_record", "gc2"}


@contextlib.contextmanager
def _call_marks(start: float) -> Iterator[list[tuple[str, float, float, str]]]:
    """``(label, start, end, thread)`` of every call of :data:`MARKED_CALLS` and of the garbage
    collector's passes (``gc0``-``gc2``), in seconds after ``start``, for the block's duration."""
    import gc
    import importlib

    marks: list[tuple[str, float, float, str]] = []

    def add(label: str, begin: float, end: float) -> None:
        marks.append((label, begin - start, end - start, threading.current_thread().name))

    targets = []
    for module_name, owner_name, attribute in MARKED_CALLS:
        module = importlib.import_module(f"napari_zemosaic.engine.{module_name}")
        targets.append((getattr(module, owner_name) if owner_name else module, attribute, attribute))
    began: dict[int, float] = {}

    def collected(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[info["generation"]] = time.perf_counter()
        elif info["generation"] in began:
            add(f"gc{info['generation']}", began.pop(info["generation"]), time.perf_counter())

    gc.callbacks.append(collected)
    try:
        with _calls_timed(targets, add):
            yield marks
    finally:
        gc.callbacks.remove(collected)


def _report_marks(marks: list[tuple[str, float, float, str]]) -> str:
    """Counts, totals and first/last times of each mark, then the calls of :data:`MARKS_IN_FULL` in order."""
    lines = ["calls (s from the run's start):"]
    summary: dict[str, list[float]] = {}
    for label, begin, end, _ in marks:
        entry = summary.setdefault(label, [0, 0.0, begin, end])
        entry[0] += 1
        entry[1] += end - begin
        entry[2], entry[3] = min(entry[2], begin), max(entry[3], end)
    for label, (count, total, first, last) in summary.items():
        lines.append(f"  {label:24s} {int(count):4d} calls, {total:.3f} s in all, {first:.3f}-{last:.3f}")
    for label, begin, end, thread in sorted(marks, key=lambda mark: mark[1]):
        if label in MARKS_IN_FULL:
            lines.append(f"    {begin:.3f}-{end:.3f} ({end - begin:.3f}) {label} [{thread}]")
    return "\n".join(lines)


def cli_runs(frames_dir: Path, work: Path, count: int) -> list[dict[str, Any]]:
    """``count`` command-line runs on ``frames_dir``, each a new process into an empty folder, timed whole."""
    import shutil
    import subprocess

    runs = []
    for index in range(count):
        out = work / f"cli{index}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "napari_zemosaic.cli", "run", str(frames_dir), str(out),
                   "--workflow", "mosaic-first", "--gpu", "on", "--lang", "en"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        row: dict[str, Any] = {"returncode": done.returncode, "wall_s": wall}
        if done.returncode == 0:
            report = json.loads((out / "run_report.json").read_text())
            used = report["frames"]["used"]
            row.update(frames=used, frames_per_s=used / wall, timings_s=report["timings_s"],
                       peak_rss_mb=report["peak_rss_mb"])
        else:
            row["stderr_tail"] = done.stderr[-2000:]
        runs.append(row)
        log(f"command line, run {index + 1}: {wall:.2f} s, {row.get('frames_per_s', 0):.1f} frames/s "
            f"(exit {done.returncode}), timings {row.get('timings_s')}")
    return runs


def bench_e2e(
    frames_dir: Path, work: Path, n_frames: int, cpu_frames: int, thread_counts: list[int], full_limit_s: float,
    out: Path,
) -> dict[str, Any]:
    from napari_zemosaic.engine.canvas import build_canvas
    from napari_zemosaic.engine.frames import read_frame_info

    results: dict[str, Any] = {}
    RESULTS["e2e"] = results
    if PIPELINE_ONLY:  # the whole pipeline alone, page cache warm (the frames were just written or read)
        for repeat in range(PIPELINE_REPEATS):
            if PROFILE and repeat == PIPELINE_REPEATS - 1:  # the main thread's Python profile of the last run
                import cProfile
                import pstats

                profiler = cProfile.Profile()
                full = profiler.runcall(
                    e2e_run, frames_dir, work / f"full{repeat}", {"gpu_strict": True, **PIPELINE_SET}, limit_s=full_limit_s
                )
                profiler.dump_stats(str(out / "pipeline.prof"))
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
            elif STEP_TIMES and repeat == PIPELINE_REPEATS - 1:  # wall time of the device unit's steps
                with _step_timers() as steps:
                    full = e2e_run(frames_dir, work / f"full{repeat}", {"gpu_strict": True, **PIPELINE_SET},
                                   limit_s=full_limit_s)
                full["step_times_s"] = steps
                log("device unit steps (s, calls): " + ", ".join(f"{k} {v[0]:.3f}/{v[1]}" for k, v in steps.items()))
            elif MARKS and repeat == PIPELINE_REPEATS - 1:  # chosen calls and the collector, in time
                with _call_marks(time.perf_counter()) as marks:
                    full = e2e_run(frames_dir, work / f"full{repeat}", {"gpu_strict": True, **PIPELINE_SET},
                                   limit_s=full_limit_s)
                full["marks"] = marks
                log(_report_marks(marks))
            elif SAMPLE and repeat == PIPELINE_REPEATS - 1:  # every thread, by phase (thread_sampler.py)
                from thread_sampler import ThreadSampler

                sampler = ThreadSampler()
                with sampler.phases_recorded(), sampler.running():
                    full = e2e_run(frames_dir, work / f"full{repeat}", {"gpu_strict": True, **PIPELINE_SET},
                                   limit_s=full_limit_s)
                (out / "samples.txt").write_text(sampler.report(top=30) + "\n")
                log(sampler.report())
            else:
                full = e2e_run(frames_dir, work / f"full{repeat}", {"gpu_strict": True, **PIPELINE_SET}, limit_s=full_limit_s)
            results.setdefault("pipeline_runs", []).append(full)
            log(f"whole pipeline, default config, run {repeat + 1}: {full.get('frames_per_s')} frames/s, "
                f"timings {full.get('timings_s')}, {full.get('details', {}).get('mf_debug_gpu_p3')}, "
                f"P2 {full.get('details', {}).get('quality_debug_device')}")
            save(out)
        runs = results["pipeline_runs"]
        results["pipeline_gpu_default_config"] = sorted(runs, key=lambda r: r.get("wall_s", 1e9))[len(runs) // 2]
        if CLI_RUNS:
            results["cli_runs"] = cli_runs(frames_dir, work, CLI_RUNS)
            save(out)
        return results
    cold = False if KEEP_PAGE_CACHE else drop_page_cache()
    start = time.perf_counter()
    infos = [read_frame_info(path) for path in sorted(frames_dir.glob("*.fit"))[:n_frames]]
    results["header_pass_s"] = time.perf_counter() - start
    canvas = build_canvas([i.wcs for i in infos], [i.shape for i in infos])
    # Mosaic-First alone, without photometric normalisation (a CPU solve, timed in the full run)
    # and, for the device-thread comparison, without rejection (P5 is timed with kappa-sigma below).
    stage = {"gpu_strict": True, "stacking_normalize_method": "none"}
    p3_only = {**stage, "stacking_rejection_algorithm": STAGE_REJECTION}
    runs = []
    for position, threads in enumerate(thread_counts):
        run_result = stage_run(infos, canvas, work, {**p3_only, "gpu_threads": threads})
        run_result["cold_page_cache"] = cold and position == 0
        runs.append(run_result)
        log(f"Mosaic-First stage, {threads} device threads{' (cold cache)' if run_result['cold_page_cache'] else ''}: "
            f"{run_result['frames_per_s']:.1f} frames/s, P3 {run_result['p3_frames_per_s']:.1f} frames/s, "
            f"timings {run_result['timings_s']}, {run_result['details'].get('mf_debug_gpu_p3')}")
        save(out)
    results["stage_gpu"] = runs
    if cpu_frames:
        subset = infos[:cpu_frames]
        sub_canvas = build_canvas([i.wcs for i in subset], [i.shape for i in subset])
        cpu = stage_run(subset, sub_canvas, work, {"use_gpu_phase5": False, "stack_use_gpu": False,
                                                   "stacking_normalize_method": "none"})
        gpu_same = stage_run(subset, sub_canvas, work, stage)
        results["stage_cpu_vs_gpu_subset"] = {"cpu": cpu, "gpu": gpu_same, "speedup": cpu["wall_s"] / gpu_same["wall_s"]}
        log(f"Mosaic-First stage on {cpu_frames} frames: CPU {cpu['frames_per_s']:.2f} frames/s "
            f"(timings {cpu['timings_s']}), GPU {gpu_same['frames_per_s']:.1f} frames/s")
        save(out)
    results["read_only"] = read_only_rates(frames_dir, single=min(100, n_frames))
    log(f"read only: {results['read_only']}")
    save(out)
    full = e2e_run(frames_dir, work / "full", {"gpu_strict": True}, limit_s=full_limit_s)
    results["pipeline_gpu_default_config"] = full
    log(f"whole pipeline, default config: {full}")
    return results


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/zemosaic_gpu_bench"))
    parser.add_argument("--only", nargs="+", default=["device", "resample", "stack", "e2e"])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--panels", default="1x1")
    parser.add_argument("--cpu-frames", type=int, default=50)
    parser.add_argument("--stack-frames", type=int, default=100)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1, 3])
    parser.add_argument("--stage-rejection", default="none", help="rejection of the Mosaic-First stage runs")
    parser.add_argument("--full-limit-s", type=float, default=240.0, help="stop the whole-pipeline run after this")
    parser.add_argument("--pipeline-only", action="store_true", help="e2e: only the whole pipeline, no stage runs")
    parser.add_argument("--pipeline-repeats", type=int, default=1, help="e2e --pipeline-only: runs (median reported)")
    parser.add_argument("--cli-runs", type=int, default=0,
                        help="e2e --pipeline-only: then this many command-line runs, each a new process timed whole")
    parser.add_argument("--profile", action="store_true", help="e2e --pipeline-only: profile the last run")
    parser.add_argument("--step-times", action="store_true",
                        help="e2e --pipeline-only: wall time of the device unit's steps in the last run")
    parser.add_argument("--marks", action="store_true",
                        help="e2e --pipeline-only: when chosen calls and the collector's passes ran, in the last run")
    parser.add_argument("--sample", action="store_true",
                        help="e2e --pipeline-only: sample every thread's stack during the last run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e2e --pipeline-only: config")
    parser.add_argument("--keep-page-cache", action="store_true", help="e2e: do not drop the page cache first")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    args = parser.parse_args(argv)
    global STAGE_REJECTION, PIPELINE_ONLY, PIPELINE_REPEATS, KEEP_PAGE_CACHE, PROFILE, SAMPLE, STEP_TIMES, MARKS
    KEEP_PAGE_CACHE, PROFILE, SAMPLE, STEP_TIMES = args.keep_page_cache, args.profile, args.sample, args.step_times
    MARKS = args.marks
    global CLI_RUNS
    CLI_RUNS = max(0, args.cli_runs)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            PIPELINE_SET[key] = json.loads(value)
        except ValueError:
            PIPELINE_SET[key] = value
    STAGE_REJECTION = args.stage_rejection
    PIPELINE_ONLY, PIPELINE_REPEATS = args.pipeline_only, max(1, args.pipeline_repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    panels = tuple(int(v) for v in args.panels.split("x"))
    stack_shape = (1080, 1920)
    if args.quick:
        args.frames, args.cpu_frames, args.stack_frames, stack_shape = 48, 8, 10, (270, 480)
        args.threads = args.threads[:1]
        args.full_limit_s = 60.0

    frames_dir = args.work / "frames"
    if "e2e" in args.only or "device" in args.only:
        existing = len(list(frames_dir.glob("*.fit")))
        if existing < args.frames:
            seconds = generate_frames(frames_dir, args.frames, panels, os.cpu_count() or 4)
            RESULTS["generation"] = {"frames": args.frames, "seconds": seconds, "panels": list(panels)}
            log(f"generated {args.frames} full-size frames in {seconds:.1f} s")
    RESULTS["hardware"] = hardware()
    log(f"hardware: {RESULTS['hardware']}")
    save(args.out)
    if "device" in args.only:
        RESULTS["device_pass"] = bench_device_pass(frames_dir, 24 if args.quick else 60, [1, 2, 3])
        log(f"device pass: {RESULTS['device_pass']}")
        save(args.out)
    if "resample" in args.only:
        RESULTS["resample"] = bench_resample(repeats=3 if args.quick else 20, cpu_repeats=1 if args.quick else 3)
        rates = RESULTS["resample"]["rates"]
        log("resample Mpx/s: " + ", ".join(f"{k} {v['mpx_per_s']:.1f}" for k, v in rates.items()))
        save(args.out)
    if "stack" in args.only:
        cpu_rows = 16 if args.quick else 34
        RESULTS["stack"] = bench_stack(args.stack_frames, stack_shape, 1 if args.quick else 2, cpu_rows)
        save(args.out)
    if "strip" in args.only:
        RESULTS["strip"] = bench_strip(50 if args.quick else 500, 3 if args.quick else 9)
        save(args.out)
    if "e2e" in args.only:
        bench_e2e(frames_dir, args.work, args.frames, args.cpu_frames, args.threads, args.full_limit_s, args.out)
        save(args.out)
    summary(RESULTS)
    return 0


def summary(results: dict[str, Any]) -> None:
    log("=" * 78)
    log(f"hardware: {results.get('hardware')}")
    if "resample" in results:
        r = results["resample"]
        for name, row in r["rates"].items():
            log(f"  resample {name:36s} {row['mpx_per_s']:9.1f} Mpx/s  ({row['median_s'] * 1e3:8.2f} ms)")
        log(f"  GPU vs reproject_interp: {r['gpu_vs_reproject_interp']:.0f}x; GPU vs our CPU: {r['gpu_vs_ours_cpu']:.0f}x; "
            f"sampling only vs reproject_interp: {r['gpu_sampling_vs_reproject_interp']:.0f}x")
    if "stack" in results:
        s = results["stack"]
        for rejection in ("kappa_sigma", "winsorized_sigma_clip"):
            row = s[rejection]
            log(f"  stack {rejection:22s} GPU {row['gpu_median_s']:7.2f} s {row['gpu_values_per_s'] / 1e6:8.0f} Mv/s | "
                f"CPU {row['cpu_values_per_s'] / 1e6:6.1f} Mv/s (full cube ≈ {row['cpu_full_cube_s_extrapolated']:.0f} s) | "
                f"{row['gpu_speedup']:.0f}x")
    if "device_pass" in results:
        d = results["device_pass"]
        log(f"  device pass per frame (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in d["breakdown_ms"].items()))
        log(f"  device units/s by threads: {d['units_per_s_by_threads']}; launch overhead {d['launch_overhead']}")
    if "e2e" in results:
        e = results["e2e"]
        for run_result in e.get("stage_gpu", []):
            log(f"  stage {run_result['frames']} frames {run_result['config']}: {run_result['frames_per_s']:.1f} frames/s, "
                f"P3 {run_result['p3_frames_per_s']:.1f} frames/s, timings {run_result['timings_s']}")
        if "stage_cpu_vs_gpu_subset" in e:
            c = e["stage_cpu_vs_gpu_subset"]
            log(f"  stage subset CPU {c['cpu']['frames_per_s']:.2f} vs GPU {c['gpu']['frames_per_s']:.1f} frames/s "
                f"({c['speedup']:.0f}x)")
        if "read_only" in e:
            log(f"  read only: {e['read_only']}")
        full = e.get("pipeline_gpu_default_config")
        if full:
            log(f"  whole pipeline (default config): {full.get('frames_per_s', 'stopped')} frames/s, "
                f"timings {full.get('timings_s')}")


if __name__ == "__main__":
    sys.exit(main())

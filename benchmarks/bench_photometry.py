"""Photometric solve (P4.5): ``photometry.solve_normalisation`` on the coarse pieces of a real run.

The coarse pieces are those Mosaic-First hands to the solve (block means of the reprojected
frames): the pipeline runs on a demo night up to P4.5 (CPU), the pieces are saved to an ``.npz``
(``--pieces``) and the run stops there. Then the solve is timed as Mosaic-First calls it
(``shared_gain=True``), the batched pair fits (``pair_fits="batched"``, the default) against the
per-edge reference path (``pair_fits="reference"``), and the two results are compared.

    python benchmarks/bench_photometry.py --frames NIGHT/frames --count 200 --pieces /tmp/pieces200.npz
    python benchmarks/bench_photometry.py --pieces /tmp/pieces200.npz --repeats 3
    python benchmarks/bench_photometry.py --frames /tmp/zemosaic_gpu_bench/frames --count 500 --gpu \
        --pieces /tmp/pieces500.npz --repeats 1     # on a GPU machine, after bench_gpu.py made the frames

``--synthetic N`` solves N pieces shaped like a night's (:func:`synthetic`) instead of captured ones.
``--tile N`` repeats the captured pieces, shifted on the canvas, up to N pieces (a larger
overlap graph without rendering more frames). A night is made with
``zemosaic demo NIGHT --panels 1x1 --frames-per-panel 200 --no-run`` (full size).

``--baseline OLD.py`` times another copy of ``photometry.py`` beside this one, in the same process
and interleaved (``git show HEAD:src/napari_zemosaic/engine/photometry.py > /tmp/old.py``): the
fair comparison on a shared machine. ``--executor`` picks where the batched fits run
(``photometry.PAIR_EXECUTOR``: auto, threads, processes), ``--workers`` caps the worker processes,
``--per-channel`` solves per-channel gains as SDS does (``megatile_terms_from_frames``), and
``--device`` times the solve with its pair fits on the GPU (``xp=cupy``) too, interleaved,
and compares its result with the host's; ``--stages`` times the passes of one more solve (pool set-up, gain fits, plane fits). The first
solve of a process also starts the forkserver (inside a pipeline run the frame readers have
started it already), so compare medians of several repeats.

    python benchmarks/bench_photometry.py --pieces /tmp/pieces200.npz --baseline /tmp/old.py --repeats 3 --stages
    python benchmarks/bench_photometry.py --pieces /tmp/pieces200.npz --tile 499 --no-reference --workers 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from napari_zemosaic.engine import photometry  # noqa: E402
from napari_zemosaic.engine.photometry import CoarsePiece  # noqa: E402


class _Captured(Exception):
    pass


def capture(frames_dir: Path, count: int, destination: Path, gpu: bool = False) -> int:
    """Run the pipeline on ``count`` frames up to P4.5 and save the pieces the solve receives."""
    from napari_zemosaic.engine import mosaic_first
    from napari_zemosaic.engine.pipeline import iter_run

    paths = sorted(frames_dir.glob("*.fit"))
    include = paths[:: max(1, len(paths) // count)][:count]
    saved: dict[str, np.ndarray] = {}

    def grab(pieces, *args, **kwargs):
        for k, p in enumerate(pieces):
            saved[f"p{k}"] = p.data
            saved[f"o{k}"] = np.array([p.y0, p.x0])
        raise _Captured

    original = mosaic_first.solve_normalisation
    mosaic_first.solve_normalisation = grab
    config = {"workflow": "mosaic_first", "use_gpu_phase5": gpu, "stack_use_gpu": gpu}
    try:
        with tempfile.TemporaryDirectory() as out:
            generator = iter_run(frames_dir, out, config, include=include)
            try:
                for _ in generator:
                    pass
            except _Captured:
                pass
    finally:
        mosaic_first.solve_normalisation = original
    np.savez(destination, **saved)
    return len(saved) // 2


def load(path: Path) -> list[CoarsePiece]:
    with np.load(path) as data:
        n = len(data.files) // 2
        return [CoarsePiece(int(data[f"o{k}"][0]), int(data[f"o{k}"][1]), data[f"p{k}"]) for k in range(n)]


def tile(pieces: list[CoarsePiece], target: int) -> list[CoarsePiece]:
    """Repeat the pieces, each copy shifted by a few cells, up to ``target`` pieces."""
    out = list(pieces)
    copy = 1
    while len(out) < target:
        rng = np.random.default_rng(copy)
        for p in pieces:
            if len(out) >= target:
                break
            dy, dx = (int(v) for v in rng.integers(-6, 7, 2))
            out.append(CoarsePiece(p.y0 + dy, p.x0 + dx, p.data * np.float32(1 + 0.01 * copy)))
        copy += 1
    return out


def synthetic(count: int, seed: int = 0) -> list[CoarsePiece]:
    """Coarse pieces shaped like a night's without rendering frames: 1080×1920-px frames on 16-px
    cells (68 × 120 cells), each in the bounding box of its rotated footprint (NaN outside), in four
    dithered panels that overlap by a tenth; sky = smooth glow + bright cells, seen with a gain,
    an offset and noise per frame."""
    rng = np.random.default_rng(seed)
    height, width = 68, 120
    canvas = (2 * 60 + 160, 2 * 108 + 160)
    y, x = np.mgrid[: canvas[0], : canvas[1]].astype(np.float64)
    sky = 400.0 + 60.0 * np.sin(x / 37.0) * np.cos(y / 23.0) + 0.2 * x
    sky += (rng.random(canvas) < 0.05) * rng.uniform(20.0, 400.0, canvas)
    panels = [(80 + 60 * py, 108 + 108 * px) for py in (0, 1) for px in (0, 1)]
    pieces = []
    for k in range(count):
        cy, cx = panels[k % 4]
        cy, cx = cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8)
        angle = np.radians(20.0 + rng.uniform(-2, 2))
        cos, sin = np.cos(angle), np.sin(angle)
        half_h = 0.5 * (abs(height * cos) + abs(width * sin))
        half_w = 0.5 * (abs(width * cos) + abs(height * sin))
        y0, x0 = int(cy - half_h), int(cx - half_w)
        y1, x1 = min(int(cy + half_h) + 1, canvas[0]), min(int(cx + half_w) + 1, canvas[1])
        y0, x0 = max(y0, 0), max(x0, 0)
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        u = (gx - cx) * cos + (gy - cy) * sin
        v = -(gx - cx) * sin + (gy - cy) * cos
        inside = (np.abs(u) <= width / 2 - 1) & (np.abs(v) <= height / 2 - 1)
        gain, offset = rng.uniform(0.9, 1.05), rng.uniform(-20.0, 20.0)
        data = np.stack([f * (gain * sky[y0:y1, x0:x1] + offset) for f in (1.0, 0.8, 0.6)])
        data += rng.normal(0.0, 0.5, data.shape)
        data[:, ~inside] = np.nan
        pieces.append(CoarsePiece(y0, x0, data.astype(np.float32)))
    return pieces


def load_module(path: Path):
    """Another copy of photometry.py (e.g. ``git show REV:src/.../photometry.py > old.py``), timed beside this one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("photometry_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(
    pieces: list[CoarsePiece], repeats: int, pair_fits: str, module=photometry, shared_gain: bool = True, xp=np
) -> tuple[list[float], photometry.Normalisation]:
    times, result = [], None
    if module is not photometry:
        pieces = [module.CoarsePiece(p.y0, p.x0, p.data) for p in pieces]
    device = {} if xp is np else {"xp": xp, "device_budget_bytes": int(0.8 * xp.cuda.runtime.memGetInfo()[0])}
    for _ in range(repeats):
        start = time.perf_counter()
        result = module.solve_normalisation(
            pieces, None, "linear_fit", bin_px=photometry.PHOTOMETRY_BIN_PX, shared_gain=shared_gain, pair_fits=pair_fits,
            **device,
        )
        if xp is not np:
            xp.get_default_memory_pool().free_all_blocks()  # as the run's stage boundary does
        times.append(time.perf_counter() - start)
    return times, result


def compare(name: str, new: photometry.Normalisation, old: photometry.Normalisation) -> None:
    print(f"  {name}:")
    for field in ("gains", "offsets", "tilts"):
        a, b = getattr(new, field), getattr(old, field)
        scale = np.maximum(np.abs(b), 1e-12)
        print(f"    {field}: max |new - ref| = {np.max(np.abs(a - b)):.3g} (max relative {np.max(np.abs(a - b) / scale):.3g})")
    print(f"    constrained equal: {np.array_equal(new.constrained, old.constrained)}")


def stage_times(pieces: list[CoarsePiece], shared_gain: bool) -> list[str]:
    """One batched solve with the pair-fit runner's passes timed: where a solve's time goes."""
    runner = photometry._PairFitRunner
    lines: list[str] = []
    original_init, original_run = runner.__init__, runner._run

    def init(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        original_init(self, *args, **kwargs)
        lines.append(f"runner on {self.kind} ({self.workers} workers): {time.perf_counter() - start:.3f} s to set up")

    def run(self, kind, key, channels, edges, gains):
        start = time.perf_counter()
        out = original_run(self, kind, key, channels, edges, gains)
        lines.append(f"{kind} fits of {key} ({len(edges)} edges x {len(channels)} channels): {time.perf_counter() - start:.3f} s")
        return out

    runner.__init__, runner._run = init, run
    try:
        start = time.perf_counter()
        timed(pieces, 1, "batched", shared_gain=shared_gain)
        lines.append(f"whole solve: {time.perf_counter() - start:.3f} s")
    finally:
        runner.__init__, runner._run = original_init, original_run
    return lines


def median_line(label: str, times: list[float]) -> str:
    return f"{label:<24} {' '.join(f'{t:.2f}' for t in times)} s (median {statistics.median(times):.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, help="demo night frames directory (captures the pieces)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--gpu", action="store_true", help="capture with the GPU reprojection (faster)")
    parser.add_argument("--pieces", type=Path, help=".npz of coarse pieces (written by a capture)")
    parser.add_argument("--synthetic", type=int, default=0, help="this many synthetic pieces instead (no frames)")
    parser.add_argument("--tile", type=int, default=0, help="repeat the pieces up to this many")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip the per-pair reference path")
    parser.add_argument("--baseline", type=Path, help="another photometry.py: its batched solve is timed too")
    parser.add_argument("--per-channel", action="store_true", help="per-channel gains (as SDS calls it), not shared_gain")
    parser.add_argument("--workers", type=int, default=0, help="most worker processes (photometry.MAX_PAIR_PROCESSES)")
    parser.add_argument("--stages", action="store_true", help="then time the passes of one more batched solve")
    parser.add_argument("--device", action="store_true", help="also the pair fits on the GPU (CuPy), interleaved")
    parser.add_argument("--executor", choices=("auto", "threads", "processes"), default="auto",
                        help="where the batched pair fits run (photometry.PAIR_EXECUTOR)")
    args = parser.parse_args()

    if args.frames is not None:
        start = time.perf_counter()
        n = capture(args.frames, args.count, args.pieces, args.gpu)
        print(f"captured {n} pieces in {time.perf_counter() - start:.1f} s -> {args.pieces}")
    if args.synthetic:
        pieces = synthetic(args.synthetic)
    elif args.pieces is not None:
        pieces = load(args.pieces)
    else:
        parser.error("--pieces or --synthetic is needed")
    if args.tile:
        pieces = tile(pieces, args.tile)
    sizes = [p.data.shape[1] * p.data.shape[2] for p in pieces]
    edges = photometry.overlap_edges(photometry._piece_bounds(pieces))
    print(f"{len(pieces)} pieces, {pieces[0].data.shape[0]} channels, median {int(np.median(sizes))} cells, "
          f"{len(edges)} edges (before coarsening)")

    photometry.PAIR_EXECUTOR = args.executor
    if args.workers:
        photometry.MAX_PAIR_PROCESSES = args.workers
    print(f"{photometry._cpu_count()} cores; pair fits on {args.executor} "
          f"({'shared gain' if not args.per_channel else 'per-channel gains'})")
    shared = not args.per_channel
    # Interleaved repeats (new, baseline, reference, new, ...): a shared machine's load drifts.
    runs: dict[str, list[float]] = {"batched": [], "device": [], "baseline batched": [], "reference": []}
    results: dict[str, photometry.Normalisation] = {}
    baseline = load_module(args.baseline) if args.baseline else None
    for _ in range(args.repeats):
        times, results["batched"] = timed(pieces, 1, "batched", shared_gain=shared)
        runs["batched"] += times
        if args.device:
            import cupy

            times, results["device"] = timed(pieces, 1, "batched", shared_gain=shared, xp=cupy)
            runs["device"] += times
        if baseline is not None:
            times, results["baseline batched"] = timed(pieces, 1, "batched", baseline, shared_gain=shared)
            runs["baseline batched"] += times
        if not args.no_reference:
            times, results["reference"] = timed(pieces, 1, "reference", shared_gain=shared)
            runs["reference"] += times
    for label, times in runs.items():
        if times:
            print(median_line(label, times))
    new_median = statistics.median(runs["batched"])
    for label in ("baseline batched", "reference"):
        if runs[label]:
            print(f"speed-up over {label}: {statistics.median(runs[label]) / new_median:.2f}x")
    if runs["device"]:
        print(f"device over batched: {new_median / statistics.median(runs['device']):.2f}x")
        compare("device vs batched", results["device"], results["batched"])
    if "reference" in results:
        compare("batched vs reference", results["batched"], results["reference"])
    if "baseline batched" in results:
        compare("batched vs baseline batched", results["batched"], results["baseline batched"])
    if args.stages:
        print("\n".join(stage_times(pieces, shared)))

if __name__ == "__main__":
    main()

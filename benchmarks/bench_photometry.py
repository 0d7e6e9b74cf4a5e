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

``--tile N`` repeats the captured pieces, shifted on the canvas, up to N pieces (a larger
overlap graph without rendering more frames). A night is made with
``zemosaic demo NIGHT --panels 1x1 --frames-per-panel 200 --no-run`` (full size).
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
from napari_zemosaic.engine.photometry import CoarsePiece, solve_normalisation  # noqa: E402


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


def timed(pieces: list[CoarsePiece], repeats: int, pair_fits: str) -> tuple[list[float], photometry.Normalisation]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = solve_normalisation(
            pieces, None, "linear_fit", bin_px=photometry.PHOTOMETRY_BIN_PX, shared_gain=True, pair_fits=pair_fits
        )
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, help="demo night frames directory (captures the pieces)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--gpu", action="store_true", help="capture with the GPU reprojection (faster)")
    parser.add_argument("--pieces", type=Path, required=True, help=".npz of coarse pieces (written by a capture)")
    parser.add_argument("--tile", type=int, default=0, help="repeat the pieces up to this many")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip the per-pair reference path")
    args = parser.parse_args()

    if args.frames is not None:
        start = time.perf_counter()
        n = capture(args.frames, args.count, args.pieces, args.gpu)
        print(f"captured {n} pieces in {time.perf_counter() - start:.1f} s -> {args.pieces}")
    pieces = load(args.pieces)
    if args.tile:
        pieces = tile(pieces, args.tile)
    sizes = [p.data.shape[1] * p.data.shape[2] for p in pieces]
    edges = photometry.overlap_edges(photometry._piece_bounds(pieces))
    print(f"{len(pieces)} pieces, {pieces[0].data.shape[0]} channels, median {int(np.median(sizes))} cells, "
          f"{len(edges)} edges (before coarsening)")

    new_times, new = timed(pieces, args.repeats, "batched")
    print(f"batched:   {' '.join(f'{t:.2f}' for t in new_times)} s (median {statistics.median(new_times):.2f} s)")
    if args.no_reference:
        return
    old_times, old = timed(pieces, args.repeats, "reference")
    print(f"reference: {' '.join(f'{t:.2f}' for t in old_times)} s (median {statistics.median(old_times):.2f} s)")
    print(f"speed-up: {statistics.median(old_times) / statistics.median(new_times):.1f}x")
    for name in ("gains", "offsets", "tilts"):
        a, b = getattr(new, name), getattr(old, name)
        scale = np.maximum(np.abs(b), 1e-12)
        print(f"  {name}: max |new - ref| = {np.max(np.abs(a - b)):.3g} (max relative {np.max(np.abs(a - b) / scale):.3g})")
    print(f"  constrained equal: {np.array_equal(new.constrained, old.constrained)}")


if __name__ == "__main__":
    main()

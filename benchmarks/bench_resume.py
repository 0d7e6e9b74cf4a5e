"""What a resumed run saves: wall time of a full run vs reruns after a SIGKILL, after success and
after changing a stacking setting (Mosaic-First, pieces spilled to the cache).

    python benchmarks/bench_resume.py --frames 60 --scale 0.5 --max-memory-mb 256

Every rerun goes through the CLI into the same OUTPUT; the mosaics are compared with the
uninterrupted run's (max |Δ| relative to the data range).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits


def cli(frames: Path, output: Path, settings: dict[str, object]) -> list[str]:
    command = [sys.executable, "-m", "napari_zemosaic.cli", "run", str(frames), str(output), "--workflow", "mosaic-first"]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def timed_run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def kill_after(command: list[str], cache: Path, pattern: str, count: int) -> float:
    """Start the run, SIGKILL it once ``count`` files match ``pattern`` in the cache; seconds it ran."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        try:
            reached = len(list(cache.glob(pattern))) >= count
        except FileNotFoundError:  # a folder vanished under the scan (a finished block's pieces)
            reached = False
        if reached:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return time.perf_counter() - started
        time.sleep(0.02)
    raise RuntimeError("the run finished before the kill point")


def science(output: Path) -> np.ndarray:
    with fits.open(output / "mosaic_science.fits") as hdus:
        return hdus[0].data.astype(np.float64)


def relative_difference(output: Path, reference: Path) -> float:
    data, ref = science(output), science(reference)
    return float(np.nanmax(np.abs(data - ref)) / (np.nanmax(ref) - np.nanmin(ref)))


def units(output: Path) -> dict[str, dict[str, int]]:
    return json.loads((output / "run_report.json").read_text())["resume"]["units"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--max-memory-mb", type=int, default=256)
    args = parser.parse_args()

    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    generate_demo(root / "night", DemoSpec(panels=(1, 1), frames_per_panel=args.frames, scale=args.scale, seed=3))
    frames = root / "night" / "frames"
    settings = {"max_memory_mb": args.max_memory_mb, "cache_retention": "keep", "quality_rejection": False}

    reference = root / "reference"
    rows = [("uninterrupted run", timed_run(cli(frames, reference, settings)), 0.0, units(reference))]
    n_frames = units(reference)["reproject"]["computed"]
    n_blocks = units(reference)["block"]["computed"]

    for label, pattern, count in (
        ("killed half-way through P3, rerun", "units/*/frames/*.npz", n_frames // 2),
        ("killed half-way through P5, rerun", "units/*/blocks/*.npz", max(1, n_blocks // 2)),
    ):
        output = root / label.split(",")[0].replace(" ", "_")
        ran = kill_after(cli(frames, output, settings), output / ".zemosaic_cache", pattern, count)
        seconds = timed_run(cli(frames, output, settings))
        rows.append((f"{label} (killed after {ran:.1f} s)", seconds, relative_difference(output, reference), units(output)))

    seconds = timed_run(cli(frames, reference, settings))
    rows.append(("rerun after success (everything reused)", seconds, relative_difference(reference, reference), units(reference)))
    changed = {**settings, "stacking_kappa_high": 2.5}
    seconds = timed_run(cli(frames, reference, changed))
    rows.append(("rerun with stacking_kappa_high changed", seconds, float("nan"), units(reference)))

    print(f"{n_frames} frames of {args.scale} scale, {n_blocks} blocks, max_memory_mb={args.max_memory_mb}")
    print("| run | wall s | max abs diff / range | units reused (reproject / block / metrics) |")
    print("|---|---:|---:|---|")
    for label, seconds, difference, counts in rows:
        reused = " / ".join(str(counts.get(kind, {}).get("reused", 0)) for kind in ("reproject", "block", "metrics"))
        print(f"| {label} | {seconds:.1f} | {difference:.1e} | {reused} |")


if __name__ == "__main__":
    main()

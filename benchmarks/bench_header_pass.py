"""P1 header pass: what ``read_frame_info`` costs per file, and the whole pass serial and with
reader processes (``frames.iter_frame_infos``).

    .venv/bin/zemosaic demo /tmp/p1_night --panels 1x1 --frames-per-panel 60 --scale 1.0 --no-run
    .venv/bin/python benchmarks/bench_header_pass.py --frames /tmp/p1_night/frames --files 500 \
        --baseline HEAD --repeats 5

``--files N`` gives the pass N file names (hard links in a temporary folder, cycling through the
frames found): the header pass reads headers only, so a few real frames stand for a night.
``--baseline REV`` loads ``engine/frames.py`` of that git revision (or ``--baseline-file PATH``)
beside the working tree's, and the per-file costs of both are measured interleaved, file by file,
in this one process (medians). The pass with readers is timed first (the forkserver starts then,
as in a run: "cold"), then again once it runs ("warm"). Every outcome of the parallel pass is
checked against the serial one (WCS pickles, headers, exclusion reasons).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def _baseline_module(revision: str | None, path: str | None) -> ModuleType | None:
    """frames.py of another revision, importable beside the current one (same package)."""
    if revision is None and path is None:
        return None
    if path is None:
        source = subprocess.run(
            ["git", "show", f"{revision}:src/napari_zemosaic/engine/frames.py"],
            check=True, capture_output=True, text=True,
        ).stdout
        handle = tempfile.NamedTemporaryFile("w", suffix="_frames_baseline.py", delete=False)
        handle.write(source)
        handle.close()
        path = handle.name
    name = "napari_zemosaic.engine._frames_baseline"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _linked_files(frames_dir: Path, count: int, folder: Path) -> list[Path]:
    sources = sorted(p for p in frames_dir.iterdir() if p.suffix.lower() in (".fit", ".fits", ".fts"))
    if not sources:
        raise SystemExit(f"no FITS frames in {frames_dir}")
    if count <= 0:
        return sources
    made = []
    for index in range(count):
        source = sources[index % len(sources)]
        target = folder / f"f{index:05d}_{source.name}"
        os.link(source, target)
        made.append(target)
    return made


def _outcome_key(outcome: Any) -> Any:
    """What must match between two passes: exclusions by reason and detail, frames by content."""
    if isinstance(outcome, Exception):
        return ("error", outcome.reason_key, outcome.detail)
    fields = {name: getattr(outcome, name) for name in outcome.__dataclass_fields__ if name not in ("wcs", "header")}
    fields["path"] = str(fields["path"])
    return (
        "frame",
        repr(sorted(fields.items())),
        [card.image for card in outcome.header.cards],
        pickle.dumps(outcome.wcs) if outcome.wcs is not None else None,
    )


def _timed_pass(frames: ModuleType, paths: list[Path], **options: Any) -> tuple[float, list[Any], int]:
    """Wall time, outcomes, and how many files the reader processes answered."""
    answered = [0]
    original = frames._SharedHeaderPass.take

    def counting_take(self: Any, index: int) -> Any:
        answer = original(self, index)
        answered[0] += len(answer) if answer is not None else 0
        return answer

    frames._SharedHeaderPass.take = counting_take
    try:
        start = time.perf_counter()
        outcomes = list(frames.iter_frame_infos(paths, **options))
        return time.perf_counter() - start, outcomes, answered[0]
    finally:
        frames._SharedHeaderPass.take = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", required=True, type=Path, help="folder of FITS frames")
    parser.add_argument("--files", type=int, default=500, help="file names to pass (hard links); 0: the frames as they are")
    parser.add_argument("--repeats", type=int, default=3, help="per-file timings per file and module")
    parser.add_argument("--workers", type=int, default=0, help="reader processes (0: one per core but one)")
    parser.add_argument("--baseline", help="git revision whose frames.py is measured beside")
    parser.add_argument("--baseline-file", help="a frames.py to measure beside")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    from napari_zemosaic.engine import frames, mosaic_first  # noqa: F401 - as imported in a run

    frames.PROCESS_HEADER_MIN_CORES = 1  # measure the readers on small hosts too
    baseline = _baseline_module(args.baseline, args.baseline_file)
    workers = args.workers or max(1, frames._available_cores() - 1)
    folder = Path(tempfile.mkdtemp(prefix="zemosaic_p1_"))
    try:
        paths = _linked_files(args.frames, args.files, folder)
        for path in paths:  # page cache warm, as after the scan of a run
            with open(path, "rb") as handle:
                handle.read(2880 * 2)
        result: dict[str, Any] = {"files": len(paths), "cores": frames._available_cores(), "workers": workers}

        cold, parallel, answered = _timed_pass(frames, paths, workers=workers, min_files=0)
        result["parallel_cold_s"] = round(cold, 3)
        result["parallel_cold_files_from_readers"] = answered

        unique = sorted({p.name.split("_", 1)[1]: p for p in paths}.values())
        per_file: dict[str, list[float]] = {"after": [], "before": []}
        modules = [("after", frames)] + ([("before", baseline)] if baseline is not None else [])
        for path in unique:  # warm both (first-use costs, e.g. the fast-WCS self-check)
            for _, module in modules:
                try:
                    module.read_frame_info(path)
                except Exception:
                    pass
        for _ in range(args.repeats):
            for path in unique:
                for label, module in modules:
                    start = time.perf_counter()
                    try:
                        module.read_frame_info(path)
                    except Exception:
                        pass
                    per_file[label].append(time.perf_counter() - start)
        result["per_file_ms_after"] = round(statistics.median(per_file["after"]) * 1e3, 3)
        if baseline is not None:
            result["per_file_ms_before"] = round(statistics.median(per_file["before"]) * 1e3, 3)
            start = time.perf_counter()
            for path in paths:
                try:
                    baseline.read_frame_info(path)
                except Exception:
                    pass
            result["serial_pass_before_s"] = round(time.perf_counter() - start, 3)

        serial_time, serial, _ = _timed_pass(frames, paths, min_files=10**9)
        result["serial_pass_after_s"] = round(serial_time, 3)
        warm, parallel_warm, answered = _timed_pass(frames, paths, workers=workers, min_files=0)
        result["parallel_warm_s"] = round(warm, 3)
        result["parallel_warm_files_from_readers"] = answered

        expected = [_outcome_key(item) for item in serial]
        result["parallel_identical"] = [_outcome_key(item) for item in parallel] == expected and [
            _outcome_key(item) for item in parallel_warm
        ] == expected
        if baseline is not None:
            before = []
            for path in paths:
                try:
                    before.append(baseline.read_frame_info(path))
                except baseline.FrameError as exc:
                    before.append(exc)
            result["identical_to_baseline"] = [_outcome_key(item) for item in before] == expected
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

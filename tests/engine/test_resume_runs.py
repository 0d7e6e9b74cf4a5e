"""Resume end to end: killed runs continue where they stopped; changed settings recompute what they touch.

The unit bookkeeping itself (signatures, integrity, the manifest on disk) is tested in
test_resume.py; here whole runs are interrupted with SIGKILL through the CLI and rerun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from conftest import mounted_tmpfs
from astropy.io import fits

from napari_zemosaic.engine.pipeline import log_messages, run

# 16 frames on two panels: enough for several canvas blocks and two SDS batches / classic tiles.
SPEC = dict(panels=(1, 2), frames_per_panel=8, scale=0.25, seed=5)
#: A small memory budget: pieces spill to the cache and the canvas is cut into many blocks.
BASE: dict[str, Any] = {
    "language": "en",
    "max_memory_mb": 64,
    "cache_retention": "keep",
    "quality_rejection": False,
    "sds_min_batch_size": 4,
    "sds_target_batch_size": 8,
}

posix_only = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("resume_night")
    generate_demo(root, DemoSpec(**SPEC))
    return root / "frames"


def science(output: Path) -> tuple[np.ndarray, np.ndarray]:
    with fits.open(output / "mosaic_science.fits") as hdus:
        return hdus[0].data.astype(np.float64), hdus["ALPHA"].data.astype(np.float64)


def assert_same_mosaic(output: Path, reference: Path) -> None:
    data, alpha = science(output)
    ref_data, ref_alpha = science(reference)
    assert data.shape == ref_data.shape
    np.testing.assert_array_equal(np.isnan(data), np.isnan(ref_data))
    value_range = float(np.nanmax(ref_data) - np.nanmin(ref_data))
    assert float(np.nanmax(np.abs(data - ref_data))) <= 1e-6 * value_range
    assert float(np.max(np.abs(alpha - ref_alpha))) <= 1e-6


def units_of(result_or_report: Any) -> dict[str, dict[str, int]]:
    report = getattr(result_or_report, "report", result_or_report)
    return report["resume"]["units"]


def inputs_snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ============================================================================ in-process reruns


def test_rerun_reuses_every_unit_and_gives_the_same_mosaic(tmp_path: Path, night: Path) -> None:
    first = run(night, tmp_path / "out", BASE)
    assert first.report["canvas"]["spilled"], "the small budget should spill pieces"
    computed = units_of(first)
    n_frames, n_blocks = computed["reproject"]["computed"], computed["block"]["computed"]
    assert n_frames == 16 and n_blocks >= 4
    events: list = []
    second = run(night, tmp_path / "out", BASE, on_event=events.append)
    units = units_of(second)
    assert units["reproject"] == {**units["reproject"], "reused": n_frames, "computed": 0}
    assert units["block"] == {**units["block"], "reused": n_blocks, "computed": 0}
    keys = [event.key for event in log_messages(events)]
    assert "resume_info_found" in keys and "resume_info_reused" in keys
    assert units["metrics"]["reused"] == 16 and units["metrics"]["computed"] == 0
    # The quality verdicts come out the same from the recorded metrics (transparency included).
    assert second.report["frames"]["metrics"] == first.report["frames"]["metrics"]
    np.testing.assert_array_equal(second.data, first.data)
    np.testing.assert_array_equal(second.coverage, first.coverage)


def test_blocks_stacked_in_memory_are_recorded_while_the_outputs_are_written_and_reused(
    tmp_path: Path, night: Path
) -> None:
    """With the pieces in memory the blocks are recorded by writer threads, the last ones while
    the run writes its outputs; the manifest waits for them when it closes, so every block is in
    it (and says so in the log) and a rerun reuses them all."""
    config = {**BASE, "max_memory_mb": 2048}
    events: list = []
    first = run(night, tmp_path / "out", config, on_event=events.append)
    assert not first.report["canvas"]["spilled"]
    n_blocks = units_of(first)["block"]["computed"]
    assert n_blocks >= 1
    block_files = sorted((tmp_path / "out" / ".zemosaic_cache" / "units").rglob("blocks/*.npz"))
    assert len(block_files) == n_blocks
    events.clear()
    second = run(night, tmp_path / "out", config, on_event=events.append)
    assert units_of(second)["block"] == {**units_of(second)["block"], "reused": n_blocks, "computed": 0}
    said = [(event.key, event.params.get("kind")) for event in log_messages(events)]
    # The blocks' summary comes once their records are all in: after the outputs.
    assert said.index(("resume_info_reused", "block")) > said.index(("run_info_outputs", None))
    np.testing.assert_array_equal(second.data, first.data)


def test_a_stacking_setting_recomputes_the_blocks_only(tmp_path: Path, night: Path) -> None:
    run(night, tmp_path / "out", BASE)
    changed = {**BASE, "stacking_kappa_high": 2.2}
    events: list = []
    rerun = run(night, tmp_path / "out", changed, on_event=events.append)
    units = units_of(rerun)
    assert units["reproject"]["reused"] == 16 and units["reproject"]["computed"] == 0
    assert units["block"]["reused"] == 0
    assert units["block"]["computed"] == units["block"]["invalidated"] > 0
    # The kept cache holds the pieces: the blocks are stacked again without resampling any frame.
    assert not [e for e in events if getattr(e, "phase", None) == "P3" and getattr(e, "key", "") == "progress_frames"]
    fresh = run(night, tmp_path / "fresh", changed)  # the oracle: the same settings from scratch
    np.testing.assert_array_equal(rerun.data, fresh.data)

    # A resampling setting reaches every unit: nothing can be reused.
    resampled = run(night, tmp_path / "out", {**changed, "resample_method": "bicubic"})
    units = units_of(resampled)
    assert units["reproject"]["reused"] == 0 and units["reproject"]["invalidated"] == 16
    assert units["block"]["reused"] == 0


def test_resume_off_recomputes_everything_and_run_end_clears_the_cache(tmp_path: Path, night: Path) -> None:
    output = tmp_path / "out"
    run(night, output, BASE)
    off = run(night, output, {**BASE, "resume": "off", "cache_retention": "run_end"})
    units = units_of(off)
    assert units["reproject"]["reused"] == 0 and units["reproject"]["computed"] == 16
    cache = output / ".zemosaic_cache"
    assert not cache.exists() or sorted(p.name for p in cache.iterdir()) == ["wcs"]


def test_a_damaged_unit_is_recomputed(tmp_path: Path, night: Path) -> None:
    output = tmp_path / "out"
    first = run(night, output, BASE)
    block_files = sorted((output / ".zemosaic_cache" / "units").rglob("blocks/*.npz"))
    damaged = block_files[len(block_files) // 2]
    payload = bytearray(damaged.read_bytes())
    payload[-100] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    events: list = []
    second = run(night, output, BASE, on_event=events.append)
    units = units_of(second)
    assert units["block"]["corrupt"] == 1 and units["block"]["computed"] == 1
    assert "resume_warn_corrupt_unit" in [event.key for event in log_messages(events)]
    np.testing.assert_array_equal(second.data, first.data)


# ============================================================================ SIGKILL through the CLI


def cli_run(night: Path, output: Path, workflow: str) -> subprocess.Popen:
    settings = [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in BASE.items()]
    command = [sys.executable, "-m", "napari_zemosaic.cli", "run", str(night), str(output), "--workflow", workflow]
    for item in settings:
        command += ["--set", item]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def count_files(pattern: str) -> Callable[[Path], int]:
    """Files matching ``pattern`` (relative to the cache); 0 while a folder is being replaced."""

    def count(cache: Path) -> int:
        try:
            return len(list(cache.glob(pattern)))
        except FileNotFoundError:
            return 0

    return count


def kill_when(process: subprocess.Popen, cache: Path, counter: Callable[[Path], int], at_least: int) -> None:
    """SIGKILL ``process`` as soon as ``counter(cache)`` reaches ``at_least`` (fails if it ends first)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before the kill point: "
                        f"{process.stderr.read().decode(errors='replace')[-2000:]}")
        if cache.is_dir() and counter(cache) >= at_least:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            return
        time.sleep(0.01)
    process.kill()
    pytest.fail("kill point never reached")


KILL_POINTS = {
    # workflow: [(what to wait for, how many)]
    "mosaic-first": [("units/*/frames/*.npz", 3), ("units/*/blocks/*.npz", 2)],
    "sds": [("units/mosaic_first_sds_0000/blocks/*.npz", 1), ("sds/megatile_*.f32", 1)],
    "classic": [("units/mosaic_first_classic_0000/blocks/*.npz", 1), ("classic/*.fits", 1)],
}


@pytest.fixture(scope="module")
def references(night: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs of each workflow, once."""
    outputs = {}
    for workflow in KILL_POINTS:
        output = tmp_path_factory.mktemp(f"reference_{workflow}")
        result = run(night, output, {**BASE, "workflow": workflow.replace("-", "_")})
        assert result.status == "ok" and result.report["workflow_used"] == workflow.replace("-", "_")
        outputs[workflow] = output
    return outputs


@posix_only
@pytest.mark.parametrize("workflow", list(KILL_POINTS))
def test_sigkill_at_several_points_then_rerun_gives_the_same_mosaic(
    tmp_path: Path, night: Path, references: dict[str, Path], workflow: str
) -> None:
    before = inputs_snapshot(night)
    output = tmp_path / "out"
    cache = output / ".zemosaic_cache"
    for pattern, at_least in KILL_POINTS[workflow]:
        kill_when(cli_run(night, output, workflow), cache, count_files(pattern), at_least)
        assert not (output / "mosaic_science.fits").exists()
        assert (output / ".zemosaic.lock").exists()  # the dead run's lock stays: the next run takes it over
    finished = cli_run(night, output, workflow)
    _, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert_same_mosaic(output, references[workflow])
    import json

    report = json.loads((output / "run_report.json").read_text())
    units = units_of(report)
    assert sum(counts["reused"] for counts in units.values()) > 0, units
    assert not list(output.glob(".*.partial-*")) and not list(cache.rglob(".*.tmp-*"))
    assert inputs_snapshot(night) == before


# ============================================================================ full disk


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    """A 4 MiB tmpfs (root on Linux only; skipped elsewhere)."""
    with mounted_tmpfs(tmp_path / "small", "4m") as mount_point:
        yield mount_point


def test_a_full_disk_gives_the_message_and_no_half_written_file(small_tmpfs: Path, night: Path, tmp_path: Path) -> None:
    output = small_tmpfs / "out"
    process = subprocess.run(
        [sys.executable, "-m", "napari_zemosaic.cli", "run", str(night), str(output),
         "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "quality_rejection=false"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 2, process.stderr[-2000:]
    assert "Not enough free disk space" in process.stderr + process.stdout
    leftovers = sorted(path.name for path in output.iterdir())
    assert "mosaic_science.fits" not in leftovers and "mosaic_preview.png" not in leftovers
    assert not [name for name in leftovers if ".partial-" in name or ".tmp-" in name]
    import json

    report = json.loads((output / "run_report.json").read_text())
    assert report["status"] == "failed" and report["error"]["key"] == "disk_error_insufficient_space"


# ============================================================================ host out of memory

RUN_UNDER_MEMORY_LIMIT = """
import json, resource, sys
import numpy as np
from napari_zemosaic.engine.pipeline import run

night, output, headroom_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
limited = []
warnings = []

def on_event(event):
    key = getattr(event, "key", None)
    if key == "mf_warn_host_memory_split":
        warnings.append(event.params)
    if key == "mf_info_normalisation" and not limited:
        # From here on (P5) the process may grow by ``headroom_mb`` only: the planned block does not fit.
        with open("/proc/self/status") as status:
            vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
        limit = (vm_kb + headroom_mb * 1024) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        limited.append(limit)

result = run(night, output, {"language": "en", "max_memory_mb": 4000, "quality_rejection": False,
                             "use_gpu_phase5": False, "stack_use_gpu": False}, on_event=on_event)
resource.setrlimit(resource.RLIMIT_AS, (resource.getrlimit(resource.RLIMIT_AS)[1],) * 2)
np.save(output + "/data.npy", result.data)
print(json.dumps({"limited": bool(limited), "splits": warnings, "status": result.status}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_host_out_of_memory_stacks_in_strips_instead_of_crashing(tmp_path: Path, night: Path) -> None:
    import json

    output = tmp_path / "limited"
    output.mkdir()
    process = subprocess.run(
        [sys.executable, "-c", RUN_UNDER_MEMORY_LIMIT, str(night), str(output), "40"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    outcome = json.loads(process.stdout.strip().splitlines()[-1])
    assert outcome["limited"] and outcome["status"] == "ok"
    assert outcome["splits"], "the block should not have fitted in the memory left"
    reference = run(night, tmp_path / "reference", {"language": "en", "max_memory_mb": 4000, "quality_rejection": False})
    np.testing.assert_array_equal(np.load(output / "data.npy"), reference.data)


@pytest.mark.parametrize(("workflow", "kind"), [("sds", "megatile"), ("classic", "master_tile")])
def test_rerun_reuses_the_workflow_tiles(tmp_path: Path, night: Path, workflow: str, kind: str) -> None:
    config = {**BASE, "workflow": workflow}
    first = run(night, tmp_path / "out", config)
    assert first.report["workflow_used"] == workflow
    tiles = units_of(first)[kind]["computed"]
    assert tiles >= 2
    second = run(night, tmp_path / "out", config)
    units = units_of(second)
    assert units[kind]["reused"] == tiles and units[kind]["computed"] == 0
    # Nothing inside the tiles was touched again.
    assert units.get("reproject", {}).get("computed", 0) == 0 and units.get("block", {}).get("computed", 0) == 0
    np.testing.assert_array_equal(second.data, first.data)

"""The ``zemosaic`` command line: demo, run, plan, info, exit codes, cancellation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from napari_zemosaic.cli import main
from napari_zemosaic.engine.pipeline import iter_run
from napari_zemosaic.events import ProgressEvent


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_demo")
    code = main(["demo", str(out), "--panels", "1x2", "--frames-per-panel", "3", "--scale", "0.12", "--seed", "4",
                 "--set", "max_memory_mb=256"])
    assert code == 0
    return out


def test_demo_builds_frames_truth_and_mosaic(tiny_demo: Path) -> None:
    assert len(list((tiny_demo / "frames").glob("*.fit"))) == 6
    assert (tiny_demo / "truth" / "catalog.csv").is_file()
    for name in ("mosaic_science.fits", "mosaic_preview.png", "run_report.json", "zemosaic.log"):
        assert (tiny_demo / name).is_file(), name
    report = json.loads((tiny_demo / "run_report.json").read_text())
    quality_excluded = [e for e in report["frames"]["excluded"] if e["reason_key"].startswith("frame_excluded_quality_")]
    assert report["status"] == "ok" and report["frames"]["used"] == 6 - len(quality_excluded)
    assert len(report["frames"]["metrics"]) == 6
    assert report["config"]["max_memory_mb"] == 256


def test_plan_json_lists_frames_canvas_and_footprints(tiny_demo: Path, capsys) -> None:
    assert main(["plan", str(tiny_demo / "frames"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rejected = [row for row in plan["frame_table"] if not row["quality"]["accepted"]]
    assert plan["frames"]["found"] == 6 and plan["frames"]["used"] == 6 - len(rejected)
    assert plan["workflow"] == "mosaic_first"
    assert all(row["metrics"]["fwhm_px"] > 1 for row in plan["frame_table"])
    height, width = plan["canvas"]["shape"]
    for row in plan["frame_table"]:
        assert row["is_seestar"] and row["wcs_status"] == "valid"
        if row in rejected:
            continue
        xs = [p[0] for p in row["footprint"]]
        ys = [p[1] for p in row["footprint"]]
        assert min(xs) > -1 and max(xs) < width + 1 and min(ys) > -1 and max(ys) < height + 1
    # the plan never writes anything
    assert not (tiny_demo / "frames" / ".zemosaic_cache").exists()


def test_plan_text_output(tiny_demo: Path, capsys) -> None:
    assert main(["plan", str(tiny_demo / "frames"), "--lang", "fr"]) == 0
    out = capsys.readouterr().out
    assert "6 fichiers FITS trouvés" in out


def test_info_json(capsys) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["numpy"] and info["gpu"]["available"] in (True, False)


def test_run_in_french_with_overrides(tiny_demo: Path, tmp_path: Path, capsys) -> None:
    code = main(["run", str(tiny_demo / "frames"), str(tmp_path), "--lang", "fr", "--workflow", "mosaic-first",
                 "--set", "stacking_rejection_algorithm=winsorized_sigma_clip", "--set", "output_basename=m42",
                 "--set", "max_memory_mb=256"])
    err = capsys.readouterr().err
    assert code == 0
    assert "poses utilisables" in err
    assert (tmp_path / "m42_science.fits").is_file()
    with fits.open(tmp_path / "m42_science.fits") as hdul:
        assert hdul[0].header["REJECT"] == "winsorized_sigma_clip"
    log = (tmp_path / "zemosaic.log").read_text(encoding="utf-8")
    assert "poses utilisables" in log


def test_bad_arguments_exit_2(capsys) -> None:
    assert main(["run"]) == 2
    assert main(["demo", "/tmp/x", "--panels", "two"]) == 2
    assert main(["frobnicate"]) == 2


def test_closing_the_run_generator_cancels_cleanly(tiny_demo: Path, tmp_path: Path) -> None:
    generator = iter_run(tiny_demo / "frames", tmp_path, {"max_memory_mb": 256, "num_workers": 1})
    for event in generator:
        if isinstance(event, ProgressEvent) and event.phase == "P3":
            break
    generator.close()
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert report["status"] == "cancelled"
    assert not (tmp_path / "mosaic_science.fits").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_ctrl_c_exits_130_without_final_files(tmp_path: Path) -> None:
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    generate_demo(tmp_path / "night", DemoSpec(panels=(1, 1), frames_per_panel=24, scale=0.3, seed=8))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "napari_zemosaic.cli", "run", str(tmp_path / "night" / "frames"), str(out),
         "--set", "num_workers=1", "--set", "max_memory_mb=256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A job started in the background ignores SIGINT, and children inherit that: restore the
        # default so this is what a Ctrl-C in a terminal does, wherever the tests themselves run.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "zemosaic.log").exists():
        time.sleep(0.05)
    # wait until reprojection has started, then interrupt
    while time.time() < deadline and "mf_info_plan" not in (out / "zemosaic.log").read_text():
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    report = json.loads((out / "run_report.json").read_text())
    assert report["status"] == "cancelled"
    assert not (out / "mosaic_science.fits").exists()
    assert "Traceback" not in err


def test_console_script_is_installed() -> None:
    import shutil

    script = Path(sys.executable).parent / "zemosaic"
    command = str(script) if script.exists() else shutil.which("zemosaic")
    assert command, "the zemosaic console script is not installed"
    completed = subprocess.run([command, "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and "napari-zemosaic" in completed.stdout

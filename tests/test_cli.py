"""The ``zemosaic`` command line: demo, run, plan, info, exit codes, cancellation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


SERVER_ORDER_PROBE = """
import json, sys
from napari_zemosaic.engine import worker_env

def record_and_stop(device=False):
    print(json.dumps({name: name in sys.modules for name in ("numpy", "astropy", "napari_zemosaic.engine.frames")}))
    raise SystemExit(0)

worker_env.start_process_server = record_and_stop
from napari_zemosaic.cli import main
main(["run", sys.argv[1], sys.argv[2], "--gpu", "auto"])
"""


def test_a_run_starts_the_worker_server_before_numpy_loads(tmp_path: Path) -> None:
    """The worker processes' server imports the engine (about 1 s in a new program) while the
    command line does: parsing the arguments and the config must not import the engine first."""
    script = tmp_path / "order_probe.py"
    script.write_text(SERVER_ORDER_PROBE)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "in"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"numpy": False, "astropy": False, "napari_zemosaic.engine.frames": False}


def test_solve_parser_is_part_of_the_command_line(tmp_path: Path, capsys) -> None:
    from napari_zemosaic.cli import build_parser

    args = build_parser().parse_args(["solve", str(tmp_path), "--solver", "astap", "--timeout", "5", "--json"])
    assert (args.solver, args.timeout, args.json) == ("astap", 5.0, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["solve", str(tmp_path), "--solver", "nova"])


LEFT_RUNNING_PROBE = """
import json, multiprocessing, threading, time
from napari_zemosaic.cli import _nothing_left_running

if __name__ == "__main__":
    seen = {"nothing": _nothing_left_running()}
    release = threading.Event()
    for name, daemon in (("a-user-thread", False), ("zemosaic-units-blocks", True), ("tqdm_monitor", True)):
        thread = threading.Thread(target=release.wait, name=name, daemon=daemon)
        thread.start()
        seen[name] = _nothing_left_running()
        release.set()
        thread.join()
        release.clear()
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
    child.start()
    seen["child"] = _nothing_left_running()
    child.terminate()
    child.join()
    print(json.dumps(seen))
"""


def test_the_program_skips_the_interpreter_teardown_only_when_nothing_is_left_running(tmp_path: Path) -> None:
    script = tmp_path / "left_running_probe.py"
    script.write_text(LEFT_RUNNING_PROBE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"nothing": True, "a-user-thread": False, "zemosaic-units-blocks": False, "tqdm_monitor": True,
                    "child": False}


def test_a_program_run_writes_what_an_in_process_run_writes(tiny_demo: Path, tmp_path: Path) -> None:
    """``python -m napari_zemosaic.cli`` (the console script's path, which ends the process
    without the interpreter's teardown) leaves the same mosaic, a finished report and a whole log."""
    frames, out_here, out_program = tiny_demo / "frames", tmp_path / "here", tmp_path / "program"
    options = ["--set", "max_memory_mb=256", "--lang", "en"]
    assert main(["run", str(frames), str(out_here), *options]) == 0
    completed = subprocess.run([sys.executable, "-m", "napari_zemosaic.cli", "run", str(frames), str(out_program),
                                *options], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "Done." in completed.stdout or "science:" in completed.stdout
    np.testing.assert_array_equal(fits.getdata(out_program / "mosaic_science.fits"),
                                  fits.getdata(out_here / "mosaic_science.fits"))
    report = json.loads((out_program / "run_report.json").read_text())
    assert report["status"] == "ok"
    last_keys = [[line.split("[", 1)[1].split("]", 1)[0] for line in (out / "zemosaic.log").read_text().splitlines()[-3:]]
                 for out in (out_here, out_program)]
    assert last_keys[0] == last_keys[1] and last_keys[1][-1] == "gpu_summary_end_fallbacks"

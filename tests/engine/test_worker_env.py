"""Worker processes start with native libraries limited to one thread; the run's process keeps its own.
Their server, started early, holds the engine (and CuPy for a run on the GPU, where installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from napari_zemosaic.engine.worker_env import SINGLE_THREAD_VARIABLES, env_flag, limit_native_threads, wants_device

PROBE = """
import json, os
from concurrent.futures import ProcessPoolExecutor
from napari_zemosaic.engine.worker_env import SINGLE_THREAD_VARIABLES, process_context

def settings():
    return {name: os.environ.get(name) for name in SINGLE_THREAD_VARIABLES}

if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=1, mp_context=process_context()) as pool:
        child = pool.submit(settings).result()
    print(json.dumps({"child": child, "parent": settings()}))
"""


def test_forked_workers_run_native_libraries_on_one_thread_unless_the_user_chose(tmp_path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in SINGLE_THREAD_VARIABLES}
    env["MKL_NUM_THREADS"] = "3"  # the user's choice is kept
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                            check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {name: "1" for name in SINGLE_THREAD_VARIABLES} | {"MKL_NUM_THREADS": "3"}
    if sys.platform.startswith("linux"):  # forkserver: the preload sets them in the workers only
        assert seen["child"] == expected
    assert seen["parent"] == {name: None for name in SINGLE_THREAD_VARIABLES} | {"MKL_NUM_THREADS": "3"}


def test_limit_native_threads_only_fills_what_is_unset() -> None:
    environ = {"OMP_NUM_THREADS": "4"}
    limit_native_threads(environ)
    assert environ["OMP_NUM_THREADS"] == "4"
    assert all(environ[name] == "1" for name in SINGLE_THREAD_VARIABLES if name != "OMP_NUM_THREADS")


SERVER_PROBE = """
import importlib.util, json, sys
from concurrent.futures import ProcessPoolExecutor
from napari_zemosaic.engine.worker_env import process_context, start_process_server

def loaded():
    return {name: name in sys.modules for name in ("napari_zemosaic.engine.mosaic_first", "cupy", "cupyx")}

if __name__ == "__main__":
    start_process_server(device=sys.argv[1] == "device")
    engine_here = "napari_zemosaic.engine.mosaic_first" in sys.modules
    with ProcessPoolExecutor(max_workers=1, mp_context=process_context()) as pool:
        child = pool.submit(loaded).result()
    print(json.dumps({"child": child, "engine_here": engine_here, "cupy": importlib.util.find_spec("cupy") is not None}))
"""


def test_the_process_server_started_early_holds_the_engine_and_for_the_gpu_cupy(tmp_path) -> None:
    """The command line starts the server before it imports the engine: the server imports it
    (and, for a run that wants the GPU, CuPy and cupyx where installed), its children have them."""
    if not sys.platform.startswith("linux"):
        return  # spawned processes import what they need themselves
    script = tmp_path / "server_probe.py"
    script.write_text(SERVER_PROBE)
    for mode in ("host", "device"):
        result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=180,
                                check=True)
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen["engine_here"] is False  # starting the server did not load the engine here
        assert seen["child"]["napari_zemosaic.engine.mosaic_first"] is True
        with_cupy = mode == "device" and seen["cupy"]
        assert seen["child"]["cupy"] is with_cupy and seen["child"]["cupyx"] is with_cupy


def test_a_run_wants_the_device_unless_the_config_or_the_environment_says_cpu() -> None:
    assert wants_device({"use_gpu_phase5": True}, {})
    assert not wants_device({"use_gpu_phase5": False}, {})
    assert not wants_device({"use_gpu_phase5": True}, {"ZEMOSAIC_FORCE_CPU": "1"})
    assert wants_device({"use_gpu_phase5": True}, {"ZEMOSAIC_FORCE_CPU": "off"})
    assert [env_flag({"X": value}, "X") for value in ("", "0", "False", " no ", "off", "1", "yes", "on")] == [
        False, False, False, False, False, True, True, True
    ]



MEASURE_PROBE = """
import importlib, json, sys
from concurrent.futures import ProcessPoolExecutor
from napari_zemosaic.engine.worker_env import process_context, start_process_server

def imported_by_a_measurement(module_name):
    xp = importlib.import_module(module_name)
    from napari_zemosaic.engine.quality_device import _warm_up
    before = set(sys.modules)
    _warm_up(xp, (270, 480), 0)  # a synthetic star field, measured as a frame is
    return sorted(name for name in set(sys.modules) - before if not name.startswith("napari_zemosaic"))

if __name__ == "__main__":
    start_process_server(device=sys.argv[1] == "cupy")
    with ProcessPoolExecutor(max_workers=1, mp_context=process_context()) as pool:
        print(json.dumps(pool.submit(imported_by_a_measurement, sys.argv[1]).result()))
"""


def _imported_by_a_forked_measurement(tmp_path, module_name: str) -> list[str]:
    script = tmp_path / "measure_probe.py"
    script.write_text(MEASURE_PROBE)
    result = subprocess.run([sys.executable, str(script), module_name], capture_output=True, text=True, timeout=180,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_forked_worker_measures_a_frame_without_importing_anything_new(tmp_path) -> None:
    """The server preloads what the measurement imports lazily (SciPy's k-d tree and ndimage), so
    a quality worker does not spend its first frame importing them."""
    if not sys.platform.startswith("linux"):
        return  # spawned processes import what they need themselves
    assert _imported_by_a_forked_measurement(tmp_path, "numpy") == []


@pytest.mark.gpu
def test_a_forked_measuring_process_measures_on_the_device_without_importing_anything_new(tmp_path) -> None:
    """The same for a measuring process on the GPU (cupyx's ndimage too): it is ready before P3's
    first planes instead of importing them during its warm-up."""
    pytest.importorskip("cupy")
    assert _imported_by_a_forked_measurement(tmp_path, "cupy") == []

"""Worker processes start with native libraries limited to one thread; the run's process keeps its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from napari_zemosaic.engine.worker_env import SINGLE_THREAD_VARIABLES, limit_native_threads

PROBE = """
import json, os
from concurrent.futures import ProcessPoolExecutor
from napari_zemosaic.engine.mosaic_first import _process_context
from napari_zemosaic.engine.worker_env import SINGLE_THREAD_VARIABLES

def settings():
    return {name: os.environ.get(name) for name in SINGLE_THREAD_VARIABLES}

if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=1, mp_context=_process_context()) as pool:
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

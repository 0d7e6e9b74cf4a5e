"""Scale-out on Dask (engine/distributed.py): same mosaic on a 2-worker cluster as in one process,
for Mosaic-First, SDS and classic; retries, a worker killed mid-run, cancel, the report's
``scheduler`` section, and a clear message when the ``distributed`` extra is missing.

One LocalCluster (2 worker processes, 1 thread each) is shared by the module; the runs connect
to it by address, as ``--scheduler tcp://HOST:PORT`` does. Tests without Dask run everywhere.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_zemosaic.config import ConfigError, validate_config
from napari_zemosaic.engine import distributed as dist
from napari_zemosaic.engine.context import RunCancelled, RunContext, UserError
from napari_zemosaic.engine.pipeline import run
from napari_zemosaic.events import LogEvent, Reporter
from napari_zemosaic.engine.pipeline import drain as _drive

# 1×2 panels of 162×288 px subs, 6 a panel: SDS makes 3–4 batches, classic 2 tiles,
# Mosaic-First a dozen canvas blocks with a 64 MB budget.
NIGHT = dict(panels=(1, 2), frames_per_panel=6, scale=0.15, seed=21)
BASE = {"max_memory_mb": 64, "language": "en", "quality_rejection": False}
WORKFLOWS = {
    "mosaic_first": {"workflow": "mosaic_first", "quality_rejection": True},  # the frame rules see task metrics
    "sds": {"workflow": "sds", "sds_mode": True, "sds_min_batch_size": 3, "sds_target_batch_size": 4},
    "classic": {"workflow": "classic"},
}
UNIT_KIND = {"mosaic_first": "block", "sds": "megatile", "classic": "master_tile"}


def _units(report: dict, kind: str) -> list[dict]:
    return [t for t in report["scheduler"]["tasks"] if t["kind"] == kind]


def _same_mosaic(result, reference) -> None:
    """Identical coverage and pixels within 1e-5 of the data range."""
    assert result.data.shape == reference.data.shape
    assert np.array_equal(np.isnan(result.data), np.isnan(reference.data))
    span = float(np.nanmax(reference.data) - np.nanmin(reference.data))
    assert np.nanmax(np.abs(result.data - reference.data)) <= 1e-5 * span
    assert np.allclose(result.coverage, reference.coverage, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("distributed_night")
    generate_demo(root, DemoSpec(**NIGHT))
    return root / "frames"


@pytest.fixture(scope="module")
def single(night, tmp_path_factory) -> dict[str, Any]:
    """The single-process mosaic of every workflow (the reference)."""
    results = {}
    for name, overrides in WORKFLOWS.items():
        out = tmp_path_factory.mktemp(f"single_{name}")
        results[name] = run(night, out, {**BASE, **overrides})
        assert results[name].report["workflow_used"] == name
    return results


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed")
    from distributed import Client

    local = dist.start_local_cluster(2, 1)  # as `--scheduler local` starts it, at a fixed size
    client = Client(local, set_as_default=False)
    client.wait_for_workers(2, timeout=60)
    yield local.scheduler_address, client
    client.close()
    local.close()


# --------------------------------------------------------------------------- without Dask


def test_scheduler_config_values() -> None:
    assert validate_config({})["scheduler"] == "none"
    assert validate_config({"scheduler": "LOCAL"})["scheduler"] == "local"
    assert validate_config({"scheduler": "10.0.0.5:8786"})["scheduler"] == "tcp://10.0.0.5:8786"
    assert validate_config({"scheduler": "tls://head:8786"})["scheduler"] == "tls://head:8786"
    with pytest.raises(ConfigError) as info:
        validate_config({"scheduler": "a cluster please"})
    assert info.value.params["key"] == "scheduler"
    with pytest.raises(ConfigError):
        validate_config({"scheduler_workers": -1})


def test_cli_scheduler_option_sets_the_config() -> None:
    from napari_zemosaic.cli import build_parser, resolve_config

    args = build_parser().parse_args(["run", "in", "out", "--scheduler", "local", "--set", "scheduler_workers=2"])
    config = resolve_config(args)
    assert config["scheduler"] == "local" and config["scheduler_workers"] == 2
    args = build_parser().parse_args(["run", "in", "out", "--scheduler", "tcp://127.0.0.1:8786"])
    assert resolve_config(args)["scheduler"] == "tcp://127.0.0.1:8786"


def test_local_cluster_size_shares_the_cores_between_gpu_workers(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    config = validate_config({"scheduler": "local", "scheduler_memory_limit_mb": 1000})
    assert dist.local_cluster_size(config, gpus=0) == (32, 1, 1000)  # CPU: a process per core
    assert dist.local_cluster_size(config, gpus=2) == (2, 16, 1000)  # one worker per GPU, the cores shared
    assert dist.local_cluster_size({**config, "scheduler_workers": 1}, gpus=2) == (1, 32, 1000)
    assert dist.local_cluster_size({**config, "scheduler_threads_per_worker": 4}, gpus=2) == (2, 4, 1000)


def test_metrics_stay_in_the_run_process_only_beside_local_gpu_workers(tmp_path) -> None:
    config = validate_config({})
    inline = dist.InlineExecutor(tmp_path)
    assert not dist.measures_in_run_process(None) and not dist.measures_in_run_process(inline)
    assert "measure" in dist.measure_options(inline, config)[1]
    for kind, gpus, local in (("local", 2, True), ("local", 0, False), ("external", 2, False)):
        inline.report.update(kind=kind, gpus=gpus)
        assert dist.measures_in_run_process(inline) is local
        assert ("measure" not in dist.measure_options(inline, config)[1]) is local


def test_gpu_units_take_the_gpu_resource_one_at_a_time(tmp_path) -> None:
    """A GPU worker with 2 threads runs GPU unit kinds one after the other (they would share the
    device), other units (and GPU kinds of a CPU run) side by side on its threads."""
    pytest.importorskip("distributed")
    import time

    from distributed import Client

    local = dist.start_local_cluster(1, threads=2, memory_mb=1024, gpu_workers=True)
    client = Client(local, set_as_default=False)
    try:
        client.wait_for_workers(1, timeout=60)
        executor = dist.DaskExecutor(client, None, tmp_path, 0, "external")
        assert executor.gpu_resource
        ctx = RunContext({}, Reporter(), tmp_path, tmp_path, executor=executor)

        def wall_of_two(kind: str, config: dict[str, Any]) -> float:
            ctx.config = config
            calls = [(f"{kind}-{i}-{config.get('use_gpu_phase5')}", (i, 1.0)) for i in range(2)]
            started = time.perf_counter()
            remote = dist.submit_units(ctx, kind, dist.echo_unit, calls)
            assert [_drive(remote.result(i)) for i in range(2)] == [0, 1]
            return time.perf_counter() - started

        assert wall_of_two("megatile", {"use_gpu_phase5": True, "stack_use_gpu": True}) >= 2.0
        assert wall_of_two("metrics", {"use_gpu_phase5": True}) < 1.8
        assert wall_of_two("megatile", {"use_gpu_phase5": False, "stack_use_gpu": False}) < 1.8
    finally:
        client.close()
        local.close()


def test_without_distributed_the_option_says_how_to_install_it(night, tmp_path, monkeypatch) -> None:
    from napari_zemosaic.i18n import tr

    monkeypatch.setattr(dist, "distributed_available", lambda: False)
    with pytest.raises(UserError) as info:
        run(night, tmp_path / "out", {**BASE, "scheduler": "local"})
    assert info.value.key == "scheduler_error_not_installed"
    assert "pip install 'napari-zemosaic[distributed]'" in tr(info.value.key, "en", **info.value.params)
    # the plain run needs nothing from Dask
    assert dist.open_scheduler(validate_config({}), Reporter(), tmp_path) is None


def test_inline_executor_runs_the_cluster_code_path_with_the_same_result(night, single, tmp_path) -> None:
    result = run(night, tmp_path / "out", {**BASE, **WORKFLOWS["mosaic_first"], "scheduler": "inline"})
    _same_mosaic(result, single["mosaic_first"])
    section = result.report["scheduler"]
    assert section["kind"] == "inline" and _units(result.report, "block")
    assert {t["kind"] for t in section["tasks"]} == {"reproject", "block", "metrics"}
    assert len(_units(result.report, "reproject")) == result.report["frames"]["used"]  # every stacked frame: a task
    assert all(t["status"] == "ok" for t in section["tasks"])
    assert len(_units(result.report, "metrics")) == 2 * NIGHT["frames_per_panel"]  # every frame measured by a task
    assert single["mosaic_first"].report["scheduler"] == {"kind": "none", "address": None, "workers": 0, "tasks": []}


def test_a_classic_tile_that_fails_on_every_attempt_is_left_out_with_its_reason(night, single, tmp_path,
                                                                                 monkeypatch) -> None:
    real = dist.master_tile_task

    def flaky(reporter, frames, frame_indices, index, *args):
        if index == 1:
            raise RuntimeError("disk on fire")
        return real(reporter, frames, frame_indices, index, *args)

    monkeypatch.setattr(dist, "master_tile_task", flaky)
    result = run(night, tmp_path / "out", {**BASE, **WORKFLOWS["classic"], "scheduler": "inline",
                                           "scheduler_retries": 1})
    assert result.status == "ok"
    failed = [t for t in result.report["scheduler"]["tasks"] if t["status"] == "failed"]
    assert [t["key"] for t in failed] == ["master_tile-0002"] and failed[0]["retries"] == 1
    assert "disk on fire" in failed[0]["reason"]
    excluded = [e for e in result.report["frames"]["excluded"] if e["reason_key"] == "frame_excluded_unit_failed"]
    assert len(excluded) == NIGHT["frames_per_panel"] and all("disk on fire" in e["detail"] for e in excluded)
    assert result.report["frames"]["used"] == single["classic"].report["frames"]["used"] - len(excluded)


# ------------------------------------------------------------------------------ with Dask


def test_units_retry_and_report_worker_and_time(cluster, tmp_path) -> None:
    address, client = cluster
    executor = dist.DaskExecutor(client, None, tmp_path, 2, "external")
    ctx = RunContext({}, Reporter(), tmp_path, tmp_path, executor=executor)
    calls = [(f"echo-{i}", (i, 0.05, 2 if i == 1 else 0, str(tmp_path / f"marker{i}"))) for i in range(4)]
    remote = dist.submit_units(ctx, "echo", dist.echo_unit, calls)
    assert [_drive(remote.result(i)) for i in range(4)] == [0, 1, 2, 3]
    tasks = {t["key"]: t for t in executor.report["tasks"]}
    assert executor.report["workers"] == 2 and tasks["echo-1"]["retries"] == 2
    assert all(t["status"] == "ok" and t["worker"].startswith("tcp://") and t["seconds"] >= 0.05
               for t in tasks.values())
    keys = [e.key for e in ctx.reporter.log_events]
    assert keys.count("scheduler_debug_echo") == 4 and "scheduler_warn_task_retried" in keys  # worker logs came back


@pytest.mark.parametrize("workflow", list(WORKFLOWS))
def test_two_workers_give_the_single_process_mosaic(workflow, cluster, night, single, tmp_path) -> None:
    address, _ = cluster
    result = run(night, tmp_path / "out", {**BASE, **WORKFLOWS[workflow], "scheduler": address})
    assert result.report["workflow_used"] == workflow and result.report["fallbacks"] == []
    _same_mosaic(result, single[workflow])
    # In fact bit-identical: the units get the very canvas WCS (wcs_exact.py), not its header text.
    assert np.array_equal(result.data, single[workflow].data, equal_nan=True)
    section = result.report["scheduler"]
    assert section["address"] == address and section["workers"] == 2 and section["kind"] == "external"
    # Mosaic-First resamples each frame in a task too; SDS and classic do it inside their tiles;
    # SDS stacks its final canvas blocks in tasks.
    extra = {"mosaic_first": {"reproject"}, "sds": {"sds_block"}, "classic": set()}[workflow]
    assert {t["kind"] for t in section["tasks"]} == {UNIT_KIND[workflow], "metrics"} | extra
    assert len(_units(result.report, "metrics")) == 2 * NIGHT["frames_per_panel"]
    assert result.report["frames"]["metrics"] == single[workflow].report["frames"]["metrics"]
    tasks = _units(result.report, UNIT_KIND[workflow])
    assert len(tasks) >= 2
    assert all(t["status"] == "ok" and t["seconds"] > 0 and t["cpu_seconds"] > 0 and t["worker"].startswith("tcp://")
               for t in tasks)
    assert len({t["worker"] for t in tasks}) == 2  # both workers took part
    if workflow == "sds":
        assert len(tasks) == len(result.report["sds"]["batches"]) >= 3
        # each mega-tile's own phases come back with it (where its time went on the worker)
        assert all(t["phases"].get("P3", 0) > 0 and t["phases"].get("P5", 0) > 0 for t in tasks)
    # the report on disk says the same
    import json

    on_disk = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert on_disk["scheduler"]["tasks"] == section["tasks"]


def test_a_worker_killed_in_the_middle_of_a_unit_is_survived(cluster, night, single, tmp_path) -> None:
    """The unit megatile-0002 kills its own worker process on its first attempt (SIGKILL)."""
    address, client = cluster
    config = {**BASE, **WORKFLOWS["sds"], "scheduler": address, dist.KILL_WORKER_HOOK: "megatile-0002"}
    result = run(night, tmp_path / "out", config)
    assert result.report["workflow_used"] == "sds" and result.status == "ok"
    _same_mosaic(result, single["sds"])
    tasks = {t["key"]: t for t in _units(result.report, "megatile")}
    assert tasks["megatile-0002"]["status"] == "ok" and tasks["megatile-0002"]["retries"] >= 1
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the dead worker


def test_killing_a_worker_from_outside_while_units_run_still_completes(cluster, night, single, tmp_path) -> None:
    address, client = cluster
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    victim = sorted(pids.items())[-1]
    killed = threading.Event()

    def kill_on_first_unit(event) -> None:
        if isinstance(event, LogEvent) and event.key == "scheduler_debug_task_done" and not killed.is_set():
            killed.set()
            os.kill(victim[1], signal.SIGKILL)

    result = run(night, tmp_path / "out", {**BASE, **WORKFLOWS["mosaic_first"], "scheduler": address},
                 listeners=[kill_on_first_unit])
    assert killed.is_set() and result.status == "ok"
    _same_mosaic(result, single["mosaic_first"])
    assert all(t["status"] == "ok" for t in result.report["scheduler"]["tasks"])
    client.wait_for_workers(2, timeout=60)


def test_a_failing_sds_batch_is_retried_then_recorded_and_sds_falls_back(cluster, night, single, tmp_path) -> None:
    address, _ = cluster
    config = {**BASE, **WORKFLOWS["sds"], "scheduler": address, "scheduler_retries": 1, "_sds_inject_failure_batch": 2}
    result = run(night, tmp_path / "out", config)
    assert result.status == "ok" and result.report["workflow_used"] == "mosaic_first"
    assert result.report["fallbacks"][0]["from"] == "sds"
    tasks = result.report["scheduler"]["tasks"]
    failed = [t for t in tasks if t["status"] == "failed"]
    assert [t["key"] for t in failed] == ["megatile-0002"] and failed[0]["retries"] == 1
    assert "SdsInjectedFailure" in failed[0]["reason"]
    assert any(t["kind"] == "block" and t["status"] == "ok" for t in tasks)  # the fallback ran on the cluster too
    assert result.report["frames"]["used"] == 2 * NIGHT["frames_per_panel"] and np.isfinite(result.data).any()


def test_cancel_stops_the_run_and_its_outstanding_units(cluster, night, tmp_path) -> None:
    address, _ = cluster
    cancel = threading.Event()

    def cancel_on_first_unit(event) -> None:
        if isinstance(event, LogEvent) and event.key == "scheduler_debug_task_done":
            cancel.set()

    with pytest.raises(RunCancelled):
        run(night, tmp_path / "out", {**BASE, **WORKFLOWS["sds"], "scheduler": address},
            listeners=[cancel_on_first_unit], cancel_event=cancel)
    import json

    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["status"] == "cancelled"
    statuses = [t["status"] for t in _units(report, "megatile")]
    assert statuses[0] == "ok" and "cancelled" in statuses
    assert not (tmp_path / "out" / "mosaic_science.fits").exists()


def test_scheduler_local_starts_and_stops_a_cluster(tmp_path) -> None:
    pytest.importorskip("distributed")
    reporter = Reporter()
    config = validate_config({"scheduler": "local", "scheduler_workers": 1, "scheduler_memory_limit_mb": 1024})
    executor = dist.open_scheduler(config, reporter, tmp_path)
    try:
        assert isinstance(executor, dist.DaskExecutor) and executor.report["kind"] == "local"
        assert executor.report["workers"] == 1 and executor.report["memory_limit_mb"] == 1024
        ctx = RunContext(config, reporter, tmp_path, tmp_path, executor=executor)
        remote = dist.submit_units(ctx, "echo", dist.echo_unit, [("echo", ("ok",))])
        assert _drive(remote.result(0)) == "ok"
        assert "scheduler_info_local" in [e.key for e in reporter.log_events]
    finally:
        executor.close()
    assert executor.cluster.status.name in ("closed", "closing")


def test_an_unreachable_scheduler_is_a_user_error(tmp_path, monkeypatch) -> None:
    pytest.importorskip("distributed")
    monkeypatch.setattr(dist, "CONNECT_TIMEOUT_S", 1.0)
    with pytest.raises(UserError) as info:
        dist.open_scheduler(validate_config({"scheduler": "tcp://127.0.0.1:9"}), Reporter(), tmp_path)
    assert info.value.key == "scheduler_error_connect"


def test_master_tiles_built_by_units_are_reused_by_the_next_run(night, single, tmp_path) -> None:
    config = {**BASE, **WORKFLOWS["classic"], "scheduler": "inline", "cache_retention": "keep"}
    first = run(night, tmp_path / "out", config)
    tiles = len(first.report["classic"]["tiles"])
    assert len(_units(first.report, "master_tile")) == tiles
    second = run(night, tmp_path / "out", config)
    assert _units(second.report, "master_tile") == []  # every tile came from the resume manifest
    assert all(tile["reused"] for tile in second.report["classic"]["tiles"])
    _same_mosaic(second, single["classic"])


def test_gpu_pinning_gives_each_worker_its_own_device(cluster) -> None:
    """What a GPU cluster does (one worker per device), checked on CPU workers: the plugin pins them."""
    _, client = cluster
    client.wait_for_workers(2, timeout=60)
    client.register_plugin(dist.gpu_pin_plugin(2))
    try:
        devices = client.run(dist.worker_gpu_device)
        assert sorted(devices.values()) == [0, 1]
        configs = client.run(lambda: dist._unit_context(Reporter(), {"gpu_device_id": 7}, "/tmp").config["gpu_device_id"])
        assert sorted(configs.values()) == [0, 1]  # the unit's config follows the worker's device
    finally:
        client.unregister_worker_plugin("napari-zemosaic-gpu-pin")
        client.run(lambda: setattr(dist, "_PINNED_DEVICE", None))

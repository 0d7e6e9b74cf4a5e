"""The GPU policy without a GPU: availability, decisions, fallbacks, OOM retries, chunk plans.

CI has no GPU and no CuPy. Tests that depend on CuPy being *absent* skip themselves when it
is installed. The decision logic (what happens when the device says yes, runs out of memory
or fails) is exercised with :func:`decision_logic_backend`, a stand-in for the device in
which NumPy plays the array module and a byte limit plays the device memory. It tests
only the policy's bookkeeping; the numerics on a real device are the job of
``test_gpu_parity.py`` (``pytest -m gpu``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_zemosaic.config import apply_overrides, default_config
from napari_zemosaic.engine import gpu
from napari_zemosaic.engine.gpu import (
    ENV_FORCE_CPU,
    ENV_FORCE_CPU_INTERTILE,
    ENV_SAFETY_FRACTION,
    MAX_OOM_RETRIES,
    STAGES,
    ComputePolicy,
    GpuBackend,
    GpuUnavailableError,
)
from napari_zemosaic.events import Reporter
from napari_zemosaic.i18n import load_catalog, placeholders, tr

CUPY_INSTALLED = importlib.util.find_spec("cupy") is not None
needs_no_cupy = pytest.mark.skipif(CUPY_INSTALLED, reason="checks the behaviour without CuPy")
GPU_SOURCE = Path(gpu.__file__)
GIB = 2**30
MIB = 2**20


def decision_logic_backend(
    *, free_bytes: int = 6 * GIB, total_bytes: int = 8 * GIB, available: tuple[bool, str] = (True, "")
) -> tuple[GpuBackend, dict[str, int]]:
    """Stand-in device FOR DECISION-LOGIC TESTS ONLY: no GPU is touched, NumPy is the array module.

    Returns the backend and a counter of the calls the policy made to it.
    """
    calls = {"probe": 0, "free_pools": 0, "init_pools": 0}

    def probe(_device_id: int) -> tuple[bool, str]:
        calls["probe"] += 1
        return available

    def free_pools(_device_id: int) -> None:
        calls["free_pools"] += 1

    def init_pools(_device_id: int) -> None:
        calls["init_pools"] += 1

    info = {
        "device_id": 0,
        "name": "decision-logic stand-in",
        "compute_capability": "0",
        "total_bytes": total_bytes,
        "free_bytes": free_bytes,
        "pool_free_bytes": 0,
        "pool_used_bytes": 0,
        "cupy_version": "n/a",
        "cuda_runtime_version": "n/a",
        "cuda_driver_version": "n/a",
    }
    backend = GpuBackend(
        probe=probe,
        memory_info=lambda _device_id: dict(info),
        free_memory=lambda _device_id: {key: info[key] for key in ("total_bytes", "free_bytes", "pool_free_bytes")},
        array_module=lambda: np,
        init_pools=init_pools,
        free_pools=free_pools,
        device_scope=lambda _device_id: nullcontext(),
    )
    return backend, calls


def keys_logged(reporter: Reporter) -> list[str]:
    return [event.key for event in reporter.log_events]


def gpu_policy(reporter: Reporter | None = None, config: dict[str, Any] | None = None, **backend_args: Any):
    backend, calls = decision_logic_backend(**backend_args)
    policy = ComputePolicy.from_config(config or default_config(), reporter=reporter, env={}, backend=backend)
    return policy, calls


# ----------------------------------------------------------------------------- without CuPy


def test_module_imports_without_pulling_in_cupy() -> None:
    code = "import sys, napari_zemosaic.engine.gpu as g; print('cupy' in sys.modules, g.STAGES)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.startswith("False")
    assert "stack" in output


@needs_no_cupy
def test_gpu_is_available_says_why_not() -> None:
    ok, reason = gpu.gpu_is_available(refresh=True)
    assert ok is False
    assert "cupy" in reason.lower()
    assert gpu.cupy_or_none() is None
    assert gpu.gpu_memory_info() is None
    assert gpu.gpu_free_memory() is None
    assert gpu.gpu_memory_sufficient(1) is False
    # Pool helpers are harmless no-ops without CuPy.
    gpu.ensure_cupy_pool_initialized()
    gpu.free_cupy_memory_pools()


@needs_no_cupy
def test_default_config_without_gpu_runs_every_stage_on_numpy_and_says_so() -> None:
    reporter = Reporter()
    policy = ComputePolicy.from_config(default_config(), reporter=reporter, env={})
    assert all(policy.xp_for(stage) is np for stage in STAGES)
    assert not any(policy.uses_gpu(stage) for stage in STAGES)
    assert policy.gpu_budget_bytes() == 0

    events = [event for event in reporter.log_events if event.key == "gpu_fallback_unavailable"]
    assert len(events) == 1 and events[0].level == "warning"
    assert "cupy" in events[0].params["reason"].lower()
    assert "{" not in events[0].text("en") and "{" not in events[0].text("fr")

    report = json.loads(json.dumps(policy.to_report()))
    assert report["backend_by_stage"] == {stage: "cpu" for stage in STAGES}
    assert report["gpu"] is None
    (fallback,) = report["gpu_fallbacks"]
    assert fallback["key"] == "gpu_fallback_unavailable"
    assert fallback["stages"] == list(STAGES)  # every stage is requested by default


@needs_no_cupy
def test_strict_mode_without_cupy_raises_with_a_locale_key() -> None:
    config = apply_overrides(default_config(), gpu.config_overrides_for_gpu_mode("on"))
    with pytest.raises(GpuUnavailableError) as caught:
        ComputePolicy.from_config(config, env={})
    assert caught.value.key == "gpu_error_unavailable_strict"
    assert "cupy" in caught.value.params["reason"].lower()
    assert "{" not in tr(caught.value.key, "fr", **caught.value.params)


# ----------------------------------------------------------------------------- decisions


def test_strict_mode_raises_instead_of_falling_back() -> None:
    # Decision-logic stand-in: the availability answer is injected.
    config = apply_overrides(default_config(), {"gpu_strict": True})
    reporter = Reporter()
    with pytest.raises(GpuUnavailableError) as caught:
        ComputePolicy.from_config(config, reporter, env={}, availability=lambda: (False, "no CUDA device"))
    assert caught.value.key == "gpu_error_unavailable_strict"
    assert caught.value.params["reason"] == "no CUDA device"
    assert "gpu_fallback_unavailable" not in keys_logged(reporter)


def test_gpu_requested_and_available_puts_every_stage_on_the_gpu() -> None:
    reporter = Reporter()
    policy, calls = gpu_policy(reporter)
    assert calls["probe"] == 1 and calls["init_pools"] == 1
    assert all(policy.uses_gpu(stage) for stage in STAGES)
    assert policy.fallbacks == []
    report = policy.summary_start()
    assert report["backend_by_stage"] == {stage: "gpu" for stage in STAGES}
    assert report["gpu"]["name"] == "decision-logic stand-in"
    assert keys_logged(reporter) == ["gpu_summary_device", "gpu_summary_stages"]
    stages_event = reporter.log_events[-1]
    assert stages_event.params["cpu_stages"] == "-"


def test_gpu_mode_off_never_probes_and_logs_that_the_gpu_is_unused() -> None:
    reporter = Reporter()
    config = apply_overrides(default_config(), gpu.config_overrides_for_gpu_mode("off"))
    policy, calls = gpu_policy(reporter, config)
    assert calls["probe"] == 0  # no CUDA context is created for a CPU run
    assert policy.fallbacks == []  # nothing was requested, so nothing fell back
    policy.summary_start()
    assert keys_logged(reporter) == ["gpu_summary_gpu_not_used", "gpu_summary_stages"]


def test_legacy_stack_alias_alone_turns_gpu_stacking_off() -> None:
    policy, _ = gpu_policy(config={"use_gpu_stack": False})
    assert policy.decisions == {stage: ("cpu" if stage == "stack" else "gpu") for stage in STAGES}
    assert policy.fallbacks == []


def test_force_cpu_env_wins_even_when_the_gpu_is_available() -> None:
    # Decision-logic stand-in: ``availability`` says yes without any device.
    reporter = Reporter()
    probed = []
    policy = ComputePolicy.from_config(
        default_config(), reporter, env={ENV_FORCE_CPU: "1"}, availability=lambda: probed.append(1) or (True, "")
    )
    assert probed == []
    assert all(policy.xp_for(stage) is np for stage in STAGES)
    (event,) = [e for e in reporter.log_events if e.key == "gpu_fallback_env_override"]
    assert event.params["variable"] == ENV_FORCE_CPU
    assert policy.to_report()["gpu_fallbacks"][0]["stages"] == list(STAGES)


def test_force_cpu_env_also_wins_over_strict_mode() -> None:
    config = apply_overrides(default_config(), {"gpu_strict": True})
    backend, _ = decision_logic_backend()
    policy = ComputePolicy.from_config(config, env={ENV_FORCE_CPU: "yes"}, backend=backend)
    assert not policy.any_gpu


@pytest.mark.parametrize("value", ["", "0", "false", "OFF", "no"])
def test_force_cpu_env_false_values_change_nothing(value: str) -> None:
    backend, _ = decision_logic_backend()
    policy = ComputePolicy.from_config(default_config(), env={ENV_FORCE_CPU: value}, backend=backend)
    assert all(policy.uses_gpu(stage) for stage in STAGES)


def test_force_cpu_intertile_env_only_moves_the_intertile_stage() -> None:
    reporter = Reporter()
    backend, _ = decision_logic_backend()
    policy = ComputePolicy.from_config(default_config(), reporter, env={ENV_FORCE_CPU_INTERTILE: "1"}, backend=backend)
    assert policy.backend_by_stage() == {stage: ("cpu" if stage == "intertile" else "gpu") for stage in STAGES}
    (event,) = [e for e in reporter.log_events if e.key == "gpu_fallback_env_override"]
    assert event.params == {"stages": "intertile", "variable": ENV_FORCE_CPU_INTERTILE}
    assert event.level == "info"


def test_safety_fraction_env_override_is_used_and_logged() -> None:
    reporter = Reporter()
    backend, _ = decision_logic_backend(free_bytes=4 * GIB, total_bytes=8 * GIB)
    policy = ComputePolicy.from_config(default_config(), reporter, env={ENV_SAFETY_FRACTION: "0.5"}, backend=backend)
    assert policy.safety_fraction == 0.5
    assert "gpu_info_env_safety_fraction" in keys_logged(reporter)
    # (4 GiB free − 256 MiB reserve) × 0.5
    assert policy.gpu_budget_bytes() == (4 * GIB - 256 * MIB) // 2
    assert policy.gpu_budget_bytes(concurrent_units=4) == (4 * GIB - 256 * MIB) // 8


def test_a_recent_memory_reading_sizes_the_budget_until_it_is_too_old_or_an_oom_happened() -> None:
    """gpu_budget_bytes(max_age_s=...) reuses a reading younger than that (P3 sizes frame after frame),
    reads the device again once it is older, always without max_age_s, and after an out-of-memory."""
    backend, _ = decision_logic_backend(free_bytes=4 * GIB, total_bytes=8 * GIB)
    free = {"bytes": 4 * GIB, "reads": 0}

    def free_memory(_device_id: int) -> dict[str, int]:
        free["reads"] += 1
        return {"total_bytes": 8 * GIB, "free_bytes": free["bytes"], "pool_free_bytes": 0}

    backend = GpuBackend(probe=backend.probe, memory_info=backend.memory_info, free_memory=free_memory,
                         array_module=backend.array_module, init_pools=backend.init_pools,
                         free_pools=backend.free_pools, device_scope=backend.device_scope)
    policy = ComputePolicy.from_config(default_config(), Reporter(), env={}, backend=backend)
    fraction = policy.safety_fraction
    first = policy.gpu_budget_bytes(max_age_s=60.0)
    assert first == int((4 * GIB - 256 * MIB) * fraction)
    reads = free["reads"]
    free["bytes"] = 2 * GIB
    assert policy.gpu_budget_bytes(max_age_s=60.0) == first and free["reads"] == reads  # the same reading
    assert policy.gpu_budget_bytes(2, max_age_s=60.0) == first // 2
    assert policy.gpu_budget_bytes(max_age_s=1e-9) == int((2 * GIB - 256 * MIB) * fraction)  # too old
    assert free["reads"] == reads + 1
    free["bytes"] = 3 * GIB
    assert policy.gpu_budget_bytes() == int((3 * GIB - 256 * MIB) * fraction)  # live without max_age_s
    free["bytes"] = 1 * GIB

    def out_of_memory(xp: Any, chunk_scale: float) -> float:
        if chunk_scale == 1.0:
            raise MemoryError("out of memory while allocating")
        return policy.gpu_budget_bytes(max_age_s=60.0)

    assert policy.run_stage("reproject", out_of_memory, lambda xp=np: -1.0) == int((1 * GIB - 256 * MIB) * fraction)


@pytest.mark.parametrize("value", ["abc", "0", "1.5", "nan"])
def test_invalid_safety_fraction_env_is_ignored_with_a_warning(value: str) -> None:
    reporter = Reporter()
    backend, _ = decision_logic_backend()
    policy = ComputePolicy.from_config(default_config(), reporter, env={ENV_SAFETY_FRACTION: value}, backend=backend)
    assert policy.safety_fraction == default_config()["gpu_safety_fraction"]
    (event,) = [e for e in reporter.log_events if e.key == "gpu_warning_env_safety_fraction_invalid"]
    assert event.level == "warning" and event.params["value"] == value


def test_allowed_bytes_counts_pool_free_bytes_and_keeps_a_reserve() -> None:
    info = {"total_bytes": 8 * GIB, "free_bytes": 5 * GIB, "pool_free_bytes": 1 * GIB}
    assert gpu.allowed_bytes_from_info(info, 0.8) == int((6 * GIB - 256 * MIB) * 0.8)
    # A small device keeps a tenth of its memory rather than 256 MiB.
    small = {"total_bytes": 1 * GIB, "free_bytes": 1 * GIB, "pool_free_bytes": 0}
    assert gpu.allowed_bytes_from_info(small, 1.0) == GIB - GIB // 10
    assert gpu.allowed_bytes_from_info(None, 0.8) == 0


def test_memory_limit_caps_the_budget_minus_what_the_pool_hands_out() -> None:
    info = {"total_bytes": 8 * GIB, "free_bytes": 5 * GIB, "pool_free_bytes": 0, "pool_used_bytes": 100 * MIB}
    assert gpu.allowed_bytes_from_info(info, 0.5, limit_bytes=300 * MIB) == 100 * MIB
    assert gpu.allowed_bytes_from_info(info, 0.5, limit_bytes=50 * MIB) == 0
    # A limit above what the device has changes nothing.
    assert gpu.allowed_bytes_from_info(info, 0.5, limit_bytes=64 * GIB) == gpu.allowed_bytes_from_info(info, 0.5)


def test_memory_limit_from_config_and_env() -> None:
    reporter = Reporter()
    backend, _ = decision_logic_backend(free_bytes=6 * GIB, total_bytes=8 * GIB)
    config = {**default_config(), gpu.CONFIG_MEMORY_LIMIT_KEY: 512}
    policy = ComputePolicy.from_config(config, reporter, env={}, backend=backend)
    assert policy.memory_limit_bytes == 512 * MIB
    assert policy.gpu_budget_bytes() == int(512 * MIB * 0.8)
    # The environment wins over the config, and says so.
    policy = ComputePolicy.from_config(config, reporter, env={gpu.ENV_MEMORY_LIMIT_MB: "256"}, backend=backend)
    assert policy.memory_limit_bytes == 256 * MIB
    assert policy.to_report()["gpu"]["memory_limit_mb"] == 256.0
    assert "gpu_info_env_memory_limit" in keys_logged(reporter)
    for bad in ("-5", "zero", "inf"):
        reporter = Reporter()
        policy = ComputePolicy.from_config(config, reporter, env={gpu.ENV_MEMORY_LIMIT_MB: bad}, backend=backend)
        assert policy.memory_limit_bytes == 512 * MIB  # the config value stays
        assert "gpu_warning_memory_limit_invalid" in keys_logged(reporter)


def test_unknown_stage_is_an_error() -> None:
    policy = ComputePolicy()
    with pytest.raises(ValueError):
        policy.xp_for("phase5")


# ----------------------------------------------------------------------------- run_stage


class DeviceMemory:
    """Decision-logic stand-in: refuses any single allocation above ``limit_bytes`` like a GPU would."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.allocations: list[int] = []

    def allocate(self, nbytes: int) -> None:
        self.allocations.append(nbytes)
        if nbytes > self.limit_bytes:
            raise MemoryError(f"Out of memory allocating {nbytes:,} bytes")


def chunked_channel_sums(image: np.ndarray, policy: ComputePolicy, device: DeviceMemory | None):
    """A chunked reduction written like a GPU stage: rows per chunk from the budget × chunk_scale."""

    def compute(xp: Any, chunk_scale: float = 1.0) -> np.ndarray:
        channels, height, width = image.shape
        row_bytes = channels * width * image.itemsize * 2  # the chunk plus one temporary
        budget = int(policy.gpu_budget_bytes() * chunk_scale) if device is not None else 1 << 62
        rows = gpu.plan_chunks(height, row_bytes, budget)
        total = xp.zeros(channels, dtype=xp.float64)
        for rows_slice in gpu.chunk_slices(height, rows):
            if device is not None:
                device.allocate((rows_slice.stop - rows_slice.start) * row_bytes)
            chunk = xp.asarray(image[:, rows_slice, :], dtype=xp.float64)
            total += chunk.sum(axis=(1, 2))
        return gpu.to_host(total)

    return compute


def test_oom_is_retried_with_smaller_chunks_and_the_result_is_exact() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(1000.0, 10.0, size=(3, 512, 256)).astype(np.float32)
    reporter = Reporter()
    # Budget (5 MiB free after the reserve) × 0.8 = 4 MiB: the first plan takes all 512 rows
    # (3 MiB), then 2 × 256 rows (1.5 MiB each), then 4 × 128 rows (768 KiB), which is the
    # first plan the stand-in device (1 MiB per allocation) accepts.
    policy, calls = gpu_policy(reporter, free_bytes=5 * MIB + 256 * MIB, total_bytes=8 * GIB)
    device = DeviceMemory(limit_bytes=1 * MIB)
    row_bytes = 3 * 256 * 4 * 2
    gpu_fn = chunked_channel_sums(image, policy, device)
    cpu_fn = chunked_channel_sums(image, policy, None)

    result = policy.run_stage("stack", gpu_fn, cpu_fn)
    expected = image.astype(np.float64).sum(axis=(1, 2))
    np.testing.assert_allclose(result, expected, rtol=1e-12)

    retries = [e for e in reporter.log_events if e.key == "gpu_info_oom_retry"]
    assert [e.params["chunk_scale"] for e in retries] == [0.5, 0.25]
    assert calls["free_pools"] == 2  # pools freed before each retry
    assert device.allocations[-4:] == [128 * row_bytes] * 4
    assert policy.fallbacks == [] and policy.uses_gpu("stack")
    # The hint lives on this run: the next unit starts with the scale that worked.
    assert policy.chunk_scale("stack") == 0.25
    device.allocations.clear()
    np.testing.assert_allclose(policy.run_stage("stack", gpu_fn, cpu_fn), expected, rtol=1e-12)
    assert device.allocations == [128 * row_bytes] * 4
    assert len([e for e in reporter.log_events if e.key == "gpu_info_oom_retry"]) == 2
    report = policy.to_report()
    assert report["gpu"]["units_by_stage"]["stack"] == {"gpu": 2, "cpu": 0}
    assert report["gpu"]["oom_retries_by_stage"]["stack"] == 2

    # No state outlives a run: a new policy starts from full-size chunks again.
    fresh, _ = gpu_policy()
    assert fresh.chunk_scale("stack") == 1.0


def test_persistent_oom_falls_back_for_the_whole_stage_after_the_retries() -> None:
    reporter = Reporter()
    policy, calls = gpu_policy(reporter)
    scales: list[float] = []

    def gpu_fn(xp: Any, chunk_scale: float) -> str:
        scales.append(chunk_scale)
        raise MemoryError("Out of memory allocating 1,073,741,824 bytes")

    assert policy.run_stage("reproject", gpu_fn, lambda xp: ("cpu", xp)) == ("cpu", np)
    assert scales == [1.0 / 2**k for k in range(MAX_OOM_RETRIES + 1)]
    (event,) = [e for e in reporter.log_events if e.key == "gpu_fallback_runtime_error"]
    assert event.params["stages"] == "reproject"
    assert "MemoryError" in event.params["error"] and "retries" in event.params["error"]
    # The whole stage is on the CPU now: later units never touch the GPU.
    assert policy.xp_for("reproject") is np
    assert policy.run_stage("reproject", gpu_fn, lambda xp: "cpu again") == "cpu again"
    assert len(scales) == MAX_OOM_RETRIES + 1
    assert policy.backend_by_stage()["reproject"] == "cpu"
    assert policy.uses_gpu("stack")  # other stages keep their decision
    summary = policy.summary_end(reporter)
    json.dumps(summary)
    assert summary["gpu_fallbacks"][0]["units_on_gpu_before"] == {"reproject": 0}
    assert keys_logged(reporter)[-1] == "gpu_summary_end_fallbacks"


class CUDARuntimeError(RuntimeError):
    """Decision-logic stand-in named like CuPy's runtime error (a non-OOM device failure)."""


def test_non_memory_gpu_error_falls_back_at_once_and_keeps_earlier_units() -> None:
    reporter = Reporter()
    policy, _ = gpu_policy(reporter)
    attempts = []

    def good(xp: Any, chunk_scale: float) -> str:
        return "gpu"

    def broken(xp: Any, chunk_scale: float) -> str:
        attempts.append(chunk_scale)
        raise CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")

    assert policy.run_stage("assembly", good, lambda xp: "cpu") == "gpu"
    assert policy.run_stage("assembly", broken, lambda xp: "cpu") == "cpu"
    assert attempts == [1.0]  # no retry for a non-memory error
    assert "gpu_info_oom_retry" not in keys_logged(reporter)
    assert policy.backend_by_stage()["assembly"] == "gpu_then_cpu"
    report = policy.to_report()
    assert report["gpu_fallbacks"][0]["units_on_gpu_before"] == {"assembly": 1}
    assert "cudaErrorIllegalAddress" in report["gpu"]["errors"][0]["error"]


def test_insufficient_memory_for_the_smallest_chunk_falls_back_before_trying() -> None:
    reporter = Reporter()
    policy, _ = gpu_policy(reporter, free_bytes=1 * GIB, total_bytes=8 * GIB)
    allowed = policy.gpu_budget_bytes()

    def gpu_fn(xp: Any, chunk_scale: float) -> str:
        raise AssertionError("must not run")

    assert policy.run_stage("stack", gpu_fn, lambda xp: "cpu", estimate_bytes=allowed + 10 * MIB) == "cpu"
    (event,) = [e for e in reporter.log_events if e.key == "gpu_fallback_insufficient_memory"]
    assert event.params["estimated_mb"] > event.params["allowed_mb"] == round(allowed / MIB, 1)
    assert not policy.uses_gpu("stack")


def test_strict_mode_raises_on_runtime_errors_and_memory_shortage() -> None:
    config = apply_overrides(default_config(), {"gpu_strict": True})
    policy, _ = gpu_policy(config=config)

    def oom(xp: Any, chunk_scale: float) -> None:
        raise MemoryError("out of memory")

    with pytest.raises(GpuUnavailableError) as caught:
        policy.run_stage("stack", oom, lambda xp: "cpu")
    assert caught.value.key == "gpu_error_runtime_strict"
    assert "MemoryError" in caught.value.params["error"]
    with pytest.raises(GpuUnavailableError) as caught:
        policy.run_stage("reproject", oom, lambda xp: "cpu", estimate_bytes=1 << 60)
    assert caught.value.key == "gpu_error_insufficient_memory_strict"
    assert policy.fallbacks == []


def test_cancel_and_caller_errors_pass_through_without_a_fallback() -> None:
    from napari_zemosaic.engine.context import RunCancelled

    reporter = Reporter()
    policy, _ = gpu_policy(reporter)

    def cancelled(xp: Any, chunk_scale: float) -> None:
        raise RunCancelled()

    def bad_data(xp: Any, chunk_scale: float) -> None:
        raise KeyError("frame")

    with pytest.raises(RunCancelled):
        policy.run_stage("stack", cancelled, lambda xp: "cpu")
    with pytest.raises(KeyError):
        policy.run_stage("stack", bad_data, lambda xp: "cpu", passthrough=(KeyError,))
    assert policy.fallbacks == [] and policy.uses_gpu("stack")


def test_concurrent_units_record_one_fallback_per_stage() -> None:
    reporter = Reporter()
    policy, _ = gpu_policy(reporter)
    barrier = threading.Barrier(4)

    def broken(xp: Any, chunk_scale: float) -> int:
        barrier.wait(timeout=5)
        raise CUDARuntimeError("cudaErrorLaunchFailure")

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: policy.run_stage("debayer", broken, lambda xp: i), range(8)))
    assert results == list(range(8))
    assert len(policy.fallbacks) == 1
    assert keys_logged(reporter).count("gpu_fallback_runtime_error") == 1
    assert policy.to_report()["gpu"]["units_by_stage"]["debayer"] == {"gpu": 0, "cpu": 8}


def test_cpu_stage_calls_only_the_cpu_function() -> None:
    policy = ComputePolicy()  # a bare policy: everything on the CPU, nothing requested
    assert policy.run_stage("stack", lambda xp, chunk_scale: "gpu", lambda xp: xp) is np
    policy.end_stage("stack")
    policy.close()


def test_end_stage_frees_the_pools_only_when_the_gpu_is_used() -> None:
    policy, calls = gpu_policy()
    policy.end_stage("reproject")
    assert calls["free_pools"] == 1
    off = apply_overrides(default_config(), gpu.config_overrides_for_gpu_mode("off"))
    cpu_policy, cpu_calls = gpu_policy(config=off)
    cpu_policy.end_stage("reproject")
    assert cpu_calls["free_pools"] == 0


def test_summaries_render_in_both_languages() -> None:
    reporter = Reporter()
    policy, _ = gpu_policy(reporter)
    policy.summary_start()
    policy.run_stage("intertile", lambda xp, chunk_scale: 1, lambda xp: 0)
    policy.summary_end()
    assert keys_logged(reporter).count("gpu_summary_end_stage") == len(STAGES)
    for event in reporter.log_events:
        for language in ("en", "fr"):
            text = event.text(language)
            assert text != event.key and "{" not in text


# ----------------------------------------------------------------------------- chunk planning


def test_plan_chunks_examples() -> None:
    assert gpu.plan_chunks(10, 100, 10_000) == 10
    assert gpu.plan_chunks(10, 100, 900) == 5  # room for 9 → two balanced chunks of 5
    assert gpu.plan_chunks(100, 10, 330) == 25  # room for 33 → 4 chunks are needed → 4 × 25
    assert gpu.plan_chunks(10, 100, 50) == 1
    assert gpu.plan_chunks(10, 100, 50, min_items=3) == 3
    assert gpu.plan_chunks(2, 100, 50, min_items=3) == 2
    assert gpu.plan_chunks(0, 100, 1000) == 0


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 5000),
    per_item=st.integers(1, 10_000),
    budget=st.integers(0, 10_000_000),
    min_items=st.integers(1, 20),
)
def test_plan_chunks_fits_the_budget_and_uses_the_fewest_balanced_chunks(total, per_item, budget, min_items) -> None:
    per_chunk = gpu.plan_chunks(total, per_item, budget, min_items)
    floor_items = min(min_items, total)
    assert floor_items <= per_chunk <= total
    fitting = budget // per_item
    if fitting >= floor_items:
        assert per_chunk * per_item <= budget
        chunks = -(-total // per_chunk)
        assert chunks == -(-total // min(fitting, total))  # never more chunks than needed
        if per_chunk > floor_items:  # balanced: the last chunk is not much smaller than the others
            assert total - (chunks - 1) * per_chunk > per_chunk - chunks
    else:
        assert per_chunk == floor_items
    slices = gpu.chunk_slices(total, per_chunk)
    assert slices[0].start == 0 and slices[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def test_plan_block_side_examples() -> None:
    assert gpu.plan_block_side(16, 16 * 1000 * 1000, 4096) == 992  # isqrt(1e6)=1000 → 31 warps of 32
    assert gpu.plan_block_side(16, 16 * 5000 * 5000, 4096) == 4096
    assert gpu.plan_block_side(16, 16 * 40 * 40, 4096) == 64  # minimum, even if it does not fit
    assert gpu.plan_block_side(16, 16 * 40 * 40, 4096, min_side=16) == 32
    assert gpu.plan_block_side(16, 0, 48) == 48  # a canvas smaller than the minimum block
    assert gpu.plan_block_side(16, 16 * 20 * 20, 4096, min_side=8) == 20  # under one warp: not aligned


@settings(max_examples=300, deadline=None)
@given(bpp=st.integers(1, 4096), budget=st.integers(0, 2**34), max_side=st.integers(1, 20_000))
def test_plan_block_side_fits_the_budget(bpp, budget, max_side) -> None:
    side = gpu.plan_block_side(bpp, budget, max_side)
    assert 1 <= side <= max_side
    if side > min(64, max_side):
        assert side * side * bpp <= budget
        assert side == max_side or side % 32 == 0


@settings(max_examples=200, deadline=None)
@given(
    boxes=st.lists(st.tuples(st.integers(0, 900), st.integers(1, 400), st.integers(0, 1500), st.integers(1, 600)),
               min_size=1, max_size=30),
    side=st.sampled_from([64, 128, 256, 512]),
    share=st.floats(0.05, 1.5),
)
def test_device_passes_hold_every_piece_once_within_the_store(boxes, side, share) -> None:
    """mosaic_first.plan_device_passes: groups of blocks in row-major order, each within the
    store, covering every block once; None when everything fits, or a block alone does not."""
    from napari_zemosaic.engine.mosaic_first import block_piece_bytes, plan_device_passes

    canvas = (1300, 2100)
    bboxes = [(y, min(y + h, canvas[0]), x, min(x + w, canvas[1])) for y, h, x, w in boxes]
    per_block = block_piece_bytes(bboxes, side, canvas, 3)
    total = sum(per_block.values())
    assert total == sum((b[1] - b[0]) * (b[3] - b[2]) for b in bboxes) * 3 * 4  # the boxes, cut along block edges
    store = int(total * share)
    passes = plan_device_passes(per_block, store, max_passes=10_000)
    if total <= store or max(per_block.values()) > store:
        assert passes is None
        return
    assert passes is not None and len(passes) >= 2
    assert sorted(b for group in passes for b in group) == sorted(per_block)  # each block once
    assert all(sum(per_block[b] for b in group) <= store for group in passes)
    order = [sorted(group) for group in passes]
    assert all(a[-1] < b[0] for a, b in zip(order, order[1:]))  # row-major runs of blocks
    # Each group was as full as it could go: the next group's first block did not fit in it.
    assert all(sum(per_block[b] for b in a) + per_block[b[0]] > store for a, b in zip(order, order[1:]))
    assert plan_device_passes(per_block, store, max_passes=len(passes) - 1) is None


def test_device_passes_examples() -> None:
    from napari_zemosaic.engine.mosaic_first import MAX_DEVICE_PASSES, plan_device_passes

    blocks = {(0, 0): 40, (0, 1): 30, (1, 0): 50, (1, 1): 20}
    assert plan_device_passes(blocks, 140) is None  # everything fits at once
    assert plan_device_passes(blocks, 49) is None  # block (1, 0) alone does not fit
    assert plan_device_passes(blocks, 70) == [{(0, 0), (0, 1)}, {(1, 0), (1, 1)}]
    assert plan_device_passes(blocks, 90) == [{(0, 0), (0, 1)}, {(1, 0), (1, 1)}]
    assert plan_device_passes(blocks, 120) == [{(0, 0), (0, 1), (1, 0)}, {(1, 1)}]
    assert plan_device_passes(blocks, 50) == [{(0, 0)}, {(0, 1)}, {(1, 0)}, {(1, 1)}]
    many = {(row, 0): 10 for row in range(MAX_DEVICE_PASSES + 1)}
    assert plan_device_passes(many, 10) is None  # more passes than allowed
    assert len(plan_device_passes(many, 20)) == -(-(MAX_DEVICE_PASSES + 1) // 2)
    assert plan_device_passes(blocks, 0) is None


def test_kernel_bytes_per_pixel_model() -> None:
    stack_20 = gpu.kernel_bytes_per_pixel("stack", channels=3, frames=20)
    # 20 frames × 3 channels × the kappa-sigma peak per value, plus pieces and outputs per channel
    assert stack_20 == 20 * 3 * 40 + 3 * 24 + 16
    assert gpu.kernel_bytes_per_pixel("stack", channels=3, frames=40) > stack_20
    linear = gpu.kernel_bytes_per_pixel("stack", channels=3, frames=20, rejection="linear_fit_clip")
    assert linear > stack_20
    assert gpu.kernel_bytes_per_pixel("stack", channels=3, frames=20, combine="median") > stack_20
    assert gpu.kernel_bytes_per_pixel("stack", frames=20, rejection="unknown") >= linear  # the largest figure
    mono = gpu.kernel_bytes_per_pixel("reproject", channels=1)
    assert gpu.kernel_bytes_per_pixel("reproject", channels=3) > mono
    assert gpu.kernel_bytes_per_pixel("reproject", method="lanczos3") > gpu.kernel_bytes_per_pixel("reproject")
    with pytest.raises(ValueError):
        gpu.kernel_bytes_per_pixel("fft")


def test_stack_model_matches_the_mosaic_first_workspace() -> None:
    mosaic_first = pytest.importorskip("napari_zemosaic.engine.mosaic_first")
    assert gpu.STACK_WORKSPACE_FACTOR == mosaic_first.STACK_WORKSPACE_FACTOR


def test_host_device_helpers_on_numpy() -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert gpu.to_host(data) is data
    assert gpu.to_device([1.0, 2.0], np).tolist() == [1.0, 2.0]


def test_capture_work_declines_without_a_cuda_device() -> None:
    ran: list[int] = []
    reason = gpu.capture_work(lambda values: ran.append(1), np.zeros(3), np)
    assert reason == "not on a CUDA device" and ran == []  # the work itself is left to the caller


def test_gpu_mode_overrides() -> None:
    assert gpu.config_overrides_for_gpu_mode("auto") == {}
    on = apply_overrides(default_config(), gpu.config_overrides_for_gpu_mode("ON"))
    assert on["gpu_strict"] and on["use_gpu_phase5"] and on["stack_use_gpu"] and on["use_gpu_stack"]
    off = apply_overrides(default_config(), gpu.config_overrides_for_gpu_mode("off"))
    assert not (off["gpu_strict"] or off["use_gpu_phase5"] or off["stack_use_gpu"] or off["use_gpu_stack"])
    with pytest.raises(ValueError):
        gpu.config_overrides_for_gpu_mode("maybe")


# ----------------------------------------------------------------------------- source checks

# Calls that make an exception visible: logged, recorded for the report, or noted as a GPU error.
RECORDING_CALLS = {"record_fallback", "_note_gpu_error", "_log", "log", "warning", "error", "info", "debug"}


def _handler_is_visible(handler: ast.ExceptHandler) -> bool:
    """An except block re-raises, logs/records, or returns a value built from the exception."""
    for node in ast.walk(ast.Module(body=handler.body, type_ignores=[])):
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in RECORDING_CALLS:
                return True
        if isinstance(node, ast.Return) and handler.name and node.value is not None:
            if any(isinstance(n, ast.Name) and n.id == handler.name for n in ast.walk(node.value)):
                return True  # the reason travels to the caller, which logs it (gpu_fallback_unavailable)
    return False


def test_every_except_in_gpu_module_reraises_or_records() -> None:
    tree = ast.parse(GPU_SOURCE.read_text(encoding="utf-8"))
    handlers = [node for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler)]
    assert handlers, "the check found no except blocks to inspect"
    silent = [handler.lineno for handler in handlers if not _handler_is_visible(handler)]
    assert silent == [], f"except blocks that swallow errors at lines {silent}"
    assert not any(handler.type is None for handler in handlers), "bare except"


def test_every_gpu_message_key_exists_in_both_languages() -> None:
    tree = ast.parse(GPU_SOURCE.read_text(encoding="utf-8"))
    prefixes = ("gpu_fallback_", "gpu_info_", "gpu_warning_", "gpu_error_", "gpu_debug_", "gpu_summary_")
    keys = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(prefixes)
        and node.value.replace("_", "").isalnum()
    }
    assert {"gpu_fallback_unavailable", "gpu_fallback_insufficient_memory", "gpu_fallback_runtime_error"} <= keys
    english, french = load_catalog("en"), load_catalog("fr")
    for key in sorted(keys):
        assert key in english and key in french, key
        assert placeholders(english[key]) == placeholders(french[key]), key


# ----------------------------------------------------------------------------- --gpu on in the CLI


@needs_no_cupy
def test_gpu_on_without_a_gpu_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from napari_zemosaic.cli import main
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    generate_demo(tmp_path / "night", DemoSpec(panels=(1, 1), frames_per_panel=2, scale=0.1, seed=3))
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "night" / "frames"), str(out), "--gpu", "on", "--lang", "en"])
    assert code == 2
    message = capsys.readouterr().err
    assert "--gpu on" in message and "cupy" in message.lower()
    report = json.loads((out / "run_report.json").read_text())
    assert report["status"] == "failed" and report["error"]["key"] == "gpu_error_unavailable_strict"


@needs_no_cupy
def test_gpu_auto_without_a_gpu_records_the_fallback_and_runs_on_the_cpu(tmp_path: Path) -> None:
    from napari_zemosaic.cli import main
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    generate_demo(tmp_path / "night", DemoSpec(panels=(1, 1), frames_per_panel=2, scale=0.1, seed=3))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "night" / "frames"), str(out), "--gpu", "auto"]) == 0
    compute = json.loads((out / "run_report.json").read_text())["compute"]
    assert set(compute["backend_by_stage"].values()) == {"cpu"}
    (fallback,) = compute["gpu_fallbacks"]
    assert fallback["key"] == "gpu_fallback_unavailable" and "cupy" in fallback["params"]["reason"].lower()


# ----------------------------------------------------------------------------- Mosaic-First wiring
#
# The GPU orchestration of Mosaic-First (readers feeding device threads, units through
# run_stage, block stacks in strips sized from the GPU budget, OOM retries, fallbacks) runs
# here with a stand-in device whose array module is NumPy behind a byte limit. Its arrays are
# NumPy arrays, so the mosaic must equal the CPU path's: every step computes the same
# function, only chunked differently. The numerics on a real device are checked by
# ``test_gpu_parity.py`` (``pytest -m gpu``).


class LimitedNumpy:
    """Stand-in array module FOR ORCHESTRATION TESTS: NumPy that refuses large buffers like a small GPU.

    ``empty``/``full``/``zeros`` above ``limit_bytes`` raise an out-of-memory ``MemoryError``;
    ``fail_after`` makes the n-th allocation raise a non-memory device error instead.
    """

    def __init__(self, limit_bytes: int = 1 << 62, fail_after: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.fail_after = fail_after
        self.allocations = 0
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def _check(self, shape: Any, dtype: Any) -> None:
        self.allocations += 1
        if self.fail_after is not None and self.allocations > self.fail_after:
            raise CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")
        nbytes = int(np.prod(shape)) * np.dtype(dtype if dtype is not None else float).itemsize
        if nbytes > self.limit_bytes:
            self.refused += 1
            raise MemoryError(f"Out of memory allocating {nbytes:,} bytes")

    def empty(self, shape: Any, dtype: Any = None, **kwargs: Any) -> np.ndarray:
        self._check(shape, dtype)
        return np.empty(shape, dtype if dtype is not None else float, **kwargs)

    def zeros(self, shape: Any, dtype: Any = None, **kwargs: Any) -> np.ndarray:
        self._check(shape, dtype)
        return np.zeros(shape, dtype if dtype is not None else float, **kwargs)

    def full(self, shape: Any, fill_value: Any, dtype: Any = None, **kwargs: Any) -> np.ndarray:
        self._check(shape, dtype if dtype is not None else np.asarray(fill_value).dtype)
        return np.full(shape, fill_value, dtype, **kwargs)


@pytest.fixture(scope="module")
def small_night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("gpu_wiring_night")
    generate_demo(root, DemoSpec(panels=(1, 2), frames_per_panel=4, scale=0.2, seed=5))
    return root / "frames"


def run_mosaic_first(
    frames_dir: Path, tmp_path: Path, policy: ComputePolicy | None, edit: Any = None, **overrides: Any
):
    """Mosaic-First on a folder with a given policy (the pipeline builds its own from CuPy).

    ``edit(infos)`` may change the ingested frames first (e.g. give one a plate-solved WCS).
    """
    from napari_zemosaic.config import validate_config
    from napari_zemosaic.engine.canvas import build_canvas
    from napari_zemosaic.engine.context import RunContext
    from napari_zemosaic.engine.frames import read_frame_info
    from napari_zemosaic.engine.mosaic_first import mosaic_first

    # A small host budget: several blocks, and the CPU path spills its pieces to disk.
    config = validate_config({"max_memory_mb": 16, **overrides})
    infos = [read_frame_info(path) for path in sorted(frames_dir.glob("*.fit"))]
    if edit is not None:
        edit(infos)
    canvas = build_canvas([i.wcs for i in infos], [i.shape for i in infos],
                          pixel_scale_arcsec=float(config["canvas_pixel_scale_arcsec"]),
                          padding_pct=float(config["canvas_padding_pct"]))
    reporter = policy.reporter if policy is not None and policy.reporter is not None else Reporter()
    ctx = RunContext(config, reporter, tmp_path, tmp_path / "cache", policy=policy)
    generator = mosaic_first(infos, canvas, ctx, 3)
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value, ctx


def standin_policy(xp: Any, reporter: Reporter, free_bytes: int = 6 * GIB, **config: Any) -> ComputePolicy:
    backend, _ = decision_logic_backend(free_bytes=free_bytes)
    backend = GpuBackend(probe=backend.probe, memory_info=backend.memory_info, free_memory=backend.free_memory,
                         array_module=lambda: xp, init_pools=backend.init_pools, free_pools=backend.free_pools,
                         device_scope=backend.device_scope)
    return ComputePolicy.from_config({**default_config(), **config}, reporter, env={}, backend=backend)


@pytest.fixture(scope="module")
def cpu_reference(small_night: Path, tmp_path_factory: pytest.TempPathFactory):
    stacked, ctx = run_mosaic_first(small_night, tmp_path_factory.mktemp("cpu"), None)
    return stacked


def assert_same_mosaic(stacked, reference) -> None:
    assert stacked.frames_used == reference.frames_used
    np.testing.assert_array_equal(stacked.count, reference.count)
    np.testing.assert_allclose(stacked.weight, reference.weight, rtol=1e-6)
    assert np.array_equal(np.isnan(stacked.data), np.isnan(reference.data))
    np.testing.assert_allclose(stacked.data, reference.data, rtol=1e-6, atol=1e-4)


def test_cpu_reference_covers_several_blocks_and_spills(cpu_reference) -> None:
    height, width = cpu_reference.canvas.shape
    assert cpu_reference.spilled and cpu_reference.block_side < max(height, width)
    assert np.isfinite(cpu_reference.data).mean() > 0.5


def test_gpu_path_with_a_standin_device_gives_the_cpu_mosaic(small_night, cpu_reference, tmp_path) -> None:
    reporter = Reporter()
    policy = standin_policy(LimitedNumpy(), reporter)
    stacked, ctx = run_mosaic_first(small_night, tmp_path, policy)
    assert_same_mosaic(stacked, cpu_reference)
    report = policy.to_report()
    assert report["gpu_fallbacks"] == [] and report["gpu"]["oom_retries_by_stage"]["stack"] == 0
    units = report["gpu"]["units_by_stage"]
    n_frames = len(cpu_reference.frames_used)
    assert units["reproject"] == {"gpu": n_frames, "cpu": 0}
    assert units["debayer"] == {"gpu": n_frames, "cpu": 0}
    assert units["stack"]["gpu"] > 1 and units["stack"]["cpu"] == 0
    (p3,) = ctx.extras["mosaic_first_gpu"]
    assert p3["frames"] == n_frames and p3["reader_kind"] == "threads"
    plan = next(e for e in reporter.log_events if e.key == "mf_info_plan")
    assert plan.params["storage"] == "gpu"  # the pieces fit in the (stand-in) GPU budget's share


def test_a_frame_whose_device_check_fails_is_computed_again_by_the_waiting_path(
    small_night, cpu_reference, tmp_path, monkeypatch
) -> None:
    """With the pieces on the device, the device thread queues a frame's results without waiting;
    the run's thread reads them. A check that reads non-zero (on CuPy: a flat colour plane, whose
    hot-pixel noise the host computes) sends the frame through the waiting path again; a device
    error at the wait does too, and is logged. The mosaic is the CPU's."""
    from napari_zemosaic.engine import mosaic_first as module

    queued_calls: list[int] = []
    original_pixels, original_finish = module.frame_pixels, module._finish_queued

    def frame_pixels(host, info, config, n_channels, xp, checks=None, raw_sink=None):  # type: ignore[no-untyped-def]
        if checks is not None:
            queued_calls.append(host.index)
            if host.index == 1:
                checks.append(np.array([2], dtype=np.int32))  # "not final": as the CUDA status says
        return original_pixels(host, info, config, n_channels, xp, checks, raw_sink=raw_sink)

    failed_once: list[int] = []

    def finish(queued):  # type: ignore[no-untyped-def]
        if queued.host.index == 2 and not failed_once:
            failed_once.append(2)
            raise RuntimeError("cudaErrorLaunchFailure: unspecified launch failure")
        return original_finish(queued)

    monkeypatch.setattr(module, "frame_pixels", frame_pixels)
    monkeypatch.setattr(module, "_finish_queued", finish)
    reporter = Reporter()
    policy = standin_policy(LimitedNumpy(), reporter)
    stacked, _ = run_mosaic_first(small_night, tmp_path, policy)
    assert_same_mosaic(stacked, cpu_reference)
    n_frames = len(cpu_reference.frames_used)
    assert sorted(queued_calls) == list(range(n_frames))  # every frame queued once, the redone ones waited
    assert policy.to_report()["gpu"]["units_by_stage"]["reproject"] == {"gpu": n_frames + 2, "cpu": 0}
    (redone,) = [e for e in reporter.log_events if e.key == "mf_debug_frame_redone"]
    assert redone.params["index"] == 2 and "cudaErrorLaunchFailure" in redone.params["reason"]


def test_gpu_path_reads_in_processes_for_large_runs(small_night, cpu_reference, tmp_path, monkeypatch) -> None:
    from napari_zemosaic.engine import mosaic_first as module

    monkeypatch.setattr(module, "PROCESS_READERS_MIN_FRAMES", 1)
    policy = standin_policy(LimitedNumpy(), Reporter())
    stacked, ctx = run_mosaic_first(small_night, tmp_path, policy, num_workers=2)
    assert ctx.extras["mosaic_first_gpu"][0]["reader_kind"] == "processes"
    assert_same_mosaic(stacked, cpu_reference)


def test_process_readers_use_the_frame_wcs_even_when_it_is_not_the_header_one(
    small_night, tmp_path, monkeypatch
) -> None:
    """Readers rebuild a frame's WCS from its header only when it is the same; a solved one travels whole."""
    from napari_zemosaic.engine import mosaic_first as module

    def solve_one(infos: list) -> None:
        solved = infos[2].wcs.deepcopy()
        solved.wcs.crval = solved.wcs.crval + np.array([3e-4, -2e-4])  # ~1 px: as a plate solve would move it
        solved.wcs.set()
        infos[2].wcs = solved

    monkeypatch.setattr(module, "PROCESS_READERS_MIN_FRAMES", 1)
    reference, _ = run_mosaic_first(small_night, tmp_path / "cpu", None, edit=solve_one)
    policy = standin_policy(LimitedNumpy(), Reporter())
    stacked, ctx = run_mosaic_first(small_night, tmp_path / "gpu", policy, edit=solve_one, num_workers=2)
    assert ctx.extras["mosaic_first_gpu"][0]["reader_kind"] == "processes"
    assert_same_mosaic(stacked, reference)
    unedited, _ = run_mosaic_first(small_night, tmp_path / "plain", None)
    assert not np.allclose(np.nan_to_num(unedited.data), np.nan_to_num(reference.data))  # the edit mattered


def test_pieces_that_do_not_fit_on_a_small_device_are_stacked_in_passes_with_the_same_mosaic(
    small_night, cpu_reference, tmp_path, monkeypatch
) -> None:
    """16 MB of "device": the pieces do not fit in its half, but the blocks do, a few at a time.
    The first P3 reads every frame (P2's and the photometry's work too), each next pass only
    the frames that touch its blocks; the mosaic is the CPU's."""
    from napari_zemosaic.engine import mosaic_first as module
    from napari_zemosaic.engine.mosaic_first import MAX_DEVICE_PASSES

    monkeypatch.setattr(module, "DEVICE_STORE_SHARE", 0.5)  # this small night's pieces: 2 to 4 passes
    reporter = Reporter()
    device = LimitedNumpy(limit_bytes=16 * MIB)
    policy = standin_policy(device, reporter, **{gpu.CONFIG_MEMORY_LIMIT_KEY: 16})
    stacked, ctx = run_mosaic_first(small_night, tmp_path, policy)
    assert_same_mosaic(stacked, cpu_reference)
    assert device.refused == 0 and policy.fallbacks == []
    plan = next(e for e in reporter.log_events if e.key == "mf_info_plan")
    (said,) = [e.params for e in reporter.log_events if e.key == "mf_info_device_passes"]
    assert plan.params["storage"] == "gpu" and 2 <= said["passes"] <= MAX_DEVICE_PASSES
    assert said["pieces_mb"] > said["device_mb"]
    p3 = ctx.extras["mosaic_first_gpu"]
    assert len(p3) == said["passes"] and all(entry["storage"] == "gpu" for entry in p3)
    n_frames = len(cpu_reference.frames_used)
    assert p3[0]["frames"] == n_frames and all(0 < entry["frames"] <= n_frames for entry in p3[1:])
    assert policy.to_report()["gpu"]["units_by_stage"]["reproject"]["gpu"] == sum(entry["frames"] for entry in p3)


def test_a_frame_that_cannot_be_read_again_in_a_later_pass_stays_in_the_earlier_blocks(
    small_night, cpu_reference, tmp_path, monkeypatch
) -> None:
    """Its file gone bad between two passes: the frame stays used (its pixels are in the blocks
    stacked before), is not reported as failed, and the log says which pass went without it."""
    from napari_zemosaic.engine import mosaic_first as module
    from napari_zemosaic.engine.frames import FrameError

    monkeypatch.setattr(module, "DEVICE_STORE_SHARE", 0.5)  # this small night's pieces: 2 to 4 passes
    reads: list[int] = []
    original = module.frame_pixels

    def frame_pixels(host, info, config, n_channels, xp, checks=None, raw_sink=None):  # type: ignore[no-untyped-def]
        reads.append(host.index)
        if host.index == 1 and reads.count(1) == 2:
            raise FrameError("frame_excluded_empty_file", "truncated since the first pass")
        return original(host, info, config, n_channels, xp, checks, raw_sink=raw_sink)

    monkeypatch.setattr(module, "frame_pixels", frame_pixels)
    reporter = Reporter()
    policy = standin_policy(LimitedNumpy(limit_bytes=16 * MIB), reporter, **{gpu.CONFIG_MEMORY_LIMIT_KEY: 16})
    stacked, _ = run_mosaic_first(small_night, tmp_path, policy)
    (passes,) = [e.params["passes"] for e in reporter.log_events if e.key == "mf_info_device_passes"]
    assert reads.count(1) == 2  # read in the first pass and once more, where it failed
    assert 1 in stacked.frames_used and stacked.frames_failed == []
    (missing,) = [e.params for e in reporter.log_events if e.key == "mf_warn_frame_missing_from_pass"]
    assert missing["number"] >= 2 and missing["passes"] == passes and missing["path"].endswith(".fit")
    assert any(e.key == "frame_excluded_empty_file" for e in reporter.log_events)
    assert stacked.frames_used == cpu_reference.frames_used
    # Where the frame was stacked (the first pass), the mosaic is the CPU's; elsewhere it lacks it.
    differs = np.abs(np.nan_to_num(stacked.data) - np.nan_to_num(cpu_reference.data)).max(axis=0) > 1e-3
    assert differs.any() and not differs.all()


def test_a_small_gpu_budget_stacks_in_strips_with_the_same_mosaic(
    small_night, cpu_reference, tmp_path, monkeypatch
) -> None:
    from napari_zemosaic.engine import mosaic_first as module

    monkeypatch.setattr(module, "DEVICE_STORE_SHARE", 0.5)  # this small night's pieces do not fit at once
    monkeypatch.setattr(module, "MAX_DEVICE_PASSES", 1)  # no passes: the pieces must go to the host
    reporter = Reporter()
    # 16 MB of "device": a frame's pass fits, the pieces go back to the host, every block is
    # stacked in strips, and no allocation is refused because the plan fits the budget.
    device = LimitedNumpy(limit_bytes=16 * MIB)
    policy = standin_policy(device, reporter, **{gpu.CONFIG_MEMORY_LIMIT_KEY: 16})
    stacked, _ = run_mosaic_first(small_night, tmp_path, policy)
    assert_same_mosaic(stacked, cpu_reference)
    assert device.refused == 0
    assert "gpu_info_oom_retry" not in keys_logged(reporter) and policy.fallbacks == []
    plan = next(e for e in reporter.log_events if e.key == "mf_info_plan")
    assert plan.params["storage"] != "gpu"
    side = cpu_reference.block_side
    whole_block = side * side * gpu.kernel_bytes_per_pixel("stack", channels=3, frames=8)
    assert whole_block > policy.gpu_budget_bytes()  # so the blocks really were cut into strips
    (p5,) = [e for e in reporter.log_events if e.key == "mf_debug_gpu_p5"]
    assert p5.params["strips"] > p5.params["blocks"] > 1


def test_an_oom_in_a_block_stack_is_retried_in_smaller_strips(small_night, cpu_reference, tmp_path) -> None:
    reporter = Reporter()
    # Blocks of 256 px (64 MB host budget); the budget says a whole block fits, but the
    # stand-in device refuses buffers above 4 MB: a frame's buffers pass, block cubes of
    # more than 5 frames do not.
    device = LimitedNumpy(limit_bytes=4 * MIB)
    policy = standin_policy(device, reporter)
    stacked, _ = run_mosaic_first(small_night, tmp_path, policy, max_memory_mb=64)
    assert stacked.block_side > cpu_reference.block_side
    assert_same_mosaic(stacked, cpu_reference)
    assert device.refused > 0
    retries = [e for e in reporter.log_events if e.key == "gpu_info_oom_retry"]
    assert retries and {e.params["stage"] for e in retries} <= {"stack", "reproject", "debayer"}
    assert policy.fallbacks == [] and policy.uses_gpu("stack")
    assert policy.to_report()["gpu"]["chunk_scale_by_stage"]["stack"] < 1.0


def test_a_device_error_moves_the_whole_stage_to_the_cpu_with_the_same_mosaic(
    small_night, cpu_reference, tmp_path
) -> None:
    reporter = Reporter()
    device = LimitedNumpy(fail_after=10)  # works for a few frames, then fails for good
    policy = standin_policy(device, reporter)
    stacked, _ = run_mosaic_first(small_night, tmp_path, policy, gpu_threads=1)  # one device thread: deterministic
    assert_same_mosaic(stacked, cpu_reference)
    fallbacks = policy.to_report()["gpu_fallbacks"]
    assert fallbacks and all(entry["key"] == "gpu_fallback_runtime_error" for entry in fallbacks)
    assert all("cudaErrorIllegalAddress" in entry["params"]["error"] for entry in fallbacks)
    assert keys_logged(reporter).count("gpu_fallback_runtime_error") == len(fallbacks)
    backends = policy.backend_by_stage()
    for entry in fallbacks:
        for stage in entry["stages"]:  # the whole stage went to the CPU, for the rest of the run
            assert backends[stage] in ("cpu", "gpu_then_cpu") and not policy.uses_gpu(stage)
    # Frames reprojected on the device before the failure are kept; the rest ran on the CPU.
    assert backends["reproject"] == "gpu_then_cpu"
    units = policy.to_report()["gpu"]["units_by_stage"]["reproject"]
    assert units["gpu"] > 0 and units["gpu"] + units["cpu"] == len(cpu_reference.frames_used)

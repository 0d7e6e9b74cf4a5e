"""P2's measuring process (``engine.quality_device``): planes written into memory shared with a
process of its own, measured there, metrics sent back.

On the host the shared memory is ``multiprocessing.shared_memory`` and the process measures with
NumPy: the protocol, its errors and its end are checked without a GPU. With ``-m gpu`` the
memory is CUDA IPC memory, and a whole :class:`DeviceMeasurer` is checked against one measuring
in the run's process.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_zemosaic.engine import quality as q
from napari_zemosaic.engine.demo import DemoSpec, generate_demo
from napari_zemosaic.engine.frames import read_frame_info
from napari_zemosaic.engine.quality_device import (
    SEESTAR_WARM_UP,
    MeasuringProcess,
    MeasuringProcessError,
    SharedPlanes,
    plane_view,
)

COMPARED = ("fwhm_px", "elongation", "background", "noise", "star_flux", "trail_length_px", "saturated_fraction")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Three quarter-size demo frames (raw 16-bit CFA planes) of one pointing."""
    truth = generate_demo(tmp_path_factory.mktemp("qdev"), DemoSpec(panels=(1, 1), frames_per_panel=3, scale=0.25, seed=5))
    infos = [read_frame_info(path) for path in truth.frame_paths]
    return infos, [q.load_measurement_data(info) for info in infos]


def _assert_same_metrics(got: list[q.FrameMetrics], expected: list[q.FrameMetrics], rel: float) -> None:
    for a, b in zip(got, expected):
        assert a.path == b.path and a.reason == b.reason
        assert a.n_stars == b.n_stars and a.n_measured == b.n_measured and a.trail_flag == b.trail_flag
        for name in COMPARED:
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=rel, nan_ok=True), name
        assert np.allclose(a.stars.x, b.stars.x, rtol=rel) and np.allclose(a.stars.flux, b.stars.flux, rtol=rel)


def _measured_here(infos, planes) -> list[q.FrameMetrics]:
    metrics = [q.FrameMetrics(path=str(info.path)) for info in infos]
    q.measure_planes(np.stack(planes), 1, q.green_parity(infos[0].bayer_pattern), metrics)
    return metrics


def test_the_process_measures_the_shared_planes_as_this_process_does(frames):
    infos, planes = frames
    parity = q.green_parity(infos[0].bayer_pattern)
    process = MeasuringProcess(0, "numpy", ((64, 96), parity))  # warms up on a small star field
    try:
        process.attach(len(planes) * planes[0].nbytes)
        assert process.shared.capacity(planes[0].shape, planes[0].dtype) == len(planes)
        np.stack(planes, out=process.shared.planes(len(planes), planes[0].shape, planes[0].dtype))
        got = process.measure(len(planes), planes[0].shape, planes[0].dtype, parity, [str(i.path) for i in infos])
        # A second, shorter request over the start of the same buffer.
        np.stack(planes[2:], out=process.shared.planes(1, planes[0].shape, planes[0].dtype))
        last = process.measure(1, planes[0].shape, planes[0].dtype, parity, [str(infos[2].path)])
    finally:
        process.close()
    expected = _measured_here(infos, planes)
    assert all(math.isfinite(m.fwhm_px) and m.n_stars > 10 for m in expected)
    _assert_same_metrics(got, expected, 1e-9)
    _assert_same_metrics(last, expected[2:], 1e-9)


def test_the_process_writes_the_star_files_of_the_frames_it_measured(frames, tmp_path):
    """The resume units' star files of frames measured in the measuring process are written
    there (its GIL, not the run's): the same arrays and SHA-256 as the run would write."""
    import hashlib

    from napari_zemosaic.engine.resume import load_unit_arrays

    infos, planes = frames
    parity = q.green_parity(infos[0].bayer_pattern)
    process = MeasuringProcess(0, "numpy")
    try:
        process.attach(2 * planes[0].nbytes)
        np.stack(planes[:2], out=process.shared.planes(2, planes[0].shape, planes[0].dtype))
        got = process.measure(2, planes[0].shape, planes[0].dtype, parity, [str(i.path) for i in infos[:2]])
        files = [(str(info.path), tmp_path / "units" / f"star_{k}.npz") for k, info in enumerate(infos)]
        digests = process.write_star_files(files)
    finally:
        process.close()
    assert digests[2] is None and not files[2][1].exists()  # the third frame was not measured there
    for metric, (_, star_file), digest in zip(got, files, digests):
        assert digest == hashlib.sha256(star_file.read_bytes()).hexdigest()
        stars = load_unit_arrays(star_file)
        assert metric.stars.x.size > 10
        np.testing.assert_array_equal(stars["x"], metric.stars.x)
        np.testing.assert_array_equal(stars["flux"], metric.stars.flux)


def test_a_failed_request_is_reported_and_the_process_goes_on(frames):
    infos, planes = frames
    parity = q.green_parity(infos[0].bayer_pattern)
    process = MeasuringProcess(0, "numpy")
    try:
        process.attach(planes[0].nbytes)
        with pytest.raises(MeasuringProcessError, match="ValueError"):  # two planes asked of a buffer of one
            process.measure(2, planes[0].shape, planes[0].dtype, parity, ["a", "b"])
        process.shared.planes(1, planes[0].shape, planes[0].dtype)[:] = planes[0]
        got = process.measure(1, planes[0].shape, planes[0].dtype, parity, [str(infos[0].path)])
    finally:
        process.close()
    _assert_same_metrics(got, _measured_here(infos[:1], planes[:1]), 1e-9)


def test_the_end_of_the_process_is_an_error_and_close_frees_the_memory(frames):
    from multiprocessing import shared_memory

    infos, planes = frames
    process = MeasuringProcess(0, "numpy")
    process.attach(planes[0].nbytes)
    name = process.shared.handle[1]
    process._process.kill()
    process._process.join()
    with pytest.raises(MeasuringProcessError, match="ended"):
        process.measure(1, planes[0].shape, planes[0].dtype, 0, [str(infos[0].path)])
    process.close()
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)


def test_a_started_process_that_cannot_open_the_memory_says_why():
    process = MeasuringProcess(0, "numpy")
    assert process._connection.poll(60) and process._receive() == ("started",)
    shared = SharedPlanes(16, np)
    shared.handle = ("host", "zemosaic-no-such-block", 16)  # what the process is told to open
    try:
        with pytest.raises(MeasuringProcessError, match="could not be opened"):
            process._open(shared)
    finally:
        process.close()
    assert shared.array is None


def test_a_process_that_could_not_start_is_reported_at_attach():
    """The process starts on a thread (the forkserver may still be importing): its failure to
    start reaches attach(), whose caller then measures in the run's process."""
    process = MeasuringProcess(0, "numpy", lambda: None)  # a warm-up the forkserver cannot be sent
    try:
        with pytest.raises(MeasuringProcessError, match="did not start"):
            process.attach(16)
    finally:
        process.close()
    assert not process._process.is_alive() and process.shared is None


def test_a_failed_warm_up_is_reported_at_attach():
    process = MeasuringProcess(0, "numpy", ((4, 4), 0))  # too small to place a star: the warm-up fails
    try:
        with pytest.raises(MeasuringProcessError, match="warm-up"):
            process.attach(16)
    finally:
        process.close()


def test_a_process_never_attached_is_ended_without_waiting_for_its_warm_up():
    """A run that fails before P2 (no usable frame) closes a measuring process it never gave a
    buffer: it is terminated, not asked to end once its warm-up is done."""
    import signal

    process = MeasuringProcess(0, "numpy", SEESTAR_WARM_UP)
    process._wait_started(60)
    process.close()
    assert process._process.exitcode == -signal.SIGTERM and process.shared is None


def test_plane_views_and_capacity():
    shared = SharedPlanes(3 * 4 * 6 * 2 + 5, np)
    try:
        view = shared.planes(3, (4, 6), np.uint16)
        assert view.shape == (3, 4, 6) and view.dtype == np.uint16
        view[:] = np.arange(72, dtype=np.uint16).reshape(3, 4, 6)
        assert plane_view(shared.array, 2, (4, 6), "<u2")[1, 0, 0] == 24
        assert shared.capacity((4, 6), np.uint16) == 3 and shared.capacity((4, 6), np.float32) == 1
    finally:
        shared.close()


def _offer_and_measure(measurer, policy, infos, planes, cp, star_dir=None) -> list[q.FrameMetrics]:
    """What P3 and P2 do with a measurer: offer each raw plane from the device, end P3, take the
    metrics, close. The last planes are handed over only after P3's end (fewer than a batch here)."""
    with policy.device():
        for info, plane in zip(infos, planes):
            measurer.offer(info, cp.asarray(plane), cp)
    assert not measurer.wait_handed_over(0.2)
    measurer.finish()
    assert measurer.wait_handed_over(120)
    got = [measurer.measure(info) for info in infos]
    if star_dir is not None:  # as P2's deferred resume units ask, before the measurer is closed
        measurer.star_digests = measurer.write_star_files({k: star_dir / f"{k}.npz" for k in range(len(infos))})
    measurer.close()
    return got


@pytest.mark.gpu
def test_planes_that_come_in_during_a_part_wait_for_a_whole_batch(frames, monkeypatch):
    """The measuring thread takes one batch at a time: planes offered while a part is measured
    make no short part of their own; only the last part may be short."""
    import dataclasses
    import threading

    cp = pytest.importorskip("cupy")
    from napari_zemosaic.engine import gpu, quality_device
    from napari_zemosaic.config import apply_overrides, default_config
    from napari_zemosaic.engine.gpu import ComputePolicy
    from napari_zemosaic.events import Reporter

    infos, planes = frames
    many = [dataclasses.replace(infos[k % len(infos)]) for k in range(7)]  # 7 frames of their own
    config = apply_overrides(default_config(), gpu.config_overrides_for_gpu_mode("on"))
    policy = ComputePolicy.from_config(config, reporter=Reporter(), env={})
    monkeypatch.setattr(quality_device, "MAX_BATCH_FRAMES", 2)
    sizes: list[int] = []
    inside, release = threading.Event(), threading.Event()
    measure_part = quality_device.DeviceMeasurer._measure_part

    def recorded(self, part, parity, xp, stream):
        sizes.append(len(part))
        inside.set()
        release.wait(60)
        return measure_part(self, part, parity, xp, stream)

    monkeypatch.setattr(quality_device.DeviceMeasurer, "_measure_part", recorded)
    measurer = quality_device.DeviceMeasurer(many, policy)
    with policy.device():
        for k in range(2):
            measurer.offer(many[k], cp.asarray(planes[k % len(planes)]), cp)
        assert inside.wait(120)  # the first batch is being measured
        for k in range(2, 5):
            measurer.offer(many[k], cp.asarray(planes[k % len(planes)]), cp)
        release.set()
        for k in range(5, 7):
            measurer.offer(many[k], cp.asarray(planes[k % len(planes)]), cp)
    measurer.finish()
    assert measurer.wait_handed_over(120)
    got = [measurer.measure(info) for info in many]
    measurer.close()
    assert sum(sizes) == 7 and sizes[:-1] == [2] * (len(sizes) - 1), sizes
    assert measurer.timing["frames"] == 7 and all(m.n_stars > 0 for m in got)


@pytest.mark.gpu
def test_the_device_measurer_gives_the_same_metrics_with_or_without_its_process(frames, tmp_path):
    cp = pytest.importorskip("cupy")
    from napari_zemosaic.engine import gpu
    from napari_zemosaic.config import apply_overrides, default_config
    from napari_zemosaic.engine.gpu import ComputePolicy
    from napari_zemosaic.engine.quality_device import SEESTAR_WARM_UP, DeviceMeasurer
    from napari_zemosaic.events import Reporter

    infos, planes = frames
    config = apply_overrides(default_config(), gpu.config_overrides_for_gpu_mode("on"))
    policy = ComputePolicy.from_config(config, reporter=Reporter(), env={})
    measured = {}
    for way in ("early", True, False):  # a process started before, its own process, none
        if way == "early":
            early = MeasuringProcess(policy.device_id, "cupy", SEESTAR_WARM_UP)
            measurer = DeviceMeasurer(infos, policy, process=early)
        else:
            measurer = DeviceMeasurer(infos, policy, separate_process=way)
        star_dir = tmp_path / str(way)
        got = _offer_and_measure(measurer, policy, infos, planes, cp, star_dir)
        measured[way] = (got, measurer.timing["where"], measurer.timing["frames"])
        # A measuring process writes the star files of the frames it measured; without one, none.
        assert sorted(measurer.star_digests) == ([] if way is False else list(range(len(infos))))
        for k, digest in measurer.star_digests.items():
            assert np.array_equal(np.load(star_dir / f"{k}.npz")["x"], got[k].stars.x) and len(digest) == 64
    early.close()  # the run joins the process it started, after its outputs
    assert not early._process.is_alive()
    assert measured["early"][1:] == ("process", len(infos))
    assert measured[True][1:] == ("process", len(infos))
    assert measured[False][1:] == ("run", len(infos))
    _assert_same_metrics(measured[True][0], measured[False][0], 1e-9)
    _assert_same_metrics(measured["early"][0], measured[False][0], 1e-9)
    assert all(math.isfinite(m.fwhm_px) and m.fwhm_arcsec > 0 for m in measured[True][0])

    # No device memory to keep the planes waiting: they are left to the host, which reads the files.
    measurer = DeviceMeasurer(infos, policy)
    measurer._pending_limit = 0
    on_host = _offer_and_measure(measurer, policy, infos, planes, cp)
    assert (measurer.timing["left_to_host"], measurer.timing["frames"]) == (len(infos), 0)
    for got, expected in zip(on_host, measured[False][0]):
        assert got.n_stars == expected.n_stars
        assert got.fwhm_px == pytest.approx(expected.fwhm_px, rel=1e-4)

"""P2's per-frame work moved off the run's critical path, with the same numbers and the same resume units.

``measure_frames`` computes each frame's pixel scale and star sky vectors once (``_FrameGeometry``,
while the pool measures the other frames); the workers that measure a frame write its ``metrics``
unit's star file; ``judge_frames`` computes each frame's unit signature once. These tests hold those
paths to the plain computations, to the bit, and check that their units are reused by the next run.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from napari_zemosaic import __version__
from napari_zemosaic.engine import pipeline
from napari_zemosaic.engine import quality as q
from napari_zemosaic.engine import resume
from napari_zemosaic.engine.demo import DemoSpec, generate_demo
from napari_zemosaic.engine.frames import read_frame_info
from napari_zemosaic.engine.resume import UnitManifest, _plain_json, file_sha256, load_unit_arrays
from napari_zemosaic.events import Reporter

NIGHT = DemoSpec(panels=(1, 2), frames_per_panel=4, scale=0.25, seed=7)
CONFIG = {"num_workers": 2}


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Eight demo subs on two pointings, then an all-NaN sub and one cut after its header was read."""
    root = tmp_path_factory.mktemp("quality_units_night")
    truth = generate_demo(root, NIGHT)
    infos = [read_frame_info(path) for path in truth.frame_paths]
    header = fits.getheader(truth.frame_paths[0])
    header.remove("BAYERPAT")
    fits.writeto(root / "nan.fits", np.full((truth.height, truth.width), np.nan, np.float32), header)
    cut = root / "cut.fits"
    cut.write_bytes(truth.frame_paths[1].read_bytes())
    infos += [read_frame_info(root / "nan.fits"), read_frame_info(cut)]
    cut.write_bytes(truth.frame_paths[1].read_bytes()[: 2880 * 3])
    return infos


@pytest.fixture
def in_processes(monkeypatch):
    """Measure in the worker-process pool whatever the host's cores (as on a many-core machine)."""
    monkeypatch.setattr(q, "PROCESS_MEASURE_MIN_FRAMES", 2)
    monkeypatch.setattr(q.os, "cpu_count", lambda: 4)


def _bits(values):
    return [float(v).hex() for v in values]


def _plain_transparency(metrics, infos):
    """The transparency as computed without any memo: every scale and star vector from scratch."""
    copies = copy.deepcopy(list(metrics))
    for item in copies:
        item.transparency, item.transparency_method, item.group = float("nan"), "", -1
    q.assign_transparency(copies, infos)
    return copies


def _judge(infos, cache):
    manifest = UnitManifest(cache, __version__, config={})
    metrics, decisions = pipeline.drain(pipeline.judge_frames(infos, CONFIG, Reporter(), None, manifest))
    manifest.flush()
    return manifest, metrics, decisions


def _check_units(manifest, infos, metrics):
    """The records the serial code made: one per readable frame, its own signature, its scalars, its stars."""
    unit_frames = [i for i, m in enumerate(metrics) if m.reason not in q.UNRECORDED_REASONS]
    assert len(unit_frames) == len(infos) - 2  # the all-NaN and the cut frames are not units
    files = set()
    for index in unit_frames:
        info, metric = infos[index], metrics[index]
        signature = manifest.signature("metrics", {"frame": manifest.frame_digest(info)})
        record = manifest.lookup_record("metrics", str(info.path), signature)
        assert record is not None, index  # found, with this very signature, and intact
        values = {f.name: getattr(metric, f.name) for f in dataclasses.fields(metric) if f.name != "stars"}
        assert record.meta == _plain_json(values)
        stars = load_unit_arrays(record.path)
        for name in ("x", "y", "flux"):
            assert stars[name].dtype == np.float64
            assert stars[name].tobytes() == getattr(metric.stars, name).tobytes()
        entry = manifest._units["metrics"][str(info.path)]
        assert entry["files"][0]["sha256"] == file_sha256(record.path)
        assert entry["files"][0]["size"] == record.path.stat().st_size
        files.add(record.path.name)
    for index in set(range(len(infos))) - set(unit_frames):
        assert str(infos[index].path) not in manifest._units.get("metrics", {})
    folder = manifest.cache_dir / "units" / "metrics"
    assert {path.name for path in folder.iterdir()} == files  # no star file for the unreadable frames


# ----------------------------------------------------------------------------- geometry memo


def test_frame_geometry_numbers_are_those_of_the_direct_calls(night):
    infos = night[:8]
    geometry = q._FrameGeometry(infos)
    for index, info in enumerate(infos):
        assert geometry.scale(index) is not None
        assert float(geometry.scale(index)).hex() == float(q._pixel_scale(info)).hex()
        stars = q.measure_one(info).stars
        vectors = geometry.vectors(index, stars)
        assert vectors.tobytes() == q._star_vectors(info, stars).tobytes()
        assert geometry.vectors(index, stars) is vectors  # memoised for these stars
        others = q.StarList(stars.x[:5].copy(), stars.y[:5].copy(), stars.flux[:5].copy())
        assert geometry.vectors(index, others).tobytes() == q._star_vectors(info, others).tobytes()
    without_wcs = dataclasses.replace(infos[0], wcs=None, header_scale_arcsec=None)
    blank = q._FrameGeometry([without_wcs])
    blank.prepare(0, q.StarList.empty())
    assert blank.scale(0) is None and blank.vectors(0, q.StarList.empty()) is None


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_measured_transparency_equals_the_plain_computation_to_the_bit(night, pool, request):
    if pool == "processes":
        request.getfixturevalue("in_processes")
    # The good frames match their stars on the sky; with the bad frames, the all-NaN frame's
    # pointing group falls back to flux levels.
    for frames, methods in ((night[:8], {"matched"}), (night, {"matched", "flux_level"})):
        metrics = pipeline.drain(q.measure_frames(frames, CONFIG, Reporter()))
        plain = _plain_transparency(metrics, frames)
        assert {m.transparency_method for m in metrics if m.transparency_method} == methods
        assert _bits(m.transparency for m in metrics) == _bits(m.transparency for m in plain)
        assert [(m.group, m.transparency_method) for m in metrics] == [(m.group, m.transparency_method) for m in plain]


# ----------------------------------------------------------------------------- resume units


def test_units_written_by_worker_processes_are_the_serial_records_and_are_reused(
    night, tmp_path, in_processes, monkeypatch
):
    def not_here(*args, **kwargs):
        raise AssertionError("the star files are written by the measuring processes")

    monkeypatch.setattr(resume, "save_unit_arrays", not_here)  # this process only
    manifest, metrics, decisions = _judge(night, tmp_path / "cache")
    assert manifest.counts()["metrics"]["computed"] == len(night) - 2
    _check_units(manifest, night, metrics)

    # The next run reads every unit back: nothing measured, the same numbers to the bit.
    second, again, again_decisions = _judge(night, tmp_path / "cache")
    assert second.counts()["metrics"] == {**second.counts()["metrics"], "reused": len(night) - 2, "computed": 0}
    assert [m.to_dict() for m in again] == [m.to_dict() for m in metrics]
    assert _bits(m.transparency for m in again) == _bits(m.transparency for m in metrics)
    assert [d.to_dict() for d in again_decisions] == [d.to_dict() for d in decisions]
    for ours, theirs in zip(again, metrics):
        assert ours.stars.flux.tobytes() == theirs.stars.flux.tobytes()


def test_thread_path_and_failed_worker_writes_give_the_same_units(night, tmp_path, monkeypatch):
    """A star file a worker could not write is written by the run's process, under the same name."""
    monkeypatch.setattr(q, "_write_star_file", lambda path, metrics: None)
    manifest, metrics, _ = _judge(night, tmp_path / "cache")
    _check_units(manifest, night, metrics)


def test_deferred_units_are_the_serial_records_written_on_a_thread(night, tmp_path):
    """With a measure of the caller's (P2 on the device) the units are recorded on a thread once the
    metrics are known: nothing is written while the frames are measured, the same records after."""
    manifest = UnitManifest(tmp_path / "cache", __version__, config={})
    folder = manifest.cache_dir / "units" / "metrics"

    def measure(info):
        assert not folder.exists() or not any(folder.iterdir())  # nothing written while measuring
        return q.measure_one(info)

    metrics, _ = pipeline.drain(pipeline.judge_frames(night, CONFIG, Reporter(), None, manifest, measure, defer_units=True))
    manifest.wait_deferred()
    manifest.flush()
    assert manifest.counts()["metrics"]["computed"] == len(night) - 2
    _check_units(manifest, night, metrics)


def test_each_frame_signature_is_computed_once(night, tmp_path, monkeypatch):
    calls: list[str] = []
    original = UnitManifest.signature

    def counted(self, kind, inputs, extra_keys=()):
        calls.append(kind)
        return original(self, kind, inputs, extra_keys)

    monkeypatch.setattr(UnitManifest, "signature", counted)
    _judge(night, tmp_path / "cache")  # a first run: nothing to look up, a signature per unit recorded
    assert calls.count("metrics") == len(night) - 2
    calls.clear()
    _judge(night, tmp_path / "cache")  # a resumed run: a lookup per frame, nothing recorded
    assert calls.count("metrics") == len(night)


def test_an_outdated_record_is_dropped_before_its_star_file_is_rewritten(night, tmp_path):
    first, metrics, _ = _judge(night, tmp_path / "cache")
    key = str(night[2].path)
    record = first.lookup_record("metrics", key, first.signature("metrics", {"frame": first.frame_digest(night[2])}))
    first.record("metrics", key, "an older signature", record.path, meta=record.meta)
    first.flush()

    manifest = UnitManifest(tmp_path / "cache", __version__, config={})
    units = pipeline._MetricsUnits(manifest, night)
    assert units.load(2) is None
    # Gone from the manifest at once: a run killed while the worker rewrites the star file leaves
    # no record that points at it with the old digest.
    assert manifest.lookup_record("metrics", key, "an older signature") is None
    assert units.load(3) is not None

    rerun, again, _ = _judge(night, tmp_path / "cache")
    counts = rerun.counts()["metrics"]
    assert (counts["reused"], counts["computed"], counts["invalidated"]) == (len(night) - 3, 1, 1)
    _check_units(rerun, night, again)
    assert _bits(m.transparency for m in again) == _bits(m.transparency for m in metrics)


def test_frames_sharing_an_input_path_share_one_intact_unit(night, tmp_path, in_processes):
    frames = night[:4] + [night[0]]  # the same input file twice: one unit key, one star file
    first, metrics, _ = _judge(frames, tmp_path / "cache")
    assert first.counts()["metrics"]["computed"] == 4
    rerun, again, _ = _judge(frames, tmp_path / "cache")
    counts = rerun.counts()["metrics"]
    assert (counts["reused"], counts["computed"], counts["corrupt"]) == (4, 0, 0)  # the file is the one recorded
    assert _bits(m.transparency for m in again) == _bits(m.transparency for m in metrics)


def test_pixel_scale_of_a_plain_celestial_wcs_equals_that_of_its_celestial_copy(night):
    """``_pixel_scale`` skips astropy's ``celestial`` copy for a WCS of (longitude, latitude) alone:
    the same number to the bit, for the demo's SIP WCS, a rotated CD matrix, PC + CDELT, and a
    WCS with latitude first (which does take the copy)."""
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    def reference(wcs) -> float:
        scales = proj_plane_pixel_scales(wcs.celestial)
        return float(np.sqrt(scales[0] * scales[1]) * 3600.0)

    rotated = WCS(naxis=2)
    rotated.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    rotated.wcs.cd = np.array([[-1.1e-3, 3.7e-4], [2.9e-4, 1.05e-3]])
    rotated.wcs.crval = [83.8, -5.4]
    pc = WCS(naxis=2)
    pc.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    pc.wcs.cdelt = [-7.7e-4, 7.7e-4]
    pc.wcs.pc = np.array([[0.96, -0.28], [0.28, 0.96]])
    swapped = WCS(naxis=2)
    swapped.wcs.ctype = ["DEC--TAN", "RA---TAN"]
    swapped.wcs.cdelt = [6.1e-4, -7.3e-4]
    for wcs in (night[0].wcs, rotated, pc, swapped):
        wcs.wcs.set()
        info = dataclasses.replace(night[0], wcs=wcs)
        assert float(q._pixel_scale(info)).hex() == float(reference(wcs)).hex()
    assert (swapped.wcs.lng, swapped.wcs.lat) == (1, 0)


def test_measurement_data_read_from_the_file_equals_astropy_read_and_scaling(night, tmp_path):
    """load_measurement_data reads exact integer pixels from where they lie in the file
    (frames.raw_pixel_plan): the same values and dtype as astropy's read + _scaled_pixels, for the
    demo's BZERO 32768 subs; a float32 sub still goes through astropy."""
    from napari_zemosaic.engine.frames import _read_raw_image, _scaled_pixels, raw_pixel_plan

    for info in night[:3]:
        assert raw_pixel_plan(info) is not None
        raw, header = _read_raw_image(info)
        want, _ = _scaled_pixels(raw, header)
        got = q.load_measurement_data(info)
        assert got.dtype == want.dtype and np.array_equal(got, want.reshape(info.shape))
    header = fits.getheader(night[0].path)
    data = fits.getdata(night[0].path).astype(np.float32)
    fits.writeto(tmp_path / "float.fits", data, header)
    info = read_frame_info(tmp_path / "float.fits")
    assert raw_pixel_plan(info) is None
    assert np.array_equal(q.load_measurement_data(info), data)


def test_the_metrics_signature_follows_the_frame_and_takes_a_readers_token(night, tmp_path):
    """A frame's signature is the same from its own canonical form and from the token a P3 reader
    process computed; another WCS or another file gives another signature."""
    from napari_zemosaic.engine.frames import stamped_identity
    from napari_zemosaic.engine.resume import frame_token

    manifest = UnitManifest(tmp_path / "cache", __version__, config={})
    info = night[2]
    plain = pipeline._metrics_signature(manifest, info)
    identity = stamped_identity(info.path)
    tokened = dataclasses.replace(info, file_identity=identity)
    tokened.resume_token = frame_token(tokened)
    assert tokened.resume_token is not None
    assert pipeline._metrics_signature(manifest, tokened) == plain
    moved = info.wcs.deepcopy()
    moved.wcs.crval = [moved.wcs.crval[0] + 1e-6, moved.wcs.crval[1]]
    assert pipeline._metrics_signature(manifest, dataclasses.replace(info, wcs=moved)) != plain
    assert pipeline._metrics_signature(manifest, night[3]) != plain
    # The reader's token is taken as it is while the file keeps that identity (nothing recomputed).
    trusted = dataclasses.replace(info, file_identity=identity)
    trusted.resume_token = (tokened.resume_token[0], "0" * 64)
    assert pipeline._metrics_signature(manifest, trusted) != plain
    # A token computed for another state of the file (its identity then) is not taken: the frame
    # is canonicalised again here, and its digest is the plain one.
    stamp, then = identity
    older = dataclasses.replace(info, file_identity=((stamp[0], stamp[1] - 1, stamp[2]), {**then, "mtime_ns": stamp[1] - 1}))
    older.resume_token = ({**tokened.resume_token[0], "mtime_ns": stamp[1] - 1}, "0" * 64)
    assert pipeline._metrics_signature(UnitManifest(tmp_path / "other", __version__, config={}), older) == plain

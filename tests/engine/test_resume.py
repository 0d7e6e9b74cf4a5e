"""Resume machinery: the output-folder lock, the work-unit manifest, atomic writes, the free-space guard.

Processes are real (a second run is a second Python process; a crashed run is one killed with
SIGKILL); a full disk is a 1 MiB tmpfs where the test may mount one, a file-size limit
(``RLIMIT_FSIZE``, which makes writes fail like a full disk) in a child process, or an injected
``disk_usage`` for the free-space arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import mounted_tmpfs
from astropy.io import fits

from napari_zemosaic.config import validate_config
from napari_zemosaic.engine.context import UserError
from napari_zemosaic.engine.resume import (
    LOCK_NAME,
    MANIFEST_NAME,
    UNIT_CONFIG_KEYS,
    InsufficientSpaceError,
    LockOwner,
    RunLock,
    UnitManifest,
    ensure_free_space,
    file_identity,
    stamped_file_identity,
    write_file_atomic,
)
from napari_zemosaic.events import Reporter
from napari_zemosaic.i18n import load_catalog, tr

EN = load_catalog("en")
POSIX = os.name == "posix"


def run_python(code: str, *args: str, **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def keys_of(reporter: Reporter) -> list[str]:
    return [event.key for event in reporter.log_events]


# ============================================================================ run lock

HOLD_LOCK = """
    import sys, time
    from napari_zemosaic.engine.resume import RunLock
    with RunLock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()  # hold until the parent closes our stdin (or kills us)
"""


def test_second_run_into_the_same_output_is_refused(tmp_path: Path) -> None:
    holder = run_python(HOLD_LOCK, str(tmp_path), stdin=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as caught:
            RunLock(tmp_path).acquire()
        error = caught.value
        assert error.key == "run_error_output_locked"
        assert error.params["pid"] == holder.pid and error.params["host"] == socket.gethostname()
        for language in ("en", "fr"):
            message = tr(error.key, language, **error.params)
            assert str(holder.pid) in message and str(tmp_path) in message and "{" not in message
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder leaves its with-block: the lock is released
        assert holder.wait(timeout=30) == 0
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path) as lock:  # free again
        assert lock.held and lock.takeover is None


def test_two_runs_in_one_process_are_refused_too(tmp_path: Path) -> None:
    """napari can start two jobs into the same folder from one process."""
    with RunLock(tmp_path):
        with pytest.raises(UserError) as caught:
            RunLock(tmp_path).acquire()
        assert caught.value.params["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.skipif(not POSIX, reason="SIGKILL")
def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    holder = run_python(HOLD_LOCK, str(tmp_path), stdin=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
    holder.wait(timeout=30)
    dead = LockOwner.from_json((tmp_path / LOCK_NAME).read_bytes())
    assert dead.pid == holder.pid

    reporter = Reporter()
    with RunLock(tmp_path) as lock:
        lock.emit_warnings(reporter)
        mine = LockOwner.from_json((tmp_path / LOCK_NAME).read_bytes())
        assert mine.pid == os.getpid() and mine.token == lock.owner.token  # type: ignore[union-attr]
    warning = reporter.log_events[0]
    assert warning.key == "resume_warn_stale_lock" and warning.level == "warning"
    assert warning.params["pid"] == holder.pid and "gone" in warning.params["detail"]
    assert "{" not in tr(warning.key, "fr", **warning.params)


def _write_lock(folder: Path, **changes: Any) -> None:
    now = time.time()
    owner = LockOwner(pid=os.getpid(), host=socket.gethostname(), started=now, updated=now, token="x" * 32)
    (folder / LOCK_NAME).write_bytes(LockOwner(**{**owner.__dict__, **changes}).to_json())


def test_lock_of_another_host_is_stale_only_after_hours(tmp_path: Path) -> None:
    """On a shared network folder the owner's PID cannot be checked: its heartbeat age decides."""
    _write_lock(tmp_path, host="observatory-pc", pid=4242, updated=time.time() - 60)
    with pytest.raises(UserError) as caught:
        RunLock(tmp_path, stale_after_hours=12).acquire()
    assert caught.value.params["host"] == "observatory-pc"

    _write_lock(tmp_path, host="observatory-pc", pid=4242, updated=time.time() - 13 * 3600)
    with RunLock(tmp_path, stale_after_hours=12) as lock:
        assert lock.takeover is not None and lock.takeover["host"] == "observatory-pc"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc process start times")
def test_reused_pid_does_not_keep_a_lock_alive(tmp_path: Path) -> None:
    """The PID in the lock is alive but belongs to another program (started at another time)."""
    _write_lock(tmp_path, pid=os.getpid(), pid_start="1")  # this process did not start at tick 1
    with RunLock(tmp_path) as lock:
        assert lock.takeover is not None and "reused" in lock.takeover["detail"]


def test_unreadable_lock_is_respected_briefly_then_taken_over(tmp_path: Path) -> None:
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_bytes(b"\x00garbage")
    with pytest.raises(UserError):  # may be another tool writing it right now
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(lock_file, (old, old))
    with RunLock(tmp_path) as lock:
        assert lock.takeover is not None and lock.takeover["pid"] == "?"


def test_release_never_removes_a_successors_lock(tmp_path: Path) -> None:
    lock = RunLock(tmp_path).acquire()
    _write_lock(tmp_path, token="y" * 32)  # a successor took over (we were declared stale)
    with pytest.raises(UserError):
        lock.refresh()  # the heartbeat notices
    lock.release()
    assert LockOwner.from_json((tmp_path / LOCK_NAME).read_bytes()).token == "y" * 32


RACE = """
    import sys, time
    from napari_zemosaic.engine.context import UserError
    from napari_zemosaic.engine.resume import RunLock
    start = float(sys.argv[2])
    while time.time() < start:
        pass
    try:
        lock = RunLock(sys.argv[1]).acquire()
    except UserError:
        print("refused", flush=True)
    else:
        print("won", flush=True)
        time.sleep(1.0)
        lock.release()
"""


def test_runs_racing_for_a_free_folder_one_wins(tmp_path: Path) -> None:
    start = time.time() + 2.0  # all processes spin until the same instant
    racers = [run_python(RACE, str(tmp_path), repr(start)) for _ in range(6)]
    outcomes = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
    assert outcomes == ["refused"] * 5 + ["won"]


# ============================================================================ manifest


@pytest.fixture()
def frame_file(tmp_path: Path) -> Path:
    path = tmp_path / "inputs" / "light_0001.fits"
    path.parent.mkdir()
    header = fits.Header()
    header["EXPTIME"] = 10.0
    header["BAYERPAT"] = "GRBG"
    fits.PrimaryHDU(np.arange(64, dtype=np.uint16).reshape(8, 8), header=header).writeto(path)
    return path


def _other_value(key: str, value: Any) -> Any:
    """A different valid value for config ``key``."""
    from napari_zemosaic.config import OPTIONS

    option = OPTIONS.get(key)
    if option is None:  # solver keys live outside OPTIONS
        return (value or 0) + 1 if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{value}-changed"
    if option.kind == "bool":
        return not value
    if option.kind == "choice":
        return next((choice for choice in option.choices if choice != value), f"{value}-other")
    if option.kind == "int":
        return value + 1
    if option.kind == "float":
        return value * 1.5 if value else 0.5
    return f"{value}x"


def test_signature_changes_exactly_with_declared_keys(frame_file: Path, tmp_path: Path) -> None:
    config = validate_config({})
    base = UnitManifest(tmp_path / "cache", "1.0", config=config)
    inputs = {"frames": [frame_file], "block": [2, 3], "canvas": {"shape": [100, 200]}}
    reference = {kind: base.signature(kind, inputs) for kind in UNIT_CONFIG_KEYS}
    all_keys = set(config) | {key for keys in UNIT_CONFIG_KEYS.values() for key in keys}
    for key in sorted(all_keys):
        changed = dict(config)
        changed[key] = _other_value(key, config.get(key))
        manifest = UnitManifest(tmp_path / "cache", "1.0", config=changed)
        for kind, keys in UNIT_CONFIG_KEYS.items():
            differs = manifest.signature(kind, inputs) != reference[kind]
            assert differs == (key in keys), (kind, key)
    # The example: a stacking parameter invalidates blocks, never reprojected frames.
    assert "stacking_kappa_high" in UNIT_CONFIG_KEYS["block"] and "stacking_kappa_high" not in UNIT_CONFIG_KEYS["reproject"]
    assert UnitManifest(tmp_path / "cache", "1.1", config=config).signature("block", inputs) != reference["block"]


def test_signature_follows_the_frame_wcs_exactly(frame_file: Path, tmp_path: Path) -> None:
    """A frame's WCS enters the signature by its exact numbers (a plate solution moved by 1e-12
    degree is another input), its projection and its SIP terms; equal WCSs give equal signatures."""
    import dataclasses
    import pickle

    from astropy.wcs import WCS, Sip

    from napari_zemosaic.engine.frames import read_frame_info

    manifest = UnitManifest(tmp_path / "cache", "1.0", config=validate_config({}))
    info = read_frame_info(frame_file)

    def solved(ra: float = 83.8, ctype: str = "TAN", sip: bool = False) -> WCS:
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = [f"RA---{ctype}", f"DEC--{ctype}"] if not sip else ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.wcs.crval, wcs.wcs.crpix = [ra, -5.4], [4.5, 4.5]
        wcs.wcs.cd = [[-1e-3, 0.0], [0.0, 1e-3]]
        if sip:
            a = np.zeros((3, 3))
            a[2, 0] = 1e-7
            wcs.sip = Sip(a, np.zeros((3, 3)), None, None, wcs.wcs.crpix)
        wcs.wcs.set()
        return wcs

    def signature(wcs: WCS) -> str:
        return manifest.signature("reproject", {"frame": dataclasses.replace(info, wcs=wcs)})

    reference = signature(solved())
    assert signature(solved()) == reference and signature(pickle.loads(pickle.dumps(solved()))) == reference
    assert signature(solved(ra=83.8 + 1e-12)) != reference
    assert signature(solved(ctype="SIN")) != reference
    assert signature(solved(sip=True)) != reference
    assert manifest.signature("reproject", {"frame": dataclasses.replace(info, wcs=None)}) != reference


def test_signature_follows_input_identity(frame_file: Path, tmp_path: Path) -> None:
    manifest = UnitManifest(tmp_path / "cache", "1.0", config=validate_config({}))

    def signature() -> str:
        # A fresh manifest each time: nothing memoised from the previous look.
        return UnitManifest(tmp_path / "cache", "1.0", config=validate_config({})).signature("reproject", {"frame": frame_file})

    first = signature()
    assert signature() == first
    assert manifest.signature("reproject", {"frame": frame_file}) == first
    assert manifest.signature("reproject", {"frame": str(frame_file)}) != first  # a string is not a file

    stat = frame_file.stat()
    os.utime(frame_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched
    touched = signature()
    assert touched != first

    raw = bytearray(frame_file.read_bytes())  # edit a header value, same size, mtime restored
    position = raw.index(b"EXPTIME =")
    raw[position : position + 80] = b"EXPTIME =                 20.0".ljust(80)
    frame_file.write_bytes(bytes(raw))
    os.utime(frame_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert frame_file.stat().st_size == stat.st_size
    assert signature() != touched  # the header hash saw it

    assert file_identity(frame_file)["size"] == stat.st_size
    # Order of dict keys does not matter; values do.
    assert manifest.signature("block", {"a": 1, "b": [1.0, 2.0]}) == manifest.signature("block", {"b": [1.0, 2.0], "a": 1})
    assert manifest.signature("block", {"gains": np.array([1.0, 2.0])}) != manifest.signature("block", {"gains": np.array([1.0, 2.0 + 1e-12])})
    with pytest.raises(KeyError):
        manifest.signature("no_such_kind", {})


def test_a_readers_identity_is_taken_while_the_file_keeps_its_stamp(frame_file: Path, tmp_path: Path) -> None:
    from napari_zemosaic.engine.frames import read_frame_info

    def digest(info: Any) -> str:  # a fresh manifest: nothing memoised
        return UnitManifest(tmp_path / "cache", "1.0", config=validate_config({})).digest(info)

    stamp, identity = stamped_file_identity(frame_file)
    assert identity == file_identity(frame_file)
    info = read_frame_info(frame_file)
    assert info.file_identity is None  # only P3's reader processes compute it
    plain = digest(info)
    info.file_identity = (stamp, identity)
    assert digest(info) == plain  # the same identity, without reading the header again
    # A forged hash shows which one the signature took: the known one, while the stamp holds ...
    info.file_identity = (stamp, {**identity, "header_sha256": "0" * 64})
    assert digest(info) != plain
    stat = frame_file.stat()
    os.utime(frame_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    # ... and the file's own once it is touched (a new stamp).
    touched = digest(dataclasses.replace(info, file_identity=None))
    assert digest(info) == touched != plain


def _unit_file(cache: Path, name: str, payload: bytes) -> Path:
    path = cache / "units" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, payload)
    return path


def test_units_are_reused_invalidated_and_counted(tmp_path: Path, frame_file: Path) -> None:
    cache = tmp_path / "cache"
    config = validate_config({})
    first = UnitManifest(cache, "1.0", config=config)
    signatures = {}
    for index in range(3):
        signatures[index] = first.signature("megatile", {"frames": [frame_file], "batch": index})
        path = _unit_file(cache, f"megatile_{index}.f32", bytes([index]) * 1000)
        first.record("megatile", index, signatures[index], path, meta={"bbox": [0, 10, 0, 20], "noise": np.float32(0.5)})
    first.close(success=False)  # an interrupted run: the cache stays
    assert first.counts() == {"megatile": {"reused": 0, "computed": 3, "invalidated": 0, "corrupt": 0, "forced": 0}}

    reporter = Reporter()
    second = UnitManifest(cache, "1.0", config=config, reporter=reporter)
    record = second.lookup_record("megatile", 0, signatures[0])
    assert record is not None and record.path.read_bytes() == bytes([0]) * 1000
    assert record.meta == {"bbox": [0, 10, 0, 20], "noise": 0.5}
    assert second.lookup("megatile", 1, "another signature") is None  # its inputs changed
    assert second.lookup("megatile", 7, signatures[0]) is None  # never recorded
    second.record("megatile", 1, "another signature", _unit_file(cache, "megatile_1.f32", b"new" * 10))
    second.log_summary("megatile")
    assert second.counts()["megatile"] == {"reused": 1, "computed": 1, "invalidated": 1, "corrupt": 0, "forced": 0}
    assert keys_of(reporter) == ["resume_info_found", "resume_info_reused", "resume_info_recomputed"]
    report = second.report()
    assert report["mode"] == "auto" and report["previous_units"] == 3
    json.dumps(report, allow_nan=False)


def test_resume_off_and_force(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = UnitManifest(cache, "1.0", config=validate_config({}))
    first.record("block", "0_0", "old-signature", _unit_file(cache, "block.f32", b"x" * 64))
    first.flush()

    off = UnitManifest(cache, "1.0", config=validate_config({"resume": "off"}), reporter=Reporter())
    assert off.lookup("block", "0_0", "old-signature") is None
    off.emit_pending()
    assert keys_of(off.reporter) == ["resume_info_off"]

    reporter = Reporter()
    force = UnitManifest(cache, "2.0", config=validate_config({"resume": "force"}), reporter=reporter)
    assert force.lookup("block", "0_0", "new-signature") == cache / "units" / "block.f32"
    force.log_summary("block")
    assert force.counts()["block"]["forced"] == 1
    assert "resume_warn_forced" in keys_of(reporter)
    # force never waives integrity
    (cache / "units" / "block.f32").write_bytes(b"y" * 64)
    again = UnitManifest(cache, "2.0", config=validate_config({"resume": "force"}))
    assert again.lookup("block", "0_0", "new-signature") is None


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_corrupt_units_are_detected_and_recomputed(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    payload = np.random.default_rng(1).random(5000).astype(np.float32).tobytes()
    path = _unit_file(cache, "megatile_0003.f32", payload)
    first = UnitManifest(cache, "1.0", config=validate_config({}))
    first.record("megatile", 3, "sig", path)
    first.flush()
    if damage == "flip_byte":
        broken = bytearray(payload)
        broken[12345] ^= 0x01  # one bit, same size: only the hash can tell
        path.write_bytes(bytes(broken))
    elif damage == "truncate":
        path.write_bytes(payload[:-4])
    else:
        path.unlink()

    reporter = Reporter()
    second = UnitManifest(cache, "1.0", config=validate_config({}), reporter=reporter)
    assert second.lookup("megatile", 3, "sig") is None
    second.log_summary("megatile")
    assert second.counts()["megatile"]["corrupt"] == 1
    warning = next(event for event in reporter.log_events if event.key == "resume_warn_corrupt_unit")
    assert warning.level == "warning" and warning.params["kind"] == "megatile" and str(path) in warning.params["path"]
    second.flush()  # the damaged record is dropped from the manifest
    assert UnitManifest(cache, "1.0", config=validate_config({})).lookup("megatile", 3, "sig") is None


def test_records_from_many_threads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    manifest = UnitManifest(cache, "1.0", config=validate_config({}), flush_interval_s=0.0)

    def worker(thread: int) -> None:
        for index in range(25):
            key = f"{thread}_{index}"
            path = _unit_file(cache, f"r_{key}.bin", key.encode() * 20)
            manifest.record("reproject", key, f"sig-{key}", path)
            assert manifest.lookup("reproject", key, f"sig-{key}") == path

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    manifest.flush()
    reloaded = UnitManifest(cache, "1.0", config=validate_config({}))
    assert reloaded.previous_units == 200
    assert all(reloaded.lookup("reproject", f"{t}_{i}", f"sig-{t}_{i}") for t in range(8) for i in range(25))


WRITER = """
    import sys
    from pathlib import Path
    from napari_zemosaic.engine.resume import UnitManifest, write_file_atomic
    cache = Path(sys.argv[1])
    manifest = UnitManifest(cache, "1.0", config={"resume": "auto"}, flush_interval_s=0.0)
    index = 0
    while True:  # killed from outside at a random moment
        path = cache / "units" / f"u{index % 50}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, str(index).encode() * 2000)
        manifest.record("block", index % 50, f"sig{index}", path, meta={"pad": "x" * 2000})
        index += 1
        if index == 20:
            print("running", flush=True)
"""


@pytest.mark.skipif(not POSIX, reason="SIGKILL")
def test_manifest_survives_sigkill_at_any_moment(tmp_path: Path) -> None:
    """A writer rewriting a ~150 kB manifest in a loop is killed at random times; every time the
    manifest on disk loads, and every unit it lists is intact (reused by a rerun)."""
    rng = np.random.default_rng(7)
    cache = tmp_path / "cache"
    for attempt in range(6):
        writer = run_python(WRITER, str(cache))
        assert writer.stdout is not None and writer.stdout.readline().strip() == "running"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        reporter = Reporter()
        manifest = UnitManifest(cache, "1.0", config={"resume": "auto"}, reporter=reporter)
        manifest.emit_pending()
        assert "resume_warn_manifest_unreadable" not in keys_of(reporter), attempt
        assert manifest.previous_units > 0
        document = json.loads((cache / MANIFEST_NAME).read_text())
        for key, entry in document["units"]["block"].items():
            # a unit file may have been rewritten after its record: then it is corrupt, never reused
            reused = manifest.lookup("block", key, entry["signature"])
            if reused is not None:
                assert reused.read_bytes().decode()[:1].isdigit()


RLIMITED_WRITER = """
    import resource, signal, sys
    from pathlib import Path
    from napari_zemosaic.engine.resume import InsufficientSpaceError, UnitManifest
    cache = Path(sys.argv[1])
    manifest = UnitManifest(cache, "1.0", config={"resume": "auto"}, flush_interval_s=3600)
    unit = cache / "unit.bin"
    manifest.record("block", "first", "sig", unit)
    manifest.flush()
    size = (cache / "manifest.json").stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write then fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 4096, size + 4096))
    for index in range(200):
        manifest.record("block", f"k{index}", "sig", unit, meta={"pad": "x" * 200})
    try:
        manifest.flush()
    except InsufficientSpaceError as exc:
        print(exc.key, exc.params["needed_mb"] >= 0, flush=True)
"""


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE")
def test_full_disk_while_writing_the_manifest_keeps_the_old_one(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "unit.bin").write_bytes(b"u" * 100)
    writer = run_python(RLIMITED_WRITER, str(cache))
    out, err = writer.communicate(timeout=60)
    assert out.strip() == "disk_error_insufficient_space True", err
    manifest = UnitManifest(cache, "1.0", config={"resume": "auto"})
    assert manifest.previous_units == 1 and manifest.lookup("block", "first", "sig") == cache / "unit.bin"
    assert sorted(path.name for path in cache.iterdir()) == ["manifest.json", "unit.bin"]  # no temp file left


def test_cache_retention(tmp_path: Path) -> None:
    for retention, success, survives in (("run_end", True, False), ("keep", True, True), ("run_end", False, True)):
        cache = tmp_path / f"{retention}-{success}" / ".zemosaic_cache"
        reporter = Reporter()
        manifest = UnitManifest(cache, "1.0", config=validate_config({"cache_retention": retention}), reporter=reporter)
        manifest.record("block", 0, "sig", _unit_file(cache, "b.f32", b"z" * 2048))
        manifest.close(success=success)
        assert cache.exists() == survives
        if success:
            assert keys_of(reporter)[-1] == ("resume_info_cache_kept" if survives else "resume_info_cache_removed")


def test_unreadable_manifest_is_ignored_with_a_warning(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MANIFEST_NAME).write_text('{"format": "napari-zemosaic-resume", "units": [1, 2')
    reporter = Reporter()
    manifest = UnitManifest(cache, "1.0", config=validate_config({}), reporter=reporter)
    manifest.emit_pending()
    assert keys_of(reporter) == ["resume_warn_manifest_unreadable"] and manifest.previous_units == 0


# ============================================================================ free space and atomic writes


class _FakeUsage:
    def __init__(self, free: int) -> None:
        self.free = free
        self.asked: list[str] = []

    def __call__(self, path: str) -> Any:
        self.asked.append(path)
        return self


def test_free_space_guard_reports_needed_and_free(tmp_path: Path) -> None:
    usage = _FakeUsage(free=10 * 2**20)
    spill_dir = tmp_path / "out" / ".zemosaic_cache" / "mosaic_first"  # not created yet
    with pytest.raises(InsufficientSpaceError) as caught:
        ensure_free_space(spill_dir, 20 * 2**20 + 1, disk_usage=usage)
    error = caught.value
    assert isinstance(error, UserError) and error.key == "disk_error_insufficient_space"
    assert error.params == {"path": str(spill_dir), "needed_mb": 21, "free_mb": 10}  # needed rounded up
    assert usage.asked == [str(tmp_path)]  # the nearest existing folder was measured
    for language in ("en", "fr"):
        message = tr(error.key, language, **error.params)
        assert "21" in message and "10" in message and str(spill_dir) in message
    assert ensure_free_space(spill_dir, 5 * 2**20, disk_usage=usage) == 10 * 2**20
    with pytest.raises(InsufficientSpaceError):
        ensure_free_space(spill_dir, 5 * 2**20, reserve_bytes=6 * 2**20, disk_usage=usage)
    assert ensure_free_space(tmp_path, 1) > 0  # the real disk has a byte


@pytest.fixture()
def tiny_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs (root on Linux only; skipped elsewhere)."""
    with mounted_tmpfs(tmp_path / "tiny", "1m") as mount_point:
        yield mount_point


def test_really_full_disk(tiny_tmpfs: Path) -> None:
    with pytest.raises(InsufficientSpaceError) as caught:
        ensure_free_space(tiny_tmpfs / "cache", 2 * 2**20)
    assert caught.value.params["free_mb"] <= 1
    cache = tiny_tmpfs / "cache"
    manifest = UnitManifest(cache, "1.0", config={"resume": "auto"}, flush_interval_s=3600)
    unit = _unit_file(cache, "u.bin", b"u" * 1000)
    manifest.record("block", "first", "sig", unit)
    manifest.flush()
    usage = os.statvfs(tiny_tmpfs)
    free = usage.f_bavail * usage.f_frsize
    with open(tiny_tmpfs / "filler", "wb") as handle:
        handle.write(b"f" * max(0, free - 8192))  # leave less room than the next manifest needs
    for index in range(100):
        manifest.record("block", f"k{index}", "sig", unit, meta={"pad": "x" * 300})
    with pytest.raises(InsufficientSpaceError):
        manifest.flush()
    reloaded = UnitManifest(cache, "1.0", config={"resume": "auto"})
    assert reloaded.previous_units == 1 and reloaded.lookup("block", "first", "sig") == unit
    assert sorted(path.name for path in cache.iterdir()) == ["manifest.json", "units"]


def test_atomic_write_exclusive_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "file.json"
    write_file_atomic(target, b"one", exclusive=True)
    with pytest.raises(FileExistsError):
        write_file_atomic(target, b"two", exclusive=True)
    assert target.read_bytes() == b"one"
    write_file_atomic(target, b"three")
    assert target.read_bytes() == b"three"
    assert [path.name for path in tmp_path.iterdir()] == ["file.json"]  # no temporary left behind


def test_every_resume_key_has_text() -> None:
    keys = [
        "run_error_output_locked", "resume_warn_stale_lock", "resume_info_found", "resume_info_reused",
        "resume_info_recomputed", "resume_warn_corrupt_unit", "resume_warn_forced", "resume_warn_manifest_unreadable",
        "resume_warn_manifest_write", "resume_info_off", "resume_info_engine_changed", "resume_info_cache_removed",
        "resume_info_cache_kept", "disk_error_insufficient_space",
    ]
    assert all(key in EN for key in keys)


def test_leftovers_of_a_killed_run_are_cleaned_but_not_final_files(tmp_path: Path) -> None:
    from napari_zemosaic.engine.resume import clean_interrupted_writes

    cache = tmp_path / ".zemosaic_cache"
    (cache / "sds").mkdir(parents=True)
    leftovers = [
        tmp_path / ".mosaic_science.fits.partial-4242",  # outputs.atomic_path
        tmp_path / ".run_report.json.tmp-4242-abcd",
        cache / ".manifest.json.tmp-4242-beef",
        cache / "sds" / "megatile_0003.tmp",
        cache / "wcs" / ".0123abcd.4242.1.part",
    ]
    finals = [tmp_path / "mosaic_science.fits", tmp_path / "zemosaic.log", cache / "manifest.json", cache / "sds" / "megatile_0002.f32"]
    for path in leftovers + finals:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    removed = clean_interrupted_writes(tmp_path, cache)
    assert sorted(removed) == sorted(leftovers)
    assert all(path.exists() for path in finals) and not any(path.exists() for path in leftovers)


def test_units_cached_elsewhere_are_counted(tmp_path: Path) -> None:
    manifest = UnitManifest(tmp_path / "cache", "1.0", config=validate_config({}))
    manifest.note("wcs", "a.fits", "reused")
    manifest.note("wcs", "b.fits", "computed")
    manifest.note("wcs", "a.fits", "reused")  # counted once per unit
    assert manifest.counts()["wcs"]["reused"] == 1 and manifest.counts()["wcs"]["computed"] == 1

"""Resume and run safety: the output-folder lock, the work-unit manifest, the free-space guard.

Run lock
--------
:class:`RunLock` makes ``OUTPUT/.zemosaic.lock`` the proof that one run owns an output folder.
The file holds the owner's PID, host, process start stamp, start and last-refresh times and a
random token; it is written complete under a temporary name and moved into place (``os.link``
for a fresh lock, so two runs racing for a free folder cannot both win; ``os.replace`` to take
over a stale one), and the check-then-write is done under an advisory ``flock`` on the folder
where the platform has one. A second run into the same folder gets
``UserError("run_error_output_locked")``. A lock is *stale*, and is taken over with the warning
``resume_warn_stale_lock``, when

* its owner ran on this host and that PID is gone, or now belongs to another process (the
  process start stamp from ``/proc`` differs: the PID was reused);
* its owner ran on another host (a shared network folder: the PID cannot be checked there) and
  the lock was not refreshed for ``stale_after_hours``;
* it cannot be read at all (not written by this program) and is older than a minute.

Only the owner removes its lock (the token is checked), so a run that was declared stale and
comes back never deletes its successor's lock.

Work-unit manifest
------------------
Every finished work unit (a solved WCS, frame metrics, a reprojected frame, a canvas block, a
mega-tile, a master tile, the final assembly) can be recorded in
``cache_dir/manifest.json`` by :class:`UnitManifest`: kind, key (which unit of that kind),
*signature*, the unit's files with their size and SHA-256, and a small JSON ``meta`` dict. A
rerun into the same OUTPUT looks each unit up before computing it:

* the **signature** is the SHA-256 of a canonical JSON document of everything that determines
  the unit: the identities of its input files (resolved path, size, ``mtime_ns``, SHA-256 of the
  first HDU's header), the other inputs the caller passes (WCS, canvas, block geometry, the
  normalisation it applies, the member frames...), the config keys that affect that kind
  (:data:`UNIT_CONFIG_KEYS`; transitive: a canvas block depends on the resampling keys because
  its pieces were resampled) and the engine version. Change one stacking parameter and the
  kinds that stack are invalidated; the reprojection units are not.
* the **files** are checked on load: same size and same SHA-256 as recorded, or the unit is
  *corrupt* (``resume_warn_corrupt_unit``) and recomputed. A file is hashed once per process
  (memo by path, size and ``mtime_ns``).

Modes (config ``resume``): ``auto`` reuses a unit whose signature matches and whose files are
intact; ``off`` ignores the previous manifest (its units are recomputed and overwritten, the new
ones recorded); ``force`` reuses any *intact* unit of the same kind and key even when its
signature differs (inputs touched, settings changed, another engine version) and says so
(``resume_warn_forced`` with the count) — for the user who knows that the change does not
matter (e.g. the frames were copied and lost their mtimes). Integrity is never waived.

Durability. The manifest is written atomically (temporary file, ``fsync``, ``os.replace``,
``fsync`` of the folder). Writes are throttled (at most one per ``flush_interval_s``; always on
:meth:`UnitManifest.flush`), because rewriting it after each of thousands of units would be
quadratic; a run killed between two writes loses only the last few records, and those units
are recomputed. Correctness never depends on a record being present: a recorded unit always
points at complete files (they are renamed into place before :meth:`record` is called) and is
verified by hash before reuse.

Free space
----------
:func:`ensure_free_space` raises ``disk_error_insufficient_space`` (needed vs free, in MB)
before a big spill instead of failing half-way through a write.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .context import UserError

# ============================================================================ unit kinds

#: Bumped when the meaning or layout of cached unit files changes without a version change.
UNIT_FORMAT_VERSION = 1

_PIXEL_KEYS: tuple[str, ...] = ("hot_pixel_correction", "hot_pixel_sigma", "debayer_method")
_RESAMPLE_KEYS: tuple[str, ...] = ("resample_method", "control_grid_tolerance_px")
_STACK_KEYS: tuple[str, ...] = (
    "stacking_normalize_method",
    "stacking_weighting_method",
    "stacking_rejection_algorithm",
    "stacking_kappa_low",
    "stacking_kappa_high",
    "stacking_max_iterations",
    "stacking_winsor_sigma",
    "stacking_final_combine",
)
#: Settings of the plate solvers and of WCS propagation that change the WCS found (timeouts and
#: process counts only decide whether a solve succeeds; failures are never recorded).
_SOLVE_KEYS: tuple[str, ...] = (
    "solver",
    "astrometry_index_dir",
    "solve_field_path",
    "astap_path",
    "astap_db_dir",
    "solve_scale_margin",
    "solve_search_radius_deg",
    "solve_blind_retry",
    "solve_downsample",
    "solve_max_stars",
    "solve_propagate",
    "propagate_min_stars",
    "propagate_max_rms_px",
)

#: The config keys each unit kind depends on, transitively (a block depends on the resampling of
#: its pieces). Structural choices are *inputs*, not keys: an SDS mega-tile's signature gets its
#: member frames, so ``sds_coverage_threshold`` invalidates exactly the batches whose membership
#: changed; a canvas block gets the canvas and the normalisation it applies.
UNIT_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "wcs": _SOLVE_KEYS,
    "metrics": (),
    "reproject": _PIXEL_KEYS + _RESAMPLE_KEYS,
    "block": _PIXEL_KEYS + _RESAMPLE_KEYS + _STACK_KEYS,
    "megatile": _PIXEL_KEYS + _RESAMPLE_KEYS + _STACK_KEYS,
    "master_tile": _PIXEL_KEYS + _RESAMPLE_KEYS + _STACK_KEYS + ("master_tile_crop_pct",),
    "assembly": _PIXEL_KEYS
    + _RESAMPLE_KEYS
    + _STACK_KEYS
    + (
        "master_tile_crop_pct",
        "apply_intertile_photometry",
        "final_assembly_method",
        "two_pass_coverage_renorm",
        "min_coverage_keep",
        "sds_min_coverage_keep",
    ),
}

RESUME_MODES = ("auto", "off", "force")

MANIFEST_NAME = "manifest.json"
#: Cache entries that outlive a successful run whatever ``cache_retention`` says (solved WCS).
RETAINED_AFTER_RUN = ("wcs",)
MANIFEST_FORMAT = "napari-zemosaic-resume"
#: Default minimum time between two manifest writes while units are being recorded.
FLUSH_INTERVAL_S = 2.0

#: Header bytes hashed at most for a file's identity (a FITS header is a few blocks).
_MAX_HEADER_BYTES = 2880 * 200
_FITS_BLOCK = 2880


# ============================================================================ atomic files


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(path: Path, payload: bytes, *, exclusive: bool = False) -> None:
    """Write ``payload`` to ``path`` so a reader sees the old file or the whole new one, never a part.

    With ``exclusive`` the file must not exist yet (``FileExistsError`` otherwise): the complete
    temporary file is hard-linked to ``path``, which fails atomically if another process got
    there first. The temporary file is removed whatever happens.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            try:
                os.link(temp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system: O_EXCL is the next best thing
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(payload)
                        handle.flush()
                        os.fsync(handle.fileno())
                except BaseException:
                    path.unlink()  # never leave a half-written file under the final name
                    raise
        else:
            os.replace(temp, path)
        _fsync_dir(path.parent)
    finally:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass


def save_unit_arrays(path: Path, *, durable: bool = True, **arrays: Any) -> str:
    """Write ``arrays`` as one ``.npz`` under ``path`` atomically; returns the SHA-256 of its bytes.

    ``durable`` adds the fsyncs that make the file survive a power cut (a killed process never
    leaves a partial file either way: it is renamed into place complete). A full disk raises
    :class:`InsufficientSpaceError` and leaves nothing under ``path``.
    """
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            write_file_atomic(path, payload)
        else:
            temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                temp.write_bytes(payload)
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)
    except OSError as exc:
        if _is_disk_full(exc):
            raise InsufficientSpaceError(path.parent, len(payload), _free_bytes(path.parent)) from None
        raise
    return hashlib.sha256(payload).hexdigest()


def load_unit_arrays(path: Path) -> dict[str, Any]:
    """The arrays of a file written by :func:`save_unit_arrays`."""
    import numpy as np

    with np.load(Path(path), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def write_raw_atomic(path: Path, payload: Any) -> None:
    """Write a buffer (bytes or a contiguous array) under ``path`` by temp + rename, no fsync:
    for large, reproducible cache files (spilled pieces) whose loss only costs a recompute."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "wb") as handle:
            handle.write(memoryview(payload).cast("B"))
        os.replace(temp, path)
    except OSError as exc:
        if _is_disk_full(exc):
            raise InsufficientSpaceError(path.parent, memoryview(payload).nbytes, _free_bytes(path.parent)) from None
        raise
    finally:
        temp.unlink(missing_ok=True)


# ============================================================================ free space


class InsufficientSpaceError(UserError):
    """``disk_error_insufficient_space``: fewer free bytes than a step needs."""

    def __init__(self, path: Path | str, needed_bytes: int, free_bytes: int) -> None:
        self.needed_bytes = int(needed_bytes)
        self.free_bytes = int(free_bytes)
        super().__init__(
            "disk_error_insufficient_space",
            path=str(path),
            needed_mb=math.ceil(self.needed_bytes / 2**20),
            free_mb=self.free_bytes // 2**20,
        )


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (a cache folder may not exist yet)."""
    current = Path(path).absolute()
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


def ensure_free_space(
    path: str | os.PathLike[str],
    needed_bytes: int,
    *,
    reserve_bytes: int = 0,
    disk_usage: Callable[[str], Any] = shutil.disk_usage,
) -> int:
    """Free bytes on the file system of ``path``; raise :class:`InsufficientSpaceError` when fewer
    than ``needed_bytes + reserve_bytes`` are free.

    ``disk_usage`` (``shutil.disk_usage`` by default) returns an object with ``.free``; tests pass
    their own to simulate a full disk.
    """
    target = _existing_ancestor(Path(path))
    free = int(disk_usage(str(target)).free)
    needed = int(needed_bytes) + int(reserve_bytes)
    if needed > free:
        raise InsufficientSpaceError(path, needed, free)
    return free


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG)


# ============================================================================ run lock

LOCK_NAME = ".zemosaic.lock"
#: A lock of another host that was not refreshed for this long is considered abandoned.
STALE_AFTER_HOURS = 12.0
#: An unreadable lock younger than this may be in the middle of being written by an older tool.
UNREADABLE_LOCK_GRACE_S = 60.0


def _process_start_stamp(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``); None elsewhere."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is parenthesised and may hold spaces: split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool | None:
    """True/False when this host can tell whether ``pid`` runs; None when it cannot (assume alive)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate the process on Windows
        try:
            import ctypes

            handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # type: ignore[attr-defined]
            if not handle:
                return False
            code = ctypes.c_ulong()
            ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))  # type: ignore[attr-defined]
            ctypes.windll.kernel32.CloseHandle(handle)  # type: ignore[attr-defined]
            return code.value == 259  # STILL_ACTIVE
        except Exception:
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return None
    return True


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True)
class LockOwner:
    """Who holds an output folder, as stored in the lock file."""

    pid: int
    host: str
    started: float
    updated: float
    token: str
    pid_start: str | None = None
    version: str = ""

    @property
    def since(self) -> str:
        return _iso(self.started)

    def to_json(self) -> bytes:
        document = {
            "format": "napari-zemosaic-lock",
            "pid": self.pid,
            "host": self.host,
            "started": self.started,
            "started_iso": self.since,
            "updated": self.updated,
            "token": self.token,
            "pid_start": self.pid_start,
            "version": self.version,
        }
        return (json.dumps(document, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, payload: bytes) -> "LockOwner":
        data = json.loads(payload.decode("utf-8"))
        if not isinstance(data, dict) or data.get("format") != "napari-zemosaic-lock":
            raise ValueError("not a napari-zemosaic lock")
        started = float(data["started"])
        return cls(
            pid=int(data["pid"]),
            host=str(data["host"]),
            started=started,
            updated=float(data.get("updated", started)),
            token=str(data["token"]),
            pid_start=None if data.get("pid_start") is None else str(data["pid_start"]),
            version=str(data.get("version", "")),
        )


@contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Serialise lock checks between processes with ``flock`` on the folder (POSIX); no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # Windows: the exclusive link below is the only guard
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without flock
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class RunLock:
    """``with RunLock(output_dir): ...`` — exclusive use of an output folder by one run.

    Raises ``UserError("run_error_output_locked", path, pid, host, since)`` when a live run holds
    the folder. A stale lock is taken over; :attr:`takeover` then describes it and
    :meth:`emit_warnings` logs ``resume_warn_stale_lock`` (the reporter usually does not exist
    yet when the lock is taken, because the log file must not be opened before).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        stale_after_hours: float = STALE_AFTER_HOURS,
        reporter: Any = None,
        version: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.stale_after_s = float(stale_after_hours) * 3600.0
        self.reporter = reporter
        self.version = version
        self.clock = clock
        self.owner: LockOwner | None = None
        self.takeover: dict[str, Any] | None = None

    # ----------------------------------------------------------------------- public
    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.owner is not None

    def acquire(self) -> "RunLock":
        if self.owner is not None:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        mine = LockOwner(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=now,
            updated=now,
            token=secrets.token_hex(16),
            pid_start=_process_start_stamp(os.getpid()),
            version=self.version,
        )
        try:
            with _folder_guard(self.output_dir):
                self._acquire_guarded(mine)
        except UserError:
            raise
        except OSError as exc:
            if _is_disk_full(exc):
                raise InsufficientSpaceError(self.output_dir, _FITS_BLOCK, _free_bytes(self.output_dir)) from None
            raise UserError("output_error_unwritable", path=str(self.output_dir), detail=exc.strerror or str(exc)) from None
        self.owner = mine
        if self.reporter is not None:
            self.emit_warnings(self.reporter)
        return self

    def refresh(self) -> None:
        """Update the lock's heartbeat (long runs on shared folders call this now and then).

        Raises ``run_error_output_locked`` if another run has taken the folder over meanwhile.
        """
        if self.owner is None:
            return
        with _folder_guard(self.output_dir):
            current = self._read()
            if isinstance(current, LockOwner) and current.token != self.owner.token:
                self.owner = None
                raise self._locked_error(current)
            refreshed = dataclasses.replace(self.owner, updated=self.clock())
            write_file_atomic(self.path, refreshed.to_json())
            self.owner = refreshed

    def release(self) -> None:
        """Remove the lock if it is still this run's (never a successor's)."""
        if self.owner is None:
            return
        token, self.owner = self.owner.token, None
        try:
            with _folder_guard(self.output_dir):
                current = self._read()
                if isinstance(current, LockOwner) and current.token == token:
                    self.path.unlink()
        except OSError:
            pass  # the folder vanished: nothing left to unlock

    def emit_warnings(self, reporter: Any) -> None:
        """Log the stale-lock takeover (once)."""
        if self.takeover is not None:
            reporter.warning("resume_warn_stale_lock", **self.takeover)
            self.takeover = None

    # ----------------------------------------------------------------------- internals
    def _read(self) -> LockOwner | str | None:
        """The current owner, None when there is no lock, or a string saying why it is unreadable."""
        try:
            payload = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return LockOwner.from_json(payload)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            return f"unreadable lock file ({type(exc).__name__})"

    def _acquire_guarded(self, mine: LockOwner) -> None:
        for _attempt in range(3):
            current = self._read()
            if current is None:
                try:
                    write_file_atomic(self.path, mine.to_json(), exclusive=True)
                    return
                except FileExistsError:
                    continue  # another run was quicker (no flock here): look at its lock
            why_stale = self._why_stale(current)
            if not why_stale:
                raise self._locked_error(current if isinstance(current, LockOwner) else None)
            self.takeover = self._takeover_params(current, why_stale)
            write_file_atomic(self.path, mine.to_json())
            return
        current = self._read()
        raise self._locked_error(current if isinstance(current, LockOwner) else None)

    def _why_stale(self, current: LockOwner | str) -> str:
        """'' when ``current`` is a live owner, else why it is stale."""
        now = self.clock()
        if isinstance(current, str):
            try:
                age = now - self.path.stat().st_mtime
            except OSError:
                age = math.inf
            return current if age > UNREADABLE_LOCK_GRACE_S else ""
        if current.host != socket.gethostname():
            idle = now - current.updated
            if idle > self.stale_after_s:
                return f"not refreshed for {idle / 3600.0:.1f} h by another host"
            return ""
        alive = pid_alive(current.pid)
        if alive is False:
            return f"process {current.pid} is gone"
        if alive and current.pid_start is not None:
            stamp = _process_start_stamp(current.pid)
            if stamp is not None and stamp != current.pid_start:
                return f"process {current.pid} is another program now (PID reused)"
        return ""

    def _takeover_params(self, current: LockOwner | str, why: str) -> dict[str, Any]:
        if isinstance(current, LockOwner):
            return {"path": str(self.path), "pid": current.pid, "host": current.host, "since": current.since, "detail": why}
        return {"path": str(self.path), "pid": "?", "host": "?", "since": "?", "detail": why}

    def _locked_error(self, current: LockOwner | None) -> UserError:
        if current is None:
            return UserError("run_error_output_locked", path=str(self.output_dir), pid="?", host="?", since="?")
        return UserError(
            "run_error_output_locked", path=str(self.output_dir), pid=current.pid, host=current.host, since=current.since
        )


def _free_bytes(path: Path) -> int:
    try:
        return int(shutil.disk_usage(_existing_ancestor(path)).free)
    except OSError:
        return 0


# ============================================================================ interrupted writes

#: Temporary names this program's writers use (outputs.atomic_path, write_file_atomic, the
#: SDS mega-tile writer, the solver cache, the output-folder probe).
_PARTIAL_PATTERNS = (".*.partial-*", ".*.tmp-*", ".zemosaic-write-probe-*")
_CACHE_PARTIAL_PATTERNS = _PARTIAL_PATTERNS + ("*.tmp", ".*.part")


def clean_interrupted_writes(output_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the temporary files a killed run left behind; returns what was removed.

    Call it only while holding the :class:`RunLock` of ``output_dir``: then no other run of this
    program is writing there, so every temporary file belongs to a dead run. Final files are
    never touched (they are complete by construction: renamed into place).
    """
    removed: list[Path] = []
    output = Path(output_dir)
    candidates = [path for pattern in _PARTIAL_PATTERNS for path in output.glob(pattern)]
    if cache_dir is not None and Path(cache_dir).is_dir():
        cache = Path(cache_dir)
        candidates += [path for pattern in _CACHE_PARTIAL_PATTERNS for path in cache.rglob(pattern)]
    for path in sorted(set(candidates)):
        if path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed


# ============================================================================ signatures


def fits_header_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the first HDU's header blocks (up to and including the END card)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        read = 0
        while read < _MAX_HEADER_BYTES:
            block = handle.read(_FITS_BLOCK)
            if not block:
                break
            digest.update(block)
            read += len(block)
            cards = (block[i : i + 80] for i in range(0, len(block), 80))
            if any(card[:8] == b"END     " or card.rstrip() == b"END" for card in cards):
                break
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies an input file's content cheaply: resolved path, size, mtime_ns, header hash."""
    return stamped_file_identity(path)[1]


def stamped_file_identity(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """``(stat stamp, file_identity)`` of ``path``. Mosaic-First's reader processes compute it beside
    each frame's read (``FrameInfo.file_identity``), so that the run's signatures take it instead of
    reading every header again in the run's process (``_Canonicaliser.identity``'s ``known``)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _stamp_of(stat), _identity_of(str(resolved), stat)


def _stamp_of(stat: os.stat_result) -> tuple[int, int, int]:
    """What says a file is still the one identified: size, mtime_ns, inode."""
    return int(stat.st_size), int(stat.st_mtime_ns), int(stat.st_ino)


def _identity_of(resolved: str, stat: os.stat_result) -> dict[str, Any]:
    return {
        "path": resolved,
        "size": int(stat.st_size),
        "mtime_ns": int(stat.st_mtime_ns),
        "header_sha256": fits_header_sha256(resolved),
    }


def _wcs_cards(wcs: Any) -> list[list[Any]]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = wcs.to_header(relax=True)
    return [[card.keyword, card.value] for card in header.cards if card.keyword not in ("COMMENT", "HISTORY", "", "DATE")]


def _wcs_content(wcs: Any) -> dict[str, Any]:
    """What a TAN/SIP/PV WCS maps with, exactly: its float64 numbers and its names.

    Faster than the header text (2–4 ms a frame through astropy's cards, for every frame of a
    run) and exact where the text rounds. The linear part enters as the matrix wcslib applies
    (``pixel_scale_matrix``), so CD and PC·CDELT forms of one WCS agree. WCSs with lookup-table
    distortions keep their cards.
    """
    import numpy as np

    if any(getattr(wcs, name, None) is not None for name in ("cpdis1", "cpdis2", "det2im1", "det2im2")):
        return {"cards": _wcs_cards(wcs)}
    core = wcs.wcs
    sip = getattr(wcs, "sip", None)
    return {
        "ctype": [str(item) for item in core.ctype],
        "cunit": [str(item) for item in core.cunit],
        "poles": [float(core.lonpole), float(core.latpole)],
        "frame": [str(core.radesys), float(core.equinox)],
        "pv": [[int(i), int(m), float(v)] for i, m, v in core.get_pv()],
        "linear": [np.asarray(a, dtype=np.float64) for a in (core.crval, core.crpix, wcs.pixel_scale_matrix)],
        "sip": None if sip is None else [None if a is None else np.asarray(a, dtype=np.float64)
                                         for a in (sip.a, sip.b, sip.ap, sip.bp, sip.crpix)],
    }


class _Canonicaliser:
    """Turns signature inputs into plain JSON; files become their identities (memoised by stat)."""

    def __init__(self) -> None:
        self._identities: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._resolved: dict[str, str] = {}
        self._lock = threading.Lock()

    def identity(
        self, path: str | os.PathLike[str], known: tuple[tuple[int, int, int], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """``file_identity(path)``, memoised while the file's stamp holds. ``known``: a
        :func:`stamped_file_identity` computed earlier (by a reader process), taken when the file
        still has its stamp, so that its header is not read again."""
        key = os.fspath(path)
        with self._lock:
            resolved = self._resolved.get(key)
        if resolved is None:  # resolved once a run: a path's links do not move under a run
            # An absolute path resolves the same in every process; a relative one follows the cwd.
            resolved = known[1]["path"] if known is not None and os.path.isabs(key) else str(Path(path).resolve())
            with self._lock:
                self._resolved[key] = resolved
        try:
            stat = os.stat(resolved)
        except OSError as exc:  # a vanished input: its signature can never match a recorded one
            return {"path": resolved, "missing": type(exc).__name__}
        stamp = _stamp_of(stat)
        with self._lock:
            memo = self._identities.get(resolved)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        if known is not None and known[0] == stamp and known[1].get("path") == resolved:
            identity = dict(known[1])
        else:
            identity = _identity_of(resolved, stat)  # the stat just taken, not a second one
        with self._lock:
            self._identities[resolved] = (stamp, identity)
        return identity

    def __call__(self, value: Any) -> Any:
        import numpy as np

        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            number = float(value)
            # repr() is the shortest exact round trip; NaN/inf get stable spellings.
            return number if math.isfinite(number) else {"float": repr(number)}
        if isinstance(value, os.PathLike):
            return {"file": self.identity(value)}
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            return {
                "ndarray": str(array.dtype),
                "shape": list(array.shape),
                "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
            }
        if isinstance(value, Mapping):
            return {str(key): self(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(item) for item in value]
        if isinstance(value, (set, frozenset)):
            return sorted((self(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
        if hasattr(value, "wcs") and hasattr(value, "path") and hasattr(value, "shape"):  # a FrameInfo
            return {
                "frame": self.identity(value.path, getattr(value, "file_identity", None)),
                "hdu": int(getattr(value, "hdu_index", 0)),
                "shape": [int(size) for size in value.shape],
                "wcs": None if value.wcs is None else self(_wcs_content(value.wcs)),
            }
        if hasattr(value, "to_header") and hasattr(value, "wcs"):  # an astropy WCS
            return {"wcs": self(_wcs_content(value))}
        if hasattr(value, "cards") and hasattr(value, "tostring"):  # an astropy Header
            return {"header": [[card.keyword, self(card.value)] for card in value.cards]}
        if hasattr(value, "to_dict"):  # Canvas and other engine records
            return self(value.to_dict())
        raise TypeError(f"cannot put a {type(value).__name__} into a unit signature")


def _digest_of(canonical: Any) -> str:
    return hashlib.sha256(canonical_json(canonical).encode("ascii")).hexdigest()[:24]


def frame_token(frame: Any) -> tuple[dict[str, Any], str] | None:
    """``(file identity, digest)`` of a FrameInfo whose ``file_identity`` is set: its
    :meth:`UnitManifest.digest`, for a reader process to compute beside its read (500 of them held
    the run's GIL about 0.1 s while it waited for P2's verdicts); None without an identity.
    :meth:`UnitManifest.frame_digest` takes it while the file has that identity."""
    if getattr(frame, "file_identity", None) is None:
        return None
    canonical = _Canonicaliser()(frame)
    return canonical["frame"], _digest_of(canonical)


def canonical_json(value: Any) -> str:
    """The canonical text hashed into signatures (sorted keys, no spaces, exact floats)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# ============================================================================ manifest


@dataclass
class UnitRecord:
    """One recorded unit: its files (absolute paths), their sizes and hashes, and its metadata."""

    kind: str
    key: str
    signature: str
    paths: list[Path]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.paths[0]


@dataclass
class _KindCounts:
    reused: set[str] = field(default_factory=set)
    computed: set[str] = field(default_factory=set)
    invalidated: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    forced: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, int]:
        return {
            "reused": len(self.reused),
            "computed": len(self.computed),
            "invalidated": len(self.invalidated),
            "corrupt": len(self.corrupt),
            "forced": len(self.forced),
        }


class UnitManifest:
    """The record of finished work units in ``cache_dir/manifest.json`` (see the module docstring).

    Thread-safe: units may be looked up and recorded from worker threads. Log messages raised
    there (corrupt units) are queued and emitted by :meth:`emit_pending` / :meth:`log_summary`,
    which the run calls from its own thread.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        engine_version: str,
        *,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        reporter: Any = None,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / MANIFEST_NAME
        self.engine_version = f"{engine_version}+units{UNIT_FORMAT_VERSION}"
        self.config: dict[str, Any] = dict(config or {})
        self.mode = str(mode or self.config.get("resume", "auto"))
        if self.mode not in RESUME_MODES:
            raise ValueError(f"resume mode {self.mode!r} is not one of {RESUME_MODES}")
        self.reporter = reporter
        self.flush_interval_s = float(flush_interval_s)
        self._lock = threading.RLock()
        self._canonical = _Canonicaliser()
        self._units: dict[str, dict[str, dict[str, Any]]] = {}
        self._counts: dict[str, _KindCounts] = {}
        self._hash_memo: dict[str, tuple[tuple[int, int], str]] = {}
        self._pending: list[tuple[str, str, dict[str, Any]]] = []
        self._dirty = False
        self._last_write = 0.0
        self.previous_units = 0
        self.previous_engine: str | None = None
        self._off_said = False
        self._deferred: list[tuple[threading.Thread, str]] = []
        if self.mode != "off":
            self._load()

    @classmethod
    def for_run(cls, ctx: Any, engine_version: str) -> "UnitManifest":
        """The manifest of a :class:`~.context.RunContext` (its cache folder, config and reporter)."""
        return cls(ctx.cache_dir, engine_version, config=ctx.config, reporter=ctx.reporter)

    # ----------------------------------------------------------------------- loading
    def _load(self) -> None:
        try:
            payload = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._queue("warning", "resume_warn_manifest_unreadable", path=str(self.path), detail=str(exc))
            return
        try:
            document = json.loads(payload.decode("utf-8"))
            if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
                raise ValueError("not a resume manifest")
            units = document.get("units", {})
            if not isinstance(units, dict) or not all(isinstance(v, dict) for v in units.values()):
                raise ValueError("malformed units table")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            self._queue("warning", "resume_warn_manifest_unreadable", path=str(self.path), detail=str(exc)[:200])
            return
        self._units = {str(kind): dict(entries) for kind, entries in units.items()}
        self.previous_units = sum(len(entries) for entries in self._units.values())
        self.previous_engine = str(document.get("engine_version", ""))
        if self.previous_units:
            self._queue("info", "resume_info_found", count=self.previous_units, path=str(self.cache_dir))
        if self.previous_units and self.previous_engine != self.engine_version and self.mode == "auto":
            self._queue("info", "resume_info_engine_changed", old=self.previous_engine, new=self.engine_version)

    # ----------------------------------------------------------------------- signatures
    def signature(self, kind: str, inputs: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> str:
        """SHA-256 of the canonical JSON of ``inputs``, the config keys of ``kind`` and the engine version.

        In ``inputs`` every :class:`os.PathLike` (``pathlib.Path``) is an input file and enters as
        its identity (resolved path, size, mtime_ns, header SHA-256); a FrameInfo enters as its
        file identity, HDU, shape and WCS; WCS, headers, canvases (``to_dict``) and numpy arrays
        (dtype, shape, SHA-256 of the bytes) are accepted too. Plain strings are *not* files.
        """
        if kind not in UNIT_CONFIG_KEYS:
            raise KeyError(f"unknown work-unit kind {kind!r}; known: {sorted(UNIT_CONFIG_KEYS)}")
        keys = sorted(set(UNIT_CONFIG_KEYS[kind]) | set(extra_keys))
        document = {
            "kind": kind,
            "engine": self.engine_version,
            "config": {key: self._canonical(self.config.get(key)) for key in keys},
            "inputs": self._canonical(inputs),
        }
        return hashlib.sha256(canonical_json(document).encode("ascii")).hexdigest()

    def file_identity(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """:func:`file_identity`, memoised for this run."""
        return self._canonical.identity(path)

    def digest(self, value: Any) -> str:
        """A short digest of ``value`` in the canonical form of signatures (e.g. a frame's identity,
        computed once and then used in many unit signatures and as a stable file name)."""
        return _digest_of(self._canonical(value))

    def frame_digest(self, frame: Any) -> str:
        """:meth:`digest` of a FrameInfo, taken from its ``resume_token`` (:func:`frame_token`, computed
        by a reader process) while its file still has the identity the token was computed for."""
        known = getattr(frame, "resume_token", None)
        if known is not None and self._canonical.identity(frame.path, frame.file_identity) == known[0]:
            return known[1]
        return self.digest(frame)

    # ----------------------------------------------------------------------- lookup / record
    def lookup(self, kind: str, key: Any, signature: str) -> Path | None:
        """The unit's (first) file when it can be reused, else None (see :meth:`lookup_record`)."""
        record = self.lookup_record(kind, key, signature)
        return None if record is None else record.path

    def lookup_record(self, kind: str, key: Any, signature: str) -> UnitRecord | None:
        """The recorded unit when the mode allows reusing it and its files are intact, else None."""
        key = str(key)
        if self.mode == "off":
            return None
        with self._lock:
            entry = self._units.get(kind, {}).get(key)
            counts = self._counts_of(kind)
            if entry is None:
                return None
            matches = entry.get("signature") == signature
            if not matches and self.mode == "auto":
                counts.invalidated.add(key)
                return None
        problem = self._integrity_problem(entry)  # hashing outside the lock: other threads go on
        with self._lock:
            if problem:
                counts.corrupt.add(key)
                counts.invalidated.discard(key)
                self._units.get(kind, {}).pop(key, None)
                self._dirty = True
                paths = ", ".join(str(self._absolute(item["path"])) for item in entry.get("files", []))
                self._queue("warning", "resume_warn_corrupt_unit", kind=kind, path=paths, detail=problem)
                return None
            counts.reused.add(key)
            counts.computed.discard(key)
            if not matches:
                counts.forced.add(key)
            return UnitRecord(
                kind=kind,
                key=key,
                signature=str(entry.get("signature")),
                paths=[self._absolute(item["path"]) for item in entry["files"]],
                meta=dict(entry.get("meta") or {}),
            )

    def record(
        self,
        kind: str,
        key: Any,
        signature: str,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        meta: Mapping[str, Any] | None = None,
        sha256: str | Sequence[str] | None = None,
    ) -> None:
        """Record a finished unit whose file(s) are complete and in place (renamed, not being written).

        ``meta`` is small JSON (numbers, strings, lists) the unit needs when it is reused (e.g. a
        mega-tile's bbox and noise); ``sha256`` may be given when the writer already computed it.
        """
        if kind not in UNIT_CONFIG_KEYS:
            raise KeyError(f"unknown work-unit kind {kind!r}")
        paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(item) for item in path]
        digests: list[str | None]
        if sha256 is None:
            digests = [None] * len(paths)
        elif isinstance(sha256, str):
            digests = [sha256]
        else:
            digests = list(sha256)
        files = []
        for file_path, digest in zip(paths, digests):
            size = file_path.stat().st_size
            files.append({
                "path": self._relative(file_path),
                "size": int(size),
                "sha256": digest or self._hash(file_path),
            })
        entry = {
            "signature": signature,
            "files": files,
            "meta": _plain_json(dict(meta or {})),
            "recorded": round(time.time(), 3),
        }
        key = str(key)
        with self._lock:
            self._units.setdefault(kind, {})[key] = entry
            counts = self._counts_of(kind)
            if key not in counts.reused:
                counts.computed.add(key)
            self._dirty = True
            due = time.monotonic() - self._last_write >= self.flush_interval_s
        if due:
            self.flush()

    def note(self, kind: str, key: Any, outcome: str) -> None:
        """Count a unit cached elsewhere (e.g. the plate solver's WCS cache): ``reused`` or ``computed``."""
        if outcome not in ("reused", "computed"):
            raise ValueError(f"outcome {outcome!r} is not 'reused' or 'computed'")
        with self._lock:
            getattr(self._counts_of(kind), outcome).add(str(key))

    def forget(self, kind: str, key: Any) -> None:
        """Drop a unit (its files are about to be overwritten or were removed)."""
        with self._lock:
            if self._units.get(kind, {}).pop(str(key), None) is not None:
                self._dirty = True

    # ----------------------------------------------------------------------- persistence
    def flush(self) -> None:
        """Write the manifest now if anything changed (atomic, fsync'ed).

        A full disk raises :class:`InsufficientSpaceError`; the previous manifest stays intact.
        """
        with self._lock:
            if not self._dirty:
                return
            document = {
                "format": MANIFEST_FORMAT,
                "format_version": 1,
                "engine_version": self.engine_version,
                "written": _iso(time.time()),
                "units": self._units,
            }
            # Compact: json's C encoder (indent falls back to the pure-Python one, 3x slower; the
            # manifest is rewritten after every finished block of a run).
            payload = (json.dumps(document, sort_keys=True, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                write_file_atomic(self.path, payload)
            except OSError as exc:
                if _is_disk_full(exc):
                    raise InsufficientSpaceError(self.cache_dir, len(payload), _free_bytes(self.cache_dir)) from None
                self._queue("warning", "resume_warn_manifest_write", path=str(self.path), detail=exc.strerror or str(exc))
                return
            self._dirty = False
            self._last_write = time.monotonic()

    def defer(self, kind: str, write: Callable[[], None]) -> None:
        """Record units of ``kind`` later, on a thread (``write``: their files and records), off the
        run's critical path: from :meth:`start_deferred` (when the run has time to spare for the
        Python they take), at the latest from :meth:`close`, which waits for them and then says
        what was reused and computed."""
        def run() -> None:
            try:
                write()
            except Exception as exc:  # a full disk, a vanished cache: the next run recomputes them
                self._queue("warning", "resume_warn_manifest_write", path=str(self.cache_dir), detail=str(exc))

        thread = threading.Thread(target=run, name=f"zemosaic-units-{kind}", daemon=True)
        with self._lock:
            self._deferred.append((thread, kind))

    def start_deferred(self) -> None:
        """Start writing the deferred units (:meth:`defer`) now."""
        with self._lock:
            waiting = [thread for thread, _ in self._deferred if thread.ident is None]
        for thread in waiting:
            thread.start()

    def wait_deferred(self) -> None:
        """Write the deferred units (:meth:`defer`), wait for them and log their summaries."""
        self.start_deferred()
        with self._lock:
            deferred, self._deferred = self._deferred, []
        for thread, kind in deferred:
            thread.join()
            self.log_summary(kind)

    def close(self, success: bool) -> None:
        """End of run: flush, log what is pending, apply ``cache_retention`` after a success."""
        try:
            self.wait_deferred()
            self.flush()
        finally:
            if success:
                self.apply_retention()
            self.emit_pending()

    def apply_retention(self) -> bool:
        """After a successful run: remove the cache (``run_end``) or keep it (``keep``). True if removed."""
        retention = str(self.config.get("cache_retention", "run_end"))
        if retention == "keep":
            size = sum(p.stat().st_size for p in self.cache_dir.rglob("*") if p.is_file()) if self.cache_dir.exists() else 0
            self._queue("info", "resume_info_cache_kept", path=str(self.cache_dir), size_mb=round(size / 2**20, 1))
            return False
        if self.cache_dir.exists():
            # Solved WCS belong to the input files, not to this run: they save the next run a solve.
            for entry in self.cache_dir.iterdir():
                if entry.name in RETAINED_AFTER_RUN:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            try:
                self.cache_dir.rmdir()  # only when nothing was retained
            except OSError:
                pass
            self._queue("info", "resume_info_cache_removed", path=str(self.cache_dir))
        with self._lock:
            self._units = {}
            self._dirty = False
        return True

    # ----------------------------------------------------------------------- reporting
    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind: units reused, computed, invalidated (stale signature), corrupt, forced."""
        with self._lock:
            return {kind: counts.to_dict() for kind, counts in sorted(self._counts.items())}

    def report(self) -> dict[str, Any]:
        """The ``resume`` section of ``run_report.json``."""
        return {
            "mode": self.mode,
            "cache_dir": str(self.cache_dir),
            "previous_units": self.previous_units,
            "units": self.counts(),
        }

    def log_summary(self, kind: str, reporter: Any = None) -> None:
        """Say per phase what was reused and what was recomputed for ``kind`` (after its units ran)."""
        reporter = reporter or self.reporter
        self.emit_pending(reporter)
        if reporter is None:
            return
        with self._lock:
            counts = self._counts_of(kind).to_dict()
        if counts["reused"]:
            reporter.info("resume_info_reused", kind=kind, count=counts["reused"])
        if counts["forced"]:
            reporter.warning("resume_warn_forced", kind=kind, count=counts["forced"])
        if self.previous_units and counts["computed"]:
            reporter.info(
                "resume_info_recomputed",
                kind=kind,
                count=counts["computed"],
                invalidated=counts["invalidated"],
                corrupt=counts["corrupt"],
            )

    def emit_pending(self, reporter: Any = None) -> None:
        """Emit the queued log messages (call from the run's thread)."""
        reporter = reporter or self.reporter
        if reporter is None:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        if self.mode == "off" and not self._off_said:
            self._off_said = True
            reporter.info("resume_info_off", path=str(self.cache_dir))
        for level, key, params in pending:
            reporter.log(level, key, **params)

    # ----------------------------------------------------------------------- internals
    def _counts_of(self, kind: str) -> _KindCounts:
        return self._counts.setdefault(kind, _KindCounts())

    def _queue(self, level: str, key: str, **params: Any) -> None:
        with self._lock:
            self._pending.append((level, key, params))

    def _relative(self, path: Path) -> str:
        absolute = Path(path).absolute()
        try:
            return absolute.relative_to(self.cache_dir.absolute()).as_posix()
        except ValueError:
            return str(absolute)

    def _absolute(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.cache_dir / path

    def _hash(self, path: Path) -> str:
        stat = path.stat()
        stamp = (int(stat.st_size), int(stat.st_mtime_ns))
        memo_key = str(path.absolute())
        with self._lock:
            known = self._hash_memo.get(memo_key)
        if known is not None and known[0] == stamp:
            return known[1]
        digest = file_sha256(path)
        with self._lock:
            self._hash_memo[memo_key] = (stamp, digest)
        return digest

    def _integrity_problem(self, entry: Mapping[str, Any]) -> str:
        """'' when every file of ``entry`` has its recorded size and SHA-256, else what is wrong."""
        files = entry.get("files")
        if not isinstance(files, list) or not files:
            return "no files recorded"
        for item in files:
            try:
                path = self._absolute(str(item["path"]))
                size, digest = int(item["size"]), str(item["sha256"])
            except (KeyError, TypeError, ValueError):
                return "malformed record"
            try:
                actual_size = path.stat().st_size
            except OSError:
                return f"{path.name} is missing"
            if actual_size != size:
                return f"{path.name} has {actual_size} bytes, {size} recorded"
            try:
                actual = self._hash(path)
            except OSError as exc:
                return f"{path.name} unreadable: {exc.strerror or exc}"
            if actual != digest:
                return f"{path.name} content differs from the recorded SHA-256"
        return ""


def _plain_json(value: Any) -> Any:
    """``value`` as plain JSON: numpy scalars and arrays unwrapped, paths as text, NaN/inf as null."""
    import numpy as np

    if isinstance(value, Mapping):
        return {str(key): _plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, os.PathLike):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{type(value).__name__} cannot be stored in a unit's meta")

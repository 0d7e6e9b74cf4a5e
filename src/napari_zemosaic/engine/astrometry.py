"""Plate solving for frames without a WCS: local solvers, WCS propagation by star matching, a cache.

Smart-telescope sub-frames carry only the mount's pointing (``RA``/``DEC``) and the optics
(``FOCALLEN``, ``XPIXSZ``), not a WCS. This module gives every such frame a TAN-SIP WCS
without ever writing into the input files.

How
---
1. **Stars.** Each frame is loaded read-only (:func:`.frames.load_frame`: hot pixels fixed on the
   CFA, debayered), summed to a luminance, and its stars are found with ``sep`` (background
   model, 5 sigma, then windowed centroids, ~0.05-0.1 px). Elongated objects (satellite
   trails) and objects cut by the border are dropped.
2. **Solve few.** Frames are grouped by their header pointing (clusters tighter than a quarter
   of the field). One *anchor* per cluster -- the frame with most stars -- is solved by a real
   solver. astrometry.net's ``solve-field`` is given the star list as an xylist table (no image
   is written, no source extraction is repeated) with RA/DEC + radius and pixel-scale hints,
   ``--crpix-center`` and a SIP fit of order 2. ASTAP (``astap_cli``/``astap``) is given a
   16-bit luminance copy and the same hints; its ``.wcs``/``.ini`` answer is parsed. A wrong
   position hint is caught by one retry without it. Solvers run as separate processes, several
   at once, each with a wall-clock timeout (the process group is killed when it expires).
3. **Propagate the rest.** The distortion is a property of the optics, so every frame of one
   camera shares the anchor's SIP polynomial. Both star lists are mapped through it to
   distortion-free focal-plane offsets, matched (rotation/translation-invariant triangle
   invariants, candidate similarities scored by inliers, then an iterated least-squares affine
   fit on all stars), and the affine map is composed with the anchor's TAN projection: the new
   frame keeps the anchor's SIP and CRPIX and gets its own CRVAL and CD, fitted exactly on a
   grid through the sky (so the change of tangent point is handled). A propagated WCS is
   accepted only with >= ``propagate_min_stars`` matched stars and an RMS below
   ``propagate_max_rms_px``; otherwise that frame is solved directly.
4. **Cache.** Every result is stored in ``CACHE/wcs/<content hash>.json`` (the WCS cards, the
   method, the residual), so a second run -- or a copy of the same files -- reuses it.

Everything the user reads is a locale key with parameters; failures become per-frame outcomes
with a ``frame_excluded_*`` reason and the solver's stderr summarised, and never stop the
other frames.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Sequence

import numpy as np

from ..events import Event, Reporter
from .frames import FrameError, FrameInfo, load_frame, validate_wcs, wcs_from_dict, wcs_to_dict

__all__ = [
    "SolverInfo",
    "SolveOutcome",
    "StarList",
    "find_solvers",
    "pick_solver",
    "solve_missing",
    "frame_with_wcs",
    "detect_stars",
    "match_star_lists",
    "propagate_wcs",
    "build_solve_field_command",
    "build_astap_command",
    "parse_astap_output",
    "wcs_cache_key",
    "add_solve_parser",
    "cli_solve",
]

# --- methods and reason keys (locale keys; failures take {path} and {detail}) ---------------
METHOD_HEADER = "header"
METHOD_SOLVED = "solved"
METHOD_PROPAGATED = "propagated"
METHOD_FAILED = "failed"
METHOD_CACHED = "cached"

REASON_NO_SOLVER = "frame_excluded_no_solver"
REASON_SOLVE_FAILED = "frame_excluded_solve_failed"
REASON_SOLVE_TIMEOUT = "frame_excluded_solve_timeout"
REASON_SOLVER_ERROR = "frame_excluded_solver_error"
REASON_TOO_FEW_STARS = "frame_excluded_too_few_stars"
REASON_BAD_SOLUTION = "frame_excluded_bad_wcs"

SOLVER_ASTROMETRY_NET = "astrometry.net"
SOLVER_ASTAP = "astap"

#: Fewest detected stars worth handing to a solver.
MIN_STARS_TO_SOLVE = 8
#: Anchor frames tried per pointing cluster before its other frames are given up.
MAX_ANCHOR_ATTEMPTS = 3
CACHE_FORMAT = "napari-zemosaic-wcs"
CACHE_VERSION = 1

#: Defaults of the plate-solving config keys (read with ``config.get(key, default)``).
SOLVE_DEFAULTS: dict[str, Any] = {
    "solve_missing_wcs": True,
    "solver": "auto",  # auto | astrometry.net | astap
    "astrometry_index_dir": "",  # empty: the system's (add_path of /etc/astrometry.cfg)
    "solve_field_path": "",  # empty: solve-field on PATH
    "astap_path": "",  # empty: astap_cli or astap on PATH
    "astap_db_dir": "",  # empty: ASTAP's default folders
    "solver_timeout_s": 60.0,  # wall clock per solver run
    "solver_processes": 0,  # solver processes at once; 0 = min(4, CPU cores)
    "solve_scale_margin": 0.15,  # pixel-scale hint +- this fraction
    "solve_search_radius_deg": 2.0,  # around the header RA/DEC
    "solve_blind_retry": True,  # retry without the position hint when the hinted solve fails
    "solve_downsample": 0,  # ASTAP -z (0 = auto)
    "solve_max_stars": 300,  # brightest stars kept per frame
    "solve_propagate": True,  # solve one anchor per pointing, propagate the rest
    "propagate_min_stars": 15,
    "propagate_max_rms_px": 0.5,
    "write_wcs_to_inputs": False,
}

_ASTAP_NAMES = ("astap_cli", "astap")
_ASTAP_DB_DIRS = (
    "/opt/astap",
    "/usr/share/astap",
    "/usr/local/share/astap",
    "/usr/lib/astap",
    "~/.astap",
    "C:/Program Files/astap",
    "/Applications/ASTAP.app/Contents/MacOS",
)
_ASTAP_DB_SUFFIXES = (".1476", ".290", ".001")
_ASTROMETRY_CONFIGS = (
    "/etc/astrometry.cfg",
    "/usr/local/etc/astrometry.cfg",
    "/opt/homebrew/etc/astrometry.cfg",
    "/usr/local/astrometry/etc/astrometry.cfg",
)
_ASTROMETRY_INDEX_DIRS = ("/usr/share/astrometry", "/usr/local/astrometry/data", "/usr/local/share/astrometry")
#: ASTAP exit codes (its .ini file is the authority; some versions exit 0 on failure).
_ASTAP_EXIT = {1: "no solution", 2: "not enough stars", 16: "error reading the image",
               32: "no star database found", 33: "error reading the star database"}


# ============================================================================ data


@dataclass(frozen=True)
class SolverInfo:
    """One plate solver found on this machine."""

    name: str  # "astrometry.net" | "astap"
    path: str
    version: str
    index_dir: str | None  # astrometry.net index folder / ASTAP star database folder
    usable: bool = True
    problem: str = ""  # why not usable (no index files, no star database)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SolveOutcome:
    """What happened to one frame's WCS."""

    path: Path
    method: str  # header | solved | propagated | failed | cached
    wcs: Any = None  # astropy WCS or None
    residual_px: float | None = None  # RMS of the fit (solver: catalog match; propagation: star match)
    reason_key: str | None = None  # frame_excluded_* when failed
    detail: str = ""
    solver_stderr: str = ""  # the solver's last words, summarised, when it failed
    source_method: str | None = None  # for "cached": how the WCS was first obtained
    reference: str | None = None  # for "propagated": the frame whose WCS was used
    matched_stars: int | None = None
    solver: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # locale keys of warnings about this frame

    @property
    def ok(self) -> bool:
        return self.wcs is not None

    @property
    def report_detail(self) -> str:
        """``detail`` plus the solver's summarised stderr: what a report's exclusion entry shows."""
        return _failure_detail(self)

    @property
    def wcs_status(self) -> str:
        """The :attr:`FrameInfo.wcs_status` a frame gets from this outcome."""
        method = self.source_method if self.method == METHOD_CACHED else self.method
        return {METHOD_HEADER: "valid", METHOD_PROPAGATED: "propagated"}.get(method or "", "solved")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the WCS as header cards, SIP included)."""
        return {
            "path": str(self.path),
            "method": self.method,
            "source_method": self.source_method,
            "wcs": wcs_to_dict(self.wcs) if self.wcs is not None else None,
            "residual_px": None if self.residual_px is None else round(float(self.residual_px), 4),
            "matched_stars": self.matched_stars,
            "reference": self.reference,
            "solver": self.solver,
            "reason_key": self.reason_key,
            "detail": self.detail,
            "solver_stderr": self.solver_stderr,
            "seconds": round(float(self.seconds), 3),
            "warnings": list(self.warnings),
        }


@dataclass
class StarList:
    """Stars of one frame: 0-based pixel positions, sorted by decreasing flux."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    shape: tuple[int, int]  # (H, W) of the frame

    def __len__(self) -> int:
        return int(self.x.size)

    @property
    def xy(self) -> np.ndarray:
        return np.column_stack([self.x, self.y])


@dataclass(frozen=True)
class _Settings:
    timeout_s: float
    processes: int
    detect_threads: int
    scale_margin: float
    radius_deg: float
    blind_retry: bool
    downsample: int
    max_stars: int
    propagate: bool
    min_match: int
    max_rms_px: float
    write_to_inputs: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "_Settings":
        def get(key: str) -> Any:
            value = config.get(key)
            return SOLVE_DEFAULTS[key] if value is None else value

        cores = os.cpu_count() or 1
        processes = int(get("solver_processes")) or min(4, cores)
        workers = int(config.get("num_workers") or 0) or min(8, cores)
        return cls(
            timeout_s=max(0.001, float(get("solver_timeout_s"))),
            processes=max(1, processes),
            detect_threads=max(1, workers),
            scale_margin=min(0.9, max(0.0, float(get("solve_scale_margin")))),
            radius_deg=max(0.01, float(get("solve_search_radius_deg"))),
            blind_retry=bool(get("solve_blind_retry")),
            downsample=int(get("solve_downsample")),
            max_stars=max(MIN_STARS_TO_SOLVE, int(get("solve_max_stars"))),
            propagate=bool(get("solve_propagate")),
            min_match=max(3, int(get("propagate_min_stars"))),
            max_rms_px=float(get("propagate_max_rms_px")),
            write_to_inputs=bool(get("write_wcs_to_inputs")),
        )


# ============================================================================ solvers


def _config_value(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    return SOLVE_DEFAULTS.get(key) if value is None else value


def _tool_version(path: str, args: Sequence[str]) -> str:
    """The first version-looking token a tool prints, or "" (never raises, 10 s at most)."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return ""
    return _tool_version_of(path, stamp, tuple(args))


@functools.lru_cache(maxsize=16)
def _tool_version_of(path: str, stamp: int, args: tuple[str, ...]) -> str:
    # Keyed by the executable's mtime, so an upgraded tool is asked again.
    try:
        completed = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    text = f"{completed.stdout}\n{completed.stderr}"
    match = re.search(r"(?:version\s*(?:CLI-)?)?(\d+(?:\.\d+)+[\w.+-]*)", text, re.IGNORECASE)
    return match.group(1) if match else ""


def _which(explicit: str, names: Iterable[str]) -> str | None:
    if explicit:
        expanded = os.path.expanduser(explicit)
        if os.path.isfile(expanded) and os.access(expanded, os.X_OK):
            return expanded
        return shutil.which(expanded)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _system_index_dirs() -> list[str]:
    """Folders the system's astrometry.net config adds (``add_path``), then the usual defaults."""
    folders: list[str] = []
    for config_path in _ASTROMETRY_CONFIGS:
        try:
            lines = Path(config_path).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split("#", 1)[0].split()
            if len(parts) == 2 and parts[0] == "add_path":
                folders.append(parts[1])
    folders.extend(_ASTROMETRY_INDEX_DIRS)
    return list(dict.fromkeys(folders))


def _index_files(folder: str | Path) -> list[Path]:
    try:
        return sorted(p for p in Path(folder).expanduser().iterdir() if p.suffix.lower() == ".fits" and p.is_file())
    except OSError:
        return []


def _astrometry_net_solver(config: dict[str, Any]) -> SolverInfo | None:
    path = _which(str(_config_value(config, "solve_field_path") or ""), ("solve-field",))
    if path is None:
        return None
    version = _tool_version(path, ["--version"])
    wanted = str(_config_value(config, "astrometry_index_dir") or "")
    if wanted:
        folder = str(Path(wanted).expanduser())
        if _index_files(folder):
            return SolverInfo(SOLVER_ASTROMETRY_NET, path, version, folder)
        return SolverInfo(SOLVER_ASTROMETRY_NET, path, version, folder, False, f"no index files (*.fits) in {folder}")
    for folder in _system_index_dirs():
        if _index_files(folder):
            return SolverInfo(SOLVER_ASTROMETRY_NET, path, version, folder)
    return SolverInfo(
        SOLVER_ASTROMETRY_NET, path, version, None, False,
        "no index files found (install astrometry-data-tycho2 or set astrometry_index_dir)",
    )


def _astap_db_dir(explicit: str, executable: str) -> str | None:
    candidates = [explicit] if explicit else [str(Path(executable).resolve().parent), *_ASTAP_DB_DIRS]
    for folder in candidates:
        try:
            entries = list(Path(folder).expanduser().iterdir())
        except OSError:
            continue
        if any(entry.suffix.lower() in _ASTAP_DB_SUFFIXES for entry in entries):
            return str(Path(folder).expanduser())
    return None


def _astap_solver(config: dict[str, Any]) -> SolverInfo | None:
    path = _which(str(_config_value(config, "astap_path") or ""), _ASTAP_NAMES)
    if path is None:
        return None
    version = _tool_version(path, ["-h"])
    explicit = str(_config_value(config, "astap_db_dir") or "")
    folder = _astap_db_dir(explicit, path)
    if folder is None:
        where = explicit or "ASTAP's folder"
        problem = f"no star database (*.1476, *.290) in {where}"
        return SolverInfo(SOLVER_ASTAP, path, version, explicit or None, False, problem)
    return SolverInfo(SOLVER_ASTAP, path, version, folder)


def find_solvers(config: dict[str, Any] | None = None) -> list[SolverInfo]:
    """Plate solvers installed here (astrometry.net first, then ASTAP), usable or not.

    Paths come from ``solve_field_path``/``astap_path`` or the PATH; index files from
    ``astrometry_index_dir`` or the system's astrometry.net config; ASTAP's star database from
    ``astap_db_dir`` or its usual folders. A solver without index/database is listed with
    ``usable=False`` and a ``problem`` saying why (``zemosaic info`` shows it).
    """
    config = config or {}
    found = [_astrometry_net_solver(config), _astap_solver(config)]
    return [solver for solver in found if solver is not None]


def pick_solver(config: dict[str, Any], solvers: Sequence[SolverInfo] | None = None) -> SolverInfo | None:
    """The solver a run uses: the configured one (``solver``), or the first usable one for "auto"."""
    solvers = find_solvers(config) if solvers is None else solvers
    choice = str(_config_value(config, "solver"))
    for solver in solvers:
        if solver.usable and choice in ("auto", solver.name):
            return solver
    return None


# ============================================================================ stars


def detect_stars(info: FrameInfo, max_stars: int = 300, threshold_sigma: float = 5.0) -> StarList:
    """Stars of one frame, brightest first (raises :class:`FrameError` for unreadable pixels).

    The frame is loaded read-only (hot pixels fixed on the CFA, debayered) and summed to a
    luminance; ``sep`` models the background and extracts objects above ``threshold_sigma``
    (on 2x2-binned pixels for large frames: 4x less work, and a full frame still holds
    hundreds of stars), then positions are refined with windowed centroids on the full-resolution
    luminance. Objects touching the border, and elongated ones (trails, blends), are left out.
    """
    import sep

    data = load_frame(info, hot_pixel_correction=True)
    luminance = np.asarray(data, dtype=np.float32).sum(axis=0)
    invalid = ~np.isfinite(luminance)
    if invalid.any():
        luminance = np.where(invalid, 0.0, luminance).astype(np.float32)
    luminance = np.ascontiguousarray(luminance, dtype=np.float32)
    height, width = luminance.shape
    empty = np.zeros(0)
    factor = 2 if min(height, width) >= 800 else 1
    image, mask = _binned(luminance, factor), _binned(invalid, factor) if invalid.any() else None
    if mask is not None:
        mask = mask > 0
    box = int(max(16, min(64, min(image.shape) // 4)))
    background = sep.Background(image, mask=mask, bw=box, bh=box)
    back = background.back()
    residual = image - back
    noise = float(background.globalrms)
    if not noise > 0:
        return StarList(empty, empty, empty, (height, width))
    sep.set_extract_pixstack(max(300_000, image.size // 4))
    sep.set_sub_object_limit(4096)
    min_area = 5 if factor == 1 else 3
    try:
        objects = sep.extract(residual, threshold_sigma, err=noise, mask=mask, minarea=min_area, deblend_cont=0.005)
    except Exception:  # dense nebula overflowing sep's buffers: a higher threshold always fits
        objects = sep.extract(residual, 3 * threshold_sigma, err=noise, mask=mask, minarea=min_area)
    if len(objects) == 0:
        return StarList(empty, empty, empty, (height, width))
    x, y, flux = objects["x"], objects["y"], objects["flux"]
    a, b = objects["a"], objects["b"]
    rows, cols = image.shape
    keep = (flux > 0) & (b > 0) & (a < 3.0 * np.maximum(b, 1e-6)) & (a < 0.05 * max(rows, cols) + 3)
    keep &= (objects["flag"] & sep.OBJ_TRUNC) == 0
    keep &= (x > 2) & (x < cols - 3) & (y > 2) & (y < rows - 3)
    order = np.flatnonzero(keep)[np.argsort(-flux[keep], kind="stable")][:max_stars]
    if order.size == 0:
        return StarList(empty, empty, empty, (height, width))
    # Binned pixel i covers full-resolution pixels factor*i .. factor*i + factor - 1.
    x = factor * x[order].astype(np.float64) + (factor - 1) / 2.0
    y = factor * y[order].astype(np.float64) + (factor - 1) / 2.0
    flux = flux[order].astype(np.float64)
    if factor > 1:
        full_back = np.repeat(np.repeat(back / float(factor * factor), factor, axis=0), factor, axis=1)
        full_residual = luminance - _padded_to(full_back, luminance.shape)
    else:
        full_residual = residual
    return StarList(*_refine_positions(full_residual, x, y, flux), (height, width))


def _binned(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    rows, cols = image.shape[0] // factor, image.shape[1] // factor
    cut = image[: rows * factor, : cols * factor].astype(np.float32)
    return np.ascontiguousarray(cut.reshape(rows, factor, cols, factor).sum(axis=(1, 3)), dtype=np.float32)


def _padded_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    return np.pad(image, ((0, rows - image.shape[0]), (0, cols - image.shape[1])), mode="edge")


def _refine_positions(residual: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> tuple[np.ndarray, ...]:
    """Windowed centroids (sep.winpos) with a window matched to the stars' half-light radius."""
    import sep

    residual = np.ascontiguousarray(residual, dtype=np.float32)
    bright = slice(0, min(100, x.size))
    half_light, _ = sep.flux_radius(residual, x[bright], y[bright], np.full(x[bright].size, 6.0), 0.5, subpix=5)
    finite = half_light[np.isfinite(half_light) & (half_light > 0)]
    sigma = max(0.7, 2.0 / 2.35 * (float(np.median(finite)) if finite.size else 1.4))
    wx, wy, flags = sep.winpos(residual, x, y, sigma)
    better = (flags == 0) & np.isfinite(wx) & np.isfinite(wy) & (np.hypot(wx - x, wy - y) < 1.5)
    return np.where(better, wx, x), np.where(better, wy, y), flux


# ============================================================================ SIP-aware geometry


def _poly(matrix: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    total = np.zeros_like(u)
    for p in range(matrix.shape[0]):
        for q in range(matrix.shape[1] - p):
            if matrix[p, q]:
                total = total + matrix[p, q] * u**p * v**q
    return total


def _focal_offsets(wcs: Any, xy: np.ndarray) -> np.ndarray:
    """0-based pixels -> distortion-free offsets from CRPIX (the argument of the CD matrix)."""
    crpix0 = np.asarray(wcs.wcs.crpix, dtype=np.float64) - 1.0
    if wcs.sip is None:
        return xy - crpix0
    sip_crpix0 = np.asarray(wcs.sip.crpix, dtype=np.float64) - 1.0
    u = xy[:, 0] - sip_crpix0[0]
    v = xy[:, 1] - sip_crpix0[1]
    du = _poly(np.asarray(wcs.sip.a), u, v) if wcs.sip.a is not None else 0.0
    dv = _poly(np.asarray(wcs.sip.b), u, v) if wcs.sip.b is not None else 0.0
    return np.column_stack([u + du, v + dv]) + (sip_crpix0 - crpix0)


def _is_tan(wcs: Any) -> bool:
    ctype = [str(c).upper() for c in wcs.wcs.ctype]
    return len(ctype) == 2 and all(c[5:8] == "TAN" for c in ctype)


# ============================================================================ star matching


@dataclass
class StarMatch:
    """An affine map ``dst = A @ src + t`` between two star lists and the stars it pairs."""

    matrix: np.ndarray  # (2, 2)
    offset: np.ndarray  # (2,)
    src_index: np.ndarray
    dst_index: np.ndarray
    rms_px: float

    @property
    def n_matched(self) -> int:
        return int(self.src_index.size)

    def apply(self, xy: np.ndarray) -> np.ndarray:
        return xy @ self.matrix.T + self.offset


def _triangles(xy: np.ndarray, neighbours: int = 5, min_side: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each star with its nearest neighbours: (invariants (T, 2), vertices (T, 3)).

    Vertices are ordered by the length of the opposite side (shortest first), so the same
    triangle seen rotated and shifted lists its vertices in the same order.
    """
    from scipy.spatial import cKDTree

    n = len(xy)
    if n < 3:
        return np.zeros((0, 2)), np.zeros((0, 3), dtype=np.intp)
    k = min(neighbours + 1, n)
    _, near = cKDTree(xy).query(xy, k=k)
    combos = {c for row in np.atleast_2d(near) for c in itertools.combinations(sorted(int(i) for i in row), 3)}
    vertices = np.array(sorted(combos), dtype=np.intp)
    points = xy[vertices]
    opposite = np.stack(
        [
            np.hypot(*(points[:, 1] - points[:, 2]).T),
            np.hypot(*(points[:, 0] - points[:, 2]).T),
            np.hypot(*(points[:, 0] - points[:, 1]).T),
        ],
        axis=1,
    )
    order = np.argsort(opposite, axis=1, kind="stable")
    vertices = np.take_along_axis(vertices, order, axis=1)
    sides = np.take_along_axis(opposite, order, axis=1)
    good = (sides[:, 0] >= min_side) & (sides[:, 1] <= 8.0 * sides[:, 0])
    invariants = np.column_stack(
        [sides[:, 2] / np.maximum(sides[:, 1], 1e-9), sides[:, 1] / np.maximum(sides[:, 0], 1e-9)]
    )
    return invariants[good], vertices[good]


def _similarity_batch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares similarities (no reflection) mapping src (C, k, 2) onto dst: (a, b, rms).

    Complex form: dst ≈ a·src + b with a = scale·e^{iθ}.
    """
    zs = src[..., 0] + 1j * src[..., 1]
    zd = dst[..., 0] + 1j * dst[..., 1]
    cs = zs - zs.mean(axis=1, keepdims=True)
    cd = zd - zd.mean(axis=1, keepdims=True)
    a = (cd * np.conj(cs)).sum(axis=1) / np.maximum((np.abs(cs) ** 2).sum(axis=1), 1e-12)
    b = zd.mean(axis=1) - a * zs.mean(axis=1)
    residual = np.abs(a[:, None] * zs + b[:, None] - zd)
    return a, b, np.sqrt((residual**2).mean(axis=1))


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    design = np.column_stack([src, np.ones(len(src))])
    solution, *_ = np.linalg.lstsq(design, dst, rcond=None)
    return solution[:2].T, solution[2]


def _mutual_pairs(predicted: np.ndarray, dst_tree: Any, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src index, dst index, distance) of nearest neighbours within ``radius``, one per dst star."""
    distance, index = dst_tree.query(predicted, k=1, distance_upper_bound=radius)
    found = np.isfinite(distance)
    src_index = np.flatnonzero(found)
    dst_index = index[found]
    distance = distance[found]
    order = np.argsort(distance, kind="stable")
    _, first = np.unique(dst_index[order], return_index=True)
    chosen = order[first]
    return src_index[chosen], dst_index[chosen], distance[chosen]


def match_star_lists(
    src_xy: np.ndarray,
    dst_xy: np.ndarray,
    *,
    max_scale_change: float = 0.05,
    tolerance_px: float = 2.0,
    n_bright: int = 40,
) -> StarMatch | None:
    """Find the affine map taking ``src_xy`` stars onto ``dst_xy`` stars (rotation, shift, any place).

    Triangles of bright stars with their neighbours are compared by shape invariants; each
    pair of similar triangles proposes a similarity, which must keep the scale within
    ``max_scale_change`` (same optics) and is scored by how many bright stars it puts within
    ``tolerance_px`` of a star. The best one seeds an iterated affine least-squares fit on all
    stars with 3-sigma clipping. Returns None when nothing consistent is found.
    """
    from scipy.spatial import cKDTree

    src_xy = np.asarray(src_xy, dtype=np.float64).reshape(-1, 2)
    dst_xy = np.asarray(dst_xy, dtype=np.float64).reshape(-1, 2)
    if len(src_xy) < 3 or len(dst_xy) < 3:
        return None
    src_bright, dst_bright = src_xy[:n_bright], dst_xy[: int(n_bright * 1.5)]
    src_inv, src_tri = _triangles(src_bright)
    dst_inv, dst_tri = _triangles(dst_bright)
    if len(src_inv) == 0 or len(dst_inv) == 0:
        return None
    candidates = cKDTree(dst_inv).query_ball_point(src_inv, r=0.015)
    pairs = np.array([(i, j) for i, hits in enumerate(candidates) for j in hits], dtype=np.intp).reshape(-1, 2)
    if len(pairs) == 0:
        return None
    a, b, fit_rms = _similarity_batch(src_bright[src_tri[pairs[:, 0]]], dst_bright[dst_tri[pairs[:, 1]]])
    plausible = (np.abs(np.abs(a) - 1.0) <= max_scale_change) & (fit_rms <= tolerance_px)
    a, b = a[plausible], b[plausible]
    if a.size == 0:
        return None
    if a.size > 3000:  # plenty: keep the best-fitting triangle pairs
        keep = np.argsort(fit_rms[plausible], kind="stable")[:3000]
        a, b = a[keep], b[keep]
    dst_tree = cKDTree(dst_xy)
    z_bright = src_bright[:, 0] + 1j * src_bright[:, 1]
    predicted = a[:, None] * z_bright[None, :] + b[:, None]
    distance, _ = dst_tree.query(np.column_stack([predicted.real.ravel(), predicted.imag.ravel()]), k=1,
                                 distance_upper_bound=tolerance_px)
    score = np.isfinite(distance).reshape(predicted.shape).sum(axis=1)
    best = int(np.argmax(score))
    if score[best] < 3:
        return None
    rotation = np.array([[a[best].real, -a[best].imag], [a[best].imag, a[best].real]])
    matrix, offset = rotation, np.array([b[best].real, b[best].imag])
    radius = tolerance_px
    src_index = dst_index = np.zeros(0, dtype=np.intp)
    rms = math.inf
    for _ in range(6):
        src_index, dst_index, _ = _mutual_pairs(src_xy @ matrix.T + offset, dst_tree, radius)
        if src_index.size < 3:
            return None
        matrix, offset = _fit_affine(src_xy[src_index], dst_xy[dst_index])
        errors = np.hypot(*(src_xy[src_index] @ matrix.T + offset - dst_xy[dst_index]).T)
        rms = float(np.sqrt(np.mean(errors**2)))
        clipped = errors <= max(3.0 * rms, 0.3)
        if not clipped.all() and clipped.sum() >= 3:
            src_index, dst_index = src_index[clipped], dst_index[clipped]
            matrix, offset = _fit_affine(src_xy[src_index], dst_xy[dst_index])
            errors = np.hypot(*(src_xy[src_index] @ matrix.T + offset - dst_xy[dst_index]).T)
            rms = float(np.sqrt(np.mean(errors**2)))
        new_radius = min(tolerance_px, max(4.0 * rms, 0.75))
        if abs(new_radius - radius) < 1e-3:
            break
        radius = new_radius
    return StarMatch(matrix, offset, src_index, dst_index, rms)


# ============================================================================ propagation


@dataclass
class Propagation:
    """Result of :func:`propagate_wcs` (``wcs`` None when rejected, ``detail`` says why)."""

    wcs: Any
    n_matched: int
    rms_px: float
    detail: str = ""


def _tangent_offsets_deg(crval: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Gnomonic (TAN) intermediate coordinates, degrees, of ``world`` about ``crval`` (wcslib)."""
    from astropy.wcs import WCS

    plane = WCS(naxis=2)
    plane.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    plane.wcs.crval = [float(crval[0]), float(crval[1])]
    plane.wcs.crpix = [1.0, 1.0]
    plane.wcs.cd = np.eye(2)
    return plane.wcs_world2pix(world, 1) - 1.0


def compose_wcs(reference: Any, matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, int]) -> tuple[Any, float]:
    """The WCS of a frame whose focal-plane offsets map onto ``reference``'s by ``u_ref = M u + t``.

    The frame keeps ``reference``'s SIP polynomial and CRPIX (same optics); CRVAL is the sky
    point of its CRPIX, and CD is fitted on a grid through the sky, in the tangent plane of the
    new CRVAL. Returns (wcs, worst grid error in pixels) -- the latter measures how far the
    composed map is from a TAN-SIP (it is ~1e-4 px for fields of a few degrees).
    """
    height, width = shape
    crpix0 = np.asarray(reference.wcs.crpix, dtype=np.float64) - 1.0
    gx, gy = np.meshgrid(np.linspace(0, width - 1, 9), np.linspace(0, height - 1, 9))
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    focal = _focal_offsets(reference, grid)  # same SIP for this frame
    world = reference.wcs_pix2world(focal @ matrix.T + offset + crpix0, 0)
    crval = reference.wcs_pix2world((offset + crpix0)[None, :], 0)[0]
    tangent = _tangent_offsets_deg(crval, world)
    cd_t, *_ = np.linalg.lstsq(focal, tangent, rcond=None)
    cd = cd_t.T
    error_px = float(np.max(np.abs(focal @ cd_t - tangent)) / np.sqrt(abs(np.linalg.det(cd))))

    wcs = reference.deepcopy()
    wcs.wcs.crval = [float(crval[0]) % 360.0, float(crval[1])]
    if wcs.wcs.has_cd():
        wcs.wcs.cd = cd
    else:  # PC + CDELT (or CROTA) in the reference: express the new matrix as PC with unit CDELT
        wcs.wcs.pc = cd
        wcs.wcs.cdelt = [1.0, 1.0]
    wcs.wcs.dateobs = ""
    wcs.wcs.mjdobs = float("nan")
    wcs.wcs.set()
    wcs.pixel_shape = (width, height)
    return wcs, error_px


def propagate_wcs(
    reference_wcs: Any,
    reference_stars: StarList,
    stars: StarList,
    *,
    min_stars: int = 15,
    max_rms_px: float = 0.5,
) -> Propagation:
    """Give a frame the WCS of a solved neighbour by matching their stars (same optics).

    Both star lists are taken through the neighbour's SIP to distortion-free offsets, matched
    with :func:`match_star_lists`, and the affine map is composed with the neighbour's WCS by
    :func:`compose_wcs`. Rejected (``wcs`` None) below ``min_stars`` matches or above
    ``max_rms_px`` RMS.
    """
    if not _is_tan(reference_wcs):
        return Propagation(None, 0, math.inf, "reference WCS is not TAN/TAN-SIP")
    if tuple(stars.shape) != tuple(reference_stars.shape):
        detail = f"frame size {stars.shape} differs from the reference {reference_stars.shape}"
        return Propagation(None, 0, math.inf, detail)
    if len(stars) < min_stars:
        return Propagation(None, len(stars), math.inf, f"{len(stars)} stars detected, {min_stars} needed")
    src = _focal_offsets(reference_wcs, stars.xy)
    dst = _focal_offsets(reference_wcs, reference_stars.xy)
    match = match_star_lists(src, dst)
    if match is None:
        return Propagation(None, 0, math.inf, "no star pattern in common with the reference")
    if match.n_matched < min_stars or not match.rms_px < max_rms_px:
        return Propagation(
            None, match.n_matched, match.rms_px,
            f"{match.n_matched} stars matched (>= {min_stars} needed), "
            f"RMS {match.rms_px:.3f} px (< {max_rms_px} needed)",
        )
    wcs, error_px = compose_wcs(reference_wcs, match.matrix, match.offset, stars.shape)
    if error_px > 0.05:
        return Propagation(None, match.n_matched, match.rms_px, f"composed WCS not TAN-SIP (error {error_px:.3f} px)")
    return Propagation(wcs, match.n_matched, match.rms_px)


# ============================================================================ processes


@dataclass
class _ProcessResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    cancelled: bool = False
    error: str = ""


def _run_process(
    argv: Sequence[str], timeout_s: float, cwd: Path, cancel: threading.Event | None = None
) -> _ProcessResult:
    """Run a solver; kill its whole process group at the deadline or on cancel."""
    options: dict[str, Any] = {}
    if os.name == "posix":
        options["start_new_session"] = True
    try:
        process = subprocess.Popen(
            list(argv), cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", **options,
        )
    except OSError as exc:
        return _ProcessResult(None, "", "", False, error=f"{type(exc).__name__}: {exc}")
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            stdout, stderr = process.communicate(timeout=max(0.0, min(0.25, remaining)))
            return _ProcessResult(process.returncode, stdout, stderr, False)
        except subprocess.TimeoutExpired:
            cancelled = cancel is not None and cancel.is_set()
            if time.monotonic() >= deadline or cancelled:
                _kill(process)
                stdout, stderr = process.communicate()
                return _ProcessResult(process.returncode, stdout or "", stderr or "", not cancelled, cancelled)


def _kill(process: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows
            process.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass


def summarise_output(*texts: str, max_chars: int = 400) -> str:
    """The solver's last meaningful lines, joined with ' | ', at most ``max_chars``."""
    lines = [line.strip() for text in texts for line in (text or "").splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("-=+* ")]
    summary = " | ".join(lines[-4:])
    return summary if len(summary) <= max_chars else "..." + summary[-(max_chars - 3):]


# ============================================================================ one direct solve


@dataclass
class _Hints:
    ra_deg: float | None
    dec_deg: float | None
    radius_deg: float
    scale_arcsec: float | None
    scale_margin: float
    shape: tuple[int, int]
    downsample: int = 0

    @property
    def has_position(self) -> bool:
        return self.ra_deg is not None and self.dec_deg is not None

    def blind(self) -> "_Hints":
        return dataclasses.replace(self, ra_deg=None, dec_deg=None)

    def scale_range(self) -> tuple[float, float]:
        from .frames import MAX_PIXEL_SCALE_ARCSEC, MIN_PIXEL_SCALE_ARCSEC

        if not self.scale_arcsec:
            return MIN_PIXEL_SCALE_ARCSEC, MAX_PIXEL_SCALE_ARCSEC
        return self.scale_arcsec * (1.0 - self.scale_margin), self.scale_arcsec * (1.0 + self.scale_margin)


@dataclass
class _DirectResult:
    wcs: Any = None
    residual_px: float | None = None
    n_matched: int | None = None
    reason_key: str | None = None
    detail: str = ""
    stderr: str = ""
    seconds: float = 0.0
    blind_retry: bool = False


def _hints_for(info: FrameInfo, settings: _Settings) -> _Hints:
    return _Hints(
        info.ra_deg, info.dec_deg, settings.radius_deg, info.header_scale_arcsec, settings.scale_margin,
        tuple(info.shape), settings.downsample,  # type: ignore[arg-type]
    )


def build_solve_field_command(
    solver: SolverInfo, xylist: Path, hints: _Hints, work_dir: Path, backend_config: Path, timeout_s: float
) -> list[str]:
    """``solve-field`` on a star list: hints, SIP order 2, CRPIX at the centre, only a .wcs/.corr out."""
    height, width = hints.shape
    low, high = hints.scale_range()
    argv = [
        solver.path, str(xylist),
        "--width", str(width), "--height", str(height),
        "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX",
        "--scale-units", "arcsecperpix", "--scale-low", f"{low:.6g}", "--scale-high", f"{high:.6g}",
        "--crpix-center", "--tweak-order", "2", "--parity", "pos",
        "--no-plots", "--overwrite", "--no-remove-lines", "--uniformize", "0",
        "--dir", str(work_dir), "--temp-dir", str(work_dir), "--out", "solution",
        "--config", str(backend_config), "--cpulimit", str(max(1, int(math.ceil(timeout_s)))),
        "--new-fits", "none", "--index-xyls", "none", "--rdls", "none", "--match", "none",
        "--solved", "none", "--axy", "none", "--corr", "solution.corr", "--wcs", "solution.wcs",
    ]
    if hints.has_position:
        argv += ["--ra", f"{hints.ra_deg:.8f}", "--dec", f"{hints.dec_deg:.8f}", "--radius", f"{hints.radius_deg:.6g}"]
    return argv


def _write_xylist(path: Path, stars: StarList) -> None:
    """astrometry.net xylist: FITS pixel convention (first pixel centred on 1, 1)."""
    from astropy.io import fits

    columns = [
        fits.Column("X", "D", array=stars.x + 1.0),
        fits.Column("Y", "D", array=stars.y + 1.0),
        fits.Column("FLUX", "D", array=stars.flux),
    ]
    table = fits.BinTableHDU.from_columns(columns)
    table.header["IMAGEW"] = stars.shape[1]
    table.header["IMAGEH"] = stars.shape[0]
    table.writeto(path, overwrite=True)


def _read_header_file(path: Path) -> Any:
    """A FITS header stored alone (80-column cards, with or without newlines)."""
    from astropy.io import fits

    raw = path.read_bytes().decode("ascii", errors="replace")
    if "\n" in raw.rstrip("\n"):
        return fits.Header.fromstring("\n".join(line.rstrip("\r") for line in raw.splitlines()), sep="\n")
    return fits.Header.fromstring(raw)


def _accept_solution(header: Any, shape: tuple[int, int]) -> tuple[Any, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs, status, _, detail = validate_wcs(header, shape)
    return (wcs, "") if status == "valid" else (None, detail or status)


def _read_corr(corr_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(field xy 0-based (N, 2), catalog RA/Dec (N, 2)) of the stars the solver paired, or None."""
    from astropy.io import fits

    try:
        table = fits.getdata(corr_path, 1)
        field_xy = np.column_stack([table["field_x"], table["field_y"]]).astype(np.float64) - 1.0
        sky = np.column_stack([table["index_ra"], table["index_dec"]]).astype(np.float64)
    except Exception:  # no .corr (older versions): keep the solver's own fit
        return None
    return field_xy, sky


def _poly_terms(u: np.ndarray, v: np.ndarray, order: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    powers = [(p, q) for total in range(order + 1) for p in range(total, -1, -1) for q in [total - p]]
    return np.column_stack([u**p * v**q for p, q in powers]), powers


def refit_tan_sip(
    wcs: Any, field_xy: np.ndarray, sky: np.ndarray, shape: tuple[int, int], order: int = 2, clip: float = 3.0
) -> tuple[Any, float, int] | None:
    """Refit a TAN-SIP of ``order`` to star pairs, rejecting outliers; (wcs, RMS px, stars kept).

    CRPIX stays where ``wcs`` has it. In the tangent plane of CRVAL the model is a full
    polynomial of the pixel offsets (the CD matrix times pixel + SIP), so each iteration is a
    linear least-squares fit; CRVAL is moved onto the fitted constant term, and pairs further
    than ``clip`` RMS (at least 0.25 px) are dropped -- solver pairings include unresolved
    double stars whose centroid sits between the two catalog stars. None when too few pairs.
    """
    from astropy.wcs import WCS
    from astropy.wcs import Sip

    n_terms = (order + 1) * (order + 2) // 2
    if len(field_xy) < n_terms + 4:
        return None
    crpix = np.asarray(wcs.wcs.crpix, dtype=np.float64)
    crval = np.asarray(wcs.wcs.crval, dtype=np.float64)
    scale_deg = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    u, v = field_xy[:, 0] - (crpix[0] - 1.0), field_xy[:, 1] - (crpix[1] - 1.0)
    design, powers = _poly_terms(u, v, order)
    keep = np.ones(len(field_xy), dtype=bool)
    coefficients = np.zeros((len(powers), 2))
    rms = math.inf
    for _ in range(8):
        tangent = _tangent_offsets_deg(crval, sky)
        coefficients, *_ = np.linalg.lstsq(design[keep], tangent[keep], rcond=None)
        errors = np.hypot(*(design @ coefficients - tangent).T) / scale_deg
        rms = float(np.sqrt(np.mean(errors[keep] ** 2)))
        # Put CRVAL on the fitted constant term (the sky point of CRPIX), so the SIP has no A_0_0.
        plane_offset = coefficients[0]
        if np.hypot(*plane_offset) > 1e-9:
            crval = _tangent_to_world(crval, plane_offset)
            continue
        new_keep = errors <= max(clip * rms, 0.25)
        if np.array_equal(new_keep, keep):
            break
        if new_keep.sum() < n_terms + 4:
            return None
        keep = new_keep
    cd = coefficients[1:3].T  # d(tangent)/d(u, v)
    if not abs(np.linalg.det(cd)) > 0:
        return None
    inverse_cd = np.linalg.inv(cd)
    a = np.zeros((order + 1, order + 1))
    b = np.zeros((order + 1, order + 1))
    for row, (p, q) in enumerate(powers):
        if p + q >= 2:
            a[p, q], b[p, q] = inverse_cd @ coefficients[row]
    height, width = shape
    result = WCS(naxis=2)
    result.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    result.wcs.crpix = crpix
    result.wcs.crval = [float(crval[0]) % 360.0, float(crval[1])]
    result.wcs.cd = cd
    result.wcs.radesys = "ICRS"
    ap, bp = _inverse_sip(a, b, shape, crpix, order + 1)
    result.sip = Sip(a, b, ap, bp, crpix)
    result.wcs.set()
    result.pixel_shape = (width, height)
    return result, rms, int(keep.sum())


def _tangent_to_world(crval: np.ndarray, offset_deg: np.ndarray) -> np.ndarray:
    from astropy.wcs import WCS

    plane = WCS(naxis=2)
    plane.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    plane.wcs.crval = [float(crval[0]), float(crval[1])]
    plane.wcs.crpix = [1.0, 1.0]
    plane.wcs.cd = np.eye(2)
    return plane.wcs_pix2world(np.asarray(offset_deg, dtype=np.float64)[None, :] + 1.0, 1)[0]


def _inverse_sip(
    a: np.ndarray, b: np.ndarray, shape: tuple[int, int], crpix: np.ndarray, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """AP/BP of ``order`` fitted on a grid over the frame (and a margin) to invert A/B."""
    height, width = shape
    gx, gy = np.meshgrid(np.linspace(-0.05 * width, 1.05 * width, 24), np.linspace(-0.05 * height, 1.05 * height, 24))
    u, v = gx.ravel() - (crpix[0] - 1.0), gy.ravel() - (crpix[1] - 1.0)
    fu, fv = u + _poly(a, u, v), v + _poly(b, u, v)
    design, powers = _poly_terms(fu, fv, order)
    coefficients, *_ = np.linalg.lstsq(design, np.column_stack([u - fu, v - fv]), rcond=None)
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    for row, (p, q) in enumerate(powers):
        ap[p, q], bp[p, q] = coefficients[row]
    return ap, bp


def _solve_field_once(
    solver: SolverInfo, stars: StarList, hints: _Hints, work_dir: Path, timeout_s: float, cancel: threading.Event
) -> _DirectResult:
    work_dir.mkdir(parents=True, exist_ok=True)
    xylist = work_dir / "stars.xyls"
    _write_xylist(xylist, stars)
    backend = work_dir / "backend.cfg"
    backend.write_text(
        f"cpulimit {max(1, int(math.ceil(timeout_s)))}\nadd_path {solver.index_dir}\nautoindex\n", encoding="utf-8"
    )
    argv = build_solve_field_command(solver, xylist, hints, work_dir, backend, timeout_s)
    started = time.perf_counter()
    process = _run_process(argv, timeout_s, work_dir, cancel)
    seconds = time.perf_counter() - started
    stderr = summarise_output(process.stderr, process.stdout)
    if process.error:
        return _DirectResult(reason_key=REASON_SOLVER_ERROR, detail=process.error, seconds=seconds)
    if process.timed_out or process.cancelled:
        return _DirectResult(reason_key=REASON_SOLVE_TIMEOUT, detail=f"{timeout_s:g} s", stderr=stderr, seconds=seconds)
    solution = work_dir / "solution.wcs"
    if not solution.exists():
        if process.returncode not in (0, None):
            return _DirectResult(reason_key=REASON_SOLVER_ERROR, detail=f"exit code {process.returncode}",
                                 stderr=stderr, seconds=seconds)
        if "cpu time limit" in (process.stdout + process.stderr).lower():
            return _DirectResult(reason_key=REASON_SOLVE_TIMEOUT, detail=f"{timeout_s:g} s", stderr=stderr,
                                 seconds=seconds)
        return _DirectResult(reason_key=REASON_SOLVE_FAILED, detail="no solution", stderr=stderr, seconds=seconds)
    wcs, problem = _accept_solution(_read_header_file(solution), hints.shape)
    if wcs is None:
        return _DirectResult(reason_key=REASON_BAD_SOLUTION, detail=problem, stderr=stderr, seconds=seconds)
    pairs = _read_corr(work_dir / "solution.corr")
    refit = refit_tan_sip(wcs, *pairs, hints.shape) if pairs is not None else None
    if refit is None:
        return _DirectResult(wcs, None, None if pairs is None else len(pairs[0]), seconds=seconds)
    refined, problem = _accept_solution(refit[0].to_header(relax=True), hints.shape)
    if refined is None:
        return _DirectResult(wcs, None, len(pairs[0]), seconds=seconds)  # type: ignore[index]
    return _DirectResult(refined, refit[1], refit[2], seconds=seconds)


def build_astap_command(solver: SolverInfo, image: Path, out_base: Path, hints: _Hints) -> list[str]:
    """ASTAP command line: image, output base, hints (RA in hours, south-pole distance), .wcs + SIP."""
    height, _ = hints.shape
    argv = [solver.path, "-f", str(image), "-o", str(out_base), "-wcs", "-sip", "-z", str(int(hints.downsample))]
    if hints.scale_arcsec:
        argv += ["-fov", f"{hints.scale_arcsec * height / 3600.0:.6g}"]
    else:
        argv += ["-fov", "0"]
    if hints.has_position:
        argv += ["-ra", f"{(hints.ra_deg or 0.0) / 15.0:.8f}", "-spd", f"{(hints.dec_deg or 0.0) + 90.0:.8f}",
                 "-r", f"{hints.radius_deg:.6g}"]
    else:
        argv += ["-r", "180"]
    if solver.index_dir:
        argv += ["-d", str(solver.index_dir)]
    return argv


def _read_ini(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            values[key.strip().upper()] = value.strip().strip('"')
    return values


def parse_astap_output(out_base: Path, shape: tuple[int, int]) -> tuple[Any, str]:
    """(WCS or None, detail) from ASTAP's ``<out_base>.ini`` and ``<out_base>.wcs``.

    ``PLTSOLVD=T`` is the sign of success (some versions exit 0 on failure); the WCS comes
    from the ``.wcs`` header file (SIP included when ASTAP wrote it) or else from the
    ``.ini`` keywords. On failure ``detail`` holds ASTAP's ERROR/WARNING text.
    """
    from astropy.io import fits

    ini_path = Path(f"{out_base}.ini")
    wcs_path = Path(f"{out_base}.wcs")
    if not ini_path.exists():
        return None, "ASTAP wrote no .ini file"
    values = _read_ini(ini_path)
    if values.get("PLTSOLVD", "F").upper() not in ("T", "TRUE", "1"):
        detail = "; ".join(v for v in (values.get("ERROR", ""), values.get("WARNING", "")) if v)
        return None, detail or "no solution"
    if wcs_path.exists():
        header = _read_header_file(wcs_path)
    else:
        header = fits.Header()
        header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
        for key in ("CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "CDELT1", "CDELT2",
                    "CROTA1", "CROTA2"):
            if key in values:
                header[key] = float(values[key])
    wcs, problem = _accept_solution(header, shape)
    return (wcs, "") if wcs is not None else (None, f"unusable solution: {problem}")


def _write_luminance_fits(path: Path, info: FrameInfo, hints: _Hints) -> None:
    """A 16-bit luminance copy for ASTAP (the input file itself is never handed to a solver)."""
    from astropy.io import fits

    data = np.asarray(load_frame(info, hot_pixel_correction=True), dtype=np.float32).sum(axis=0)
    finite = np.isfinite(data)
    low, high = np.percentile(data[finite], [0.1, 99.99]) if finite.any() else (0.0, 1.0)
    scaled = np.clip((np.where(finite, data, low) - low) / max(high - low, 1e-6) * 60000.0, 0, 65535)
    hdu = fits.PrimaryHDU(scaled.astype(np.uint16))
    if hints.scale_arcsec:
        hdu.header["XPIXSZ"] = (info.pixel_um or 0.0)
        hdu.header["FOCALLEN"] = (info.focal_mm or 0.0)
    hdu.writeto(path, overwrite=True)


def _astap_once(
    solver: SolverInfo, info: FrameInfo, hints: _Hints, work_dir: Path, timeout_s: float, cancel: threading.Event
) -> _DirectResult:
    work_dir.mkdir(parents=True, exist_ok=True)
    image = work_dir / "luminance.fits"
    if not image.exists():
        _write_luminance_fits(image, info, hints)
    out_base = work_dir / "solution"
    for suffix in (".ini", ".wcs"):
        Path(f"{out_base}{suffix}").unlink(missing_ok=True)
    argv = build_astap_command(solver, image, out_base, hints)
    started = time.perf_counter()
    process = _run_process(argv, timeout_s, work_dir, cancel)
    seconds = time.perf_counter() - started
    stderr = summarise_output(process.stderr, process.stdout)
    if process.error:
        return _DirectResult(reason_key=REASON_SOLVER_ERROR, detail=process.error, seconds=seconds)
    if process.timed_out or process.cancelled:
        return _DirectResult(reason_key=REASON_SOLVE_TIMEOUT, detail=f"{timeout_s:g} s", stderr=stderr, seconds=seconds)
    if not Path(f"{out_base}.ini").exists():  # it crashed or is not ASTAP: a retry will not help
        code = process.returncode
        detail = _ASTAP_EXIT.get(code or 0, f"exit code {code}") + ", no .ini file written"
        return _DirectResult(reason_key=REASON_SOLVER_ERROR, detail=detail, stderr=stderr, seconds=seconds)
    wcs, detail = parse_astap_output(out_base, hints.shape)
    if wcs is None:
        code = process.returncode or 0
        reason = REASON_SOLVE_FAILED if code in (0, 1, 2) else REASON_SOLVER_ERROR
        if code == 2:
            reason = REASON_TOO_FEW_STARS
        detail = "; ".join(d for d in (detail, _ASTAP_EXIT.get(code, f"exit code {code}" if code else "")) if d)
        return _DirectResult(reason_key=reason, detail=detail, stderr=stderr, seconds=seconds)
    return _DirectResult(wcs, None, None, seconds=seconds)


def _solve_direct(
    solver: SolverInfo, info: FrameInfo, stars: StarList, settings: _Settings, work_dir: Path, cancel: threading.Event
) -> _DirectResult:
    """Hinted solve, then (if that fails for want of a match) one retry without the position hint."""
    hints = _hints_for(info, settings)
    attempts = [hints]
    if hints.has_position and settings.blind_retry:
        attempts.append(hints.blind())
    result = _DirectResult(reason_key=REASON_SOLVE_FAILED)
    total = 0.0
    try:
        for number, attempt in enumerate(attempts):
            if cancel.is_set():
                break
            if solver.name == SOLVER_ASTAP:
                result = _astap_once(solver, info, attempt, work_dir / f"try{number}", settings.timeout_s, cancel)
            else:
                result = _solve_field_once(
                    solver, stars, attempt, work_dir / f"try{number}", settings.timeout_s, cancel
                )
            total += result.seconds
            result.blind_retry = number > 0
            if result.wcs is not None or result.reason_key != REASON_SOLVE_FAILED:
                break  # solved, or a failure a retry cannot fix (timeout, crash, too few stars)
    except FrameError as exc:
        result = _DirectResult(reason_key=exc.reason_key, detail=exc.detail)
    except Exception as exc:  # a solver output we could not read: this frame fails, the others go on
        result = _DirectResult(reason_key=REASON_SOLVER_ERROR, detail=f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result.seconds = total
    return result


# ============================================================================ cache


def wcs_cache_key(path: str | os.PathLike[str], hdu_index: int = 0) -> str:
    """Identity of a frame's content: BLAKE2b of the file's bytes (+ the image HDU index)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"/hdu{int(hdu_index)}".encode())
    return digest.hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "wcs" / f"{key}.json"


def _cache_load(cache_dir: Path, key: str, shape: tuple[int, int]) -> dict[str, Any] | None:
    path = _cache_path(cache_dir, key)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if document.get("format") != CACHE_FORMAT or document.get("version") != CACHE_VERSION:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = wcs_from_dict(document["wcs"], shape)
            centre = wcs.all_pix2world([[(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0]], 0)
    except Exception:  # a damaged entry is ignored (and replaced by a new solve)
        return None
    if not wcs.has_celestial or not np.all(np.isfinite(centre)):
        return None
    document["wcs_object"] = wcs.celestial if wcs.naxis > 2 else wcs
    return document


def _cache_store(cache_dir: Path, key: str, outcome: SolveOutcome) -> None:
    folder = cache_dir / "wcs"
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "path": str(outcome.path),
        "method": outcome.method,
        "residual_px": outcome.residual_px,
        "matched_stars": outcome.matched_stars,
        "reference": outcome.reference,
        "solver": outcome.solver,
        "wcs": wcs_to_dict(outcome.wcs),
    }
    temporary = folder / f".{key}.{os.getpid()}.{threading.get_ident()}.part"
    temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, _cache_path(cache_dir, key))


# ============================================================================ the run


def frame_with_wcs(info: FrameInfo, wcs: Any, status: str = "solved") -> FrameInfo:
    """A copy of ``info`` carrying ``wcs`` (status "solved", "propagated" or "valid"), without the
    resume digest a reader may have computed with the former one (``FrameInfo.resume_token``)."""
    wcs = copy.deepcopy(wcs)
    wcs.pixel_shape = (info.shape[1], info.shape[0])
    return dataclasses.replace(info, wcs=wcs, wcs_status=status, wcs_reason=None, wcs_detail="", resume_token=None)


def _separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = (math.radians(v) for v in (ra1, dec1, ra2, dec2))
    value = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(value))))


@dataclass
class _Cluster:
    members: list[int]  # frame indices needing a WCS, in input order
    hinted: bool
    reference: int | None = None  # a frame with a WCS (header or just solved)
    anchor_queue: list[int] = field(default_factory=list)
    anchors_failed: int = 0
    last_failure: str = ""
    waiting: list[int] = field(default_factory=list)  # members waiting for the reference


def _cluster_frames(frames: Sequence[FrameInfo], todo: list[int]) -> list[_Cluster]:
    """Group frames by header pointing; frames without RA/DEC form one cluster of their own."""
    clusters: list[_Cluster] = []
    seeds: list[tuple[float, float, float]] = []  # (ra, dec, radius)
    no_hint: list[int] = []
    for index in todo:
        info = frames[index]
        if info.ra_deg is None or info.dec_deg is None:
            no_hint.append(index)
            continue
        for number, (ra, dec, radius) in enumerate(seeds):
            if _separation_deg(ra, dec, info.ra_deg, info.dec_deg) <= radius:
                clusters[number].members.append(index)
                break
        else:
            scale = info.header_scale_arcsec
            side_deg = scale * min(info.shape) / 3600.0 if scale else 0.4
            seeds.append((info.ra_deg, info.dec_deg, 0.25 * side_deg))
            clusters.append(_Cluster([index], True))
    if no_hint:
        clusters.append(_Cluster(no_hint, False))
    return clusters


def _reference_for(cluster: _Cluster, frames: Sequence[FrameInfo], header_frames: list[int]) -> int | None:
    """A frame with a header WCS whose centre lies in this cluster (same size), if any."""
    if not cluster.hinted:
        return None
    first = frames[cluster.members[0]]
    assert first.ra_deg is not None and first.dec_deg is not None
    scale = first.header_scale_arcsec
    radius = 0.25 * (scale * min(first.shape) / 3600.0 if scale else 0.4)
    for index in header_frames:
        info = frames[index]
        centre = info.centre
        if centre and tuple(info.shape) == tuple(first.shape) and _is_tan(info.wcs):
            if _separation_deg(centre[0], centre[1], first.ra_deg, first.dec_deg) <= radius:
                return index
    return None


class _SolveRun:
    """State of one :func:`solve_missing` call (nothing outlives it)."""

    def __init__(
        self, frames: Sequence[FrameInfo], config: dict[str, Any], cache_dir: Path, reporter: Reporter,
        executor: Any = None,
    ) -> None:
        from .distributed import solve_options

        self.frames = list(frames)
        self.config = config
        self.settings = _Settings.from_config(config)
        # On a scheduler each direct solve is a task (engine/distributed.py); else solver processes here.
        remote_solve, remote_slots = solve_options(executor, config)
        self.solve_direct = remote_solve or _solve_direct
        self.solve_slots = remote_slots or self.settings.processes
        self.cache_dir = Path(cache_dir)
        self.reporter = reporter
        self.outcomes: dict[int, SolveOutcome] = {}
        self.stars: dict[int, StarList] = {}
        self.keys: dict[int, str] = {}
        self.wcs: dict[int, Any] = {}
        self.cancel = threading.Event()
        self.solver: SolverInfo | None = None
        self.no_solver_detail = ""
        self.total = 0
        self.done = 0
        self.started = time.perf_counter()

    # -- bookkeeping ---------------------------------------------------------------------------
    def finish(self, index: int, outcome: SolveOutcome) -> None:
        self.outcomes[index] = outcome
        path = str(outcome.path)
        if outcome.method == METHOD_FAILED:
            self.reporter.warning(outcome.reason_key or REASON_SOLVE_FAILED, path=path, detail=_failure_detail(outcome))
        else:
            self.wcs[index] = outcome.wcs
            if outcome.method in (METHOD_SOLVED, METHOD_PROPAGATED):
                self._store(index, outcome)
                self._write_input(index, outcome)
            if outcome.method == METHOD_SOLVED:
                self.reporter.info("solve_info_solved", path=path, residual=_fmt(outcome.residual_px),
                                   stars=outcome.matched_stars or 0, seconds=round(outcome.seconds, 2))
            elif outcome.method == METHOD_PROPAGATED:
                self.reporter.debug("solve_debug_propagated", path=path, reference=outcome.reference or "",
                                    stars=outcome.matched_stars or 0, residual=_fmt(outcome.residual_px))
        self.done += 1
        self.reporter.progress("P1", self.done, self.total, "progress_solve")

    def _store(self, index: int, outcome: SolveOutcome) -> None:
        key = self.keys.get(index)
        if key is None:
            return
        try:
            _cache_store(self.cache_dir, key, outcome)
        except OSError as exc:
            self.reporter.warning("solve_warn_cache_write", path=str(self.cache_dir / "wcs"), detail=str(exc))

    def _write_input(self, index: int, outcome: SolveOutcome) -> None:
        if not self.settings.write_to_inputs:
            return
        info = self.frames[index]
        try:
            write_wcs_to_input(info, outcome.wcs)
        except Exception as exc:  # opt-in convenience: a read-only input only earns a warning
            self.reporter.warning("solve_warn_write_input_failed", path=str(info.path), detail=str(exc))
        else:
            self.reporter.info("solve_info_wrote_input", path=str(info.path))

    def failed(self, index: int, reason_key: str, detail: str, **extra: Any) -> SolveOutcome:
        return SolveOutcome(Path(self.frames[index].path), METHOD_FAILED, None, reason_key=reason_key, detail=detail,
                            solver=self.solver.name if self.solver else None, **extra)

    # -- the generator ---------------------------------------------------------------------------
    def run(self) -> Generator[Event, None, list[SolveOutcome]]:
        reporter = self.reporter
        todo: list[int] = []
        header_frames: list[int] = []
        for index, info in enumerate(self.frames):
            if info.wcs is not None:
                self.outcomes[index] = SolveOutcome(Path(info.path), METHOD_HEADER, info.wcs)
                self.wcs[index] = info.wcs
                header_frames.append(index)
            else:
                todo.append(index)
        if not todo:
            return self.ordered()
        self.total = len(todo)
        todo = yield from self._use_cache(todo)
        if not todo:
            return self._summary()
        self.solver = pick_solver(self.config)
        if self.solver is None:
            self.no_solver_detail = self._no_solver_detail()
            reporter.error("solve_error_no_solver", count=len(todo), detail=self.no_solver_detail)
            if not (header_frames and self.settings.propagate):
                for index in todo:
                    self.finish(index, self.failed(index, REASON_NO_SOLVER, self.no_solver_detail))
                yield from reporter.pop_pending()
                return self._summary()
            # Frames with a header WCS can still lend it to their neighbours by star matching.
        else:
            reporter.info("solve_info_start", frames=len(todo), solver=self.solver.name,
                          version=self.solver.version or "?", processes=self.settings.processes)
        yield from reporter.pop_pending()
        try:
            yield from self._solve(todo, header_frames)
        finally:
            self.cancel.set()
        return self._summary()

    def _use_cache(self, todo: list[int]) -> Generator[Event, None, list[int]]:
        remaining: list[int] = []
        for index in todo:
            info = self.frames[index]
            try:
                key = wcs_cache_key(info.path, info.hdu_index)
            except OSError as exc:
                self.finish(index, self.failed(index, "frame_excluded_unreadable", f"{type(exc).__name__}: {exc}"))
                continue
            self.keys[index] = key
            document = _cache_load(self.cache_dir, key, tuple(info.shape))  # type: ignore[arg-type]
            if document is None:
                remaining.append(index)
                continue
            self.finish(index, SolveOutcome(
                Path(info.path), METHOD_CACHED, document["wcs_object"], residual_px=document.get("residual_px"),
                source_method=document.get("method"), reference=document.get("reference"),
                matched_stars=document.get("matched_stars"), solver=document.get("solver"),
            ))
        cached = len(todo) - len(remaining)
        if cached:
            self.reporter.info("solve_info_cached", count=cached, path=str(self.cache_dir / "wcs"))
        yield from self.reporter.pop_pending()
        return remaining

    def _no_solver_detail(self) -> str:
        found = find_solvers(self.config)
        return "; ".join(f"{s.name} ({s.path}): {s.problem}" for s in found if not s.usable) or "none found"

    # -- stars ---------------------------------------------------------------------------------------
    def _detect(self, indices: list[int]) -> Generator[Event, None, None]:
        if not indices:
            return
        max_stars = self.settings.max_stars
        with futures.ThreadPoolExecutor(max_workers=self.settings.detect_threads) as pool:
            jobs = {pool.submit(detect_stars, self.frames[i], max_stars): i for i in indices}
            try:
                for number, job in enumerate(futures.as_completed(jobs), start=1):
                    index = jobs[job]
                    try:
                        self.stars[index] = job.result()
                    except FrameError as exc:
                        if index in self.outcomes:  # a header frame: it only loses its reference role
                            continue
                        self.finish(index, self.failed(index, exc.reason_key, exc.detail))
                    except Exception as exc:  # sep on pathological data: the frame fails, the run goes on
                        if index not in self.outcomes:
                            detail = f"{type(exc).__name__}: {exc}"
                            self.finish(index, self.failed(index, "frame_excluded_unreadable", detail))
                    self.reporter.progress("P1", number, len(jobs), "progress_stars")
                    yield from self.reporter.pop_pending()
            finally:
                for job in jobs:
                    job.cancel()

    # -- solving ---------------------------------------------------------------------------------------
    def _solve(self, todo: list[int], header_frames: list[int]) -> Generator[Event, None, None]:
        settings = self.settings
        clusters = _cluster_frames(self.frames, todo) if settings.propagate else [
            _Cluster([index], self.frames[index].ra_deg is not None) for index in todo
        ]
        references = [_reference_for(cluster, self.frames, header_frames) if settings.propagate else None
                      for cluster in clusters]
        yield from self._detect(todo + sorted({r for r in references if r is not None}))
        for cluster, reference in zip(clusters, references):
            cluster.members = [i for i in cluster.members if i not in self.outcomes]
            if reference is not None and reference in self.stars:
                cluster.reference = reference
        work_root = self.cache_dir / "solve_tmp"
        work_root.mkdir(parents=True, exist_ok=True)
        direct = sum(1 for c in clusters if c.reference is None)
        self.reporter.info("solve_info_plan", frames=len(todo), clusters=len(clusters), anchors=direct)
        yield from self.reporter.pop_pending()

        pool = futures.ThreadPoolExecutor(max_workers=self.solve_slots)
        running: dict[futures.Future, tuple[int, _Cluster | None]] = {}

        def submit(index: int, cluster: _Cluster | None) -> None:
            if self.solver is None:
                job: futures.Future = futures.Future()
                job.set_result(_DirectResult(reason_key=REASON_NO_SOLVER, detail=self.no_solver_detail))
            else:
                work_dir = Path(tempfile.mkdtemp(prefix=f"f{index}_", dir=work_root))
                job = pool.submit(self.solve_direct, self.solver, self.frames[index], self.stars[index], settings,
                                  work_dir, self.cancel)
            running[job] = (index, cluster)

        try:
            for cluster in clusters:
                yield from self._start_cluster(cluster, submit)
            while running:
                finished, _ = futures.wait(list(running), timeout=0.5, return_when=futures.FIRST_COMPLETED)
                for job in finished:
                    index, cluster = running.pop(job)
                    result = job.result()
                    yield from self._direct_done(index, cluster, result, submit)
                if not finished:  # a heartbeat, so that a caller can cancel while solvers run
                    self.reporter.progress("P1", self.done, self.total, "progress_solve")
                yield from self.reporter.pop_pending()
        finally:
            self.cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(work_root, ignore_errors=True)

    def _solvable(self, index: int) -> bool:
        return index in self.stars and len(self.stars[index]) >= MIN_STARS_TO_SOLVE

    def _start_cluster(
        self, cluster: _Cluster, submit: Callable[[int, _Cluster | None], None]
    ) -> Generator[Event, None, None]:
        # Frames too poor in stars for any solver fail now, with the count found.
        for index in list(cluster.members):
            if not self._solvable(index) and index not in self.outcomes:
                found = len(self.stars[index]) if index in self.stars else 0
                detail = f"{found} stars detected, {MIN_STARS_TO_SOLVE} needed"
                self.finish(index, self.failed(index, REASON_TOO_FEW_STARS, detail))
        cluster.members = [i for i in cluster.members if i not in self.outcomes]
        if not cluster.members:
            return
        if cluster.reference is not None:
            yield from self._propagate_members(cluster, cluster.members, submit)
            return
        cluster.anchor_queue = sorted(cluster.members, key=lambda i: -len(self.stars[i]))[:MAX_ANCHOR_ATTEMPTS]
        cluster.waiting = [i for i in cluster.members if i != cluster.anchor_queue[0]]
        submit(cluster.anchor_queue.pop(0), cluster)
        yield from self.reporter.pop_pending()

    def _direct_done(
        self,
        index: int,
        cluster: _Cluster | None,
        result: _DirectResult,
        submit: Callable[[int, _Cluster | None], None],
    ) -> Generator[Event, None, None]:
        info = self.frames[index]
        outcome = self._outcome_from_direct(index, result)
        self.finish(index, outcome)
        if cluster is None:  # a frame solved on its own after its propagation was rejected
            return
        if outcome.ok:
            cluster.reference = index
            yield from self._propagate_members(cluster, [i for i in cluster.waiting if i not in self.outcomes], submit)
            cluster.waiting = []
            return
        cluster.anchors_failed += 1
        cluster.last_failure = f"{Path(info.path).name}: {_failure_detail(outcome)}"
        if not cluster.hinted:
            # Frames without pointing may lie anywhere: each is worth its own attempt.
            waiting, cluster.waiting = cluster.waiting, []
            if waiting:
                cluster.waiting = waiting[1:]
                submit(waiting[0], cluster)
            return
        queue = [i for i in cluster.anchor_queue if i not in self.outcomes]
        if queue and outcome.reason_key != REASON_NO_SOLVER:
            cluster.anchor_queue = queue[1:]
            cluster.waiting = [i for i in cluster.waiting if i != queue[0]]
            submit(queue[0], cluster)
            return
        for other in cluster.waiting:
            if other in self.outcomes:
                continue
            if outcome.reason_key == REASON_NO_SOLVER:
                self.finish(other, self.failed(other, REASON_NO_SOLVER, self.no_solver_detail))
            else:
                self.finish(other, self.failed(
                    other, REASON_SOLVE_FAILED,
                    f"not attempted: {cluster.anchors_failed} frames of the same pointing could not be solved "
                    f"(last: {cluster.last_failure})",
                ))
        cluster.waiting = []

    def _outcome_from_direct(self, index: int, result: _DirectResult) -> SolveOutcome:
        info = self.frames[index]
        solver = self.solver.name if self.solver else None
        if result.wcs is None:
            return self.failed(index, result.reason_key or REASON_SOLVE_FAILED, result.detail,
                               solver_stderr=result.stderr, seconds=result.seconds)
        outcome = SolveOutcome(Path(info.path), METHOD_SOLVED, result.wcs, residual_px=result.residual_px,
                               matched_stars=result.n_matched, solver=solver, seconds=result.seconds)
        centre = outcome.wcs.all_pix2world([[(info.shape[1] - 1) / 2.0, (info.shape[0] - 1) / 2.0]], 0)[0]
        if info.ra_deg is None or info.dec_deg is None:
            outcome.warnings.append("solve_info_no_hint")
            self.reporter.info("solve_info_no_hint", path=str(info.path))
        else:
            offset = _separation_deg(float(centre[0]), float(centre[1]), info.ra_deg, info.dec_deg)
            if result.blind_retry or offset > self.settings.radius_deg:
                outcome.warnings.append("solve_warn_hint_wrong")
                self.reporter.warning("solve_warn_hint_wrong", path=str(info.path), distance=round(offset, 3))
        return outcome

    def _propagate_members(
        self, cluster: _Cluster, members: list[int], submit: Callable[[int, _Cluster | None], None]
    ) -> Generator[Event, None, None]:
        reference = cluster.reference
        assert reference is not None
        ref_wcs, ref_stars = self.wcs[reference], self.stars.get(reference)
        for index in members:
            if index in self.outcomes or index == reference:
                continue
            started = time.perf_counter()
            if ref_stars is None:
                result = Propagation(None, 0, math.inf, "reference stars unavailable")
            else:
                result = propagate_wcs(ref_wcs, ref_stars, self.stars[index], min_stars=self.settings.min_match,
                                       max_rms_px=self.settings.max_rms_px)
            seconds = time.perf_counter() - started
            path = str(self.frames[index].path)
            if result.wcs is not None:
                self.finish(index, SolveOutcome(
                    Path(path), METHOD_PROPAGATED, result.wcs, residual_px=result.rms_px,
                    reference=str(self.frames[reference].path),
                    matched_stars=result.n_matched, solver="star-matching", seconds=seconds,
                ))
            else:
                self.reporter.info("solve_info_propagation_rejected", path=path,
                                   reference=str(self.frames[reference].path), detail=result.detail)
                submit(index, None)
            yield from self.reporter.pop_pending()

    # -- summary ---------------------------------------------------------------------------------------
    def ordered(self) -> list[SolveOutcome]:
        return [self.outcomes[i] for i in range(len(self.frames))]

    def _summary(self) -> list[SolveOutcome]:
        counts = {m: 0 for m in (METHOD_HEADER, METHOD_CACHED, METHOD_SOLVED, METHOD_PROPAGATED, METHOD_FAILED)}
        for outcome in self.outcomes.values():
            counts[outcome.method] += 1
        self.reporter.info(
            "solve_info_summary", header=counts[METHOD_HEADER], cached=counts[METHOD_CACHED],
            solved=counts[METHOD_SOLVED], propagated=counts[METHOD_PROPAGATED], failed=counts[METHOD_FAILED],
            seconds=round(time.perf_counter() - self.started, 1),
        )
        return self.ordered()


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _failure_detail(outcome: SolveOutcome) -> str:
    parts = [outcome.detail]
    if outcome.solver_stderr:
        parts.append(f"solver: {outcome.solver_stderr}")
    return " — ".join(p for p in parts if p)


def solve_missing(
    frames: Sequence[FrameInfo], config: dict[str, Any], cache_dir: str | os.PathLike[str], reporter: Reporter,
    executor: Any = None,
) -> Generator[Event, None, list[SolveOutcome]]:
    """Give every frame without a valid WCS one; yields events, returns one outcome per frame.

    ``cache_dir`` is the run's cache folder (``OUTPUT/.zemosaic_cache``): solved WCS go to
    ``cache_dir/wcs/`` and solver scratch files to ``cache_dir/solve_tmp/`` (removed at the end).
    Outcomes are in the order of ``frames``: "header" (it had one), "cached", "solved",
    "propagated" or "failed" (``reason_key``/``detail``/``solver_stderr`` say why). Progress:
    ``reporter.progress("P1", done, total, "progress_solve")`` per frame. Input files are only
    read (unless the opt-in ``write_wcs_to_inputs`` is set). With a run's ``executor``
    (engine/distributed.py) the direct solves are tasks on its scheduler.
    """
    run = _SolveRun(frames, config, Path(cache_dir), reporter, executor)
    outcomes = yield from run.run()
    yield from reporter.pop_pending()
    return outcomes


def write_wcs_to_input(info: FrameInfo, wcs: Any) -> None:
    """Opt-in (``write_wcs_to_inputs``): write the WCS cards into the input file's image header.

    Pixel data are left as stored (no rescaling); existing WCS keywords are replaced.
    """
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cards = wcs.to_header(relax=True)
        with fits.open(info.path, mode="update", do_not_scale_image_data=True, memmap=False) as hdul:
            header = hdul[info.hdu_index].header
            for key in list(header.keys()):
                if re.match(r"^(CD\d_\d|PC\d_\d|CDELT\d|CROTA\d|[AB]P?_\w+)$", key):
                    del header[key]
            for card in cards.cards:
                if card.keyword not in ("COMMENT", "HISTORY", "", "DATE-OBS", "MJD-OBS"):
                    header[card.keyword] = (card.value, card.comment)
            hdul.flush()


# ============================================================================ CLI


def user_cache_dir() -> Path:
    """The per-user cache folder (XDG on Linux, Caches on macOS, LOCALAPPDATA on Windows)."""
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "napari-zemosaic"


def _cli_config(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import apply_overrides, load_config, parse_set_option

    config = load_config(getattr(args, "config", None))
    overrides: dict[str, Any] = dict(parse_set_option(text) for text in getattr(args, "set", []) or [])
    if getattr(args, "lang", None):
        overrides["language"] = args.lang
    config = apply_overrides(config, overrides)
    # Keys not (yet) in config.OPTIONS are set after validation, so they always pass through.
    if getattr(args, "index_dir", None):
        config["astrometry_index_dir"] = str(Path(args.index_dir).expanduser())
    if getattr(args, "solver", None):
        config["solver"] = args.solver
    if getattr(args, "timeout", None):
        config["solver_timeout_s"] = float(args.timeout)
    return config


def cli_solve(args: argparse.Namespace) -> int:
    """Solve INPUT (a FITS file or a folder) and print per frame the method, WCS cards and residual.

    The solved WCS go to the cache (``--cache-dir``, ``cache_dir`` or the user cache); the
    inputs are not modified. Exit code 0 when at least one frame has a WCS, 2 otherwise.
    """
    from ..config import ConfigError
    from ..events import LogEvent
    from ..i18n import set_language, tr
    from .frames import read_frame_info, scan_inputs

    try:
        config = _cli_config(args)
    except ConfigError as exc:
        print(tr(exc.key, **exc.params), file=sys.stderr)
        return 2
    set_language(config.get("language") or "en")
    source = Path(args.input).expanduser()
    if source.is_dir():
        paths = scan_inputs(source)
    elif source.is_file():
        paths = [source]
    else:
        print(tr("input_error_missing", path=str(source)), file=sys.stderr)
        return 2
    cache_dir = Path(args.cache_dir or config.get("cache_dir") or user_cache_dir()).expanduser()

    def show(event: Event) -> None:
        if isinstance(event, LogEvent) and (event.level != "debug"):
            print(("! " if event.level in ("warning", "error") else "  ") + event.text(), file=sys.stderr)

    reporter = Reporter([show])
    frames: list[FrameInfo] = []
    unreadable: list[dict[str, Any]] = []
    for path in paths:
        try:
            frames.append(read_frame_info(path, auto_detect_seestar=bool(config.get("auto_detect_seestar", True)),
                                          force_seestar_mode=bool(config.get("force_seestar_mode", False))))
        except FrameError as exc:
            unreadable.append({"path": str(path), "method": METHOD_FAILED, "reason_key": exc.reason_key,
                               "detail": exc.detail, "wcs": None, "residual_px": None})
            reporter.warning(exc.reason_key, path=str(path), detail=exc.detail)
    generator = solve_missing(frames, config, cache_dir, reporter)
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            outcomes: list[SolveOutcome] = stop.value
            break
    rows = [outcome.to_dict() for outcome in outcomes] + unreadable
    if args.json:
        solvers = [s.to_dict() for s in find_solvers(config)]
        print(json.dumps({"solvers": solvers, "cache_dir": str(cache_dir / "wcs"), "frames": rows}, indent=2))
    else:
        for row in rows:
            _print_row(row, tr)
    return 0 if any(row["wcs"] for row in rows) else 2


def _print_row(row: dict[str, Any], tr: Callable[..., str]) -> None:
    name = Path(row["path"]).name
    if row["wcs"] is None:
        print(tr("solve_cli_failed", path=name, reason=tr(row["reason_key"], path=name, detail=row.get("detail", ""))))
        return
    method = row["method"] if row["method"] != METHOD_CACHED else f"cached ({row.get('source_method')})"
    print(tr("solve_cli_frame", path=name, method=method, residual=_fmt(row.get("residual_px")),
             stars=row.get("matched_stars") or "-"))
    for key, value in row["wcs"].items():
        print(f"    {key:8s} = {value!r}")

"""Configuration: defaults (each key documented), validation, JSON load/save, overrides.

A config is a plain ``dict`` so it travels to worker processes and into
``run_report.json`` unchanged. Unknown keys are kept (a newer or older version may
use them); known keys are validated and coerced, and a wrong value raises
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


class ConfigError(ValueError):
    """A user-caused configuration problem, carried as a locale key and its parameters."""

    def __init__(self, key: str, /, **params: Any) -> None:
        self.key = key
        self.params = params
        super().__init__(f"{key}: {params}")


@dataclass(frozen=True)
class Option:
    default: Any
    doc: str
    kind: str  # "bool" | "int" | "float" | "str" | "choice" | "list"
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def allowed(self) -> str:
        if self.kind == "choice":
            return ", ".join(str(c) for c in self.choices)
        if self.kind in ("int", "float"):
            low = ("-inf" if self.kind == "float" else -INT_LIMIT) if self.minimum is None else self.minimum
            high = ("inf" if self.kind == "float" else INT_LIMIT) if self.maximum is None else self.maximum
            return f"{self.kind} in [{low}, {high}]" + (", finite" if self.kind == "float" else "")
        return self.kind


#: Largest magnitude of an integer option: beyond it sizes and counts overflow C integers
#: downstream (a hostile or mistyped config must be refused here, not crash a run later).
INT_LIMIT = 2**31 - 1


def _choice(default: str, doc: str, *choices: str) -> Option:
    return Option(default, doc, "choice", tuple(choices))


OPTIONS: dict[str, Option] = {
    # --- general -------------------------------------------------------------------
    "language": _choice("en", "Language of messages, log and widgets.", "en", "fr"),
    "workflow": _choice(
        "auto",
        "auto: SDS if sds_mode and Seestar data, else Mosaic-First for Seestar, else classic.",
        "auto", "classic", "mosaic_first", "sds",
    ),
    "output_basename": Option("mosaic", "Base name of the output files (<base>_science.fits ...).", "str"),
    "auto_detect_seestar": Option(True, "Detect Seestar frames from INSTRUME/CREATOR/TELESCOP.", "bool"),
    "force_seestar_mode": Option(False, "Treat every frame as Seestar whatever its header says.", "bool"),
    "max_memory_mb": Option(0, "Host memory budget in MB for stacking blocks; 0 = half the available RAM.", "int", minimum=0),
    "cache_dir": Option("", "Where spill files go; empty = OUTPUT/.zemosaic_cache.", "str"),
    "num_workers": Option(0, "Threads for reading/reprojecting frames; 0 = number of CPU cores (max 8).", "int", minimum=0),
    # --- pixels ----------------------------------------------------------------------
    "hot_pixel_correction": Option(True, "Replace hot pixels on the CFA plane (per colour site) before debayering.", "bool"),
    "hot_pixel_sigma": Option(8.0, "A CFA pixel this many robust sigmas above its same-colour neighbours is hot.", "float", minimum=3.0),
    "debayer_method": _choice("bilinear", "CFA interpolation.", "bilinear"),
    # --- canvas and resampling ----------------------------------------------------------
    "canvas_padding_pct": Option(2.0, "Padding around the union of footprints, percent of the canvas size.", "float", minimum=0.0, maximum=100.0),
    "canvas_pixel_scale_arcsec": Option(0.0, "Canvas pixel scale; 0 = median of the frames.", "float", minimum=0.0),
    "canvas_orientation": _choice("north_up", "Canvas orientation.", "north_up"),
    "resample_method": _choice("bilinear", "Resampling kernel.", "bilinear", "bicubic", "lanczos3"),
    "control_grid_tolerance_px": Option(0.01, "Max error of the interpolated pixel mapping, in pixels.", "float", minimum=1e-5, maximum=0.5),
    "autocrop": Option(True, "Crop the final canvas to the covered area plus a margin.", "bool"),
    "autocrop_margin_px": Option(8, "Margin kept around the covered area when cropping.", "int", minimum=0),
    "min_coverage_keep": Option(0.0, "Mask final pixels whose coverage is below this fraction of the local expected coverage.", "float", minimum=0.0, maximum=1.0),
    # --- stacking ------------------------------------------------------------------------
    "stacking_normalize_method": _choice(
        "linear_fit", "Bring frames to one flux scale before combining.", "none", "sky_mean", "linear_fit",
    ),
    "stacking_weighting_method": _choice(
        "noise_variance",
        "Per-frame weights: 1/noise², or 1/noise² × (median FWHM / FWHM)².",
        "none", "noise_variance", "noise_fwhm",
    ),
    "stacking_rejection_algorithm": _choice(
        "kappa_sigma", "Per-pixel outlier rejection.", "none", "kappa_sigma", "winsorized_sigma_clip", "linear_fit_clip",
    ),
    "stacking_kappa_low": Option(3.0, "Lower rejection threshold in sigma.", "float", minimum=0.1),
    "stacking_kappa_high": Option(3.0, "Upper rejection threshold in sigma.", "float", minimum=0.1),
    "stacking_max_iterations": Option(5, "Iterations of the rejection loop.", "int", minimum=1, maximum=50),
    "stacking_winsor_sigma": Option(1.5, "Winsorisation clamp (sigma) used by winsorized_sigma_clip.", "float", minimum=0.5),
    "stacking_final_combine": _choice("mean", "How kept values are combined.", "mean", "median"),
    # --- frame quality ---------------------------------------------------------------------
    "quality_rejection": Option(True, "Reject cloudy, blurred, trailed or bright-sky frames automatically (rules below); nothing is deleted or moved.", "bool"),
    "quality_max_fwhm_ratio": Option(1.5, "Reject a frame whose median star FWHM exceeds this multiple of the session median; 0 = rule off.", "float", minimum=0.0),
    "quality_max_elongation": Option(1.5, "Reject a frame whose median star elongation (major/minor axis) exceeds this and 1.25 × the session median; 0 = rule off.", "float", minimum=0.0),
    "quality_min_star_fraction": Option(0.5, "Reject a frame with fewer stars than this fraction of the median of its pointing; 0 = rule off.", "float", minimum=0.0, maximum=1.0),
    "quality_min_transparency_fraction": Option(0.7, "Reject a frame whose star flux, relative to its pointing, is below this fraction of the session median; 0 = rule off.", "float", minimum=0.0, maximum=1.0),
    "quality_max_background_ratio": Option(1.5, "Reject a frame whose sky background exceeds this multiple of the session median (dawn, Moon, dew); 0 = rule off.", "float", minimum=0.0),
    "quality_beside_reprojection": _choice(
        "auto",
        "Measure frame quality (P2) on a thread while Mosaic-First resamples every frame (P3); auto = when the GPU resamples.",
        "auto", "on", "off",
    ),
    "quality_reject_trails": Option(False, "Also reject frames crossed by a satellite/aircraft trail (off: pixel rejection removes the trail).", "bool"),
    # --- outputs -----------------------------------------------------------------------------
    "preview_max_side": Option(4096, "Long side of the PNG preview in pixels.", "int", minimum=64),
    "preview_stretch_percentiles": Option([0.5, 99.8], "Black/white percentiles of the preview stretch.", "list"),
    # --- GPU (seed 002): one policy; the three flags below are kept in sync -------------
    "use_gpu_phase5": Option(True, "Use the GPU for reprojection and assembly when available.", "bool"),
    "stack_use_gpu": Option(True, "Use the GPU for stacking when available.", "bool"),
    "use_gpu_stack": Option(True, "Legacy alias of stack_use_gpu (kept in sync).", "bool"),
    "gpu_strict": Option(False, "Fail instead of falling back to the CPU when the GPU cannot be used (--gpu on).", "bool"),
    "gpu_device_id": Option(0, "CUDA device used by this run.", "int", minimum=0),
    "gpu_memory_limit_mb": Option(0, "Cap on the GPU memory a run plans to use, MB; 0 = no cap (env ZEMOSAIC_GPU_MEMORY_LIMIT_MB overrides).", "int", minimum=0),
    "gpu_threads": Option(0, "Device threads feeding the GPU during reprojection; 0 = default (1).", "int", minimum=0),
    "gpu_safety_fraction": Option(0.8, "Share of free GPU memory a stage may plan to use.", "float", minimum=0.05, maximum=1.0),
    # --- SDS (seed 000) ---------------------------------------------------------------------
    "sds_mode": Option(False, "ZeSupaDupStack: stack batches of Seestar frames into mega-tiles, then stack those.", "bool"),
    "sds_coverage_threshold": Option(0.92, "A batch may close once it covers this fraction of the union footprint.", "float", minimum=0.0, maximum=1.0),
    "sds_min_batch_size": Option(5, "Frames a batch needs before coverage may close it.", "int", minimum=1),
    "sds_target_batch_size": Option(10, "A batch is closed at this size even below the coverage threshold.", "int", minimum=1),
    "sds_min_coverage_keep": Option(0.4, "Final SDS pixels below this fraction of the local expected coverage are masked.", "float", minimum=0.0, maximum=1.0),
    "preplan_master_groups": Option([], "Explicit groups/batches: lists of frame paths.", "list"),
    # --- classic ------------------------------------------------------------------------------
    "cluster_panel_threshold": Option(0.0, "Max separation (deg) between frame centres of one pointing group; 0 = automatic.", "float", minimum=0.0),
    "cluster_orientation_split_deg": Option(0.0, "Split groups whose field orientation differs by more than this; 0 = off.", "float", minimum=0.0),
    "max_raw_per_master_tile": Option(0, "Cap on frames per master tile; 0 = automatic from the memory budget.", "int", minimum=0),
    "master_tile_crop_pct": Option(0.0, "Crop this percentage off each master tile's edges before assembly.", "float", minimum=0.0, maximum=40.0),
    "apply_intertile_photometry": Option(True, "Phase 4.5: match tile gains/offsets on their overlaps.", "bool"),
    "final_assembly_method": _choice("reproject_coadd", "Classic final assembly.", "reproject_coadd", "incremental"),
    "two_pass_coverage_renorm": Option(True, "Second assembly pass that removes residual gain steps along coverage changes.", "bool"),
    # --- plate solving ------------------------------------------------------------------------------
    "solve_missing_wcs": Option(True, "Plate-solve frames without a valid WCS when a solver is installed.", "bool"),
    "astrometry_index_dir": Option("", "Folder of astrometry.net index files; empty = the system's.", "str"),
    "write_wcs_to_inputs": Option(False, "Write solved WCS into the input files (off: inputs are never touched).", "bool"),
    "solver": _choice("auto", "Plate solver: auto = astrometry.net if usable, else ASTAP.", "auto", "astrometry.net", "astap"),
    "solve_field_path": Option("", "Path to astrometry.net's solve-field; empty = the PATH.", "str"),
    "astap_path": Option("", "Path to ASTAP's command line (astap_cli/astap); empty = the PATH.", "str"),
    "astap_db_dir": Option("", "ASTAP star database folder; empty = ASTAP's usual folders.", "str"),
    "solver_timeout_s": Option(60.0, "Wall-clock limit of one solver run, seconds.", "float", minimum=0.001),
    "solver_processes": Option(0, "Solver processes at once; 0 = min(4, CPU cores).", "int", minimum=0),
    "solve_scale_margin": Option(0.15, "Pixel-scale hint from FOCALLEN/XPIXSZ ± this fraction.", "float", minimum=0.0, maximum=0.9),
    "solve_search_radius_deg": Option(2.0, "Search radius around the header RA/DEC, degrees.", "float", minimum=0.01, maximum=180.0),
    "solve_blind_retry": Option(True, "Retry without the position hint when the hinted solve finds nothing.", "bool"),
    "solve_downsample": Option(0, "ASTAP downsampling (-z); 0 = automatic.", "int", minimum=0, maximum=8),
    "solve_max_stars": Option(300, "Brightest stars kept per frame for solving and matching.", "int", minimum=8),
    "solve_propagate": Option(True, "Solve one anchor frame per pointing; give the others its WCS by star matching.", "bool"),
    "propagate_min_stars": Option(15, "Stars a propagated WCS must match.", "int", minimum=3),
    "propagate_max_rms_px": Option(0.5, "Largest RMS (px) of a propagated WCS's star match.", "float", minimum=0.01),
    # --- resume -----------------------------------------------------------------------------------------
    "resume": _choice("auto", "Reuse finished work units from OUTPUT/.zemosaic_cache.", "auto", "off", "force"),
    "cache_retention": _choice("run_end", "Remove the cache after a successful run, or keep it.", "run_end", "keep"),
    # --- scale-out on Dask (optional 'distributed' extra; engine/distributed.py) ------------------------
    "scheduler": Option("none", "Where work units run: none (this process), local (a local Dask cluster of worker processes), tcp://HOST:PORT (an existing Dask scheduler whose workers share the cache folder), or inline (the cluster code path in this process).", "str"),
    "scheduler_workers": Option(0, "Worker processes of a local cluster; 0 = one per GPU when the run uses the GPU, else one per CPU core.", "int", minimum=0, maximum=1024),
    "scheduler_threads_per_worker": Option(0, "Threads of each local-cluster worker; 0 = 1 for CPU workers, the machine's cores shared between the workers for GPU workers (one GPU unit at a time each).", "int", minimum=0, maximum=256),
    "scheduler_memory_limit_mb": Option(0, "Memory limit of each local-cluster worker, MB; 0 = the machine's memory shared between the workers.", "int", minimum=0),
    "scheduler_retries": Option(2, "Times a failed work unit is retried before the run records it as failed.", "int", minimum=0, maximum=20),
}

def _file_name(value: str) -> str:
    """A bare file name (``output_basename``): no folder part, no NUL, not '.'/'..', not blank."""
    if not value.strip() or value in (".", "..") or any(char in value for char in "/\\\0"):
        raise ValueError(value)
    return value


SCHEDULER_ADDRESS_PREFIXES = ("tcp://", "tls://", "ucx://", "inproc://", "ws://", "wss://")


def scheduler_choice(value: Any) -> str:
    """``scheduler``: ``none``, ``local``, ``inline`` or a Dask scheduler address (``HOST:PORT`` means tcp)."""
    text = str(value).strip()
    if text.lower() in ("none", "local", "inline", ""):
        return text.lower() or "none"
    if text.lower().startswith(SCHEDULER_ADDRESS_PREFIXES) and text.split("://", 1)[1].strip():
        return text
    if ":" in text and " " not in text and "/" not in text:  # HOST:PORT, as `dask scheduler` prints it
        return "tcp://" + text
    raise ValueError(value)


def _percentile_pair(value: list[Any]) -> list[float]:
    """``[low, high]`` percentiles with 0 <= low < high <= 100."""
    if len(value) != 2 or any(isinstance(item, bool) for item in value):
        raise ValueError(value)
    low, high = (float(item) for item in value)
    if not (0.0 <= low < high <= 100.0):
        raise ValueError(value)
    return [low, high]


#: Structural checks of options whose kind alone says too little (key -> check, allowed text).
_STRUCTURE_CHECKS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "output_basename": (_file_name, "a file name without folder separators"),
    "preview_stretch_percentiles": (_percentile_pair, "[low, high] with 0 <= low < high <= 100"),
    "scheduler": (lambda value: scheduler_choice(value), "none, local, inline or a scheduler address such as tcp://HOST:PORT"),
}
DEFAULT_CONFIG: dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}

GPU_STACK_ALIASES = ("stack_use_gpu", "use_gpu_stack")


def default_config() -> dict[str, Any]:
    """A fresh copy of the defaults (lists are copied so callers may mutate them)."""
    return json.loads(json.dumps(DEFAULT_CONFIG))


def user_config_path() -> Path:
    """The per-user config file (XDG on Linux, Application Support on macOS, APPDATA on Windows)."""
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "napari-zemosaic" / "config.json"


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _coerce(option: Option, value: Any) -> Any:
    if option.kind == "bool":
        return _coerce_bool(value)
    if option.kind == "int":
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if number != int(number) or abs(number) > INT_LIMIT:
            raise ValueError(value)
        return int(number)
    if option.kind == "float":
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if not math.isfinite(number):  # NaN, or inf (e.g. JSON 'Infinity', 1e999): no setting means that
            raise ValueError(value)
        return number
    if option.kind == "str":
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    if option.kind == "choice":
        text = str(value).strip().lower().replace("-", "_")
        for choice in option.choices:
            if str(choice) == text:
                return choice
        raise ValueError(value)
    if option.kind == "list":
        if not isinstance(value, (list, tuple)):
            raise ValueError(value)
        return list(value)
    raise ValueError(value)  # pragma: no cover - every kind is handled above


def validate_config(config: Mapping[str, Any], explicit_keys: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults filled in, known keys coerced, unknown keys kept, GPU aliases synchronised.

    ``explicit_keys`` are the keys the user set in this call (``--set``, a widget):
    when only one of the GPU stacking aliases was set, the other follows it.
    """
    merged = default_config()
    merged.update(config)
    for key, option in OPTIONS.items():
        value = merged[key]
        try:
            coerced = _coerce(option, value)
            if key in _STRUCTURE_CHECKS:
                coerced = _STRUCTURE_CHECKS[key][0](coerced)
        except (ValueError, TypeError, OverflowError):
            allowed = _STRUCTURE_CHECKS[key][1] if key in _STRUCTURE_CHECKS else option.allowed()
            raise ConfigError("config_error_invalid_value", key=key, value=_short_repr(value), allowed=allowed) from None
        if option.kind in ("int", "float"):
            if (option.minimum is not None and coerced < option.minimum) or (
                option.maximum is not None and coerced > option.maximum
            ):
                raise ConfigError("config_error_invalid_value", key=key, value=_short_repr(value), allowed=option.allowed())
        merged[key] = coerced
    _sync_gpu_aliases(merged, set(explicit_keys))
    # SDS sizes follow the seed's coercion: at least 1, and a target never below the minimum.
    merged["sds_target_batch_size"] = max(merged["sds_target_batch_size"], merged["sds_min_batch_size"])
    return merged


def _short_repr(value: Any, limit: int = 80) -> str:
    """The offending value for the message, cut so that a huge nested value cannot flood the log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sync_gpu_aliases(config: dict[str, Any], explicit_keys: set[str]) -> None:
    if "use_gpu_stack" in explicit_keys and "stack_use_gpu" not in explicit_keys:
        config["stack_use_gpu"] = config["use_gpu_stack"]
    else:
        config["use_gpu_stack"] = config["stack_use_gpu"]


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping stored in a JSON config file; a clear error when it is not one."""
    path = Path(path)
    try:
        # utf-8-sig: editors on Windows start UTF-8 files with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("config_error_file_missing", path=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config_error_not_json", path=str(path), detail=str(exc)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("config_error_not_json", path=str(path), detail=str(exc)) from None
    except RecursionError:  # thousands of nested brackets: not a config anyone wrote
        raise ConfigError("config_error_not_json", path=str(path), detail="nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError("config_error_not_json", path=str(path), detail="top level is not an object")
    return data


def load_config(path: str | os.PathLike[str] | None = None, *, use_user_file: bool = True) -> dict[str, Any]:
    """Defaults, then the user's config file (if any), then ``path`` (if given), validated."""
    config: dict[str, Any] = {}
    user_file = user_config_path()
    if use_user_file and path is None and user_file.is_file():
        config.update(read_config_file(user_file))
    if path is not None:
        config.update(read_config_file(path))
    try:
        return validate_config(config, explicit_keys=config.keys())
    except ConfigError as exc:
        params = {**exc.params, "path": str(path or user_file)}
        if exc.key == "config_error_invalid_value":  # say which file holds the bad value
            raise ConfigError("config_error_invalid_value_in_file", **params) from None
        exc.params.setdefault("path", params["path"])
        raise


def save_config(config: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``config`` as JSON atomically (temp file + rename); returns the path."""
    target = Path(path) if path is not None else user_config_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with temp.open("w", encoding="utf-8") as handle:
        json.dump(dict(config), handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, target)
    return target


def parse_set_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is read as JSON when it parses, else as text."""
    if "=" not in text:
        raise ConfigError("config_error_bad_set", text=text)
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError("config_error_bad_set", text=text)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``overrides`` applied and validated (aliases follow what was set)."""
    merged = dict(config)
    merged.update(overrides)
    return validate_config(merged, explicit_keys=overrides.keys())


GPU_MODES = ("auto", "on", "off")


def gpu_mode_overrides(mode: str) -> dict[str, Any]:
    """Config keys for ``--gpu auto|on|off`` (CLI, Run widget, console API).

    ``auto`` keeps the config's flags; ``on`` asks for the GPU everywhere and fails rather
    than falling back (``gpu_strict``); ``off`` runs everything on the CPU.
    """
    mode = str(mode).strip().lower()
    if mode not in GPU_MODES:
        raise ConfigError("config_error_invalid_value", key="gpu", value=repr(mode), allowed=", ".join(GPU_MODES))
    if mode == "auto":
        return {}
    enabled = mode == "on"
    return {"use_gpu_phase5": enabled, "stack_use_gpu": enabled, "use_gpu_stack": enabled, "gpu_strict": enabled}


def option_docs() -> dict[str, str]:
    """Key → one-line documentation, for ``zemosaic info`` and the README."""
    return {key: option.doc for key, option in OPTIONS.items()}


Coercer = Callable[[Any], Any]

"""Outputs: science FITS, stretched preview PNG, ``run_report.json``, all written atomically.

Each file is written under a temporary name in the output folder and renamed into
place once complete (``os.replace`` is atomic on one file system), so a killed run
never leaves a half-written file under a final name. The science data stays linear
and unstretched; the PNG is a derived display copy.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import __version__


class OutputError(Exception):
    """The output folder cannot hold the results (a locale key and its parameters)."""

    def __init__(self, key: str, /, **params: Any) -> None:
        self.key = key
        self.params = params
        super().__init__(f"{key}: {params}")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary sibling path; renamed onto ``target`` only if the block succeeds."""
    temp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        if temp.exists():
            temp.unlink()


def check_output_dir(output_dir: Path, needed_bytes: int = 0) -> None:
    """Create the output folder and prove it is writable (and roomy enough), or raise OutputError."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".zemosaic-write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError("output_error_unwritable", path=str(output_dir), detail=exc.strerror or str(exc)) from None
    if needed_bytes:
        free = shutil.disk_usage(output_dir).free
        if free < needed_bytes:
            raise OutputError(
                "disk_error_insufficient_space",
                path=str(output_dir),
                needed_mb=needed_bytes // 2**20,
                free_mb=free // 2**20,
            )


def alpha_from_coverage(weight: np.ndarray, data: np.ndarray) -> np.ndarray:
    """uint8 alpha: 255 where at least one frame was kept and every channel is finite."""
    covered = (weight > 0) & np.all(np.isfinite(data), axis=0)
    return np.where(covered, 255, 0).astype(np.uint8)


def write_science_fits(
    path: Path,
    data: np.ndarray,
    alpha: np.ndarray,
    coverage: np.ndarray,
    wcs_header: Any,
    provenance: dict[str, Any],
) -> Path:
    """``<base>_science.fits``: float32 (C,H,W) + WCS + provenance; ALPHA and COVERAGE extensions."""
    from astropy.io import fits

    header = fits.Header()
    for card in wcs_header.cards:
        header.append(card)
    header["BUNIT"] = ("ADU", "linear, photometrically normalised")
    header["CREATOR"] = ("napari-zemosaic", "software that made this file")
    header["SWVERS"] = (__version__, "napari-zemosaic version")
    header["DATE"] = (_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "file creation (UTC)")
    for key, (value, comment) in provenance.items():
        header[key[:8].upper()] = (value, comment)
    primary = fits.PrimaryHDU(np.ascontiguousarray(data, dtype=np.float32), header=header)
    alpha_hdu = fits.ImageHDU(np.ascontiguousarray(alpha, dtype=np.uint8), name="ALPHA")
    coverage_hdu = fits.ImageHDU(np.ascontiguousarray(coverage, dtype=np.float32), name="COVERAGE")
    for hdu in (alpha_hdu, coverage_hdu):
        for card in wcs_header.cards:
            if card.keyword not in hdu.header:
                hdu.header.append(card)
    with atomic_path(path) as temp:
        fits.HDUList([primary, alpha_hdu, coverage_hdu]).writeto(temp, overwrite=True)
    return path


def stretch_for_display(
    data: np.ndarray, alpha: np.ndarray | None = None, percentiles: tuple[float, float] = (0.5, 99.8), softening: float = 10.0
) -> np.ndarray:
    """Per-channel percentile + asinh stretch to [0, 1] (a display copy; science data untouched)."""
    channels = data.shape[0]
    out = np.zeros_like(data, dtype=np.float32)
    mask = np.all(np.isfinite(data), axis=0) if alpha is None else (alpha > 0)
    for channel in range(channels):
        values = data[channel][mask]
        if values.size == 0:
            continue
        sample = values[:: max(1, values.size // 2_000_000)]
        low, high = np.percentile(sample, percentiles)
        scale = max(high - low, 1e-12)
        linear = np.clip((np.nan_to_num(data[channel], nan=low) - low) / scale, 0.0, 1.0)
        out[channel] = np.arcsinh(softening * linear) / np.arcsinh(softening)
    out[:, ~mask] = 0.0
    return out


#: zlib level of the preview PNG (0–9): the preview is a display copy, so speed beats size.
PREVIEW_PNG_COMPRESS_LEVEL = 1


def write_preview_png(
    path: Path, data: np.ndarray, alpha: np.ndarray, max_side: int = 4096, percentiles: tuple[float, float] = (0.5, 99.8)
) -> Path:
    """8-bit stretched preview, long side ≤ ``max_side``, transparent where nothing was stacked."""
    from PIL import Image

    stretched = stretch_for_display(data, alpha, percentiles)
    pixels = (stretched * 255.0 + 0.5).astype(np.uint8)
    if pixels.shape[0] == 1:
        rgb = np.repeat(pixels, 3, axis=0)
    else:
        rgb = pixels[:3]
    rgba = np.concatenate([rgb, alpha[None]], axis=0).transpose(1, 2, 0)
    # FITS rows go bottom-up in the usual display convention: flip so north is up in the PNG.
    image = Image.fromarray(np.ascontiguousarray(rgba[::-1]), mode="RGBA")
    long_side = max(image.size)
    if long_side > max_side:
        factor = max_side / long_side
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.LANCZOS)
    with atomic_path(path) as temp:
        # A display copy: zlib level 1 (the default, 6, took ~4x longer for files only ~12 % smaller).
        image.save(temp, format="PNG", compress_level=PREVIEW_PNG_COMPRESS_LEVEL)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path,)):
        return str(value)
    return str(value)


def _clean_floats(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_floats(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(_clean_floats(payload), handle, indent=2, default=_json_default, allow_nan=False)
    return path

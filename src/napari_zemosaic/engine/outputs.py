"""Outputs: science FITS, stretched preview PNG, ``run_report.json``, all written atomically.

Each file is written under a temporary name in the output folder and renamed into
place once complete (``os.replace`` is atomic on one file system), so a killed run
never leaves a half-written file under a final name. The science data stays linear
and unstretched; the PNG is a derived display copy.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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
    """uint8 alpha: 255 where at least one frame was kept and every channel is finite.

    Made in row strips on a thread pool (it runs between the stacking and the outputs, on the
    run's critical path), each strip in place in one uint8 buffer.
    """
    channels = data.reshape((-1, *weight.shape))
    alpha = np.empty(weight.shape, dtype=np.uint8)
    covered = alpha.view(np.bool_)  # 0/1 bytes: the mask becomes the alpha in place

    def strip(rows: tuple[int, int]) -> None:
        start, stop = rows
        np.greater(weight[start:stop], 0, out=covered[start:stop])
        for channel in channels:
            covered[start:stop] &= np.isfinite(channel[start:stop])
        alpha[start:stop] *= np.uint8(255)

    _in_row_strips(strip, weight.shape[0])
    return alpha


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
        write_hdus_in_strips(temp, [primary, alpha_hdu, coverage_hdu])
    return path


def write_hdus_in_strips(path: Path, hdus: list[Any]) -> None:
    """The bytes of ``fits.HDUList(hdus).writeto(path)`` for image HDUs, each data array made
    big-endian one row strip at a time into a small buffer.

    astropy's ``writeto`` byteswaps a writable little-endian array in place while it writes it
    and swaps it back after; the preview reads the same mosaic on another thread meanwhile, and
    saw swapped bytes. Here the caller's arrays are only read. The headers are astropy's own
    (``HDUList.verify`` and ``update_extend`` as ``writeto`` does), the padding FITS's.
    """
    from astropy.io import fits

    hdu_list = fits.HDUList(hdus)
    hdu_list.verify(option="exception")
    hdu_list.update_extend()
    with open(path, "wb") as handle:
        for hdu in hdu_list:
            handle.write(hdu.header.tostring().encode("ascii"))
            array = hdu.data
            if array is None or array.size == 0:
                continue
            if array.dtype.kind == "u" and array.dtype.itemsize > 1:
                raise ValueError(f"{array.dtype} is written with BZERO by astropy, not by this helper")
            big_endian = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
            planes = array.reshape((-1, *array.shape[-2:])) if array.ndim >= 2 else array.reshape(1, 1, -1)
            for plane in planes:
                for start in range(0, plane.shape[0], _FITS_STRIP_ROWS):
                    handle.write(np.ascontiguousarray(plane[start : start + _FITS_STRIP_ROWS], dtype=big_endian).data)
            handle.write(bytes(-array.nbytes % _FITS_BLOCK_BYTES))


#: FITS files are made of 2880-byte blocks; a data unit is padded with zeros to a whole block.
_FITS_BLOCK_BYTES = 2880
#: Rows per big-endian strip of a science plane (a few megabytes for a wide mosaic).
_FITS_STRIP_ROWS = 256


def contiguous_copy(view: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(view)``, always a copy, made in row strips (the second last axis)
    on a thread pool: the crop of a whole canvas, tens of megabytes, between the stacking and the outputs."""
    copy = np.empty(view.shape, dtype=view.dtype)
    if view.ndim < 2:
        copy[...] = view
        return copy

    def strip(rows: tuple[int, int]) -> None:
        copy[..., rows[0] : rows[1], :] = view[..., rows[0] : rows[1], :]

    _in_row_strips(strip, view.shape[-2])
    return copy


#: Rows per strip, at least: a strip is one task of the display stretch and of the PNG encode.
_STRIP_MIN_ROWS = 64


def _worker_count() -> int:
    """CPU cores this process may use (the strips' thread pool size)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _row_strips(height: int, workers: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges: about two per worker (load balance), ≥ ``_STRIP_MIN_ROWS`` rows each."""
    rows = max(_STRIP_MIN_ROWS, -(-height // max(1, 2 * workers)))
    return [(start, min(height, start + rows)) for start in range(0, height, rows)]


def _map_strips(task: Callable[[tuple[int, int]], Any], strips: list[tuple[int, int]], workers: int) -> Iterator[Any]:
    """``task`` over the strips, in order; on a thread pool when there is more than one (NumPy and zlib release the GIL)."""
    if len(strips) <= 1 or workers == 1:
        return map(task, strips)
    pool = ThreadPoolExecutor(max_workers=min(workers, len(strips)), thread_name_prefix="zemosaic-preview")

    def ordered() -> Iterator[Any]:
        try:
            yield from pool.map(task, strips)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return ordered()


def _in_row_strips(task: Callable[[tuple[int, int]], None], height: int, workers: int | None = None) -> None:
    """``task`` over :func:`_row_strips` of ``height`` rows, on a thread pool (see :func:`_map_strips`)."""
    workers = _worker_count() if workers is None else workers
    for _ in _map_strips(task, _row_strips(height, workers), workers):
        pass


#: Samples shorter than this go to ``np.percentile`` whole (selecting the tails first would not pay).
_TAIL_SELECT_MIN = 65_536
#: A percentile whose rank lies within this fraction of either end of the sample is taken from that tail.
_TAIL_FRACTION_MAX = 0.05
#: Every ``_TAIL_PROBE_STEP``-th value of the sample estimates where a tail ends. Odd and prime:
#: a stacked image can keep a period of two pixels (pixels measured and interpolated by the debayer
#: differ in noise, and the tails are made of noise); an even step would probe one of them only.
_TAIL_PROBE_STEP = 61
#: How far past a rank's share of the probe its threshold is put: the first try, then a second
#: where the first took in too few values.
_TAIL_PROBE_MARGINS = (1.5, 6.0)


def percentiles_of(sample: np.ndarray, percentiles: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(sample, percentiles)`` (its default, linear method), to the bit, for a 1-D
    ``sample`` of finite numbers.

    NumPy partitions the whole sample around every rank it needs; a display stretch asks for
    ranks near the ends (0.5 % and 99.8 %) of millions of values. Here each rank is looked for
    among the values beyond a threshold that a strided probe of the sample puts just past it:
    one comparison pass and a partition of a small tail. The threshold is checked (enough values
    beyond it), and NumPy takes over wherever it is not, and for ranks near the middle.
    """
    q = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    n = sample.size
    if sample.ndim != 1 or n < _TAIL_SELECT_MIN or q.ndim != 1 or not np.all((q > 0) & (q < 1)):
        return np.percentile(sample, percentiles)
    virtual = (n - 1) * q  # NumPy's virtual index of the linear method
    lower = np.floor(virtual).astype(np.intp)
    if np.any(lower + 1 > n - 1):
        return np.percentile(sample, percentiles)
    gamma = virtual - lower
    pairs = [_ranked_pair(sample, int(rank)) for rank in lower]
    if any(pair is None for pair in pairs):
        return np.percentile(sample, percentiles)
    below = np.array([pair[0] for pair in pairs], dtype=sample.dtype)
    above = np.array([pair[1] for pair in pairs], dtype=sample.dtype)
    return _interpolated(below, above, gamma)


def _interpolated(below: np.ndarray, above: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """NumPy's interpolation between neighbouring ranks (its ``_lerp``), operation for operation:
    the difference in the sample's type, then float64 with the (float64) fraction, from the nearer end."""
    difference = np.subtract(above, below)
    result = np.add(below, difference * gamma)
    np.subtract(above, difference * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe")
    return result


def _ranked_pair(sample: np.ndarray, rank: int) -> tuple[Any, Any] | None:
    """The values of ranks ``rank`` and ``rank + 1`` of ``sample`` in ascending order (0-based),
    from the tail they lie in; None when the rank is not near an end or the probe's threshold
    did not take in enough values (the caller then partitions the whole sample)."""
    n = sample.size
    from_top = rank + 1 > n // 2
    depth = n - rank if from_top else rank + 2  # values the tail must hold: both ranks
    if depth > _TAIL_FRACTION_MAX * n:
        return None
    probe = sample[::_TAIL_PROBE_STEP]
    for margin in _TAIL_PROBE_MARGINS:
        # Deeper than the ranks' share of the probe, and a few values more, so that the probe's
        # noise seldom leaves the threshold short of them.
        reach = min(probe.size - 1, int(margin * depth * probe.size / n) + 16)
        if from_top:
            threshold = np.partition(probe, probe.size - 1 - reach)[probe.size - 1 - reach]
            tail = sample[sample >= threshold]
            offset = n - tail.size  # every value left out ranks below the tail
        else:
            threshold = np.partition(probe, reach)[reach]
            tail = sample[sample <= threshold]
            offset = 0
        first, second = rank - offset, rank + 1 - offset
        if first >= 0 and second < tail.size:
            ordered = np.partition(tail, (first, second))
            return ordered[first], ordered[second]
    return None


#: The display percentiles sample every ``max(1, n // _STRETCH_SAMPLE)``-th of the ``n`` covered pixels.
_STRETCH_SAMPLE = 2_000_000


def _display_limits(
    data: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float], channels: range, workers: int
) -> list[tuple[Any, Any] | None]:
    """Per channel ``(low, scale)`` of the display stretch, or None where ``mask`` keeps no pixel.

    The sample is every ``max(1, n // _STRETCH_SAMPLE)``-th masked pixel in row-major order (``n``
    masked pixels), the same for every channel; the masked positions are found once, not per channel.
    """
    everything = bool(mask.all())
    where = None if everything else np.flatnonzero(mask)
    count = mask.size if where is None else where.size
    if count == 0:
        return [None for _ in channels]
    step = max(1, count // _STRETCH_SAMPLE)
    pick: Any = slice(None, None, step) if where is None else where[::step]

    def limits(channel: int) -> tuple[Any, Any]:
        sample = data[channel].reshape(-1)[pick]
        low, high = percentiles_of(sample, percentiles)
        return low, max(high - low, 1e-12)

    if workers > 1 and len(channels) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(channels))) as pool:
            return list(pool.map(limits, channels))
    return [limits(channel) for channel in channels]


def _stretch_rows(rows: np.ndarray, limits: tuple[Any, Any], softening: float) -> np.ndarray:
    """``arcsinh(softening · clip((rows − low) / scale, 0, 1)) / arcsinh(softening)``, in float64, NaN read as ``low``.

    The operations and their dtypes are those of the original whole-array expression (float32
    data promoted to float64 by the float64 percentiles), done in place on one buffer, so the
    result is bit-identical to it.
    """
    low, scale = limits
    linear = np.subtract(rows, low)
    if not np.isfinite(linear.sum()):
        if np.isinf(rows).any():  # rare: the exact original replacement (±inf → the largest finite values)
            linear = np.subtract(np.nan_to_num(rows, nan=low), low)
        else:  # NaN → low rounded to the data's dtype, as nan_to_num does
            np.copyto(linear, np.asarray(low, dtype=rows.dtype).astype(linear.dtype) - low, where=np.isnan(linear))
    linear /= scale
    np.clip(linear, 0.0, 1.0, out=linear)
    linear *= softening
    np.arcsinh(linear, out=linear)
    linear /= np.arcsinh(softening)
    return linear


def _display_mask(data: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    return np.all(np.isfinite(data), axis=0) if alpha is None else (np.asarray(alpha) > 0)


def stretch_for_display(
    data: np.ndarray, alpha: np.ndarray | None = None, percentiles: tuple[float, float] = (0.5, 99.8), softening: float = 10.0
) -> np.ndarray:
    """Per-channel percentile + asinh stretch to [0, 1] (a display copy; science data untouched).

    Computed in row strips on a thread pool, one pass of in-place operations per channel and strip.
    """
    channels, height = data.shape[0], data.shape[1]
    out = np.zeros_like(data, dtype=np.float32)
    mask = _display_mask(data, alpha)
    workers = _worker_count()
    limits = _display_limits(data, mask, percentiles, range(channels), workers)

    def strip(rows: tuple[int, int]) -> None:
        start, stop = rows
        hidden = ~mask[start:stop]
        for channel in range(channels):
            if limits[channel] is None:
                continue
            out[channel, start:stop] = _stretch_rows(data[channel, start:stop], limits[channel], softening)
            np.copyto(out[channel, start:stop], 0.0, where=hidden)

    _in_row_strips(strip, height, workers)
    return out


#: zlib level of the preview PNG (0–9): the preview is a display copy, so speed beats size.
PREVIEW_PNG_COMPRESS_LEVEL = 1
#: zlib strategy of the preview PNG: run-length matches only. On filtered, stretched sky (noise,
#: stars, nebulae, empty borders) it was both smaller (5–18 %) and 1.5–2.5x faster than the default
#: strategy at level 1, whose short LZ77 matches in noise cost more bits than they save.
PREVIEW_PNG_STRATEGY = zlib.Z_RLE

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG filter type 3, "Average": byte − ⌊(left + up) / 2⌋; a few uint8 NumPy passes, and on stretched
#: sky noise ~2 % smaller than "Sub" or "Up".
_PNG_FILTER_AVERAGE = 3
_ADLER_BASE = 65521


def _png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(kind))
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def _zlib_header(level: int) -> bytes:
    """The 2-byte zlib stream header (deflate, 32 KiB window; FLEVEL as zlib would write it)."""
    cmf = 0x78
    flevel = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    flg = flevel << 6
    flg |= 31 - (cmf << 8 | flg) % 31
    return bytes((cmf, flg))


def _adler32_combine(adler1: int, adler2: int, length2: int) -> int:
    """Adler-32 of A+B from those of A and of B (``length2`` bytes): B's running sums are offset by A's."""
    low1, high1 = adler1 & 0xFFFF, adler1 >> 16
    low2, high2 = adler2 & 0xFFFF, adler2 >> 16
    low = (low1 + low2 - 1) % _ADLER_BASE
    high = (high1 + high2 + length2 % _ADLER_BASE * (low1 - 1)) % _ADLER_BASE
    return high << 16 | low


def _filter_average(current: np.ndarray, prior: np.ndarray, out: np.ndarray) -> None:
    """PNG "Average" filter of uint8 RGBA scanlines (``n × 4W``) into ``out`` (``n × (1 + 4W)``)."""
    out[:, 0] = _PNG_FILTER_AVERAGE
    filtered = out[:, 1:]
    # First pixel (no left neighbour): byte − ⌊up / 2⌋.
    np.right_shift(prior[:, :4], 1, out=filtered[:, :4])
    np.subtract(current[:, :4], filtered[:, :4], out=filtered[:, :4])
    # ⌊(a + b) / 2⌋ without overflow: (a & b) + ((a ^ b) >> 1); uint8 subtraction wraps mod 256.
    left, up = current[:, :-4], prior[:, 4:]
    mean = np.bitwise_and(left, up)
    half = np.bitwise_xor(left, up)
    np.right_shift(half, 1, out=half)
    mean += half
    np.subtract(current[:, 4:], mean, out=filtered[:, 4:])


def _write_png_rgba(
    path: Path, height: int, width: int, rows: Callable[[int, int], np.ndarray], level: int = PREVIEW_PNG_COMPRESS_LEVEL
) -> None:
    """8-bit RGBA PNG; ``rows(start, stop)`` gives image rows ``[start, stop)`` as uint8 ``(n, width, 4)``.

    Strips of rows are made, filtered and deflated in parallel, each by its own raw deflate stream
    ended by a sync flush (the last one by a finish), so their concatenation behind a zlib header
    is one valid zlib stream; its Adler-32 is combined from the strips' own.
    """
    if height < 1 or width < 1:
        raise ValueError(f"a PNG needs at least one pixel, not {width}x{height}")
    workers = _worker_count()
    strips = _row_strips(height, workers)
    line = 4 * width

    def encode(strip: tuple[int, int]) -> tuple[bytes, int, int, int]:
        start, stop = strip
        first = max(0, start - 1)
        block = np.ascontiguousarray(rows(first, stop), dtype=np.uint8).reshape(stop - first, line)
        current = block[start - first :]
        if start > 0:
            prior = block[:-1]
        else:
            prior = np.empty_like(current)
            prior[0] = 0
            prior[1:] = current[:-1]
        filtered = np.empty((stop - start, 1 + line), dtype=np.uint8)
        _filter_average(current, prior, filtered)
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15, 8, PREVIEW_PNG_STRATEGY)
        last = stop == height
        payload = deflate.compress(filtered) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
        if start == 0:
            payload = _zlib_header(level) + payload
        return payload, zlib.crc32(payload, zlib.crc32(b"IDAT")), zlib.adler32(filtered), filtered.size

    with open(path, "wb") as handle:
        handle.write(_PNG_SIGNATURE)
        handle.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)))
        adler = 1
        for payload, crc, strip_adler, length in _map_strips(encode, strips, workers):
            handle.write(_png_chunk(b"IDAT", payload, crc))
            adler = _adler32_combine(adler, strip_adler, length)
        handle.write(_png_chunk(b"IDAT", struct.pack(">I", adler)))
        handle.write(_png_chunk(b"IEND", b""))


def write_preview_png(
    path: Path, data: np.ndarray, alpha: np.ndarray, max_side: int = 4096, percentiles: tuple[float, float] = (0.5, 99.8)
) -> Path:
    """8-bit stretched preview, long side ≤ ``max_side``, transparent where nothing was stacked.

    The pixels are those of :func:`stretch_for_display` (×255, rounded); FITS rows go bottom-up,
    so the rows are flipped (north up). Without a resize, each strip of PNG rows is stretched,
    filtered and deflated in one task, so no full-size float copy is made; a larger image is
    stretched whole, resized by Pillow (Lanczos) and then encoded the same way.
    """
    channels, height, width = data.shape
    if channels == 2 or channels < 1:
        raise ValueError(f"a preview needs 1 or at least 3 channels, not {channels}")
    colours = range(1) if channels == 1 else range(3)
    softening = 10.0
    workers = _worker_count()
    mask = _display_mask(data, alpha)
    limits = _display_limits(data, mask, percentiles, colours, workers)

    def preview_rows(start: int, stop: int) -> np.ndarray:
        """PNG rows ``[start, stop)``: data rows ``[height − stop, height − start)``, flipped."""
        low, high = height - stop, height - start
        block = np.empty((stop - start, width, 4), dtype=np.uint8)
        upright = block[::-1]
        hidden = ~mask[low:high]
        for channel in colours:
            target = upright[:, :, channel]
            if limits[channel] is None:
                target[...] = 0
                continue
            level = _stretch_rows(data[channel, low:high], limits[channel], softening).astype(np.float32)
            level *= 255.0
            level += 0.5
            np.copyto(target, level, casting="unsafe")
            np.copyto(target, 0, where=hidden)
        if channels == 1:
            upright[:, :, 1] = upright[:, :, 0]
            upright[:, :, 2] = upright[:, :, 0]
        upright[:, :, 3] = alpha[low:high]
        return block

    long_side = max(height, width)
    if long_side > max_side:
        from PIL import Image

        whole = np.empty((height, width, 4), dtype=np.uint8)

        def fill(strip: tuple[int, int]) -> None:
            whole[strip[0] : strip[1]] = preview_rows(*strip)

        _in_row_strips(fill, height, workers)
        factor = max_side / long_side
        image = Image.fromarray(whole).resize(
            (max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.LANCZOS
        )
        resized = np.asarray(image)
        height, width = resized.shape[:2]
        preview_rows = lambda start, stop: resized[start:stop]  # noqa: E731
    with atomic_path(path) as temp:
        # A display copy: zlib level 1 (the default, 6, took ~4x longer for files only ~12 % smaller).
        _write_png_rgba(temp, height, width, preview_rows)
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
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_floats(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    # One string, then one write (json.dump writes each of its many small pieces).
    text = json.dumps(_clean_floats(payload), indent=2, default=_json_default, allow_nan=False)
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return path

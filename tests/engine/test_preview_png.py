"""The preview PNG writer (strip-parallel stretch + our own PNG encoder) against the PIL-based original.

Every test writes real files and decodes them with Pillow; the reference below is the previous
implementation (whole-array stretch, Pillow encode), kept here so that the pixels can be compared.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_zemosaic.engine import outputs
from napari_zemosaic.engine.outputs import stretch_for_display, write_preview_png


def _reference_stretch(
    data: np.ndarray, alpha: np.ndarray | None = None, percentiles: tuple[float, float] = (0.5, 99.8), softening: float = 10.0
) -> np.ndarray:
    """The previous ``stretch_for_display``, verbatim."""
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


def _reference_png(
    path: Path, data: np.ndarray, alpha: np.ndarray, max_side: int = 4096, percentiles: tuple[float, float] = (0.5, 99.8)
) -> Path:
    """The previous ``write_preview_png`` (Pillow encode), without the atomic rename."""
    stretched = _reference_stretch(data, alpha, percentiles)
    pixels = (stretched * 255.0 + 0.5).astype(np.uint8)
    rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
    rgba = np.concatenate([rgb, alpha[None]], axis=0).transpose(1, 2, 0)
    image = Image.fromarray(np.ascontiguousarray(rgba[::-1]))
    long_side = max(image.size)
    if long_side > max_side:
        factor = max_side / long_side
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.LANCZOS)
    image.save(path, format="PNG", compress_level=1)
    return path


def _sky(channels: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise + gradient + a few bright blobs, float32 (C, H, W), with a fully opaque alpha."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    data = np.empty((channels, height, width), dtype=np.float32)
    for channel in range(channels):
        data[channel] = 100.0 + 0.3 * (channel + 1) * xx + 0.2 * yy + rng.normal(0.0, 4.0, (height, width))
    for _ in range(max(1, height * width // 2000)):
        y, x = rng.integers(0, height), rng.integers(0, width)
        data[:, y, x] += rng.uniform(200.0, 5000.0)
    return data, np.full((height, width), 255, dtype=np.uint8)


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGBA"
        return np.asarray(image).copy()


def _assert_same_as_reference(tmp_path: Path, data: np.ndarray, alpha: np.ndarray, **kwargs: object) -> np.ndarray:
    new = write_preview_png(tmp_path / "preview.png", data, alpha, **kwargs)  # type: ignore[arg-type]
    old = _reference_png(tmp_path / "reference.png", data, alpha, **kwargs)  # type: ignore[arg-type]
    with Image.open(new) as image:
        image.verify()
    got, want = _decoded(new), _decoded(old)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    _assert_valid_png_stream(new, got.shape[0], got.shape[1])
    # Written atomically: no temporary file left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png", "reference.png"]
    return got


def _assert_valid_png_stream(path: Path, height: int, width: int) -> None:
    """Every chunk's CRC holds, and the IDATs form one zlib stream (its Adler-32 checked by zlib)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    position, kinds, idat = 8, [], []
    while position < len(raw):
        (length,) = struct.unpack(">I", raw[position : position + 4])
        kind, payload = raw[position + 4 : position + 8], raw[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", raw[position + 8 + length : position + 12 + length])
        assert zlib.crc32(payload, zlib.crc32(kind)) == crc, kind
        kinds.append(kind)
        if kind == b"IDAT":
            idat.append(payload)
        position += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    stream = zlib.decompressobj()
    scanlines = stream.decompress(b"".join(idat))
    assert stream.eof and not stream.unused_data
    assert len(scanlines) == height * (1 + 4 * width)


def test_preview_png_odd_size_matches_the_pil_reference(tmp_path: Path) -> None:
    data, alpha = _sky(3, 203, 131)  # several strips of rows, odd width
    _assert_same_as_reference(tmp_path, data, alpha)


def test_preview_png_mono_matches_the_pil_reference(tmp_path: Path) -> None:
    data, alpha = _sky(1, 97, 45, seed=1)
    got = _assert_same_as_reference(tmp_path, data, alpha)
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])


def test_preview_png_nan_and_transparent_regions_match_the_pil_reference(tmp_path: Path) -> None:
    data, alpha = _sky(3, 150, 97, seed=2)
    data[:, :20, :] = np.nan  # NaN border, transparent
    data[:, :, -15:] = np.nan
    alpha[:20, :] = 0
    alpha[:, -15:] = 0
    alpha[60:80, 30:50] = 0  # transparent but finite
    data[1, 100:104, 10:14] = np.nan  # NaN under an opaque alpha: shown as the low percentile
    data[2, 130, 5] = np.inf  # ±inf under an opaque alpha
    data[0, 131, 6] = -np.inf
    data[:, 5, 5] = np.inf  # inf where transparent
    got = _assert_same_as_reference(tmp_path, data, alpha)
    flipped = got[::-1]
    assert (flipped[:20, :, :] == 0).all() and (flipped[60:80, 30:50] == 0).all()


def test_preview_png_single_row_and_single_column_match_the_pil_reference(tmp_path: Path) -> None:
    for name, shape in (("row", (3, 1, 50)), ("column", (3, 70, 1))):
        (tmp_path / name).mkdir()
        data, alpha = _sky(*shape, seed=3)
        assert _assert_same_as_reference(tmp_path / name, data, alpha).shape == (shape[1], shape[2], 4)


def test_preview_png_above_max_side_is_resized_like_the_pil_reference(tmp_path: Path) -> None:
    data, alpha = _sky(3, 300, 211, seed=5)
    alpha[:40, :] = 0
    data[:, :40, :] = np.nan
    got = _assert_same_as_reference(tmp_path, data, alpha, max_side=128)
    assert got.shape == (128, 90, 4)


def test_preview_png_uses_the_first_three_of_more_channels(tmp_path: Path) -> None:
    data, alpha = _sky(4, 66, 70, seed=6)
    _assert_same_as_reference(tmp_path, data, alpha)


def test_preview_png_rejects_two_channels(tmp_path: Path) -> None:
    data, alpha = _sky(2, 10, 10)
    with pytest.raises(ValueError):
        write_preview_png(tmp_path / "preview.png", data, alpha)
    assert list(tmp_path.iterdir()) == []


def test_stretch_for_display_is_bit_identical_to_the_reference() -> None:
    data, alpha = _sky(3, 190, 77, seed=7)
    data[:, :10, :] = np.nan
    alpha[:10, :] = 0
    data[0, 50, 50] = np.nan  # NaN under an opaque alpha
    data[1, 60, 60] = np.inf
    for given in (alpha, None):
        got, want = stretch_for_display(data, given), _reference_stretch(data, given)
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    empty = np.zeros_like(alpha)
    assert not stretch_for_display(data, empty).any() and not _reference_stretch(data, empty).any()


def test_stretch_for_display_keeps_the_sampled_percentiles_above_two_million_pixels() -> None:
    # 4.1 Mpx covered: the percentiles come from every second covered pixel (the sample rule).
    data, alpha = _sky(1, 2050, 2000, seed=8)
    alpha[:3, :] = 0
    alpha[1000:1010, 100:900] = 0
    got, want = stretch_for_display(data, alpha), _reference_stretch(data, alpha)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_adler32_combine_matches_zlib() -> None:
    rng = np.random.default_rng(9)
    for sizes in ((0, 5), (7, 0), (1, 1), (70_000, 123_457), (5_552, 5_553)):
        first, second = (rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes)
        combined = outputs._adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
        assert combined == zlib.adler32(first + second)


def _samples(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Samples that a probe of every 64th value can misjudge: ties, order, heavy tails, a plateau."""
    plateau = rng.exponential(5.0, size).astype(np.float32)
    plateau[: size // 3] = 7.0
    # A stacked image's rows, pixels measured and interpolated by the debayer alternating in noise.
    width = 2048
    bayer = rng.normal(0.0, 1.0, size).astype(np.float32)
    bayer[1::2] *= 0.5
    bayer[(np.arange(size) // width) % 2 == 1] *= 0.7
    return {
        "bayer": bayer,
        "noise": rng.normal(100.0, 10.0, size).astype(np.float32),
        "ties": rng.integers(0, 50, size).astype(np.float32),
        "sorted": np.sort(rng.normal(0.0, 1.0, size)),
        "reversed": np.sort(rng.normal(0.0, 1.0, size).astype(np.float32))[::-1].copy(),
        "plateau": plateau,
        "cauchy": rng.standard_cauchy(size).astype(np.float32),
        "stars": np.where(rng.random(size) < 0.004, 60000.0, rng.normal(300.0, 3.0, size)).astype(np.float32),
    }


@pytest.mark.parametrize("size", [65_536, 100_003, 1_000_000])
def test_percentiles_of_equals_numpy_to_the_bit(size: int) -> None:
    rng = np.random.default_rng(size)
    for name, sample in _samples(rng, size).items():
        for percentiles in ((0.5, 99.8), (1.0, 99.0), (0.1, 99.9), (0.001, 99.999), (4.0, 96.0), (2.5, 50.0)):
            want = np.percentile(sample, percentiles)
            got = outputs.percentiles_of(sample, percentiles)
            assert got.dtype == want.dtype, (name, percentiles)
            np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64), err_msg=f"{name} {percentiles}")


def test_percentiles_of_takes_the_display_ranks_from_the_tails() -> None:
    # The fast path itself must be what the test above checked, not NumPy's fallback.
    rng = np.random.default_rng(3)
    for name, sample in _samples(rng, 2_000_000).items():
        ordered = np.sort(sample)
        for fraction in (0.005, 0.998):
            rank = int(np.floor((sample.size - 1) * fraction))
            pair = outputs._ranked_pair(sample, rank)
            assert pair is not None, (name, fraction)
            assert (pair[0], pair[1]) == (ordered[rank], ordered[rank + 1]), (name, fraction)
    assert outputs._ranked_pair(rng.normal(size=500_000), 250_000) is None  # the median is left to NumPy


def test_alpha_from_coverage_is_opaque_where_covered_and_every_channel_is_finite() -> None:
    rng = np.random.default_rng(11)
    data = rng.normal(0.0, 1.0, (3, 301, 97)).astype(np.float32)
    weight = rng.uniform(0.0, 2.0, (301, 97)).astype(np.float32)
    weight[:20] = 0.0
    data[1, 100:120, 10:20] = np.nan
    data[2, 200, 50] = np.inf
    data[0, 250, 3] = -np.inf
    alpha = outputs.alpha_from_coverage(weight, data)
    want = np.where((weight > 0) & np.all(np.isfinite(data), axis=0), 255, 0).astype(np.uint8)
    assert alpha.dtype == np.uint8 and alpha.shape == weight.shape
    np.testing.assert_array_equal(alpha, want)
    assert set(np.unique(alpha)) == {0, 255}
    mono = outputs.alpha_from_coverage(weight, data[:1])
    np.testing.assert_array_equal(mono, np.where((weight > 0) & np.isfinite(data[0]), 255, 0).astype(np.uint8))


def test_interpolation_between_ranks_is_numpys() -> None:
    # Two values: the percentile p of [a, b] interpolates between them with the fraction p / 100.
    rng = np.random.default_rng(12)
    below = np.sort(rng.normal(0.0, 1e3, (4000, 2)).astype(np.float32), axis=1)
    fractions = rng.uniform(0.0, 1.0, 4000)
    fractions[::2] = 0.5 + fractions[::2] / 2  # half of them from the upper end
    want = np.array([np.percentile(pair, 100 * fraction) for pair, fraction in zip(below, fractions)])
    got = outputs._interpolated(below[:, 0], below[:, 1], np.true_divide(100 * fractions, 100))
    np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64))


def test_contiguous_copy_is_a_contiguous_copy_of_the_view() -> None:
    rng = np.random.default_rng(13)
    canvas = rng.normal(size=(3, 700, 333)).astype(np.float32)
    for view in (canvas[:, 17:650, 5:300], canvas[0, 3:4, :], canvas[1, :, 7], canvas[:, ::2, ::3]):
        copy = outputs.contiguous_copy(view)
        assert copy.flags.c_contiguous and copy.dtype == view.dtype and not np.shares_memory(copy, canvas)
        np.testing.assert_array_equal(copy, view)

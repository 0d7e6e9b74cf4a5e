"""Ingest: scanning, header metadata, Seestar detection, WCS validation, pixel loading, bad files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from napari_zemosaic.engine import frames
from napari_zemosaic.engine.frames import (
    FrameError,
    FrameInfo,
    estimate_background_noise,
    header_pointing,
    is_seestar_header,
    load_frame,
    read_frame_info,
    scan_inputs,
    shift_bayer_pattern,
    validate_wcs,
)
from napari_zemosaic.i18n import tr

CHANNEL = {"R": 0, "G": 1, "B": 2}


# ----------------------------------------------------------------------------- helpers


def seestar_header() -> fits.Header:
    """The keywords of a real Seestar S50 light sub-frame (no WCS: the scope does not solve)."""
    header = fits.Header()
    header["CREATOR"] = "ZWO Seestar S50"
    header["INSTRUME"] = "Seestar S50"
    header["TELESCOP"] = "S50_1d568bdd"
    header["DATE-OBS"] = "2024-02-10T20:15:31.123"
    header["EXPTIME"] = 10.0
    header["BAYERPAT"] = "GRBG"
    header["XBAYROFF"] = 0
    header["YBAYROFF"] = 0
    header["FOCALLEN"] = 250
    header["XPIXSZ"] = 2.9
    header["EQMODE"] = 0
    header["RA"] = 83.8221
    header["DEC"] = -5.3911
    return header


def write_fits(path: Path, data: np.ndarray | None, header: fits.Header | None = None) -> Path:
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    cfa = np.empty(rgb.shape[1:], dtype=rgb.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            cfa[dy::2, dx::2] = rgb[CHANNEL[pattern[2 * dy + dx]], dy::2, dx::2]
    return cfa


def tan_wcs(scale_arcsec: float = 2.39, shape: tuple[int, int] = (60, 80), rotation_deg: float = 20.0) -> WCS:
    height, width = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [83.82, -5.39]
    wcs.wcs.crpix = [(width + 1) / 2, (height + 1) / 2]
    scale = scale_arcsec / 3600.0
    angle = np.radians(rotation_deg)
    wcs.wcs.cd = scale * np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return wcs


def sip_wcs(shape: tuple[int, int] = (60, 80)) -> WCS:
    wcs = tan_wcs(shape=shape)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    a = np.zeros((3, 3))
    b = np.zeros((3, 3))
    a[2, 0], a[1, 1] = 1e-3, -5e-4  # about 1.5 px at the corners of a 60 x 80 frame
    b[0, 2], b[1, 1] = 8e-4, 2.5e-4
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def wcs_header(wcs: WCS, shape: tuple[int, int]) -> fits.Header:
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"] = shape[1]
    header["NAXIS2"] = shape[0]
    header.update(wcs.to_header(relax=True))
    return header


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def frame_error(call, *args, **kwargs) -> FrameError:
    with pytest.raises(FrameError) as caught:
        call(*args, **kwargs)
    return caught.value


# ----------------------------------------------------------------------------- Seestar headers


def test_real_seestar_s50_header(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 65536, (48, 64)).astype(np.uint16)
    path = write_fits(tmp_path / "Light_M42_10.0s_IRCUT_20240210-201531.fit", data, seestar_header())
    raw_header = fits.getheader(path)
    assert raw_header["BITPIX"] == 16 and raw_header["BZERO"] == 32768  # how the scope stores uint16

    info = read_frame_info(path)

    assert info.is_seestar
    assert info.layout == "cfa" and info.n_channels == 1 and info.bayer_pattern == "GRBG"
    assert info.shape == (48, 64) and info.hdu_index == 0
    assert info.exposure_s == 10.0 and info.eqmode == 0
    assert info.date_obs == "2024-02-10T20:15:31.123"
    assert info.instrument == "Seestar S50"
    assert info.focal_mm == 250 and info.pixel_um == 2.9
    assert info.header_scale_arcsec == pytest.approx(2.3927, abs=1e-4)
    assert (info.ra_deg, info.dec_deg) == (83.8221, -5.3911)
    assert info.wcs is None and info.wcs_status == "missing" and info.wcs_reason == "frame_excluded_no_wcs"
    assert info.centre == (83.8221, -5.3911)  # header pointing when there is no WCS
    assert info.header["TELESCOP"] == "S50_1d568bdd"


@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        ({"INSTRUME": "Seestar S50"}, True),
        ({"INSTRUME": "SEESTAR S30"}, True),
        ({"CREATOR": "ZWO SeeStar"}, True),
        ({"TELESCOP": "Seestar S50"}, True),
        ({"TELESCOP": "S50_1d568bdd"}, True),
        ({"TELESCOP": "S30_0a1b2c3d"}, True),
        ({"TELESCOP": "s50_lowercase"}, True),
        ({"INSTRUME": "ZWO ASI2600MC Pro", "TELESCOP": "Celestron EdgeHD 8", "CREATOR": "N.I.N.A."}, False),
        ({"TELESCOP": "S500 observatory"}, False),
        ({}, False),
    ],
)
def test_seestar_detection_variants(cards: dict[str, str], expected: bool) -> None:
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    assert is_seestar_header(header) is expected
    assert is_seestar_header(header, force_seestar_mode=True) is True


def test_seestar_flags_in_read_frame_info(tmp_path: Path) -> None:
    data = np.zeros((8, 8), dtype=np.uint16)
    seestar = write_fits(tmp_path / "s.fit", data, seestar_header())
    other_header = fits.Header()
    other_header["INSTRUME"] = "ZWO ASI533MC Pro"
    other_header["BAYERPAT"] = "RGGB"
    other = write_fits(tmp_path / "o.fit", data, other_header)

    assert read_frame_info(seestar).is_seestar
    assert not read_frame_info(other).is_seestar
    assert read_frame_info(other, force_seestar_mode=True).is_seestar
    assert not read_frame_info(seestar, auto_detect_seestar=False).is_seestar
    assert read_frame_info(other, auto_detect_seestar=False, force_seestar_mode=True).is_seestar


def test_bayer_offsets_shift_the_pattern() -> None:
    assert shift_bayer_pattern("RGGB", 1, 0) == "GRBG"
    assert shift_bayer_pattern("RGGB", 0, 1) == "GBRG"
    assert shift_bayer_pattern("RGGB", 1, 1) == "BGGR"
    assert shift_bayer_pattern("GRBG", 2, 4) == "GRBG"


def test_bayer_offset_is_honoured_when_loading(tmp_path: Path) -> None:
    scene = np.empty((3, 10, 12), dtype=np.float64)
    scene[0], scene[1], scene[2] = 1000.0, 2000.0, 3000.0
    header = fits.Header()
    header["BAYERPAT"] = "RGGB"
    header["XBAYROFF"] = 1  # this crop starts one column in: the array's own pattern is GRBG
    path = write_fits(tmp_path / "crop.fit", mosaic(scene, "GRBG").astype(np.uint16), header)
    info = read_frame_info(path)
    assert info.bayer_pattern == "GRBG"
    assert np.array_equal(load_frame(info, hot_pixel_correction=False), scene.astype(np.float32))


def test_sexagesimal_pointing() -> None:
    header = fits.Header()
    header["OBJCTRA"] = "05 35 17.3"
    header["OBJCTDEC"] = "-05 23 28"
    ra, dec = header_pointing(header)
    assert ra == pytest.approx(15 * (5 + 35 / 60 + 17.3 / 3600))
    assert dec == pytest.approx(-(5 + 23 / 60 + 28 / 3600))
    header = fits.Header()
    header["OBJCTRA"] = "00:00:30"
    header["OBJCTDEC"] = "-00:30:00"
    assert header_pointing(header) == pytest.approx((0.125, -0.5))


# ----------------------------------------------------------------------------- scanning


def test_scan_is_recursive_case_insensitive_and_skips_hidden_and_output(tmp_path: Path) -> None:
    inputs = tmp_path / "night"
    for relative in (
        "a.fit", "sub/B.FIT", "sub/deeper/c.Fits", "d.fts", "e.fits.fz",
        ".hidden/x.fit", "sub/.y.fit", "out/mosaic_science.fits", "out/deep/z.fit",
        "notes.txt", "f.fit.bak", "g.fits.txt",
    ):
        target = inputs / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    expected = sorted(inputs / name for name in ("a.fit", "sub/B.FIT", "sub/deeper/c.Fits", "d.fts", "e.fits.fz"))

    assert scan_inputs(inputs, inputs / "out") == expected
    assert scan_inputs(str(inputs), str(tmp_path / "elsewhere")) == sorted(
        expected + [inputs / "out/mosaic_science.fits", inputs / "out/deep/z.fit"]
    )


# ----------------------------------------------------------------------------- exact pixels


def test_uint16_with_bzero_round_trips_exactly(tmp_path: Path) -> None:
    values = np.array([0, 1, 2, 255, 32767, 32768, 32769, 65534, 65535], dtype=np.uint16)
    data = np.resize(values, (12, 15)).astype(np.uint16)
    path = write_fits(tmp_path / "u16.fit", data)
    info = read_frame_info(path)
    assert info.layout == "mono"
    loaded = load_frame(info)
    assert loaded.dtype == np.float32 and loaded.shape == (1, 12, 15)
    assert np.array_equal(loaded[0], data.astype(np.float32))


def test_bscale_and_bzero_are_applied_exactly(tmp_path: Path) -> None:
    stored = np.random.default_rng(1).integers(-32768, 32768, (9, 11)).astype(np.int16)
    hdu = fits.PrimaryHDU(stored)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 100.0
    path = tmp_path / "scaled.fit"
    hdu.writeto(path)
    with fits.open(path, do_not_scale_image_data=True) as hdul:  # what is on disk is the raw integers
        assert np.array_equal(hdul[0].data, stored)
    loaded = load_frame(read_frame_info(path))
    assert np.array_equal(loaded[0], stored.astype(np.float64) * 0.5 + 100.0)


def test_blank_integer_pixels_become_nan(tmp_path: Path) -> None:
    stored = np.arange(20, dtype=np.int16).reshape(4, 5)
    stored[1, 2] = -32768
    hdu = fits.PrimaryHDU(stored)
    hdu.header["BLANK"] = -32768
    path = tmp_path / "blank.fit"
    hdu.writeto(path)
    loaded = load_frame(read_frame_info(path))[0]
    assert np.isnan(loaded[1, 2]) and np.count_nonzero(np.isnan(loaded)) == 1
    assert loaded[3, 4] == 19.0


def test_seestar_cfa_file_loads_to_exact_colours(tmp_path: Path) -> None:
    scene = np.empty((3, 16, 20))
    scene[0], scene[1], scene[2] = 1200.0, 2500.0, 800.0
    path = write_fits(tmp_path / "flat.fit", mosaic(scene, "GRBG").astype(np.uint16), seestar_header())
    loaded = load_frame(read_frame_info(path))
    assert loaded.shape == (3, 16, 20) and loaded.dtype == np.float32
    assert np.array_equal(loaded, scene.astype(np.float32))


def test_hot_pixels_are_fixed_per_colour_site_on_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    clean = rng.normal(2000.0, 15.0, (64, 80)).round()
    hot = clean.copy()
    hot[20, 30] = 60000  # a G site of GRBG (even row, even column)
    hot[21, 40] = 50000  # a B site (odd row, even column)
    path = write_fits(tmp_path / "hot.fit", hot.astype(np.uint16), seestar_header())
    info = read_frame_info(path)
    stats: dict[str, int] = {}
    corrected = load_frame(info, stats=stats)
    raw = load_frame(info, hot_pixel_correction=False)
    assert stats["hot_pixels_fixed"] == 2
    assert raw[1, 20, 30] == 60000 and abs(corrected[1, 20, 30] - 2000.0) < 60
    assert raw[2, 21, 40] == 50000 and abs(corrected[2, 21, 40] - 2000.0) < 60
    # Only the debayer neighbourhoods of the two pixels differ.
    assert np.count_nonzero(np.any(corrected != raw, axis=0)) <= 2 * 9


def test_demo_night_frames_hot_pixels_found_exactly(tmp_path: Path) -> None:
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo, load_truth

    generate_demo(tmp_path, DemoSpec(panels=(1, 1), frames_per_panel=1, scale=0.25, seed=5))
    truth = load_truth(tmp_path)
    path = tmp_path / "frames" / truth.frames[0].file_name
    info = read_frame_info(path)
    assert info.is_seestar and info.layout == "cfa" and info.bayer_pattern == "GRBG"
    assert info.wcs_status == "valid" and info.wcs.sip is not None
    ra, dec = info.centre
    assert abs(ra - truth.frames[0].centre_ra) * np.cos(np.radians(dec)) * 3600 < 5.0
    assert abs(dec - truth.frames[0].centre_dec) * 3600 < 5.0

    from napari_zemosaic.engine.debayer import correct_hot_pixels

    cfa = fits.getdata(path).astype(np.float32)
    corrected, n_fixed = correct_hot_pixels(cfa, "GRBG", 8.0, np)
    changed = {(int(x), int(y)) for y, x in np.argwhere(corrected != cfa)}
    assert changed == {(int(x), int(y)) for x, y in truth.hot_pixels}  # every hot pixel, nothing else (no star)
    assert n_fixed == len(truth.hot_pixels) > 0


# ----------------------------------------------------------------------------- WCS validation


def test_valid_tan_wcs() -> None:
    shape = (60, 80)
    reference = tan_wcs(shape=shape)
    wcs, status, reason, detail = validate_wcs(wcs_header(reference, shape))
    assert (status, reason, detail) == ("valid", None, "")
    assert wcs.pixel_shape == (80, 60)
    pixels = np.array([[0.0, 0.0], [79.0, 59.0], [12.5, 40.25]])
    np.testing.assert_allclose(wcs.all_pix2world(pixels, 0), reference.all_pix2world(pixels, 0), rtol=0, atol=1e-10)


def test_valid_tan_sip_wcs_keeps_the_distortion() -> None:
    shape = (60, 80)
    reference = sip_wcs(shape)
    wcs, status, _, _ = validate_wcs(wcs_header(reference, shape))
    assert status == "valid" and wcs.sip is not None
    corner = np.array([[79.0, 59.0]])
    with_sip = wcs.all_pix2world(corner, 0)
    linear_only = wcs.wcs_pix2world(corner, 0)
    assert np.max(np.abs(with_sip - linear_only)) * 3600 > 1.0  # the distortion is arcseconds here
    np.testing.assert_allclose(with_sip, reference.all_pix2world(corner, 0), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("cd", "words"),
    [
        ([[1e-4, 2e-4], [2e-4, 4e-4]], "singular"),
        ([[0.1 / 3600, 0.0], [0.0, 0.1 / 3600]], "pixel scale"),
        ([[30 / 3600, 0.0], [0.0, 30 / 3600]], "pixel scale"),
    ],
)
def test_unusable_cd_matrices_are_invalid(cd: list[list[float]], words: str) -> None:
    wcs = tan_wcs()
    wcs.wcs.cd = np.array(cd)
    result, status, reason, detail = validate_wcs(wcs_header(wcs, (60, 80)))
    assert result is None and status == "invalid" and reason == "frame_excluded_bad_wcs"
    assert words in detail


def test_non_celestial_or_absent_wcs_is_missing() -> None:
    header = fits.Header()
    header["NAXIS"], header["NAXIS1"], header["NAXIS2"] = 2, 80, 60
    assert validate_wcs(header)[1:3] == ("missing", "frame_excluded_no_wcs")
    header["CTYPE1"], header["CTYPE2"] = "LINEAR", "LINEAR"
    header["CDELT1"], header["CDELT2"] = 1.0, 1.0
    result, status, reason, detail = validate_wcs(header)
    assert (result, status, reason) == (None, "missing", "frame_excluded_no_wcs") and "LINEAR" in detail


def test_nan_crval_is_invalid(tmp_path: Path) -> None:
    wcs = tan_wcs()
    wcs.wcs.crval = [np.nan, -5.39]
    assert validate_wcs(wcs, (60, 80))[1:3] == ("invalid", "frame_excluded_bad_wcs")
    # The same in a file, as some writers put it: an unparsable 'NAN' card.
    path = write_fits(tmp_path / "nan.fit", np.zeros((60, 80), dtype=np.float32), tan_wcs().to_header())
    raw = path.read_bytes()
    start = raw.index(b"CRVAL1  =")
    path.write_bytes(raw[:start] + b"CRVAL1  =                  NAN".ljust(80) + raw[start + 80 :])
    info = read_frame_info(path)
    assert (info.wcs_status, info.wcs_reason) == ("invalid", "frame_excluded_bad_wcs")


def test_frame_with_sip_wcs_serialises_and_round_trips(tmp_path: Path) -> None:
    shape = (60, 80)
    reference = sip_wcs(shape)
    header = seestar_header()
    header.update(reference.to_header(relax=True))
    path = write_fits(tmp_path / "solved.fit", np.zeros(shape, dtype=np.uint16), header)
    info = read_frame_info(path)
    assert info.wcs_status == "valid" and info.wcs_reason is None
    centre = reference.all_pix2world([[39.5, 29.5]], 0)[0]
    assert info.centre == pytest.approx((centre[0], centre[1]), abs=1e-9)

    document = json.loads(json.dumps(info.to_dict(include_header=True)))
    assert document["path"] == str(path) and document["wcs"]["A_2_0"] == pytest.approx(1e-3)
    again = FrameInfo.from_dict(document)
    corner = np.array([[79.0, 59.0]])
    np.testing.assert_allclose(again.wcs.all_pix2world(corner, 0), reference.all_pix2world(corner, 0), atol=1e-10)
    assert again.shape == info.shape and again.layout == "cfa" and again.bayer_pattern == "GRBG"
    assert np.array_equal(load_frame(again), load_frame(info))


# ----------------------------------------------------------------------------- layouts and bad files


def test_rgb_planes_first_and_last(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    chw = rng.uniform(0, 1, (3, 10, 14)).astype(np.float32)
    first = write_fits(tmp_path / "chw.fits", chw, tan_wcs(shape=(10, 14)).to_header())
    last = write_fits(tmp_path / "hwc.fits", np.ascontiguousarray(np.moveaxis(chw, 0, -1)))

    info_first, info_last = read_frame_info(first), read_frame_info(last)
    assert (info_first.layout, info_first.shape, info_first.n_channels) == ("rgb_chw", (10, 14), 3)
    assert (info_last.layout, info_last.shape, info_last.n_channels) == ("rgb_hwc", (10, 14), 3)
    assert info_first.wcs_status == "valid"  # WCS of a 3-axis cube: its celestial axes
    assert np.array_equal(load_frame(info_first), chw)
    assert np.array_equal(load_frame(info_last), chw)


def test_mono_float_frame(tmp_path: Path) -> None:
    data = np.random.default_rng(4).normal(0.0, 1.0, (7, 9)).astype(np.float32)
    data[0, 0] = np.nan
    info = read_frame_info(write_fits(tmp_path / "mono.fts", data))
    assert (info.layout, info.n_channels, info.bayer_pattern) == ("mono", 1, None)
    assert np.array_equal(load_frame(info)[0], data, equal_nan=True)


def test_image_in_extension_one(tmp_path: Path) -> None:
    scene = np.empty((3, 6, 8))
    scene[0], scene[1], scene[2] = 300.0, 700.0, 1100.0
    extension = fits.ImageHDU(mosaic(scene, "GRBG").astype(np.uint16), header=seestar_header(), name="SCI")
    table = fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])
    path = tmp_path / "mef.fits"
    fits.HDUList([fits.PrimaryHDU(), extension, table]).writeto(path)
    info = read_frame_info(path)
    assert info.hdu_index == 1 and info.layout == "cfa" and info.is_seestar
    assert info.header["EXTNAME"] == "SCI"
    assert np.array_equal(load_frame(info), scene.astype(np.float32))


def test_tile_compressed_fits(tmp_path: Path) -> None:
    data = np.random.default_rng(5).integers(0, 65536, (40, 50)).astype(np.uint16)
    header = seestar_header()
    del header["BAYERPAT"]
    path = tmp_path / "frame.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)]).writeto(path)
    info = read_frame_info(path)
    assert info.hdu_index == 1 and info.layout == "mono" and info.is_seestar and info.shape == (40, 50)
    assert np.array_equal(load_frame(info)[0], data.astype(np.float32))  # lossless for integers

    cfa_path = tmp_path / "cfa.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=seestar_header())]).writeto(cfa_path)
    cfa_info = read_frame_info(cfa_path)
    assert (cfa_info.layout, cfa_info.bayer_pattern) == ("cfa", "GRBG")
    assert load_frame(cfa_info).shape == (3, 40, 50)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.fit"
    path.write_bytes(b"")
    error = frame_error(read_frame_info, path)
    assert error.reason_key == "frame_excluded_empty_file" and error.params["path"] == str(path)
    assert str(path) in tr(error.reason_key, **error.params)


def test_text_file_named_fits(tmp_path: Path) -> None:
    path = tmp_path / "readme.fits"
    path.write_text("This is not an image.\n" * 200)
    assert frame_error(read_frame_info, path).reason_key == "frame_excluded_not_fits"


def test_truncated_data_is_found_by_the_header_pass(tmp_path: Path) -> None:
    path = write_fits(tmp_path / "cut.fit", np.ones((100, 120), dtype=np.uint16), seestar_header())
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    error = frame_error(read_frame_info, path)
    assert error.reason_key == "frame_excluded_truncated"
    assert "header announces" in error.detail


def test_truncated_header(tmp_path: Path) -> None:
    path = write_fits(tmp_path / "cut.fit", np.ones((10, 12), dtype=np.uint16), seestar_header())
    path.write_bytes(path.read_bytes()[:1000])
    assert frame_error(read_frame_info, path).reason_key == "frame_excluded_truncated"


def test_file_truncated_after_the_header_pass_fails_on_load(tmp_path: Path) -> None:
    path = write_fits(tmp_path / "cut.fit", np.ones((100, 120), dtype=np.uint16), seestar_header())
    info = read_frame_info(path)
    path.write_bytes(path.read_bytes()[:5000])
    assert frame_error(load_frame, info).reason_key == "frame_excluded_truncated"


def test_all_nan_frame(tmp_path: Path) -> None:
    info = read_frame_info(write_fits(tmp_path / "nan.fit", np.full((8, 8), np.nan, dtype=np.float32)))
    assert frame_error(load_frame, info).reason_key == "frame_excluded_all_nan"


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (5, 8, 8)])
def test_unsupported_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = write_fits(tmp_path / "cube.fit", np.zeros(shape, dtype=np.float32))
    error = frame_error(read_frame_info, path)
    assert error.reason_key == "frame_excluded_unsupported_shape" and str(list(shape[::-1])) in error.detail


def test_file_without_image(tmp_path: Path) -> None:
    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]).writeto(path)
    assert frame_error(read_frame_info, path).reason_key == "frame_excluded_no_image"


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    assert frame_error(read_frame_info, tmp_path / "gone.fit").reason_key == "frame_excluded_unreadable"


def test_every_reason_key_has_english_and_french_text() -> None:
    keys = [
        "frame_excluded_empty_file", "frame_excluded_not_fits", "frame_excluded_truncated",
        "frame_excluded_no_image", "frame_excluded_unsupported_shape", "frame_excluded_all_nan",
        "frame_excluded_unreadable", "frame_excluded_no_wcs", "frame_excluded_bad_wcs",
    ]
    for key in keys:
        for language in ("en", "fr"):
            text = tr(key, language=language, path="/data/x.fit", detail="why")
            assert text != key and "/data/x.fit" in text and "{" not in text


def test_inputs_are_byte_identical_after_reading(tmp_path: Path) -> None:
    shape = (60, 80)
    header = seestar_header()
    header.update(sip_wcs(shape).to_header(relax=True))
    paths = [
        write_fits(tmp_path / "a.fit", np.random.default_rng(6).integers(0, 65536, shape).astype(np.uint16), header),
        write_fits(tmp_path / "b.fits", np.random.default_rng(7).normal(size=(3, 20, 30)).astype(np.float32)),
    ]
    compressed = tmp_path / "c.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.ones((16, 16), dtype=np.uint16))]).writeto(compressed)
    paths.append(compressed)
    before = {path: (sha256(path), path.stat().st_mtime_ns) for path in paths}
    for path in paths:
        load_frame(read_frame_info(path))
    assert {path: (sha256(path), path.stat().st_mtime_ns) for path in paths} == before


# ----------------------------------------------------------------------------- noise


def test_background_noise_ignores_stars_and_tracks_each_channel() -> None:
    rng = np.random.default_rng(8)
    sigmas = np.array([5.0, 10.0, 20.0])
    data = rng.normal(100.0, 1.0, (3, 200, 300)) * sigmas[:, None, None] + 500.0
    y, x = np.mgrid[0:200, 0:300]
    for cy, cx in rng.uniform(10, 190, (80, 2)) * [1, 1.5]:
        data += 5000.0 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 2.0**2))  # bright stars
    data[:, 50, 50:60] = np.nan
    estimate = estimate_background_noise(data.astype(np.float32), np)
    assert estimate.shape == (3,) and estimate.dtype == np.float32
    np.testing.assert_allclose(estimate, sigmas, rtol=0.05)


# ----------------------------------------------------------------------------- raw pixels (reader processes)


def _scaled(info):
    from napari_zemosaic.engine.frames import _read_raw_image, _scaled_pixels

    raw, header = _read_raw_image(info)
    return _scaled_pixels(raw, header)


@pytest.mark.parametrize(
    "kind", ["uint16_bzero", "int16", "uint8", "extension", "rgb_cube"],
)
def test_raw_pixel_plan_loads_the_values_of_the_general_read(tmp_path: Path, kind: str) -> None:
    """What a reader leaves in the file (RawPixels) decodes to exactly what _scaled_pixels gives."""
    from napari_zemosaic.engine.frames import RawPixels, raw_pixel_plan

    rng = np.random.default_rng(7)
    path = tmp_path / f"{kind}.fit"
    if kind == "uint16_bzero":
        write_fits(path, rng.integers(0, 65536, (12, 15)).astype(np.uint16), seestar_header())
    elif kind == "int16":
        write_fits(path, rng.integers(-32768, 32768, (12, 15)).astype(np.int16))
    elif kind == "uint8":
        write_fits(path, rng.integers(0, 256, (12, 15)).astype(np.uint8))
    elif kind == "extension":
        extension = fits.ImageHDU(rng.integers(0, 65536, (6, 8)).astype(np.uint16), header=seestar_header())
        fits.HDUList([fits.PrimaryHDU(), extension]).writeto(path)
    else:
        write_fits(path, rng.integers(0, 65536, (3, 6, 8)).astype(np.uint16))
    info = read_frame_info(path)
    plan = raw_pixel_plan(info)
    assert isinstance(plan, RawPixels)
    expected, may_hold_nan = _scaled(info)
    loaded = plan.load(np)
    assert not may_hold_nan and loaded.dtype == expected.dtype and loaded.shape == expected.shape
    np.testing.assert_array_equal(loaded, expected)
    # The loader threads' read (into pinned memory with CuPy, ordinary memory without) decodes the same.
    from concurrent.futures import ThreadPoolExecutor

    from napari_zemosaic.engine.frames import PrefetchedRaw

    with ThreadPoolExecutor(1) as loader:
        prefetched = PrefetchedRaw(plan, loader.submit(plan.read_for_device))
        np.testing.assert_array_equal(prefetched.load(np), expected)
        values, as_float = PrefetchedRaw(plan, loader.submit(plan.read_for_device)).load(np, with_float=True)
        np.testing.assert_array_equal(values, expected)
        assert as_float.dtype == np.float32
        np.testing.assert_array_equal(as_float, expected.astype(np.float32))
    # A small array staged after the pixels (a control grid) travels in the same buffer, untouched.
    extra = np.random.default_rng(2).normal(size=(2, 5, 7))
    staged = plan.read_for_device(extra)
    assert staged.offset % 256 == 0 and staged.offset >= staged.raw.nbytes
    np.testing.assert_array_equal(staged.raw, plan.read())
    np.testing.assert_array_equal(staged.extra, extra)
    raw_values, extra_values = staged.upload(np)  # what the device receives, here as NumPy views
    np.testing.assert_array_equal(raw_values, plan.read().view(raw_values.dtype))
    np.testing.assert_array_equal(extra_values, extra)
    assert plan.read_for_device().extra is None


def test_raw_pixel_plan_declines_what_needs_the_general_read(tmp_path: Path) -> None:
    from napari_zemosaic.engine.frames import FrameError, raw_pixel_plan

    stored = np.arange(20, dtype=np.int16).reshape(4, 5)
    blank = fits.PrimaryHDU(stored)
    blank.header["BLANK"] = -32768
    blank.writeto(tmp_path / "blank.fit")
    scaled = fits.PrimaryHDU(stored)
    scaled.header["BSCALE"] = 0.5
    scaled.writeto(tmp_path / "scaled.fit")
    write_fits(tmp_path / "float.fit", np.ones((4, 5), np.float32))
    write_fits(tmp_path / "int32.fit", np.ones((4, 5), np.int32))
    data = np.random.default_rng(5).integers(0, 65536, (40, 50)).astype(np.uint16)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(tmp_path / "packed.fits.fz")
    for name in ("blank.fit", "scaled.fit", "float.fit", "int32.fit", "packed.fits.fz"):
        assert raw_pixel_plan(read_frame_info(tmp_path / name)) is None, name
    # A file cut after the header pass: the plan or its read says "truncated", never wrong pixels.
    path = write_fits(tmp_path / "cut.fit", np.ones((100, 100), np.uint16))
    info = read_frame_info(path)
    plan = raw_pixel_plan(info)
    path.write_bytes(path.read_bytes()[: 2880 * 2])
    for read in (plan.read, plan.read_for_device):
        with pytest.raises(FrameError) as caught:
            read()
        assert caught.value.reason_key == "frame_excluded_truncated"
    with pytest.raises(FrameError) as caught:
        raw_pixel_plan(info)
    assert caught.value.reason_key == "frame_excluded_truncated"


def test_reader_process_frames_give_the_pixels_of_a_direct_read(tmp_path: Path) -> None:
    """mosaic_first: a frame prepared with defer_pixels (as in reader processes) comes out of
    frame_pixels identical to one read directly."""
    from napari_zemosaic.config import default_config
    from napari_zemosaic.engine import mosaic_first
    from napari_zemosaic.engine.canvas import build_canvas
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.frames import RawPixels
    from napari_zemosaic.engine.resume import stamped_file_identity

    truth = generate_demo(tmp_path / "night", DemoSpec(panels=(1, 1), frames_per_panel=2, scale=0.25, seed=3))
    infos = [read_frame_info(path) for path in truth.frame_paths]
    canvas = build_canvas([i.wcs for i in infos], [i.shape for i in infos])
    config = default_config()
    for index, info in enumerate(infos):
        direct = mosaic_first.prepare_frame_on_host(info, index, canvas, 0.01)
        deferred = mosaic_first.prepare_frame_on_host(info, index, canvas, 0.01, defer_pixels=True)
        assert isinstance(deferred.pixels, RawPixels) and not isinstance(direct.pixels, RawPixels)
        a = mosaic_first.frame_pixels(direct, info, config, 3, np)
        b = mosaic_first.frame_pixels(deferred, info, config, 3, np)
        np.testing.assert_array_equal(a, b)
        # What a reader process gets: no WCS and no header; it reads the header from the file.
        from dataclasses import replace

        mosaic_first._init_reader_process(canvas)
        light = replace(info, wcs=None, header=None)
        fingerprint = mosaic_first._wcs_fingerprint(info.wcs)
        in_reader = mosaic_first._prepare_in_reader_process(light, index, 0.01, None, fingerprint)
        assert isinstance(in_reader.pixels, RawPixels)
        # The reader also says what identifies the file for the run's resume signatures.
        assert in_reader.file_identity == stamped_file_identity(info.path) and direct.file_identity is None
        np.testing.assert_array_equal(in_reader.grid.bbox, direct.grid.bbox)
        np.testing.assert_array_equal(mosaic_first.frame_pixels(in_reader, info, config, 3, np), a)
        wrong = (fingerprint[0], fingerprint[1], fingerprint[2], (b"x",) + fingerprint[3][1:])
        assert mosaic_first._prepare_in_reader_process(light, index, 0.01, None, wrong) == mosaic_first.NEEDS_WCS
        # The reader reads the header again as the header pass does (a Seestar file: HeaderLookup).
        again = frames.header_values_from_file(info.path, info.hdu_index)
        assert isinstance(again, frames.HeaderLookup) and again.header == info.header
        assert frames.header_values_from_file(tmp_path / "gone.fit", 0) is None
        # ... and the frame's resume digest, the one the run's manifest computes for the frame.
        from napari_zemosaic.engine.resume import UnitManifest

        frame = replace(info, file_identity=in_reader.file_identity, resume_token=in_reader.resume_token)
        manifest = UnitManifest(tmp_path / f"cache{index}", "test")
        expected = manifest.digest(frame)
        assert in_reader.resume_token == (in_reader.file_identity[1], expected) and len(expected) == 24
        fresh = UnitManifest(tmp_path / f"fresh{index}", "test")
        calls = []  # the token is taken as it is: nothing is canonicalised again ...
        original = fresh.digest
        fresh.digest = lambda value: calls.append(value) or original(value)  # type: ignore[method-assign]
        assert fresh.frame_digest(frame) == expected and calls == []
        # ... unless the file has changed since (its stamp): then the digest is computed again.
        stat = info.path.stat()
        os.utime(info.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        try:
            changed = UnitManifest(tmp_path / f"changed{index}", "test")
            assert changed.frame_digest(frame) == changed.digest(replace(frame, file_identity=None)) != expected
        finally:
            os.utime(info.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_device_cut_of_a_frame_keeps_the_pieces_of_the_host_split() -> None:
    """mosaic_first._cut_device_pieces (the device thread's cut: views, coverage per block
    column) keeps exactly the non-empty pieces of the host split; run here on NumPy arrays."""
    from napari_zemosaic.engine.mosaic_first import PieceStore, ReprojectedFrame, _cut_device_pieces, _split_into_blocks

    rng = np.random.default_rng(62)
    side, canvas_shape = 64, (300, 330)
    for bbox in [(10, 200, 20, 300), (0, 64, 0, 128), (60, 70, 60, 70), (200, 300, 250, 330)]:
        h, w = bbox[1] - bbox[0], bbox[3] - bbox[2]
        data = rng.normal(size=(3, h, w)).astype(np.float32)
        data[:, : h // 2, : w // 2] = np.nan
        data[0, h // 4, w // 4] = 5.0  # a lone finite value in one channel keeps its piece
        data[:, :, w - 2 :] = np.nan
        host = PieceStore(None)
        _split_into_blocks(ReprojectedFrame(0, bbox, data, np.ones(3)), side, host, canvas_shape)
        cut = _cut_device_pieces(ReprojectedFrame(0, bbox, data, np.ones(3)), side, canvas_shape)
        assert [piece[0] for piece in cut] == sorted(host._entries)
        for block, y0, x0, piece in cut:
            (hy0, hx0, host_piece), = [host._entries[block][0]]
            assert (y0, x0) == (hy0, hx0)
            assert np.shares_memory(piece, data)  # a view, not a copy
            np.testing.assert_array_equal(piece, host_piece)

"""The synthetic Seestar night must look like the real thing and agree with its truth."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS

from napari_zemosaic.engine.demo import (
    CFA_CHANNELS,
    DemoSpec,
    DemoSpecError,
    generate_demo,
    load_truth,
    truth_star_pixels,
)

SMALL = DemoSpec(panels=(1, 2), frames_per_panel=3, scale=0.2, seed=3)
WCS_KEYWORDS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD2_2", "PC1_1", "CDELT1", "A_ORDER", "B_ORDER")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    calls: list[tuple[int, int]] = []
    truth = generate_demo(tmp_path_factory.mktemp("night"), SMALL, progress=lambda done, total: calls.append((done, total)))
    return truth, calls


def _pixels(truth, i: int) -> np.ndarray:
    return fits.getdata(truth.frame_paths[i]).astype(np.float64)


def _site_channels(shape: tuple[int, int], y0: int = 0, x0: int = 0) -> np.ndarray:
    """Colour index (0=R, 1=G, 2=B) of every pixel of a cut-out starting at (y0, x0)."""
    rows = (np.arange(shape[0]) + y0)[:, None] & 1
    cols = (np.arange(shape[1]) + x0)[None, :] & 1
    return CFA_CHANNELS[rows, cols]


def _cutout(image: np.ndarray, x: float, y: float, half: int):
    xc, yc = int(round(x)), int(round(y))
    y0, x0 = yc - half, xc - half
    box = image[y0 : yc + half + 1, x0 : xc + half + 1]
    yy, xx = np.mgrid[y0 : yc + half + 1, x0 : xc + half + 1]
    return box, yy, xx, _site_channels(box.shape, y0, x0)


def _local_sky(box, yy, xx, channels, x, y, channel, r_in=9.0) -> float:
    ring = (np.hypot(xx - x, yy - y) >= r_in) & (channels == channel)
    _, median, _ = sigma_clipped_stats(box[ring], sigma=3.0)
    return float(median)


def _green_centroid(image: np.ndarray, x: float, y: float) -> tuple[float, float]:
    """Background-subtracted first moment over the green CFA sites within ±5 px."""
    box, yy, xx, channels = _cutout(image, x, y, 13)
    sky = _local_sky(box, yy, xx, channels, x, y, channel=1)
    core = (np.abs(xx - round(x)) <= 5) & (np.abs(yy - round(y)) <= 5) & (channels == 1)
    weight = box[core] - sky
    return float((xx[core] * weight).sum() / weight.sum()), float((yy[core] * weight).sum() / weight.sum())


def _aperture_ratio(image: np.ndarray, x: float, y: float, flux_rgb: np.ndarray, radius: float = 6.0) -> float:
    """Measured / expected flux over all CFA sites (R and B hold 1/4 of a star, G 1/2)."""
    box, yy, xx, channels = _cutout(image, x, y, 14)
    inside = np.hypot(xx - x, yy - y) <= radius
    measured = 0.0
    for channel in range(3):
        sites = inside & (channels == channel)
        measured += (box[sites] - _local_sky(box, yy, xx, channels, x, y, channel)).sum()
    expected = 0.25 * flux_rgb[0] + 0.5 * flux_rgb[1] + 0.25 * flux_rgb[2]
    return measured / expected


def _flux_ratios(truth, i: int, min_flux: float = 50000.0) -> np.ndarray:
    image = _pixels(truth, i)
    ids, xs, ys = truth_star_pixels(truth, truth.wcs_for(i), image.shape, min_flux=min_flux, isolation_px=10, edge_px=15, clean_frame=i)
    return np.array([_aperture_ratio(image, x, y, truth.star_flux[k]) for k, x, y in zip(ids, xs, ys)])


def _centroid_errors(truth, i: int) -> np.ndarray:
    image = _pixels(truth, i)
    ids, xs, ys = truth_star_pixels(truth, truth.wcs_for(i), image.shape, min_flux=50000.0, isolation_px=10, edge_px=15, clean_frame=i)
    assert ids.size >= 3, "too few bright isolated stars to check the WCS"
    errors = [np.hypot(*np.subtract(_green_centroid(image, x, y), (x, y))) for x, y in zip(xs, ys)]
    return np.asarray(errors)


# --------------------------------------------------------------------------- file format


def test_frames_are_seestar_like_fits(night):
    truth, calls = night
    assert calls == [(k, 6) for k in range(1, 7)]
    assert len(truth.frames) == 6 and (truth.width, truth.height) == (216, 384)
    names = [path.name for path in truth.frame_paths]
    assert sorted(names) == names  # name order == time order
    for frame, path in zip(truth.frames, truth.frame_paths):
        with fits.open(path, do_not_scale_image_data=True) as hdul:
            raw = hdul[0]
            assert len(hdul) == 1
            assert raw.header["BITPIX"] == 16 and raw.header["BZERO"] == 32768 and raw.header["BSCALE"] == 1
            assert raw.data.dtype.kind == "i" and raw.data.dtype.itemsize == 2
        data = fits.getdata(path)
        header = fits.getheader(path)
        assert data.dtype == np.uint16 and data.shape == (384, 216)
        assert (header["NAXIS1"], header["NAXIS2"]) == (216, 384)
        expected = {
            "CREATOR": "ZWO Seestar S50", "INSTRUME": "Seestar S50", "TELESCOP": "S50_1d568bdd",
            "BAYERPAT": "GRBG", "XBAYROFF": 0, "YBAYROFF": 0, "FOCALLEN": 250, "XPIXSZ": 2.9, "YPIXSZ": 2.9,
            "XBINNING": 1, "YBINNING": 1, "EXPTIME": 10.0, "EXPOSURE": 10.0, "GAIN": 80, "FILTER": "IRCUT",
            "EQMODE": 0, "OBJECT": "M42",
        }
        for key, value in expected.items():
            assert header[key] == value, key
        assert -30 < header["CCD-TEMP"] < 50
        assert header["DATE-OBS"] == frame.date_obs
        assert path.name.startswith("Light_M42_10.0s_IRCUT_")
        # RA/DEC are the mount pointing: within ~1' of the true centre, but not exactly on it.
        offset = np.hypot((header["RA"] - frame.centre_ra) * np.cos(np.radians(frame.centre_dec)), header["DEC"] - frame.centre_dec)
        assert 1.0 / 3600 < offset < 75.0 / 3600
    starts = [datetime.fromisoformat(f.date_obs) for f in truth.frames]
    for previous, current, frame in zip(starts, starts[1:], truth.frames[1:]):
        gap = (current - previous).total_seconds()
        assert (10.0 <= gap <= 12.0) if frame.index_in_panel > 0 else gap > 12.0


def test_header_wcs_is_the_truth_and_has_realistic_sip(night):
    truth, _ = night
    width, height = truth.width, truth.height
    corners_x = np.array([0, width - 1, 0, width - 1, (width - 1) / 2])
    corners_y = np.array([0, 0, height - 1, height - 1, (height - 1) / 2])
    for i, path in enumerate(truth.frame_paths):
        header = fits.getheader(path)
        assert header["CTYPE1"] == "RA---TAN-SIP" and header["CTYPE2"] == "DEC--TAN-SIP"
        assert header["A_ORDER"] == 2 and header["B_ORDER"] == 2
        assert (header["CRPIX1"], header["CRPIX2"]) == ((width + 1) / 2, (height + 1) / 2)
        scale = np.sqrt(abs(header["CD1_1"] * header["CD2_2"] - header["CD1_2"] * header["CD2_1"])) * 3600
        assert scale == pytest.approx(206.265 * 2.9 / 250, rel=1e-9)
        for key, value in truth.frames[i].wcs_header.items():
            assert header[key] == value, key
        file_wcs, true_wcs = WCS(header), truth.wcs_for(i)
        np.testing.assert_array_equal(file_wcs.all_pix2world(corners_x, corners_y, 0), true_wcs.all_pix2world(corners_x, corners_y, 0))
        # Distortion: where SIP moves the corners, in pixels (same ~1-2 px at any scale).
        ra, dec = true_wcs.all_pix2world(corners_x, corners_y, 0)
        linear_x, linear_y = true_wcs.wcs_world2pix(ra, dec, 0)
        shift = np.hypot(linear_x - corners_x, linear_y - corners_y)
        assert 1.0 < shift[:4].max() < 2.0 and shift[4] < 1e-9


def test_no_wcs_keywords_when_asked(tmp_path):
    spec = dataclasses.replace(SMALL, panels=(1, 1), frames_per_panel=2, with_wcs=False, scale=0.15)
    truth = generate_demo(tmp_path, spec)
    for path in truth.frame_paths:
        header = fits.getheader(path)
        assert not [key for key in WCS_KEYWORDS if key in header]
        assert not [key for key in header if key.startswith(("A_", "B_", "CD", "CRVAL", "CRPIX", "CTYPE", "CUNIT", "RADESYS"))]
        for key in ("RA", "DEC", "FOCALLEN", "XPIXSZ", "BAYERPAT"):
            assert key in header
    # The truth still knows where the frames point.
    assert truth.wcs_for(0).has_celestial


# --------------------------------------------------------------------------- the science


def test_cfa_sites_carry_their_colour_sky(night):
    truth, _ = night
    for frame in truth.frames:
        image = _pixels(truth, frame.index)
        for parity_y in (0, 1):
            for parity_x in (0, 1):
                channel = CFA_CHANNELS[parity_y, parity_x]
                level = np.median(image[parity_y::2, parity_x::2]) - truth.bias_adu
                # The nebula adds a little on top of the sky; the gradient averages out.
                assert frame.sky_adu[channel] * 0.99 < level < frame.sky_adu[channel] * 1.12


def test_background_noise_is_shot_plus_read_noise(night):
    truth, _ = night
    image = _pixels(truth, 0)
    # G sites of one 2x2 cell see the same sky: their difference is pure noise (√2 σ).
    difference = image[0::2, 0::2] - image[1::2, 1::2]
    _, _, std = sigma_clipped_stats(difference, sigma=3.0)
    sky_g = truth.frames[0].sky_adu[1]
    gain = truth.gain_e_per_adu
    expected = np.sqrt(sky_g * gain + truth.read_noise_e**2) / gain
    assert std / np.sqrt(2) == pytest.approx(expected, rel=0.1)


def test_stars_land_where_the_true_wcs_says(night):
    truth, _ = night
    for i in range(len(truth.frames)):
        if truth.frames[i].is_cloudy:
            continue
        errors = _centroid_errors(truth, i)
        assert np.median(errors) < 0.05 and errors.max() < 0.1, (i, errors)


def test_rotation_drifts_in_alt_az_and_panels_overlap(night):
    truth, _ = night
    rotations = np.array([frame.rotation_deg for frame in truth.frames])
    steps = np.diff(rotations)
    assert np.all(np.sign(steps) == np.sign(steps[0]))
    per_frame = np.abs(steps[[f.index_in_panel > 0 for f in truth.frames[1:]]])
    assert np.all((per_frame > 0.15) & (per_frame < 0.5))
    # Neighbour panels are ~(1 - overlap) of a field apart.
    first, second = truth.wcs_for(0), truth.wcs_for(3)
    ra, dec = second.all_pix2world([(truth.width - 1) / 2], [(truth.height - 1) / 2], 0)
    x, y = first.all_world2pix(ra, dec, 0)
    separation = np.hypot(x[0] - (truth.width - 1) / 2, y[0] - (truth.height - 1) / 2)
    assert separation == pytest.approx(0.75 * truth.width, abs=12)


def test_equatorial_mode_has_no_field_rotation(tmp_path):
    spec = dataclasses.replace(SMALL, panels=(1, 1), frames_per_panel=3, eqmode=1, scale=0.15, artefacts=False)
    truth = generate_demo(tmp_path, spec)
    assert len({frame.rotation_deg for frame in truth.frames}) == 1
    assert fits.getheader(truth.frame_paths[0])["EQMODE"] == 1
    assert truth.hot_pixels.size == 0 and truth.cloudy_frame is None and truth.trail_frame is None
    assert all(frame.transparency == 1.0 for frame in truth.frames)


def test_aperture_flux_matches_truth_times_transparency(night):
    truth, _ = night
    clear = [f.index for f in truth.frames if not f.is_cloudy and f.trail is None]
    assert {truth.frames[i].panel for i in clear} == {0, 1}
    for i in clear:
        ratios = _flux_ratios(truth, i)
        assert ratios.size >= 3
        assert np.median(ratios) == pytest.approx(truth.frames[i].transparency, rel=0.02), i
    # Panel haze is a real, measurable difference (1.00 vs 0.92 for the first two panels).
    assert truth.frames[0].transparency == pytest.approx(1.0, abs=0.02)
    assert truth.frames[3].transparency == pytest.approx(0.92, abs=0.02)


def test_cloudy_frame_is_dim_and_bright(night):
    truth, _ = night
    cloudy = truth.cloudy_frame
    assert cloudy is not None and truth.frames[cloudy].is_cloudy
    assert sum(frame.is_cloudy for frame in truth.frames) == 1
    assert truth.frames[cloudy].transparency == pytest.approx(0.4)
    assert np.median(_flux_ratios(truth, cloudy)) == pytest.approx(0.4, rel=0.04)
    # Thin cloud scatters light: the sky is ~30 % above that of the clear frames of its panel.
    clear = [f for f in truth.frames if f.panel == truth.frames[cloudy].panel and not f.is_cloudy]
    for channel in range(3):
        clear_sky = np.mean([f.sky_adu[channel] / (1 + 0.5 * (1 - f.transparency)) for f in clear])
        assert truth.frames[cloudy].sky_adu[channel] / clear_sky == pytest.approx(1.3, rel=0.04)


def test_hot_pixels_in_every_frame(night):
    truth, _ = night
    assert 8 <= len(truth.hot_pixels) <= 10  # ~50 on a full sensor, scaled by area (at least 8)
    xs, ys = truth.hot_pixels[:, 0], truth.hot_pixels[:, 1]
    for i in range(len(truth.frames)):
        values = _pixels(truth, i)[ys, xs]
        np.testing.assert_allclose(values, truth.hot_pixel_values, rtol=0.05)
        assert values.min() > 18000


def test_satellite_trail_crosses_its_frame_only(night):
    truth, _ = night
    trail = truth.trail_frame
    assert trail is not None and sum(frame.trail is not None for frame in truth.frames) == 1
    x0, y0, x1, y1 = truth.frames[trail].trail
    on_border = lambda x, y: min(x, y, truth.width - 1 - x, truth.height - 1 - y) < 1e-6  # noqa: E731
    assert on_border(x0, y0) and on_border(x1, y1)
    t = np.linspace(0.05, 0.95, 200)
    cols = np.rint(x0 + t * (x1 - x0)).astype(int)
    rows = np.rint(y0 + t * (y1 - y0)).astype(int)
    for i in range(len(truth.frames)):
        image = _pixels(truth, i)
        excess = np.median(image[rows, cols]) - np.median(image)
        if i == trail:
            assert excess > 0.5 * truth.frames[i].trail_peak_adu * truth.frames[i].transparency
        else:
            assert abs(excess) < 60


# --------------------------------------------------------------------------- reproducibility, edges


def test_same_seed_same_bytes(tmp_path):
    spec = dataclasses.replace(SMALL, panels=(1, 1), frames_per_panel=2, scale=0.15)
    first = generate_demo(tmp_path / "a", spec)
    second = generate_demo(tmp_path / "b", spec)
    other = generate_demo(tmp_path / "c", dataclasses.replace(spec, seed=spec.seed + 1))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    assert first.frame_paths[0].read_bytes() != other.frame_paths[0].read_bytes()
    assert second.frames == first.frames


def test_load_truth_round_trip(night):
    truth, _ = night
    loaded = load_truth(truth.out_dir)
    assert loaded.spec == SMALL and loaded.frames == truth.frames
    np.testing.assert_array_equal(loaded.star_flux, truth.star_flux)
    np.testing.assert_array_equal(loaded.star_ra, truth.star_ra)
    np.testing.assert_array_equal(loaded.hot_pixels, truth.hot_pixels)
    catalog = np.genfromtxt(Path(truth.out_dir) / "truth" / "catalog.csv", delimiter=",", names=True)
    assert catalog.dtype.names == ("id", "ra", "dec", "flux_r", "flux_g", "flux_b")


def test_full_size_frame_has_a_realistic_star_field(tmp_path):
    truth = generate_demo(tmp_path, DemoSpec(panels=(1, 1), frames_per_panel=1, seed=4))
    assert (truth.width, truth.height) == (1080, 1920)
    wcs = truth.wcs_for(0)
    x, y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    inside = (x >= 0) & (x < truth.width) & (y >= 0) & (y < truth.height)
    assert 700 < inside.sum() < 950  # ~1 star per 2500 px²
    flux_g = truth.star_flux[inside, 1]
    # Power law: many faint stars, a few bright ones.
    assert np.median(flux_g) < 0.02 * flux_g.max()
    assert 20 <= (flux_g >= 20000).sum() <= 80
    colour = truth.star_flux[inside, 0] / flux_g
    assert colour.min() < 0.7 and colour.max() > 1.4
    # The brightest star peaks below saturation (hot pixels aside).
    image = _pixels(truth, 0)
    image[truth.hot_pixels[:, 1], truth.hot_pixels[:, 0]] = 0
    assert 5000 < image.max() < 60000


@pytest.mark.parametrize(("ra", "dec"), [(359.9, -5.0), (10.0, 85.0)])
def test_wrap_around_and_high_declination(tmp_path, ra, dec):
    spec = dataclasses.replace(SMALL, panels=(1, 2), frames_per_panel=2, scale=0.15, ra_deg=ra, dec_deg=dec, seed=11)
    truth = generate_demo(tmp_path, spec)
    assert np.all((truth.star_ra >= 0) & (truth.star_ra < 360))
    if ra > 359:
        assert truth.star_ra.min() < 1.0 and truth.star_ra.max() > 359.0  # the catalog straddles RA = 0
    for i in range(len(truth.frames)):
        if not truth.frames[i].is_cloudy:
            assert np.median(_centroid_errors(truth, i)) < 0.06


def test_truth_star_pixels_honours_isolation_and_edges(night):
    truth, _ = night
    wcs = truth.wcs_for(0)
    ids, xs, ys = truth_star_pixels(truth, wcs, (3, truth.height, truth.width), min_flux=20000, isolation_px=10)
    assert ids.size > 0
    assert np.all((xs >= 10) & (xs <= truth.width - 11) & (ys >= 10) & (ys <= truth.height - 11))
    assert np.all(truth.star_flux[ids, 1] >= 20000)
    all_x, all_y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    for star, x, y in zip(ids, xs, ys):
        distance = np.hypot(all_x - x, all_y - y)
        distance[star] = np.inf
        assert distance.min() > 10


def test_invalid_spec_is_a_user_error(tmp_path):
    with pytest.raises(DemoSpecError) as info:
        generate_demo(tmp_path, dataclasses.replace(SMALL, scale=0.0))
    assert info.value.key == "demo_error_invalid_spec" and info.value.params["field"] == "scale"

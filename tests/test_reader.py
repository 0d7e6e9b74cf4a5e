"""FITS reader: layer data for sub-frames (CFA debayered, RGB, mono) and science mosaics; never raises."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from napari_zemosaic._reader import napari_get_reader, read_fits


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("reader_night")
    return root, generate_demo(root, DemoSpec(panels=(1, 1), frames_per_panel=2, scale=0.15, seed=4))


def _tan_header(shape: tuple[int, int]) -> fits.Header:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [10.0, 20.0]
    wcs.wcs.crpix = [shape[1] / 2.0, shape[0] / 2.0]
    wcs.wcs.cd = [[-2.0 / 3600, 0.0], [0.0, 2.0 / 3600]]
    return wcs.to_header()


def test_only_fits_names_get_the_reader(tmp_path):
    assert napari_get_reader(str(tmp_path / "image.png")) is None
    assert napari_get_reader([str(tmp_path / "a.fit"), str(tmp_path / "b.tif")]) is None
    for name in ("a.fit", "b.FITS", "c.fts", "d.fits.fz"):
        assert napari_get_reader(str(tmp_path / name)) is read_fits


def test_cfa_frame_is_debayered_with_header_and_wcs(night):
    from napari_zemosaic.engine.frames import load_frame, read_frame_info

    root, truth = night
    path = truth.frame_paths[0]
    layers = napari_get_reader(str(path))(str(path))
    assert len(layers) == 1
    data, meta, kind = layers[0]
    assert kind == "image" and meta["rgb"] is True
    assert meta["name"] == path.name[: -len(".fit")]  # "Light_M42_10.0s_..." keeps its dots
    assert data.shape == (truth.height, truth.width, 3)
    expected = load_frame(read_frame_info(path), hot_pixel_correction=False)
    np.testing.assert_array_equal(data, np.moveaxis(expected, 0, -1))
    assert meta["metadata"]["header"]["BAYERPAT"] == "GRBG"
    # The WCS in metadata puts the brightest truth star where the truth WCS does.
    wcs = meta["metadata"]["wcs"]
    star = int(np.argmax(truth.star_flux[:, 1] * _inside(truth, truth.wcs_for(0))))
    got = wcs.all_world2pix([[truth.star_ra[star], truth.star_dec[star]]], 0)[0]
    want = truth.wcs_for(0).all_world2pix([[truth.star_ra[star], truth.star_dec[star]]], 0)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    low, high = meta["contrast_limits"]
    assert np.percentile(data, 0.5) == pytest.approx(low) and np.percentile(data, 99.8) == pytest.approx(high)


def _inside(truth, wcs) -> np.ndarray:
    x, y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    return (x > 5) & (x < truth.width - 5) & (y > 5) & (y < truth.height - 5)


def test_mono_and_rgb_cubes(tmp_path):
    rng = np.random.default_rng(0)
    mono = rng.normal(100.0, 5.0, (40, 60)).astype(np.float32)
    fits.PrimaryHDU(mono, header=_tan_header(mono.shape)).writeto(tmp_path / "mono.fits")
    (layer,) = read_fits(str(tmp_path / "mono.fits"))
    np.testing.assert_array_equal(layer[0], mono)
    assert layer[1].get("rgb") is None and layer[1]["metadata"]["wcs"].has_celestial
    ra, dec = layer[1]["metadata"]["wcs"].all_pix2world([[29.0, 19.0]], 0)[0]
    assert ra == pytest.approx(10.0, abs=1e-3) and dec == pytest.approx(20.0, abs=1e-3)

    cube = rng.normal(100.0, 5.0, (3, 40, 60)).astype(np.float32)
    cube[2] += 50.0
    fits.PrimaryHDU(cube).writeto(tmp_path / "rgb.fit")
    (layer,) = read_fits(str(tmp_path / "rgb.fit"))
    assert layer[1]["rgb"] is True and layer[1]["metadata"]["wcs"] is None
    np.testing.assert_array_equal(layer[0][..., 2], cube[2])


def test_science_mosaic_brings_alpha_and_coverage(tmp_path):
    from napari_zemosaic.engine.outputs import write_science_fits

    data = np.ones((3, 30, 50), dtype=np.float32)
    alpha = np.full((30, 50), 255, dtype=np.uint8)
    alpha[:, :5] = 0
    coverage = np.linspace(0.0, 7.0, 30 * 50, dtype=np.float32).reshape(30, 50)
    header = fits.Header()
    header.extend(_tan_header((30, 50)))
    write_science_fits(tmp_path / "mosaic_science.fits", data, alpha, coverage, header, {})
    layers = read_fits([str(tmp_path / "mosaic_science.fits")])
    names = [layer[1]["name"] for layer in layers]
    assert names == ["mosaic_science", "mosaic_science alpha", "mosaic_science coverage"]
    np.testing.assert_array_equal(layers[1][0], alpha)
    np.testing.assert_array_equal(layers[2][0], coverage)
    assert layers[2][1]["contrast_limits"] == (0.0, pytest.approx(7.0))
    assert all(layer[1]["metadata"]["wcs"] is not None for layer in layers)


def test_unreadable_files_give_none_never_raise(tmp_path, night):
    _root, truth = night
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not FITS" * 100)
    truncated = tmp_path / "cut.fit"
    truncated.write_bytes(truth.frame_paths[0].read_bytes()[:5000])
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    for path in (garbage, truncated, empty, tmp_path / "missing.fits"):
        assert read_fits(str(path)) is None
    # A good file next to a bad one still reads.
    layers = read_fits([str(garbage), str(truth.frame_paths[1])])
    assert layers is not None and len(layers) == 1

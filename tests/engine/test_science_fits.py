"""The science FITS writer: astropy's bytes, the caller's arrays never touched (the preview reads
them on another thread while the FITS is written)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from napari_zemosaic.engine import outputs
from napari_zemosaic.engine.outputs import write_hdus_in_strips, write_science_fits


def _wcs_header(shape: tuple[int, int]) -> fits.Header:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [83.8, -5.4]
    wcs.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    wcs.wcs.cdelt = [-6.6e-4, 6.6e-4]
    return wcs.to_header()


def _mosaic(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.normal(900.0, 30.0, (3, *shape)).astype(np.float32)
    data[:, : shape[0] // 7, : shape[1] // 5] = np.nan  # outside the frames
    data[1, shape[0] // 2, shape[1] // 2] = np.inf
    coverage = rng.integers(0, 40, shape).astype(np.float32)
    alpha = np.where(np.isfinite(data).all(axis=0) & (coverage > 0), 255, 0).astype(np.uint8)
    return data, alpha, coverage


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (257, 301), (600, 1100)])
def test_strips_write_astropys_bytes(tmp_path: Path, shape: tuple[int, int]) -> None:
    data, alpha, coverage = _mosaic(shape)

    def hdus() -> list:
        primary = fits.PrimaryHDU(data.copy(), header=_wcs_header(shape))
        primary.header["BUNIT"] = "ADU"
        return [primary, fits.ImageHDU(alpha.copy(), name="ALPHA"), fits.ImageHDU(coverage.copy(), name="COVERAGE")]

    fits.HDUList(hdus()).writeto(tmp_path / "astropy.fits")
    write_hdus_in_strips(tmp_path / "strips.fits", hdus())
    assert (tmp_path / "strips.fits").read_bytes() == (tmp_path / "astropy.fits").read_bytes()
    with fits.open(tmp_path / "strips.fits") as opened:
        opened.verify("exception")
        np.testing.assert_array_equal(opened[0].data, data)
        np.testing.assert_array_equal(opened["ALPHA"].data, alpha)
        np.testing.assert_array_equal(opened["COVERAGE"].data, coverage)


def test_unsigned_integers_wider_than_a_byte_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BZERO"):
        write_hdus_in_strips(tmp_path / "u16.fits", [fits.PrimaryHDU(np.zeros((4, 4), np.uint16))])


def test_science_fits_never_changes_the_arrays_it_writes(tmp_path: Path) -> None:
    """A reader thread looks at the mosaic during the whole write, as the preview does. astropy's
    ``writeto`` byteswapped the data in place for the length of the write; the reader saw it."""
    data, alpha, coverage = _mosaic((1500, 2000), seed=3)
    expected_data, expected_coverage = data.copy(), coverage.copy()
    writing = threading.Event()
    changed: list[str] = []

    def watch() -> None:
        while writing.is_set():
            if not np.array_equal(data[:, ::53, ::31], expected_data[:, ::53, ::31], equal_nan=True):
                changed.append("data")
            if not np.array_equal(coverage[::53, ::31], expected_coverage[::53, ::31]):
                changed.append("coverage")

    for attempt in range(3):
        writing.set()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            write_science_fits(tmp_path / f"mosaic{attempt}.fits", data, alpha, coverage, _wcs_header((1500, 2000)), {})
        finally:
            writing.clear()
            watcher.join()
    assert changed == []
    assert data.flags.writeable and coverage.flags.writeable
    with fits.open(tmp_path / "mosaic2.fits") as opened:
        np.testing.assert_array_equal(opened[0].data, expected_data)
        assert opened[0].header["CTYPE1"] == "RA---TAN" and opened["COVERAGE"].header["CTYPE2"] == "DEC--TAN"


def test_preview_beside_the_science_file_sees_the_mosaic(tmp_path: Path) -> None:
    """The pipeline writes both at once (``pipeline._write_outputs_side_by_side``): the preview's
    pixels are those of a preview written alone."""
    from napari_zemosaic.engine.pipeline import _write_outputs_side_by_side

    data, alpha, coverage = _mosaic((1200, 1800), seed=5)
    outputs.write_preview_png(tmp_path / "alone.png", data, alpha)
    for attempt in range(3):
        preview = tmp_path / f"beside{attempt}.png"
        _write_outputs_side_by_side(
            lambda: write_science_fits(tmp_path / "science.fits", data, alpha, coverage, _wcs_header((1200, 1800)), {}),
            lambda: outputs.write_preview_png(preview, data, alpha),
            preview,
        )
        assert preview.read_bytes() == (tmp_path / "alone.png").read_bytes()

"""Pickled WCS objects map pixels exactly as the originals (engine/wcs_exact.py): units computed
in worker processes must see the run's canvas bit for bit."""

from __future__ import annotations

import pickle

import numpy as np
from astropy.wcs import WCS, Sip

from napari_zemosaic.engine.canvas import Canvas, build_canvas, crop_canvas
from napari_zemosaic.engine.wcs_exact import exact_wcs_state, restore_exact_wcs


def _frame_wcs(ra: float, dec: float, angle_deg: float, sip: bool = False) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [960.5 + 1 / 3, 540.5 + 1 / 7]
    scale = 1.0 / 3600 * np.pi / 3  # a scale with every bit of a float64 used
    angle = np.radians(angle_deg)
    wcs.wcs.cd = scale * np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if sip:
        a = np.zeros((3, 3))
        b = np.zeros((3, 3))
        a[2, 0], a[0, 2], b[1, 1] = 1e-7 / 3, -2e-7 / 7, 3e-7 / 11
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def _pixels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.uniform(-50, 2000, 5000), rng.uniform(-50, 1200, 5000)


def test_plain_pickling_rounds_a_computed_wcs_and_the_exact_state_restores_it() -> None:
    frames = [_frame_wcs(83.8 + k / 97, -5.39 + k / 89, 11.0 * k) for k in range(4)]
    canvas = crop_canvas(build_canvas(frames, [(1080, 1920)] * 4), (slice(3, 500), slice(7, 600)))
    x, y = _pixels()
    exact = np.array(canvas.wcs.all_pix2world(x, y, 0))
    rounded = pickle.loads(pickle.dumps(canvas.wcs))  # astropy alone: through the header text
    assert not np.array_equal(np.array(rounded.all_pix2world(x, y, 0)), exact)  # what this module is for
    restored = restore_exact_wcs(pickle.loads(pickle.dumps(canvas.wcs)), exact_wcs_state(canvas.wcs))
    assert np.array_equal(np.array(restored.all_pix2world(x, y, 0)), exact)
    again = pickle.loads(pickle.dumps(canvas))  # a Canvas does it itself
    assert isinstance(again, Canvas) and again.shape == canvas.shape
    assert again.wcs.pixel_shape == canvas.wcs.pixel_shape
    assert np.array_equal(np.array(again.wcs.all_pix2world(x, y, 0)), exact)
    ra, dec = exact
    assert np.array_equal(np.array(again.wcs.all_world2pix(ra, dec, 0)), np.array(canvas.wcs.all_world2pix(ra, dec, 0)))


def test_sip_and_pc_forms_come_back_exactly() -> None:
    x, y = _pixels()
    sip = _frame_wcs(10.0 + 1 / 3, 41.0 + 1 / 7, 33.0, sip=True)
    pc = WCS(naxis=2)
    pc.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    pc.wcs.crval, pc.wcs.crpix = [200.0 + 1 / 9, -30.0 - 1 / 13], [500.5 + 1 / 3, 300.5]
    pc.wcs.cdelt = [-np.pi / 1e4, np.pi / 1e4]
    pc.wcs.pc = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    pc.wcs.set()
    for wcs in (sip, pc):
        restored = restore_exact_wcs(pickle.loads(pickle.dumps(wcs)), exact_wcs_state(wcs))
        assert np.array_equal(np.array(restored.all_pix2world(x, y, 0)), np.array(wcs.all_pix2world(x, y, 0)))
    assert restore_exact_wcs(None, None) is None and exact_wcs_state(None) is None


def test_a_frame_with_a_computed_wcs_pickles_exactly(tmp_path) -> None:
    """A FrameInfo carries its WCS bit for bit (a plate solution is computed, not read)."""
    import dataclasses

    from napari_zemosaic.engine.demo import DemoSpec, generate_demo
    from napari_zemosaic.engine.frames import read_frame_info

    generate_demo(tmp_path, DemoSpec(panels=(1, 1), frames_per_panel=1, scale=0.1, seed=4))
    info = read_frame_info(next((tmp_path / "frames").glob("*.fit")))
    solved = dataclasses.replace(info, wcs=_frame_wcs(83.8 + 1 / 97, -5.39 + 1 / 89, 17.0, sip=True))
    x, y = _pixels()
    again = pickle.loads(pickle.dumps(solved))
    assert np.array_equal(np.array(again.wcs.all_pix2world(x, y, 0)), np.array(solved.wcs.all_pix2world(x, y, 0)))
    assert again.path == solved.path and again.shape == solved.shape and again.header == solved.header
    assert pickle.loads(pickle.dumps(dataclasses.replace(info, wcs=None))).wcs is None

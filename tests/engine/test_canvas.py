"""Global canvas: tangent point, scale, size, footprints, cropping (astropy WCS as the oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from napari_zemosaic.engine.canvas import (
    Canvas,
    CanvasError,
    autocrop_slices,
    build_canvas,
    crop_canvas,
    footprint_polygon,
    frame_bbox_on_canvas,
    frame_bboxes_on_canvas,
    pixel_scale_arcsec,
)

FRAME_SHAPE = (108, 192)  # (H, W): a Seestar frame at 1/10 size


def frame_wcs(
    ra: float,
    dec: float,
    *,
    scale_arcsec: float = 24.0,
    rotation_deg: float = 0.0,
    shape: tuple[int, int] = FRAME_SHAPE,
    sip: dict[str, float] | None = None,
) -> WCS:
    """A frame WCS centred on (ra, dec), rotated on the sky, optionally with SIP terms."""
    height, width = shape
    header = fits.Header()
    suffix = "-SIP" if sip else ""
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN" + suffix, "DEC--TAN" + suffix
    header["CRVAL1"], header["CRVAL2"] = ra % 360.0, dec
    header["CRPIX1"], header["CRPIX2"] = (width + 1) / 2.0, (height + 1) / 2.0
    theta = np.radians(rotation_deg)
    scale = scale_arcsec / 3600.0
    header["CD1_1"], header["CD1_2"] = -scale * np.cos(theta), scale * np.sin(theta)
    header["CD2_1"], header["CD2_2"] = scale * np.sin(theta), scale * np.cos(theta)
    if sip:
        header["A_ORDER"] = header["B_ORDER"] = 2
        for key, value in sip.items():
            header[key] = value
    wcs = WCS(header)
    wcs.pixel_shape = (width, height)
    return wcs


def world_of(wcs: WCS, x: np.ndarray, y: np.ndarray) -> SkyCoord:
    ra, dec = wcs.all_pix2world(x, y, 0)
    return SkyCoord(ra, dec, unit="deg")


def assert_inside(canvas: Canvas, polygon: np.ndarray) -> None:
    height, width = canvas.shape
    assert np.all(np.isfinite(polygon))
    assert polygon[:, 0].min() >= -0.5 and polygon[:, 0].max() <= width - 0.5
    assert polygon[:, 1].min() >= -0.5 and polygon[:, 1].max() <= height - 0.5


def test_canvas_covers_every_frame_with_padding_and_is_north_up() -> None:
    step = 192 * 24 / 3600 * 0.8  # 20 % overlap between panels, in degrees
    wcs_list = [
        frame_wcs(150.0 + i * step / np.cos(np.radians(30.0)), 30.0 + j * step * 108 / 192, rotation_deg=5 * i)
        for i in range(3)
        for j in range(2)
    ]
    canvas = build_canvas(wcs_list, [FRAME_SHAPE] * len(wcs_list), padding_pct=5.0)
    height, width = canvas.shape
    polygons = np.concatenate([footprint_polygon(w, FRAME_SHAPE, canvas.wcs) for w in wcs_list])
    assert_inside(canvas, polygons)
    # About 5 % of the footprint extent is left free on each side.
    extent_x = polygons[:, 0].max() - polygons[:, 0].min()
    assert polygons[:, 0].min() == pytest.approx(0.05 * extent_x, abs=1.5)
    assert (width - 1) - polygons[:, 0].max() == pytest.approx(0.05 * extent_x, abs=1.5)
    # North up, east left, square pixels at the median scale.
    cd = canvas.wcs.pixel_scale_matrix
    assert cd[0, 1] == 0 and cd[1, 0] == 0 and cd[0, 0] < 0 < cd[1, 1]
    assert cd[1, 1] == pytest.approx(24.0 / 3600.0)
    # The tangent point is the centre of the frames: the middle of the 3×2 layout.
    centre = world_of(canvas.wcs, np.array([float(canvas.wcs.wcs.crpix[0] - 1)]), np.array([float(canvas.wcs.wcs.crpix[1] - 1)]))
    expected = SkyCoord(150.0 + step / np.cos(np.radians(30.0)), 30.0 + step * 108 / 192 / 2, unit="deg")
    assert centre.separation(expected).deg[0] < 0.05
    # Every frame's bounding box lies on the canvas and contains its polygon.
    for wcs in wcs_list:
        y0, y1, x0, x1 = frame_bbox_on_canvas(wcs, FRAME_SHAPE, canvas)
        polygon = footprint_polygon(wcs, FRAME_SHAPE, canvas.wcs)
        assert x0 <= polygon[:, 0].min() + 0.5 and polygon[:, 0].max() - 0.5 <= x1 - 1
        assert y0 <= polygon[:, 1].min() + 0.5 and polygon[:, 1].max() - 0.5 <= y1 - 1


def test_pixel_scale_is_the_median_unless_given() -> None:
    scales = [20.0, 24.0, 30.0, 23.0, 26.0]
    wcs_list = [frame_wcs(80.0 + 0.2 * i, -5.0, scale_arcsec=s) for i, s in enumerate(scales)]
    assert [pixel_scale_arcsec(w) for w in wcs_list] == pytest.approx(scales)
    canvas = build_canvas(wcs_list, [FRAME_SHAPE] * 5)
    assert pixel_scale_arcsec(canvas.wcs) == pytest.approx(24.0)
    finer = build_canvas(wcs_list, [FRAME_SHAPE] * 5, pixel_scale_arcsec=12.0)
    assert pixel_scale_arcsec(finer.wcs) == pytest.approx(12.0)
    # Half the pixel size → about twice the pixels a side.
    assert finer.shape[1] == pytest.approx(2 * canvas.shape[1], rel=0.02)


def test_pixel_scale_reads_pc_cdelt_headers() -> None:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-2.0 / 3600, 2.0 / 3600]
    theta = np.radians(40.0)
    wcs.wcs.pc = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    assert pixel_scale_arcsec(wcs) == pytest.approx(2.0)


def test_ra_wrap_gives_a_small_canvas_centred_on_ra_zero() -> None:
    ras = [359.85, 359.95, 0.05, 0.15]
    wcs_list = [frame_wcs(ra, 10.0, rotation_deg=3.0) for ra in ras]
    canvas = build_canvas(wcs_list, [FRAME_SHAPE] * 4, padding_pct=2.0)
    # 0.3° of RA at Dec 10 plus one frame width (1.28°), at 24"/px: ≈ 240 px, not 54 000.
    assert canvas.shape[1] < 300 and canvas.shape[0] < 150
    centre = SkyCoord(*canvas.wcs.wcs.crval, unit="deg")
    assert centre.separation(SkyCoord(0.0, 10.0, unit="deg")).deg < 0.01
    for wcs in wcs_list:
        assert_inside(canvas, footprint_polygon(wcs, FRAME_SHAPE, canvas.wcs))


def test_near_pole_canvas_holds_frames_and_keeps_sky_positions() -> None:
    wcs_list = [frame_wcs(ra, 85.0, rotation_deg=ra / 4) for ra in (0.0, 20.0, 40.0, 60.0)]
    canvas = build_canvas(wcs_list, [FRAME_SHAPE] * 4)
    # RA 0→60 at Dec 85 is 5.2° of sky, plus one frame: ≈ 6.5° at 24"/px, not a polar cap.
    assert max(canvas.shape) < 1100
    for wcs in wcs_list:
        polygon = footprint_polygon(wcs, FRAME_SHAPE, canvas.wcs)
        assert_inside(canvas, polygon)
        # A pixel of the frame lands on the canvas where the sky says it should.
        sky = world_of(wcs, np.array([10.0, 150.0]), np.array([20.0, 90.0]))
        x, y = canvas.wcs.all_world2pix(sky.ra.deg, sky.dec.deg, 0)
        assert world_of(canvas.wcs, x, y).separation(sky).arcsec.max() < 1e-6


def test_frame_containing_the_pole() -> None:
    wcs_list = [frame_wcs(0.0, 89.8), frame_wcs(120.0, 89.7, rotation_deg=30.0)]
    canvas = build_canvas(wcs_list, [FRAME_SHAPE] * 2)
    for wcs in wcs_list:
        assert_inside(canvas, footprint_polygon(wcs, FRAME_SHAPE, canvas.wcs))
    pole_x, pole_y = canvas.wcs.all_world2pix([0.0], [90.0], 0)
    assert 0 <= pole_x[0] < canvas.shape[1] and 0 <= pole_y[0] < canvas.shape[0]


def test_footprint_of_a_rotated_frame_is_a_rotated_polygon() -> None:
    frame = frame_wcs(200.0, 40.0, rotation_deg=30.0)
    canvas = build_canvas([frame], [FRAME_SHAPE], padding_pct=0.0)
    polygon = footprint_polygon(frame, FRAME_SHAPE, canvas.wcs, points_per_edge=8)
    assert polygon.shape == (32, 2)
    # First edge runs along the frame's x axis: rotated by 30° on the north-up canvas.
    dx, dy = polygon[8] - polygon[0]
    assert abs(np.degrees(np.arctan2(dy, dx))) == pytest.approx(30.0, abs=0.2)
    assert np.hypot(dx, dy) == pytest.approx(192.0, rel=2e-3)
    # Area is the frame's (shoelace), far below the bounding box's.
    x, y = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert area == pytest.approx(192 * 108, rel=5e-3)
    assert area < 0.7 * (np.ptp(x) * np.ptp(y))


def test_footprint_follows_sip_distortion() -> None:
    sip = {"A_0_2": 3e-4, "B_2_0": 3e-4}  # bends the long edges by 3e-4·96² ≈ 2.8 px
    frame = frame_wcs(10.0, 0.0, sip=sip)
    canvas = build_canvas([frame], [FRAME_SHAPE])
    polygon = footprint_polygon(frame, FRAME_SHAPE, canvas.wcs, points_per_edge=8)
    # Oracle: each outline point through astropy directly.
    x = np.array([-0.5, 47.5, 95.5, 191.5])
    y = np.full(4, -0.5)
    ra, dec = frame.all_pix2world(x, y, 0)
    expected = np.stack(canvas.wcs.all_world2pix(ra, dec, 0), axis=1)
    np.testing.assert_allclose(polygon[[0, 2, 4, 8]], expected, atol=1e-6)
    # The bottom edge is bent: its middle lies ≈ 2.8 px off the chord joining its corners.
    chord = polygon[8] - polygon[0]
    offset = polygon[4] - polygon[0]
    distance = abs(chord[0] * offset[1] - chord[1] * offset[0]) / np.hypot(*chord)
    assert distance == pytest.approx(3e-4 * 96**2, rel=0.05)


def test_crop_keeps_sky_coordinates_of_every_pixel() -> None:
    wcs_list = [frame_wcs(300.0 + 0.5 * i, -20.0, rotation_deg=12.0) for i in range(3)]
    canvas = build_canvas(wcs_list, [FRAME_SHAPE] * 3, padding_pct=10.0)
    coverage = np.zeros(canvas.shape, dtype=np.float32)
    for wcs in wcs_list:
        y0, y1, x0, x1 = frame_bbox_on_canvas(wcs, FRAME_SHAPE, canvas, margin=0)
        coverage[y0:y1, x0:x1] += 1
    rows, cols = autocrop_slices(coverage, margin_px=3)
    covered_rows = np.flatnonzero(coverage.any(axis=1))
    assert rows.start == max(covered_rows[0] - 3, 0) and rows.stop == min(covered_rows[-1] + 4, canvas.shape[0])
    cropped = crop_canvas(canvas, (rows, cols))
    assert cropped.shape == (rows.stop - rows.start, cols.stop - cols.start)
    assert cropped.wcs.pixel_shape == (cropped.shape[1], cropped.shape[0])
    rng = np.random.default_rng(1)
    x = rng.uniform(0, cropped.shape[1] - 1, 50)
    y = rng.uniform(0, cropped.shape[0] - 1, 50)
    before = world_of(canvas.wcs, x + cols.start, y + rows.start)
    after = world_of(cropped.wcs, x, y)
    assert after.separation(before).arcsec.max() < 1e-6


def test_autocrop_of_empty_coverage_is_the_whole_canvas_and_margins_clip() -> None:
    coverage = np.zeros((20, 30))
    assert autocrop_slices(coverage, 5) == (slice(0, 20), slice(0, 30))
    coverage[1, 27] = 1
    assert autocrop_slices(coverage, 5) == (slice(0, 7), slice(22, 30))


def test_to_dict_round_trip_through_json() -> None:
    canvas = build_canvas([frame_wcs(359.9, 45.0), frame_wcs(0.2, 45.1)], [FRAME_SHAPE] * 2)
    restored = Canvas.from_dict(json.loads(json.dumps(canvas.to_dict())))
    assert restored.shape == canvas.shape
    x, y = np.array([0.0, 123.4, canvas.shape[1] - 1.0]), np.array([0.0, 45.6, canvas.shape[0] - 1.0])
    assert world_of(restored.wcs, x, y).separation(world_of(canvas.wcs, x, y)).arcsec.max() < 1e-6
    header = canvas.header()
    assert (header["NAXIS1"], header["NAXIS2"]) == (canvas.shape[1], canvas.shape[0])
    assert header["CTYPE1"] == "RA---TAN"


def test_frame_off_the_canvas_has_no_bbox() -> None:
    canvas = build_canvas([frame_wcs(50.0, 10.0)], [FRAME_SHAPE])
    assert frame_bbox_on_canvas(frame_wcs(55.0, 10.0), FRAME_SHAPE, canvas) is None


def test_boxes_of_many_frames_are_those_of_one_frame_at_a_time() -> None:
    """frame_bboxes_on_canvas (every outline taken to the canvas in one call) gives each frame the
    box frame_bbox_on_canvas gives it: rotated, SIP-distorted, partly and wholly off the canvas."""
    sip = {"A_2_0": 2e-6, "B_0_2": -3e-6, "A_1_1": 1e-6}
    frames = [frame_wcs(50.0, 10.0), frame_wcs(50.3, 10.2, rotation_deg=33.0), frame_wcs(49.8, 9.9, sip=sip),
              frame_wcs(50.1, 10.1, rotation_deg=-71.0, sip=sip)]
    canvas = build_canvas(frames[:3], [FRAME_SHAPE] * 3)
    frames += [frame_wcs(55.0, 10.0)]  # off the canvas; the fourth one crosses its edge
    boxes = frame_bboxes_on_canvas(frames, [FRAME_SHAPE] * len(frames), canvas)
    assert boxes == [frame_bbox_on_canvas(wcs, FRAME_SHAPE, canvas) for wcs in frames]
    assert boxes[-1] is None and all(box is not None for box in boxes[:4])
    assert frame_bboxes_on_canvas([], [], canvas) == []


def test_absurd_inputs_raise_clear_errors() -> None:
    frames = [frame_wcs(10.0, 0.0), frame_wcs(10.5, 0.0)]
    with pytest.raises(CanvasError) as too_large:
        build_canvas(frames, [FRAME_SHAPE] * 2, pixel_scale_arcsec=0.01)
    assert too_large.value.key == "canvas_error_too_large"
    with pytest.raises(CanvasError) as too_wide:
        build_canvas([frame_wcs(10.0, 0.0), frame_wcs(190.0, 0.0), frame_wcs(100.0, 0.0)], [FRAME_SHAPE] * 3)
    assert too_wide.value.key == "canvas_error_too_wide"
    with pytest.raises(ValueError):
        build_canvas(frames, [FRAME_SHAPE] * 2, orientation="equatorial_east_up")


def test_outline_pixels_walk_the_pixel_edges_and_are_shared_read_only() -> None:
    from napari_zemosaic.engine.canvas import outline_pixels

    points = outline_pixels((3, 5), 2)
    expected = [(-0.5, -0.5), (2.0, -0.5), (4.5, -0.5), (4.5, 1.0), (4.5, 2.5), (2.0, 2.5), (-0.5, 2.5), (-0.5, 1.0)]
    assert [tuple(p) for p in points.tolist()] == expected
    assert outline_pixels((np.int64(3), np.int64(5)), 2) is points  # one array per frame shape
    with pytest.raises(ValueError):
        points[0, 0] = 0.0

"""Console API: Session and show, headless and with a (Qt-free) napari viewer model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_zemosaic import Session, show

SPEC = dict(panels=(2, 2), frames_per_panel=3, scale=0.15, seed=21)
# sky_mean keeps a run to a few seconds on 2-core CI; nothing here depends on the normalisation.
CONFIG = {"max_memory_mb": 256, "stacking_normalize_method": "sky_mean", "language": "en"}


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("api_night")
    return root, generate_demo(root, DemoSpec(**SPEC))


@pytest.fixture(scope="module")
def headless_run(night, tmp_path_factory):
    """A headless session: scan, exclude one panel's first frame, run on the rest."""
    root, truth = night
    session = Session(root / "frames", tmp_path_factory.mktemp("api_out"), config=CONFIG)
    session.scan()
    dropped = session.exclude([0])
    result = session.run(workflow="mosaic-first", gpu="off")
    return session, dropped, result


def _centroid(image: np.ndarray, x: float, y: float, half: int = 4) -> tuple[float, float]:
    """Background-subtracted intensity-weighted centroid in a (2·half+1)² box."""
    ix, iy = int(round(x)), int(round(y))
    box = image[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(np.float64)
    ring = np.concatenate([box[0], box[-1], box[1:-1, 0], box[1:-1, -1]])
    weights = np.clip(box - np.median(ring), 0.0, None)
    rows, cols = np.mgrid[-half : half + 1, -half : half + 1]
    total = weights.sum()
    return ix + float((weights * cols).sum() / total), iy + float((weights * rows).sum() / total)


def _bright_stars(truth, wcs, shape, alpha=None):
    from napari_zemosaic.engine.demo import truth_star_pixels

    ids, x, y = truth_star_pixels(truth, wcs, shape, min_flux=20000.0, isolation_px=12.0, edge_px=15.0)
    if alpha is not None:
        keep = [alpha[int(round(yy)) - 6 : int(round(yy)) + 7, int(round(xx)) - 6 : int(round(xx)) + 7].min() > 0 for xx, yy in zip(x, y)]
        ids, x, y = ids[keep], x[keep], y[keep]
    return ids, x, y


def test_scan_lists_frames_with_footprints_on_the_canvas(night):
    root, truth = night
    session = Session(root / "frames", config=CONFIG)
    frames = session.scan()
    assert len(frames) == len(truth.frames) and session.included.all()
    from napari_zemosaic.engine.canvas import footprint_polygon

    for info, polygon in zip(session.frames, session.footprints):
        expected = footprint_polygon(info.wcs, info.shape, session.canvas.wcs)
        np.testing.assert_allclose(polygon, expected)
        # Every footprint lies on the canvas (the canvas is built around them).
        assert polygon[:, 0].min() >= -0.5 and polygon[:, 0].max() <= session.canvas.shape[1] - 0.5
        assert polygon[:, 1].min() >= -0.5 and polygon[:, 1].max() <= session.canvas.shape[0] - 0.5


def test_distance_selection_is_the_great_circle_distance(night):
    from astropy.coordinates import SkyCoord

    root, _truth = night
    session = Session(root / "frames", config=CONFIG)
    session.scan()
    height, width = session.canvas.shape
    ra0, dec0 = session.canvas.wcs.all_pix2world([[(width - 1) / 2.0, (height - 1) / 2.0]], 0)[0]
    centres = np.array([info.centre for info in session.frames])
    expected = SkyCoord(centres[:, 0], centres[:, 1], unit="deg").separation(SkyCoord(ra0, dec0, unit="deg")).deg
    np.testing.assert_allclose(session.distances_deg, expected, atol=1e-9)
    threshold = float(np.median(expected))
    excluded = session.exclude(farther_than_deg=threshold)
    assert sorted(excluded) == np.flatnonzero(expected > threshold).tolist()
    assert np.array_equal(session.included, expected <= threshold)
    session.include_all()
    assert session.included.all()


def test_selectors_paths_instruments_and_table(night, tmp_path):
    root, _truth = night
    session = Session(root / "frames", config=CONFIG)
    session.scan()
    assert session.exclude(paths=[session.frames[2].path]) == [2]
    assert session.exclude(instruments=["Seestar S50"]) == [i for i in range(len(session.frames)) if i != 2]
    assert not session.included.any()
    assert session.include([1, 3]) == [1, 3]
    assert session.included_paths == [str(session.frames[1].path), str(session.frames[3].path)]
    out = session.export_csv(tmp_path / "frames.csv")
    with out.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["included"] for row in rows] == ["True" if i in (1, 3) else "False" for i in range(len(session.frames))]
    assert rows[0]["file"] == session.frames[0].path.name and float(rows[0]["distance_deg"]) > 0
    with pytest.raises(IndexError):
        session.exclude([len(session.frames)])


def test_unusable_files_are_listed_with_their_reason(night, tmp_path):
    import shutil

    root, _truth = night
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((root / "frames").glob("*.fit"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.fits").write_bytes(b"not a fits file at all")
    session = Session(folder, config=CONFIG)
    session.scan()
    assert len(session.frames) == 3 and len(session.unusable) == 1
    last = session.frame_table()[-1]
    assert last["file"] == "broken.fits" and last["reason_key"].startswith("frame_excluded_") and last["included"] is False


def test_headless_run_uses_the_inclusion_set(headless_run, night):
    session, dropped, result = headless_run
    root, truth = night
    assert dropped == [0]
    assert result.status == "ok" and result.science_path.is_file()
    report = json.loads(result.report_path.read_text())
    quality = [e for e in report["frames"]["excluded"] if e["reason_key"].startswith("frame_excluded_quality_")]
    assert report["frames"]["used"] == len(truth.frames) - 1 - len(quality)
    assert report["frames"]["found"] == len(truth.frames) - 1  # the excluded file is not even read
    assert report["config"]["use_gpu_phase5"] is False and report["workflow_requested"] == "mosaic_first"
    # The mosaic is astrometrically right: truth stars sit where the result's WCS says.
    image = result.data.sum(axis=0)
    ids, x, y = _bright_stars(truth, result.canvas.wcs, image.shape, result.alpha)
    assert len(ids) >= 5
    errors = [np.hypot(*np.subtract(_centroid(image, xx, yy), (xx, yy))) for xx, yy in zip(x, y)]
    assert float(np.median(errors)) < 0.3


def test_sds_preview_headless(night):
    pytest.importorskip("napari_zemosaic.engine.sds")
    root, _truth = night
    session = Session(root / "frames", config=CONFIG)
    session.scan()
    session.exclude([5])
    batches = session.preview_sds(coverage_threshold=0.95, min_batch_size=2, target_batch_size=4)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == [i for i in range(len(session.frames)) if i != 5]  # every included frame once
    assert all(len(batch) <= 4 for batch in batches[:-1])
    assert len(session.sds.coverage_fractions) == len(batches)
    assert all(0.0 < f <= 1.0 for f in session.sds.coverage_fractions)
    groups = session.use_as_preplan()
    assert session.config["preplan_master_groups"] == groups
    assert groups[0][0] == str(session.frames[batches[0][0]].path)
    session.include([5])  # a new selection drops the preview and the preplan built from it
    assert session.sds is None and session.preplan == []


def test_session_with_a_viewer_model_adds_aligned_layers(headless_run, night):
    """With a viewer (no Qt needed for the model), the same layers as the widgets appear."""
    from napari.components import ViewerModel

    headless, _dropped, result = headless_run
    root, truth = night
    viewer = ViewerModel()
    session = Session(root / "frames", result.output_dir, config=CONFIG, viewer=viewer)
    session.scan()
    assert "frames" in viewer.layers and viewer.layers["frames"].nshapes == len(session.frames)
    show(result, viewer)
    assert {"mosaic", "alpha", "coverage", "frames"} <= {layer.name for layer in viewer.layers}
    mosaic, frames = viewer.layers["mosaic"], viewer.layers["frames"]
    assert mosaic.rgb and tuple(mosaic.contrast_limits) == (0.0, 1.0)
    assert mosaic.metadata["linear"] is result.data
    # A star measured in the mosaic pixels lands where the frames layer's WCS puts it.
    image = result.data.sum(axis=0)
    ids, x, y = _bright_stars(truth, result.canvas.wcs, image.shape, result.alpha)
    scan_wcs = frames.metadata["wcs"]
    for star, xx, yy in zip(ids[:5], x[:5], y[:5]):
        cx, cy = _centroid(image, xx, yy)
        world_from_mosaic = mosaic.data_to_world((cy, cx))
        i = int(np.flatnonzero(truth.star_ids == star)[0])
        sx, sy = scan_wcs.all_world2pix([[truth.star_ra[i], truth.star_dec[i]]], 0)[0]
        world_from_frames = frames.data_to_world((sy, sx))
        assert np.hypot(*np.subtract(world_from_mosaic, world_from_frames)) < 1.0
    # The run's canvas (11 frames) has another tangent point than the scan's (12 frames):
    # the fitted affine still agrees with the exact WCS chain to a hundredth of a pixel.
    height, width = result.canvas.shape
    corners = np.array([[0, 0], [0, width - 1], [height - 1, 0], [height - 1, width - 1], [height / 2, width / 3]])
    ra, dec = result.canvas.wcs.all_pix2world(corners[:, 1], corners[:, 0], 0)
    x, y = scan_wcs.all_world2pix(ra, dec, 0)
    exact = np.stack([y, x], axis=1)
    fitted = np.array([mosaic.data_to_world(p) for p in corners])
    assert np.abs(fitted - exact).max() < 0.01
    assert not np.allclose(result.canvas.wcs.wcs.crval, scan_wcs.wcs.crval, rtol=0, atol=1e-9)
    # The headless session's run knew nothing of this viewer.
    assert headless.viewer is None


def test_show_reads_a_science_file(headless_run):
    from napari.components import ViewerModel

    _session, _dropped, result = headless_run
    viewer = ViewerModel()
    layers = show(str(result.science_path), viewer)
    assert [layer.name for layer in layers] == ["mosaic", "alpha", "coverage"]
    np.testing.assert_array_equal(viewer.layers["alpha"].data, result.alpha)
    np.testing.assert_allclose(viewer.layers["mosaic"].metadata["linear"], result.data)


def test_large_mosaics_become_multiscale_on_the_same_pixel_frame(headless_run):
    from napari.components import ViewerModel

    from napari_zemosaic._widgets.layers import prepare_mosaic_display, show_mosaic

    _session, _dropped, result = headless_run
    display = prepare_mosaic_display(result, max_side=128)  # pretend the GL texture limit is 128 px
    shapes = [level.shape[:2] for level in display.mosaic]
    assert len(shapes) >= 3 and max(shapes[-1]) <= 128
    assert all(b == (a[0] // 2, a[1] // 2) for a, b in zip(shapes, shapes[1:]))
    viewer = ViewerModel()
    mosaic, alpha, coverage = show_mosaic(viewer, display)
    assert mosaic.multiscale and alpha.multiscale and coverage.multiscale
    np.testing.assert_allclose(mosaic.data[0], display.mosaic[0])
    # Level 1 is the 2x2 mean of level 0 (the display copy is stretched once, then reduced).
    np.testing.assert_allclose(mosaic.data[1][5, 7], display.mosaic[0][10:12, 14:16].mean(axis=(0, 1)), rtol=1e-5)


def test_coarse_sds_coverage_grids_sit_on_the_canvas(night):
    """Coverage grids coarser than the canvas carry the WCS of their cells; their affine follows from it."""
    pytest.importorskip("napari_zemosaic.engine.sds")
    from napari.components import ViewerModel

    from napari_zemosaic._widgets.layers import prepare_sds_display, show_sds

    root, _truth = night
    session = Session(root / "frames", config=CONFIG)
    session.scan()
    batches = [list(range(0, 6)), list(range(6, len(session.frames)))]
    display = prepare_sds_display(batches, session.footprints, session.canvas, session.included, max_side=64)
    step = display.step
    assert step > 1 and display.total_coverage.shape == tuple(-(-n // step) for n in session.canvas.shape)
    viewer = ViewerModel()
    session.viewer = viewer
    session.show_frames()
    layers = show_sds(viewer, display)
    total = viewer.layers["coverage"]
    assert [layer.name for layer in layers[1:3]] == ["SDS batch 1 coverage", "SDS batch 2 coverage"]
    # Cell (i, j) is centred on canvas pixel (i*step + (step-1)/2, j*step + (step-1)/2).
    np.testing.assert_allclose(total.data_to_world((3, 5)), (3 * step + (step - 1) / 2, 5 * step + (step - 1) / 2))
    # Inside a footprint far from its edges every frame of the batch covers the cell.
    np.testing.assert_array_equal(display.total_coverage, sum(display.batch_coverage))
    centre = session.footprints[0].mean(axis=0)
    i, j = (int(round((centre[1] - (step - 1) / 2) / step)), int(round((centre[0] - (step - 1) / 2) / step)))
    assert display.batch_coverage[0][i, j] >= 1
    assert viewer.layers["SDS batches"].nshapes == 2

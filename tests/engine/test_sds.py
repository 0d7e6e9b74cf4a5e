"""ZeSupaDupStack: the batch policy (seed §3.2), preplan, mega-tiles, final stack and fallbacks.

Policy tests use footprints whose covered cells are known exactly (hand-made masks, or frames
whose TAN WCS maps them onto known canvas rectangles). Science tests run SDS and Mosaic-First on
the same demo frames and the same canvas and compare star fluxes, background noise and the
levels on both sides of every mega-tile edge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from napari_zemosaic.config import validate_config
from napari_zemosaic.engine import sds
from napari_zemosaic.engine.canvas import Canvas, build_canvas, footprint_polygon
from napari_zemosaic.engine.sds import (
    Footprint,
    MegaTile,
    SdsError,
    apply_batch_policy,
    build_sds_batches,
    rasterise_polygon,
    resolve_preplan,
)
from napari_zemosaic.events import Reporter
from napari_zemosaic.engine.pipeline import drain as _drain

from starphot import aperture_flux, robust_noise_map

SCALE_DEG = 2.39 / 3600.0


# ------------------------------------------------------------------------------- helpers


def _tan(crpix: tuple[float, float], rotation_deg: float = 0.0, crval=(83.8, -5.4)) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = list(crpix)
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    wcs.wcs.cd = np.array([[-SCALE_DEG * c, SCALE_DEG * s], [SCALE_DEG * s, SCALE_DEG * c]])
    wcs.wcs.set()
    return wcs


def _canvas(height: int, width: int) -> Canvas:
    return Canvas(_tan((1.0, 1.0)), (height, width))


def _rect_frame(row0: int, col0: int, height: int, width: int):
    """A frame whose pixels land exactly on canvas rows row0.. and cols col0.. of :func:`_canvas`."""
    return (_tan((1.0 - col0, 1.0 - row0)), (height, width))


def _mask_footprint(grid_shape, rows: slice, cols: slice) -> Footprint:
    mask = np.zeros(grid_shape, dtype=bool)
    mask[rows, cols] = True
    return Footprint(0, 0, mask)


def _policy(footprints, grid_shape, threshold, min_size, target):
    union = np.zeros(grid_shape, dtype=bool)
    for footprint in footprints:
        footprint.add_to(union)
    return apply_batch_policy(
        range(len(footprints)), dict(enumerate(footprints)), grid_shape, int(union.sum()), threshold, min_size, target
    )


def _sds_keys(events) -> list[str]:
    return [e.key for e in events if getattr(e, "key", "").startswith("sds_")]


# ---------------------------------------------------------------------------- rasteriser


def _even_odd_brute_force(polygon: np.ndarray, shape) -> np.ndarray:
    """Ray casting at every cell centre (the textbook even-odd test, one point at a time)."""
    inside = np.zeros(shape, dtype=bool)
    xs, ys = polygon[:, 0], polygon[:, 1]
    n = len(xs)
    for i in range(shape[0]):
        for j in range(shape[1]):
            crossing = False
            for k in range(n):
                x1, y1, x2, y2 = xs[k], ys[k], xs[(k + 1) % n], ys[(k + 1) % n]
                if (y1 <= i) != (y2 <= i) and j < x1 + (i - y1) * (x2 - x1) / (y2 - y1):
                    crossing = not crossing
            inside[i, j] = crossing
    return inside


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rasteriser_matches_brute_force_even_odd(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (23, 31)
    # A star-shaped (concave) polygon that leaves the grid on some sides.
    angles = np.sort(rng.uniform(0, 2 * np.pi, 11))
    radii = rng.uniform(4, 16, 11)
    polygon = np.stack([15 + radii * np.cos(angles), 11 + radii * np.sin(angles)], axis=1)
    footprint = rasterise_polygon(polygon, shape)
    expected = _even_odd_brute_force(polygon, shape)
    got = np.zeros(shape, dtype=bool)
    footprint.add_to(got)
    assert np.array_equal(got, expected)


def test_rotated_frame_covers_its_true_outline_not_its_bounding_box() -> None:
    canvas = _canvas(400, 400)
    # A 141 x 141 px frame rotated by 45 degrees, centred on canvas pixel (200, 200).
    side = 141
    centre = canvas.wcs.all_pix2world([[200.0, 200.0]], 0)[0]
    frame = (_tan(((side + 1) / 2, (side + 1) / 2), rotation_deg=45.0, crval=tuple(centre)), (side, side))
    plan = build_sds_batches([frame], canvas, 0.9, 1, 1)
    area = float(side * side)
    assert plan.cell_px == 1
    assert plan.denominator == pytest.approx(area, rel=0.01)  # the bounding box would be 2x the area
    assert plan.batches == [[0]] and plan.coverage == [1.0]


# ---------------------------------------------------------------------- the batch policy


def test_policy_closes_at_min_and_threshold_then_merges_leftovers() -> None:
    grid = (10, 10)
    full = [_mask_footprint(grid, slice(None), slice(None)) for _ in range(12)]
    batches, coverage = _policy(full, grid, 0.9, 5, 10)
    # every frame covers the field: batches close as soon as they hold min frames; 2 leftovers merge
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
    assert coverage == [1.0, 1.0]


def test_policy_waits_for_the_threshold_after_min() -> None:
    grid = (10, 10)
    quarters = [(slice(0, 5), slice(0, 5)), (slice(0, 5), slice(5, 10)), (slice(5, 10), slice(0, 5)), (slice(5, 10), slice(5, 10))]
    frames = [_mask_footprint(grid, *quarters[i % 4]) for i in range(8)]
    batches, coverage = _policy(frames, grid, 0.99, 2, 10)
    # min 2 is reached after two quarters (50 %), but the batch only closes at 100 %
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert coverage == [1.0, 1.0]


def test_policy_force_closes_at_target_and_keeps_a_leftover_of_min_size() -> None:
    grid = (10, 10)
    halves = [_mask_footprint(grid, slice(0, 10), slice(0, 5)) for _ in range(25)]
    halves.append(_mask_footprint(grid, slice(0, 10), slice(5, 10)))  # makes the union the whole grid
    batches, coverage = _policy(halves, grid, 0.9, 5, 10)
    assert [len(b) for b in batches] == [10, 10, 6]
    assert coverage[:2] == [0.5, 0.5] and coverage[2] == 1.0


def test_policy_merges_a_small_leftover_into_the_last_batch() -> None:
    grid = (10, 10)
    frames = [_mask_footprint(grid, slice(0, 10), slice(0, 5)) for _ in range(22)]
    frames.append(_mask_footprint(grid, slice(0, 10), slice(5, 10)))
    batches, coverage = _policy(frames, grid, 0.9, 5, 10)
    assert [len(b) for b in batches] == [10, 13]
    assert batches[1] == list(range(10, 23))
    assert coverage == [0.5, 1.0]  # the merged batch's coverage is recomputed


@pytest.mark.parametrize("n_frames", [1, 2, 3])
def test_policy_gives_one_batch_for_very_few_frames(n_frames: int) -> None:
    grid = (4, 4)
    frames = [_mask_footprint(grid, slice(None), slice(None)) for _ in range(n_frames)]
    batches, coverage = _policy(frames, grid, 0.92, 5, 10)
    assert batches == [list(range(n_frames))] and coverage == [1.0]


def test_frames_covering_the_whole_field_never_degenerate_to_batches_of_one() -> None:
    grid = (8, 8)
    frames = [_mask_footprint(grid, slice(None), slice(None)) for _ in range(40)]
    batches, _ = _policy(frames, grid, 0.92, 5, 10)
    assert len(batches) == 8 and all(len(b) == 5 for b in batches)


def test_build_sds_batches_on_wcs_footprints_in_input_order() -> None:
    canvas = _canvas(100, 200)
    left, right = _rect_frame(0, 0, 100, 100), _rect_frame(0, 100, 100, 100)
    frames = [left, left, right, right, left, right, left, left]
    plan = build_sds_batches(frames, canvas, coverage_threshold=0.95, min_batch_size=2, target_batch_size=5)
    assert plan.cell_px == 1 and plan.denominator == 200 * 100
    # [L, L] covers 50 %, R completes the field: close at 3; [R, L] and [R, L] close at 2 (= min,
    # 100 %); the last L alone is below min and merges into the last batch.
    assert plan.batches == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert plan.coverage == [1.0, 1.0, 1.0]
    assert plan.to_report()["batches"][0] == {"size": 3, "coverage_fraction": 1.0, "frames": [0, 1, 2]}


def test_frames_without_wcs_are_listed_and_none_at_all_is_a_clean_error() -> None:
    canvas = _canvas(50, 50)
    frame = _rect_frame(0, 0, 50, 50)
    plan = build_sds_batches([frame, (None, (50, 50)), frame], canvas, 0.9, 1, 1)
    assert plan.invalid == [(1, sds.REASON_NO_VALID_WCS)]
    assert plan.batches == [[0], [2]]
    with pytest.raises(SdsError) as caught:
        build_sds_batches([(None, (50, 50))], canvas, 0.9, 5, 10)
    assert caught.value.key == "sds_error_no_valid_batches"
    assert caught.value.params["reason"] == sds.REASON_NO_VALID_WCS
    with pytest.raises(SdsError):
        build_sds_batches([], canvas, 0.9, 5, 10)


def test_coverage_grid_has_at_most_512_cells_a_side() -> None:
    canvas = _canvas(3000, 1100)
    plan = build_sds_batches([_rect_frame(0, 0, 3000, 1100)], canvas, 0.9, 1, 1)
    assert max(plan.grid_shape) <= sds.MAX_GRID_CELLS
    assert plan.cell_px == 6 and plan.coverage == [1.0]


# ----------------------------------------------------------------------------- preplan


def _fake_frames(tmp_path: Path, n: int):
    return [
        SimpleNamespace(path=tmp_path / f"f{i:02d}.fit", wcs=object(), shape=(10, 10), is_seestar=True)
        for i in range(n)
    ]


def test_complete_preplan_is_used_and_logged(tmp_path: Path) -> None:
    frames = _fake_frames(tmp_path, 5)
    reporter = Reporter()
    groups = [[str(frames[3].path), str(frames[0].path)], [str(f.path) for f in frames[1:3]], [str(frames[4].path)]]
    assert resolve_preplan({"preplan_master_groups": groups}, frames, reporter) == [[0, 3], [1, 2], [4]]
    assert [e.key for e in reporter.log_events] == ["sds_info_preplan_used"]
    # a report's batches (dicts with "frames") and a JSON file are accepted too
    as_report = [{"size": len(g), "frames": g} for g in groups]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"batches": as_report}))
    assert resolve_preplan({"preplan_master_groups": str(path)}, frames) == [[0, 3], [1, 2], [4]]


@pytest.mark.parametrize(
    ("groups", "reason"),
    [
        ("partial", sds.REASON_PREPLAN_INCOMPLETE),
        ("unknown", sds.REASON_PREPLAN_UNKNOWN),
        ("duplicate", sds.REASON_PREPLAN_DUPLICATE),
        ("malformed", sds.REASON_PREPLAN_MALFORMED),
    ],
)
def test_unusable_preplan_is_refused_with_its_reason(tmp_path: Path, groups: str, reason: str) -> None:
    frames = _fake_frames(tmp_path, 4)
    paths = [str(f.path) for f in frames]
    value = {
        "partial": [paths[:2], paths[2:3]],
        "unknown": [paths, [str(tmp_path / "other.fit")]],
        "duplicate": [paths, paths[:1]],
        "malformed": [[1, 2], [3]],
    }[groups]
    reporter = Reporter()
    assert resolve_preplan({"preplan_master_groups": value}, frames, reporter) is None
    (event,) = reporter.log_events
    assert event.key == "sds_warn_preplan_unused" and event.params["reason"] == reason


def test_no_preplan_logs_nothing(tmp_path: Path) -> None:
    reporter = Reporter()
    assert resolve_preplan({"preplan_master_groups": []}, _fake_frames(tmp_path, 3), reporter) is None
    assert reporter.log_events == []


# ------------------------------------------------------------------- applicability, fallback


def test_sds_is_for_seestar_frames_only() -> None:
    seestar = SimpleNamespace(is_seestar=True)
    other = SimpleNamespace(is_seestar=False)
    assert sds.sds_applicable([seestar, seestar]) == (True, "")
    assert sds.sds_applicable([seestar, other]) == (False, "sds_info_disabled_not_seestar")
    assert sds.non_seestar_count([seestar, other, other]) == 2
    assert sds.sds_applicable([])[0] is False


def test_fallback_record_names_the_reason() -> None:
    reporter = Reporter()
    entry = sds.record_sds_fallback(reporter, SdsError("sds_error_batch_exception", batch=2, error="boom"))
    assert entry["from"] == "sds" and entry["to"] == "mosaic_first"
    assert entry["reason_key"] == "sds_failed_fallback_mosaic_first"
    assert "sds_error_batch_exception" in entry["detail"] and "boom" in entry["detail"]
    (event,) = reporter.log_events
    assert event.key == "sds_failed_fallback_mosaic_first" and event.level == "warning"


# ------------------------------------------------------- mega-tile I/O, photometry, masking


def test_megatile_windows_are_read_back_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    planes = rng.normal(size=(3 + sds.N_EXTRA_PLANES, 37, 53)).astype(np.float32)
    path = tmp_path / "tile.f32"
    planes.tofile(path)
    tile = MegaTile(0, (100, 137, 200, 253), path, 3, None, 1.0, 1.0, [], [])
    window = tile.read_window((110, 130, 240, 253))
    assert np.array_equal(window, planes[:, 10:30, 40:53])


def test_noise_per_unit_weight_recovers_sigma_whatever_the_depth() -> None:
    rng = np.random.default_rng(4)
    weight = np.repeat(np.linspace(1, 30, 400)[None, :], 300, axis=0).astype(np.float32)
    sigma = 7.0
    data = (1000 + rng.normal(size=(3, 300, 400)) * sigma / np.sqrt(weight)).astype(np.float32)
    data[:, :, :40] = np.nan  # an uncovered strip is ignored
    weight[:, :40] = 0
    assert sds.noise_per_unit_weight(data, weight) == pytest.approx(sigma, rel=0.03)


def _random_normalisation(n: int, channels: int, rng):
    from napari_zemosaic.engine.photometry import Normalisation

    return Normalisation(
        rng.uniform(0.7, 1.3, (n, channels)),
        rng.normal(0, 30, (n, channels)),
        rng.normal(0, 0.5, (n, channels, 2)),
        rng.uniform(0, 40, (n, 2)),
        16,
    )


def _predict(norm, index: int, sky: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """raw = gain·sky + offset + tilt·(X − centre), one channel at a time: (C, n)."""
    return (
        norm.gains[index][:, None] * sky
        + norm.offsets[index][:, None]
        + norm.tilts[index][:, 0, None] * (cols - norm.centres[index, 0])
        + norm.tilts[index][:, 1, None] * (rows - norm.centres[index, 1])
    )


def test_rebasing_keeps_every_prediction_and_makes_the_reference_neutral() -> None:
    rng = np.random.default_rng(5)
    norm = _random_normalisation(4, 3, rng)
    rebased = sds.rebase_normalisation(norm, reference=2)
    assert np.allclose(rebased.gains[2], 1) and np.allclose(rebased.offsets[2], 0) and np.allclose(rebased.tilts[2], 0)
    cols, rows = rng.uniform(0, 50, 200), rng.uniform(0, 50, 200)
    sky = rng.uniform(500, 2000, (3, 200))
    new_sky = _predict(norm, 2, sky, cols, rows)  # the reference's view of the sky
    for i in range(4):
        assert np.allclose(_predict(norm, i, sky, cols, rows), _predict(rebased, i, new_sky, cols, rows))


def test_composed_frame_normalisation_predicts_raw_frames_through_their_tile() -> None:
    rng = np.random.default_rng(6)
    inner = _random_normalisation(3, 3, rng)  # three frames inside a batch, in crop coordinates
    tile_norm = _random_normalisation(1, 3, rng)
    tile = MegaTile(0, (32, 200, 48, 300), None, 3, None, 1.0, 1.0, [4, 7, 9], [], frame_norm=inner)
    composed = sds.compose_frame_normalisation(10, 3, [tile], tile_norm)
    cols, rows = rng.uniform(10, 60, 100), rng.uniform(10, 60, 100)  # canvas coarse cells
    sky = rng.uniform(500, 2000, (3, 100))
    tile_values = _predict(tile_norm, 0, sky, cols, rows)
    origin_x, origin_y = 48 / 16, 32 / 16
    for local, index in enumerate([4, 7, 9]):
        raw = _predict(inner, local, tile_values, cols - origin_x, rows - origin_y)
        assert np.allclose(raw, _predict(composed, index, sky, cols, rows))
    assert np.allclose(composed.gains[0], 1)  # frames outside every tile stay identity


def _two_batch_tiles() -> tuple[list[MegaTile], SimpleNamespace]:
    """Two batches of four frames over a synthetic sky with known tile and frame terms: the
    mega-tiles (frame pieces in memory) and the truth."""
    from napari_zemosaic.engine.photometry import CoarsePiece, Normalisation

    rng = np.random.default_rng(7)
    grid_h, grid_w = 40, 60
    rows, cols = np.mgrid[0:grid_h, 0:grid_w].astype(float)
    sky = 1000 + 0.8 * cols + rng.gamma(0.4, 60, (grid_h, grid_w))  # gradient plus star-like cells
    tile_gain, tile_offset = [1.0, 1.08], [0.0, 25.0]
    tile_tilt = [np.array([0.0, 0.0]), np.array([0.3, -0.2])]
    extents = [(0, 36), (24, 60)]  # coarse columns of each tile
    tiles = []
    for b, (c0, c1) in enumerate(extents):
        tile_centre = np.array([c0 + (c1 - c0 - 1) / 2, (grid_h - 1) / 2])
        truth_tile = tile_gain[b] * sky + tile_offset[b] + tile_tilt[b][0] * (cols - tile_centre[0]) + tile_tilt[b][1] * (rows - tile_centre[1])
        pieces, gains, offsets, tilts, centres = {}, [], [], [], []
        for j in range(4):
            y0, x0 = rng.integers(0, 3), c0 + rng.integers(0, 3)
            y1, x1 = grid_h - rng.integers(0, 3), c1 - rng.integers(0, 3)
            g, o, t = rng.uniform(0.9, 1.1, 3), rng.normal(0, 20, 3), rng.normal(0, 0.2, (3, 2))
            centre = np.array([x0 + (x1 - x0 - 1) / 2, y0 + (y1 - y0 - 1) / 2])
            dx, dy = cols[y0:y1, x0:x1] - centre[0], rows[y0:y1, x0:x1] - centre[1]
            raw = np.stack([g[c] * truth_tile[y0:y1, x0:x1] + o[c] + t[c, 0] * dx + t[c, 1] * dy for c in range(3)])
            raw += rng.normal(0, 0.3, raw.shape)
            pieces[10 * b + j] = CoarsePiece(int(y0), int(x0), raw.astype(np.float32))
            gains.append(g), offsets.append(o), tilts.append(t), centres.append(centre - [c0, 0])
        inner = Normalisation(np.array(gains), np.array(offsets), np.array(tilts), np.array(centres), 16)
        tile_piece = CoarsePiece(0, c0, np.zeros((3, grid_h, c1 - c0), np.float32))
        tiles.append(MegaTile(b, (0, grid_h * 16, c0 * 16, c1 * 16), None, 3, tile_piece, 1.0, 1.0,
                              sorted(pieces), [], frame_norm=inner, frame_coarse=pieces))
    truth = SimpleNamespace(grid_h=grid_h, grid_w=grid_w, rows=rows, cols=cols, sky=sky, tile_gain=tile_gain,
                            tile_offset=tile_offset, tile_tilt=tile_tilt, extents=extents)
    return tiles, truth


def test_megatile_terms_from_frames_recover_the_tile_gains() -> None:
    """Each batch's own (internal) normalisation is known; the frames' global terms are their
    composition with the tile terms. The real frame-level solve must give back the tiles'
    relative gain and make the two corrected tiles agree on their overlap.
    """
    tiles, truth = _two_batch_tiles()
    grid_h, grid_w, rows, cols, sky = truth.grid_h, truth.grid_w, truth.rows, truth.cols, truth.sky
    tile_gain, tile_offset, tile_tilt, extents = truth.tile_gain, truth.tile_offset, truth.tile_tilt, truth.extents
    terms = sds.megatile_terms_from_frames(tiles, (grid_h * 16, grid_w * 16), "linear_fit")
    assert terms is not None
    assert terms.gains[1] / terms.gains[0] == pytest.approx(np.full(3, 1.08), rel=0.005)
    overlap = (slice(None), slice(24, 36))
    corrected = []
    for b in range(2):
        tile_centre = np.array([extents[b][0] + (extents[b][1] - extents[b][0] - 1) / 2, (grid_h - 1) / 2])
        truth_tile = tile_gain[b] * sky + tile_offset[b] + tile_tilt[b][0] * (cols - tile_centre[0]) + tile_tilt[b][1] * (rows - tile_centre[1])
        plane = terms.background_plane(b, 0, 0, grid_h * 16, grid_w * 16)[:, 8::16, 8::16]  # cell centres
        corrected.append((truth_tile[None] - plane) / terms.gains[b][:, None, None])
    assert np.abs(corrected[0][(slice(None), *overlap)] - corrected[1][(slice(None), *overlap)]).max() < 1.0


def test_spilled_frame_pieces_give_the_same_megatile_terms(tmp_path) -> None:
    """A finished batch keeps no per-frame arrays: its frames' coarse pieces go to one file in
    the cache and are read back for the frame-level solve, with the same result to the bit."""
    tiles, truth = _two_batch_tiles()
    shape = (truth.grid_h * 16, truth.grid_w * 16)
    in_memory = sds.megatile_terms_from_frames(tiles, shape, "linear_fit")
    originals = [dict(tile.frame_coarse) for tile in tiles]
    for tile in tiles:
        tile.spill_frame_coarse(tmp_path / f"megatile_{tile.batch:04d}_frames.npz")
        assert tile.frame_coarse is None and tile.frame_coarse_path.is_file()
    for tile, original in zip(tiles, originals):
        pieces = tile.frame_coarse_pieces()
        assert sorted(pieces) == sorted(original)
        for index, piece in original.items():
            assert (pieces[index].y0, pieces[index].x0) == (piece.y0, piece.x0)
            np.testing.assert_array_equal(pieces[index].data, piece.data)
    spilled = sds.megatile_terms_from_frames(tiles, shape, "linear_fit")
    for name in ("gains", "offsets", "tilts", "centres"):
        np.testing.assert_array_equal(getattr(spilled, name), getattr(in_memory, name))


def test_low_coverage_mask_trims_ragged_borders_but_never_punches_holes() -> None:
    count = np.zeros((200, 300), dtype=np.float32)
    count[20:180, 20:280] = 10  # a panel
    count[20:180, 140:200] = 20  # a deeper overlap strip inside it
    count[20:180, 20:28] = 2  # a ragged dither edge on the border
    count[90:100, 60:70] = 2  # a dip inside the mosaic
    mask = sds.low_coverage_mask(count, window_px=24, keep_fraction=0.4)
    assert mask[20:180, 20:28].all()  # the border fringe goes
    assert not mask[90:100, 60:70].any()  # the interior dip stays
    assert not mask[count == 10].any() and not mask[count == 20].any()


def test_feather_fades_to_the_edge_and_never_reaches_zero() -> None:
    covered = np.zeros((50, 80), dtype=bool)
    covered[5:45, 10:70] = True
    feather = sds.feather_map(covered, 10.0)
    assert feather[25, 40] == 1.0
    assert feather[5, 40] == pytest.approx(0.1) and feather[25, 10] == pytest.approx(0.1)
    assert feather.min() >= sds.FEATHER_FLOOR


# ------------------------------------------------------------------------ demo-data runs


def _ingest(frames_dir: Path, config: dict):
    from napari_zemosaic.engine.pipeline import ingest

    return _drain(ingest(frames_dir, None, config, Reporter())).usable


def _context(config: dict, tmp_path: Path, reporter: Reporter | None = None):
    from napari_zemosaic.engine.context import RunContext

    return RunContext(config, reporter or Reporter(), tmp_path, tmp_path / "cache")


def _run_both(frames, config: dict, tmp_path: Path):
    """SDS and Mosaic-First on the same frames and the same global canvas."""
    from napari_zemosaic.engine.mosaic_first import mosaic_first

    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    reporter = Reporter()
    outcome = _drain(sds.run_sds(frames, canvas, _context(config, tmp_path / "sds", reporter), 3))
    reference = _drain(mosaic_first(frames, canvas, _context(config, tmp_path / "mf"), 3))
    return canvas, outcome, reference, reporter


@pytest.fixture(scope="module")
def single_field(tmp_path_factory: pytest.TempPathFactory):
    """Scenario 1: one field, 20 frames each covering almost all of it."""
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("sds_single_field")
    truth = generate_demo(root, DemoSpec(panels=(1, 1), frames_per_panel=20, scale=0.2, seed=5, star_density=2.0))
    config = validate_config({"sds_mode": True, "max_memory_mb": 512})
    frames = _ingest(root / "frames", config)
    canvas, outcome, reference, reporter = _run_both(frames, config, tmp_path_factory.mktemp("sds_single_run"))
    return SimpleNamespace(root=root, truth=truth, frames=frames, canvas=canvas, sds=outcome, mf=reference,
                           reporter=reporter, config=config)


@pytest.fixture(scope="module")
def multi_panel(demo_night, tmp_path_factory: pytest.TempPathFactory):
    """Scenario 2: the shared 2x2 demo night (haze per panel, a cloudy frame, a trail)."""
    root, truth = demo_night
    config = validate_config({"sds_mode": True, "max_memory_mb": 512})
    frames = _ingest(root / "frames", config)
    canvas, outcome, reference, reporter = _run_both(frames, config, tmp_path_factory.mktemp("sds_multi_run"))
    return SimpleNamespace(root=root, truth=truth, frames=frames, canvas=canvas, sds=outcome, mf=reference,
                           reporter=reporter, config=config)


@pytest.fixture(scope="module")
def tiny_night(tmp_path_factory: pytest.TempPathFactory):
    """Three small frames of one field (scenarios 3 and 4, failure injection)."""
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("sds_tiny")
    generate_demo(root, DemoSpec(panels=(1, 1), frames_per_panel=3, scale=0.15, seed=8, artefacts=False))
    return root


def test_scenario_one_field_gives_a_few_full_batches(single_field) -> None:
    plan = single_field.sds.plan
    n = len(single_field.frames)
    assert n == 20
    assert 2 <= len(plan.batches) <= n // 5
    assert all(len(b) >= 5 for b in plan.batches)  # never "N frames -> N batches of 1"
    assert sorted(i for b in plan.batches for i in b) == list(range(n))
    assert all(c >= 0.92 for c in plan.coverage)
    keys = _sds_keys(single_field.reporter.log_events)
    assert "sds_error_no_valid_batches" not in keys
    for key in ("sds_info_start", "sds_info_batch_policy", "sds_info_batches_built", "sds_debug_batch_coverage_summary"):
        assert key in keys
    assert single_field.sds.stack.frames_used == list(range(n))


def test_scenario_multi_panel_gives_several_reasonable_batches_on_the_global_canvas(multi_panel) -> None:
    plan = multi_panel.sds.plan
    assert len(plan.batches) >= 2
    assert all(5 <= len(b) < 2 * 10 for b in plan.batches)
    stack = multi_panel.sds.stack
    assert stack.canvas.shape == multi_panel.canvas.shape and stack.data.shape[1:] == multi_panel.canvas.shape
    # the mosaic covers every panel (mega-tiles on their own crops, stacked on the global canvas)
    assert (stack.weight > 0).sum() > 0.95 * (multi_panel.mf.weight > 0).sum()


def test_plan_helper_and_run_report_give_the_same_batches(multi_panel) -> None:
    preview = sds.plan_sds(multi_panel.frames, multi_panel.canvas, multi_panel.config).to_report(multi_panel.frames)
    report = multi_panel.sds.report
    assert [(b["size"], b["frames"], b["coverage_fraction"]) for b in preview["batches"]] == [
        (b["size"], b["frames"], b["coverage_fraction"]) for b in report["batches"]
    ]
    assert report["denominator"] == preview["denominator"] > 0
    assert report["policy"] == {"coverage_threshold": 0.92, "min_batch_size": 5, "target_batch_size": 10,
                                "min_coverage_keep": 0.4}
    assert all(Path(p).exists() for b in report["batches"] for p in b["frames"])
    json.dumps(report)  # the section goes into run_report.json as is


# --------------------------------------------------------------- quality against Mosaic-First


def _bright_isolated_stars(truth, canvas, both: np.ndarray):
    x, y = canvas.wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    height, width = canvas.shape
    green = truth.star_flux[:, 1]
    keep = []
    for i in np.flatnonzero((x > 20) & (x < width - 21) & (y > 20) & (y < height - 21) & (green > 3000)):
        distance = np.hypot(x - x[i], y - y[i])
        distance[i] = np.inf
        if (green[distance < 14] > 0.01 * green[i]).any() or truth.star_flux[i].max() > 400_000:
            continue
        iy, ix = int(round(y[i])), int(round(x[i]))
        if both[iy - 12 : iy + 13, ix - 12 : ix + 13].all():
            keep.append(i)
    return np.array(keep), x, y


def _flux_ratio(case) -> np.ndarray:
    s, m = case.sds.stack.data, case.mf.data
    both = np.isfinite(s).all(axis=0) & np.isfinite(m).all(axis=0)
    ids, x, y = _bright_isolated_stars(case.truth, case.canvas, both)
    assert len(ids) >= 15
    radius = 3.0 * float(np.median([f.fwhm_px for f in case.truth.frames]))
    ratios = [
        [aperture_flux(s[c], x[i], y[i], radius, radius + 3, radius + 9)
         / aperture_flux(m[c], x[i], y[i], radius, radius + 3, radius + 9) for c in range(3)]
        for i in ids
    ]
    return np.median(np.array(ratios), axis=0)


def _noise_ratio(case) -> np.ndarray:
    s, m = case.sds.stack.data, case.mf.data
    both = np.isfinite(s).all(axis=0) & np.isfinite(m).all(axis=0)
    height, width = both.shape
    ratios = []
    for y0 in range(0, height - 48, 48):
        for x0 in range(0, width - 48, 48):
            region = (slice(y0, y0 + 48), slice(x0, x0 + 48))
            if both[region].all():
                ratios.append([robust_noise_map(s[c], region) / robust_noise_map(m[c], region) for c in range(3)])
    assert len(ratios) >= 8
    return np.median(np.array(ratios), axis=0)


def _seam_steps(case) -> tuple[np.ndarray, float]:
    """Level steps of SDS − Mosaic-First across every mega-tile edge, and the pixel noise σ.

    The difference removes the sky (stars, nebula, gradients); what is left at a mega-tile edge
    is the step SDS introduces there. Each 32 px patch straddling an edge is fitted with a plane
    plus an inside/outside step (clipped), away from stars and from the edge itself.
    """
    from scipy.ndimage import binary_dilation, binary_erosion, median_filter

    s, m = case.sds.stack.data.mean(axis=0), case.mf.data.mean(axis=0)
    both = np.isfinite(s) & np.isfinite(m)
    pairs = both[:, 1:] & both[:, :-1]
    diff = (s[:, 1:] - s[:, :-1])[pairs]
    sigma = 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / np.sqrt(2)
    smooth = median_filter(np.nan_to_num(m), size=15)
    stars = binary_dilation(np.nan_to_num(m) - smooth > 5 * sigma, iterations=4)
    good = both & ~stars
    difference = s - m
    steps = []
    for batch in case.sds.plan.batches:
        inside = np.zeros(case.canvas.shape, dtype=bool)
        for index in batch:
            info = case.frames[index]
            rasterise_polygon(footprint_polygon(info.wcs, info.shape, case.canvas.wcs), case.canvas.shape).add_to(inside)
        edge = inside & ~binary_erosion(inside)
        near_edge = binary_dilation(edge, iterations=2)
        ys, xs = np.nonzero(edge & good)
        for k in range(0, len(ys), 24):
            patch = (slice(max(0, ys[k] - 16), ys[k] + 16), slice(max(0, xs[k] - 16), xs[k] + 16))
            use = good[patch] & ~near_edge[patch]
            side = inside[patch][use]
            if side.sum() < 80 or (~side).sum() < 80:
                continue
            rows, cols = np.nonzero(use)
            design = np.stack([np.ones(rows.size), cols - cols.mean(), rows - rows.mean(), side.astype(float)], axis=1)
            target = difference[patch][use]
            kept = np.ones(target.size, dtype=bool)
            for _ in range(3):  # clipped: a satellite trail crossing the patch is not a seam
                coefficients, *_ = np.linalg.lstsq(design[kept], target[kept], rcond=None)
                residual = target - design @ coefficients
                kept = np.abs(residual) <= 4 * 1.4826 * np.median(np.abs(residual[kept]))
            steps.append(coefficients[3])
    return np.abs(np.array(steps)), sigma


@pytest.mark.parametrize("case_name", ["single_field", "multi_panel"])
def test_sds_agrees_with_mosaic_first(case_name: str, request) -> None:
    case = request.getfixturevalue(case_name)
    if case_name == "multi_panel" and case.sds.report["photometry_source"] != "frames":
        # Mega-tile gains fitted on one narrow panel-overlap strip are off by a few % on this
        # night; the frame-level solve needs Mosaic-First to hand back its coarse pieces.
        pytest.xfail("mosaic_first does not return CanvasStack.coarse yet")
    flux = _flux_ratio(case)
    assert np.all(np.abs(flux - 1) <= 0.01), f"SDS / Mosaic-First star flux {flux}"
    noise = _noise_ratio(case)
    assert np.all(np.abs(noise - 1) <= 0.10), f"SDS / Mosaic-First background noise {noise}"


def test_no_seams_at_mega_tile_edges(multi_panel) -> None:
    steps, sigma = _seam_steps(multi_panel)
    assert len(steps) >= 15
    assert steps.max() <= sigma, f"largest step {steps.max():.2f} vs background sigma {sigma:.2f}"


def test_mega_tile_photometry_is_reported_and_on_the_mosaic_first_scale(multi_panel) -> None:
    report = multi_panel.sds.report
    assert all(len(b["gain"]) == 3 and len(b["offset"]) == 3 for b in report["batches"])
    assert 0 <= report["reference_batch"] < len(report["batches"])
    gains = multi_panel.sds.stack.normalisation.gains[multi_panel.sds.stack.frames_used]
    assert np.allclose(np.median(gains, axis=0), 1.0)  # the same gauge as Mosaic-First
    keys = _sds_keys(multi_panel.reporter.log_events)
    assert "sds_debug_megatile_correction" in keys and "sds_info_photometry" in keys


# ----------------------------------------------------------------- few frames, preplan, failure


@pytest.mark.parametrize("n_frames", [1, 2])
def test_scenario_very_few_frames_make_one_batch(tiny_night, tmp_path: Path, n_frames: int) -> None:
    config = validate_config({"sds_mode": True, "max_memory_mb": 256})
    frames = _ingest(tiny_night / "frames", config)[:n_frames]
    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    outcome = _drain(sds.run_sds(frames, canvas, _context(config, tmp_path), 3))
    assert outcome.plan.batches == [list(range(n_frames))]
    assert 0 < outcome.plan.coverage[0] <= 1
    assert np.isfinite(outcome.stack.data).any() and outcome.stack.frames_used == list(range(n_frames))


def test_preplan_is_used_when_complete_and_refused_when_partial(tiny_night, tmp_path: Path) -> None:
    frames = _ingest(tiny_night / "frames", validate_config({}))
    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    paths = [str(f.path) for f in frames]
    complete = validate_config({"sds_mode": True, "max_memory_mb": 256, "preplan_master_groups": [paths[2:], paths[:2]]})
    reporter = Reporter()
    outcome = _drain(sds.run_sds(frames, canvas, _context(complete, tmp_path / "a", reporter), 3))
    assert outcome.report["source"] == "preplan"
    assert [b["frames"] for b in outcome.report["batches"]] == [paths[2:], paths[:2]]
    assert "sds_info_preplan_used" in _sds_keys(reporter.log_events)

    partial = dict(complete, preplan_master_groups=[paths[:2]])
    reporter = Reporter()
    plan = sds.plan_sds(frames, canvas, partial, reporter)
    assert plan.source == "policy" and plan.batches == [[0, 1, 2]]
    (warning,) = [e for e in reporter.log_events if e.key == "sds_warn_preplan_unused"]
    assert warning.params["reason"] == sds.REASON_PREPLAN_INCOMPLETE


def test_injected_batch_failure_raises_a_logged_sds_error(tiny_night, tmp_path: Path) -> None:
    config = validate_config({"sds_mode": True, "max_memory_mb": 256, "sds_min_batch_size": 1,
                              "sds_target_batch_size": 1, sds.INJECT_FAILURE_KEY: 2})
    frames = _ingest(tiny_night / "frames", config)
    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    reporter = Reporter()
    with pytest.raises(SdsError) as caught:
        _drain(sds.run_sds(frames, canvas, _context(config, tmp_path, reporter), 3))
    assert caught.value.key == "sds_error_batch_exception" and caught.value.params["batch"] == 2
    (event,) = [e for e in reporter.log_events if e.key == "sds_error_batch_exception"]
    assert event.level == "error" and event.params["batch"] == 2


def test_non_seestar_frames_are_refused_by_run_sds(tiny_night, tmp_path: Path) -> None:
    config = validate_config({"sds_mode": True, "auto_detect_seestar": False})
    frames = _ingest(tiny_night / "frames", config)
    assert not any(f.is_seestar for f in frames)
    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    with pytest.raises(SdsError) as caught:
        _drain(sds.run_sds(frames, canvas, _context(config, tmp_path), 3))
    assert caught.value.params["reason"] == sds.REASON_NOT_SEESTAR


# ------------------------------------------------------------------- through the pipeline


def _pipeline_run(input_dir: Path, output_dir: Path, config: dict):
    from napari_zemosaic.engine.pipeline import run

    events = []
    result = run(input_dir, output_dir, config, on_event=events.append)
    return result, events


def _needs_sds_dispatch() -> None:
    from napari_zemosaic.engine import pipeline

    if "sds" not in getattr(pipeline, "WORKFLOWS_AVAILABLE", ()):
        pytest.skip("the pipeline does not dispatch the sds workflow yet")


def test_scenario_sds_off_runs_no_sds_at_all(tiny_night, tmp_path: Path) -> None:
    result, events = _pipeline_run(tiny_night / "frames", tmp_path, {"sds_mode": False, "max_memory_mb": 256})
    assert result.status == "ok"
    assert _sds_keys(events) == [] and result.report["sds"] is None


def test_scenario_non_seestar_data_runs_no_sds_batching(tiny_night, tmp_path: Path) -> None:
    result, events = _pipeline_run(
        tiny_night / "frames", tmp_path, {"sds_mode": True, "auto_detect_seestar": False, "max_memory_mb": 256}
    )
    assert result.status == "ok" and result.report["workflow_used"] != "sds"
    assert set(_sds_keys(events)) <= {"sds_info_disabled_not_seestar"}
    assert result.report["sds"] is None and result.report["frames"]["used"] == 3


def test_pipeline_sds_run_reports_the_plan_helper_batches(multi_panel, tmp_path: Path) -> None:
    _needs_sds_dispatch()
    # quality rejection off: the helper is given exactly the frames the run stacks
    result, events = _pipeline_run(
        multi_panel.root / "frames", tmp_path, {"sds_mode": True, "max_memory_mb": 512, "quality_rejection": False}
    )
    assert result.status == "ok" and result.report["workflow_used"] == "sds"
    preview = sds.plan_sds(multi_panel.frames, multi_panel.canvas, multi_panel.config).to_report(multi_panel.frames)
    assert [b["frames"] for b in result.report["sds"]["batches"]] == [b["frames"] for b in preview["batches"]]
    assert "sds_error_no_valid_batches" not in _sds_keys(events)
    # The run's P3 is the batch loop (the mega-tiles); the batches' own Mosaic-First phases are
    # reported beside it, not added to the run's P4.5 and P5 (SDS's photometry and final stack).
    timings, batches = result.report["timings_s"], result.report["sds"]["batch_stack_timings_s"]
    assert set(batches) == {"P3", "P4.5", "P5"} and all(v > 0 for v in batches.values())
    assert timings["P3"] >= batches["P3"] + batches["P4.5"] + batches["P5"]
    assert timings["P5"] < timings["P3"]


def test_injected_batch_failure_falls_back_to_mosaic_first(tiny_night, tmp_path: Path) -> None:
    _needs_sds_dispatch()
    config = {"sds_mode": True, "workflow": "sds", "max_memory_mb": 256, sds.INJECT_FAILURE_KEY: 1}
    result, events = _pipeline_run(tiny_night / "frames", tmp_path, config)
    assert result.status == "ok" and result.report["workflow_used"] == "mosaic_first"
    fallbacks = [f for f in result.report["fallbacks"] if f["reason_key"] == "sds_failed_fallback_mosaic_first"]
    assert len(fallbacks) == 1 and fallbacks[0]["from"] == "sds"
    keys = _sds_keys(events)
    assert "sds_error_batch_exception" in keys and "sds_failed_fallback_mosaic_first" in keys
    assert result.report["frames"]["used"] == 3
    with fits.open(result.science_path) as hdul:
        assert np.isfinite(hdul[0].data).any()


def test_explicit_sds_on_non_seestar_data_runs_the_normal_workflow_on_all_frames(tiny_night, tmp_path: Path) -> None:
    _needs_sds_dispatch()
    copy = tmp_path / "frames"
    shutil.copytree(tiny_night / "frames", copy)
    for path in copy.iterdir():
        with fits.open(path, mode="update") as hdul:
            for key in ("INSTRUME", "CREATOR", "TELESCOP"):
                if key in hdul[0].header:
                    hdul[0].header[key] = "Generic CMOS"
    result, events = _pipeline_run(copy, tmp_path / "out", {"sds_mode": True, "workflow": "sds", "max_memory_mb": 256})
    assert result.status == "ok" and result.report["workflow_used"] != "sds"
    assert "sds_info_disabled_not_seestar" in _sds_keys(events)
    assert not any(k.startswith("sds_info_batch") for k in _sds_keys(events))
    assert result.report["frames"]["used"] == 3


def test_a_batch_failing_while_it_is_finished_on_the_thread_raises_its_sds_error(
    tiny_night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mega-tiles are finished (file, quality) on a thread while the next batch stacks: an error
    there is still that batch's logged SdsError, and the tiles before it were taken in order."""
    config = validate_config({"sds_mode": True, "max_memory_mb": 256, "sds_min_batch_size": 1,
                              "sds_target_batch_size": 1})
    frames = _ingest(tiny_night / "frames", config)
    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    real_quality = sds.tile_quality
    calls: list[int] = []

    def quality_failing_on_the_second_tile(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk gone while finishing")
        return real_quality(*args, **kwargs)

    monkeypatch.setattr(sds, "tile_quality", quality_failing_on_the_second_tile)
    reporter = Reporter()
    with pytest.raises(SdsError) as caught:
        _drain(sds.run_sds(frames, canvas, _context(config, tmp_path, reporter), 3))
    assert caught.value.key == "sds_error_batch_exception" and caught.value.params["batch"] == 2
    assert "disk gone while finishing" in caught.value.params["error"]
    tiles_said = [e.params["batch"] for e in reporter.log_events if e.key == "sds_info_megatile"]
    assert tiles_said == [1]


def test_final_stack_windows_read_on_threads_give_the_serial_loops_bits(
    tiny_night, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stack_final_block reads and corrects the mega-tiles' windows on threads and sums them in
    slot order: the same float32 mosaic, coverage and counts as one serial loop."""
    config = validate_config({"sds_mode": True, "max_memory_mb": 256, "sds_min_batch_size": 1,
                              "sds_target_batch_size": 2})
    frames = _ingest(tiny_night / "frames", config)
    canvas = build_canvas([f.wcs for f in frames], [f.shape for f in frames])
    threaded = _drain(sds.run_sds(frames, canvas, _context(config, tmp_path / "threads"), 3))
    assert len(threaded.report["batches"]) >= 3
    monkeypatch.setattr(sds, "WINDOW_THREADS", 1)
    serial = _drain(sds.run_sds(frames, canvas, _context(config, tmp_path / "serial"), 3))
    for name in ("data", "weight", "count"):
        np.testing.assert_array_equal(getattr(threaded.stack, name), getattr(serial.stack, name))


def test_ordered_map_keeps_the_order_and_a_bounded_backlog() -> None:
    import threading
    import time

    running, peak, lock = [0], [0], threading.Lock()

    def slow_square(index: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (index % 3))
        with lock:
            running[0] -= 1
        return index * index

    assert list(sds._ordered_map(slow_square, 40, threads=4)) == [i * i for i in range(40)]
    assert list(sds._ordered_map(slow_square, 5, threads=1)) == [i * i for i in range(5)]
    assert 1 <= peak[0] <= 4

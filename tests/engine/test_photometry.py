"""The photometric solve on synthetic coarse pieces with known gains, offsets and planes.

Pieces are windows of one sky (smooth structure plus point-like cells) seen through
``piece = gain · sky + offset + tilt · (X − Xc, Y − Yc)`` with a little noise, laid out so that
their overlaps form the graphs under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_zemosaic.engine.photometry import (
    CoarsePiece,
    coarse_piece,
    fit_gain_ratio,
    solve_normalisation,
)

SKY_SHAPE = (60, 90)


def _sky(seed: int = 0, stars: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: SKY_SHAPE[0], : SKY_SHAPE[1]].astype(float)
    sky = 500.0 + 80.0 * np.exp(-((x - 40) ** 2 + (y - 25) ** 2) / 400.0) + 30.0 * np.sin(x / 9.0) * np.cos(y / 7.0)
    if stars:
        cells = rng.random(SKY_SHAPE) < 0.08
        sky = sky + cells * rng.uniform(20.0, 300.0, SKY_SHAPE)
    return np.stack([sky, 0.8 * sky, 0.6 * sky])  # (C, H, W), one sky in three channels


def _piece(sky: np.ndarray, y0: int, x0: int, h: int, w: int, gain: float, offset: float,
           tilt: tuple[float, float] = (0.0, 0.0), noise: float = 0.3, seed: int = 1) -> CoarsePiece:
    rng = np.random.default_rng(seed)
    window = sky[:, y0 : y0 + h, x0 : x0 + w]
    rows, cols = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(float)
    xc, yc = x0 + (w - 1) / 2.0, y0 + (h - 1) / 2.0
    plane = offset + tilt[0] * (cols - xc) + tilt[1] * (rows - yc)
    data = gain * window + plane[None] + rng.normal(0.0, noise, window.shape)
    return CoarsePiece(y0, x0, data.astype(np.float32))


def _relative(values: np.ndarray, reference: int) -> np.ndarray:
    return values / values[reference]


def _corrected(norm, slot: int, piece: CoarsePiece) -> np.ndarray:
    """(piece − plane) / gain evaluated at the cells (tilts are per coarse cell)."""
    _, h, w = piece.data.shape
    cols = np.arange(piece.x0, piece.x0 + w) - norm.centres[slot, 0]
    rows = np.arange(piece.y0, piece.y0 + h) - norm.centres[slot, 1]
    tilt = norm.tilts[slot]
    plane = norm.offsets[slot][:, None, None] + tilt[:, 0, None, None] * cols[None, None, :] + tilt[:, 1, None, None] * rows[None, :, None]
    return (piece.data - plane) / norm.gains[slot][:, None, None]


# A 2×2 layout with overlaps of 10 cells (the tile case) and a hub piece overlapping all four.
LAYOUT = [(0, 0, 35, 50), (0, 40, 35, 50), (25, 0, 35, 50), (25, 40, 35, 50)]
GAINS = [1.0, 0.92, 0.85, 0.95]
OFFSETS = [0.0, 60.0, 110.0, 40.0]
TILTS = [(0.0, 0.0), (0.4, -0.2), (-0.3, 0.1), (0.2, 0.3)]


def _layout_pieces(sky: np.ndarray, extra: list[tuple] = ()) -> list[CoarsePiece]:
    pieces = [_piece(sky, *box, g, o, t, seed=k) for k, (box, g, o, t) in enumerate(zip(LAYOUT, GAINS, OFFSETS, TILTS))]
    return pieces + [_piece(sky, *item[:4], *item[4:], seed=10 + k) for k, item in enumerate(extra)]


def test_default_gauge_recovers_gain_ratios_with_median_gain_one() -> None:
    sky = _sky()
    norm = solve_normalisation(_layout_pieces(sky), method="linear_fit")
    assert norm.mode == "linear_fit" and norm.anchors == [] and not norm.clipped.any()
    assert np.median(np.log(norm.gains), axis=0) == pytest.approx(np.zeros(3), abs=1e-9)
    for channel in range(3):
        assert _relative(norm.gains[:, channel], 0) == pytest.approx(np.array(GAINS) / GAINS[0], rel=2e-3)


def test_best_connected_anchor_keeps_its_pixels_and_flattens_the_others() -> None:
    """A hub piece overlapping all four is the best connected: its correction is the identity."""
    sky = _sky()
    hub = (15, 25, 30, 40, 1.1, 25.0, (0.1, -0.1))
    pieces = _layout_pieces(sky, [hub])
    norm = solve_normalisation(pieces, method="linear_fit", anchor="best_connected", plane_solve="joint")
    assert norm.anchors == [4]
    assert norm.gains[4] == pytest.approx(np.ones(3)) and norm.offsets[4] == pytest.approx(np.zeros(3), abs=1e-9)
    assert np.abs(norm.tilts[4]).max() < 1e-9
    for slot, gain in enumerate(GAINS):
        assert norm.gains[slot] == pytest.approx(np.full(3, gain / 1.1), rel=3e-3)
    # every corrected piece is the hub's view of the sky (gain 1.1, its own plane) to within the noise
    hub_piece = pieces[4]
    assert np.abs(_corrected(norm, 4, hub_piece) - hub_piece.data).max() < 1e-4
    for slot, (y0, x0, h, w) in enumerate(LAYOUT):
        mine = _corrected(norm, slot, pieces[slot])
        ys, xs = slice(max(y0, 15), min(y0 + h, 45)), slice(max(x0, 25), min(x0 + w, 65))
        overlap_mine = mine[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        overlap_hub = hub_piece.data[:, ys.start - 15 : ys.stop - 15, xs.start - 25 : xs.stop - 25]
        assert np.median(np.abs(overlap_mine - overlap_hub)) < 1.0


def test_an_explicit_anchor_is_honoured() -> None:
    norm = solve_normalisation(_layout_pieces(_sky()), method="linear_fit", anchor=2)
    assert 2 in norm.anchors and norm.gains[2] == pytest.approx(np.ones(3))
    assert norm.gains[0, 1] == pytest.approx(GAINS[0] / GAINS[2], rel=2e-3)


def test_gains_outside_the_limits_are_clipped_and_flagged() -> None:
    sky = _sky()
    boxes = LAYOUT
    gains = [1.0, 0.92, 3.0, 0.95]
    pieces = [_piece(sky, *box, g, 10.0, seed=k) for k, (box, g) in enumerate(zip(boxes, gains))]
    norm = solve_normalisation(pieces, method="linear_fit", anchor=0, gain_limits=(0.5, 2.0))
    assert norm.clipped.tolist() == [False, False, True, False]
    assert norm.gains[2] == pytest.approx(np.full(3, 2.0))
    assert norm.gains[1] == pytest.approx(np.full(3, 0.92), rel=3e-3)


def test_flat_overlaps_fall_back_to_offsets_only() -> None:
    """Overlaps of featureless sky cannot tell a gain from an offset: offsets only, and said so."""
    flat = np.full((3, *SKY_SHAPE), 500.0)
    pieces = [_piece(flat, *box, g, o, noise=0.5, seed=k) for k, (box, g, o) in enumerate(zip(LAYOUT, GAINS, OFFSETS))]
    norm = solve_normalisation(pieces, method="linear_fit", anchor="best_connected", offset_only_fallback=True)
    assert norm.mode == "offset_only"
    assert np.all(norm.gains == 1.0)
    # the levels are matched: every corrected piece sits at the anchor's level
    anchor = norm.anchors[0]
    level = np.median(_corrected(norm, anchor, pieces[anchor]), axis=(1, 2))
    for slot, piece in enumerate(pieces):
        assert np.median(_corrected(norm, slot, piece), axis=(1, 2)) == pytest.approx(level, abs=0.5)
    # without the fallback the default behaviour is unchanged (gains are fitted, whatever they are worth)
    assert solve_normalisation(pieces, method="linear_fit").mode == "linear_fit"


def test_a_piece_without_overlap_is_left_alone() -> None:
    sky = np.concatenate([_sky(), _sky(3)], axis=2)  # wide enough for a far piece
    pieces = _layout_pieces(sky) + [_piece(sky, 10, 140, 30, 35, 0.7, 300.0, seed=9)]
    norm = solve_normalisation(pieces, method="linear_fit", anchor="best_connected", offset_only_fallback=True)
    assert norm.mode == "linear_fit"
    assert norm.constrained.tolist() == [True, True, True, True, False]
    assert norm.gains[4] == pytest.approx(np.ones(3)) and norm.offsets[4] == pytest.approx(np.zeros(3))
    assert 4 in norm.anchors and norm.anchors[0] != 4  # the big group's anchor first


def test_fixed_gains_solve_offsets_and_planes_only() -> None:
    sky = _sky()
    pieces = _layout_pieces(sky)
    gains = np.repeat(np.array(GAINS)[:, None], 3, axis=1)
    for solver in ("graph", "joint"):
        norm = solve_normalisation(pieces, method="linear_fit", anchor=0, fixed_gains=gains, plane_solve=solver)
        assert np.array_equal(norm.gains, gains)
        for slot in range(4):
            offset = OFFSETS[slot] - OFFSETS[0] * GAINS[slot] / GAINS[0]
            assert norm.offsets[slot] == pytest.approx(np.full(3, offset), abs=0.5), solver
            assert norm.tilts[slot, 1] == pytest.approx(np.array(TILTS[slot]), abs=0.02), solver


@pytest.mark.parametrize("origin", [0, 300])
def test_joint_plane_solve_recovers_every_plane_far_from_the_grid_origin(origin: int) -> None:
    """All edges in one least-squares problem (centred coordinates): exact planes wherever the pieces are."""
    sky = _sky(5)
    boxes = [(0, 0, 33, 48), (0, 42, 33, 48), (27, 0, 33, 48), (27, 42, 33, 48)]  # 6-cell seams
    pieces = []
    for k, (box, offset, tilt) in enumerate(zip(boxes, OFFSETS, TILTS)):
        piece = _piece(sky, *box, 1.0, offset, tilt, noise=0.01, seed=k)
        pieces.append(CoarsePiece(piece.y0 + origin, piece.x0 + origin, piece.data))
    norm = solve_normalisation(pieces, method="linear_fit", anchor=0, fixed_gains=np.ones((4, 3)), plane_solve="joint")
    for slot in range(4):
        assert norm.offsets[slot] == pytest.approx(np.full(3, OFFSETS[slot]), abs=0.05)
        assert norm.tilts[slot] == pytest.approx(np.tile(TILTS[slot], (3, 1)), abs=2e-3)
    with pytest.raises(ValueError):
        solve_normalisation(pieces, plane_solve="exact")


def test_fit_gain_ratio_ignores_additive_differences() -> None:
    rng = np.random.default_rng(2)
    signal = rng.gamma(2.0, 50.0, 400)
    x, y = rng.uniform(0, 30, 400), rng.uniform(0, 30, 400)
    a = 0.87 * signal + 120.0 + 0.5 * x - 0.3 * y + rng.normal(0, 0.5, 400)
    b = signal + rng.normal(0, 0.5, 400)
    ratio, log_sigma = fit_gain_ratio(a, b, x, y)
    assert ratio == pytest.approx(0.87, rel=2e-3) and 0 < log_sigma < 0.01
    assert fit_gain_ratio(a[:3], b[:3], x[:3], y[:3]) is None


def test_coarse_medians_drop_the_stars_of_a_cell() -> None:
    data = np.full((1, 32, 32), 100.0, np.float32)
    data[0, 3, 4] = 5000.0  # a star in the first cell
    means = coarse_piece(data, (0, 32, 0, 32), 16)
    medians = coarse_piece(data, (0, 32, 0, 32), 16, "median")
    assert means.data[0, 0, 0] == pytest.approx(100.0 + 4900.0 / 256)
    assert np.all(medians.data == 100.0)
    data[0, 20, 20] = np.nan
    assert np.isnan(coarse_piece(data, (0, 32, 0, 32), 16, "median").data[0, 1, 1])
    with pytest.raises(ValueError):
        coarse_piece(data, (0, 32, 0, 32), 16, "mode")


def test_masked_median_equals_numpy_median_per_row() -> None:
    from napari_zemosaic.engine.photometry import _masked_median

    rng = np.random.default_rng(3)
    values = rng.normal(size=(40, 57)).round(1)  # rounded: ties
    mask = rng.random(values.shape) < rng.random((40, 1))
    mask[:, 0] = True
    mask[0] = False
    mask[1] = True
    mask[2, :] = False
    mask[2, 5] = True
    got = _masked_median(values, mask)
    assert np.isnan(got[0])
    for row in range(1, 40):
        assert got[row] == np.median(values[row][mask[row]])


def test_batched_pair_fits_equal_the_per_edge_fits() -> None:
    """Batched and per-edge pair fits give the same solve (floating-point noise), with a satellite
    trail in one piece and a one-column overlap (an ill-conditioned plane: refitted per edge)."""
    sky = _sky(5)
    layout = [(0, 0, 30, 40), (3, 20, 30, 40), (20, 5, 30, 40), (22, 30, 30, 40), (8, 39, 30, 40), (10, 10, 25, 30)]
    pieces = [
        _piece(sky, y0, x0, h, w, gain=1.0 - 0.03 * k, offset=10.0 * k, tilt=(0.05 * k, -0.02 * k), seed=k + 1)
        for k, (y0, x0, h, w) in enumerate(layout)
    ]
    pieces[2].data[:, 10, :] += 400.0  # a trail across one piece
    pieces.append(_piece(sky, 0, 78, 30, 1, gain=0.97, offset=3.0, seed=9))  # one column: x is constant
    for shared in (True, False):
        batched = solve_normalisation(pieces, None, "linear_fit", min_cells=12, shared_gain=shared)
        reference = solve_normalisation(pieces, None, "linear_fit", min_cells=12, shared_gain=shared, pair_fits="reference")
        np.testing.assert_allclose(batched.gains, reference.gains, rtol=1e-9)
        np.testing.assert_allclose(batched.offsets, reference.offsets, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(batched.tilts, reference.tilts, rtol=1e-7, atol=1e-9)
        assert np.array_equal(batched.constrained, reference.constrained)
    with pytest.raises(ValueError):
        solve_normalisation(pieces, None, "linear_fit", pair_fits="parallel")


def test_batched_pair_fits_on_threads_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks on several threads (bounded in flight) give the same solve as one edge at a time."""
    from napari_zemosaic.engine import photometry

    monkeypatch.setattr(photometry, "PAIR_CHUNK", 2)
    monkeypatch.setattr(photometry, "MIN_CORES_FOR_THREADS", 1)
    monkeypatch.setattr(photometry, "MAX_PAIR_THREADS", 3)
    sky = _sky(7)
    pieces = [
        _piece(sky, 3 * (k % 4), 4 * k, 30, 40, gain=1.0 + 0.02 * (k % 3), offset=5.0 * k, seed=k + 20) for k in range(10)
    ]
    batched = solve_normalisation(pieces, None, "linear_fit", shared_gain=True)
    reference = solve_normalisation(pieces, None, "linear_fit", shared_gain=True, pair_fits="reference")
    np.testing.assert_allclose(batched.gains, reference.gains, rtol=1e-9)
    np.testing.assert_allclose(batched.offsets, reference.offsets, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(batched.tilts, reference.tilts, rtol=1e-7, atol=1e-9)


def testexact_median_equals_numpy_median() -> None:
    """The bracketed median is np.median bit for bit: random, tied, NaN, and misleading samples."""
    from napari_zemosaic.engine.photometry import exact_median

    rng = np.random.default_rng(4)
    cases = [rng.normal(size=n) for n in (1, 2, 7, 2047, 2048, 2049, 20000, 20001)]
    cases += [rng.normal(size=20000).round(2), rng.integers(0, 3, 20000).astype(float), np.full(5000, 1.5)]
    cases.append(rng.standard_cauchy(20000))
    with_nan = rng.normal(size=20000)
    with_nan[1234] = np.nan
    misleading = np.arange(20000, dtype=float)
    misleading[::8] = 0.0  # the strided sample sees one value only: the bracket misses, np.median decides
    for values in cases + [with_nan, misleading]:
        expected = np.median(values)
        got = exact_median(values.copy())
        assert got == expected or (np.isnan(got) and np.isnan(expected))


def _field(count: int, seed: int) -> list[CoarsePiece]:
    sky = _sky(seed)
    return [
        _piece(sky, 3 * (k % 4), 4 * k, 30, 40, gain=1.0 + 0.02 * (k % 3), offset=5.0 * k, tilt=(0.01 * k, -0.02), seed=k + 20)
        for k in range(count)
    ]


@pytest.mark.parametrize("shared", [True, False])
def test_batched_pair_fits_in_worker_processes(monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    """Worker processes (pieces in shared memory, edges sorted into chunks) give the per-edge solve."""
    from napari_zemosaic.engine import photometry

    monkeypatch.setattr(photometry, "PAIR_CHUNK", 4)
    monkeypatch.setattr(photometry, "PAIR_EXECUTOR", "processes")
    pieces = _field(12, 8)
    pieces[3].data[:, 12, :] += 300.0  # a trail
    used = []
    original = photometry._PairFitRunner.close

    def spy(runner) -> None:
        used.append(runner.kind)
        original(runner)

    monkeypatch.setattr(photometry._PairFitRunner, "close", spy)
    batched = solve_normalisation(pieces, None, "linear_fit", shared_gain=shared)
    assert used and used[0] == "processes"
    reference = solve_normalisation(pieces, None, "linear_fit", shared_gain=shared, pair_fits="reference")
    np.testing.assert_allclose(batched.gains, reference.gains, rtol=1e-9)
    np.testing.assert_allclose(batched.offsets, reference.offsets, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(batched.tilts, reference.tilts, rtol=1e-7, atol=1e-9)
    assert np.array_equal(batched.constrained, reference.constrained)


def test_pair_fit_processes_release_their_memory_and_stay_out_of_daemons(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing
    from multiprocessing import shared_memory

    from napari_zemosaic.engine import photometry

    monkeypatch.setattr(photometry, "PAIR_EXECUTOR", "processes")
    pieces = _field(4, 9)
    edges = photometry.overlap_edges(photometry._piece_bounds(pieces))
    with photometry._PairFitRunner({"pieces": pieces}, 3.0, 12, len(edges)) as runner:
        assert runner.kind == "processes"
        name = runner.shm.name
        fits = runner.gain_ratios("pieces", [0, 1], edges)
    assert runner.pool is None and runner.shm is None
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)
    monkeypatch.setattr(photometry, "PAIR_EXECUTOR", "threads")
    with photometry._PairFitRunner({"pieces": pieces}, 3.0, 12, len(edges)) as runner:
        assert runner.kind == "threads"
        assert runner.gain_ratios("pieces", [0, 1], edges) == fits  # the same numbers on threads

    class Daemon:
        daemon = True

    monkeypatch.setattr(photometry, "PAIR_EXECUTOR", "processes")
    monkeypatch.setattr(multiprocessing, "current_process", lambda: Daemon())
    with photometry._PairFitRunner({"pieces": pieces}, 3.0, 12, len(edges)) as runner:
        assert runner.kind == "threads"  # a Dask worker cannot have children
    monkeypatch.setattr(photometry, "PAIR_EXECUTOR", "fibres")
    with pytest.raises(ValueError):
        photometry._PairFitRunner({"pieces": pieces}, 3.0, 12, len(edges))


def test_graph_solve_of_several_columns_is_each_column_solved_alone() -> None:
    """One factorisation for the plane's three coefficients gives, to the bit, what three solves
    give, gauges included; and the solve recovers node values from exact differences."""
    from napari_zemosaic.engine.photometry import _graph_solve

    rng = np.random.default_rng(11)
    n = 60
    truth = rng.normal(0.0, 1.0, (n, 3))
    truth[40:] += 5.0  # a second component, nodes 40-59
    edges = np.array(sorted({(min(a, b), max(a, b)) for a in range(n) for b in rng.choice(n, 4)
                             if a != b and (a < 40) == (b < 40)}))
    weights = rng.uniform(1.0, 50.0, len(edges))
    differences = truth[edges[:, 0]] - truth[edges[:, 1]]
    for priority in (None, [7, 45]):
        together = _graph_solve(n, edges, differences, weights, priority)
        alone = np.stack([_graph_solve(n, edges, differences[:, k], weights, priority) for k in range(3)], axis=1)
        assert together.shape == (n, 3)
        assert np.array_equal(together, alone)
    for members, anchor in ((slice(0, 40), 7), (slice(40, n), 45)):  # x = 0 at each component's anchor
        expected = truth[members] - truth[anchor]
        assert np.allclose(together[members], expected, atol=1e-6)


def test_channels_with_the_same_plane_graph_share_its_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels fitted on the same edges with the same weights are solved in one call, others on
    their own; every channel gets what its own solve gives, to the bit."""
    from napari_zemosaic.engine import photometry

    rng = np.random.default_rng(12)
    n = 30
    edges = np.array([(k, k + 1) for k in range(n - 1)] + [(k, k + 3) for k in range(n - 3)])
    weights = rng.uniform(1.0, 9.0, len(edges))
    graphs = {channel: (edges, rng.normal(size=(len(edges), 3)), weights) for channel in range(3)}
    graphs[2] = (edges, graphs[2][1], weights * 2.0)  # another weighting: a graph of its own
    calls: list[int] = []
    solve = photometry._graph_solve
    monkeypatch.setattr(photometry, "_graph_solve", lambda *a, **k: calls.append(1) or solve(*a, **k))
    together = photometry._solve_plane_graphs(n, graphs, [4])
    assert len(calls) == 2
    for channel, (e, d, w) in graphs.items():
        alone = solve(n, e, d, w, [4])
        assert all(np.array_equal(together[channel][k], alone[:, k]) for k in range(3))


def _overlap_edges_row_by_row(bounds: np.ndarray, neighbours: int, min_cells: int) -> set[tuple[int, int]]:
    """The overlap graph's per-frame choice written plainly, one frame at a time: every overlap of
    at least ``min_cells`` cells, or, beyond ``neighbours`` of them, the strongest half and half
    spread over the rest of the ranking (area descending, then the highest index first)."""
    edges = set()
    for i, (y0, y1, x0, x1) in enumerate(bounds):
        height = np.clip(np.minimum(y1, bounds[:, 1]) - np.maximum(y0, bounds[:, 0]), 0, None)
        width = np.clip(np.minimum(x1, bounds[:, 3]) - np.maximum(x0, bounds[:, 2]), 0, None)
        area = height * width
        area[i] = 0
        candidates = [j for j in range(len(bounds)) if area[j] >= min_cells]
        if len(candidates) > neighbours:
            ranked = sorted(candidates, key=lambda j: (area[j], j), reverse=True)
            strong = neighbours - neighbours // 2
            spread = np.linspace(strong, len(ranked) - 1, neighbours // 2).round().astype(int)
            candidates = ranked[:strong] + [ranked[k] for k in spread]
        edges.update((min(i, j), max(i, j)) for j in candidates)
    return edges


def test_overlap_edges_choose_each_frames_overlaps_as_the_plain_rule_does() -> None:
    from napari_zemosaic.engine.photometry import overlap_edges

    rng = np.random.default_rng(13)
    for _ in range(60):
        n = int(rng.integers(2, 120))
        spread, size = int(rng.integers(2, 40)), int(rng.integers(2, 12))
        y0, x0 = rng.integers(0, spread, n), rng.integers(0, spread, n)
        bounds = np.stack([y0, y0 + rng.integers(1, size + 1, n), x0, x0 + rng.integers(1, size + 1, n)], axis=1)
        neighbours, min_cells = int(rng.integers(0, 10)), int(rng.integers(1, 12))
        got = set(overlap_edges(bounds, neighbours, min_cells))
        expected = _overlap_edges_row_by_row(bounds, neighbours, min_cells)
        assert expected <= got  # the links between components come on top
        if len(expected) and got != expected:
            from scipy.sparse.csgraph import connected_components
            from scipy.sparse import coo_matrix

            pairs = np.array(sorted(expected))
            graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
            assert connected_components(graph, directed=False)[0] > 1


@pytest.mark.parametrize("chunk_cells", [2**18, 500])
def test_coarser_pieces_equal_coarse_piece(monkeypatch: pytest.MonkeyPatch, chunk_cells: int) -> None:
    """Pieces of every shape and alignment coarsened together (in one padded stack, or a few at a
    time) give what :func:`coarse_piece` gives each one alone, to the bit."""
    from napari_zemosaic.engine import photometry
    from napari_zemosaic.engine.photometry import _coarser_pieces

    monkeypatch.setattr(photometry, "COARSEN_CHUNK_CELLS", chunk_cells)
    rng = np.random.default_rng(6)
    for factor in (2, 4):
        for dtype in (np.float32, np.float64):
            pieces = []
            for y0, x0, h, w in ((0, 0, 40, 56), (3, 5, 37, 29), (-7, 11, 9, 3), (1, 1, 2, 2), (-2, 9, 6, 30)):
                data = (rng.gamma(2.0, 300.0, (3, h, w)) - 50.0).astype(dtype)
                data[:, rng.random((h, w)) < 0.05] = np.nan
                data[1, 0, :] = 1e-7  # a wide range of magnitudes in one block
                pieces.append(CoarsePiece(y0, x0, data))
            for piece, got in zip(pieces, _coarser_pieces(pieces, factor), strict=True):
                expected = coarse_piece(piece.data, (piece.y0, 0, piece.x0, 0), factor)
                assert (got.y0, got.x0) == (expected.y0, expected.x0)
                assert got.data.dtype == expected.data.dtype
                np.testing.assert_array_equal(got.data, expected.data)


# --- the pair fits on the device (photometry_device): run here on NumPy, on CuPy with -m gpu ------


def _device_field() -> list[CoarsePiece]:
    """A field with a trail, tied values (rounded cells), a hole of NaN cells and a one-column piece."""
    pieces = _field(12, 11)
    pieces[3].data[:, 12, :] += 300.0
    pieces[5].data = np.round(pieces[5].data)
    pieces[7].data[:, 4:9, 10:20] = np.nan
    pieces.append(_piece(_sky(11), 0, 60, 30, 1, gain=0.97, offset=3.0, seed=40))  # x constant: refitted per edge
    return pieces


def _runner_fits(runner, pieces: list[CoarsePiece], gains: np.ndarray) -> tuple[list, list]:
    from napari_zemosaic.engine import photometry

    edges = photometry.overlap_edges(photometry._piece_bounds(pieces))
    return runner.gain_ratios("pieces", [0, 1, 2], edges), runner.plane_fits("pieces", [0, 1, 2], edges, gains)


def _assert_same_fits(got: tuple[list, list], expected: tuple[list, list], rtol: float) -> None:
    for got_kind, expected_kind in zip(got, expected):
        for got_channel, expected_channel in zip(got_kind, expected_kind):
            assert [fit[:3] for fit in got_channel] == [fit[:3] for fit in expected_channel]  # edges, cells
            for (*_, value), (*_, reference) in zip(got_channel, expected_channel):
                assert (value is None) == (reference is None)
                if value is not None:
                    np.testing.assert_allclose(np.asarray(value), np.asarray(reference), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("budget", [10**10, 4 * 10**6])
def test_device_pair_fits_gather_and_fit_like_the_host_runner(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """DevicePairFits on NumPy (its gather of common cells on a flat buffer, its batches within the
    budget, its refits of ill-conditioned edges) gives the host runner's edges, cell counts and fits."""
    from napari_zemosaic.engine import photometry
    from napari_zemosaic.engine.photometry_device import DevicePairFits

    monkeypatch.setattr(photometry, "PAIR_EXECUTOR", "threads")
    pieces = _device_field()
    gains = 1.0 + 0.01 * np.arange(3 * len(pieces)).reshape(len(pieces), 3)
    with photometry._PairFitRunner({"pieces": pieces}, 3.0, 12, 0) as host:
        expected = _runner_fits(host, pieces, gains)
    device = DevicePairFits({"pieces": pieces}, 3.0, 12, np, budget)
    rows = device._rows([0, 1, 2], photometry.overlap_edges(photometry._piece_bounds(pieces)))
    assert (len(device._batches("pieces", rows)) > 1) == (budget < 10**9)
    _assert_same_fits(_runner_fits(device, pieces, gains), expected, rtol=1e-10)


def test_batched_theil_sen_rows_and_sorted_medians_equal_the_row_code() -> None:
    """The all-rows Theil–Sen seeds and sorted medians (the GPU's code, here on NumPy) equal the
    row-by-row seeds and partitioned medians, to the bit: every count from 1 up, tied values."""
    from napari_zemosaic.engine.photometry import (
        _batched_theil_sen,
        _batched_theil_sen_rows,
        _pad_samples,
        _RowMedians,
        _SortedRowMedians,
    )

    rng = np.random.default_rng(12)
    samples = []
    for n in (1, 2, 3, 4, 5, 12, 40, 199, 200, 250, 2999, 3000):
        x = rng.normal(100.0, 20.0, n).round(0)  # ties
        samples.append((x, 1.03 * x + rng.normal(0.0, 1.0, n), x, x))
    va, vb, _, _, valid, count = _pad_samples(samples)
    medians = _RowMedians(valid)
    gain, offset = _batched_theil_sen(va, vb, medians, count, {})
    assert np.array_equal(_batched_theil_sen_rows(va, vb, valid, count, np), gain)
    assert np.array_equal(_SortedRowMedians(valid, np)(vb - gain[:, None] * va), offset, equal_nan=True)
    assert 1.0 < np.median(gain[count >= 40]) < 1.06


@pytest.mark.gpu
def test_photometric_solve_on_the_gpu_equals_the_host_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    """solve_normalisation with its pair fits on CuPy, in one batch and in many small ones, gives
    the host's gains, offsets and tilts (floating-point noise) and the same constrained pieces;
    a solve of fewer than DEVICE_MIN_EDGES edges is fitted on the host."""
    cp = pytest.importorskip("cupy")
    from napari_zemosaic.engine import gpu, photometry
    from napari_zemosaic.engine.photometry_device import DevicePairFits

    ok, reason = gpu.gpu_is_available(0, refresh=True)
    if not ok:
        pytest.skip(f"no usable GPU: {reason}")
    pieces = _device_field()
    used = []
    original = DevicePairFits._fit

    def spy(self, *args):
        used.append(args[0])
        return original(self, *args)

    monkeypatch.setattr(DevicePairFits, "_fit", spy)
    monkeypatch.setattr(photometry, "DEVICE_MIN_EDGES", 1000)
    solve_normalisation(pieces, None, "linear_fit", xp=cp, device_budget_bytes=10**10)
    assert not used  # a small solve stays on the host
    monkeypatch.setattr(photometry, "DEVICE_MIN_EDGES", 0)
    for shared in (True, False):
        host = solve_normalisation(pieces, None, "linear_fit", shared_gain=shared)
        for budget in (10**10, 4 * 10**6):
            device = solve_normalisation(pieces, None, "linear_fit", shared_gain=shared, xp=cp, device_budget_bytes=budget)
            np.testing.assert_allclose(device.gains, host.gains, rtol=1e-9)
            np.testing.assert_allclose(device.offsets, host.offsets, rtol=1e-7, atol=1e-7)
            np.testing.assert_allclose(device.tilts, host.tilts, rtol=1e-7, atol=1e-9)
            assert np.array_equal(device.constrained, host.constrained)
    assert "gain" in used and "plane" in used
    gains = np.ones((len(pieces), 3))
    expected = _runner_fits(photometry._PairFitRunner({"pieces": pieces}, 3.0, 12, 0), pieces, gains)
    _assert_same_fits(_runner_fits(DevicePairFits({"pieces": pieces}, 3.0, 12, cp, 10**10), pieces, gains), expected, 1e-9)


def test_pieces_coarsened_ahead_give_the_solve_of_the_frames_kept() -> None:
    """Mosaic-First coarsens every piece P3 kept while P2 finishes; the solve of the frames P2 then
    keeps, from those pieces, is the solve of their pieces as P3 made them (to the bit). Where the
    frames kept would be coarsened otherwise, the pieces as P3 made them are solved."""
    from napari_zemosaic.engine.mosaic_first import _PhotometryAhead
    from napari_zemosaic.engine.photometry import PHOTOMETRY_BIN_PX, coarsening_factor

    rng = np.random.default_rng(8)
    y, x = np.mgrid[:160, :400].astype(float)
    sky = 500.0 + 60.0 * np.sin(x / 23.0) * np.cos(y / 17.0) + (rng.random((160, 400)) < 0.05) * rng.uniform(20, 300, (160, 400))
    sky = np.stack([sky, 0.8 * sky, 0.6 * sky])
    coarse = {k: _piece(sky, 7 * (k % 3), 30 * k, 80, 90, gain=1.0 + 0.03 * (k % 4), offset=4.0 * k, seed=50 + k)
              for k in range(9)}  # 7200 cells each: coarsened 2x
    coarse[9] = _piece(sky, 0, 350, 40, 50, gain=1.0, offset=0.0, seed=70)  # a small one
    ahead = _PhotometryAhead(coarse)
    ahead.coarsen()
    used = [0, 1, 2, 4, 5, 6, 7, 8, 9]  # P2 rejected frame 3
    pieces, bin_px = ahead.pieces(used, coarse)
    assert coarsening_factor([coarse[i] for i in used]) == 2 and bin_px == 2 * PHOTOMETRY_BIN_PX
    expected = solve_normalisation([coarse[i] for i in used], method="linear_fit", bin_px=PHOTOMETRY_BIN_PX, shared_gain=True)
    got = solve_normalisation(pieces, method="linear_fit", bin_px=bin_px, shared_gain=True)
    assert got.bin_px == expected.bin_px
    for name in ("gains", "offsets", "tilts", "centres"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    assert not np.allclose(expected.gains, 1.0)  # the solve did something
    small = [9]  # solved alone, this piece is not coarsened: P3's piece goes to the solve
    assert ahead.pieces(small, coarse) == ([coarse[9]], PHOTOMETRY_BIN_PX)

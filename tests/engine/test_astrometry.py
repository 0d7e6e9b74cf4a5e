"""Plate solving of demo frames written without WCS, checked against the truth WCS of each frame.

A small astrometry.net index is built from the demo's own star catalog with
``build-astrometry-index``, so the real ``solve-field`` runs on real star lists. ASTAP's star
databases cannot be installed here: its command line and its .ini/.wcs answers are tested
against a small fake executable.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from napari_zemosaic.cli import build_parser
from napari_zemosaic.engine import astrometry
from napari_zemosaic.engine.astrometry import (
    METHOD_CACHED,
    METHOD_FAILED,
    METHOD_HEADER,
    METHOD_PROPAGATED,
    METHOD_SOLVED,
    SolverInfo,
    build_astap_command,
    cli_solve,
    detect_stars,
    find_solvers,
    frame_with_wcs,
    match_star_lists,
    parse_astap_output,
    propagate_wcs,
    solve_missing,
    write_wcs_to_input,
)
from napari_zemosaic.engine.frames import load_frame, read_frame_info, wcs_to_dict
from napari_zemosaic.events import LogEvent, ProgressEvent, Reporter
from napari_zemosaic.i18n import tr

HAVE_ASTROMETRY_NET = shutil.which("solve-field") is not None and shutil.which("build-astrometry-index") is not None
needs_astrometry_net = pytest.mark.skipif(not HAVE_ASTROMETRY_NET, reason="astrometry.net is not installed")

# 2x2 pointings of 270x480 px (0.18 x 0.32 deg) Seestar subs, written as the scope writes them.
NIGHT_SPEC = dict(panels=(2, 2), frames_per_panel=3, scale=0.25, seed=5, with_wcs=False)
CORNER_TOLERANCE_PX = 1.0


# ----------------------------------------------------------------------------- helpers


def _drain(generator):
    events = []
    while True:
        try:
            events.append(next(generator))
        except StopIteration as stop:
            return stop.value, events


def _solve(frames, config, cache_dir):
    reporter = Reporter()
    outcomes, events = _drain(solve_missing(frames, config, cache_dir, reporter))
    return outcomes, events, reporter


def _corner_error_px(wcs, truth_wcs, shape) -> float:
    height, width = shape
    corners = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = truth_wcs.all_world2pix(wcs.all_pix2world(corners, 0), 0)
    return float(np.hypot(*(back - corners).T).max())


def _hashes(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _keys(events, level: str | None = None) -> list[str]:
    return [e.key for e in events if isinstance(e, LogEvent) and (level is None or e.level == level)]


def _truth_index(truth, path) -> int:
    return [p.name for p in truth.frame_paths].index(Path(path).name)


def _build_index(catalog_fits: Path, out_dir: Path) -> Path:
    """Index files for quads of 2.8'-11' (fields of 10'-20'), from a RA/DEC/MAG table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for scale in (1, 2, 3, 4):
        subprocess.run(
            ["build-astrometry-index", "-i", str(catalog_fits), "-o", str(out_dir / f"index-demo-{scale:02d}.fits"),
             "-P", str(scale), "-S", "MAG", "-E", "-j", "0.5", "-I", f"77000{scale}", "-t", str(out_dir)],
            check=True, capture_output=True,
        )
    return out_dir


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Demo frames without WCS, their truth, and an index built from the truth catalog."""
    if not HAVE_ASTROMETRY_NET:
        pytest.skip("astrometry.net is not installed")
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("unsolved_night")
    truth = generate_demo(root, DemoSpec(**NIGHT_SPEC))
    magnitude = -2.5 * np.log10(truth.star_flux[:, 1])
    catalog = root / "catalog.fits"
    fits.BinTableHDU.from_columns([
        fits.Column("RA", "D", array=truth.star_ra),
        fits.Column("DEC", "D", array=truth.star_dec),
        fits.Column("MAG", "E", array=magnitude),
    ]).writeto(catalog)
    index_dir = _build_index(catalog, root / "index")
    return root, truth, index_dir


@pytest.fixture(scope="module")
def solved(night, tmp_path_factory):
    """One solve_missing run over the whole night, with the input hashes before it."""
    root, truth, index_dir = night
    before = _hashes(truth.frame_paths)
    frames = [read_frame_info(path) for path in truth.frame_paths]
    cache = tmp_path_factory.mktemp("solve_cache")
    config = {"astrometry_index_dir": str(index_dir), "solver_processes": 2}
    outcomes, events, reporter = _solve(frames, config, cache)
    return frames, outcomes, events, cache, config, before


# ----------------------------------------------------------------------------- solving the night


def test_demo_frames_have_no_wcs_as_the_scope_writes_them(night) -> None:
    _, truth, _ = night
    info = read_frame_info(truth.frame_paths[0])
    assert info.wcs is None and info.wcs_status == "missing"
    assert info.ra_deg is not None and info.header_scale_arcsec == pytest.approx(2.39, abs=0.01)


@needs_astrometry_net
def test_find_solvers_reports_astrometry_net(night) -> None:
    _, _, index_dir = night
    solvers = find_solvers({"astrometry_index_dir": str(index_dir)})
    found = {s.name: s for s in solvers}
    assert found["astrometry.net"].usable and found["astrometry.net"].index_dir == str(index_dir)
    assert found["astrometry.net"].version[:1].isdigit()
    empty = find_solvers({"astrometry_index_dir": str(index_dir / "missing")})
    net = next(s for s in empty if s.name == "astrometry.net")
    assert not net.usable and "index" in net.problem


def test_every_frame_gets_a_wcs_within_one_pixel_of_the_truth(night, solved) -> None:
    _, truth, _ = night
    frames, outcomes, events, *_ = solved
    methods = [o.method for o in outcomes]
    assert set(methods) <= {METHOD_SOLVED, METHOD_PROPAGATED}, [(o.path.name, o.method, o.detail) for o in outcomes]
    errors = {}
    for info, outcome in zip(frames, outcomes):
        index = _truth_index(truth, info.path)
        errors[info.path.name] = (outcome.method, _corner_error_px(outcome.wcs, truth.wcs_for(index), truth.shape))
    worst = max(error for _, error in errors.values())
    assert worst <= CORNER_TOLERANCE_PX, errors
    # The solver kept a SIP fit; propagated frames carry it too.
    assert all(o.wcs.sip is not None for o in outcomes)


def test_solve_few_and_propagate_the_rest(night, solved) -> None:
    _, truth, _ = night
    frames, outcomes, events, *_ = solved
    solved_frames = [o for o in outcomes if o.method == METHOD_SOLVED]
    propagated = [o for o in outcomes if o.method == METHOD_PROPAGATED]
    n_panels = NIGHT_SPEC["panels"][0] * NIGHT_SPEC["panels"][1]
    assert len(solved_frames) == n_panels  # one anchor per pointing
    assert len(propagated) == len(frames) - n_panels
    anchors = {str(o.path) for o in solved_frames}
    for outcome in propagated:
        assert outcome.reference in anchors
        assert outcome.matched_stars >= 15 and outcome.residual_px < 0.5
        panel = truth.frames[_truth_index(truth, outcome.path)].panel
        assert truth.frames[_truth_index(truth, outcome.reference)].panel == panel
    for outcome in solved_frames:
        assert outcome.residual_px is not None and outcome.residual_px < 0.5 and outcome.matched_stars >= 10


def test_progress_and_messages_are_locale_keys(solved) -> None:
    frames, outcomes, events, *_ = solved
    progress = [e for e in events if isinstance(e, ProgressEvent) and e.key == "progress_solve"]
    done = [e.done for e in progress]
    # Every frame counted once, in order; a solve that runs over 0.5 s repeats the count so far
    # (a heartbeat a caller can cancel on), so repeats are allowed, 0 before the first result.
    assert done == sorted(done) and sorted(set(done) - {0}) == list(range(1, len(frames) + 1))
    assert all(e.phase == "P1" and e.total == len(frames) for e in progress)
    keys = _keys(events)
    assert {"solve_info_start", "solve_info_plan", "solve_info_solved", "solve_info_summary"} <= set(keys)
    for event in events:
        if isinstance(event, LogEvent):
            assert event.text("fr") != event.key and event.text("en") != event.key


def test_inputs_are_byte_identical_after_solving(night, solved) -> None:
    _, truth, _ = night
    before = solved[-1]
    assert _hashes(truth.frame_paths) == before
    assert not any(p.name.endswith((".wcs", ".corr", ".axy", ".xyls")) for p in (truth.frames_dir).iterdir())


def test_second_run_reuses_the_cache_without_a_solver(night, solved) -> None:
    frames, outcomes, _, cache, config, _ = solved
    assert len(list((cache / "wcs").glob("*.json"))) == len(frames)
    assert not (cache / "solve_tmp").exists()
    no_solver = {**config, "solve_field_path": str(cache / "no-such-solver"), "solver": "astrometry.net"}
    again, events, _ = _solve(frames, no_solver, cache)
    assert [o.method for o in again] == [METHOD_CACHED] * len(frames)
    assert [o.source_method for o in again] == [o.method for o in outcomes]
    height, width = frames[0].shape
    probe = np.array([[0.0, 0.0], [width - 1.0, height - 1.0], [width / 3.0, height / 2.0]])
    for first, second in zip(outcomes, again):
        assert np.allclose(first.wcs.all_pix2world(probe, 0), second.wcs.all_pix2world(probe, 0), atol=1e-9, rtol=0)
    assert "solve_info_cached" in _keys(events)


def test_frame_with_wcs_swaps_in_the_solution(solved) -> None:
    frames, outcomes, *_ = solved
    updated = frame_with_wcs(frames[0], outcomes[0].wcs, outcomes[0].wcs_status)
    assert updated.wcs is not None and updated.wcs_status in ("solved", "propagated")
    assert updated.wcs.pixel_shape == (frames[0].shape[1], frames[0].shape[0])
    assert frames[0].wcs is None  # the original is untouched
    assert updated.centre is not None
    # A resume digest computed with another WCS does not follow the new one.
    import dataclasses

    digested = dataclasses.replace(frames[0], resume_token=({"path": "x"}, "0" * 24))
    assert frame_with_wcs(digested, outcomes[0].wcs, outcomes[0].wcs_status).resume_token is None


def test_mosaic_from_solved_frames_matches_the_truth_catalog(night, solved, tmp_path) -> None:
    """The stacked mosaic's stars sit where the truth catalog puts them (RMS <= 0.2 px).

    The solutions are written into copies (the inputs stay untouched) and the copies are run
    through the full pipeline.
    """
    from napari_zemosaic.engine.pipeline import run

    _, truth, _ = night
    frames, outcomes, *_ = solved
    copies = tmp_path / "solved_frames"
    copies.mkdir()
    for info, outcome in zip(frames, outcomes):
        target = Path(shutil.copy(info.path, copies))
        write_wcs_to_input(read_frame_info(target), outcome.wcs)
    # Quality rejection off: every frame, the cloudy one included, must land where the truth says.
    result = run(copies, tmp_path / "out", {"max_memory_mb": 512, "language": "en", "quality_rejection": False})
    _assert_mosaic_matches_truth(result, truth)


def _assert_mosaic_matches_truth(result, truth) -> None:
    from starphot import centroid

    assert result.status == "ok" and result.report["frames"]["used"] == len(truth.frames)
    wcs = result.canvas.wcs
    height, width = result.canvas.shape
    x, y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    green = truth.star_flux[:, 1]
    image = result.data.sum(axis=0)
    errors = []
    for i in np.flatnonzero((x > 15) & (x < width - 16) & (y > 15) & (y < height - 16) & (green > 3000)):
        distance = np.hypot(x - x[i], y - y[i])
        distance[i] = np.inf
        if (green[distance < 12] > 0.01 * green[i]).any():
            continue  # a neighbour would pull the centroid
        iy, ix = int(round(y[i])), int(round(x[i]))
        if result.alpha[iy - 10 : iy + 11, ix - 10 : ix + 11].min() == 0:
            continue
        cx, cy = centroid(image, x[i], y[i])
        errors.append(np.hypot(cx - x[i], cy - y[i]))
    assert len(errors) >= 20
    rms = float(np.sqrt(np.mean(np.square(errors))))
    print(f"mosaic star RMS {rms:.3f} px over {len(errors)} stars")
    assert rms <= 0.2, f"star RMS {rms:.3f} px over {len(errors)} stars"


def _ingest_solves() -> bool:
    from napari_zemosaic.engine import pipeline

    return "solve_missing" in inspect.getsource(pipeline)


@needs_astrometry_net
@pytest.mark.skipif(not _ingest_solves(), reason="pipeline ingest does not call solve_missing yet")
def test_zemosaic_run_on_unsolved_frames_matches_the_truth(night, tmp_path) -> None:
    from napari_zemosaic.engine.pipeline import run

    _, truth, index_dir = night
    before = _hashes(truth.frame_paths)
    config = {"max_memory_mb": 512, "language": "en", "astrometry_index_dir": str(index_dir),
              "quality_rejection": False}
    result = run(truth.frames_dir, tmp_path / "out", config)
    _assert_mosaic_matches_truth(result, truth)
    assert _hashes(truth.frame_paths) == before
    wcs_units = result.report["resume"]["units"]["wcs"]
    assert wcs_units["computed"] == len(truth.frame_paths) and wcs_units["reused"] == 0
    again = run(truth.frames_dir, tmp_path / "out", config)  # the solved WCS outlive the run's cache
    assert again.report["resume"]["units"]["wcs"]["reused"] == len(truth.frame_paths)


@needs_astrometry_net
@pytest.mark.skipif(not _ingest_solves(), reason="pipeline ingest does not call solve_missing yet")
def test_plate_solves_run_as_tasks_on_a_local_dask_cluster(night, tmp_path) -> None:
    pytest.importorskip("distributed")
    from napari_zemosaic.engine.pipeline import run

    _, truth, index_dir = night
    config = {"max_memory_mb": 512, "language": "en", "astrometry_index_dir": str(index_dir),
              "quality_rejection": False, "scheduler": "local", "scheduler_workers": 2,
              "scheduler_threads_per_worker": 1}
    result = run(truth.frames_dir, tmp_path / "out", config)
    _assert_mosaic_matches_truth(result, truth)
    solves = [task for task in result.report["scheduler"]["tasks"] if task["kind"] == "solve"]
    methods = [entry["method"] for entry in result.report["frames"]["astrometry"]]
    assert len(solves) == methods.count("solved") > 0  # one task per direct solve; propagation stays here
    assert all(task["status"] == "ok" and task["worker"] != "inline" for task in solves)


# ----------------------------------------------------------------------------- bad hints, bad frames


def _edit_copy(source: Path, target: Path, edit) -> Path:
    shutil.copy(source, target)
    with fits.open(target, mode="update", do_not_scale_image_data=True) as hdul:
        edit(hdul[0])
    return target


def test_bad_hints_and_bad_frames_are_reported_and_the_others_solve(night, tmp_path) -> None:
    _, truth, index_dir = night
    panel0 = [i for i, f in enumerate(truth.frames) if f.panel == 0]
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [Path(shutil.copy(truth.frame_paths[i], folder)) for i in panel0]
    other = [i for i, f in enumerate(truth.frames) if f.panel == 1]

    def wrong_pointing(hdu) -> None:
        hdu.header["RA"] = (hdu.header["RA"] + 40.0) % 360.0
        hdu.header["DEC"] = hdu.header["DEC"] + 20.0

    def no_pointing(hdu) -> None:
        del hdu.header["RA"], hdu.header["DEC"]

    def no_stars(hdu) -> None:
        rng = np.random.default_rng(1)
        hdu.data = (rng.normal(1200.0, 30.0, hdu.data.shape) - 32768).astype(np.int16)

    wrong = _edit_copy(truth.frame_paths[other[0]], folder / "wrong_hint.fit", wrong_pointing)
    missing = _edit_copy(truth.frame_paths[other[1]], folder / "no_hint.fit", no_pointing)
    starless = _edit_copy(truth.frame_paths[other[2]], folder / "starless.fit", no_stars)
    corrupt = Path(shutil.copy(truth.frame_paths[panel0[0]], folder / "corrupt.fit"))
    frames = [read_frame_info(p) for p in [*good, wrong, missing, starless, corrupt]]
    with open(corrupt, "r+b") as handle:  # cut after the header pass: an interrupted copy
        handle.truncate(corrupt.stat().st_size // 2)

    outcomes, events, _ = _solve(frames, {"astrometry_index_dir": str(index_dir)}, tmp_path / "cache")
    by_name = {o.path.name: o for o in outcomes}

    for path, index in zip(good, panel0):
        outcome = by_name[path.name]
        assert outcome.method in (METHOD_SOLVED, METHOD_PROPAGATED)
        assert _corner_error_px(outcome.wcs, truth.wcs_for(index), truth.shape) <= CORNER_TOLERANCE_PX
    for path, index in ((wrong, other[0]), (missing, other[1])):
        outcome = by_name[path.name]
        assert outcome.method == METHOD_SOLVED, (outcome.reason_key, outcome.detail)
        assert _corner_error_px(outcome.wcs, truth.wcs_for(index), truth.shape) <= CORNER_TOLERANCE_PX
    assert "solve_warn_hint_wrong" in by_name["wrong_hint.fit"].warnings
    assert "solve_info_no_hint" in by_name["no_hint.fit"].warnings
    assert by_name["starless.fit"].method == METHOD_FAILED
    assert by_name["starless.fit"].reason_key == "frame_excluded_too_few_stars"
    assert by_name["corrupt.fit"].method == METHOD_FAILED
    assert by_name["corrupt.fit"].reason_key == "frame_excluded_truncated"

    warnings_logged = {(e.key, e.params.get("path")) for e in events if isinstance(e, LogEvent)}
    assert ("solve_warn_hint_wrong", str(wrong)) in warnings_logged
    assert ("solve_info_no_hint", str(missing)) in warnings_logged
    assert ("frame_excluded_too_few_stars", str(starless)) in warnings_logged
    assert ("frame_excluded_truncated", str(corrupt)) in warnings_logged
    # Report entries: each failure says why, in both languages.
    for name in ("starless.fit", "corrupt.fit"):
        entry = by_name[name].to_dict()
        assert entry["reason_key"] and entry["detail"] and entry["wcs"] is None
        assert name in tr(entry["reason_key"], "fr", path=entry["path"], detail=entry["detail"])


def test_solver_timeout_is_a_reported_failure(night, tmp_path) -> None:
    _, truth, index_dir = night
    header_frame = frame_with_wcs(read_frame_info(truth.frame_paths[0]), truth.wcs_for(0), "valid")
    lonely = [read_frame_info(truth.frame_paths[i]) for i in (3, 6)]  # two pointings, one frame each
    config = {"astrometry_index_dir": str(index_dir), "solver_timeout_s": 0.01, "solve_propagate": False}
    outcomes, events, _ = _solve([header_frame, *lonely], config, tmp_path / "cache")
    assert outcomes[0].method == METHOD_HEADER and outcomes[0].wcs is header_frame.wcs
    for outcome in outcomes[1:]:
        assert outcome.method == METHOD_FAILED and outcome.reason_key == "frame_excluded_solve_timeout"
        assert "0.01" in outcome.detail
    assert _keys(events, "warning").count("frame_excluded_solve_timeout") == 2
    assert not list((tmp_path / "cache").glob("wcs/*.json"))


def test_no_solver_gives_one_clear_message(night, tmp_path) -> None:
    _, truth, _ = night
    frames = [read_frame_info(p) for p in truth.frame_paths[:3]]
    config = {"solver": "astap", "astap_path": str(tmp_path / "no-astap")}
    outcomes, events, _ = _solve(frames, config, tmp_path / "cache")
    assert [o.reason_key for o in outcomes] == ["frame_excluded_no_solver"] * 3
    errors = [e for e in events if isinstance(e, LogEvent) and e.level == "error"]
    assert [e.key for e in errors] == ["solve_error_no_solver"]
    assert "apt-get install astrometry.net" in errors[0].text("en")
    assert "astap" in errors[0].text("fr").lower()


def test_without_solver_header_wcs_frames_still_lend_their_wcs(night, tmp_path) -> None:
    _, truth, _ = night
    panel0 = [i for i, f in enumerate(truth.frames) if f.panel == 0]
    far = next(i for i, f in enumerate(truth.frames) if f.panel == 3)
    known = frame_with_wcs(read_frame_info(truth.frame_paths[panel0[0]]), truth.wcs_for(panel0[0]), "valid")
    frames = [known, *(read_frame_info(truth.frame_paths[i]) for i in (*panel0[1:], far))]
    config = {"solver": "astap", "astap_path": str(tmp_path / "no-astap")}
    outcomes, events, _ = _solve(frames, config, tmp_path / "cache")
    assert [o.method for o in outcomes] == [METHOD_HEADER] + [METHOD_PROPAGATED] * (len(panel0) - 1) + [METHOD_FAILED]
    for outcome, index in zip(outcomes[1:-1], panel0[1:]):
        assert _corner_error_px(outcome.wcs, truth.wcs_for(index), truth.shape) < 0.3
    assert outcomes[-1].reason_key == "frame_excluded_no_solver"
    assert _keys(events, "error") == ["solve_error_no_solver"]


def test_write_wcs_to_inputs_is_an_explicit_opt_in(night, tmp_path) -> None:
    _, truth, index_dir = night
    copy_path = Path(shutil.copy(truth.frame_paths[1], tmp_path / "opt_in.fit"))
    info = read_frame_info(copy_path)
    pixels = load_frame(info, hot_pixel_correction=False)
    config = {"astrometry_index_dir": str(index_dir), "write_wcs_to_inputs": True}
    outcomes, events, _ = _solve([info], config, tmp_path / "cache")
    assert outcomes[0].method == METHOD_SOLVED and "solve_info_wrote_input" in _keys(events)
    updated = read_frame_info(copy_path)
    assert updated.wcs_status == "valid"
    assert _corner_error_px(updated.wcs, truth.wcs_for(1), truth.shape) <= CORNER_TOLERANCE_PX
    assert np.array_equal(load_frame(updated, hot_pixel_correction=False), pixels)


# ----------------------------------------------------------------------------- matching and propagation


def test_star_matching_recovers_a_rotation_and_shift_with_outliers() -> None:
    rng = np.random.default_rng(4)
    stars = rng.uniform([0, 0], [270, 480], size=(90, 2))
    angle = np.deg2rad(23.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * 1.002
    shift = np.array([17.3, -41.9])
    moved = stars @ rotation.T + shift + rng.normal(0, 0.05, stars.shape)
    keep_src = rng.permutation(90)[:70]  # each list misses some stars and has spurious ones
    keep_dst = rng.permutation(90)[:75]
    src = np.vstack([stars[keep_src], rng.uniform([0, 0], [270, 480], size=(10, 2))])
    dst = np.vstack([moved[keep_dst], rng.uniform([0, 0], [270, 480], size=(10, 2))])
    match = match_star_lists(src, dst)
    assert match is not None
    assert np.allclose(match.matrix, rotation, atol=2e-4) and np.allclose(match.offset, shift, atol=0.05)
    common = len(set(keep_src) & set(keep_dst))
    assert match.n_matched >= common - 3 and match.rms_px < 0.1
    truth_pairs = {(int(np.flatnonzero(keep_src == s)[0]), int(np.flatnonzero(keep_dst == s)[0]))
                   for s in set(keep_src) & set(keep_dst)}
    found_pairs = set(zip(match.src_index.tolist(), match.dst_index.tolist()))
    assert len(found_pairs - truth_pairs) <= 1


def test_unrelated_star_fields_are_not_propagated(night) -> None:
    _, truth, _ = night
    first = read_frame_info(truth.frame_paths[0])
    far = next(i for i, f in enumerate(truth.frames) if f.panel == 3)
    stars_a, stars_b = detect_stars(first), detect_stars(read_frame_info(truth.frame_paths[far]))
    result = propagate_wcs(truth.wcs_for(far), stars_b, stars_a)
    assert result.wcs is None and result.detail
    same = next(i for i, f in enumerate(truth.frames) if f.panel == 0 and i != 0)
    good = propagate_wcs(truth.wcs_for(same), detect_stars(read_frame_info(truth.frame_paths[same])), stars_a)
    assert good.wcs is not None and good.n_matched >= 15 and good.rms_px < 0.5
    assert _corner_error_px(good.wcs, truth.wcs_for(0), truth.shape) < 0.3


def test_detected_stars_sit_on_the_truth_positions(night) -> None:
    _, truth, _ = night
    from scipy.spatial import cKDTree

    stars = detect_stars(read_frame_info(truth.frame_paths[2]))
    x, y = truth.wcs_for(2).all_world2pix(truth.star_ra, truth.star_dec, 0)
    distance, _ = cKDTree(np.column_stack([x, y])).query(stars.xy)
    assert len(stars) >= 30 and np.all(np.diff(stars.flux) <= 0)
    assert np.median(distance) < 0.1 and np.mean(distance < 1.0) > 0.9


# ----------------------------------------------------------------------------- ASTAP (fake executable)

FAKE_ASTAP = r'''#!{python}
"""A stand-in for astap_cli: records its argv and answers as ASTAP does, from solution.json."""
import json
import os
import sys
import time
from pathlib import Path

here = Path(__file__).resolve().parent
argv = sys.argv[1:]
if "-h" in argv:
    print("ASTAP astrometric solver version CLI-2024.05.01")
    sys.exit(0)
(here / "argv.json").write_text(json.dumps(argv))
answer = json.loads((here / "solution.json").read_text())
out = argv[argv.index("-o") + 1]
if answer["mode"] == "fail":
    Path(out + ".ini").write_text("PLTSOLVD=F\nCMDLINE=astap_cli\nERROR=No solution found!\nWARNING=Few stars.\n")
    sys.exit(1)
cards = [f"{key:<8s}= '{value}'" if isinstance(value, str) else f"{key:<8s}= {value!r:>20s}"
         for key, value in answer["cards"].items()]
# 80-column cards without newlines, END, padded to a FITS block -- as ASTAP writes its .wcs.
text = "".join(card.ljust(80) for card in [*cards, "END"])
Path(out + ".wcs").write_text(text.ljust(2880 * (len(text) // 2880 + 1)))
numbers = [f"{key}={value}" for key, value in answer["cards"].items() if not isinstance(value, str)]
Path(out + ".ini").write_text("\n".join(["PLTSOLVD=T", *numbers]) + "\n")
sys.exit(0)
'''


@pytest.fixture()
def fake_astap(tmp_path):
    folder = tmp_path / "astap"
    database = tmp_path / "astap_db"
    folder.mkdir()
    database.mkdir()
    (database / "d50_0101.1476").write_bytes(b"\0" * 64)  # ASTAP finds databases by their suffix
    executable = folder / "astap_cli"
    executable.write_text(FAKE_ASTAP.replace("{python}", sys.executable))
    executable.chmod(executable.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def answer(cards: dict | None) -> None:
        document = {"mode": "fail"} if cards is None else {"mode": "solve", "cards": cards}
        (folder / "solution.json").write_text(json.dumps(document))

    return executable, database, answer


def test_astap_is_found_with_version_and_database(fake_astap) -> None:
    executable, database, _ = fake_astap
    config = {"astap_path": str(executable), "astap_db_dir": str(database), "solve_field_path": "/nonexistent"}
    solvers = {s.name: s for s in find_solvers(config)}
    astap = solvers["astap"]
    assert astap.usable and astap.version == "2024.05.01" and astap.index_dir == str(database)
    bare = find_solvers({**config, "astap_db_dir": str(executable.parent)})
    assert not next(s for s in bare if s.name == "astap").usable


def test_astap_command_carries_the_header_hints(tmp_path) -> None:
    solver = SolverInfo("astap", "/opt/astap/astap_cli", "2024.05.01", "/opt/astap")
    hints = astrometry._Hints(83.82, -5.39, 2.0, 2.3928, 0.15, (480, 270), 2)
    argv = build_astap_command(solver, tmp_path / "lum.fits", tmp_path / "solution", hints)
    value = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1)
             if argv[i].startswith("-") and not argv[i + 1].startswith("-")}
    assert argv[0] == "/opt/astap/astap_cli" and value["-f"] == str(tmp_path / "lum.fits")
    assert float(value["-ra"]) == pytest.approx(83.82 / 15.0) and float(value["-spd"]) == pytest.approx(90 - 5.39)
    assert float(value["-fov"]) == pytest.approx(2.3928 * 480 / 3600, rel=1e-4)
    assert float(value["-r"]) == 2.0 and value["-z"] == "2" and value["-d"] == "/opt/astap"
    assert "-wcs" in argv and "-sip" in argv and "-update" not in argv
    blind = build_astap_command(solver, tmp_path / "lum.fits", tmp_path / "solution", hints.blind())
    assert "-ra" not in blind and blind[blind.index("-r") + 1] == "180"


def test_astap_solution_is_parsed_and_propagated(night, fake_astap, tmp_path) -> None:
    _, truth, _ = night
    executable, database, answer = fake_astap
    anchor = 0
    cards = {k: v for k, v in wcs_to_dict(truth.wcs_for(anchor)).items() if k not in ("DATE-OBS", "MJD-OBS")}
    answer(cards)
    config = {"solver": "astap", "astap_path": str(executable), "astap_db_dir": str(database)}
    first = read_frame_info(truth.frame_paths[anchor])
    outcomes, events, _ = _solve([first], config, tmp_path / "cache")
    assert outcomes[0].method == METHOD_SOLVED and outcomes[0].solver == "astap"
    assert _corner_error_px(outcomes[0].wcs, truth.wcs_for(anchor), truth.shape) < 1e-3
    argv = json.loads((executable.parent / "argv.json").read_text())
    assert float(argv[argv.index("-ra") + 1]) == pytest.approx(first.ra_deg / 15.0)
    assert float(argv[argv.index("-spd") + 1]) == pytest.approx(first.dec_deg + 90.0)
    assert argv[argv.index("-d") + 1] == str(database)
    assert Path(argv[argv.index("-f") + 1]).name == "luminance.fits"  # a copy, never the input
    assert not (tmp_path / "cache" / "solve_tmp").exists()

    # Its neighbours of the same pointing are propagated from it without calling ASTAP again.
    (executable.parent / "argv.json").unlink()
    solved_first = frame_with_wcs(first, outcomes[0].wcs, "solved")
    neighbours = [i for i, f in enumerate(truth.frames) if f.panel == truth.frames[anchor].panel and i != anchor]
    frames = [solved_first, *(read_frame_info(truth.frame_paths[i]) for i in neighbours)]
    outcomes, _, _ = _solve(frames, config, tmp_path / "cache2")
    assert [o.method for o in outcomes] == [METHOD_HEADER] + [METHOD_PROPAGATED] * len(neighbours)
    for outcome, index in zip(outcomes[1:], neighbours):
        assert _corner_error_px(outcome.wcs, truth.wcs_for(index), truth.shape) < 0.3
    assert not (executable.parent / "argv.json").exists()


def test_astap_failure_is_reported_with_its_error_text(night, fake_astap, tmp_path) -> None:
    _, truth, _ = night
    executable, database, answer = fake_astap
    answer(None)
    config = {"solver": "astap", "astap_path": str(executable), "astap_db_dir": str(database),
              "solve_blind_retry": False}
    outcomes, events, _ = _solve([read_frame_info(truth.frame_paths[1])], config, tmp_path / "cache")
    assert outcomes[0].method == METHOD_FAILED and outcomes[0].reason_key == "frame_excluded_solve_failed"
    assert "No solution found!" in outcomes[0].detail and "no solution" in outcomes[0].detail
    assert "frame_excluded_solve_failed" in _keys(events, "warning")


@pytest.mark.skipif(os.name != "posix", reason="the stand-in solver is a shell script")
def test_closing_the_generator_stops_running_solvers(night, tmp_path) -> None:
    _, truth, _ = night
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "d50_0101.1476").write_bytes(b"\0")
    script = folder / "astap_cli"
    script.write_text(f'#!/bin/sh\n[ "$1" = "-h" ] && exit 0\necho $$ > "{folder}/pid"\nexec sleep 60\n')
    script.chmod(0o755)
    config = {"solver": "astap", "astap_path": str(script), "astap_db_dir": str(folder)}
    generator = solve_missing([read_frame_info(truth.frame_paths[0])], config, tmp_path / "cache", Reporter())
    deadline = time.monotonic() + 30
    while not (folder / "pid").exists() and time.monotonic() < deadline:
        next(generator)  # heartbeats keep coming while the solver runs
    pid = int((folder / "pid").read_text())
    started = time.monotonic()
    generator.close()
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "cache" / "solve_tmp").exists()


def test_astap_ini_without_wcs_file(tmp_path) -> None:
    (tmp_path / "s.ini").write_text(
        "PLTSOLVD=T\nCRPIX1=135.5\nCRPIX2=240.5\nCRVAL1=83.82\nCRVAL2=-5.39\n"
        "CD1_1=-6.6E-4\nCD1_2=1.0E-5\nCD2_1=1.0E-5\nCD2_2=6.6E-4\n"
    )
    wcs, detail = parse_astap_output(tmp_path / "s", (480, 270))
    assert detail == "" and wcs is not None
    ra, dec = wcs.all_pix2world([[134.5, 239.5]], 0)[0]
    assert ra == pytest.approx(83.82) and dec == pytest.approx(-5.39)


# ----------------------------------------------------------------------------- CLI


def test_cli_solve_prints_method_cards_and_residual(night, solved, capsys, tmp_path) -> None:
    root, truth, index_dir = night
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in truth.frame_paths[:3]:
        shutil.copy(path, folder)
    parser = build_parser()
    args = parser.parse_args(["solve", str(folder), "--index-dir", str(index_dir), "--json",
                              "--cache-dir", str(tmp_path / "cache")])
    assert args.handler(args) == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["frames"]
    assert len(rows) == 3 and {r["method"] for r in rows} <= {METHOD_SOLVED, METHOD_PROPAGATED}
    assert all(r["wcs"]["CTYPE1"].startswith("RA---TAN") and r["residual_px"] < 0.5 for r in rows)
    assert any(s["name"] == "astrometry.net" and s["usable"] for s in document["solvers"])

    args = parser.parse_args(["solve", str(folder), "--index-dir", str(index_dir),
                              "--cache-dir", str(tmp_path / "cache")])
    assert cli_solve(args) == 0
    text = capsys.readouterr().out
    assert text.count("cached") == 3 and "CRVAL1" in text and "A_2_0" in text

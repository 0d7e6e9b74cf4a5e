"""Pointing groups from headers only: panels, orientation, size caps, tiny groups, preplans."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_zemosaic.config import validate_config
from napari_zemosaic.events import Reporter
from napari_zemosaic.engine.frames import FrameInfo
from napari_zemosaic.engine.grouping import (
    MIN_AUTO_CAP,
    automatic_cap,
    plan_groups,
    position_angle_deg,
    split_by_size,
)

SCALE_DEG = 2.39 / 3600.0
SHAPE = (384, 216)  # a Seestar sub at scale 0.2: the short side is 216 px = 0.143 deg
SHORT_SIDE_DEG = SHAPE[1] * SCALE_DEG


def _offset(ra: float, dec: float, east_px: float, north_px: float) -> tuple[float, float]:
    return ra + east_px * SCALE_DEG / math.cos(math.radians(dec)), dec + north_px * SCALE_DEG


def frame(index: int, ra: float, dec: float, rotation: float = 0.0, shape=SHAPE, wcs: bool = True) -> FrameInfo:
    theta = math.radians(rotation)
    world = None
    if wcs:
        world = WCS(naxis=2)
        world.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        world.wcs.crval = [ra, dec]
        world.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
        world.wcs.cd = SCALE_DEG * np.array([[-math.cos(theta), math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        world.wcs.set()
    return FrameInfo(
        path=Path(f"/data/night/Light_{index:04d}.fit"), shape=shape, n_channels=1, layout="cfa", bayer_pattern="GRBG",
        exposure_s=10.0, date_obs=f"2026-11-21T22:{index // 60:02d}:{index % 60:02d}", eqmode=0, ra_deg=ra, dec_deg=dec,
        focal_mm=250.0, pixel_um=2.9, header_scale_arcsec=2.39, instrument="test", is_seestar=False, wcs=world,
        wcs_status="valid" if wcs else "missing", wcs_reason=None if wcs else "frame_excluded_no_wcs", hdu_index=0,
        header=fits.Header(),
    )


def mosaic(rows: int = 2, cols: int = 2, per_panel: int = 6, overlap: float = 0.25, seed: int = 0,
           dither_px: float = 6.0, rotation_drift: float = 0.0) -> tuple[list[FrameInfo], list[int]]:
    """Frames of a rows×cols mosaic (panel by panel, in time order) and each frame's panel."""
    rng = np.random.default_rng(seed)
    ra0, dec0 = 83.8, -5.4
    frames, panels = [], []
    for panel in range(rows * cols):
        r, c = divmod(panel, cols)
        east = (c - (cols - 1) / 2) * (1 - overlap) * SHAPE[1]
        north = (r - (rows - 1) / 2) * (1 - overlap) * SHAPE[0]
        for _ in range(per_panel):
            dx, dy = rng.uniform(-dither_px, dither_px, 2)
            ra, dec = _offset(ra0, dec0, east + dx, north + dy)
            frames.append(frame(len(frames), ra, dec, rotation_drift * len(frames)))
            panels.append(panel)
    return frames, panels


def _members(plan) -> list[list[int]]:
    return [group.members for group in plan.groups]


def test_panels_become_groups_with_the_automatic_threshold() -> None:
    frames, panels = mosaic(per_panel=7)
    plan = plan_groups(frames, validate_config({}))
    assert plan.threshold_auto and len(plan.groups) == 4
    for members in _members(plan):
        assert len({panels[i] for i in members}) == 1 and len(members) == 7
    # the automatic threshold sits between the dither and the panel step
    assert 10 * SCALE_DEG < plan.threshold_deg < 0.75 * SHORT_SIDE_DEG
    assert all(group.origin == "cluster" for group in plan.groups)


def test_single_pointing_is_one_group() -> None:
    frames, _ = mosaic(rows=1, cols=1, per_panel=9)
    plan = plan_groups(frames, validate_config({}))
    assert _members(plan) == [list(range(9))]


def test_explicit_threshold_merges_or_separates() -> None:
    frames, _ = mosaic(per_panel=4)
    assert len(plan_groups(frames, validate_config({"cluster_panel_threshold": 1.0})).groups) == 1
    tiny = plan_groups(frames, validate_config({"cluster_panel_threshold": 1e-6}))
    # every frame alone, then the tiny groups merge back into... nothing big enough: all stay alone
    assert len(tiny.groups) == len(frames) and not tiny.threshold_auto


def test_orientation_split_bounds_the_rotation_inside_a_group() -> None:
    frames, _ = mosaic(rows=1, cols=1, per_panel=20, rotation_drift=0.5)  # 0 … 9.5 deg over the night
    angles = [position_angle_deg(f.wcs, f.shape) for f in frames]
    assert angles[-1] == pytest.approx(9.5, abs=1e-3)
    assert len(plan_groups(frames, validate_config({})).groups) == 1
    plan = plan_groups(frames, validate_config({"cluster_orientation_split_deg": 3.0}))
    assert plan.sizes == [7, 7, 6]  # 0–3, 3.5–6.5, 7–9.5 deg
    for group in plan.groups:
        spread = max(angles[i] for i in group.members) - min(angles[i] for i in group.members)
        assert spread <= 3.0 and group.origin == "orientation_split"
        assert group.orientation_deg == pytest.approx(np.mean([angles[i] for i in group.members]), abs=1e-3)


def test_size_cap_cuts_in_time_order_into_equal_chunks() -> None:
    frames, _ = mosaic(rows=1, cols=1, per_panel=40)
    plan = plan_groups(frames, validate_config({"max_raw_per_master_tile": 16}))
    assert sorted(plan.sizes) == [13, 13, 14] and not plan.max_per_group_auto
    assert [i for members in _members(plan) for i in members] == list(range(40))  # contiguous in time
    assert all(group.origin == "size_split" for group in plan.groups)
    assert split_by_size([5, 1, 3], 0) == [[5, 1, 3]]


def test_automatic_cap_follows_the_memory_budget() -> None:
    frames, _ = mosaic(rows=1, cols=1, per_panel=3)
    per_frame = SHAPE[0] * SHAPE[1] * 3 * 5.0
    assert automatic_cap(frames, 3, int(200 * 4 * per_frame)) == 200
    assert automatic_cap(frames, 3, 1024) == MIN_AUTO_CAP  # never below what rejection needs
    plan = plan_groups(frames * 1, validate_config({}), budget_bytes=int(200 * 4 * per_frame))
    assert plan.max_per_group == 200 and plan.max_per_group_auto


def test_a_slipped_frame_joins_its_panel_and_a_lone_far_frame_stays_alone() -> None:
    frames, panels = mosaic(per_panel=6, dither_px=2.0)
    slipped_ra, slipped_dec = _offset(frames[0].wcs.wcs.crval[0], frames[0].wcs.wcs.crval[1], 0.2 * SHAPE[1], 0.0)
    far_ra, far_dec = _offset(83.8, -5.4, 20 * SHAPE[1], 0.0)
    frames = frames + [frame(100, slipped_ra, slipped_dec), frame(101, far_ra, far_dec)]
    plan = plan_groups(frames, validate_config({}))
    groups = _members(plan)
    assert plan.merged_tiny == 1
    assert any(set(range(6)) | {24} == set(g) for g in groups)  # the slipped frame is with panel 0
    assert [25] in groups  # a group of one frame: nothing near to join, never padded
    assert len(groups) == 5


def test_frames_without_wcs_are_not_grouped() -> None:
    frames, _ = mosaic(rows=1, cols=1, per_panel=5)
    frames.append(frame(50, 83.8, -5.4, wcs=False))
    plan = plan_groups(frames, validate_config({}))
    assert plan.excluded == [5] and _members(plan) == [list(range(5))]


def test_preplan_is_honoured_and_the_rest_is_grouped_automatically() -> None:
    frames, panels = mosaic(per_panel=5)
    wanted = [[str(frames[i].path) for i in (0, 5, 10)], [frames[i].path.name for i in (1, 2)]]
    reporter = Reporter()
    plan = plan_groups(frames, validate_config({"preplan_master_groups": wanted}), reporter=reporter)
    assert plan.preplan_used
    groups = _members(plan)
    assert [0, 5, 10] in groups and [1, 2] in groups
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(frames)))
    assert any(e.key == "classic_info_preplan_used" for e in reporter.log_events)
    # groups in the report's format ({"frames": [...]}) work too
    report_style = [{"frames": wanted[0]}]
    assert [0, 5, 10] in _members(plan_groups(frames, validate_config({"preplan_master_groups": report_style})))


@pytest.mark.parametrize(
    "preplan, reason",
    [
        ([["/elsewhere/unknown.fit"]], "sds_reason_preplan_unknown_frames"),
        ([["/data/night/Light_0000.fit"], ["/data/night/Light_0000.fit"]], "sds_reason_preplan_duplicate_frames"),
        ([[1, 2]], "sds_reason_preplan_malformed"),
    ],
)
def test_an_unusable_preplan_is_refused_with_a_reason(preplan, reason) -> None:
    frames, _ = mosaic(per_panel=5)
    reporter = Reporter()
    plan = plan_groups(frames, validate_config({"preplan_master_groups": preplan}), reporter=reporter)
    assert not plan.preplan_used and len(plan.groups) == 4
    warnings = [e for e in reporter.log_events if e.key == "classic_warn_preplan_unused"]
    assert len(warnings) == 1 and warnings[0].params["reason"] == reason


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 3),
    cols=st.integers(1, 3),
    per_panel=st.integers(1, 12),
    threshold=st.sampled_from([0.0, 0.001, 0.02, 0.5]),
    split=st.sampled_from([0.0, 0.2, 2.0]),
    cap=st.sampled_from([0, 1, 3, 7]),
    seed=st.integers(0, 1000),
)
def test_every_frame_lands_in_exactly_one_group(rows, cols, per_panel, threshold, split, cap, seed) -> None:
    frames, _ = mosaic(rows, cols, per_panel, seed=seed, rotation_drift=0.05)
    config = validate_config({"cluster_panel_threshold": threshold, "cluster_orientation_split_deg": split,
                              "max_raw_per_master_tile": cap})
    plan = plan_groups(frames, config)
    flat = [i for group in plan.groups for i in group.members]
    assert sorted(flat) == list(range(len(frames)))  # no frame lost, none duplicated
    if cap:
        assert max(plan.sizes) <= cap
    assert [g.members[0] for g in plan.groups] == sorted(g.members[0] for g in plan.groups)

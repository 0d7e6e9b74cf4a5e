"""Pointing groups for the classic workflow: which frames are stacked into one master tile.

Approach (header pass only: no pixel is read, a few milliseconds per frame)
---------------------------------------------------------------------------
1. **Preplan.** ``preplan_master_groups`` (lists of frame paths, or a JSON file holding them,
   in the same formats the SDS preplan accepts) are used as given. A preplan that names
   unknown files or repeats a frame is refused with ``classic_warn_preplan_unused`` and the
   automatic grouping runs; frames a valid preplan leaves out are grouped automatically.
2. **Clusters.** Frame centres become unit vectors; two frames are linked when their centres
   are closer than the threshold, and the groups are the connected components of that graph
   (single linkage, so a slow drift through a night stays one group). The threshold is
   ``cluster_panel_threshold`` (degrees) or, when 0, automatic:
   ``AUTO_NN_FACTOR`` × the median nearest-neighbour separation, kept between
   ``AUTO_MIN_FOV_FRACTION`` and ``AUTO_MAX_FOV_FRACTION`` of the frames' short field side.
   Dithers are small and panel steps large, so the median neighbour distance is a dither and
   a panel step is always beyond the upper bound (frames 0.3 of a field apart or closer
   overlap by 70 % or more, which is one pointing by any standard).
3. **Tiny groups.** A group with fewer than :data:`MIN_FRAMES_PER_GROUP` frames cannot reject
   anything; it is merged into the group of its nearest frame when that frame lies within
   :data:`MERGE_FOV_FRACTION` of a field (a pointing that slipped). A lone frame far from
   every other group stays a group of one: frames are never duplicated to pad a group.
4. **Orientation split** (alt-az field rotation). With ``cluster_orientation_split_deg`` > 0,
   each group's frames are sorted by position angle (unwrapped around the group's first
   frame) and cut so that no subgroup spans more than the limit.
5. **Size cap.** ``max_raw_per_master_tile`` (0 = automatic: the frames whose resampled pixels
   fit in a quarter of the memory budget, which keeps the tile stacker in RAM, but never
   fewer than :data:`MIN_AUTO_CAP` so rejection keeps enough samples). A larger group is cut
   in time order into chunks of equal size (±1), never leaving a tiny remainder.

Every frame with a WCS lands in exactly one group; groups are ordered by their first frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .preplan import load_preplan, preplan_groups, resolved_path

#: Automatic threshold: this many median nearest-neighbour separations ...
AUTO_NN_FACTOR = 4.0
#: ... but at least this fraction of the frames' short field side ...
AUTO_MIN_FOV_FRACTION = 0.05
#: ... and at most this fraction.
AUTO_MAX_FOV_FRACTION = 0.3
#: Groups with fewer frames are merged into a nearby group when there is one.
MIN_FRAMES_PER_GROUP = 3
#: How near (fraction of the short field side) a tiny group's nearest frame must be to merge.
MERGE_FOV_FRACTION = 0.5
#: Automatic size cap floor: kappa-sigma needs about a dozen samples to reject a lone outlier.
MIN_AUTO_CAP = 16
#: Bytes per resampled frame pixel and channel in the tile stacker (float32 plus margins).
BYTES_PER_PIXEL_CHANNEL = 4 * 1.25


@dataclass
class PointingGroup:
    """One master tile's frames (indices into the run's frame list) and how it came to be."""

    members: list[int]
    origin: str  # "cluster", "preplan", "merged", "orientation_split", "size_split"
    centre_deg: tuple[float, float] = (0.0, 0.0)  # (RA, Dec) of the mean centre vector
    orientation_deg: float = 0.0  # position angle of the frames' +y axis (circular mean)

    def to_report(self, frames: Sequence[Any]) -> dict[str, Any]:
        return {
            "members": [str(frames[i].path) for i in self.members],
            "size": len(self.members),
            "origin": self.origin,
            "centre_deg": [round(self.centre_deg[0], 7), round(self.centre_deg[1], 7)],
            "orientation_deg": round(self.orientation_deg, 3),
        }


@dataclass
class GroupPlan:
    """The grouping decided for a run, with the parameters actually used."""

    groups: list[PointingGroup]
    threshold_deg: float
    threshold_auto: bool
    orientation_split_deg: float
    max_per_group: int
    max_per_group_auto: bool
    preplan_used: bool = False
    merged_tiny: int = 0
    excluded: list[int] = field(default_factory=list)  # frames without a WCS (never grouped)

    @property
    def sizes(self) -> list[int]:
        return [len(group.members) for group in self.groups]

    def to_report(self, frames: Sequence[Any]) -> dict[str, Any]:
        return {
            "threshold_deg": round(self.threshold_deg, 7),
            "threshold_auto": self.threshold_auto,
            "orientation_split_deg": self.orientation_split_deg,
            "max_per_group": self.max_per_group,
            "max_per_group_auto": self.max_per_group_auto,
            "preplan_used": self.preplan_used,
            "merged_tiny_groups": self.merged_tiny,
            "sizes": self.sizes,
        }


# ------------------------------------------------------------------------------ geometry


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _chord(angle_deg: float) -> float:
    """Chord length on the unit sphere of an angular separation."""
    return 2.0 * math.sin(math.radians(min(angle_deg, 180.0)) / 2.0)


def _angle(chord: np.ndarray) -> np.ndarray:
    return np.degrees(2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)))


def frame_centres(frames: Sequence[Any]) -> np.ndarray:
    """(N, 2) RA, Dec (deg) of each frame's pixel centre (SIP honoured); NaN without a WCS."""
    out = np.full((len(frames), 2), np.nan)
    for index, info in enumerate(frames):
        if info.wcs is None:
            continue
        height, width = info.shape
        ra, dec = info.wcs.all_pix2world([(width - 1) / 2.0], [(height - 1) / 2.0], 0)
        out[index] = (float(ra[0]) % 360.0, float(dec[0]))
    return out


def position_angle_deg(wcs: Any, shape: tuple[int, int]) -> float:
    """Position angle (deg, east of north) of the frame's +y axis at its centre."""
    height, width = shape
    x, y = (width - 1) / 2.0, (height - 1) / 2.0
    ra, dec = wcs.all_pix2world([x, x], [y, y + 10.0], 0)
    d_ra = ((ra[1] - ra[0] + 180.0) % 360.0 - 180.0) * math.cos(math.radians(dec[0]))
    return math.degrees(math.atan2(d_ra, dec[1] - dec[0]))


def field_short_side_deg(frames: Sequence[Any]) -> float:
    """Median short side of the frames' fields, in degrees."""
    from .canvas import pixel_scale_arcsec

    sides = [min(info.shape) * pixel_scale_arcsec(info.wcs) / 3600.0 for info in frames if info.wcs is not None]
    return float(np.median(sides)) if sides else 0.0


def _mean_centre(vectors: np.ndarray) -> tuple[float, float]:
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-12:
        return 0.0, 0.0
    mean /= norm
    return float(np.degrees(np.arctan2(mean[1], mean[0])) % 360.0), float(np.degrees(np.arcsin(np.clip(mean[2], -1, 1))))


def _circular_mean_deg(angles: np.ndarray) -> float:
    radians = np.radians(angles)
    return float(np.degrees(np.arctan2(np.sin(radians).mean(), np.cos(radians).mean())))


# ------------------------------------------------------------------------------ clusters


def automatic_threshold_deg(vectors: np.ndarray, short_side_deg: float) -> float:
    """The automatic ``cluster_panel_threshold`` (see the module docstring)."""
    from scipy.spatial import cKDTree

    low, high = AUTO_MIN_FOV_FRACTION * short_side_deg, AUTO_MAX_FOV_FRACTION * short_side_deg
    if len(vectors) < 2:
        return high
    distance, _ = cKDTree(vectors).query(vectors, k=2)
    nearest = _angle(distance[:, 1])
    return float(np.clip(AUTO_NN_FACTOR * np.median(nearest), low, high))


def cluster_by_separation(vectors: np.ndarray, threshold_deg: float) -> list[list[int]]:
    """Connected components of the "centres closer than ``threshold_deg``" graph, as sorted lists."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(vectors)
    if n == 0:
        return []
    pairs = cKDTree(vectors).query_pairs(_chord(threshold_deg), output_type="ndarray") if n > 1 else np.zeros((0, 2), int)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else coo_matrix((n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    return sorted(groups.values(), key=lambda members: members[0])


def merge_tiny_groups(
    groups: list[list[int]], vectors: np.ndarray, radius_deg: float, min_size: int = MIN_FRAMES_PER_GROUP
) -> tuple[list[list[int]], int]:
    """Tiny groups merged into the group of their nearest frame within ``radius_deg``.

    Only groups of at least ``min_size`` frames receive; a tiny group with no such group near
    stays as it is. Returns the groups (sorted by first frame) and the number merged.
    """
    big = [g for g in groups if len(g) >= min_size]
    tiny = [g for g in groups if len(g) < min_size]
    if not big or not tiny:
        return groups, 0
    from scipy.spatial import cKDTree

    owner = np.full(len(vectors), -1)
    for number, members in enumerate(big):
        owner[members] = number
    receivers = np.flatnonzero(owner >= 0)
    tree = cKDTree(vectors[receivers])
    merged_big = [list(g) for g in big]
    kept_tiny: list[list[int]] = []
    merged = 0
    for members in tiny:
        distance, position = tree.query(vectors[members], k=1)
        best = int(np.argmin(distance))
        if _angle(np.array([distance[best]]))[0] <= radius_deg:
            merged_big[owner[receivers[position[best]]]].extend(members)
            merged += 1
        else:
            kept_tiny.append(list(members))
    result = [sorted(g) for g in merged_big] + kept_tiny
    return sorted(result, key=lambda members: members[0]), merged


def split_by_orientation(members: Sequence[int], angles_deg: np.ndarray, limit_deg: float) -> list[list[int]]:
    """Cut a group so that no part spans more than ``limit_deg`` of position angle."""
    if limit_deg <= 0 or len(members) < 2:
        return [list(members)]
    reference = angles_deg[members[0]]
    unwrapped = {i: (angles_deg[i] - reference + 180.0) % 360.0 - 180.0 for i in members}
    ordered = sorted(members, key=lambda i: (unwrapped[i], i))
    parts: list[list[int]] = [[ordered[0]]]
    start = unwrapped[ordered[0]]
    for index in ordered[1:]:
        if unwrapped[index] - start > limit_deg:
            parts.append([])
            start = unwrapped[index]
        parts[-1].append(index)
    return [sorted(part) for part in parts]


def split_by_size(members: Sequence[int], cap: int, order_key: Sequence[Any] | None = None) -> list[list[int]]:
    """Chunks of at most ``cap`` frames, equal sizes (±1), contiguous in time order."""
    if cap <= 0 or len(members) <= cap:
        return [list(members)]
    ordered = sorted(members, key=(lambda i: (order_key[i], i)) if order_key is not None else None)
    n_parts = -(-len(ordered) // cap)
    bounds = np.linspace(0, len(ordered), n_parts + 1).round().astype(int)
    return [sorted(ordered[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def automatic_cap(frames: Sequence[Any], n_channels: int, budget_bytes: int) -> int:
    """Frames per master tile whose resampled pixels fit in a quarter of the budget (≥ MIN_AUTO_CAP)."""
    if not frames:
        return MIN_AUTO_CAP
    pixels = float(np.median([info.shape[0] * info.shape[1] for info in frames]))
    per_frame = pixels * n_channels * BYTES_PER_PIXEL_CHANNEL
    return max(MIN_AUTO_CAP, int(budget_bytes // 4 // max(per_frame, 1.0)))


# ------------------------------------------------------------------------------ preplan


def resolve_preplan(
    value: Any, frames: Sequence[Any], reporter: Any = None
) -> list[list[int]] | None:
    """Preplanned groups as frame indices; ``None`` when absent or refused (refusals are logged)."""
    if value is None or (isinstance(value, (list, tuple, str)) and len(value) == 0):
        return None

    def refuse(reason: str, detail: str) -> None:
        if reporter is not None:
            reporter.warning("classic_warn_preplan_unused", reason=reason, detail=detail)

    try:
        groups = preplan_groups(load_preplan(value))
    except (OSError, ValueError) as exc:
        refuse("sds_reason_preplan_unreadable", f"{type(exc).__name__}: {exc}")
        return None
    if groups is None:
        refuse("sds_reason_preplan_malformed", "expected lists of frame paths")
        return None
    by_path = {resolved_path(info.path): i for i, info in enumerate(frames)}
    names: dict[str, int] = {}
    for index, info in enumerate(frames):
        name = Path(str(info.path)).name
        names[name] = -1 if name in names else index  # -1: ambiguous name
    result: list[list[int]] = []
    seen: set[int] = set()
    for group in groups:
        members: list[int] = []
        for item in group:
            index = by_path.get(resolved_path(item), names.get(Path(item).name, -1))
            if index is None or index < 0:
                refuse("sds_reason_preplan_unknown_frames", str(item))
                return None
            if index in seen:
                refuse("sds_reason_preplan_duplicate_frames", str(item))
                return None
            seen.add(index)
            members.append(index)
        if members:
            result.append(sorted(members))
    return result


# ------------------------------------------------------------------------------ the plan


def _time_keys(frames: Sequence[Any]) -> list[Any]:
    """Sort keys in acquisition order: DATE-OBS when every frame has one, else input order."""
    dates = [getattr(info, "date_obs", None) for info in frames]
    if all(isinstance(d, str) and d for d in dates):
        return dates
    return list(range(len(frames)))


def plan_groups(
    frames: Sequence[Any],
    config: Mapping[str, Any],
    *,
    n_channels: int = 3,
    budget_bytes: int = 2**30,
    reporter: Any = None,
) -> GroupPlan:
    """The pointing groups of ``frames`` (see the module docstring). No pixel is read."""
    valid = [i for i, info in enumerate(frames) if info.wcs is not None]
    excluded = [i for i, info in enumerate(frames) if info.wcs is None]
    centres = frame_centres(frames)
    vectors = _unit_vectors(centres[:, 0], centres[:, 1])
    angles = np.array([position_angle_deg(info.wcs, info.shape) if info.wcs is not None else 0.0 for info in frames])
    short_side = field_short_side_deg([frames[i] for i in valid])
    order_key = _time_keys(frames)

    requested = float(config.get("cluster_panel_threshold") or 0.0)
    threshold_auto = requested <= 0
    threshold = automatic_threshold_deg(vectors[valid], short_side) if threshold_auto else requested
    orientation_limit = float(config.get("cluster_orientation_split_deg") or 0.0)
    cap_requested = int(config.get("max_raw_per_master_tile") or 0)
    cap = cap_requested if cap_requested > 0 else automatic_cap([frames[i] for i in valid], n_channels, budget_bytes)

    groups: list[PointingGroup] = []
    preplan = resolve_preplan(config.get("preplan_master_groups"), frames, reporter)
    preplanned: set[int] = set()
    if preplan is not None:
        preplan = [[i for i in g if i in set(valid)] for g in preplan]
        preplan = [g for g in preplan if g]
        for members in preplan:
            groups.append(PointingGroup(members, "preplan"))
            preplanned.update(members)
        if reporter is not None:
            reporter.info("classic_info_preplan_used", groups=len(preplan), frames=len(preplanned),
                          remaining=len(valid) - len(preplanned))

    remaining = [i for i in valid if i not in preplanned]
    merged = 0
    if remaining:
        local = cluster_by_separation(vectors[remaining], threshold)
        clusters = [[remaining[j] for j in members] for members in local]
        clusters, merged = _merge_in_global_indices(clusters, vectors, MERGE_FOV_FRACTION * short_side)
        for members in clusters:
            origin = "cluster"
            parts = split_by_orientation(members, angles, orientation_limit)
            if len(parts) > 1:
                origin = "orientation_split"
            for part in parts:
                chunks = split_by_size(part, cap, order_key)
                for chunk in chunks:
                    groups.append(PointingGroup(chunk, "size_split" if len(chunks) > 1 else origin))

    groups.sort(key=lambda group: group.members[0])
    for group in groups:
        group.centre_deg = _mean_centre(vectors[group.members])
        reference = angles[group.members[0]]
        offsets = (angles[group.members] - reference + 180.0) % 360.0 - 180.0
        group.orientation_deg = float((reference + _circular_mean_deg(offsets) + 180.0) % 360.0 - 180.0)
    _check_partition(groups, valid)
    return GroupPlan(
        groups=groups,
        threshold_deg=float(threshold),
        threshold_auto=threshold_auto,
        orientation_split_deg=orientation_limit,
        max_per_group=int(cap),
        max_per_group_auto=cap_requested <= 0,
        preplan_used=preplan is not None,
        merged_tiny=merged,
        excluded=excluded,
    )


def _merge_in_global_indices(
    clusters: list[list[int]], vectors: np.ndarray, radius_deg: float
) -> tuple[list[list[int]], int]:
    members = sorted(i for cluster in clusters for i in cluster)
    position = {index: slot for slot, index in enumerate(members)}
    local = [[position[i] for i in cluster] for cluster in clusters]
    merged_local, merged = merge_tiny_groups(local, vectors[members], radius_deg)
    return [[members[j] for j in cluster] for cluster in merged_local], merged


def _check_partition(groups: Sequence[PointingGroup], valid: Sequence[int]) -> None:
    """Every valid frame in exactly one group (the no-duplication rule, checked, not assumed)."""
    flat = [i for group in groups for i in group.members]
    if len(flat) != len(set(flat)) or set(flat) != set(valid):
        raise AssertionError("pointing groups must partition the frames")  # pragma: no cover

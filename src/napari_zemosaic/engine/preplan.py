"""Explicit groups of frames (``preplan_master_groups``), shared by classic groups and SDS batches.

A preplan comes from the config, ``--set``, the napari SDS preview or a JSON file, in any of
these shapes: ``[[path, ...], ...]``, ``[{"frames": [path, ...]}, ...]`` (a run report's batches,
``"members"`` for classic groups), or either under a ``"preplan_master_groups"``, ``"groups"`` or
``"batches"`` key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


def load_preplan(value: Any) -> Any:
    """The preplan itself: a non-empty string or path names a JSON file to read."""
    if isinstance(value, (str, Path)) and str(value).strip():
        return json.loads(Path(value).expanduser().read_text(encoding="utf-8"))
    return value


def preplan_groups(value: Any) -> list[list[str]] | None:
    """Lists of frame paths, or None when ``value`` has none of the accepted shapes."""
    if isinstance(value, Mapping):
        for key in ("preplan_master_groups", "groups", "batches"):
            if key in value:
                return preplan_groups(value[key])
        return None
    if not isinstance(value, (list, tuple)):
        return None
    groups: list[list[str]] = []
    for group in value:
        if isinstance(group, Mapping):
            group = group.get("frames", group.get("members"))
        if not isinstance(group, (list, tuple)) or not group:
            return None
        if not all(isinstance(item, (str, Path)) for item in group):
            return None
        groups.append([str(item) for item in group])
    return groups


def resolved_path(path: Any) -> str:
    """The absolute, symlink-free form of ``path`` (as written when it cannot be resolved)."""
    try:
        return str(Path(str(path)).expanduser().resolve())
    except OSError:
        return str(path)

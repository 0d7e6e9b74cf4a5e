"""``zemosaic plan`` and ``zemosaic info``: what a run would do, without stacking."""

from __future__ import annotations

import dataclasses
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import validate_config
from ..events import Reporter
from .canvas import build_canvas, footprint_polygon
from .context import UserError
from .pipeline import choose_workflow, drain, ingest, judge_frames


def make_plan(input_dir: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scan, WCS status, workflow choice, canvas and per-frame footprints, as a JSON-able dict."""
    config = validate_config(config or {})
    reporter = Reporter()
    try:
        ingested = drain(ingest(Path(input_dir).resolve(), None, config, reporter))
    except UserError:
        raise
    metrics, decisions = drain(judge_frames(ingested.usable, config, reporter)) if ingested.usable else ([], [])
    accepted = [
        info for info, decision in zip(ingested.usable, decisions) if decision.accepted or not config["quality_rejection"]
    ]
    workflow, fallbacks = choose_workflow(config["workflow"], config, ingested) if accepted else (None, [])
    canvas = None
    if accepted:
        canvas = build_canvas(
            [f.wcs for f in accepted],
            [f.shape for f in accepted],
            pixel_scale_arcsec=float(config["canvas_pixel_scale_arcsec"]),
            padding_pct=float(config["canvas_padding_pct"]),
        )
    sds_section = None
    if canvas is not None and workflow == "sds" and accepted:
        from .sds import SdsError, plan_sds

        try:
            sds_section = plan_sds(accepted, canvas, config, reporter).to_report(accepted)
        except SdsError as exc:
            sds_section = {"error": {"key": exc.key, "params": exc.params}}
    table = []
    for index, info in enumerate(ingested.usable):
        row = info.to_dict()
        if metrics:
            row["metrics"] = metrics[index].to_dict()
            row["quality"] = decisions[index].to_dict()
        row["footprint"] = footprint_polygon(info.wcs, info.shape, canvas.wcs).round(2).tolist() if canvas else None
        table.append(row)
    return {
        "input_dir": str(input_dir),
        "workflow": workflow,
        "fallbacks": fallbacks,
        "frames": {
            "found": len(ingested.found),
            "used": len(accepted),
            "excluded": [e.to_dict() for e in ingested.excluded],
            "warnings": ingested.warnings,
        },
        "frame_table": table,
        "canvas": canvas.to_dict() if canvas else None,
        "sds": sds_section,
        "messages": [{"level": e.level, "key": e.key, "params": e.params} for e in reporter.log_events],
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def system_info() -> dict[str, Any]:
    """Versions, GPU summary and what is installed, for ``zemosaic info``."""
    packages = {name: _version(name) for name in ("numpy", "astropy", "reproject", "scipy", "sep", "napari", "dask", "cupy")}
    gpu: dict[str, Any] = {"available": False, "summary": "", "detail": None}
    try:
        from .gpu import gpu_is_available, gpu_memory_info

        ok, reason = gpu_is_available()
        gpu["available"] = ok
        gpu["detail"] = gpu_memory_info() if ok else None
        gpu["summary"] = (gpu["detail"] or {}).get("name", "GPU") if ok else reason
    except ImportError as exc:  # the GPU module itself failed to import: report, don't crash
        gpu["summary"] = str(exc)
    from ..config import validate_config as _validated
    from .astrometry import find_solvers

    solvers = [dataclasses.asdict(solver) for solver in find_solvers(_validated({}))]
    return {
        "version": __version__,
        "python": platform.python_version(),
        "solvers": solvers,
        "platform": platform.platform(),
        "packages": packages,
        "gpu": gpu,
    }

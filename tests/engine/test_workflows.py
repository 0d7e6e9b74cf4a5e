"""Workflow choice (design.md §2): auto picks classic for non-Seestar data, Mosaic-First for Seestar."""

from __future__ import annotations

import shutil
from pathlib import Path

from astropy.io import fits

from napari_zemosaic.engine.pipeline import run


def _as_other_camera(source: Path, target: Path) -> None:
    target.mkdir()
    for path in sorted(source.glob("*.fit")):
        with fits.open(path) as hdul:
            header = hdul[0].header.copy()
            for key in ("CREATOR", "INSTRUME", "TELESCOP"):
                header[key] = "Generic CMOS"
            fits.writeto(target / path.name, hdul[0].data, header)


def test_auto_runs_classic_on_non_seestar_data_and_mosaic_first_on_seestar(tmp_path: Path, demo_night) -> None:
    root, truth = demo_night
    other = tmp_path / "other"
    _as_other_camera(root / "frames", other)
    classic = run(other, tmp_path / "out_other", {"max_memory_mb": 512, "quality_rejection": False})
    assert classic.report["workflow_requested"] == "auto" and classic.report["workflow_used"] == "classic"
    assert classic.report["classic"]["groups"] and classic.report["fallbacks"] == []
    # tile quality gate: every master tile scored; a poor one is down-weighted, never dropped
    for tile in classic.report["classic"]["tiles"]:
        assert 0.0 <= tile["quality"]["score"] <= 1.0 and 0.1 <= tile["quality_weight"] <= 1.0
    seestar_dir = tmp_path / "seestar"
    shutil.copytree(root / "frames", seestar_dir)
    seestar = run(seestar_dir, tmp_path / "out_seestar", {"max_memory_mb": 512, "quality_rejection": False})
    assert seestar.report["workflow_used"] == "mosaic_first" and seestar.report.get("classic") is None
    # both mosaics cover the same sky
    assert abs(classic.data.shape[1] - seestar.data.shape[1]) < 40


def test_explicit_sds_on_non_seestar_data_runs_the_normal_workflow(tmp_path: Path, demo_night) -> None:
    root, _ = demo_night
    other = tmp_path / "other"
    _as_other_camera(root / "frames", other)
    result = run(other, tmp_path / "out", {"workflow": "sds", "sds_mode": True, "max_memory_mb": 512})
    assert result.report["workflow_used"] == "classic" and result.report["sds"] is None

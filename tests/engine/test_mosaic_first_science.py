"""Mosaic-First on the demo night, checked against the truth the generator knows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from starphot import aperture_flux, centroid, local_background


def _bright_isolated_stars(result, truth, min_snr_flux: float = 3000.0):
    """Truth stars that are bright, unsaturated-looking, isolated and well inside the covered mosaic."""
    wcs = result.canvas.wcs
    height, width = result.canvas.shape
    x, y = wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    green = truth.star_flux[:, 1]
    inside = (x > 15) & (x < width - 16) & (y > 15) & (y < height - 16)
    keep = []
    for i in np.flatnonzero(inside & (green > min_snr_flux)):
        distance = np.hypot(x - x[i], y - y[i])
        distance[i] = np.inf
        neighbour_flux = green[distance < 12]
        if neighbour_flux.size and neighbour_flux.max() > 0.01 * green[i]:
            continue
        iy, ix = int(round(y[i])), int(round(x[i]))
        if result.alpha[iy - 10 : iy + 11, ix - 10 : ix + 11].min() == 0:
            continue
        if truth.star_flux[i].max() > 400_000:  # keep clear of saturation in any channel
            continue
        keep.append(i)
    keep = np.array(keep)
    return keep, x[keep], y[keep]


def _luminance(data: np.ndarray) -> np.ndarray:
    return data.sum(axis=0) if data.shape[0] > 1 else data[0]


def test_outputs_exist_and_follow_the_interface(demo_mosaic) -> None:
    result, truth = demo_mosaic
    assert result.status == "ok"
    with fits.open(result.science_path) as hdul:
        assert hdul[0].header["BITPIX"] == -32 and hdul[0].data.ndim == 3 and hdul[0].data.shape[0] == 3
        assert hdul["ALPHA"].header["BITPIX"] == 8
        assert hdul["COVERAGE"].header["BITPIX"] == -32
        wcs = WCS(hdul[0].header).celestial
        assert wcs.has_celestial and hdul[0].header["NCOMBINE"] == len(result.frames)
    report = json.loads(result.report_path.read_text())
    for key in ("status", "workflow_requested", "workflow_used", "fallbacks", "config", "frames", "sds", "canvas",
                "compute", "timings_s", "peak_rss_mb", "outputs"):
        assert key in report
    assert report["workflow_used"] == "mosaic_first"
    # the cloudy frame is set aside by the quality rules, with its reason; every other frame is used
    excluded = {e["path"].split("/")[-1]: e["reason_key"] for e in report["frames"]["excluded"]}
    assert excluded == {truth.frames[truth.cloudy_frame].file_name: "frame_excluded_quality_transparency"}
    assert report["frames"]["used"] == len(truth.frames) - 1
    assert set(report["timings_s"]) >= {"P1", "P2", "P3", "P4", "P5", "P6"}
    assert result.preview_path.stat().st_size > 1000
    log = result.log_path.read_text()
    assert "run_info_done" in log
    assert not (result.output_dir / ".zemosaic_cache").exists()


def test_star_positions_match_truth(demo_mosaic) -> None:
    result, truth = demo_mosaic
    ids, x, y = _bright_isolated_stars(result, truth)
    assert len(ids) >= 15
    image = _luminance(result.data)
    measured = np.array([centroid(image, xi, yi) for xi, yi in zip(x, y)])
    error = np.hypot(measured[:, 0] - x, measured[:, 1] - y)
    rms = float(np.sqrt(np.mean(error**2)))
    assert rms <= 0.15, f"centroid RMS {rms:.3f} px over {len(ids)} stars"


def _fluxes(result, truth, ids, x, y):
    fwhm = float(np.median([f.fwhm_px for f in truth.frames]))
    radius = 3.0 * fwhm
    measured = np.array(
        [[aperture_flux(result.data[c], xi, yi, radius, radius + 3, radius + 9) for c in range(3)] for xi, yi in zip(x, y)]
    )
    return measured / truth.star_flux[ids]


def test_star_fluxes_and_colours_match_truth(demo_mosaic) -> None:
    result, truth = demo_mosaic
    ids, x, y = _bright_isolated_stars(result, truth)
    ratio = _fluxes(result, truth, ids, x, y)  # (n, 3) measured / truth
    green = ratio[:, 1]
    scatter = float(np.std(green) / np.mean(green))
    assert scatter <= 0.02, f"flux ratio scatter {scatter:.4f}"
    r_over_g = ratio[:, 0] / ratio[:, 1]
    b_over_g = ratio[:, 2] / ratio[:, 1]
    assert abs(np.median(r_over_g) - 1) <= 0.03 and abs(np.median(b_over_g) - 1) <= 0.03


def _panel_of_star(result, truth, x, y):
    """Index of the panel whose (true) field centre is nearest each star, on the sky."""
    centres = {}
    for frame in truth.frames:
        centres.setdefault(frame.panel, []).append((frame.centre_ra, frame.centre_dec))
    panel_ids = sorted(centres)
    ra, dec = result.canvas.wcs.all_pix2world(x, y, 0)
    best = np.zeros(len(x), int)
    best_distance = np.full(len(x), np.inf)
    for panel in panel_ids:
        cra, cdec = np.mean(centres[panel], axis=0)
        distance = np.hypot((ra - cra) * np.cos(np.radians(cdec)), dec - cdec)
        closer = distance < best_distance
        best[closer], best_distance[closer] = panel, distance[closer]
    return best


@pytest.mark.parametrize("method", ["linear_fit"])
def test_haze_and_clouds_brought_to_one_flux_scale(demo_mosaic, method) -> None:
    result, truth = demo_mosaic
    transparencies = {f.panel: [] for f in truth.frames}
    for frame in truth.frames:
        transparencies[frame.panel].append(frame.transparency)
    # The demo really has haze that differs between panels (otherwise this test proves nothing).
    medians = [np.median(v) for v in transparencies.values()]
    assert max(medians) / min(medians) > 1.08
    ids, x, y = _bright_isolated_stars(result, truth)
    ratios = _fluxes(result, truth, ids, x, y)
    panel = _panel_of_star(result, truth, x, y)
    for channel, name in enumerate("RGB"):
        ratio = ratios[:, channel]
        per_panel = [np.median(ratio[panel == p]) for p in np.unique(panel) if (panel == p).sum() >= 3]
        assert len(per_panel) >= 3
        spread = max(per_panel) / min(per_panel) - 1
        assert spread <= 0.03, f"{name}: panel flux spread {spread:.4f}"


def test_report_records_normalisation_of_the_cloudy_frame(demo_night, tmp_path) -> None:
    """With quality rejection off, the cloudy frame is kept and brought to the common scale."""
    from napari_zemosaic.engine.pipeline import run

    root, truth = demo_night
    result = run(root / "frames", tmp_path, {"max_memory_mb": 512, "quality_rejection": False})
    gains = {entry["path"].split("/")[-1]: np.mean(entry["gain"]) for entry in result.report["frames"]["normalisation"]}
    cloudy = truth.frames[truth.cloudy_frame].file_name
    clear = [f.file_name for f in truth.frames if not f.is_cloudy and f.panel == truth.frames[truth.cloudy_frame].panel]
    # the fitted gain follows the true transparency ratio of the cloudy frame to its panel mates
    expected = truth.frames[truth.cloudy_frame].transparency / np.median(
        [f.transparency for f in truth.frames if f.file_name in clear]
    )
    measured = gains[cloudy] / np.median([gains[name] for name in clear])
    assert measured == pytest.approx(expected, rel=0.05)

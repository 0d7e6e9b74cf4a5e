"""Frame quality on a demo night with known truth: metrics, rules, weights, tile gate, mosaic effect.

The night: two pointings of five 270x480 GRBG subs, a dense star field, and every bad frame the
demo knows — one cloudy frame (transparency 0.4, brighter sky), one frame crossed by a satellite
trail, one heavily blurred frame (seeing x 2) and one whose stars are smeared into 6 px trails.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from napari_zemosaic.config import OPTIONS
from napari_zemosaic.engine import demo, detect
from napari_zemosaic.engine import quality as q
from napari_zemosaic.engine.demo import DemoSpec, DemoSpecError, generate_demo, truth_star_pixels
from napari_zemosaic.engine.frames import load_frame, read_frame_info
from napari_zemosaic.events import LogEvent, ProgressEvent, Reporter
from napari_zemosaic.i18n import tr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from starphot import aperture_flux, robust_noise_map  # noqa: E402

NIGHT = DemoSpec(
    panels=(1, 2), frames_per_panel=5, scale=0.25, seed=11, star_density=3.0, blurred_frame=2, elongated_frame=8
)
PIPELINE_WIRED = "quality_rejection" in OPTIONS


def _drain(generator):
    events = []
    while True:
        try:
            events.append(next(generator))
        except StopIteration as stop:
            return stop.value, events


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    truth = generate_demo(tmp_path_factory.mktemp("quality_night"), NIGHT)
    special = {truth.cloudy_frame, truth.trail_frame, truth.blurred_frame, truth.elongated_frame}
    assert len(special) == 4, "the test night needs four distinct bad frames"
    infos = [read_frame_info(path) for path in truth.frame_paths]
    metrics, events = _drain(q.measure_frames(infos, {"num_workers": 2}, Reporter()))
    return truth, infos, metrics, events


def _good_frames(truth) -> list[int]:
    bad = {truth.cloudy_frame, truth.blurred_frame, truth.elongated_frame}
    return [i for i in range(len(truth.frames)) if i not in bad]


# ----------------------------------------------------------------------------- metrics vs truth


def test_fwhm_within_10_percent_of_truth_per_frame(night):
    truth, _, metrics, _ = night
    for index, (frame, measured) in enumerate(zip(truth.frames, metrics)):
        if index == truth.elongated_frame:
            continue  # its truth FWHM is the core of a smeared profile (checked below)
        assert measured.fwhm_px == pytest.approx(frame.fwhm_px, rel=0.10), index
        assert measured.n_measured >= 20
        assert measured.fwhm_arcsec == pytest.approx(measured.fwhm_px * truth.pixel_scale_arcsec, rel=1e-3)
    blurred = truth.blurred_frame
    assert truth.frames[blurred].fwhm_px == pytest.approx(demo.BLURRED_FWHM_FACTOR * truth.frames[blurred - 1].fwhm_px, rel=0.15)


def test_elongation_of_the_smeared_frame_matches_its_second_moments(night):
    truth, _, metrics, _ = night
    frame = truth.frames[truth.elongated_frame]
    sigma2 = (frame.fwhm_px / q.FWHM_PER_SIGMA) ** 2
    steps = np.linspace(-0.5, 0.5, demo.SMEAR_STEPS) * frame.smear_px
    expected = math.sqrt((sigma2 + np.var(steps)) / sigma2)  # major / minor of the smeared PSF
    assert metrics[truth.elongated_frame].elongation == pytest.approx(expected, rel=0.15)
    for index in _good_frames(truth):
        assert metrics[index].elongation < 1.1  # round stars measure round
        assert metrics[index].roundness == pytest.approx(1.0 / metrics[index].elongation)


def test_star_counts_follow_truth(night):
    """Counts follow a detection model from the truth, and what is counted is stars.

    Model: a catalog star is detectable when the peak of its (sep-smoothed, 2x2-binned)
    image reaches 8 x the binned sky noise, both computed from the truth (flux x transparency,
    seeing, sky level, gain and read noise). Hot pixels sit in every frame and must not count.
    """
    from scipy.spatial import cKDTree

    truth, _, metrics, _ = night
    luminance = (truth.star_flux[:, 0] + 2 * truth.star_flux[:, 1] + truth.star_flux[:, 2]) / 4.0
    gain, read = truth.gain_e_per_adu, truth.read_noise_e
    predicted = []
    for index, frame in enumerate(truth.frames):
        x, y = demo._world_to_pixels(truth.wcs_for(index), truth.star_ra, truth.star_dec)
        inside = (x >= 2) & (x < truth.width - 2) & (y >= 2) & (y < truth.height - 2)
        red, green, blue = frame.sky_adu
        binned_noise = math.sqrt(sum((sky * gain + read**2) / gain**2 for sky in (red, green, green, blue)))
        variance = (frame.fwhm_px / q.FWHM_PER_SIGMA / 2.0) ** 2 + 1.0 / 12.0 + 0.5  # px², binned + kernel
        peak = frame.transparency * luminance[inside] / (2.0 * math.pi * variance) / binned_noise
        predicted.append(int(np.count_nonzero(peak >= 8.0)))
        # Purity: the stars kept for matching are catalog stars, not hot pixels.
        distance, _ = cKDTree(np.column_stack([x[inside], y[inside]])).query(
            np.column_stack([metrics[index].stars.x, metrics[index].stars.y])
        )
        assert np.mean(distance < 2.0) >= 0.95, index
    counts = np.array([m.n_stars for m in metrics], dtype=float)
    predicted = np.array(predicted, dtype=float)
    assert np.corrcoef(counts, predicted)[0, 1] >= 0.9
    assert 0.8 <= float(np.median(counts / predicted)) <= 1.2
    assert counts[truth.cloudy_frame] < np.median(counts[[i for i in range(5) if i != truth.cloudy_frame]])


def test_background_noise_and_transparency_match_truth(night):
    truth, _, metrics, _ = night
    gain, read = truth.gain_e_per_adu, truth.read_noise_e
    for index, (frame, measured) in enumerate(zip(truth.frames, metrics)):
        red, green, blue = frame.sky_adu
        sky = (red + 2 * green + blue) / 4.0 + truth.bias_adu
        noise = 0.5 * math.sqrt(sum((s * gain + read**2) / gain**2 for s in (red, green, green, blue)))
        assert measured.background == pytest.approx(sky, rel=0.06), index  # + a little nebula
        assert measured.noise == pytest.approx(noise, rel=0.10), index
    for group in {m.group for m in metrics}:
        members = [i for i, m in enumerate(metrics) if m.group == group]
        assert {truth.frames[i].panel for i in members} == {truth.frames[members[0]].panel}  # one pointing each
        typical = float(np.median([truth.frames[i].transparency for i in members]))
        for i in members:
            assert metrics[i].transparency_method == "matched"
            assert metrics[i].transparency == pytest.approx(truth.frames[i].transparency / typical, abs=0.03), i
    assert metrics[truth.cloudy_frame].transparency == pytest.approx(demo.CLOUDY_TRANSPARENCY, abs=0.04)


def _matched_ratios_one_query_a_frame(members, metrics, frames):
    """The matching as it reads: one cKDTree query per frame at that frame's radius."""
    from scipy.spatial import cKDTree

    geometry = q._FrameGeometry(frames)
    reference = max(members, key=lambda i: (metrics[i].stars.flux.size, -i))
    tree = cKDTree(geometry.vectors(reference, metrics[reference].stars))
    ratios = {}
    for i in members:
        fwhm = metrics[i].fwhm_px if math.isfinite(metrics[i].fwhm_px) else 0.0
        radius = math.radians(max(q.MATCH_RADIUS_PX, fwhm) * geometry.scale(i) / 3600.0)
        distance, nearest = tree.query(geometry.vectors(i, metrics[i].stars), k=1, distance_upper_bound=radius)
        matched = np.isfinite(distance)
        assert matched.sum() >= q.MIN_MATCHES
        ratios[i] = float(np.median(metrics[i].stars.flux[matched] / metrics[reference].stars.flux[nearest[matched]]))
    return ratios


def test_one_query_for_all_frames_matches_as_one_query_a_frame(night):
    truth, infos, metrics, _ = night
    for group in {m.group for m in metrics}:
        members = [i for i, m in enumerate(metrics) if m.group == group]
        expected = _matched_ratios_one_query_a_frame(members, metrics, infos)
        assert q._matched_ratios(members, metrics, infos) == expected  # to the bit
    # Radii that cut through the matches: each frame's own bound still decides, as a query would.
    members = [i for i, m in enumerate(metrics) if m.group == metrics[0].group]
    tree_vectors = q._FrameGeometry(infos)
    reference = max(members, key=lambda i: (metrics[i].stars.flux.size, -i))
    ref = tree_vectors.vectors(reference, metrics[reference].stars)
    from scipy.spatial import cKDTree

    tree = cKDTree(ref)
    sets = [tree_vectors.vectors(i, metrics[i].stars) for i in members]
    typical = float(np.median(np.concatenate([tree.query(v, k=1)[0] for v in sets])))
    radii = [typical * f for f in np.linspace(0.5, 2.0, len(sets))]
    partial = 0
    for (matched, nearest), vectors, radius in zip(q._within_radius(tree, ref, sets, radii), sets, radii):
        distance, expected_nearest = tree.query(vectors, k=1, distance_upper_bound=radius)
        assert np.array_equal(matched, np.isfinite(distance))
        assert np.array_equal(nearest[matched], expected_nearest[matched])
        partial += 0 < matched.sum() < matched.size
    assert partial >= len(sets) // 2


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_medians_of_many_arrays_are_numpys(dtype):
    rng = np.random.default_rng(5)
    samples = [rng.normal(size=int(rng.integers(0, 12))).astype(dtype) for _ in range(400)]
    samples[:4] = [np.array([1.0, np.nan, 2.0], dtype), np.array([np.inf, 1.0], dtype),
                   np.array([-0.0, 0.0], dtype), np.array([], dtype)]
    samples += [np.array([], dtype), np.array([3.0], dtype), np.array([], dtype)]  # empty ones last
    with np.errstate(all="ignore"):
        expected = [float(np.median(sample)) if sample.size else math.nan for sample in samples]
    got = q._medians_of(samples)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        assert mine == theirs or (math.isnan(mine) and math.isnan(theirs))
    assert all(math.isnan(value) for value in q._medians_of([np.array([], dtype)] * 3))


def test_transparency_without_wcs_falls_back_to_flux_levels(night):
    import copy

    truth, _, metrics, _ = night
    panel = [i for i, frame in enumerate(truth.frames) if frame.panel == truth.frames[truth.cloudy_frame].panel]
    copies = [copy.deepcopy(metrics[i]) for i in panel]
    q.assign_transparency(copies, frames=None)  # no WCS to match stars with
    for index, measured in zip(panel, copies):
        assert measured.transparency_method == "flux_level"
        assert measured.transparency == pytest.approx(truth.frames[index].transparency, abs=0.1), index
    _, empty = _drain(q.measure_frames([], {}, Reporter()))
    assert any(isinstance(e, LogEvent) and e.key == "quality_info_summary" for e in empty)


def test_trail_is_flagged_and_only_rejected_on_request(night):
    truth, _, metrics, _ = night
    x0, y0, x1, y1 = truth.frames[truth.trail_frame].trail
    assert metrics[truth.trail_frame].trail_flag
    assert metrics[truth.trail_frame].trail_length_px >= 0.5 * math.hypot(x1 - x0, y1 - y0)
    assert not any(m.trail_flag for i, m in enumerate(metrics) if i != truth.trail_frame)
    assert q.apply_quality_rules(metrics, {})[truth.trail_frame].accepted
    decision = q.apply_quality_rules(metrics, {"quality_reject_trails": True})[truth.trail_frame]
    assert not decision.accepted and decision.rule == "trail"


# ----------------------------------------------------------------------------- rules


def test_bad_frames_rejected_with_the_right_rule_and_no_false_rejection(night):
    truth, _, metrics, _ = night
    decisions = q.apply_quality_rules(metrics, {})
    expected = {truth.cloudy_frame: "transparency", truth.blurred_frame: "fwhm", truth.elongated_frame: "elongation"}
    for index, decision in enumerate(decisions):
        if index in expected:
            assert not decision.accepted and decision.rule == expected[index], (index, decision)
            assert decision.reason_key == f"frame_excluded_quality_{expected[index]}"
        else:
            assert decision.accepted, (index, decision)
    blurred = decisions[truth.blurred_frame]
    median_fwhm = float(np.median([m.fwhm_px for m in metrics]))
    assert blurred.median == pytest.approx(median_fwhm, rel=1e-3)
    assert blurred.threshold == pytest.approx(q.QUALITY_DEFAULTS["quality_max_fwhm_ratio"] * median_fwhm, rel=1e-3)
    assert blurred.value == pytest.approx(metrics[truth.blurred_frame].fwhm_px, rel=1e-3)

    entries = q.excluded_entries(metrics, decisions)
    assert [e["path"] for e in entries] == [metrics[i].path for i in sorted(expected)]
    for entry in entries:  # localised, with the numbers, in both languages
        for language in ("en", "fr"):
            text = tr(entry["reason_key"], language, path=entry["path"], **entry["params"])
            assert entry["path"] in text and entry["params"]["threshold"] in text and "{" not in text
    assert all(Path(e["path"]).exists() for e in entries)  # nothing deleted or moved


def test_rules_are_switchable(night):
    truth, _, metrics, _ = night
    assert all(d.accepted for d in q.apply_quality_rules(metrics, {"quality_rejection": False}))
    relaxed = q.apply_quality_rules(metrics, {"quality_max_fwhm_ratio": 0})
    assert relaxed[truth.blurred_frame].accepted
    assert not relaxed[truth.cloudy_frame].accepted and not relaxed[truth.elongated_frame].accepted
    assert q.apply_quality_rules(metrics, {"quality_max_elongation": 0})[truth.elongated_frame].rule != "elongation"
    no_transparency = q.apply_quality_rules(metrics, {"quality_min_transparency_fraction": 0})
    assert no_transparency[truth.cloudy_frame].rule != "transparency"
    strict_stars = q.apply_quality_rules(metrics, {"quality_min_star_fraction": 0.9, "quality_min_transparency_fraction": 0})
    assert strict_stars[truth.cloudy_frame].rule == "stars"  # 40 % of the light: fewer stars too


def test_rules_leave_small_sessions_alone():
    few = [q.FrameMetrics(n_stars=50, fwhm_px=2.5, elongation=1.0, background=1000.0, transparency=1.0),
           q.FrameMetrics(n_stars=5, fwhm_px=9.0, elongation=3.0, background=5000.0, transparency=0.1)]
    assert all(d.accepted for d in q.apply_quality_rules(few, {}))  # no session median from 2 frames


# ----------------------------------------------------------------------------- weights


def test_quality_weights(night):
    truth, _, metrics, _ = night
    none = q.quality_weights(metrics, "none")
    assert np.array_equal(none, np.ones(len(metrics)))
    variance = q.quality_weights(metrics, "noise_variance")
    fwhm = q.quality_weights(metrics, "noise_fwhm")
    assert variance.mean() == pytest.approx(1.0) and fwhm.mean() == pytest.approx(1.0)
    good = _good_frames(truth)
    # A frame at 40 % transparency and a 30 % brighter sky is worth ~ (0.4 / 1.14)² of a clear one.
    cloudy_expected = (metrics[truth.cloudy_frame].transparency * metrics[good[0]].noise / metrics[truth.cloudy_frame].noise) ** 2
    assert variance[truth.cloudy_frame] / variance[good[0]] == pytest.approx(cloudy_expected, rel=0.05)
    assert variance[truth.cloudy_frame] / np.median(variance[good]) < 0.2
    # noise_fwhm: the blurred frame loses (FWHM ratio)² on top of its noise weight.
    factors = q.fwhm_weight_factors(metrics)
    assert factors.mean() == pytest.approx(1.0)
    ratio = (fwhm[truth.blurred_frame] / variance[truth.blurred_frame]) / (fwhm[good[0]] / variance[good[0]])
    expected = (metrics[good[0]].fwhm_px / metrics[truth.blurred_frame].fwhm_px) ** 2
    assert ratio == pytest.approx(expected, rel=1e-6)
    assert fwhm[truth.blurred_frame] < 0.4 * np.median(fwhm[good])
    with pytest.raises(ValueError):
        q.quality_weights(metrics, "fwhm_only")


# ----------------------------------------------------------------------------- report and events


def test_metrics_report_and_events(night):
    truth, infos, metrics, events = night
    for measured, info in zip(metrics, infos):
        assert measured.path == str(info.path)
        document = json.loads(json.dumps(measured.to_dict(), allow_nan=False))
        assert document["fwhm_px"] == pytest.approx(measured.fwhm_px, abs=1e-3)
        assert all(isinstance(v, float) for v in measured.filter_values().values())
    progress = [e for e in events if isinstance(e, ProgressEvent) and e.key == q.PROGRESS_KEY]
    assert [e.done for e in progress] == list(range(1, len(infos) + 1))
    assert {(e.phase, e.total) for e in progress} == {("P1", len(infos))}
    logs = [e for e in events if isinstance(e, LogEvent)]
    assert any(e.key == "quality_info_summary" for e in logs)
    trail_logs = [e for e in logs if e.key == "quality_info_trail"]
    assert [e.params["path"] for e in trail_logs] == [str(infos[truth.trail_frame].path)]


# ----------------------------------------------------------------------------- hard frames


def _sky(shape, seed=0, level=1000.0, sigma=20.0):
    rng = np.random.default_rng(seed)
    return (level + sigma * rng.standard_normal(shape)).astype(np.float32)


def test_frame_without_stars():
    measured = q.measure_frame(np.rint(_sky((480, 270))).astype(np.uint16), bayer_pattern="GRBG")
    assert measured.reason == q.REASON_NO_STARS and measured.n_stars == 0
    assert math.isnan(measured.fwhm_px) and math.isnan(measured.elongation)
    assert measured.background == pytest.approx(1000.0, rel=0.01)
    assert measured.noise == pytest.approx(20.0, rel=0.1)  # the sky is still measured


def test_saturated_frame_and_saturated_stars(night):
    truth, infos, metrics, _ = night
    clipped = q.measure_frame(np.full((480, 270), 65535, np.uint16), bayer_pattern="GRBG")
    assert clipped.reason == q.REASON_SATURATED and clipped.n_stars == 0 and clipped.saturated_fraction == 1.0
    assert math.isnan(clipped.fwhm_px)
    flat = q.measure_frame(np.full((480, 270), 500.0, np.float32))
    assert flat.reason == q.REASON_FLAT and flat.n_stars == 0
    # Four times the exposure: the bright stars clip at 65535 and must not bias the FWHM.
    index = _good_frames(truth)[0]
    raw = q.load_measurement_data(infos[index]).astype(np.float64)
    overexposed = np.clip((raw - truth.bias_adu) * 4 + truth.bias_adu, 0, 65535).astype(np.uint16)
    measured = q.measure_frame(overexposed, infos[index])
    assert measured.saturated_fraction > 0 and measured.reason is None
    assert measured.fwhm_px == pytest.approx(truth.frames[index].fwhm_px, rel=0.10)


def test_fast_paths_give_numpys_numbers_to_the_bit():
    """The shortcuts of the measurement (photometry's bracketed medians, integer binning in bands, the
    saturation count on candidate cells, partition row medians) against plain NumPy."""
    rng = np.random.default_rng(5)
    for size in (7, 8192, 30_723, 30_724):
        for values in (rng.normal(size=size), np.round(rng.normal(size=size) * 2), np.sort(rng.standard_cauchy(size))):
            for dtype in (np.float32, np.float64):
                expected, got = np.median(values.astype(dtype)), q.exact_median(values.astype(dtype))
                assert got == float(expected)  # the same value (a zero may carry either sign: |Δ| follows)
    for dtype in (np.uint8, np.uint16, np.int16):
        limits = np.iinfo(dtype)
        plane = rng.integers(limits.min, limits.max, size=(301, 523), endpoint=True).astype(dtype)
        plane[-1, :5] = plane[:7, -1] = limits.max  # clipped pixels where binning drops a row and a column
        plane[100:103, 200:202] = limits.max
        reference = plane[:300, :522].astype(np.float64)
        reference = reference[0::2, 0::2] + reference[0::2, 1::2] + reference[1::2, 0::2] + reference[1::2, 1::2]
        binned = q._bin2x2(plane)
        assert binned.dtype == np.float32 and binned.flags.c_contiguous and np.array_equal(binned, reference)
        for level in (float(limits.max), float(np.median(plane)), float(limits.min)):
            assert q._count_at_least(plane, binned, level) == np.count_nonzero(plane >= level)
    stamps = rng.integers(0, 1000, size=(40, 49)).astype(np.float32)
    assert np.array_equal(q._row_median(stamps), detect.nanmedian_rows(stamps))


def test_all_nan_and_tiny_frames():
    all_nan = q.measure_frame(np.full((3, 120, 160), np.nan, np.float32))
    assert all_nan.reason == q.REASON_NO_VALID_PIXELS and all_nan.n_stars == 0 and math.isnan(all_nan.noise)
    tiny = q.measure_frame(np.zeros((4, 4), np.float32))
    assert tiny.reason == q.REASON_NO_VALID_PIXELS
    assert json.dumps(all_nan.to_dict(), allow_nan=False)


def test_partly_blank_frame_still_measured(night):
    truth, infos, metrics, _ = night
    index = _good_frames(truth)[0]
    raw = q.load_measurement_data(infos[index]).astype(np.float32)
    raw[: raw.shape[0] // 3] = np.nan  # e.g. a field-rotation crop
    measured = q.measure_frame(raw, infos[index])
    assert measured.reason is None
    assert measured.fwhm_px == pytest.approx(truth.frames[index].fwhm_px, rel=0.10)
    assert 0.4 * metrics[index].n_stars < measured.n_stars < 0.9 * metrics[index].n_stars


def test_bad_files_among_good_ones(night, tmp_path):
    """An all-NaN sub and an unreadable one in a session: reasons, no crash, and the rules drop them."""
    truth, infos, _, _ = night
    header = fits.getheader(truth.frame_paths[0])
    header.remove("BAYERPAT")
    fits.writeto(tmp_path / "nan.fits", np.full((truth.height, truth.width), np.nan, np.float32), header)
    nan_info = read_frame_info(tmp_path / "nan.fits")
    cut = tmp_path / "cut.fits"
    cut.write_bytes(truth.frame_paths[1].read_bytes())
    cut_info = read_frame_info(cut)
    cut.write_bytes(truth.frame_paths[1].read_bytes()[: 2880 * 3])  # cut after the header was read
    session = [infos[i] for i in range(5)] + [nan_info, cut_info]
    metrics, _ = _drain(q.measure_frames(session, {}, Reporter()))
    assert metrics[5].reason == q.REASON_NO_VALID_PIXELS and metrics[5].n_stars == 0
    assert metrics[6].reason == q.REASON_UNREADABLE and "frame_excluded_truncated" in metrics[6].detail
    decisions = q.apply_quality_rules(metrics, {})
    assert not decisions[5].accepted and not decisions[6].accepted
    for key in (metrics[5].reason, metrics[6].reason):
        assert tr(key, "fr", path="x", detail="y") != key


def test_measurement_paths_agree_on_noise_free_stars():
    """Adaptive moments recover the FWHM of pixel-integrated Gaussians on CFA green sites and on every pixel."""
    rng = np.random.default_rng(3)
    for fwhm in (2.2, 3.0, 4.5):
        x, y = rng.uniform(20, 380, 60), rng.uniform(20, 380, 60)
        flux = np.full((60, 3), 5e4)
        image = demo._render_stars(x, y, flux, fwhm / q.FWHM_PER_SIGMA, (400, 400)) + 1000.0
        image += np.random.default_rng(4).normal(0.0, 1.0, image.shape).astype(np.float32)
        for pattern in ("GRBG", "RGGB", None):
            measured = q.measure_frame(image, bayer_pattern=pattern)
            assert measured.fwhm_px == pytest.approx(fwhm, rel=0.02), (fwhm, pattern)
            assert measured.elongation < 1.05


def test_debayered_input_is_accepted(night):
    truth, infos, metrics, _ = night
    index = _good_frames(truth)[0]
    rgb = q.measure_frame(load_frame(infos[index]), infos[index])
    assert rgb.reason is None and rgb.n_stars > 0.8 * metrics[index].n_stars
    # Bilinear interpolation widens stars: the raw CFA plane is the reference measurement.
    assert metrics[index].fwhm_px <= rgb.fwhm_px <= 1.3 * metrics[index].fwhm_px


# ----------------------------------------------------------------------------- tile gate


@pytest.fixture(scope="module")
def tile_parts():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(5, 395, 150), rng.uniform(5, 395, 150)
    flux = demo._power_law(rng, 150, 2000.0, 2e5)
    stars = demo._render_stars(x, y, np.column_stack([flux, flux, flux]), 1.1, (400, 400))
    yy, xx = np.mgrid[0:400, 0:400]
    radius = np.hypot(xx - 200, yy - 200) / 200.0

    def tile(glow: float = 0.0, with_stars: bool = True) -> np.ndarray:
        image = 1000.0 * (1.0 + glow * radius**2) + (stars if with_stars else 0.0) + 5.0 * rng.standard_normal((400, 400))
        return np.stack([image, 0.9 * image, 0.8 * image]).astype(np.float32)

    return tile, np.full((400, 400), 10.0, np.float32)


def test_tile_gate_down_weights_poor_tiles_but_never_drops_them(tile_parts):
    tile, coverage = tile_parts
    good = q.tile_quality(tile(), coverage)
    assert good.score > 0.9 and q.tile_weight(good.score) == 1.0
    reference = good.star_density

    ragged = coverage.copy()
    ragged[:, :220] = 2.0  # most of the tile from a couple of frames
    glow = q.tile_quality(tile(glow=0.5), coverage, star_density_ref=reference)
    empty = q.tile_quality(tile(with_stars=False), coverage, star_density_ref=reference)
    thin = q.tile_quality(tile(), ragged, star_density_ref=reference)
    assert thin.coverage_term == pytest.approx(180 / 400, abs=0.01)
    assert glow.disparity == pytest.approx(0.4, abs=0.1) and glow.disparity_term < 0.3  # dew / moon glow
    assert empty.density_term == 0.0
    for poor in (glow, empty, thin):
        weight = q.tile_weight(poor.score)
        assert q.TILE_WEIGHT_FLOOR <= weight < 0.75
    # A footprint edge (uncovered pixels) and a mild sky gradient are normal.
    cropped = coverage.copy()
    cropped[:, :150] = 0.0
    assert q.tile_weight(q.tile_quality_score(tile(), cropped, star_density_ref=reference)) == 1.0
    assert q.tile_weight(q.tile_quality_score(tile(glow=0.03), coverage, star_density_ref=reference)) == 1.0
    assert q.tile_weight(float("nan")) == q.TILE_WEIGHT_FLOOR
    assert q.tile_quality(tile(), np.zeros_like(coverage)).score == 0.0


# ----------------------------------------------------------------------------- demo options


def test_demo_bad_frame_options(night):
    truth, _, _, _ = night
    assert truth.frames[truth.blurred_frame].is_blurred
    assert truth.frames[truth.elongated_frame].smear_px == demo.SMEAR_LENGTH_PX
    assert sum(f.is_blurred for f in truth.frames) == 1 and sum(f.smear_px > 0 for f in truth.frames) == 1
    with pytest.raises(DemoSpecError):
        DemoSpec(panels=(1, 1), frames_per_panel=2, blurred_frame=2).validate()


# ----------------------------------------------------------------------------- the mosaic


def _mosaic_quality(result, truth) -> tuple[float, float]:
    """(background noise, star-flux scatter) of a mosaic's green channel.

    Noise: robust pixel sigma after removing the smooth sky, over the well-covered area.
    Scatter: robust sigma of ln(aperture flux / catalog flux) of bright isolated stars
    (2.5 px aperture: a blurred or trailed contribution moves light out of it).
    """
    green = result.data[1]
    coverage = result.coverage
    well_covered = coverage >= np.percentile(coverage[coverage > 0], 50)
    height, width = green.shape
    noise = robust_noise_map(green, (slice(0, height), slice(0, width)), ~well_covered)
    ids, xs, ys = truth_star_pixels(truth, result.canvas.wcs, result.data.shape, min_flux=5000.0, isolation_px=12.0, edge_px=15.0)
    ratios = []
    for star, x, y in zip(ids, xs, ys):
        box = green[int(y) - 12 : int(y) + 13, int(x) - 12 : int(x) + 13]
        if np.isfinite(box).all():
            ratios.append(aperture_flux(green, x, y, 2.5, 8.0, 12.0) / truth.star_flux[star, 1])
    logs = np.log(np.array(ratios))
    assert logs.size >= 30
    return noise, float(1.4826 * np.median(np.abs(logs - np.median(logs))))


def test_rejection_gives_a_cleaner_mosaic(night, tmp_path):
    """The frames the rules accept, stacked, against all frames (same pipeline, ``include``).

    With equal frame weights the cloudy frame's noise (x 2.8 once scaled to the others' flux) goes
    too: lower background noise. With the default noise-variance weights the cloudy frame was
    already weighted ~0.14, so dropping 3 of 10 frames costs some noise, less than dropping 3
    typical frames would (sqrt(10/7)); the star-flux scatter improves either way.
    """
    from napari_zemosaic.engine.pipeline import run

    truth, _, metrics, _ = night
    accepted = [m.path for m, d in zip(metrics, q.apply_quality_rules(metrics, {})) if d.accepted]
    n_all, n_kept = len(metrics), len(accepted)
    for weighting in ("none", "noise_variance"):
        config = {"max_memory_mb": 512, "stacking_weighting_method": weighting, "quality_rejection": False}
        noise_off, scatter_off = _mosaic_quality(run(truth.frames_dir, tmp_path / f"off_{weighting}", config), truth)
        noise_on, scatter_on = _mosaic_quality(
            run(truth.frames_dir, tmp_path / f"on_{weighting}", config, include=accepted), truth
        )
        assert scatter_on < 0.7 * scatter_off, weighting
        if weighting == "none":
            assert noise_on < 0.95 * noise_off
        else:
            assert noise_on < math.sqrt(n_all / n_kept) * noise_off


@pytest.mark.xfail(
    not PIPELINE_WIRED,
    reason="needs the pipeline wiring of engine/quality.py (config keys + P1/P2 calls, issue 7)",
    strict=True,
)
def test_quality_rejection_switch_in_the_pipeline(night, tmp_path):
    from napari_zemosaic.engine.pipeline import run

    truth, _, _, _ = night
    base = {"max_memory_mb": 512, "stacking_weighting_method": "none"}
    off = run(truth.frames_dir, tmp_path / "off", {**base, "quality_rejection": False})
    on = run(truth.frames_dir, tmp_path / "on", {**base, "quality_rejection": True})
    noise_off, scatter_off = _mosaic_quality(off, truth)
    noise_on, scatter_on = _mosaic_quality(on, truth)
    assert noise_on < 0.95 * noise_off and scatter_on < 0.7 * scatter_off
    expected = {
        truth.frame_paths[truth.cloudy_frame].name: "frame_excluded_quality_transparency",
        truth.frame_paths[truth.blurred_frame].name: "frame_excluded_quality_fwhm",
        truth.frame_paths[truth.elongated_frame].name: "frame_excluded_quality_elongation",
    }
    excluded = {Path(e["path"]).name: e["reason_key"] for e in on.report["frames"]["excluded"]}
    assert excluded == expected
    assert on.report["frames"]["used"] == len(truth.frames) - 3 and off.report["frames"]["used"] == len(truth.frames)
    assert len(on.report["frames"]["metrics"]) == len(truth.frames)


def test_quality_measured_beside_reprojection_gives_the_same_mosaic(night, tmp_path):
    """P2 on a thread while Mosaic-First resamples every frame (P3), the rejected frames dropped
    after P3: the same mosaic, to the bit, and the same report as measuring first."""
    from napari_zemosaic.engine.pipeline import run
    from napari_zemosaic.events import ProgressEvent

    truth, _, _, _ = night
    base = {"max_memory_mb": 512, "workflow": "mosaic_first"}
    results, quality_progress = {}, {}
    for setting in ("off", "on"):
        events: list = []
        results[setting] = run(truth.frames_dir, tmp_path / setting, {**base, "quality_beside_reprojection": setting},
                               on_event=events.append)
        quality_progress[setting] = [e for e in events if isinstance(e, ProgressEvent) and e.key == q.PROGRESS_KEY]
    off, on = results["off"], results["on"]
    np.testing.assert_array_equal(on.data, off.data)
    np.testing.assert_array_equal(on.coverage, off.coverage)
    assert on.canvas.shape == off.canvas.shape
    assert on.canvas.wcs.to_header_string() == off.canvas.wcs.to_header_string()
    rejected = {truth.frame_paths[i].name for i in (truth.cloudy_frame, truth.blurred_frame, truth.elongated_frame)}
    for result in (off, on):
        assert {Path(e["path"]).name for e in result.report["frames"]["excluded"]} == rejected
        assert result.report["frames"]["used"] == len(truth.frames) - 3
        assert len(result.report["frames"]["metrics"]) == len(truth.frames)
        assert [f.path.name for f in result.frames] == [p.name for p in truth.frame_paths if p.name not in rejected]
    assert on.report["frames"]["normalisation"] == off.report["frames"]["normalisation"]
    # The thread's progress reaches the consumer through the run's generator, every frame once.
    assert len(quality_progress["on"]) == len(quality_progress["off"]) == len(truth.frames)
    assert "P2" in on.report["timings_s"] and "P3" in on.report["timings_s"]


def test_quality_beside_reprojection_stops_its_thread_when_the_run_is_cancelled(night, tmp_path):
    """A cancel during P3 stops the measuring thread too: nothing left running, report ``cancelled``."""
    import json
    import threading

    from napari_zemosaic.engine.context import RunCancelled
    from napari_zemosaic.engine.pipeline import iter_run
    from napari_zemosaic.events import ProgressEvent

    truth, _, _, _ = night
    cancel = threading.Event()
    generator = iter_run(truth.frames_dir, tmp_path / "out", {"max_memory_mb": 512, "workflow": "mosaic_first",
                         "quality_beside_reprojection": "on"}, cancel_event=cancel)
    with pytest.raises(RunCancelled):
        for event in generator:
            if isinstance(event, ProgressEvent) and event.phase == "P3":
                cancel.set()
    assert not [t for t in threading.enumerate() if t.name == "zemosaic-quality"]
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["status"] == "cancelled"
    assert not (tmp_path / "out" / "mosaic_science.fits").exists()


def test_noise_fwhm_weighting_favours_sharp_frames_in_the_stack(tmp_path):
    """``noise_fwhm`` weights reach Mosaic-First: the blurred frame counts for less than with ``noise_variance``."""
    from napari_zemosaic.config import validate_config
    from napari_zemosaic.engine.mosaic_first import _frame_weights
    from napari_zemosaic.engine.photometry import Normalisation

    config = validate_config({"stacking_weighting_method": "noise_fwhm"})
    noises = np.ones((4, 3))
    norm = Normalisation.identity(4, 3)
    fwhm = np.array([2.5, 2.5, 2.5, 5.0])  # the last frame is twice as blurred
    sharp_aware = _frame_weights(config, noises, norm, fwhm)
    plain = _frame_weights(validate_config({"stacking_weighting_method": "noise_variance"}), noises, norm, fwhm)
    assert plain == pytest.approx(np.ones(4))
    assert sharp_aware[3] == pytest.approx(sharp_aware[0] / 4, rel=1e-6)
    assert sharp_aware.mean() == pytest.approx(1.0)


def test_tile_gate_down_weights_a_patchy_dewy_tile_but_never_drops_it():
    rng = np.random.default_rng(3)
    good = rng.normal(1000.0, 5.0, (3, 120, 120)).astype(np.float32)
    coverage = np.full((120, 120), 10.0, np.float32)
    poor = good.copy()
    poor[:, :, :30] += 400.0  # a dew/moon glow along one edge
    patchy = coverage.copy()
    patchy[40:, :] = 1.0  # most of the tile from a single frame
    good_weight = q.tile_weight(q.tile_quality_score(good, coverage))
    poor_weight = q.tile_weight(q.tile_quality_score(poor, patchy))
    assert poor_weight < good_weight and poor_weight >= 0.1


def test_process_pool_measurement_equals_the_thread_pool(night, monkeypatch):
    """Many frames are measured in worker processes (FrameInfo sent without WCS and header):
    the metrics are those of the threads, to the bit."""
    truth, infos, metrics, _ = night
    monkeypatch.setattr(q, "PROCESS_MEASURE_MIN_FRAMES", 2)
    monkeypatch.setattr(q.os, "cpu_count", lambda: 4)
    pool, _submit = q._measure_executor(infos, {"num_workers": 2}, q.measure_one)
    pool.shutdown()
    assert type(pool).__name__ == "ProcessPoolExecutor"
    in_processes, events = _drain(q.measure_frames(infos, {"num_workers": 2}, Reporter()))
    assert [m.to_dict() for m in in_processes] == [m.to_dict() for m in metrics]
    for ours, theirs in zip(in_processes, metrics):
        np.testing.assert_array_equal(ours.stars.flux, theirs.stars.flux)
    assert sum(isinstance(e, ProgressEvent) for e in events) >= len(infos)


def test_measuring_processes_run_below_the_run_priority():
    """Measuring processes are throughput work: the run's threads get a core before them."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, initializer=q._lower_worker_priority) as pool:
        assert pool.submit(os.nice, 0).result() == min(19, os.nice(0) + q.MEASURE_WORKER_NICENESS)

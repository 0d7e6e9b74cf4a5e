"""Bad and unusual inputs: each gives a localised message and a report entry; the run goes on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from napari_zemosaic.cli import main
from napari_zemosaic.engine.context import UserError
from napari_zemosaic.engine.pipeline import run
from napari_zemosaic.i18n import tr


@pytest.fixture(scope="module")
def small_night(tmp_path_factory):
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("small_night")
    truth = generate_demo(root, DemoSpec(panels=(1, 2), frames_per_panel=3, scale=0.15, seed=3))
    return root, truth


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_frames(root: Path, target: Path) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, target)) for p in sorted((root / "frames").glob("*.fit"))]


def test_bad_files_are_excluded_with_reasons_and_the_run_goes_on(small_night, tmp_path) -> None:
    root, truth = small_night
    inputs = tmp_path / "in"
    good = _copy_frames(root, inputs)
    (inputs / "empty.fits").write_bytes(b"")
    (inputs / "notes.fits").write_text("this is not a FITS file\n" * 20)
    raw = good[0].read_bytes()
    (inputs / "truncated.fits").write_bytes(raw[: len(raw) // 2])
    header = fits.getheader(good[1])
    nan_data = np.full((header["NAXIS2"], header["NAXIS1"]), np.nan, np.float32)
    nan_header = header.copy()
    for key in ("BZERO", "BSCALE"):
        nan_header.remove(key, ignore_missing=True)
    fits.writeto(inputs / "allnan.fits", nan_data, nan_header)
    singular = header.copy()
    singular["CD1_1"], singular["CD1_2"], singular["CD2_1"], singular["CD2_2"] = 1e-4, 2e-4, 1e-4, 2e-4
    fits.writeto(inputs / "singular.fits", fits.getdata(good[1]), singular)
    # a smaller frame (cut-out with shifted CRPIX): mixed sizes are accepted with a warning
    small = fits.getdata(good[2])[:100, :80]
    small_header = fits.getheader(good[2]).copy()
    fits.writeto(inputs / "small.fits", small, small_header)
    before = _hashes(inputs)

    # solving off: this test is about exclusion (solving would repair the singular WCS)
    result = run(inputs, tmp_path / "out", {"max_memory_mb": 256, "solve_missing_wcs": False})
    assert result.status == "ok"
    excluded = {Path(e["path"]).name: e["reason_key"] for e in result.report["frames"]["excluded"]}
    assert excluded["empty.fits"] == "frame_excluded_empty_file"
    assert excluded["notes.fits"] == "frame_excluded_not_fits"
    assert excluded["truncated.fits"] == "frame_excluded_truncated"
    assert excluded["allnan.fits"] == "frame_excluded_all_nan"
    assert excluded["singular.fits"] == "frame_excluded_bad_wcs"
    quality = [e for e in result.report["frames"]["excluded"] if e["reason_key"].startswith("frame_excluded_quality_")]
    assert len(quality) <= 1  # at most the demo's cloudy frame
    assert result.report["frames"]["used"] == len(good) + 1 - len(quality)  # the small frame is used
    assert any(w["key"] == "frames_warn_mixed_sizes" for w in result.report["frames"]["warnings"])
    log = (tmp_path / "out" / "zemosaic.log").read_text()
    for reason in set(excluded.values()):
        assert f"[{reason}]" in log and tr(reason, path="", detail="")[:10] in log
    assert _hashes(inputs) == before  # inputs untouched
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir() if p.is_file())


def test_nothing_usable_exits_2_with_a_clear_message(tmp_path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.fits").write_bytes(b"")
    fits.writeto(inputs / "nowcs.fits", np.zeros((20, 30), np.uint16))
    code = main(["run", str(inputs), str(tmp_path / "out"), "--set", "solve_missing_wcs=false"])
    captured = capsys.readouterr()
    assert code == 2
    assert tr("run_error_no_usable_frames", found=2, excluded=2) in captured.err
    assert "Traceback" not in captured.err
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["status"] == "failed"
    assert {e["reason_key"] for e in report["frames"]["excluded"]} == {"frame_excluded_empty_file", "frame_excluded_no_wcs"}
    assert not (tmp_path / "out" / "mosaic_science.fits").exists()


def test_french_messages(tmp_path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    code = main(["run", str(inputs), str(tmp_path / "out"), "--lang", "fr"])
    assert code == 2
    assert tr("run_error_no_usable_frames", "fr", found=0, excluded=0) in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_exits_2(small_night, tmp_path, capsys) -> None:
    root, _ = small_night
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["run", str(root / "frames"), str(locked / "out")])
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_output_that_is_a_file_exits_2(small_night, tmp_path, capsys) -> None:
    """An OUTPUT path that cannot be a folder (works as root too)."""
    root, _ = small_night
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code = main(["run", str(root / "frames"), str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert tr("output_error_unwritable", path=str((blocker / "out").resolve()), detail="")[:30] in err


def test_bad_config_value_exits_2(small_night, tmp_path, capsys) -> None:
    root, _ = small_night
    code = main(["run", str(root / "frames"), str(tmp_path / "out"), "--set", "stacking_kappa_low=-1"])
    assert code == 2
    assert "stacking_kappa_low" in capsys.readouterr().err


def test_mono_and_rgb_inputs(small_night, tmp_path) -> None:
    """Debayered RGB cubes (3,H,W) and mono frames with WCS go through the same pipeline."""
    from napari_zemosaic.engine.frames import load_frame, read_frame_info

    root, _ = small_night
    rgb_dir, mono_dir = tmp_path / "rgb", tmp_path / "mono"
    rgb_dir.mkdir()
    mono_dir.mkdir()
    for path in sorted((root / "frames").glob("*.fit")):
        info = read_frame_info(path)
        rgb = load_frame(info)
        header = info.wcs.to_header(relax=True)
        fits.writeto(rgb_dir / path.name, rgb.astype(np.float32), header)
        fits.writeto(mono_dir / path.name, rgb.mean(axis=0).astype(np.float32), header)
    rgb_result = run(rgb_dir, tmp_path / "out_rgb", {"max_memory_mb": 256})
    mono_result = run(mono_dir, tmp_path / "out_mono", {"max_memory_mb": 256})
    assert rgb_result.data.shape[0] == 3 and mono_result.data.shape[0] == 1
    # cubes rewritten without the Seestar header: auto picks the classic workflow for them
    assert rgb_result.report["workflow_used"] == "classic" == mono_result.report["workflow_used"]
    covered = (rgb_result.alpha > 0) & (mono_result.alpha > 0)
    assert covered.mean() > 0.5
    # the mono mosaic is the channel mean of the colour mosaic, up to normalisation noise
    ratio = np.nanmedian(mono_result.data[0][covered]) / np.nanmedian(rgb_result.data.mean(axis=0)[covered])
    assert ratio == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("ra,dec", [(359.95, 10.0), (120.0, 85.0)])
def test_ra_wrap_and_high_declination(tmp_path, ra, dec) -> None:
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    truth = generate_demo(tmp_path, DemoSpec(panels=(1, 2), frames_per_panel=2, scale=0.15, seed=2, ra_deg=ra, dec_deg=dec))
    result = run(tmp_path / "frames", tmp_path / "out", {"max_memory_mb": 256})
    height, width = result.canvas.shape
    assert width < 2000 and height < 2000  # not a 360°-wide canvas
    # bright truth stars land where the mosaic WCS says
    x, y = result.canvas.wcs.all_world2pix(truth.star_ra, truth.star_dec, 0)
    bright = np.argsort(truth.star_flux[:, 1])[::-1]
    image = result.data.sum(axis=0)
    checked = 0
    for i in bright[:60]:
        ix, iy = int(round(x[i])), int(round(y[i]))
        if 8 <= ix < width - 8 and 8 <= iy < height - 8 and result.alpha[iy - 6 : iy + 7, ix - 6 : ix + 7].all():
            stamp = image[iy - 3 : iy + 4, ix - 3 : ix + 4]
            py, px = np.unravel_index(np.nanargmax(stamp), stamp.shape)
            assert abs(px - 3) <= 1 and abs(py - 3) <= 1
            checked += 1
    assert checked >= 5


def test_user_error_for_missing_input(tmp_path) -> None:
    with pytest.raises(UserError) as info:
        run(tmp_path / "nope", tmp_path / "out")
    assert info.value.key == "input_error_missing"


def test_a_second_run_into_the_same_output_refuses_while_the_first_runs(small_night, tmp_path) -> None:
    from napari_zemosaic.engine.pipeline import iter_run

    root, _ = small_night
    first = iter_run(root / "frames", tmp_path / "out", {"max_memory_mb": 256})
    next(first)  # the first run has started and holds OUTPUT
    with pytest.raises(UserError) as info:
        run(root / "frames", tmp_path / "out", {"max_memory_mb": 256})
    assert info.value.key == "run_error_output_locked"
    assert tr(info.value.key, **info.value.params) != info.value.key
    first.close()  # cancelled: the lock goes with it
    assert run(root / "frames", tmp_path / "out", {"max_memory_mb": 256}).status == "ok"


def test_a_run_freezes_the_heap_while_it_runs_and_gives_it_back(small_night, tmp_path) -> None:
    """The objects alive at the run's start and after its header pass are kept out of the garbage
    collector's full passes during the run only; after a run, ended or failed, nothing is frozen;
    a program that froze objects itself keeps its own freeze."""
    import gc

    from napari_zemosaic.engine.pipeline import drain, iter_run

    root, _ = small_night
    assert gc.get_freeze_count() == 0
    seen: list[int] = []
    result = drain(iter_run(root / "frames", tmp_path / "out", {"max_memory_mb": 256}),
                   lambda event: seen.append(gc.get_freeze_count()))
    assert result.status == "ok"
    assert seen and max(seen) > 0 and gc.get_freeze_count() == 0
    broken = iter_run(root / "frames", tmp_path / "out2", {"max_memory_mb": 256})
    try:
        for event in broken:  # up to the header pass's first file
            if getattr(event, "phase", "") == "P1":
                break
        assert gc.get_freeze_count() > 0
    finally:
        broken.close()  # cancelled
    assert gc.get_freeze_count() == 0

    gc.freeze()  # the program's own
    try:
        frozen = gc.get_freeze_count()
        seen.clear()
        drain(iter_run(root / "frames", tmp_path / "out3", {"max_memory_mb": 256}),
              lambda event: seen.append(gc.get_freeze_count()))
        # Neither given back nor grown by the run (frozen objects still go when their last reference does).
        assert seen and all(0 < count <= frozen for count in seen) and 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()

#!/usr/bin/env python
"""Make ``docs/screenshot.png``: napari after a finished demo run from the *Run mosaic* widget.

    python docs/make_screenshot.py [--out docs/screenshot.png] [--scale 0.35] [--frames-per-panel 12]

It writes a synthetic Seestar night (``zemosaic demo``'s generator) to a temporary
folder, opens the three napari-zemosaic dock widgets, scans the frames with the Frame
filter, previews the SDS batches, runs the mosaic from the Run widget (in its thread
worker, exactly as a user would), then saves a screenshot of the whole window. It needs
a display: on a headless machine run it under ``xvfb-run -a``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def wait_for(app, condition, timeout_s: float) -> None:
    """Run the Qt event loop until ``condition()`` holds (the widgets work in thread workers)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the widget did not finish in time")
        app.processEvents()
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "screenshot.png")
    parser.add_argument("--scale", type=float, default=0.35, help="demo sensor scale (1 = full Seestar frames)")
    parser.add_argument("--frames-per-panel", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size", default="1600x1000", help="window size WxH")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    work = Path(tempfile.mkdtemp(prefix="zemosaic-")) / "M42"
    spec = DemoSpec(panels=(2, 2), frames_per_panel=args.frames_per_panel, scale=args.scale, seed=args.seed)
    print(f"demo night: {spec.n_frames} frames in {work / 'frames'}", file=sys.stderr)
    generate_demo(work, spec)

    viewer = napari.Viewer(title="napari-zemosaic")
    width, height = (int(v) for v in args.size.lower().split("x"))
    viewer.window.resize(width, height)
    app = QApplication.instance()
    _dock, filter_widget = viewer.window.add_plugin_dock_widget("napari-zemosaic", "Frame filter")
    _dock, sds_widget = viewer.window.add_plugin_dock_widget("napari-zemosaic", "SDS preview", tabify=True)
    _dock, run_widget = viewer.window.add_plugin_dock_widget("napari-zemosaic", "Run mosaic", tabify=True)

    filter_widget.input_dir.value = str(work / "frames")
    filter_widget.start_scan()
    wait_for(app, lambda: filter_widget.worker is None, 120)

    sds_widget.min_batch_size.value = 4
    sds_widget.target_batch_size.value = 8
    sds_widget.start_preview()
    wait_for(app, lambda: sds_widget.worker is None, 120)

    run_widget.output_dir.value = str(work / "mosaic")
    run_widget.start()
    wait_for(app, lambda: run_widget.worker is None, 1800)
    outcome = run_widget.last_outcome
    if outcome is None or not outcome.ok:
        print(f"run failed: {outcome and outcome.message()}", file=sys.stderr)
        return 1

    # What a user looks at after a run: the mosaic, the footprints and the batch outlines.
    for layer in viewer.layers:
        layer.visible = layer.name in ("mosaic", "frames", "SDS batches")
    viewer.layers["frames"].opacity = 0.6
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False, flash=False)
    print(f"wrote {args.out}", file=sys.stderr)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

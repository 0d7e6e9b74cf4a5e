"""Console facade: a :class:`Session` over one input folder, and :func:`show`.

    >>> from napari_zemosaic import Session, show
    >>> session = Session("~/seestar/M42/lights", "~/seestar/M42/mosaic", viewer=viewer)
    >>> session.scan()                               # frames layer appears
    >>> session.exclude(farther_than_deg=1.5)        # drop stray pointings
    >>> session.preview_sds(coverage_threshold=0.9)  # SDS batches + coverage layers
    >>> result = session.run(workflow="auto", gpu="auto")   # mosaic / alpha / coverage layers

The session is the state the napari widgets share (one per viewer): the scanned
frames, their footprints on the global canvas, the inclusion set, the SDS preview.
Every method that does work has a *compute* part with no viewer access
(:meth:`Session.iter_scan`, :meth:`Session.compute_sds`, :meth:`Session.iter_run`),
which the widgets run in thread workers, and an *apply/show* part that touches the
viewer on the main thread. Without a viewer nothing imports napari or Qt.
"""

from __future__ import annotations

import csv
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable, Sequence

import numpy as np

from .config import GPU_MODES, apply_overrides, gpu_mode_overrides, load_config, validate_config
from .events import Event, LogEvent, Reporter
from .i18n import tr

if TYPE_CHECKING:  # pragma: no cover
    from .engine.canvas import Canvas
    from .engine.frames import FrameInfo
    from .engine.pipeline import ExcludedFrame, MosaicResult

__all__ = ["Session", "ScanResult", "SDSPreview", "show", "drain", "gpu_overrides", "WORKFLOW_CHOICES", "GPU_CHOICES"]

#: Workflow names accepted by :meth:`Session.run` (the CLI spelling ``mosaic-first`` works too).
WORKFLOW_CHOICES = ("auto", "classic", "mosaic_first", "sds")
GPU_CHOICES = GPU_MODES


def gpu_overrides(mode: str) -> dict[str, Any]:
    """Config keys for ``gpu="auto"|"on"|"off"`` (the same mapping as the CLI's ``--gpu``)."""
    if mode not in GPU_CHOICES:
        raise ValueError(f"gpu must be one of {GPU_CHOICES}, not {mode!r}")
    return gpu_mode_overrides(mode)


def drain(generator: Generator[Event, None, Any], on_event: Callable[[Event], None] | None = None) -> Any:
    """Run an engine generator to the end (see :func:`napari_zemosaic.engine.pipeline.drain`)."""
    from .engine.pipeline import drain as drain_engine

    return drain_engine(generator, on_event)


def angular_distance_deg(ra1: np.ndarray, dec1: np.ndarray, ra2: float, dec2: float) -> np.ndarray:
    """Great-circle distance (haversine); the RA difference is weighted by cos δ as it must be."""
    ra1, dec1 = np.radians(ra1), np.radians(dec1)
    ra2, dec2 = np.radians(ra2), np.radians(dec2)
    term = np.sin((dec1 - dec2) / 2.0) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra1 - ra2) / 2.0) ** 2
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(term, 0.0, 1.0))))


@dataclass
class ScanResult:
    """What a scan found: usable frames (with footprints on the canvas) and unusable files."""

    frames: list[FrameInfo]
    unusable: list[ExcludedFrame]
    canvas: Canvas | None
    footprints: list[np.ndarray]  # per frame, (K, 2) canvas pixel (x, y)
    centres: np.ndarray  # (N, 2) RA, Dec of each frame centre (deg)
    distances_deg: np.ndarray  # (N,) from the mosaic centre
    groups: list[int] | None = None  # pointing group per frame when the engine provides grouping
    messages: list[LogEvent] = field(default_factory=list)


@dataclass
class SDSPreview:
    """An SDS batch plan over the session's frames (indices into :attr:`Session.frames`)."""

    batches: list[list[int]]
    coverage_fractions: list[float]
    coverage_threshold: float
    min_batch_size: int
    target_batch_size: int
    display: Any = None  # layers.SDSDisplay when computed for a viewer

    def summary(self, language: str | None = None) -> str:
        sizes = ", ".join(str(len(batch)) for batch in self.batches)
        return tr("sds_preview_summary", language, count=len(self.batches), sizes=sizes)


class Session:
    """Scan → select → SDS preview → run, on one input folder (see the module docstring).

    ``config`` is a config dict (validated; the user's config file when ``None``).
    ``viewer``: a napari viewer; when given, the same layers as the widgets appear.
    """

    def __init__(
        self,
        input_dir: str | Path,
        output_dir: str | Path | None = None,
        config: dict[str, Any] | None = None,
        viewer: Any = None,
    ) -> None:
        self.input_dir = Path(input_dir).expanduser().resolve()
        self.output_dir = None if output_dir is None else Path(output_dir).expanduser().resolve()
        self.config: dict[str, Any] = validate_config(config) if config is not None else load_config()
        self.viewer = viewer
        self._scan: ScanResult | None = None
        self.included = np.zeros(0, dtype=bool)
        self.sds: SDSPreview | None = None
        self.result: MosaicResult | None = None
        #: Called as ``listener(session, what)`` with ``what`` in {"selection", "sds"}.
        self.listeners: list[Callable[[Session, str], None]] = []
        if viewer is not None:  # the viewer's widgets follow this session from now on
            from ._widgets import state_for

            state_for(viewer).set_session(self)

    def _notify(self, what: str) -> None:
        for listener in list(self.listeners):
            listener(self, what)

    def __repr__(self) -> str:
        scanned = "not scanned" if self._scan is None else f"{len(self.frames)} frames, {int(self.included.sum())} included"
        return f"Session({str(self.input_dir)!r}, {scanned})"

    @property
    def language(self) -> str:
        return str(self.config.get("language", "en"))

    # ------------------------------------------------------------------------------- scan

    @property
    def scanned(self) -> bool:
        return self._scan is not None

    @property
    def scan_result(self) -> ScanResult | None:
        return self._scan

    @property
    def frames(self) -> list[FrameInfo]:
        """Usable frames (valid WCS), in scan order; ``[]`` before :meth:`scan`."""
        return [] if self._scan is None else self._scan.frames

    @property
    def unusable(self) -> list[ExcludedFrame]:
        """Files that cannot be used (unreadable, no WCS) with their reason keys."""
        return [] if self._scan is None else self._scan.unusable

    @property
    def canvas(self) -> Canvas | None:
        return None if self._scan is None else self._scan.canvas

    @property
    def footprints(self) -> list[np.ndarray]:
        """Per frame, its outline on the canvas as (K, 2) pixel (x, y)."""
        return [] if self._scan is None else self._scan.footprints

    @property
    def groups(self) -> list[int] | None:
        return None if self._scan is None else self._scan.groups

    @property
    def distances_deg(self) -> np.ndarray:
        return np.zeros(0) if self._scan is None else self._scan.distances_deg

    def iter_scan(self) -> Generator[Event, None, ScanResult]:
        """Header pass over the input folder (no pixels read, no viewer touched); yields events."""
        from .engine.canvas import build_canvas, footprint_polygon
        from .engine.pipeline import ingest

        reporter = Reporter()
        ingested = yield from ingest(self.input_dir, self.output_dir, self.config, reporter)
        frames = list(ingested.usable)
        canvas = None
        footprints: list[np.ndarray] = []
        centres = np.zeros((len(frames), 2))
        distances = np.zeros(len(frames))
        if frames:
            canvas = build_canvas(
                [info.wcs for info in frames],
                [info.shape for info in frames],
                pixel_scale_arcsec=float(self.config["canvas_pixel_scale_arcsec"]),
                padding_pct=float(self.config["canvas_padding_pct"]),
            )
            footprints = [footprint_polygon(info.wcs, info.shape, canvas.wcs) for info in frames]
            centres = np.array([info.centre for info in frames], dtype=np.float64)
            height, width = canvas.shape
            ra0, dec0 = canvas.wcs.all_pix2world([[(width - 1) / 2.0, (height - 1) / 2.0]], 0)[0]
            distances = angular_distance_deg(centres[:, 0], centres[:, 1], float(ra0), float(dec0))
        return ScanResult(
            frames=frames,
            unusable=list(ingested.excluded),
            canvas=canvas,
            footprints=footprints,
            centres=centres,
            distances_deg=distances,
            groups=_pointing_groups(frames, self.config),
            messages=list(reporter.log_events),
        )

    def apply_scan(self, scan: ScanResult) -> None:
        """Adopt a scan's result: every usable frame included, earlier SDS preview dropped."""
        self._scan = scan
        self.included = np.ones(len(scan.frames), dtype=bool)
        self.sds = None
        self._notify("selection")
        self._notify("sds")

    def scan(self, on_event: Callable[[Event], None] | None = None) -> list[FrameInfo]:
        """Scan the input folder; with a viewer, the ``frames`` layer shows the footprints."""
        self.apply_scan(drain(self.iter_scan(), on_event))
        if self.viewer is not None:
            self.show_frames()
        return self.frames

    def _require_scan(self) -> ScanResult:
        if self._scan is None:
            self.scan()
        assert self._scan is not None
        return self._scan

    # -------------------------------------------------------------------------- selection

    @property
    def metric_names(self) -> list[str]:
        """Names of the per-frame quality metrics the engine provided (none before it does)."""
        names: list[str] = []
        for info in self.frames:
            for name in (getattr(info, "metrics", None) or {}):
                if name not in names:
                    names.append(name)
        return names

    def metric_values(self, name: str) -> np.ndarray:
        return np.array(
            [float((getattr(info, "metrics", None) or {}).get(name, np.nan)) for info in self.frames], dtype=np.float64
        )

    @property
    def instruments(self) -> list[str]:
        return sorted({info.instrument or "" for info in self.frames})

    def select(
        self,
        indices: Iterable[int] = (),
        *,
        paths: Iterable[str | Path] = (),
        instruments: Iterable[str] = (),
        farther_than_deg: float | None = None,
        metric: str | None = None,
        below: float | None = None,
        above: float | None = None,
        where: Callable[[FrameInfo], bool] | None = None,
    ) -> np.ndarray:
        """Boolean mask over :attr:`frames`: the union of every selector given.

        ``farther_than_deg``: frame centres farther than this (great-circle, so RA steps
        count with cos δ) from the mosaic centre. ``metric`` with ``below``/``above``:
        frames whose metric is below / above the threshold.
        """
        scan = self._require_scan()
        count = len(scan.frames)
        mask = np.zeros(count, dtype=bool)
        for index in indices:
            if not 0 <= int(index) < count:
                raise IndexError(f"frame index {index} out of range (0..{count - 1})")
            mask[int(index)] = True
        wanted_paths = {str(Path(p).expanduser().resolve()) for p in paths}
        wanted_instruments = set(instruments)
        for i, info in enumerate(scan.frames):
            if str(Path(info.path).resolve()) in wanted_paths or (info.instrument or "") in wanted_instruments:
                mask[i] = True
            elif where is not None and where(info):
                mask[i] = True
        if farther_than_deg is not None:
            mask |= scan.distances_deg > float(farther_than_deg)
        if metric is not None:
            values = self.metric_values(metric)
            with np.errstate(invalid="ignore"):
                if below is not None:
                    mask |= values < float(below)
                if above is not None:
                    mask |= values > float(above)
        return mask

    def exclude(self, indices: Iterable[int] = (), **selectors: Any) -> list[int]:
        """Exclude frames (see :meth:`select` for the selectors); returns the newly excluded indices."""
        mask = self.select(indices, **selectors)
        changed = np.flatnonzero(mask & self.included)
        self.included[mask] = False
        self._selection_changed()
        return changed.tolist()

    def include(self, indices: Iterable[int] = (), **selectors: Any) -> list[int]:
        """Include frames again (see :meth:`select`); returns the newly included indices."""
        mask = self.select(indices, **selectors)
        changed = np.flatnonzero(mask & ~self.included)
        self.included[mask] = True
        self._selection_changed()
        return changed.tolist()

    def include_all(self) -> None:
        self._require_scan()
        self.included[:] = True
        self._selection_changed()

    def _selection_changed(self) -> None:
        # Batches (and a preplan made from them) were built on the previous selection.
        self.sds = None
        if self.config.get("preplan_master_groups"):
            self.config = validate_config({**self.config, "preplan_master_groups": []})
        if self.viewer is not None:
            from ._widgets import layers

            layers.update_frames_inclusion(self.viewer, self.included)
        self._notify("selection")
        self._notify("sds")

    @property
    def included_indices(self) -> list[int]:
        return np.flatnonzero(self.included).tolist()

    @property
    def included_paths(self) -> list[str]:
        return [str(self.frames[i].path) for i in self.included_indices]

    def frame_table(self) -> list[dict[str, Any]]:
        """One row per file (usable frames first, then unusable ones), as shown and exported."""
        rows: list[dict[str, Any]] = []
        groups = self.groups
        metric_names = self.metric_names
        for i, info in enumerate(self.frames):
            centre = self._scan.centres[i] if self._scan is not None else (np.nan, np.nan)
            row: dict[str, Any] = {
                "file": Path(info.path).name,
                "path": str(info.path),
                "instrument": info.instrument or "",
                "wcs_status": info.wcs_status,
                "ra_deg": round(float(centre[0]), 6),
                "dec_deg": round(float(centre[1]), 6),
                "distance_deg": round(float(self.distances_deg[i]), 4),
            }
            metrics = getattr(info, "metrics", None) or {}
            for name in metric_names:
                row[name] = metrics.get(name)
            row["group"] = None if groups is None else int(groups[i])
            row["included"] = bool(self.included[i])
            row["reason_key"] = ""
            row["detail"] = ""
            rows.append(row)
        for excluded in self.unusable:
            rows.append(
                {
                    "file": Path(excluded.path).name,
                    "path": excluded.path,
                    "instrument": "",
                    "wcs_status": "unusable",
                    "ra_deg": None,
                    "dec_deg": None,
                    "distance_deg": None,
                    **{name: None for name in metric_names},
                    "group": None,
                    "included": False,
                    "reason_key": excluded.reason_key,
                    "detail": excluded.detail,
                }
            )
        return rows

    def export_csv(self, path: str | Path) -> Path:
        """Write :meth:`frame_table` as CSV (UTF-8, header row); returns the path."""
        rows = self.frame_table()
        target = Path(path).expanduser()
        columns = list(rows[0]) if rows else ["file", "path", "included"]
        with target.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: "" if value is None else value for key, value in row.items()})
        return target

    def show_frames(self, viewer: Any = None) -> Any:
        """Add (or refresh) the ``frames`` Shapes layer; returns it."""
        from ._widgets import layers

        viewer = viewer if viewer is not None else self._viewer()
        scan = self._require_scan()
        return layers.show_frames(viewer, layers.prepare_frames_display(scan, self.included))

    # -------------------------------------------------------------------------------- SDS

    def sds_parameters(
        self,
        coverage_threshold: float | None = None,
        min_batch_size: int | None = None,
        target_batch_size: int | None = None,
    ) -> tuple[float, int, int]:
        """The SDS policy values: those given, else the config's (validated like the config)."""
        overrides: dict[str, Any] = {}
        if coverage_threshold is not None:
            overrides["sds_coverage_threshold"] = coverage_threshold
        if min_batch_size is not None:
            overrides["sds_min_batch_size"] = min_batch_size
        if target_batch_size is not None:
            overrides["sds_target_batch_size"] = target_batch_size
        config = apply_overrides(self.config, overrides)
        return (
            float(config["sds_coverage_threshold"]),
            int(config["sds_min_batch_size"]),
            int(config["sds_target_batch_size"]),
        )

    def compute_sds(
        self,
        coverage_threshold: float | None = None,
        min_batch_size: int | None = None,
        target_batch_size: int | None = None,
        *,
        with_display: bool = False,
        scan: ScanResult | None = None,
    ) -> SDSPreview:
        """Run the engine's SDS batch policy on the included frames (no viewer access).

        ``scan``: a scan not applied yet (a worker's), taken with every frame included.
        """
        from .engine.sds import build_sds_batches

        included = self.included if scan is None else np.ones(len(scan.frames), dtype=bool)
        scan = scan if scan is not None else self._require_scan()
        threshold, min_size, target_size = self.sds_parameters(coverage_threshold, min_batch_size, target_batch_size)
        chosen = np.flatnonzero(included).tolist()
        if not chosen or scan.canvas is None:
            from .engine.context import UserError

            raise UserError("sds_preview_error_no_frames")
        plan = build_sds_batches(
            [scan.frames[i] for i in chosen], scan.canvas, threshold, min_size, target_size
        )
        batches = [[chosen[int(j)] for j in batch] for batch in plan.batches]
        fractions = [float(f) for f in plan.coverage]
        display = None
        if with_display:
            from ._widgets.layers import prepare_sds_display

            display = prepare_sds_display(batches, scan.footprints, scan.canvas, included, fractions)
        return SDSPreview(batches, fractions, threshold, min_size, target_size, display)

    def preview_sds(
        self,
        coverage_threshold: float | None = None,
        min_batch_size: int | None = None,
        target_batch_size: int | None = None,
    ) -> list[list[int]]:
        """SDS batches (lists of indices into :attr:`frames`); with a viewer, the batch layers appear."""
        self.apply_sds(
            self.compute_sds(coverage_threshold, min_batch_size, target_batch_size, with_display=self.viewer is not None)
        )
        if self.viewer is not None:
            self.show_sds()
        return self.sds.batches  # type: ignore[union-attr]

    def apply_sds(self, preview: SDSPreview) -> None:
        """Adopt an SDS preview (computed by :meth:`compute_sds`, possibly in a worker)."""
        self.sds = preview
        self._notify("sds")

    def show_sds(self, viewer: Any = None, selected: int = 0) -> list[Any]:
        from ._widgets import layers

        if self.sds is None:
            raise RuntimeError("preview_sds() first")
        viewer = viewer if viewer is not None else self._viewer()
        if self.sds.display is None:
            scan = self._require_scan()
            self.sds.display = layers.prepare_sds_display(
                self.sds.batches, scan.footprints, scan.canvas, self.included, self.sds.coverage_fractions
            )
        return layers.show_sds(viewer, self.sds.display, selected=selected, language=self.language)

    def use_as_preplan(self) -> list[list[str]]:
        """Hand the previewed SDS batches to the run as ``preplan_master_groups`` (lists of paths)."""
        if self.sds is None:
            raise RuntimeError("preview_sds() first")
        groups = [[str(self.frames[i].path) for i in batch] for batch in self.sds.batches]
        self.config = validate_config({**self.config, "preplan_master_groups": groups})
        self._notify("sds")
        return groups

    @property
    def preplan(self) -> list[list[str]]:
        """The ``preplan_master_groups`` the next run will use (``[]``: none)."""
        return list(self.config.get("preplan_master_groups") or [])

    # -------------------------------------------------------------------------------- run

    def run_config(self, workflow: str = "auto", gpu: str = "auto", **overrides: Any) -> dict[str, Any]:
        """The session config with the run's workflow, GPU mode and option overrides applied."""
        changes: dict[str, Any] = dict(overrides)
        changes["workflow"] = workflow.replace("-", "_")
        changes.update(gpu_overrides(gpu))
        return apply_overrides(self.config, changes)

    def iter_run(
        self,
        output_dir: str | Path | None = None,
        workflow: str = "auto",
        gpu: str = "auto",
        *,
        cancel_event: threading.Event | None = None,
        **overrides: Any,
    ) -> Generator[Event, None, MosaicResult]:
        """The engine run on the included frames (all frames when not scanned); yields events."""
        from .engine.pipeline import iter_run

        target = Path(output_dir).expanduser().resolve() if output_dir is not None else self.output_dir
        if target is None:
            from .engine.context import UserError

            raise UserError("run_error_no_output_dir")
        config = self.run_config(workflow, gpu, **overrides)
        include = self.included_paths if self.scanned else None
        result = yield from iter_run(self.input_dir, target, config, include=include, cancel_event=cancel_event)
        self.result = result
        return result

    def run(
        self,
        output_dir: str | Path | None = None,
        workflow: str = "auto",
        gpu: str = "auto",
        *,
        on_event: Callable[[Event], None] | None = None,
        cancel_event: threading.Event | None = None,
        **overrides: Any,
    ) -> MosaicResult:
        """Run the mosaic (blocking); with a viewer, ``mosaic``/``alpha``/``coverage`` appear."""
        result = drain(
            self.iter_run(output_dir, workflow, gpu, cancel_event=cancel_event, **overrides), on_event
        )
        if self.viewer is not None:
            show(result, self.viewer)
        return result

    def _viewer(self) -> Any:
        if self.viewer is None:
            raise RuntimeError("this session has no viewer")
        return self.viewer


def _pointing_groups(frames: Sequence[FrameInfo], config: dict[str, Any]) -> list[int] | None:
    """Pointing group per frame from the engine's grouping, when that module exists."""
    try:
        from .engine.grouping import group_frames  # type: ignore[import-not-found]
    except ImportError:
        return None
    if not frames:
        return []
    groups = group_frames(list(frames), config)
    labels = [0] * len(frames)
    if groups and isinstance(groups[0], (list, tuple)):
        for number, members in enumerate(groups):
            for index in members:
                labels[int(index)] = number
        return labels
    return [int(g) for g in groups]


def show(result: MosaicResult | str | Path, viewer: Any = None) -> list[Any]:
    """Add ``mosaic`` (stretched RGB display copy), ``alpha`` and ``coverage`` layers to ``viewer``.

    ``result`` is a :class:`MosaicResult` or the path of a ``*_science.fits`` file.
    Without a viewer, the current napari viewer is used (a new one if there is none).
    """
    from ._widgets import layers

    if viewer is None:
        import napari

        viewer = napari.current_viewer() or napari.Viewer()
    if isinstance(result, (str, Path)):
        result = layers.result_from_science_fits(Path(result))
    display = layers.prepare_mosaic_display(result, layers.max_texture_size())
    return layers.show_mosaic(viewer, display)

"""*Frame filter* dock widget: scan a folder, see every frame, choose which ones to use.

Scanning (headers only; plate solving and quality metrics when the engine provides
them) runs in a thread worker with a progress bar. The table lists every file
(name, instrument, WCS/solve status, distance from the mosaic centre, metrics,
pointing group, included); the ``frames`` Shapes layer shows the footprints on the
canvas. Frames are excluded or included again by selecting rows or shapes, by
distance from the centre, by instrument or by a metric threshold. The inclusion set
lives on the viewer's session, which the SDS preview and the run use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton, Table

from ..events import LogEvent, ProgressEvent
from ..i18n import tr
from . import EngineWidget, Outcome, guarded, notify, start_worker
from .layers import selected_frames

PROGRESS_STEPS = 1000


def _row(*widgets: Any) -> Container:
    return Container(widgets=list(widgets), layout="horizontal", labels=False)


class FrameFilterWidget(EngineWidget):
    """Dock widget: input folder, scan, frames table and selection tools, CSV export."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        warning = self.config_warning
        t = self._t

        self.input_dir = FileEdit(mode="d", label=t("widget_input_folder"), tooltip=t("widget_input_folder_tip"))
        self.scan_button = PushButton(text=t("filter_scan"), tooltip=t("filter_scan_tip"))
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0, label=t("widget_progress"))
        self.status = Label(value="", label=t("widget_status"))
        self.table = Table(label=t("filter_table"), tooltip=t("filter_table_tip"))
        self.exclude_selected = PushButton(text=t("filter_exclude_selected"), tooltip=t("filter_exclude_selected_tip"))
        self.include_selected = PushButton(text=t("filter_include_selected"), tooltip=t("filter_include_selected_tip"))
        self.include_all_button = PushButton(text=t("filter_include_all"), tooltip=t("filter_include_all_tip"))
        self.distance = FloatSpinBox(
            value=1.0, min=0.0, max=180.0, step=0.05, label=t("filter_distance"), tooltip=t("filter_distance_tip")
        )
        self.exclude_farther = PushButton(text=t("filter_exclude_farther"), tooltip=t("filter_exclude_farther_tip"))
        self.instrument = ComboBox(choices=[], label=t("filter_instrument"), tooltip=t("filter_instrument_tip"))
        self.exclude_instrument = PushButton(text=t("filter_exclude_instrument"), tooltip=t("filter_instrument_tip"))
        self.metric = ComboBox(choices=[], label=t("filter_metric"), tooltip=t("filter_metric_tip"))
        self.metric_side = ComboBox(
            choices=[(t("filter_below"), "below"), (t("filter_above"), "above")], label=t("filter_metric_side")
        )
        self.metric_threshold = FloatSpinBox(
            value=0.0, min=-1e12, max=1e12, step=0.1, label=t("filter_metric_threshold"), tooltip=t("filter_metric_tip")
        )
        self.exclude_metric = PushButton(text=t("filter_exclude_metric"), tooltip=t("filter_metric_tip"))
        self.csv_path = FileEdit(mode="w", filter="*.csv", label=t("filter_csv_path"), tooltip=t("filter_export_csv_tip"))
        self.export_button = PushButton(text=t("filter_export_csv"), tooltip=t("filter_export_csv_tip"))
        self.summary = Label(value=t("filter_summary_none"), label=t("filter_summary"))

        self.input_dir.choose_btn.text = t("widget_choose_folder")
        self.csv_path.choose_btn.text = t("widget_choose_file")
        self.extend(
            [
                self.input_dir,
                self.scan_button,
                self.progress,
                self.status,
                self.table,
                _row(self.exclude_selected, self.include_selected, self.include_all_button),
                self.distance,
                self.exclude_farther,
                self.instrument,
                self.exclude_instrument,
                self.metric,
                self.metric_side,
                self.metric_threshold,
                self.exclude_metric,
                self.csv_path,
                self.export_button,
                self.summary,
            ]
        )
        self._configure_table()
        self.scan_button.changed.connect(self.start_scan)
        self.exclude_selected.changed.connect(lambda: self._apply_selected(exclude=True))
        self.include_selected.changed.connect(lambda: self._apply_selected(exclude=False))
        self.include_all_button.changed.connect(self._include_all)
        self.exclude_farther.changed.connect(self._exclude_farther)
        self.exclude_instrument.changed.connect(self._exclude_instrument)
        self.exclude_metric.changed.connect(self._exclude_metric)
        self.export_button.changed.connect(self.export_csv)
        self._state.session_changed.connect(self._on_session_changed)
        self._state.selection_changed.connect(self.refresh)
        self._tool_widgets = [
            self.exclude_selected, self.include_selected, self.include_all_button, self.exclude_farther,
            self.exclude_instrument, self.exclude_metric, self.export_button,
        ]  # fmt: skip
        if self._state.session is not None:
            self._on_session_changed(self._state.session)
        else:
            self.refresh()
        if warning:
            self.status.value = warning

    def _configure_table(self) -> None:
        from qtpy.QtWidgets import QAbstractItemView

        native = self.table.native
        native.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        native.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        native.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        native.setMinimumHeight(180)

    # ------------------------------------------------------------------------------ scan

    @property
    def session(self) -> Any:
        return self._state.session

    def start_scan(self) -> Any:
        """Scan the chosen folder in a thread worker; returns the worker."""
        folder = Path(str(self.input_dir.value or "")).expanduser()
        if not str(self.input_dir.value or "").strip() or not folder.is_dir():
            notify(Outcome("user_error", key="input_error_missing", params={"path": str(folder)}), self.language)
            return None
        session = self._state.session_for(folder, self.config)
        self._set_busy(True)
        self.status.value = self._t("filter_scanning", path=str(folder))
        self.worker = start_worker(
            guarded, session.iter_scan, on_yield=self._on_event, on_done=lambda outcome: self._on_scanned(session, outcome)
        )
        return self.worker

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ProgressEvent):
            self.progress.value = int(round(event.fraction * PROGRESS_STEPS))
            if event.key:
                self.status.value = tr(event.key, self.language, done=event.done, total=event.total, **event.params)
        elif isinstance(event, LogEvent) and event.level in ("warning", "error"):
            self.status.value = event.text(self.language)

    def _on_scanned(self, session: Any, outcome: Outcome) -> None:
        self.worker = None
        self._set_busy(False)
        if not outcome.ok:
            self.status.value = outcome.message(self.language)
            notify(outcome, self.language)
            return
        if session is not self._state.session:  # the folder changed while scanning
            return
        session.apply_scan(outcome.value)
        session.show_frames(self._viewer)
        self.progress.value = PROGRESS_STEPS
        self.status.value = self._t(
            "filter_scan_done", frames=len(session.frames), unusable=len(session.unusable)
        )

    def _set_busy(self, busy: bool) -> None:
        for widget in (self.input_dir, self.scan_button, *self._tool_widgets):
            widget.enabled = not busy
        if busy:
            self.progress.value = 0

    def _on_session_changed(self, session: Any) -> None:
        if Path(str(self.input_dir.value or "")).expanduser().resolve() != session.input_dir:
            self.input_dir.value = str(session.input_dir)
        self.refresh()

    # ------------------------------------------------------------------------- selection

    def refresh(self) -> None:
        """Table, choice lists and summary from the session."""
        session = self.session
        if session is None or not session.scanned:
            self.table.value = []
            self.summary.value = self._t("filter_summary_none")
            return
        rows = session.frame_table()
        yes, no = self._t("filter_yes"), self._t("filter_no")
        headers = {
            "file": self._t("filter_col_file"),
            "instrument": self._t("filter_col_instrument"),
            "wcs_status": self._t("filter_col_wcs"),
            "distance_deg": self._t("filter_col_distance"),
            "group": self._t("filter_col_group"),
            "included": self._t("filter_col_included"),
        }
        shown = ["file", "instrument", "wcs_status", "distance_deg", *session.metric_names, "group", "included"]
        records = []
        for row in rows:
            record = {}
            for key in shown:
                value = row.get(key)
                if key == "included":
                    value = yes if value else no
                elif key == "wcs_status":
                    value = self._status_text(row)
                record[headers.get(key, self._metric_label(key))] = "" if value is None else value
            records.append(record)
        self.table.value = records
        self.instrument.choices = [(name or self._t("filter_unknown_instrument"), name) for name in session.instruments]
        self.metric.choices = [(self._metric_label(name), name) for name in session.metric_names]
        self.summary.value = self._t(
            "filter_summary_text",
            included=int(session.included.sum()),
            frames=len(session.frames),
            unusable=len(session.unusable),
        )

    def _status_text(self, row: dict[str, Any]) -> str:
        if row.get("reason_key"):  # an unusable file: the engine's reason, in full
            return tr(row["reason_key"], self.language, path=row["file"], detail=row.get("detail", ""))
        key = f"wcs_status_{row['wcs_status']}"
        text = tr(key, self.language)
        return str(row["wcs_status"]) if text == key else text

    def _metric_label(self, name: str) -> str:
        key = f"metric_{name}"
        text = tr(key, self.language)
        return name if text == key else text

    def selected_rows(self) -> list[int]:
        """Frame indices of the selected table rows (unusable files, listed last, are ignored)."""
        session = self.session
        count = len(session.frames) if session is not None else 0
        rows = {index.row() for index in self.table.native.selectionModel().selectedRows()}
        return sorted(row for row in rows if row < count)

    def _apply_selected(self, exclude: bool) -> None:
        session = self.session
        if session is None or not session.scanned:
            return
        chosen = sorted(set(self.selected_rows()) | set(selected_frames(self._viewer)))
        if not chosen:
            self.status.value = self._t("filter_nothing_selected")
            return
        changed = session.exclude(chosen) if exclude else session.include(chosen)
        self.status.value = self._t("filter_excluded" if exclude else "filter_included", count=len(changed))

    def _include_all(self) -> None:
        if self.session is not None and self.session.scanned:
            self.session.include_all()

    def _exclude_farther(self) -> None:
        if self.session is not None and self.session.scanned:
            changed = self.session.exclude(farther_than_deg=float(self.distance.value))
            self.status.value = self._t("filter_excluded", count=len(changed))

    def _exclude_instrument(self) -> None:
        if self.session is not None and self.session.scanned and self.instrument.value is not None:
            changed = self.session.exclude(instruments=[self.instrument.value])
            self.status.value = self._t("filter_excluded", count=len(changed))

    def _exclude_metric(self) -> None:
        if self.session is None or not self.session.scanned or not self.metric.value:
            self.status.value = self._t("filter_no_metrics")
            return
        side = {str(self.metric_side.value): float(self.metric_threshold.value)}
        changed = self.session.exclude(metric=self.metric.value, **side)
        self.status.value = self._t("filter_excluded", count=len(changed))

    def export_csv(self) -> Path | None:
        session = self.session
        target = str(self.csv_path.value or "").strip()
        if session is None or not session.scanned or not target or target == ".":
            self.status.value = self._t("filter_export_nothing")
            return None
        path = Path(target)
        if path.suffix.lower() != ".csv":
            path = path.with_suffix(".csv")
        try:
            written = session.export_csv(path)
        except OSError as exc:
            notify(Outcome("user_error", key="output_error_unwritable", params={"path": str(path), "detail": str(exc)}))
            return None
        self.status.value = self._t("filter_exported", path=str(written))
        return written

"""*SDS preview* dock widget: the ZeSupaDupStack batches the run would build, as layers.

The controls start from the config (``sds_coverage_threshold``, ``sds_min_batch_size``,
``sds_target_batch_size``). *Preview* runs the engine's SDS batch helper on the
frames included in the Frame filter (scanning first if needed) in a thread worker,
with the coverage grids computed there too; the main thread only adds the layers:
``SDS batches`` (one outline per batch, labelled with its size and coverage), one
``SDS batch N coverage`` image per batch (only the selected one visible) and the total
``coverage``. *Use as preplan* hands the batches to the run as
``preplan_master_groups``.
"""

from __future__ import annotations

from typing import Any

from magicgui.widgets import FloatSpinBox, Label, ProgressBar, PushButton, SpinBox

from . import EngineWidget, Outcome, guarded_call, notify, start_worker
from .layers import select_sds_batch


class SDSPreviewWidget(EngineWidget):
    """Dock widget: SDS policy controls, Preview, batch selector, summary, Use as preplan."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        warning = self.config_warning
        t = self._t

        self.coverage_threshold = FloatSpinBox(
            value=float(self.config["sds_coverage_threshold"]), min=0.0, max=1.0, step=0.01,
            label=t("sds_coverage_threshold"), tooltip=t("sds_coverage_threshold_tip"),
        )  # fmt: skip
        self.min_batch_size = SpinBox(
            value=int(self.config["sds_min_batch_size"]), min=1, max=100_000,
            label=t("sds_min_batch_size"), tooltip=t("sds_min_batch_size_tip"),
        )  # fmt: skip
        self.target_batch_size = SpinBox(
            value=int(self.config["sds_target_batch_size"]), min=1, max=100_000,
            label=t("sds_target_batch_size"), tooltip=t("sds_target_batch_size_tip"),
        )  # fmt: skip
        self.preview_button = PushButton(text=t("sds_preview_button"), tooltip=t("sds_preview_button_tip"))
        self.progress = ProgressBar(min=0, max=0, value=0, label=t("widget_progress"), visible=False)
        self.batch = SpinBox(value=1, min=1, max=1, label=t("sds_batch_selector"), tooltip=t("sds_batch_selector_tip"))
        self.summary = Label(value=t("sds_summary_none"), label=t("sds_summary"))
        self.preplan_button = PushButton(text=t("sds_use_preplan"), tooltip=t("sds_use_preplan_tip"), enabled=False)
        self.preplan_status = Label(value="", label=t("sds_preplan"))
        self.extend(
            [
                self.coverage_threshold,
                self.min_batch_size,
                self.target_batch_size,
                self.preview_button,
                self.progress,
                self.batch,
                self.summary,
                self.preplan_button,
                self.preplan_status,
            ]
        )
        self.preview_button.changed.connect(self.start_preview)
        self.batch.changed.connect(self._on_batch_selected)
        self.preplan_button.changed.connect(self.use_as_preplan)
        self._state.sds_changed.connect(self._refresh)
        self._state.session_changed.connect(lambda _session: self._refresh())
        self._refresh()
        if warning:
            self.summary.value = warning

    @property
    def session(self) -> Any:
        return self._state.session

    def start_preview(self) -> Any:
        """Build the SDS batches in a thread worker; returns the worker."""
        session = self.session
        if session is None:
            notify(Outcome("user_error", key="sds_preview_error_no_session"), self.language)
            return None
        parameters = (
            float(self.coverage_threshold.value), int(self.min_batch_size.value), int(self.target_batch_size.value)
        )
        self._set_busy(True)
        self.worker = start_worker(
            guarded_call, _scan_and_compute, session, parameters, on_done=lambda outcome: self._on_done(session, outcome)
        )
        return self.worker

    def _on_done(self, session: Any, outcome: Outcome) -> None:
        self.worker = None
        self._set_busy(False)
        if not outcome.ok:
            self.summary.value = outcome.message(self.language)
            notify(outcome, self.language)
            return
        scan, preview = outcome.value
        if session is not self.session:
            return
        if scan is not None:  # the preview had to scan first: show the frames as the filter would
            session.apply_scan(scan)
            session.show_frames(self._viewer)
        session.apply_sds(preview)
        self.batch.max = max(1, len(preview.batches))
        self.batch.value = 1
        session.show_sds(self._viewer, selected=0)
        self._refresh()

    def _set_busy(self, busy: bool) -> None:
        for widget in (self.coverage_threshold, self.min_batch_size, self.target_batch_size, self.preview_button):
            widget.enabled = not busy
        self.progress.visible = busy

    def _on_batch_selected(self, value: int) -> None:
        select_sds_batch(self._viewer, int(value) - 1)

    def _refresh(self) -> None:
        session = self.session
        preview = None if session is None else session.sds
        self.preplan_button.enabled = preview is not None
        self.summary.value = self._t("sds_summary_none") if preview is None else preview.summary(self.language)
        groups = [] if session is None else session.preplan
        self.preplan_status.value = (
            self._t("sds_preplan_set", count=len(groups)) if groups else self._t("sds_preplan_none")
        )

    def use_as_preplan(self) -> list[list[str]]:
        session = self.session
        if session is None or session.sds is None:
            return []
        return session.use_as_preplan()


def _scan_and_compute(session: Any, parameters: tuple[float, int, int]) -> tuple[Any, Any]:
    """Worker body: scan when the session was not scanned yet, then the SDS plan and its grids.

    The scan result is returned rather than applied, so the session changes on the main thread.
    """
    from ..api import drain

    scan = None if session.scanned else drain(session.iter_scan())
    return scan, session.compute_sds(*parameters, with_display=True, scan=scan)

"""*Run mosaic* dock widget: the whole pipeline in a thread worker, with progress and log.

*Start* runs :meth:`~napari_zemosaic.api.Session.iter_run` (the engine's ``iter_run``
on the frames included in the Frame filter, with the SDS preplan when one was set) in
a napari thread worker. Each engine event comes back to the main thread through the
worker's ``yielded`` signal: progress bar, phase label, ETA of the phase, localised
log lines. The display copies (stretch, pyramids) are computed in the worker too, so
the main thread only adds the ``mosaic``/``alpha``/``coverage`` layers at the end, one
short step per event-loop turn (napari's own cost of inserting an image layer, ~0.1 s,
is the longest the UI waits). Opening the widget pays napari's one-time first-image
costs (unit registry, GL limits) so they do not land at the end of a run.

*Cancel* sets the run's cancel event: the engine stops at its next checkpoint, and
at the latest the worker closes the engine generator after the next event. Either way
the run report says ``cancelled`` and no final science file is written (outputs are
renamed into place only when complete). Controls are disabled while a run is going.
Errors arrive as napari notifications with the localised message.

*Scheduler* is the CLI's ``--scheduler``: this process, a local Dask cluster of worker
processes, or the address of a running cluster (engine/distributed.py). Without the
``distributed`` extra its tooltip, and the log when it is chosen, say how to install it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Generator

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, ProgressBar, PushButton

from ..config import OPTIONS
from ..events import LogEvent, ProgressEvent
from ..i18n import tr
from . import EngineWidget, Outcome, guarded, notify, start_worker
from .layers import max_texture_size, prepare_mosaic_display, show_mosaic_steps, warm_up

PROGRESS_STEPS = 1000
WORKFLOWS = ("auto", "classic", "mosaic_first", "sds")
GPU_MODES = ("auto", "on", "off")
#: Where the work units run (config ``scheduler``): this process, a local Dask cluster, a cluster's address.
SCHEDULERS = ("none", "local", "address")
#: Stacking options offered in the widget (the rest stays in the config file).
STACKING_CHOICES = (
    "stacking_normalize_method", "stacking_weighting_method", "stacking_rejection_algorithm", "stacking_final_combine",
)  # fmt: skip
LOG_LEVELS_SHOWN = ("info", "warning", "error")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunMosaicWidget(EngineWidget):
    """Dock widget: folders, workflow, GPU, stacking options; Start/Cancel; progress, ETA, log."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        warning = self.config_warning
        t = self._t
        self.cancel_event: threading.Event | None = None
        self.last_outcome: Outcome | None = None
        self._phase = ""
        self._phase_started = 0.0

        self.input_dir = FileEdit(mode="d", label=t("widget_input_folder"), tooltip=t("widget_input_folder_tip"))
        self.output_dir = FileEdit(mode="d", label=t("run_output_folder"), tooltip=t("run_output_folder_tip"))
        self.workflow = ComboBox(
            choices=[(t(f"run_workflow_{name}"), name) for name in WORKFLOWS],
            value=self.config["workflow"],
            label=t("run_workflow"),
            tooltip=t("run_workflow_tip"),
        )
        self.gpu = ComboBox(
            choices=[(t(f"run_gpu_{name}"), name) for name in GPU_MODES], value="auto", label=t("run_gpu"),
            tooltip=t("run_gpu_tip"),
        )  # fmt: skip
        self.scheduler, self.scheduler_address = self._scheduler_widgets()
        self.stacking: dict[str, Any] = {}
        for key in STACKING_CHOICES:
            self.stacking[key] = ComboBox(
                choices=[(self._choice_label(key, choice), choice) for choice in OPTIONS[key].choices],
                value=self.config[key],
                label=t(f"run_option_{key}"),
                tooltip=t(f"run_option_{key}_tip"),
            )
        for key in ("stacking_kappa_low", "stacking_kappa_high"):
            self.stacking[key] = FloatSpinBox(
                value=float(self.config[key]), min=0.1, max=20.0, step=0.1,
                label=t(f"run_option_{key}"), tooltip=t(f"run_option_{key}_tip"),
            )  # fmt: skip
        self.selection = Label(value="", label=t("run_frames"))
        self.start_button = PushButton(text=t("run_start"), tooltip=t("run_start_tip"))
        self.cancel_button = PushButton(text=t("run_cancel"), tooltip=t("run_cancel_tip"), enabled=False)
        self.progress = ProgressBar(min=0, max=PROGRESS_STEPS, value=0, label=t("widget_progress"))
        self.phase = Label(value=t("run_idle"), label=t("run_phase"))
        self.eta = Label(value="", label=t("run_eta"))
        self.log = _LogPanel(label=t("run_log"), tooltip=t("run_log_tip"))
        for edit in (self.input_dir, self.output_dir):
            edit.choose_btn.text = t("widget_choose_folder")
        self.extend(
            [
                self.input_dir,
                self.output_dir,
                self.workflow,
                self.gpu,
                self.scheduler,
                self.scheduler_address,
                *self.stacking.values(),
                self.selection,
                Container(widgets=[self.start_button, self.cancel_button], layout="horizontal", labels=False),
                self.progress,
                self.phase,
                self.eta,
                self.log,
            ]
        )
        self._controls = [
            self.input_dir, self.output_dir, self.workflow, self.gpu, self.scheduler, self.scheduler_address,
            *self.stacking.values(), self.start_button,
        ]  # fmt: skip
        self.start_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.input_dir.changed.connect(self._update_selection_label)
        self._state.session_changed.connect(self._on_session_changed)
        self._state.selection_changed.connect(self._update_selection_label)
        self._state.sds_changed.connect(self._update_selection_label)
        if self._state.session is not None:
            self._on_session_changed(self._state.session)
        self._update_selection_label()
        if warning:
            self.log.append(warning)
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, warm_up)  # once the dock is shown, not during a run
        QTimer.singleShot(0, self._start_worker_server)

    def _start_worker_server(self) -> None:
        """Start the engine's worker-process server while the form is filled in: it imports the
        engine, and CuPy where the runs will ask for the GPU (1-2 s), which the first run would
        otherwise wait for in its header pass. Runs started later use this server."""
        from ..config import apply_overrides, gpu_mode_overrides
        from ..engine.worker_env import start_process_server, wants_device

        start_process_server(wants_device(apply_overrides(self.config, gpu_mode_overrides(str(self.gpu.value)))))

    def _scheduler_widgets(self) -> tuple[ComboBox, LineEdit]:
        """The scheduler choice (same values as ``--scheduler``) and the address of an existing cluster."""
        from ..engine.distributed import INSTALL_HINT, distributed_available

        t = self._t
        current = str(self.config.get("scheduler", "none"))
        choice = current if current in ("none", "local") else "none" if current == "inline" else "address"
        tooltip = t("run_scheduler_tip")
        if not distributed_available():
            tooltip += "\n" + t("run_scheduler_not_installed", hint=INSTALL_HINT)
        scheduler = ComboBox(
            choices=[(t(f"run_scheduler_{name}"), name) for name in SCHEDULERS], value=choice, label=t("run_scheduler"),
            tooltip=tooltip,
        )  # fmt: skip
        address = LineEdit(
            value=current if choice == "address" else "", label=t("run_scheduler_address_label"),
            tooltip=t("run_scheduler_address_tip"), enabled=choice == "address",
        )  # fmt: skip
        scheduler.changed.connect(self._on_scheduler_changed)
        return scheduler, address

    def _on_scheduler_changed(self, value: str) -> None:
        from ..engine.distributed import INSTALL_HINT, distributed_available

        self.scheduler_address.enabled = value == "address" and not self.running
        if value != "none" and not distributed_available():
            self.log.append(self._t("run_scheduler_not_installed", hint=INSTALL_HINT))

    def scheduler_value(self) -> str:
        """The config value of ``scheduler`` chosen in the widget."""
        choice = str(self.scheduler.value)
        if choice == "address":
            return str(self.scheduler_address.value or "").strip() or "none"
        return choice

    def _choice_label(self, key: str, choice: str) -> str:
        label_key = f"run_choice_{choice}"
        text = tr(label_key, self.language)
        return choice if text == label_key else text

    @property
    def running(self) -> bool:
        return self.worker is not None

    # ---------------------------------------------------------------------- session sync

    def _folder(self, edit: FileEdit) -> Path | None:
        text = str(edit.value or "").strip()
        return Path(text).expanduser().resolve() if text and text != "." else None

    def _on_session_changed(self, session: Any) -> None:
        if self._folder(self.input_dir) != session.input_dir:
            self.input_dir.value = str(session.input_dir)
        if session.output_dir is not None and self._folder(self.output_dir) is None:
            self.output_dir.value = str(session.output_dir)
        self._update_selection_label()

    def _update_selection_label(self, *_: Any) -> None:
        session = self._state.session
        folder = self._folder(self.input_dir)
        if session is not None and session.scanned and session.input_dir == folder:
            text = self._t("run_frames_selected", included=int(session.included.sum()), frames=len(session.frames))
            if session.preplan:
                text += " · " + self._t("sds_preplan_set", count=len(session.preplan))
        else:
            text = self._t("run_frames_all")
        self.selection.value = text

    # ------------------------------------------------------------------------------- run

    def overrides(self) -> dict[str, Any]:
        """The stacking options and the scheduler chosen in the widget, as config overrides."""
        return {**{key: widget.value for key, widget in self.stacking.items()}, "scheduler": self.scheduler_value()}

    def start(self) -> Any:
        """Start a run in a thread worker; returns the worker (``None`` when the inputs are wrong)."""
        if self.running:
            return self.worker
        input_dir, output_dir = self._folder(self.input_dir), self._folder(self.output_dir)
        if input_dir is None or not input_dir.is_dir():
            notify(Outcome("user_error", key="input_error_missing", params={"path": str(input_dir or "")}), self.language)
            return None
        if output_dir is None:
            notify(Outcome("user_error", key="run_error_no_output_dir"), self.language)
            return None
        session = self._state.session_for(input_dir, self.config)
        self.cancel_event = threading.Event()
        self.log.clear()
        self._set_running(True)
        self.worker = start_worker(
            _run_job,
            session,
            output_dir,
            str(self.workflow.value),
            str(self.gpu.value),
            self.overrides(),
            self.cancel_event,
            max_texture_size(),
            on_yield=self._on_event,
            on_done=self._on_done,
        )
        return self.worker

    def cancel(self) -> None:
        """Ask the running job to stop at its next checkpoint."""
        if self.cancel_event is not None and self.running:
            self.cancel_event.set()
            self.cancel_button.enabled = False
            self.phase.value = self._t("run_cancelling")

    def _set_running(self, running: bool) -> None:
        for widget in self._controls:
            widget.enabled = not running
        if not running:
            self.scheduler_address.enabled = self.scheduler.value == "address"
        self.cancel_button.enabled = running
        if running:
            self.progress.value = 0
            self.eta.value = ""
            self._phase = ""

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ProgressEvent):
            now = time.monotonic()
            if event.phase != self._phase:
                self._phase, self._phase_started = event.phase, now
                self.phase.value = self._t(f"phase_{event.phase}")
            fraction = event.fraction
            self.progress.value = int(round(fraction * PROGRESS_STEPS))
            elapsed = now - self._phase_started
            if 0.0 < fraction < 1.0 and elapsed > 0.5:
                self.eta.value = self._t("run_eta_text", eta=format_duration(elapsed * (1.0 - fraction) / fraction))
            elif fraction >= 1.0:
                self.eta.value = ""
        elif isinstance(event, LogEvent) and event.level in LOG_LEVELS_SHOWN:
            self.log.append(f"{self._t(f'log_level_{event.level}')} {event.text(self.language)}")

    def _on_done(self, outcome: Outcome) -> None:
        self.eta.value = ""
        if outcome.ok:
            self.phase.value = self._t("run_showing")
            self._run_steps(show_mosaic_steps(self._viewer, outcome.extra["display"]), lambda: self._finish(outcome))
            return
        self.phase.value = outcome.message(self.language)
        self.log.append(outcome.message(self.language))
        self._finish(outcome)
        notify(outcome, self.language)

    def _run_steps(self, steps: Generator[Any, None, Any], then: Any) -> None:
        """One step per event-loop turn, then ``then()`` (keeps every UI stall short)."""
        from qtpy.QtCore import QTimer

        def step() -> None:
            try:
                next(steps)
            except StopIteration:
                then()
                return
            QTimer.singleShot(0, step)

        QTimer.singleShot(0, step)

    def _finish(self, outcome: Outcome) -> None:
        self.worker = None
        self.last_outcome = outcome
        self._set_running(False)
        if outcome.ok:
            self.progress.value = PROGRESS_STEPS
            self.phase.value = self._t("run_done", path=str(outcome.value.output_dir))


def _run_job(
    session: Any,
    output_dir: Path,
    workflow: str,
    gpu: str,
    overrides: dict[str, Any],
    cancel_event: threading.Event,
    max_side: int,
) -> Generator[Any, None, Outcome]:
    """Worker body: the engine run, then the display copies of its result (both off the UI thread)."""
    outcome = yield from guarded(
        lambda: session.iter_run(output_dir, workflow, gpu, cancel_event=cancel_event, **overrides), cancel_event
    )
    if outcome.ok:
        try:
            outcome.extra["display"] = prepare_mosaic_display(outcome.value, max_side)
        except Exception as exc:  # noqa: BLE001 - reported like any other failure
            from . import _failure

            return _failure(exc)
    return outcome


class _LogPanel(Container):
    """A read-only, append-only log view (QPlainTextEdit: appending is O(line), not O(log))."""

    def __init__(self, **kwargs: Any) -> None:
        from qtpy.QtWidgets import QPlainTextEdit

        super().__init__(labels=False, **kwargs)
        self._text = QPlainTextEdit()
        self._text.setReadOnly(True)
        self._text.setMaximumBlockCount(5000)
        self._text.setMinimumHeight(120)
        self.native.layout().addWidget(self._text)

    def append(self, line: str) -> None:
        self._text.appendPlainText(line)

    def clear(self) -> None:
        self._text.clear()

    @property
    def text(self) -> str:
        return self._text.toPlainText()

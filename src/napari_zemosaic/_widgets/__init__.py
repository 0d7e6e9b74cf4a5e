"""napari dock widgets (Frame filter, SDS preview, Run mosaic) and the layers they draw.

The three widgets of one viewer share one :class:`ViewerState`: the current
:class:`~napari_zemosaic.api.Session` (input folder, scanned frames, inclusion set,
SDS preview and preplan). A console ``Session(..., viewer=viewer)`` becomes that
viewer's session too, so widgets and scripts see the same selection. Widgets only
call the engine through the session; work runs in napari thread workers
(:func:`start_worker`) and comes back as an :class:`Outcome`, so no exception crosses
the thread boundary. Importing this package is cheap: Qt, magicgui and napari are
imported by the widget modules themselves.
"""

from __future__ import annotations

import threading
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator

from psygnal import Signal

from ..i18n import tr

__all__ = ["Outcome", "ViewerState", "guarded", "start_worker", "state_for", "widget_config"]


class ViewerState:
    """Per-viewer state shared by the widgets."""

    session_changed = Signal(object)  # the new Session
    selection_changed = Signal()  # frames scanned, included or excluded
    sds_changed = Signal()  # a new SDS preview (or the old one dropped)

    def __init__(self, viewer: Any) -> None:
        from .layers import unwrap

        self._viewer_ref = weakref.ref(unwrap(viewer))
        self.session: Any = None

    @property
    def viewer(self) -> Any:
        return self._viewer_ref()

    def session_for(self, input_dir: str | Path, config: dict[str, Any] | None = None) -> Any:
        """The session on ``input_dir`` (a new one when the folder changed)."""
        from ..api import Session

        folder = Path(input_dir).expanduser().resolve()
        if self.session is None or self.session.input_dir != folder:
            Session(folder, config=config, viewer=self.viewer)  # registers itself here
        return self.session

    def set_session(self, session: Any) -> None:
        if session is self.session:
            return
        self.session = session
        session.listeners.append(self._on_session_event)
        self.session_changed.emit(session)

    def _on_session_event(self, session: Any, what: str) -> None:
        if session is not self.session:
            return
        if what == "selection":
            self.selection_changed.emit()
        elif what == "sds":
            self.sds_changed.emit()


_STATES: dict[int, tuple[weakref.ref, ViewerState]] = {}


def state_for(viewer: Any) -> ViewerState:
    """The shared state of ``viewer`` (created on first use)."""
    from .layers import unwrap

    target = unwrap(viewer)
    for key, (ref, _state) in list(_STATES.items()):  # forget viewers that are gone
        if ref() is None:
            del _STATES[key]
    entry = _STATES.get(id(target))
    if entry is None or entry[0]() is not target:
        entry = (weakref.ref(target), ViewerState(target))
        _STATES[id(target)] = entry
    return entry[1]


def widget_config() -> tuple[dict[str, Any], str | None]:
    """The user's config for a new widget, and a localised warning when it had to fall back to defaults."""
    from ..config import ConfigError, default_config, load_config, validate_config
    from ..i18n import set_language

    try:
        config, warning = load_config(), None
    except ConfigError as exc:
        config = validate_config(default_config())
        warning = tr(exc.key, config["language"], **exc.params)
    set_language(config["language"])
    return config, warning


@dataclass
class Outcome:
    """How a worker's job ended: ``ok`` (with ``value``), ``cancelled``, ``user_error`` or ``error``."""

    status: str
    value: Any = None
    key: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def message(self, language: str | None = None) -> str:
        return tr(self.key, language, **self.params) if self.key else ""


def _failure(exc: BaseException) -> Outcome:
    from ..config import ConfigError
    from ..engine.context import RunCancelled, UserError

    if isinstance(exc, RunCancelled):
        return Outcome("cancelled", key="run_warn_cancelled")
    if isinstance(exc, (UserError, ConfigError)):
        return Outcome("user_error", key=exc.key, params=dict(exc.params))
    key_params = getattr(exc, "key", None), getattr(exc, "params", None)
    if isinstance(key_params[0], str) and isinstance(key_params[1], dict):  # engine errors that carry a key
        return Outcome("user_error", key=key_params[0], params=dict(key_params[1]))
    return Outcome(
        "error",
        key="run_error_internal",
        params={"error": f"{type(exc).__name__}: {exc}"},
        detail="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


def guarded(
    make_generator: Callable[[], Generator[Any, None, Any]], cancel_event: threading.Event | None = None
) -> Generator[Any, None, Outcome]:
    """Drive an engine generator; yield its events, return an :class:`Outcome` (never raise).

    After each event, a set ``cancel_event`` closes the engine generator right there
    (it then records the run as cancelled), whatever checkpoint it was at.
    """
    try:
        generator = make_generator()
        while True:
            try:
                event = next(generator)
            except StopIteration as stop:
                return Outcome("ok", stop.value)
            yield event
            if cancel_event is not None and cancel_event.is_set():
                generator.close()
                return Outcome("cancelled", key="run_warn_cancelled")
    except Exception as exc:  # noqa: BLE001 - turned into an Outcome for the main thread
        return _failure(exc)


def guarded_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    """Call ``function`` and return an :class:`Outcome` (never raise)."""
    try:
        return Outcome("ok", function(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - turned into an Outcome for the main thread
        return _failure(exc)


def start_worker(
    job: Callable[..., Any],
    *args: Any,
    on_yield: Callable[[Any], None] | None = None,
    on_done: Callable[[Outcome], None],
    **kwargs: Any,
) -> Any:
    """Run ``job`` (a generator function or a function returning an Outcome) in a napari thread worker."""
    from napari.qt.threading import create_worker

    worker = create_worker(job, *args, _start_thread=False, **kwargs)
    if on_yield is not None and hasattr(worker, "yielded"):
        worker.yielded.connect(on_yield)
    worker.returned.connect(on_done)
    # Outcomes carry every failure; an exception here is a bug in the job wrapper itself.
    worker.errored.connect(lambda exc: on_done(_failure(exc)))
    worker.start()
    return worker


def notify(outcome: Outcome, language: str | None = None) -> None:
    """A napari notification with the localised message of a failed or cancelled job."""
    from napari.utils.notifications import show_error, show_warning

    if outcome.status == "cancelled":
        show_warning(outcome.message(language))
    elif outcome.status in ("user_error", "error"):
        show_error(outcome.message(language))


def _container_base() -> type:
    from magicgui.widgets import Container

    return Container


class EngineWidget(_container_base()):  # type: ignore[misc]
    """What the three dock widgets share: the viewer, its session state, the config and language."""

    def __init__(self, napari_viewer: Any) -> None:
        from .layers import unwrap

        super().__init__(labels=True)
        self._viewer = unwrap(napari_viewer)
        self._state = state_for(self._viewer)
        self.config, self.config_warning = widget_config()
        self.language: str = self.config["language"]
        self.worker: Any = None

    def _t(self, key: str, **params: Any) -> str:
        return tr(key, self.language, **params)


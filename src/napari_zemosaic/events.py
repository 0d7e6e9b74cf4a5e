"""Events the engine emits: progress and log records carrying keys, never text.

The engine is a generator of these events; the CLI, the log file, napari widgets
and Dask task callbacks are all consumers (see :class:`Reporter`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .i18n import tr

PHASES = ("P1", "P2", "P3", "P4", "P4.5", "P5", "P6")

LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units finished in ``phase``; ``key`` names the unit kind."""

    phase: str
    done: int
    total: int
    key: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return (self.done / self.total) if self.total else 1.0


@dataclass(frozen=True)
class LogEvent:
    level: str
    key: str
    params: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def text(self, language: str | None = None) -> str:
        return tr(self.key, language, **self.params)


Event = Union[ProgressEvent, LogEvent]
Listener = Callable[[Event], None]


class Reporter:
    """Collects events of one run and fans them out to listeners.

    Engine functions call :meth:`log` / :meth:`progress`; the pipeline generator
    drains :meth:`pop_pending` at each yield so consumers see events in order.
    """

    def __init__(self, listeners: list[Listener] | None = None) -> None:
        self.listeners: list[Listener] = list(listeners or [])
        self._pending: list[Event] = []
        self.log_events: list[LogEvent] = []
        # Worker threads (readers, solvers) log too: the swap in pop_pending must not lose events.
        self._lock = threading.RLock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self._pending.append(event)
            if isinstance(event, LogEvent):
                self.log_events.append(event)
            for listener in self.listeners:
                listener(event)

    def log(self, level: str, key: str, **params: Any) -> LogEvent:
        event = LogEvent(level, key, params)
        self.emit(event)
        return event

    def debug(self, key: str, **params: Any) -> None:
        self.log("debug", key, **params)

    def info(self, key: str, **params: Any) -> None:
        self.log("info", key, **params)

    def warning(self, key: str, **params: Any) -> None:
        self.log("warning", key, **params)

    def error(self, key: str, **params: Any) -> None:
        self.log("error", key, **params)

    def progress(self, phase: str, done: int, total: int, key: str = "", **params: Any) -> None:
        self.emit(ProgressEvent(phase, done, total, key, params))

    def pop_pending(self) -> list[Event]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending


class LogFileListener:
    """Writes one line per log event (in the run's language) to ``zemosaic.log``."""

    def __init__(self, path: str, language: str | None = None, mode: str = "a") -> None:
        self.path = path
        self.language = language
        self._handle = open(path, mode, encoding="utf-8")  # noqa: SIM115 - closed by close()

    def __call__(self, event: Event) -> None:
        if isinstance(event, LogEvent):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time))
            self._handle.write(f"{stamp} {event.level.upper():7s} [{event.key}] {event.text(self.language)}\n")
            self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def python_logging_listener(logger_name: str = "napari_zemosaic") -> Listener:
    """Forwards log events to the standard :mod:`logging` module (for library use)."""
    logger = logging.getLogger(logger_name)
    level_map = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

    def listener(event: Event) -> None:
        if isinstance(event, LogEvent):
            logger.log(level_map.get(event.level, logging.INFO), "[%s] %s", event.key, event.text())

    return listener

"""Localised messages: every user-visible string is a key in ``locales/<lang>.json``."""

from __future__ import annotations

import json
import os
import string
from functools import lru_cache
from pathlib import Path
from typing import Any

SUPPORTED_LANGUAGES = ("en", "fr")
DEFAULT_LANGUAGE = "en"
LOCALES_DIR = Path(__file__).resolve().parent / "locales"

_current_language = os.environ.get("ZEMOSAIC_LANG", DEFAULT_LANGUAGE)


@lru_cache(maxsize=None)
def load_catalog(language: str) -> dict[str, str]:
    """The key → text table of one language (empty when the file is missing)."""
    path = LOCALES_DIR / f"{language}.json"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def set_language(language: str) -> None:
    """Choose the language used by :func:`tr` when none is given."""
    global _current_language
    _current_language = language if language in SUPPORTED_LANGUAGES else DEFAULT_LANGUAGE


def get_language() -> str:
    return _current_language


class _LenientParams(dict):
    """Leaves unknown placeholders visible instead of raising."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def tr(key: str, language: str | None = None, /, **params: Any) -> str:
    """The text of ``key`` in ``language`` (default: current), formatted with ``params``.

    Falls back to English, then to the key itself, so a missing translation never
    hides a message.
    """
    lang = language or _current_language
    template = load_catalog(lang).get(key)
    if template is None:
        template = load_catalog(DEFAULT_LANGUAGE).get(key, key)
    try:
        return string.Formatter().vformat(template, (), _LenientParams(params))
    except (ValueError, IndexError, KeyError, TypeError):
        # A format spec that does not fit the value (e.g. {x:.2f} with a string):
        # show the raw parameters rather than lose the message.
        return f"{template} {params}"


def placeholders(template: str) -> set[str]:
    """Field names used in a message template."""
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template) if field}

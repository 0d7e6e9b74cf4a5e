"""Every message key exists in English and French with the same placeholders, and code uses only known keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

from napari_zemosaic.i18n import LOCALES_DIR, placeholders, tr

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_zemosaic"


def _catalogs() -> tuple[dict[str, str], dict[str, str]]:
    en = json.loads((LOCALES_DIR / "en.json").read_text(encoding="utf-8"))
    fr = json.loads((LOCALES_DIR / "fr.json").read_text(encoding="utf-8"))
    return en, fr


def test_same_keys_in_every_language() -> None:
    en, fr = _catalogs()
    assert set(en) == set(fr), sorted(set(en) ^ set(fr))


def test_same_placeholders_in_every_language() -> None:
    en, fr = _catalogs()
    mismatched = [key for key in en if placeholders(en[key]) != placeholders(fr[key])]
    assert not mismatched


def test_french_is_really_translated() -> None:
    en, fr = _catalogs()
    identical = [k for k in en if en[k] == fr[k] and len(en[k]) > 25]
    assert len(identical) < 0.05 * len(en), identical


_KEY_CALL = re.compile(
    r"""(?:\btr|\.info|\.warning|\.error|\.debug|\.log\([^,]+,|UserError|ConfigError|FrameError|OutputError|reason_key=)\(?\s*["']([a-z][a-z0-9_.]+)["']"""
)


def test_keys_used_in_code_exist() -> None:
    en, _ = _catalogs()
    used: set[str] = set()
    for path in SRC.rglob("*.py"):
        used.update(_KEY_CALL.findall(path.read_text(encoding="utf-8")))
    missing = sorted(key for key in used if key not in en and "_" in key)
    assert not missing


def test_tr_formats_and_falls_back() -> None:
    assert "12" in tr("ingest_info_found", count=12, path="/x")
    assert "12" in tr("ingest_info_found", language="fr", count=12, path="/x")
    assert tr("no_such_key_anywhere") == "no_such_key_anywhere"
    # a missing parameter stays visible instead of raising
    assert "{path}" in tr("ingest_info_found", count=1)

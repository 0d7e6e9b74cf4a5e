#!/usr/bin/env python3
"""Add or update message keys in locales/en.json and locales/fr.json (developer tool).

    python scripts/locale_add.py KEY "English text {param}" "Texte français {param}" [KEY EN FR ...]
    python scripts/locale_add.py --file keys.json   # {"KEY": ["en", "fr"], ...}

Both files are rewritten sorted, under an exclusive lock, so several people (or
editors) adding keys at once never lose each other's entries. Placeholders must match.
"""

from __future__ import annotations

import fcntl
import json
import string
import sys
from pathlib import Path

LOCALES = Path(__file__).resolve().parents[1] / "src" / "napari_zemosaic" / "locales"


def _fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


def add(entries: dict[str, tuple[str, str]]) -> None:
    for key, (en, fr) in entries.items():
        if _fields(en) != _fields(fr):
            raise SystemExit(f"{key}: placeholders differ: {_fields(en)} vs {_fields(fr)}")
    lock_path = LOCALES / ".lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for lang, index in (("en", 0), ("fr", 1)):
            path = LOCALES / f"{lang}.json"
            data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            for key, texts in entries.items():
                data[key] = texts[index]
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            tmp.replace(path)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--file"]:
        raw = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        add({k: (v[0], v[1]) for k, v in raw.items()})
        return
    if not argv or len(argv) % 3:
        raise SystemExit(__doc__)
    add({argv[i]: (argv[i + 1], argv[i + 2]) for i in range(0, len(argv), 3)})


if __name__ == "__main__":
    main(sys.argv[1:])

"""Fixtures of the widget tests: a tiny demo night and a user config that keeps runs small.

The widget tests need a display: pytest-xvfb starts Xvfb (offscreen Qt crashes when an
image layer is added). They run on 2-core CI machines, so the night is tiny (2x2 panels
of 3 frames, 162x288 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WIDGET_SPEC = dict(panels=(2, 2), frames_per_panel=3, scale=0.15, seed=5)
#: sky_mean normalisation keeps a run to a few seconds on CI; the geometry tested here
#: does not depend on the normalisation method.
WIDGET_CONFIG = {"max_memory_mb": 256, "stacking_normalize_method": "sky_mean", "language": "en"}


@pytest.fixture(scope="session")
def widget_night(tmp_path_factory: pytest.TempPathFactory):
    from napari_zemosaic.engine.demo import DemoSpec, generate_demo

    root = tmp_path_factory.mktemp("widget_night")
    truth = generate_demo(root, DemoSpec(**WIDGET_SPEC))
    return root, truth


def write_user_config(config_home: Path, config: dict) -> None:
    folder = config_home / "napari-zemosaic"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.fixture(autouse=True)
def user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Widgets read the user's config file: point it at a test one (English, small budget).

    Returns a function that replaces that file's content (for widgets opened afterwards).
    """
    home = tmp_path / "config_home"
    write_user_config(home, WIDGET_CONFIG)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return lambda config: write_user_config(home, config)


@pytest.fixture(autouse=True)
def restore_language():
    """Widgets set the process language from the config; give the next test its own."""
    from napari_zemosaic.i18n import get_language, set_language

    before = get_language()
    yield
    set_language(before)

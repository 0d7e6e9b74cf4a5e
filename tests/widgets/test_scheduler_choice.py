"""The Run widget offers the same scheduler choice as ``--scheduler`` (none, local, an address)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.widgets


def _run_widget(viewer):
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-zemosaic", "Run mosaic")
    return widget


def test_scheduler_choice_becomes_the_config_override(make_napari_viewer):
    widget = _run_widget(make_napari_viewer())
    assert widget.scheduler.value == "none" and widget.overrides()["scheduler"] == "none"
    assert not widget.scheduler_address.enabled
    widget.scheduler.value = "local"
    assert widget.overrides()["scheduler"] == "local"
    widget.scheduler.value = "address"
    assert widget.scheduler_address.enabled
    widget.scheduler_address.value = "tcp://127.0.0.1:8786"
    assert widget.overrides()["scheduler"] == "tcp://127.0.0.1:8786"


def test_without_distributed_the_choice_explains_how_to_install_it(make_napari_viewer, monkeypatch):
    from napari_zemosaic.engine import distributed

    monkeypatch.setattr(distributed, "distributed_available", lambda: False)
    widget = _run_widget(make_napari_viewer())
    assert distributed.INSTALL_HINT in widget.scheduler.tooltip
    widget.scheduler.value = "local"
    assert distributed.INSTALL_HINT in widget.log.text

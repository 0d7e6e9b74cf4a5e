"""napari-zemosaic: seamless mosaics from smart-telescope sub-frames.

Importing the package is cheap: the engine, napari and Qt are loaded only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .api import Session, show

__all__ = ["Session", "show", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Session", "show"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'napari_zemosaic' has no attribute {name!r}")

"""napari reader for FITS sub-frames and mosaics (``.fit``, ``.fits``, ``.fts``, ``.fz``).

Pixels come through the engine (:func:`~napari_zemosaic.engine.frames.read_frame_info`
and :func:`~napari_zemosaic.engine.frames.load_frame`), so the reader sees files exactly
as a run does: CFA frames debayered to RGB, RGB planes-first or planes-last cubes as
RGB, mono as a grey image; BZERO/BSCALE applied. Hot pixels are left in (this is a
viewer of the file, not of the cleaned frame). Contrast limits are the 0.5–99.8
percentiles of the finite pixels, set explicitly. ``metadata`` holds the primary
header and the celestial WCS (``None`` when the file has none), which gives the RA/Dec
readout in the status bar. A science mosaic's ``ALPHA`` and ``COVERAGE`` extensions
become their own layers.

The reader never raises: a file it cannot read yields no layer, and a call that reads
nothing returns ``None`` so napari can try another reader.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

LayerData = tuple
FITS_NAME_ENDINGS = (".fit", ".fits", ".fts", ".fit.fz", ".fits.fz", ".fts.fz")
DISPLAY_PERCENTILES = (0.5, 99.8)


def _layer_name(path: Path) -> str:
    """The file name without its FITS ending (names may hold other dots: ``Light_10.0s_...``)."""
    for ending in sorted(FITS_NAME_ENDINGS, key=len, reverse=True):
        if path.name.lower().endswith(ending):
            return path.name[: -len(ending)]
    return path.stem


def _is_fits(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).lower().endswith(FITS_NAME_ENDINGS)


def napari_get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData] | None] | None:
    """The reader function when every path names a FITS file, else ``None``."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_is_fits(p) for p in paths):
        return None
    return read_fits


def read_fits(path: str | Sequence[str]) -> list[LayerData] | None:
    """Layer data for each readable FITS file in ``path`` (a path or a list of paths)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers: list[LayerData] = []
    for item in paths:
        try:
            layers.extend(_read_one(Path(item)))
        except Exception:  # noqa: BLE001 - a reader must not raise; napari reports "no reader"
            continue
    if layers:
        _install_readout_on_current_viewer()
    return layers or None


def _contrast_limits(data: np.ndarray) -> tuple[float, float]:
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    sample = finite[:: max(1, finite.size // 2_000_000)]
    low, high = (float(v) for v in np.percentile(sample, DISPLAY_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def _celestial_wcs(info_wcs: Any, header: Any) -> Any:
    if info_wcs is not None:
        return info_wcs
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header)
        return wcs.celestial if wcs.has_celestial else None
    except Exception:  # noqa: BLE001 - a malformed WCS is the same as none for the readout
        return None


def _read_one(path: Path) -> list[LayerData]:
    from .engine.frames import FrameError, load_frame, read_frame_info

    try:
        info = read_frame_info(path)
        data = load_frame(info, hot_pixel_correction=False)
    except FrameError:
        return _read_generic(path)
    wcs = _celestial_wcs(info.wcs, info.header)
    metadata = {
        "header": info.header,
        "wcs": wcs,
        "path": str(path),
        "layout": info.layout,
        "bayer_pattern": info.bayer_pattern,
    }
    name = _layer_name(path)
    if data.shape[0] == 3:
        image = np.ascontiguousarray(np.moveaxis(data, 0, -1))
        kwargs = {"rgb": True}
    else:
        image = data[0]
        kwargs = {"colormap": "gray"}
    layers: list[LayerData] = [
        (image, {"name": name, "metadata": metadata, "contrast_limits": _contrast_limits(image), **kwargs}, "image")
    ]
    layers.extend(_mosaic_extensions(path, name, wcs))
    return layers


def _mosaic_extensions(path: Path, name: str, wcs: Any) -> list[LayerData]:
    """``ALPHA`` and ``COVERAGE`` image extensions of a science mosaic, as hidden layers."""
    from astropy.io import fits

    layers: list[LayerData] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, mode="readonly", lazy_load_hdus=True) as hdul:
            for hdu in hdul[1:]:
                extension = (hdu.name or "").upper()
                if extension not in ("ALPHA", "COVERAGE") or hdu.data is None or hdu.data.ndim != 2:
                    continue
                data = np.array(hdu.data, dtype=np.uint8 if extension == "ALPHA" else np.float32)
                limits = (0.0, 255.0) if extension == "ALPHA" else (0.0, float(max(np.nanmax(data), 1e-6)))
                meta = {"header": hdu.header.copy(), "wcs": wcs, "path": str(path)}
                layers.append(
                    (
                        data,
                        {
                            "name": f"{name} {extension.lower()}",
                            "metadata": meta,
                            "contrast_limits": limits,
                            "colormap": "gray" if extension == "ALPHA" else "viridis",
                            "visible": False,
                        },
                        "image",
                    )
                )
    return layers


def _read_generic(path: Path) -> list[LayerData]:
    """Any other FITS image (e.g. a 4-D cube) as it is stored; nothing when there is no image."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, mode="readonly") as hdul:
            for hdu in hdul:
                if hdu.is_image and hdu.data is not None and hdu.data.ndim >= 2:
                    data = np.asarray(hdu.data, dtype=np.float32)
                    metadata = {"header": hdu.header.copy(), "wcs": _celestial_wcs(None, hdu.header), "path": str(path)}
                    return [
                        (
                            data,
                            {"name": _layer_name(path), "metadata": metadata, "contrast_limits": _contrast_limits(data)},
                            "image",
                        )
                    ]
    return []


def _install_readout_on_current_viewer() -> None:
    """RA/Dec readout for the layers about to be added (napari opens files into the current viewer)."""
    try:
        import napari

        viewer = napari.current_viewer()
        if viewer is not None:
            from ._widgets.layers import install_radec_readout

            install_radec_readout(viewer)
    except Exception:  # noqa: BLE001 - the readout is a convenience; reading must still succeed
        pass

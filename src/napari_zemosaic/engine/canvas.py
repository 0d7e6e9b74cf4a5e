"""The global canvas: one celestial TAN pixel grid that every frame is resampled onto.

Approach
--------
* **Tangent point.** The canvas is a gnomonic (TAN) projection centred on the mean of
  the frames' centre *unit vectors* (3-D), not the mean of their RA/Dec. Averaging
  vectors is immune to the RA 0/360 wrap and well defined next to a pole.
* **Orientation.** North up, east left: ``CD = diag(-s, s)`` with ``s`` the pixel scale
  in degrees (the median of the frames' scales unless one is given).
* **Size.** Every frame's outline (points along its edges, SIP honoured, not just the
  corners) is projected into the canvas; the bounding box of all outlines, plus
  ``padding_pct`` of its size on each side, is the canvas. ``CRPIX`` is an integer
  chosen so that the box starts at pixel 0, which keeps crops and block cuts exact.
* **Guards.** A mosaic whose frames reach 80° from the tangent point cannot be drawn
  on one TAN plane, and a canvas over :data:`MAX_CANVAS_SIDE_PX` a side is almost
  always a bad WCS among the inputs: both raise :class:`CanvasError`.

Pixel convention: 0-based pixel coordinates, pixel centres at integer positions, so a
frame of shape ``(H, W)`` covers ``x ∈ [-0.5, W - 0.5]``, ``y ∈ [-0.5, H - 0.5]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from .wcs_exact import exact_wcs_state, restore_exact_wcs

BBox = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive, canvas pixels

#: Largest canvas side accepted by :func:`build_canvas` (pixels).
MAX_CANVAS_SIDE_PX = 100_000
#: Largest angle between the tangent point and any frame outline point (degrees).
MAX_TANGENT_DISTANCE_DEG = 80.0
ORIENTATIONS = ("north_up",)


class CanvasError(ValueError):
    """A canvas that cannot be built from the inputs: a locale key and its parameters."""

    def __init__(self, key: str, **params: Any) -> None:
        self.key = key
        self.params = params
        super().__init__(f"{key}: {params}")


@dataclass
class Canvas:
    """A celestial TAN WCS and the pixel shape ``(H, W)`` it is drawn on."""

    wcs: WCS
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.wcs.pixel_shape = (self.shape[1], self.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        # The canvas WCS is computed, not read: its header text would round it (wcs_exact.py).
        return {"wcs": self.wcs, "shape": self.shape, "exact": exact_wcs_state(self.wcs)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.wcs = restore_exact_wcs(state["wcs"], state["exact"])
        self.shape = state["shape"]
        self.wcs.pixel_shape = (self.shape[1], self.shape[0])

    def header(self) -> fits.Header:
        """A 2-D celestial FITS header (WCS cards plus ``NAXIS1``/``NAXIS2``)."""
        header = fits.Header()
        header["NAXIS"] = 2
        header["NAXIS1"] = self.shape[1]
        header["NAXIS2"] = self.shape[0]
        header.extend(self.wcs.to_header(relax=True), update=True)
        return header

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"shape": [H, W], "wcs": {card: value}}``."""
        cards = {key: _json_value(value) for key, value in self.wcs.to_header(relax=True).items()}
        return {"shape": [self.shape[0], self.shape[1]], "wcs": cards}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "Canvas":
        header = fits.Header()
        for key, value in payload["wcs"].items():
            header[key] = value
        height, width = payload["shape"]
        return cls(WCS(header, naxis=2), (int(height), int(width)))


def _json_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)


# --------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------


def celestial_part(wcs: WCS) -> WCS:
    """``wcs.celestial``, without astropy's copy (~0.15 ms, holding the GIL) when the WCS is
    longitude then latitude alone: it is then its own celestial part."""
    return wcs if wcs.naxis == 2 and (wcs.wcs.lng, wcs.wcs.lat) == (0, 1) else wcs.celestial


def pixel_scale_arcsec(wcs: WCS) -> float:
    """Pixel scale at the reference point, ``sqrt(|det CD|)`` in arcsec (CD or PC·CDELT)."""
    matrix = np.asarray(celestial_part(wcs).pixel_scale_matrix, dtype=np.float64)
    return float(np.sqrt(abs(np.linalg.det(matrix))) * 3600.0)


def outline_pixels(shape: tuple[int, int], points_per_edge: int = 8) -> np.ndarray:
    """``(4·n, 2)`` pixel (x, y) points around a frame's outer pixel edges, in order.

    Each edge contributes ``points_per_edge`` points starting at its corner; the polygon
    is implicitly closed (the first point is not repeated). Read-only: one array per frame
    shape, which a night's frames share (the canvas and the boxes asked for it 1000 times).
    """
    return _outline_pixels(int(shape[0]), int(shape[1]), int(points_per_edge))


@functools.lru_cache(maxsize=64)
def _outline_pixels(height: int, width: int, points_per_edge: int) -> np.ndarray:
    n = max(int(points_per_edge), 1)
    steps = np.arange(n, dtype=np.float64) / n
    left, right, bottom, top = -0.5, width - 0.5, -0.5, height - 0.5
    edges = [
        (left + (right - left) * steps, np.full(n, bottom)),  # along y = -0.5, x increasing
        (np.full(n, right), bottom + (top - bottom) * steps),  # along x = W - 0.5, y increasing
        (right - (right - left) * steps, np.full(n, top)),  # along y = H - 0.5, x decreasing
        (np.full(n, left), top - (top - bottom) * steps),  # along x = -0.5, y decreasing
    ]
    xs = np.concatenate([edge[0] for edge in edges])
    ys = np.concatenate([edge[1] for edge in edges])
    points = np.stack([xs, ys], axis=1)
    points.flags.writeable = False
    return points


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _outline_world(wcs: WCS, shape: tuple[int, int], points_per_edge: int) -> tuple[np.ndarray, np.ndarray]:
    outline = outline_pixels(shape, points_per_edge)
    ra, dec = wcs.all_pix2world(outline[:, 0], outline[:, 1], 0)
    return np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)


def _tan_wcs(crval: tuple[float, float], scale_deg: float, crpix: tuple[float, float] = (1.0, 1.0)) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = [crval[0] % 360.0, crval[1]]
    wcs.wcs.crpix = [crpix[0], crpix[1]]
    wcs.wcs.cd = np.array([[-scale_deg, 0.0], [0.0, scale_deg]])
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    return wcs


#: Outline points per frame edge of :func:`footprint_polygon` (and of the boxes built from it).
FOOTPRINT_POINTS_PER_EDGE = 8


def footprint_polygon(
    wcs: WCS, shape: tuple[int, int], canvas_wcs: WCS, points_per_edge: int = FOOTPRINT_POINTS_PER_EDGE
) -> np.ndarray:
    """The frame's true outline (SIP honoured) in canvas pixel (x, y), ``(K, 2)``, in order."""
    ra, dec = _outline_world(wcs, shape, points_per_edge)
    x, y = canvas_wcs.all_world2pix(ra, dec, 0)
    return np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)


def frame_bbox_on_canvas(
    wcs: WCS, shape: tuple[int, int], canvas: Canvas, margin: int = 2
) -> BBox | None:
    """``(y0, y1, x0, x1)`` (end-exclusive) of the frame on the canvas, plus ``margin``, clipped.

    ``None`` when the frame does not touch the canvas.
    """
    return bbox_on_grid(wcs, shape, canvas.wcs, canvas.shape, margin)


def bbox_on_grid(
    wcs: WCS, shape: tuple[int, int], grid_wcs: WCS, grid_shape: tuple[int, int], margin: int = 2
) -> BBox | None:
    """:func:`frame_bbox_on_canvas` for a bare WCS and shape (no :class:`Canvas` needed)."""
    return _bbox_of_polygon(footprint_polygon(wcs, shape, grid_wcs), grid_shape, margin)


def frame_bboxes_on_canvas(
    wcs_list: Sequence[WCS], shapes: Sequence[tuple[int, int]], canvas: Canvas, margin: int = 2
) -> list[BBox | None]:
    """:func:`frame_bbox_on_canvas` of many frames: the same boxes, with the outlines of all the
    frames taken to the canvas in one call (the canvas is a plain TAN projection, which maps
    each point on its own; astropy's per-call cost was most of the time for 500 frames)."""
    outlines = [_outline_world(wcs, shape, FOOTPRINT_POINTS_PER_EDGE) for wcs, shape in zip(wcs_list, shapes)]
    if not outlines:
        return []
    x, y = canvas.wcs.all_world2pix(np.concatenate([ra for ra, _ in outlines]),
                                    np.concatenate([dec for _, dec in outlines]), 0)
    points = np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=1)
    bounds = np.cumsum([0] + [ra.size for ra, _ in outlines])
    return [_bbox_of_polygon(points[start:stop], canvas.shape, margin) for start, stop in zip(bounds[:-1], bounds[1:])]


def _bbox_of_polygon(polygon: np.ndarray, grid_shape: tuple[int, int], margin: int) -> BBox | None:
    if not np.all(np.isfinite(polygon)):
        return None
    height, width = int(grid_shape[0]), int(grid_shape[1])
    # Pixel k covers [k - 0.5, k + 0.5]: the touched pixels run from round(min) to round(max).
    x0 = int(np.floor(polygon[:, 0].min() + 0.5)) - margin
    x1 = int(np.floor(polygon[:, 0].max() + 0.5)) + margin + 1
    y0 = int(np.floor(polygon[:, 1].min() + 0.5)) - margin
    y1 = int(np.floor(polygon[:, 1].max() + 0.5)) + margin + 1
    x0, x1 = max(x0, 0), min(x1, width)
    y0, y1 = max(y0, 0), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1


# --------------------------------------------------------------------------------------
# Canvas construction and cropping
# --------------------------------------------------------------------------------------


def build_canvas(
    wcs_list: Sequence[WCS],
    shapes: Sequence[tuple[int, int]],
    *,
    pixel_scale_arcsec: float = 0.0,
    padding_pct: float = 2.0,
    orientation: str = "north_up",
) -> Canvas:
    """The north-up TAN canvas that holds every frame (see the module docstring)."""
    if len(wcs_list) == 0 or len(wcs_list) != len(shapes):
        raise CanvasError("canvas_error_no_frames", frames=len(wcs_list), shapes=len(shapes))
    if orientation not in ORIENTATIONS:
        raise CanvasError("canvas_error_orientation", orientation=orientation)

    # Each frame's outline and centre in one call (wcslib maps every point on its own: the
    # same numbers as one call each).
    points_per_edge = 16
    outlines: list[tuple[np.ndarray, np.ndarray]] = []
    centres = np.empty((len(wcs_list), 2), dtype=np.float64)
    for number, (wcs, shape) in enumerate(zip(wcs_list, shapes)):
        height, width = shape
        pixels = np.vstack([outline_pixels(shape, points_per_edge), [[(width - 1) / 2.0, (height - 1) / 2.0]]])
        ra, dec = wcs.all_pix2world(pixels[:, 0], pixels[:, 1], 0)
        ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
        outlines.append((ra[:-1], dec[:-1]))
        centres[number] = float(ra[-1]), float(dec[-1])
    mean_vector = _unit_vectors(centres[:, 0], centres[:, 1]).mean(axis=0)
    norm = float(np.linalg.norm(mean_vector))
    if not np.isfinite(norm) or norm < 1e-6:  # frames spread evenly around the sky
        raise CanvasError("canvas_error_too_wide", max_deg=MAX_TANGENT_DISTANCE_DEG)
    mean_vector /= norm
    crval = (
        float(np.degrees(np.arctan2(mean_vector[1], mean_vector[0])) % 360.0),
        float(np.degrees(np.arcsin(np.clip(mean_vector[2], -1.0, 1.0)))),
    )

    scale_arcsec = float(pixel_scale_arcsec) if pixel_scale_arcsec and pixel_scale_arcsec > 0 else float(
        np.median([_scale_of(w) for w in wcs_list])
    )
    scale_deg = scale_arcsec / 3600.0
    projection = _tan_wcs(crval, scale_deg)  # tangent point at pixel (0, 0)

    ra_all = np.concatenate([ra for ra, _ in outlines])
    dec_all = np.concatenate([dec for _, dec in outlines])
    distance = np.degrees(np.arccos(np.clip(_unit_vectors(ra_all, dec_all) @ mean_vector, -1.0, 1.0)))
    if not np.all(np.isfinite(distance)) or distance.max() > MAX_TANGENT_DISTANCE_DEG:
        raise CanvasError("canvas_error_too_wide", max_deg=MAX_TANGENT_DISTANCE_DEG)
    x_all, y_all = (np.asarray(v) for v in projection.wcs_world2pix(ra_all, dec_all, 0))

    x_min, x_max, y_min, y_max = x_all.min(), x_all.max(), y_all.min(), y_all.max()
    pad_x = (x_max - x_min) * padding_pct / 100.0
    pad_y = (y_max - y_min) * padding_pct / 100.0
    # Outline points are pixel *edges*; pixel k spans [k - 0.5, k + 0.5].
    origin_x = int(np.floor(x_min - pad_x + 0.5))
    origin_y = int(np.floor(y_min - pad_y + 0.5))
    width = int(np.floor(x_max + pad_x + 0.5)) - origin_x + 1
    height = int(np.floor(y_max + pad_y + 0.5)) - origin_y + 1
    if width > MAX_CANVAS_SIDE_PX or height > MAX_CANVAS_SIDE_PX:
        raise CanvasError(
            "canvas_error_too_large", width=width, height=height, max_px=MAX_CANVAS_SIDE_PX
        )

    # FITS CRPIX is 1-based: the tangent point (pixel 0 before the shift) lands at -origin.
    wcs = _tan_wcs(crval, scale_deg, crpix=(1.0 - origin_x, 1.0 - origin_y))
    return Canvas(wcs, (height, width))


def _scale_of(wcs: WCS) -> float:
    # build_canvas's keyword argument shadows the module-level function of the same name.
    return pixel_scale_arcsec(wcs)


def autocrop_slices(coverage: np.ndarray, margin_px: int) -> tuple[slice, slice]:
    """Row and column slices of the covered area (``coverage > 0``) plus ``margin_px``.

    The full canvas when nothing is covered.
    """
    covered = np.asarray(coverage) > 0
    height, width = covered.shape
    rows = np.flatnonzero(covered.any(axis=1))
    cols = np.flatnonzero(covered.any(axis=0))
    if rows.size == 0:
        return slice(0, height), slice(0, width)
    margin = max(int(margin_px), 0)
    return (
        slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, height)),
        slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, width)),
    )


def crop_canvas(canvas: Canvas, slices: tuple[slice, slice]) -> Canvas:
    """The canvas cut to ``(row_slice, col_slice)``; ``CRPIX`` shifts so the sky stays put."""
    row_slice, col_slice = slices
    y0, y1, _ = row_slice.indices(canvas.shape[0])
    x0, x1, _ = col_slice.indices(canvas.shape[1])
    wcs = canvas.wcs.deepcopy()
    wcs.wcs.crpix = [wcs.wcs.crpix[0] - x0, wcs.wcs.crpix[1] - y0]
    wcs.wcs.set()
    return Canvas(wcs, (max(y1 - y0, 0), max(x1 - x0, 0)))

"""napari layers over the global canvas: footprints, SDS batches, coverage maps, the mosaic.

Coordinates
-----------
Every layer added here carries two astropy WCS in its ``metadata``:

* ``"wcs"`` — the WCS of the layer's *own data pixels* (``(row, col) = (y, x)``,
  0-based, FITS order). Shapes hold vertices in canvas pixels; coarse coverage grids
  hold the WCS of their cells (:func:`coarse_wcs`); the mosaic holds its (cropped)
  canvas WCS.
* ``"zemosaic_world_wcs"`` — the WCS of the viewer's *world* frame: the pixel frame of
  the first canvas shown in this viewer (the scan's canvas, or the mosaic's when no
  scan was shown).

A layer's ``affine`` maps its data pixels to the world frame. It is fitted from the two
WCS on a 5×5 grid of points, so a cropped mosaic lands at an exact integer translation
of the scan canvas, a coarse grid at its scale and half-cell offset, and a canvas built
on another frame selection (a slightly different tangent point) at the affine that the
two TAN projections agree on (residual far below a pixel over a mosaic's extent). A
star at a given RA/Dec is therefore at the same world position in every layer.

Orientation: the canvas is north up in FITS order (row 0 is the south edge). The
viewer's camera is turned so that its vertical axis points up (``orientation2d =
("up", "right")``): north up, east left on screen, for all layers at once.

Display copies: the mosaic layer shows the per-channel percentile + asinh stretch of
:func:`..engine.outputs.stretch_for_display` with explicit contrast limits ``(0, 1)``;
the linear science data stays in ``metadata["linear"]``. Images larger than the GL
texture limit become multiscale (2× mean pyramids).

The ``prepare_*`` functions are pure numpy (thread workers run them); the ``show_*``
functions touch the viewer and belong on the main thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Sequence

import numpy as np

from ..i18n import tr

if TYPE_CHECKING:  # pragma: no cover
    from astropy.wcs import WCS

    from ..api import ScanResult
    from ..engine.canvas import Canvas
    from ..engine.pipeline import MosaicResult

FRAMES_LAYER = "frames"
SDS_LAYER = "SDS batches"
COVERAGE_LAYER = "coverage"
MOSAIC_LAYER = "mosaic"
ALPHA_LAYER = "alpha"
WCS_KEY = "wcs"
WORLD_KEY = "zemosaic_world_wcs"
#: Used when the GL limit cannot be queried (no OpenGL context yet).
DEFAULT_MAX_TEXTURE_SIZE = 16384
#: Long side of the coarse grid on which SDS coverage maps are drawn.
COVERAGE_GRID_MAX_SIDE = 1024

#: Qualitative colours (Okabe–Ito, then a few more) for groups and batches.
PALETTE = (
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#ffffff", "#a6d854", "#fc8d62", "#8da0cb", "#e78ac3",
)
INCLUDED_COLOUR = "#4cc9f0"
SOLVED_COLOUR = "#f4a261"
EXCLUDED_COLOUR = "#6c757d"


def batch_coverage_layer_name(number: int) -> str:
    """Layer name of batch ``number`` (1-based)."""
    return f"SDS batch {number} coverage"


def unwrap(viewer: Any) -> Any:
    """The viewer itself when napari handed the widget a public-only proxy of it."""
    return getattr(viewer, "__wrapped__", viewer)


# ------------------------------------------------------------------------------ placement


def fit_pixel_affine(src_wcs: WCS, src_shape: tuple[int, int], dst_wcs: WCS) -> np.ndarray:
    """3×3 affine (napari ``(row, col)`` order) from pixels of ``src_wcs`` to pixels of ``dst_wcs``."""
    height, width = int(src_shape[0]), int(src_shape[1])
    rows, cols = np.meshgrid(
        np.linspace(-0.5, height - 0.5, 5), np.linspace(-0.5, width - 0.5, 5), indexing="ij"
    )
    ra, dec = src_wcs.all_pix2world(cols.ravel(), rows.ravel(), 0)
    x, y = dst_wcs.all_world2pix(ra, dec, 0)
    design = np.column_stack([rows.ravel(), cols.ravel(), np.ones(rows.size)])
    row_coeffs = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    col_coeffs = np.linalg.lstsq(design, np.asarray(x), rcond=None)[0]
    matrix = np.array([row_coeffs, col_coeffs, [0.0, 0.0, 1.0]])
    # Two cuts of one canvas differ by a whole-pixel shift: remove the fit's rounding noise.
    snapped = np.round(matrix, 9)
    return np.where(np.abs(snapped - np.round(snapped)) < 1e-9, np.round(snapped), matrix) + 0.0


def world_wcs(viewer: Any, candidate: WCS) -> WCS:
    """The WCS of the viewer's world frame; ``candidate`` becomes it when none is set yet."""
    if viewer is None:
        return candidate
    for layer in unwrap(viewer).layers:
        wcs = layer.metadata.get(WORLD_KEY)
        if wcs is not None:
            return wcs
    return candidate


def placement(
    viewer: Any, data_wcs: WCS, data_shape: tuple[int, int], canvas_wcs: WCS, world: WCS | None = None
) -> dict[str, Any]:
    """``affine`` and the WCS metadata of a new layer whose data pixels follow ``data_wcs``.

    ``world``: the world WCS to use (default: the viewer's, else ``canvas_wcs``).
    """
    reference = world if world is not None else world_wcs(viewer, canvas_wcs)
    return {
        "affine": fit_pixel_affine(data_wcs, data_shape, reference),
        "metadata": {WCS_KEY: data_wcs, WORLD_KEY: reference},
    }


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    viewer = unwrap(viewer)
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def north_up(viewer: Any) -> None:
    """Turn the camera so the vertical axis points up (north up for FITS-ordered canvases)."""
    camera = viewer_camera(viewer)
    try:
        if tuple(camera.orientation2d) != ("up", "right"):
            camera.orientation2d = ("up", "right")
    except (AttributeError, ValueError):  # an older napari without camera orientation
        pass


def upsert_layer(viewer: Any, layer: Any, position: str = "top") -> Any:
    """Replace the layer of the same name in place, else insert at the top or bottom."""
    layers = unwrap(viewer).layers
    if layer.name in layers:
        index = layers.index(layer.name)
        layers.remove(layer.name)
        layers.insert(index, layer)
    elif position == "bottom":
        layers.insert(0, layer)
    else:
        layers.append(layer)
    return layer


def is_first_canvas(viewer: Any) -> bool:
    return not any(WORLD_KEY in layer.metadata for layer in unwrap(viewer).layers)


def finish_showing(viewer: Any, first: bool) -> None:
    north_up(viewer)
    install_radec_readout(viewer)
    if first:
        unwrap(viewer).reset_view()


# ---------------------------------------------------------------------------------- frames


@dataclass
class FramesDisplay:
    """Everything the ``frames`` Shapes layer needs (built off the main thread)."""

    canvas: Canvas
    polygons: list[np.ndarray]  # (K, 2) canvas (row, col)
    files: list[str]
    statuses: list[str]
    groups: list[int] | None
    included: np.ndarray


def prepare_frames_display(scan: ScanResult, included: np.ndarray) -> FramesDisplay:
    assert scan.canvas is not None or not scan.frames
    return FramesDisplay(
        canvas=scan.canvas,  # type: ignore[arg-type]
        polygons=[np.ascontiguousarray(xy[:, ::-1]) for xy in scan.footprints],
        files=[Path(info.path).name for info in scan.frames],
        statuses=[str(info.wcs_status) for info in scan.frames],
        groups=None if scan.groups is None else list(scan.groups),
        included=np.asarray(included, dtype=bool).copy(),
    )


def frame_colours(statuses: Sequence[str], groups: Sequence[int] | None, included: np.ndarray) -> np.ndarray:
    """RGBA edge colour per frame: by pointing group when known, else by WCS status; grey if excluded."""
    from napari.utils.colormaps.standardize_color import transform_color

    colours = []
    for i, status in enumerate(statuses):
        if not included[i]:
            name = EXCLUDED_COLOUR
        elif groups is not None:
            name = PALETTE[int(groups[i]) % len(PALETTE)]
        else:
            name = INCLUDED_COLOUR if status == "valid" else SOLVED_COLOUR
        colours.append(transform_color(name)[0])
    return np.array(colours, dtype=np.float32).reshape(-1, 4)


def frames_layer_data(
    viewer: Any, display: FramesDisplay, world: WCS | None = None
) -> tuple[Any, dict[str, Any], str] | None:
    """``(data, kwargs, "shapes")`` of the ``frames`` layer (``viewer`` may be ``None``)."""
    if display.canvas is None or not display.polygons:
        return None
    canvas = display.canvas
    groups = display.groups
    kwargs = {
        "shape_type": "polygon",
        "name": FRAMES_LAYER,
        "edge_color": frame_colours(display.statuses, groups, display.included),
        "face_color": "transparent",
        "edge_width": max(1.0, max(canvas.shape) / 500.0),
        "features": {
            "file": display.files,
            "status": display.statuses,
            "group": [-1] * len(display.files) if groups is None else [int(g) for g in groups],
            "included": [bool(v) for v in display.included],
        },
        "text": {"string": "{file}", "size": 8, "color": "white", "visible": False},
        **placement(viewer, canvas.wcs, canvas.shape, canvas.wcs, world),
    }
    kwargs["metadata"].update({"zemosaic_canvas": canvas, "zemosaic_groups": groups})
    return display.polygons, kwargs, "shapes"


def show_frames(viewer: Any, display: FramesDisplay) -> Any:
    """Add or replace the ``frames`` layer of footprint polygons (labels hidden by default)."""
    from napari.layers import Layer

    viewer = unwrap(viewer)
    layer_data = frames_layer_data(viewer, display)
    if layer_data is None:
        if FRAMES_LAYER in viewer.layers:
            viewer.layers.remove(FRAMES_LAYER)
        return None
    first = is_first_canvas(viewer)
    layer = upsert_layer(viewer, Layer.create(*layer_data), "top")
    finish_showing(viewer, first)
    return layer


def update_frames_inclusion(viewer: Any, included: np.ndarray) -> None:
    """Recolour the ``frames`` layer after an include/exclude (no rebuild of the shapes)."""
    viewer = unwrap(viewer)
    if FRAMES_LAYER not in viewer.layers:
        return
    layer = viewer.layers[FRAMES_LAYER]
    if layer.nshapes != len(included):
        return
    features = layer.features.copy()
    features["included"] = [bool(v) for v in included]
    layer.features = features
    layer.edge_color = frame_colours(list(features["status"]), layer.metadata.get("zemosaic_groups"), included)


def selected_frames(viewer: Any) -> list[int]:
    """Indices of the footprints selected in the ``frames`` layer."""
    viewer = unwrap(viewer)
    if FRAMES_LAYER not in viewer.layers:
        return []
    return sorted(int(i) for i in viewer.layers[FRAMES_LAYER].selected_data)


# ------------------------------------------------------------------------------------- SDS


def coarse_wcs(wcs: WCS, step: int) -> WCS:
    """The WCS of a grid of ``step``×``step`` pixel cells (cell ``i`` centred on pixel ``i·step + (step−1)/2``).

    (astropy's ``WCS.slice`` with a step scales ``CDELT`` only, which a CD matrix overrides.)
    """
    coarse = wcs.deepcopy()
    if coarse.wcs.has_cd():
        coarse.wcs.cd = np.asarray(coarse.wcs.cd) * step  # both pixel axes (columns of CD) scale
    else:
        coarse.wcs.cdelt = np.asarray(coarse.wcs.cdelt) * step
    # FITS pixel p (1-based) of the fine grid is (p - 0.5) / step + 0.5 on the coarse one.
    coarse.wcs.crpix = (np.asarray(coarse.wcs.crpix) - 0.5) / step + 0.5
    coarse.wcs.set()
    return coarse


def _outline(mask: np.ndarray, step: int) -> np.ndarray:
    """The longest boundary of a coarse mask, as (K, 2) canvas (row, col)."""
    from skimage.measure import approximate_polygon, find_contours

    contours = find_contours(np.pad(mask.astype(np.float32), 1), 0.5)
    if not contours:
        return np.zeros((0, 2))
    longest = approximate_polygon(max(contours, key=len), tolerance=0.5)[:-1] - 1.0
    return longest * step + (step - 1) / 2.0


@dataclass
class SDSDisplay:
    """Batch outlines and coverage grids of an SDS preview (built off the main thread)."""

    canvas: Canvas
    step: int
    grid_wcs: WCS
    outlines: list[np.ndarray]  # per batch, (K, 2) canvas (row, col)
    batch_coverage: list[np.ndarray]  # per batch, frames per grid cell (float32)
    total_coverage: np.ndarray
    sizes: list[int]
    coverage_fractions: list[float] = field(default_factory=list)


def prepare_sds_display(
    batches: Sequence[Sequence[int]],
    footprints: Sequence[np.ndarray],
    canvas: Canvas,
    included: np.ndarray,
    coverage_fractions: Sequence[float] | None = None,
    max_side: int = COVERAGE_GRID_MAX_SIDE,
) -> SDSDisplay:
    """Coverage grids per batch and in total, batch outlines, coverage fraction of each batch.

    Footprints are rasterised with the SDS helper's own grid code (a cell counts when its
    centre is inside). When no fractions are given, a batch's fraction is the share of the
    union footprint of the included frames that it covers (the SDS policy's measure).
    """
    from ..engine.sds import CoverageGrid, rasterise_polygon

    grid = CoverageGrid.for_canvas(canvas.shape, max_side)
    cells = {
        int(i): rasterise_polygon(grid.to_grid(footprints[int(i)]), grid.shape) for i in np.flatnonzero(included)
    }
    for batch in batches:  # a batch may name a frame the inclusion set no longer has
        for index in batch:
            if int(index) not in cells:
                cells[int(index)] = rasterise_polygon(grid.to_grid(footprints[int(index)]), grid.shape)
    union = np.zeros(grid.shape, dtype=bool)
    for index in np.flatnonzero(included):
        if cells[int(index)] is not None:
            cells[int(index)].add_to(union)  # type: ignore[union-attr]
    total = np.zeros(grid.shape, dtype=np.float32)
    per_batch: list[np.ndarray] = []
    outlines: list[np.ndarray] = []
    fractions: list[float] = []
    for batch in batches:
        counts = np.zeros(grid.shape, dtype=np.float32)
        for index in batch:
            footprint = cells[int(index)]
            if footprint is not None:
                rows, cols = footprint.mask.shape
                counts[footprint.row0 : footprint.row0 + rows, footprint.col0 : footprint.col0 + cols] += footprint.mask
        total += counts
        per_batch.append(counts)
        outlines.append(_outline(counts > 0, grid.cell_px))
        fractions.append(float(((counts > 0) & union).sum()) / max(int(union.sum()), 1))
    step = grid.cell_px
    return SDSDisplay(
        canvas=canvas,
        step=step,
        grid_wcs=coarse_wcs(canvas.wcs, step),
        outlines=outlines,
        batch_coverage=per_batch,
        total_coverage=total,
        sizes=[len(batch) for batch in batches],
        coverage_fractions=list(coverage_fractions) if coverage_fractions is not None else fractions,
    )


def show_sds(viewer: Any, display: SDSDisplay, selected: int = 0, language: str | None = None) -> list[Any]:
    """``SDS batches`` outlines, one ``SDS batch N coverage`` per batch and the total ``coverage``."""
    from napari.layers import Image, Shapes

    viewer = unwrap(viewer)
    first = is_first_canvas(viewer)
    canvas = display.canvas
    added: list[Any] = []
    grid_place = placement(viewer, display.grid_wcs, display.total_coverage.shape, canvas.wcs)
    peak = float(max(display.total_coverage.max(), 1.0))
    total = Image(
        display.total_coverage,
        name=COVERAGE_LAYER,
        colormap="viridis",
        contrast_limits=(0.0, peak),
        visible=False,
        **grid_place,
    )
    added.append(upsert_layer(viewer, total, "bottom"))
    # Batch coverage layers: drop those of an earlier, larger preview first.
    count = len(display.batch_coverage)
    for layer in [layer for layer in viewer.layers if _batch_number(layer.name) is not None]:
        if _batch_number(layer.name) > count:  # type: ignore[operator]
            viewer.layers.remove(layer)
    for number, grid in enumerate(display.batch_coverage, start=1):
        layer = Image(
            grid,
            name=batch_coverage_layer_name(number),
            colormap="inferno",
            contrast_limits=(0.0, float(max(grid.max(), 1.0))),
            opacity=0.7,
            visible=(number - 1) == selected,
            **placement(viewer, display.grid_wcs, grid.shape, canvas.wcs),
        )
        added.append(upsert_layer(viewer, layer, "top"))
    labels = [
        tr("sds_batch_label", language, number=n, size=size, coverage=100.0 * fraction)
        for n, (size, fraction) in enumerate(zip(display.sizes, display.coverage_fractions), start=1)
    ]
    outlines = [outline if len(outline) >= 3 else np.zeros((3, 2)) for outline in display.outlines]
    colours = [PALETTE[i % len(PALETTE)] for i in range(count)]
    shapes = Shapes(
        outlines,
        shape_type="polygon",
        name=SDS_LAYER,
        edge_color=colours,
        face_color="transparent",
        edge_width=max(2.0, max(canvas.shape) / 300.0),
        features={"batch": list(range(1, count + 1)), "size": display.sizes, "label": labels},
        text={"string": "{label}", "size": 10, "color": "white", "anchor": "center"},
        **placement(viewer, canvas.wcs, canvas.shape, canvas.wcs),
    )
    shapes.metadata["zemosaic_canvas"] = canvas
    added.append(upsert_layer(viewer, shapes, "top"))
    if FRAMES_LAYER in viewer.layers:  # keep the footprints above the batch overlays
        viewer.layers.move(viewer.layers.index(FRAMES_LAYER), len(viewer.layers))
    finish_showing(viewer, first)
    return added


def _batch_number(name: str) -> int | None:
    prefix, suffix = "SDS batch ", " coverage"
    if name.startswith(prefix) and name.endswith(suffix) and name[len(prefix) : -len(suffix)].isdigit():
        return int(name[len(prefix) : -len(suffix)])
    return None


def select_sds_batch(viewer: Any, selected: int) -> None:
    """Show the coverage of batch ``selected`` (0-based) only."""
    for layer in unwrap(viewer).layers:
        number = _batch_number(layer.name)
        if number is not None:
            layer.visible = number - 1 == selected


# ---------------------------------------------------------------------------------- mosaic


def warm_up() -> None:
    """Pay napari's one-time costs of a first image layer (unit registry, imports) now.

    Called when a widget opens, so that adding the result layers at the end of a run
    does not stall the UI thread for half a second.
    """
    from napari.layers import Image

    Image(np.zeros((2, 2), dtype=np.float32), affine=np.eye(3), contrast_limits=(0.0, 1.0))
    max_texture_size()


def max_texture_size() -> int:
    """The GL 2D texture limit of this machine (a safe default when it cannot be queried)."""
    try:  # napari's own probe (cached); a private module, hence the guard
        from qtpy.QtWidgets import QApplication

        if QApplication.instance() is None:  # probing would start Qt (and abort when headless)
            return DEFAULT_MAX_TEXTURE_SIZE
        from napari._vispy.utils.gl import get_max_texture_sizes

        size = get_max_texture_sizes()[0]
        if size:
            return int(size)
    except Exception:  # noqa: BLE001 - no GL context, or napari moved the helper
        pass
    return DEFAULT_MAX_TEXTURE_SIZE


def pyramid(image: np.ndarray, max_side: int) -> list[np.ndarray]:
    """``[image, image/2, ...]`` (2×2 means) until the long side fits ``max_side``."""
    levels = [image]
    while max(levels[-1].shape[:2]) > max_side:
        previous = levels[-1]
        height, width = (previous.shape[0] // 2) * 2, (previous.shape[1] // 2) * 2
        blocks = previous[:height, :width].reshape(height // 2, 2, width // 2, 2, *previous.shape[2:])
        levels.append(blocks.mean(axis=(1, 3)).astype(previous.dtype))
    return levels


@dataclass
class MosaicDisplay:
    """Display copies of a finished mosaic (built off the main thread)."""

    mosaic: list[np.ndarray]  # levels, (H, W, 3) RGB or (H, W) mono, stretched to [0, 1]
    alpha: list[np.ndarray]
    coverage: list[np.ndarray]
    canvas: Canvas
    rgb: bool
    coverage_max: float
    metadata: dict[str, Any]


def prepare_mosaic_display(
    result: MosaicResult, max_side: int = DEFAULT_MAX_TEXTURE_SIZE, percentiles: tuple[float, float] | None = None
) -> MosaicDisplay:
    """Stretched RGB display copy (linear data kept aside), alpha, coverage, as pyramids if needed."""
    from ..engine.outputs import stretch_for_display

    if result.data is None or result.canvas is None:
        raise ValueError("the result holds no mosaic (status: %s)" % result.status)
    if percentiles is None:
        configured = (result.report.get("config") or {}).get("preview_stretch_percentiles") or (0.5, 99.8)
        percentiles = (float(configured[0]), float(configured[1]))
    alpha = result.alpha if result.alpha is not None else np.where(np.isfinite(result.data).all(axis=0), 255, 0).astype(np.uint8)
    stretched = stretch_for_display(result.data, alpha, percentiles)
    rgb = stretched.shape[0] >= 3
    image = np.ascontiguousarray(np.moveaxis(stretched[:3], 0, -1)) if rgb else stretched[0]
    coverage = result.coverage if result.coverage is not None else (alpha > 0).astype(np.float32)
    metadata = {
        "linear": result.data,
        "header": result.canvas.header(),
        "science_path": None if result.science_path is None else str(result.science_path),
        "report": result.report,
        "stretch_percentiles": tuple(percentiles),
    }
    return MosaicDisplay(
        mosaic=pyramid(image, max_side),
        alpha=pyramid(np.asarray(alpha, dtype=np.uint8), max_side),
        coverage=pyramid(np.asarray(coverage, dtype=np.float32), max_side),
        canvas=result.canvas,
        rgb=rgb,
        coverage_max=float(max(np.nanmax(coverage) if coverage.size else 1.0, 1e-6)),
        metadata=metadata,
    )


def _levels(levels: list[np.ndarray]) -> tuple[Any, bool]:
    return (levels, True) if len(levels) > 1 else (levels[0], False)


def mosaic_layer_data(
    viewer: Any, display: MosaicDisplay, world: WCS | None = None
) -> list[tuple[Any, dict[str, Any], str]]:
    """``(data, kwargs, "image")`` of ``mosaic``, ``alpha`` and ``coverage`` (``viewer`` may be ``None``)."""
    canvas = display.canvas
    place = placement(viewer, canvas.wcs, canvas.shape, canvas.wcs, world)

    def kwargs(name: str, levels: list[np.ndarray], extra_metadata: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "multiscale": _levels(levels)[1],
            "affine": place["affine"],
            "metadata": {**place["metadata"], **(extra_metadata or {})},
            **more,
        }

    mosaic_style = {"rgb": True} if display.rgb else {"colormap": "gray"}
    return [
        (
            _levels(display.mosaic)[0],
            kwargs(MOSAIC_LAYER, display.mosaic, display.metadata, contrast_limits=(0.0, 1.0), **mosaic_style),
            "image",
        ),
        (
            _levels(display.alpha)[0],
            kwargs(ALPHA_LAYER, display.alpha, colormap="gray", contrast_limits=(0, 255), visible=False),
            "image",
        ),
        (
            _levels(display.coverage)[0],
            kwargs(
                COVERAGE_LAYER, display.coverage, colormap="viridis", contrast_limits=(0.0, display.coverage_max), visible=False
            ),
            "image",
        ),
    ]


def show_mosaic_steps(viewer: Any, display: MosaicDisplay) -> Generator[None, None, list[Any]]:
    """:func:`show_mosaic` cut into short steps (one layer built, or one inserted, per step).

    A widget runs one step per event-loop turn so the UI thread never stalls on the
    whole sequence; the generator returns the layers ``[mosaic, alpha, coverage]``.
    """
    from napari.layers import Layer

    viewer = unwrap(viewer)
    first = is_first_canvas(viewer)
    layers: list[Any] = []
    # mosaic lowest, the hidden alpha and coverage above it, overlays on top
    for item in reversed(mosaic_layer_data(viewer, display)):
        layer = Layer.create(*item)
        yield
        upsert_layer(viewer, layer, "bottom")
        layers.insert(0, layer)
        yield
    finish_showing(viewer, first)
    return layers


def show_mosaic(viewer: Any, display: MosaicDisplay) -> list[Any]:
    """Add or replace ``mosaic``, ``alpha`` and ``coverage`` (below the overlays) on the world frame."""
    steps = show_mosaic_steps(viewer, display)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def result_from_science_fits(path: Path) -> MosaicResult:
    """A :class:`MosaicResult` view of a ``*_science.fits`` written by a run (for :func:`show`)."""
    import json

    from astropy.io import fits
    from astropy.wcs import WCS

    from ..engine.canvas import Canvas
    from ..engine.pipeline import MosaicResult

    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
        header = hdul[0].header
        names = [hdu.name for hdu in hdul]
        alpha = np.asarray(hdul["ALPHA"].data, dtype=np.uint8) if "ALPHA" in names else None
        coverage = np.asarray(hdul["COVERAGE"].data, dtype=np.float32) if "COVERAGE" in names else None
        wcs = WCS(header).celestial
    if data.ndim == 2:
        data = data[None]
    report_path = path.parent / "run_report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    return MosaicResult(
        status=str(report.get("status", "ok")),
        output_dir=path.parent,
        report=report,
        science_path=path,
        report_path=report_path if report_path.is_file() else None,
        data=data,
        alpha=alpha,
        coverage=coverage,
        canvas=Canvas(wcs, data.shape[-2:]),
    )


# --------------------------------------------------------------------------- RA/Dec readout


def format_ra(ra_deg: float) -> str:
    """``HH:MM:SS.ss`` (rounded once, so 59.996 s carries into the minute)."""
    centiseconds = int(round((ra_deg % 360.0) / 15.0 * 360000.0)) % (24 * 360000)
    hours, rest = divmod(centiseconds, 360000)
    minutes, rest = divmod(rest, 6000)
    return f"{hours:02d}:{minutes:02d}:{rest / 100:05.2f}"


def format_dec(dec_deg: float) -> str:
    """``±DD:MM:SS.s``."""
    sign = "-" if dec_deg < 0 else "+"
    tenths = int(round(abs(dec_deg) * 36000.0))
    degrees, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    return f"{sign}{degrees:02d}:{minutes:02d}:{rest / 10:04.1f}"


def radec_at(layer: Any, position: Sequence[float], world: bool = True) -> tuple[float, float] | None:
    """(RA, Dec) in degrees under a position, for a layer whose metadata holds a celestial WCS."""
    wcs = layer.metadata.get(WCS_KEY) if isinstance(layer.metadata, dict) else None
    if wcs is None or not getattr(wcs, "has_celestial", False):
        return None
    data_position = np.asarray(layer.world_to_data(position) if world else position, dtype=np.float64)
    if data_position.size < 2:
        return None
    row, col = float(data_position[-2]), float(data_position[-1])
    celestial = wcs.celestial
    ra, dec = celestial.all_pix2world([[col, row]], 0)[0]
    if not (np.isfinite(ra) and np.isfinite(dec)):
        return None
    return float(ra), float(dec)


def radec_text(layer: Any, position: Sequence[float], world: bool = True, language: str | None = None) -> str:
    try:
        radec = radec_at(layer, position, world)
    except Exception:  # noqa: BLE001 - a status line must never break the cursor
        return ""
    if radec is None:
        return ""
    return tr("status_radec", language, ra=format_ra(radec[0]), dec=format_dec(radec[1]))


def _attach_radec(layer: Any) -> None:
    """Append RA/Dec to the layer's status text (napari builds the status bar from it)."""
    if getattr(layer.get_status, "_zemosaic_radec", False):
        return
    original = layer.get_status

    def get_status(
        position: Any = None,
        *,
        view_direction: Any = None,
        dims_displayed: Any = None,
        world: bool = False,
        value: Any = None,
    ) -> Any:
        status = original(position, view_direction=view_direction, dims_displayed=dims_displayed, world=world, value=value)
        if position is not None and isinstance(status, dict):
            text = radec_text(layer, position, world)
            if text:
                status["coordinates"] = f"{status.get('coordinates', '')}  {text}"
        return status

    get_status._zemosaic_radec = True  # type: ignore[attr-defined]
    layer.get_status = get_status


def _on_layer_inserted(event: Any) -> None:
    _attach_radec(event.value)


def install_radec_readout(viewer: Any) -> None:
    """RA/Dec in the status bar for every layer of ``viewer`` whose metadata holds a WCS."""
    viewer = unwrap(viewer)
    viewer.layers.events.inserted.connect(_on_layer_inserted)
    for layer in viewer.layers:
        _attach_radec(layer)

"""Small, explicit star measurements for the science tests (centroids, aperture fluxes, noise)."""

from __future__ import annotations

import numpy as np


def local_background(image: np.ndarray, x: float, y: float, r_in: float, r_out: float) -> tuple[float, float]:
    """Median and robust sigma of an annulus around (x, y)."""
    height, width = image.shape
    x0, x1 = max(0, int(x - r_out) - 1), min(width, int(x + r_out) + 2)
    y0, y1 = max(0, int(y - r_out) - 1), min(height, int(y + r_out) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    radius = np.hypot(xx - x, yy - y)
    values = image[y0:y1, x0:x1][(radius >= r_in) & (radius < r_out)]
    values = values[np.isfinite(values)]
    median = float(np.median(values))
    return median, float(1.4826 * np.median(np.abs(values - median)))


def centroid(image: np.ndarray, x: float, y: float, radius: float = 4.0, iterations: int = 5) -> tuple[float, float]:
    """Background-subtracted, iteratively re-centred first moment."""
    background, _ = local_background(image, x, y, 3 * radius, 5 * radius)
    cx, cy = x, y
    for _ in range(iterations):
        x0, x1 = int(np.floor(cx - radius)), int(np.ceil(cx + radius)) + 1
        y0, y1 = int(np.floor(cy - radius)), int(np.ceil(cy + radius)) + 1
        yy, xx = np.mgrid[y0:y1, x0:x1]
        stamp = image[y0:y1, x0:x1] - background
        weight = np.where(np.hypot(xx - cx, yy - cy) <= radius, np.clip(stamp, 0, None), 0.0)
        total = weight.sum()
        cx, cy = float((weight * xx).sum() / total), float((weight * yy).sum() / total)
    return cx, cy


def aperture_flux(image: np.ndarray, x: float, y: float, radius: float, r_in: float, r_out: float) -> float:
    """Sum inside ``radius`` (sub-sampled edge pixels) minus the annulus median background."""
    background, _ = local_background(image, x, y, r_in, r_out)
    sub = 5
    x0, x1 = int(np.floor(x - radius)) - 1, int(np.ceil(x + radius)) + 2
    y0, y1 = int(np.floor(y - radius)) - 1, int(np.ceil(y + radius)) + 2
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    yy, xx = np.mgrid[y0:y1, x0:x1]
    fraction = np.zeros(xx.shape)
    for dy in offsets:
        for dx in offsets:
            fraction += np.hypot(xx + dx - x, yy + dy - y) <= radius
    fraction /= sub * sub
    stamp = image[y0:y1, x0:x1] - background
    return float(np.nansum(stamp * fraction))


def robust_noise_map(image: np.ndarray, region: tuple[slice, slice], star_mask: np.ndarray | None = None) -> float:
    """Robust sigma of the pixel noise in ``region`` after removing the smooth sky (median filter)."""
    from scipy.ndimage import median_filter

    patch = image[region]
    smooth = median_filter(patch, size=9, mode="nearest")
    residual = patch - smooth
    if star_mask is not None:
        residual = residual[~star_mask[region]]
    residual = residual[np.isfinite(residual)]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))

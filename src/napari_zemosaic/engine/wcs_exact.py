"""Exact pickling of astropy WCS objects.

An astropy :class:`~astropy.wcs.WCS` pickles through its FITS header text, whose numbers are
printed with fewer digits than a float64 holds: a WCS computed by the engine (the canvas, a
cropped canvas, a plate solution) comes back from a worker process a few 1e-13 degrees off.
That is far below any astrometric meaning, but it makes a unit computed in a Dask worker differ
from the same unit computed in the run's process (a bilinear weight, a rejection decision), and
the engine promises the same mosaic whatever the scheduler. These helpers carry the numeric
arrays along and put them back bit for bit after unpickling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Numeric members of ``wcs.wcs`` that fix the linear part of the mapping.
_CORE_ARRAYS = ("crval", "crpix")


def exact_wcs_state(wcs: Any) -> dict[str, Any] | None:
    """The float64 arrays of ``wcs``'s mapping (``None`` for no WCS)."""
    if wcs is None:
        return None
    core = wcs.wcs
    state: dict[str, Any] = {name: np.array(getattr(core, name), dtype=np.float64) for name in _CORE_ARRAYS}
    if core.has_cd():
        state["cd"] = np.array(core.cd, dtype=np.float64)
    else:
        state["pc"] = np.array(core.pc, dtype=np.float64)
        state["cdelt"] = np.array(core.cdelt, dtype=np.float64)
    sip = getattr(wcs, "sip", None)
    if sip is not None:
        state["sip"] = tuple(None if a is None else np.array(a, dtype=np.float64) for a in (sip.a, sip.b, sip.ap, sip.bp))
        state["sip_crpix"] = np.array(sip.crpix, dtype=np.float64)
    return state


def restore_exact_wcs(wcs: Any, state: dict[str, Any] | None) -> Any:
    """Put the arrays of :func:`exact_wcs_state` back into an unpickled ``wcs`` (returned)."""
    if wcs is None or state is None:
        return wcs
    from astropy.wcs import Sip

    core = wcs.wcs
    for name in _CORE_ARRAYS:
        setattr(core, name, state[name])
    if "cd" in state and core.has_cd():
        core.cd = state["cd"]
    elif "cd" in state:  # came back as PC + CDELT: CD·1 is exact in wcslib's PC·CDELT product
        core.pc, core.cdelt = state["cd"], np.ones(len(state["crval"]))
    else:
        core.pc, core.cdelt = state["pc"], state["cdelt"]
    if "sip" in state:
        wcs.sip = Sip(*state["sip"], state["sip_crpix"])
    core.set()
    return wcs

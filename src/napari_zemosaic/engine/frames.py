"""Frame ingest: scan a folder, read FITS headers, detect Seestar data, load pixels.

Two passes, because a night holds thousands of sub-frames:

* :func:`read_frame_info` reads **headers only** (``lazy_load_hdus=True``; the HDUs after
  the image are never touched and no pixel is read). It picks the first HDU that holds a
  2-D or 3-D image (primary, image extension or tile-compressed ``CompImageHDU``),
  classifies the layout (CFA, mono, RGB planes first or last), checks that the file is
  long enough for the data its header announces (a cheap ``stat``), gathers the metadata
  the pipeline needs (exposure, pointing, optics, Bayer pattern, Seestar or not) and
  validates the celestial WCS. WCS problems do not raise: they are recorded in
  ``wcs_status``/``wcs_reason`` so the pipeline can plate-solve or exclude. The WCS is built
  from a :class:`WcsRecipe` (what astropy's constructor would hand wcslib, computed without its
  header round trips: the same object for a third of the cost, card parsing included). A plain
  primary image (the Seestar case) is read from the header blocks the file's first checks read,
  its cards' values by one regular expression each (:class:`HeaderLookup`), without
  ``fits.open``: the same outcome for 40 % of the cost.
  :func:`iter_frame_infos` runs the pass over many files with reader processes beside the main
  one, with the serial outcomes.
* :func:`load_frame` reads the pixels of one frame and returns float32 ``(C, H, W)``.
  BZERO/BSCALE are applied from the raw integers (astropy's own scaling is switched off),
  so Seestar's uint16-as-int16+32768 data comes back as exact integers. CFA frames get
  hot-pixel correction per colour site and bilinear debayering (:mod:`.debayer`), on the
  array module ``xp`` given (the compact uint16 array is what travels to a GPU).

User-caused problems with one file raise :class:`FrameError` carrying a locale key
(``frame_excluded_*``) and parameters; engine code never formats user text. Input files
are only ever opened read-only.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from astropy.io import fits
from astropy.io.fits import card as fits_card
from astropy.wcs import WCS, WCSBase, Sip, Wcsprm

from .debayer import PATTERNS, correct_hot_pixels, debayer_bilinear
from .wcs_exact import exact_wcs_state, restore_exact_wcs

FITS_SUFFIXES: tuple[str, ...] = (".fit", ".fits", ".fts")
#: Tile-compressed FITS (fpack) is read as well.
COMPRESSED_FITS_SUFFIXES: tuple[str, ...] = tuple(suffix + ".fz" for suffix in FITS_SUFFIXES)

# --- reason keys (locale keys; each has en + fr text with {path} and {detail}) --------------
REASON_EMPTY_FILE = "frame_excluded_empty_file"
REASON_NOT_FITS = "frame_excluded_not_fits"
REASON_TRUNCATED = "frame_excluded_truncated"
REASON_NO_IMAGE = "frame_excluded_no_image"
REASON_UNSUPPORTED_SHAPE = "frame_excluded_unsupported_shape"
REASON_ALL_NAN = "frame_excluded_all_nan"
REASON_UNREADABLE = "frame_excluded_unreadable"
REASON_NO_WCS = "frame_excluded_no_wcs"
REASON_BAD_WCS = "frame_excluded_bad_wcs"

#: Accepted WCS pixel scales (arcsec/px): smart telescopes and small refractors.
MIN_PIXEL_SCALE_ARCSEC = 0.3
MAX_PIXEL_SCALE_ARCSEC = 15.0
#: Largest pixel error of the corners' pixel -> sky -> pixel round trip of a valid WCS.
MAX_ROUND_TRIP_PX = 0.05

#: Largest pixel magnitude kept (after BSCALE/BZERO); beyond it a value is undefined (NaN).
#: No sensor or calibrated image comes near it, and it keeps float32 sums of 10^8 values finite.
MAX_PIXEL_MAGNITUDE = 1e30

#: The FITS standard's limit on NAXIS.
MAX_FITS_AXES = 999
#: Header blocks read at most when looking for structural keywords before astropy opens an HDU.
_MAX_HEADER_BLOCKS = 200

_FITS_BLOCK = 2880
_CARD = 80
_WCS_TEXT_KEY = re.compile(r"^(CTYPE\d|CUNIT\d|RADESYS|RADECSYS|PS\d_\d+)$")
_SEESTAR_TELESCOPE = re.compile(r"^\s*S(?:30|50)(?:P|PRO)?_", re.IGNORECASE)
_WCS_KEY = re.compile(
    r"^(NAXIS\d*|WCSAXES|CTYPE\d|CRVAL\d|CRPIX\d|CDELT\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|PS\d_\d+"
    r"|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|[AB]P?_ORDER|[AB]P?_\d+_\d+|[AB]_DMAX)$"
)


class FrameError(Exception):
    """A user-caused problem with one input file: a locale key, a detail and parameters.

    ``params`` always holds ``detail`` (and ``path`` when known) so that
    ``tr(error.reason_key, **error.params)`` formats the message.
    """

    def __init__(self, reason_key: str, detail: str = "", **params: Any) -> None:
        self.reason_key = reason_key
        self.detail = detail
        self.params: dict[str, Any] = {"detail": detail, **params}
        super().__init__(f"{reason_key}: {params.get('path', '')} {detail}".strip())


@dataclass
class FrameInfo:
    """What the header pass knows about one frame (no pixels)."""

    path: Path
    shape: tuple[int, int]
    n_channels: int
    layout: str
    bayer_pattern: str | None
    exposure_s: float | None
    date_obs: str | None
    eqmode: int | None
    ra_deg: float | None
    dec_deg: float | None
    focal_mm: float | None
    pixel_um: float | None
    header_scale_arcsec: float | None
    instrument: str | None
    is_seestar: bool
    wcs: WCS | None
    wcs_status: str
    wcs_reason: str | None
    hdu_index: int
    header: fits.Header = field(repr=False)
    wcs_detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # frame quality numbers, once measured
    #: ``(stat stamp, identity)`` of the file as a reader process found it
    #: (:func:`.resume.stamped_file_identity`), for the run's resume signatures; None elsewhere.
    file_identity: tuple[tuple[int, int, int], dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    #: ``(file identity, digest)``: the frame's resume digest as a reader process computed it beside
    #: that identity (:func:`.resume.frame_token`); None elsewhere.
    resume_token: tuple[dict[str, Any], str] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # A plate-solved WCS is computed, not read: its header text would round it (wcs_exact.py).
        return {**self.__dict__, "_exact_wcs": exact_wcs_state(self.wcs)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        exact = state.pop("_exact_wcs", None)
        self.__dict__.update(state)
        restore_exact_wcs(self.wcs, exact)

    @property
    def centre(self) -> tuple[float, float] | None:
        """(RA, Dec) in degrees of the image centre: from the WCS, else the header pointing."""
        if self.wcs is not None:
            height, width = self.shape
            ra, dec = self.wcs.all_pix2world([[(width - 1) / 2.0, (height - 1) / 2.0]], 0)[0]
            return float(ra) % 360.0, float(dec)
        if self.ra_deg is None or self.dec_deg is None:
            return None
        return self.ra_deg, self.dec_deg

    def to_dict(self, include_header: bool = False) -> dict[str, Any]:
        """JSON-safe summary; the WCS as a dict of header cards (SIP included)."""
        centre = self.centre
        result: dict[str, Any] = {
            "path": str(self.path),
            "shape": [int(self.shape[0]), int(self.shape[1])],
            "n_channels": int(self.n_channels),
            "layout": self.layout,
            "bayer_pattern": self.bayer_pattern,
            "exposure_s": _json_number(self.exposure_s),
            "date_obs": self.date_obs,
            "eqmode": self.eqmode,
            "ra_deg": _json_number(self.ra_deg),
            "dec_deg": _json_number(self.dec_deg),
            "focal_mm": _json_number(self.focal_mm),
            "pixel_um": _json_number(self.pixel_um),
            "header_scale_arcsec": _json_number(self.header_scale_arcsec),
            "instrument": self.instrument,
            "is_seestar": bool(self.is_seestar),
            "wcs": wcs_to_dict(self.wcs) if self.wcs is not None else None,
            "wcs_status": self.wcs_status,
            "wcs_reason": self.wcs_reason,
            "wcs_detail": self.wcs_detail,
            "hdu_index": int(self.hdu_index),
            "centre": None if centre is None else [_json_number(centre[0]), _json_number(centre[1])],
        }
        if include_header:
            result["header"] = header_to_dict(self.header)
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FrameInfo":
        """Rebuild a :class:`FrameInfo` from :meth:`to_dict` output (e.g. on a Dask worker)."""
        shape = (int(data["shape"][0]), int(data["shape"][1]))
        wcs = wcs_from_dict(data["wcs"], shape) if data.get("wcs") else None
        header = fits.Header()
        for key, value in (data.get("header") or {}).items():
            try:
                # append(Card), not header[key] = value: a key such as 'A*' would be taken as a
                # wildcard and overwrite every matching card (or fail to compile as a pattern).
                header.append(fits.Card(key, value))
            except Exception:
                # astropy reads cards it refuses to write (non-ASCII values, a stray 'END = 0',
                # NUL keywords): the copy here is informational, so such cards are left out.
                continue
        return cls(
            path=Path(data["path"]),
            shape=shape,
            n_channels=int(data["n_channels"]),
            layout=str(data["layout"]),
            bayer_pattern=data.get("bayer_pattern"),
            exposure_s=data.get("exposure_s"),
            date_obs=data.get("date_obs"),
            eqmode=data.get("eqmode"),
            ra_deg=data.get("ra_deg"),
            dec_deg=data.get("dec_deg"),
            focal_mm=data.get("focal_mm"),
            pixel_um=data.get("pixel_um"),
            header_scale_arcsec=data.get("header_scale_arcsec"),
            instrument=data.get("instrument"),
            is_seestar=bool(data.get("is_seestar", False)),
            wcs=wcs,
            wcs_status=str(data.get("wcs_status", "valid" if wcs is not None else "missing")),
            wcs_reason=data.get("wcs_reason"),
            hdu_index=int(data.get("hdu_index", 0)),
            header=header,
            wcs_detail=str(data.get("wcs_detail") or ""),
        )


# ----------------------------------------------------------------------------- scanning


def _is_fits_name(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(FITS_SUFFIXES) or lowered.endswith(COMPRESSED_FITS_SUFFIXES)


def scan_inputs(input_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """All FITS files under ``input_dir`` (recursive, suffixes case-insensitive), sorted.

    Hidden files and folders (name starting with '.') are skipped, and so is
    ``output_dir`` when it lies inside ``input_dir`` (a mosaic is not its own input).
    """
    root = Path(input_dir)
    skip_dir = Path(output_dir).resolve() if output_dir is not None else None
    found: list[Path] = []
    for current, dir_names, file_names in os.walk(root):
        current_path = Path(current)
        # Pruning dir_names in place stops os.walk from descending into them.
        dir_names[:] = sorted(
            name
            for name in dir_names
            if not name.startswith(".") and (skip_dir is None or (current_path / name).resolve() != skip_dir)
        )
        for name in file_names:
            if not name.startswith(".") and _is_fits_name(name):
                found.append(current_path / name)
    return sorted(found)


# ----------------------------------------------------------------------------- headers


#: A card the fast lookups read themselves (:class:`HeaderLookup`): a standard keyword, the value
#: indicator in columns 9-10, then a string without quotes inside, a logical, an integer or a real,
#: and nothing but blanks and a comment after it. astropy reads these values the same way
#: (``Card._value_NFSC_RE``); anything else is left to it.
_PLAIN_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8} *")
_PLAIN_VALUE = re.compile(
    r" *(?:'(?P<text>[ -&(-~]*)'|(?P<logical>[TF])|(?P<integer>[+-]?[0-9]+)"
    r"|(?P<real>[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eEdD][+-]?[0-9]+)?)) *(?:/[\s\S]*)?"
)
#: A text astropy may read as a record-valued card ('AXIS.1: 2'), whose keyword it then changes.
_RECORD_VALUED_TEXT = re.compile(r" *[a-zA-Z_][\w.]*:")
_COMMENTARY_KEYWORDS = frozenset({"", "COMMENT", "HISTORY"})
_SPECIAL_KEYWORDS = frozenset({"CONTINUE", "HIERARCH", "END"})  # cards astropy reads its own way
_TO_EXPONENT = str.maketrans("dD", "eE")


@dataclass(frozen=True)
class _ReadCard:
    """A card's keyword and value as astropy gives them (``Card.keyword``, ``Card.value``)."""

    keyword: str
    value: Any


def _read_card(image: str) -> _ReadCard | None:
    """The keyword and value of a plain or commentary card image; None for any other card."""
    name = image[:8]
    keyword = name.rstrip()
    if keyword in _COMMENTARY_KEYWORDS and (keyword or not name.strip()):
        return _ReadCard(keyword, image[8:].rstrip())
    if image[8:10] != "= " or not _PLAIN_KEYWORD.fullmatch(name) or keyword in _SPECIAL_KEYWORDS:
        return None
    match = _PLAIN_VALUE.fullmatch(image, 10)
    if match is None:
        return None
    text, logical, integer, real = match.group("text", "logical", "integer", "real")
    if text is not None:
        return None if _RECORD_VALUED_TEXT.match(text) else _ReadCard(keyword, text.rstrip())
    if logical is not None:
        return _ReadCard(keyword, logical == "T")
    if integer is not None:
        return _ReadCard(keyword, int(integer))
    return _ReadCard(keyword, float(real.translate(_TO_EXPONENT)))


class HeaderLookup:
    """``get``, ``in`` and ``cards`` (keyword and value) of a header, with astropy's answers.

    astropy parses a card's value at its first access, and asks its configuration twice per card
    on the way: for a Seestar header that is half of the header pass. A header made only of plain
    and commentary cards (:func:`_read_card`) is read here once, one regular expression per card.
    :meth:`of` gives None for any other header (CONTINUE, HIERARCH, record-valued, undefined or
    complex values, ...): the header itself then answers.
    """

    __slots__ = ("header", "cards", "repeats_a_keyword", "_first")

    def __init__(self, header: fits.Header, cards: list[_ReadCard]) -> None:
        self.header = header
        self.cards = cards
        self.repeats_a_keyword = False  # a keyword other than commentary on two cards
        self._first: dict[str, Any] = {}
        for card in cards:
            if card.keyword in self._first:
                self.repeats_a_keyword = self.repeats_a_keyword or card.keyword not in _COMMENTARY_KEYWORDS
            else:
                self._first[card.keyword] = card.value

    @classmethod
    def of(cls, header: fits.Header, text: str) -> "HeaderLookup | None":
        """The lookup of ``header``, parsed by astropy from ``text`` (its cards, END excluded)."""
        if len(text) != _CARD * len(header) or not fits.conf.strip_header_whitespace:
            return None
        cards: list[_ReadCard] = []
        for start in range(0, len(text), _CARD):
            card = _read_card(text[start : start + _CARD])
            if card is None:
                return None
            cards.append(card)
        return cls(header, cards)

    def get(self, key: str, default: Any = None) -> Any:
        keyword = key.upper()
        if keyword in _COMMENTARY_KEYWORDS or not _PLAIN_KEYWORD.fullmatch(keyword.ljust(8)):
            return self.header.get(key, default)
        return self._first.get(keyword, default)

    def __contains__(self, key: str) -> bool:
        return key.upper() in self._first


#: A header, or the lookup of its values: what the functions that read cards accept.
HeaderValues = fits.Header | HeaderLookup


def _card_value(header: HeaderValues | dict[str, Any], key: str) -> Any:
    """``header.get(key)``, or None when the card is unparsable (e.g. ``XBAYROFF= NAN``).

    astropy raises ``VerifyError`` on such a card only when its value is asked for; a
    metadata keyword we cannot read is treated as absent instead of failing the frame.
    """
    try:
        return header.get(key)
    except Exception:
        return None


def is_seestar_header(header: HeaderValues | dict[str, Any], force_seestar_mode: bool = False) -> bool:
    """True for ZWO Seestar frames: INSTRUME/CREATOR/TELESCOP mention "seestar", or TELESCOP is S50_*/S30_*."""
    if force_seestar_mode:
        return True
    for key in ("INSTRUME", "CREATOR", "TELESCOP"):
        value = _card_value(header, key)
        if isinstance(value, str) and "seestar" in value.lower():
            return True
    telescope = _card_value(header, "TELESCOP")
    return isinstance(telescope, str) and bool(_SEESTAR_TELESCOPE.match(telescope))


def shift_bayer_pattern(pattern: str, x_offset: int = 0, y_offset: int = 0) -> str:
    """The pattern seen from a crop that starts ``x_offset`` columns and ``y_offset`` rows in."""
    name = pattern.upper()
    if x_offset % 2:
        name = name[1] + name[0] + name[3] + name[2]
    if y_offset % 2:
        name = name[2:] + name[:2]
    return name


def header_bayer_pattern(header: HeaderValues) -> str | None:
    """BAYERPAT (or COLORTYP) shifted by XBAYROFF/YBAYROFF; None when absent or not a Bayer pattern."""
    for key in ("BAYERPAT", "COLORTYP"):
        value = _card_value(header, key)
        if isinstance(value, str) and value.strip().upper() in PATTERNS:
            x_offset = _header_int(header, "XBAYROFF") or 0
            y_offset = _header_int(header, "YBAYROFF") or 0
            return shift_bayer_pattern(value.strip().upper(), x_offset, y_offset)
    return None


def _header_float(header: HeaderValues, *keys: str) -> float | None:
    for key in keys:
        value = _card_value(header, key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                continue
        else:
            continue
        if math.isfinite(number):
            return number
    return None


def _header_int(header: HeaderValues, key: str) -> int | None:
    number = _header_float(header, key)
    return None if number is None else int(round(number))


def _header_str(header: HeaderValues, *keys: str) -> str | None:
    for key in keys:
        value = _card_value(header, key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def parse_sexagesimal(text: str) -> float | None:
    """'12 34 56.7', '12:34:56.7' or '-05 06 07' -> signed decimal value of the first unit."""
    parts = re.split(r"[\s:hdms°'\"]+", text.strip())
    parts = [part for part in parts if part]
    if not parts:
        return None
    try:
        numbers = [abs(float(part)) for part in parts[:3]]
    except ValueError:
        return None
    value = sum(number / 60.0**index for index, number in enumerate(numbers))
    return -value if parts[0].startswith("-") else value


def header_pointing(header: HeaderValues) -> tuple[float | None, float | None]:
    """(RA, Dec) in degrees from RA/DEC (degrees) or OBJCTRA/OBJCTDEC (sexagesimal hours/degrees)."""
    ra = _header_float(header, "RA")
    dec = _header_float(header, "DEC")
    if ra is None:
        text = _header_str(header, "OBJCTRA", "RA")
        hours = parse_sexagesimal(text) if text else None
        ra = None if hours is None else hours * 15.0
    if dec is None:
        text = _header_str(header, "OBJCTDEC", "DEC")
        dec = parse_sexagesimal(text) if text else None
    if ra is not None and not 0.0 <= ra <= 360.0:
        ra = None
    if dec is not None and not -90.0 <= dec <= 90.0:
        dec = None
    return ra, dec


# ----------------------------------------------------------------------------- WCS


def _celestial_axes(header: HeaderValues) -> tuple[int, int] | None:
    """1-based (longitude, latitude) axis numbers from the CTYPEs, or None."""
    n_axes = max(2, int(header.get("NAXIS", 0) or 0), int(header.get("WCSAXES", 0) or 0))
    longitude = latitude = None
    for axis in range(1, min(n_axes, 9) + 1):
        ctype = header.get(f"CTYPE{axis}")
        if not isinstance(ctype, str):
            continue
        name = ctype.strip().upper()
        if name.startswith("RA") or name[1:4] == "LON":
            longitude = longitude or axis
        elif name.startswith("DEC") or name[1:4] == "LAT":
            latitude = latitude or axis
    if longitude is None or latitude is None:
        return None
    return longitude, latitude


def _wcs_header(header: HeaderValues) -> fits.Header:
    """Only the WCS keywords: faster to parse, and no date 'fixes' warnings.

    wcslib silently ignores a keyword it cannot parse (a CRVAL1 of 'NAN' would become
    0), so numeric WCS keywords that are not finite numbers raise ``ValueError`` here.
    """
    reduced = fits.Header()
    bad: list[str] = []
    for card in header.cards:
        keyword = card.keyword
        if not _WCS_KEY.match(keyword):
            continue
        try:
            value = card.value
        except Exception:  # an unparsable card image
            bad.append(keyword)
            continue
        if not _WCS_TEXT_KEY.match(keyword):
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not is_number:
                if keyword not in ("EQUINOX", "EPOCH"):  # 'J2000' and the like: harmless, dropped
                    bad.append(keyword)
                continue
        reduced.append((keyword, value))
    if bad:
        raise ValueError(f"non-numeric or non-finite WCS keyword(s): {', '.join(bad)}")
    return reduced


# The astropy constructor ``WCS(header, relax=True, naxis=axes)`` formats the header to text, parses
# it back three times and reads the SIP cards through ``fits.Header`` lookups: with the reduced
# header it is given (_wcs_header), 2 ms of the header pass's 3.7 ms per frame (0.6 ms this way). What it finally hands to wcslib (and the SIP arrays it builds) is a
# pure function of the WCS cards' values, so :class:`WcsRecipe` computes exactly that, once, as plain
# data, and :func:`wcs_from_recipe` replays the constructor's remaining steps (wcslib parse, axis
# selection, ``fix``, ``set``). Any header this replay might not reproduce (PV/PS cards, duplicate or
# long keywords, text that needs CONTINUE cards, inconsistent SIP keywords) takes astropy's own path.

#: astropy.wcs.wcs.SIP_KW: the SIP coefficient cards that WCS() keeps away from wcslib.
_SIP_COEFFICIENT = re.compile(r"^[AB]P?_1?[0-9]_1?[0-9][A-Z]?$")
#: astropy.io.fits.Card accepts these characters in a string value (Card._ascii_text_re).
_CARD_TEXT = re.compile(r"[ -~]*\Z")
_SipArrays = tuple[Any, Any, Any, Any, tuple[Any, Any]]
#: Highest SIP order the recipe takes (SIP_KW names coefficients up to 19); astropy does the rest.
_MAX_SIP_ORDER = 19


@dataclass(frozen=True)
class WcsRecipe:
    """What ``WCS(_wcs_header(header), relax=True, naxis=axes)`` is made of, as plain (picklable) data.

    ``core`` is the header text the constructor hands to wcslib (SIP coefficients removed),
    ``sip`` the arguments of its :class:`~astropy.wcs.Sip` (or None), ``naxis`` the NAXISn values
    it records. A few hundred bytes: a reader process sends this instead of a WCS (whose
    unpickling costs as much as building it the slow way).
    """

    core: bytes
    axes: tuple[int, ...]
    sip: _SipArrays | None
    naxis: tuple[Any, ...]


def _card_image(keyword: str, value: Any) -> str | None:
    """The 80-character card ``fits.Card(keyword, value)`` formats (no comment); None when astropy
    would make something else of it (HIERARCH, CONTINUE) or refuse it."""
    if len(keyword) > 8:
        return None
    if isinstance(value, str) and not _CARD_TEXT.match(value):
        return None
    image = f"{keyword:8}= {fits_card._format_value(value)}"
    return image.ljust(80) if len(image) <= 80 else None


def _as_reparsed(value: Any, image: str) -> Any:
    """The value astropy reads back from ``image`` (floats go through their 20-character form)."""
    if isinstance(value, str):
        return value
    text = image[10:].strip()
    return int(text) if isinstance(value, int) else float(text)


def _sip_matrix(values: dict[str, Any], prefix: str, order: int) -> Any:
    """As WCS._read_sip_kw: coefficients i + j <= order, the rest zero."""
    matrix = np.zeros((order + 1, order + 1), np.double)
    for i in range(order + 1):
        for j in range(order - i + 1):
            key = f"{prefix}_{i}_{j}"
            if key in values:
                matrix[i, j] = values[key]
    return matrix


def _sip_pair(values: dict[str, Any], first: str, second: str) -> tuple[Any, Any, bool] | None:
    """(first, second, orders consumed) of WCS._read_sip_kw for A/B or AP/BP; None where it raises."""
    first_order, second_order = values.get(f"{first}_ORDER"), values.get(f"{second}_ORDER")
    if any(order is not None and order > _MAX_SIP_ORDER for order in (first_order, second_order)):
        return None
    if first_order is not None and first_order > 1:
        if second_order is None:
            return None
        matrix = _sip_matrix(values, first, int(first_order))
        if int(second_order) > 1:
            return matrix, _sip_matrix(values, second, int(second_order)), True
        return None, None, True
    if second_order is not None and second_order > 1:
        return None
    return None, None, False


def wcs_recipe(header: HeaderValues, axes: tuple[int, ...]) -> WcsRecipe | None:
    """The :class:`WcsRecipe` of the header's WCS cards, or None where astropy's constructor must be
    used (see above) or would refuse the cards (:func:`_wcs_header` then says why)."""
    values: dict[str, Any] = {}
    images: list[tuple[str, str]] = []
    for card in header.cards:
        keyword = card.keyword
        if not _WCS_KEY.match(keyword):
            continue
        if keyword in values or keyword.startswith(("PV", "PS")):
            return None  # duplicates; PV/PS: SCAMP/TPV handling of the constructor
        try:
            value = card.value
        except Exception:
            return None
        if _WCS_TEXT_KEY.match(keyword):
            if not isinstance(value, str) or ": " in value:
                return None  # (a 'field: value' text would make a record-valued card)
        elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            if keyword in ("EQUINOX", "EPOCH"):
                continue  # dropped, as by _wcs_header
            return None
        image = _card_image(keyword, value)
        if image is None:
            return None
        values[keyword] = _as_reparsed(value, image)
        images.append((keyword, image))
    try:
        pair = _sip_pair(values, "A", "B")
        inverse = _sip_pair(values, "AP", "BP")
    except (TypeError, ValueError):
        return None
    if pair is None or inverse is None:
        return None
    if isinstance(values.get("NAXIS"), float):
        return None  # the constructor formats it with ':d' in a warning, and fails where NAXIS < 2
    a, b, drop_ab = pair
    ap, bp, drop_inverse = inverse
    if drop_ab and not all(str(values.get(f"CTYPE{axis}", "")).endswith("-SIP") for axis in (1, 2)):
        return None  # astropy logs a warning about it: leave that to it
    sip: _SipArrays | None = None
    if a is not None or b is not None or ap is not None or bp is not None:
        if "CRPIX1" not in values or "CRPIX2" not in values:
            return None
        sip = (a, b, ap, bp, (values["CRPIX1"], values["CRPIX2"]))
    dropped = {"A_ORDER", "B_ORDER"} if drop_ab else set()
    if drop_inverse:
        dropped |= {"AP_ORDER", "BP_ORDER"}
    core = "".join(
        image for keyword, image in images if keyword not in dropped and not _SIP_COEFFICIENT.match(keyword)
    )
    naxis: list[Any] = []
    while f"NAXIS{len(naxis) + 1}" in values:
        naxis.append(values[f"NAXIS{len(naxis) + 1}"])
    return WcsRecipe(core.encode("ascii"), tuple(axes), sip, tuple(naxis))


def wcs_from_recipe(recipe: WcsRecipe) -> WCS:
    """The WCS ``WCS(header, relax=True, naxis=axes)`` builds, from its :class:`WcsRecipe`.

    The object comes from astropy's own constructor (no header), which sets its bookkeeping
    attributes; the core, SIP and NAXISn are then those the header would have given, and ``fix``
    and ``set`` run as in the constructor.
    """
    wcsprm = Wcsprm(header=recipe.core, key=" ", relax=True, keysel=-1, colsel=None, hdulist=None)
    wcsprm = wcsprm.sub(list(recipe.axes))
    wcs = WCS(naxis=wcsprm.naxis, fix=False, _do_set=False)
    sip = Sip(*recipe.sip) if recipe.sip is not None else None
    WCSBase.__init__(wcs, sip, (None, None), wcsprm, (None, None))
    wcs.naxis = wcsprm.naxis
    wcs.fix(translate_units="")
    wcs.wcs.set()
    wcs._naxis = list(recipe.naxis) if recipe.naxis else [0] * wcs.naxis
    return wcs


_FAST_WCS_CHECKED: bool | None = None  # whether wcs_from_recipe matches WCS() here (checked once)


def _fast_wcs_agrees() -> bool:
    """Whether this astropy builds the same WCS both ways, on a TAN-SIP header with every kind of
    card the recipe handles: a once-per-process guard against astropy changing its constructor."""
    global _FAST_WCS_CHECKED
    if _FAST_WCS_CHECKED is None:
        _FAST_WCS_CHECKED = False
        try:
            import pickle

            header = fits.Header()
            for key, value in _REFERENCE_WCS_CARDS:
                header.append((key, value))
            axes = (1, 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                recipe = wcs_recipe(header, axes)
                fast = wcs_from_recipe(recipe) if recipe is not None else None
                slow = WCS(_wcs_header(header), relax=True, naxis=list(axes))
                grid = np.array([[0.0, 0.0], [1919.0, 0.0], [17.25, 1079.5], [960.0, 540.0]])
                _FAST_WCS_CHECKED = (
                    fast is not None
                    and sorted(fast.__dict__) == sorted(slow.__dict__)
                    and pickle.dumps(fast) == pickle.dumps(slow)
                    and np.array_equal(fast.all_pix2world(grid, 0), slow.all_pix2world(grid, 0))
                )
        except Exception:
            _FAST_WCS_CHECKED = False
    return _FAST_WCS_CHECKED


_REFERENCE_WCS_CARDS: tuple[tuple[str, Any], ...] = (
    ("NAXIS", 2), ("NAXIS1", 1920), ("NAXIS2", 1080), ("WCSAXES", 2),
    ("CTYPE1", "RA---TAN-SIP"), ("CTYPE2", "DEC--TAN-SIP"), ("CUNIT1", "deg"), ("CUNIT2", "deg"),
    ("CRVAL1", 83.81642465753), ("CRVAL2", -5.392885373), ("CRPIX1", 960.5), ("CRPIX2", 540),
    ("CD1_1", -0.000646837167437123), ("CD1_2", 1.5276429935e-4), ("CD2_1", 1.5276429935e-4),
    ("CD2_2", 6.46837167437e-4), ("RADESYS", "ICRS"), ("EQUINOX", 2000.0), ("LONPOLE", 180.0),
    ("A_ORDER", 2), ("A_2_0", 5.8745008779e-07), ("A_1_1", -4.45747325495e-06), ("A_0_2", 2.1368263e-06),
    ("B_ORDER", 2), ("B_2_0", -5.98677723691e-06), ("B_1_1", 2.04670860147e-06), ("B_0_2", -2.2168739e-06),
    ("AP_ORDER", 2), ("AP_2_0", -5.87e-07), ("AP_1_1", 4.457e-06), ("AP_0_2", -2.1368e-06),
    ("BP_ORDER", 2), ("BP_2_0", 5.9867e-06), ("BP_1_1", -2.0467e-06), ("BP_0_2", 2.2168e-06),
)


def _fast_recipe(header: HeaderValues, axes: tuple[int, ...]) -> WcsRecipe | None:
    """:func:`wcs_recipe` where the fast path is known to agree with astropy, else None."""
    if getattr(fits_card, "_format_value", None) is None or not _fast_wcs_agrees():
        return None
    try:
        return wcs_recipe(header, axes)
    except Exception:  # whatever it is, astropy's constructor says it properly
        return None


def _build_celestial_wcs(source: HeaderValues | WCS) -> tuple[WCS | None, str, WcsRecipe | None]:
    """The 2-D celestial WCS (SIP kept) or (None, why it is missing), and the recipe it was
    built from when the fast path could build it (:func:`wcs_recipe`)."""
    if isinstance(source, WCS):
        if not source.has_celestial:
            return None, "no celestial axes", None
        return (source.deepcopy() if source.naxis == 2 else source.celestial), "", None
    if not any(isinstance(source.get(f"CTYPE{axis}"), str) for axis in range(1, 10)):
        return None, "no CTYPE keywords", None
    axes = _celestial_axes(source)
    if axes is None:
        ctypes = ", ".join(str(source.get(f"CTYPE{axis}")) for axis in range(1, 4) if f"CTYPE{axis}" in source)
        return None, f"no celestial axes (CTYPE: {ctypes})", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe = _fast_recipe(source, tuple(sorted(axes)))
        wcs = None
        if recipe is not None:
            try:
                wcs = wcs_from_recipe(recipe)
            except Exception:  # wcslib refuses the cards: astropy's path gives the reason
                recipe = None
        if wcs is None:
            wcs = WCS(_wcs_header(source), relax=True, naxis=sorted(axes))
    if not wcs.has_celestial:
        return None, "no celestial axes", None
    return wcs, "", recipe


def _image_shape_for(source: HeaderValues | WCS, wcs: WCS) -> tuple[int, int] | None:
    """(H, W) of the celestial plane from NAXISn of the header, if known."""
    if not isinstance(source, WCS):
        axes = _celestial_axes(source)
        if axes is not None:
            lon, lat = sorted(axes)
            width, height = source.get(f"NAXIS{lon}"), source.get(f"NAXIS{lat}")
            if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
                return height, width
    if wcs.pixel_shape is not None and len(wcs.pixel_shape) >= 2:
        width, height = wcs.pixel_shape[:2]
        if width and height:
            return int(height), int(width)
    return None


def _wcs_problem(wcs: WCS, shape: tuple[int, int] | None) -> str:
    """Why ``wcs`` cannot be used ('' when it is fine)."""
    core = wcs.wcs
    if not (np.all(np.isfinite(core.crval)) and np.all(np.isfinite(core.crpix))):
        return "non-finite CRVAL/CRPIX"
    matrix = np.asarray(wcs.pixel_scale_matrix, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        return "non-finite CD/PC/CDELT matrix"
    column_scales = np.sqrt((matrix**2).sum(axis=0))
    determinant = abs(float(np.linalg.det(matrix)))
    if not np.all(column_scales > 0) or determinant <= 1e-6 * float(np.prod(column_scales)):
        return "singular CD/PC/CDELT matrix"
    scales_arcsec = column_scales * 3600.0
    if np.any(scales_arcsec < MIN_PIXEL_SCALE_ARCSEC) or np.any(scales_arcsec > MAX_PIXEL_SCALE_ARCSEC):
        return (
            f"pixel scale {scales_arcsec.min():.3g}-{scales_arcsec.max():.3g} arcsec/px outside "
            f"{MIN_PIXEL_SCALE_ARCSEC}-{MAX_PIXEL_SCALE_ARCSEC}"
        )
    if shape is None:
        return ""
    height, width = shape
    pixels = np.array(
        [[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1], [(width - 1) / 2, (height - 1) / 2]],
        dtype=np.float64,
    )
    world = wcs.all_pix2world(pixels, 0)
    if not np.all(np.isfinite(world)):
        return "non-finite footprint (corners do not map to the sky)"
    back = wcs.all_world2pix(world, 0, tolerance=1e-6, maxiter=50, quiet=False)
    error = float(np.max(np.abs(np.asarray(back) - pixels))) if np.all(np.isfinite(back)) else math.inf
    if not error <= MAX_ROUND_TRIP_PX:
        return f"footprint does not map back to pixels (error {error:.3g} px)"
    return ""


def validate_wcs(
    header: HeaderValues | WCS, shape: tuple[int, int] | None = None
) -> tuple[WCS | None, str, str | None, str]:
    """Check a frame's celestial WCS: ``(wcs, status, reason_key, detail)``.

    ``status`` is "valid" (``wcs`` is the 2-D celestial WCS, SIP kept, ``pixel_shape``
    set when the image size is known), "missing" (no celestial WCS keywords,
    ``frame_excluded_no_wcs``) or "invalid" (singular or non-finite matrix, pixel scale
    outside 0.3-15 arcsec/px, footprint not finite or not invertible;
    ``frame_excluded_bad_wcs``). ``shape`` (H, W) defaults to the header's NAXISn.
    """
    return _validate_wcs(header, shape)[:4]


def _validate_wcs(
    header: HeaderValues | WCS, shape: tuple[int, int] | None = None
) -> tuple[WCS | None, str, str | None, str, WcsRecipe | None]:
    """:func:`validate_wcs` and the :class:`WcsRecipe` of a valid WCS where the fast path built it."""
    try:
        wcs, why_missing, recipe = _build_celestial_wcs(header)
    except Exception as exc:  # wcslib rejects the keywords themselves
        return None, "invalid", REASON_BAD_WCS, f"unusable WCS keywords: {exc}".strip(), None
    if wcs is None:
        return None, "missing", REASON_NO_WCS, why_missing, None
    if shape is None:
        shape = _image_shape_for(header, wcs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problem = _wcs_problem(wcs, shape)
    except Exception as exc:  # e.g. NoConvergence of the SIP inverse, wcslib errors
        problem = f"{type(exc).__name__}: {exc}".strip()
    if problem:
        return None, "invalid", REASON_BAD_WCS, problem, None
    if shape is not None:
        wcs.pixel_shape = (shape[1], shape[0])
    return wcs, "valid", None, "", recipe


def wcs_to_dict(wcs: WCS) -> dict[str, Any]:
    """WCS header cards (SIP included) as a JSON-safe dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cards = wcs.to_header(relax=True)
    return {key: _json_value(value) for key, value in cards.items() if key not in ("COMMENT", "HISTORY", "")}


def wcs_from_dict(cards: dict[str, Any], shape: tuple[int, int] | None = None) -> WCS:
    """Inverse of :func:`wcs_to_dict`."""
    header = fits.Header()
    for key, value in cards.items():
        header[key] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = WCS(header, relax=True)
    if shape is not None:
        wcs.pixel_shape = (shape[1], shape[0])
    return wcs


# ----------------------------------------------------------------------------- file structure


@dataclass(frozen=True)
class _ImagePlan:
    """Which HDU holds the image and how its axes are laid out."""

    hdu_index: int
    header: fits.Header
    shape: tuple[int, int]
    layout: str  # "cfa" | "mono" | "rgb_chw" | "rgb_hwc"
    bayer_pattern: str | None
    lookup: HeaderLookup | None = None  # the header's values, where HeaderLookup reads them


def _data_nbytes(raw_header: HeaderValues) -> int:
    """Bytes of the data unit announced by a raw (on-disk) header, padding excluded."""
    n_axes = int(raw_header.get("NAXIS", 0) or 0)
    if not 0 < n_axes <= MAX_FITS_AXES:
        return 0
    count = 1
    for axis in range(1, n_axes + 1):
        count *= int(raw_header.get(f"NAXIS{axis}", 0) or 0)
    bytes_per_value = abs(int(raw_header.get("BITPIX", 8))) // 8
    groups = int(raw_header.get("GCOUNT", 1) or 1)
    heap = int(raw_header.get("PCOUNT", 0) or 0)
    return bytes_per_value * groups * (heap + count)


def _raw_header(hdul: fits.HDUList, index: int, path: Path) -> fits.Header:
    """The header exactly as stored (for a compressed HDU: the binary-table header)."""
    hdu = hdul[index]
    if not isinstance(hdu, fits.CompImageHDU):
        return hdu.header
    with open(path, "rb") as handle:
        handle.seek(hdul[index].fileinfo()["hdrLoc"])
        return fits.Header.fromfile(handle)


def _check_data_present(hdul: fits.HDUList, index: int, path: Path, file_size: int) -> None:
    """Raise ``frame_excluded_truncated`` if the file ends before the HDU's data does."""
    # hdul[index].fileinfo(), not hdul.fileinfo(index): the latter reads every HDU of the file.
    expected_end = int(hdul[index].fileinfo()["datLoc"]) + _data_nbytes(_raw_header(hdul, index, path))
    if expected_end > file_size:
        raise FrameError(
            REASON_TRUNCATED,
            f"file has {file_size} bytes, its header announces {expected_end}",
            path=str(path),
        )


def _classify_image(header: HeaderValues, dims: list[int]) -> tuple[tuple[int, int], str] | str:
    """((H, W), layout) for a supported image; else a detail string saying why not.

    ``dims`` are NAXIS1..NAXISn (FITS order, fastest first).
    """
    if len(dims) == 2:
        width, height = dims
        pattern = header_bayer_pattern(header)
        layout = "cfa" if pattern and height >= 2 and width >= 2 else "mono"
        return (height, width), layout
    if len(dims) == 3:
        first, second, third = dims
        if third == 3:
            return (second, first), "rgb_chw"
        if first == 3:
            return (third, second), "rgb_hwc"
        if third == 1:
            return _classify_image(header, [first, second])
        return f"3-D image with {third} planes (NAXIS = {dims}); expected 1 or 3 colour planes"
    return f"{len(dims)}-D image (NAXIS = {dims}); expected 2-D or 3-D"


def _find_image(hdul: fits.HDUList, path: Path) -> _ImagePlan:
    """The first HDU with a supported 2-D/3-D image (reading HDUs lazily, stopping there)."""
    unsupported = ""
    index = 0
    while True:
        absurd = _absurd_naxis_after(hdul, index, path)
        if absurd:
            unsupported = unsupported or absurd
            break
        try:
            hdu = hdul[index]
        except IndexError:
            break
        except Exception as exc:  # a later HDU's header is cut or damaged
            if unsupported:
                break
            raise FrameError(REASON_TRUNCATED if _looks_cut(exc) else REASON_UNREADABLE, str(exc), path=str(path))
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            header = hdu.header
            n_axes = int(header.get("NAXIS", 0) or 0)
            if not 0 <= n_axes <= MAX_FITS_AXES:  # however astropy read it (e.g. a card it repaired)
                unsupported = unsupported or f"HDU {index}: NAXIS = {n_axes} (FITS allows 0 to {MAX_FITS_AXES})"
                break
            dims = [int(header.get(f"NAXIS{axis}", 0) or 0) for axis in range(1, n_axes + 1)]
            conflict = _conflicting_structure(header, n_axes)
            if conflict:
                raise FrameError(REASON_UNREADABLE, f"HDU {index}: {conflict}", path=str(path))
            if n_axes > 0 and all(size > 0 for size in dims):
                classified = _classify_image(header, dims)
                if isinstance(classified, str):
                    unsupported = unsupported or f"HDU {index}: {classified}"
                else:
                    shape, layout = classified
                    pattern = header_bayer_pattern(header) if layout == "cfa" else None
                    return _ImagePlan(index, header, shape, layout, pattern)
        index += 1
    if unsupported:
        raise FrameError(REASON_UNSUPPORTED_SHAPE, unsupported, path=str(path))
    raise FrameError(REASON_NO_IMAGE, f"{index} HDU(s), none with 2-D or 3-D image data", path=str(path))


def _conflicting_structure(header: HeaderValues, n_axes: int) -> str:
    """'' unless BITPIX/NAXIS/NAXISn appear twice with different values.

    Readers disagree on such a header (``header.get`` sees the first card, astropy's data
    reader the last), so the frame would load with another shape than the header pass found.
    """
    wanted = {"BITPIX", "NAXIS", *(f"NAXIS{axis}" for axis in range(1, n_axes + 1))}
    seen: dict[str, list[Any]] = {}
    for card in header.cards:
        if card.keyword in wanted:
            try:
                seen.setdefault(card.keyword, []).append(card.value)
            except Exception:
                seen.setdefault(card.keyword, []).append(card.image)
    for keyword, values in seen.items():
        if len(set(map(repr, values))) > 1:
            return f"{keyword} is given {len(values)} times with different values ({', '.join(map(str, values))})"
    return ""


def _raw_naxis_values(path: Path, offset: int) -> list[int]:
    """Integer values of every NAXIS card of the raw header starting at ``offset``.

    Every card counts, duplicates included: which one a reader uses differs between readers.
    Reads header blocks up to the END card (at most :data:`_MAX_HEADER_BLOCKS`).
    """
    with open(path, "rb") as handle:
        handle.seek(offset)
        return _naxis_values_from(handle)


def _naxis_values_from(handle: Any, first_block: bytes | None = None) -> list[int]:
    """:func:`_raw_naxis_values` from an open file, its first header block possibly read already."""
    return _scan_header(handle, first_block)[0]


def _scan_header(handle: Any, first_block: bytes | None = None) -> tuple[list[int], bytes | None]:
    """The NAXIS values of :func:`_naxis_values_from`, and the header's blocks through the one
    holding its END card (None where the header has none within :data:`_MAX_HEADER_BLOCKS`)."""
    values: list[int] = []
    blocks: list[bytes] = []
    for number in range(_MAX_HEADER_BLOCKS):
        block = first_block if number == 0 and first_block is not None else handle.read(_FITS_BLOCK)
        if not block:
            break
        blocks.append(block)
        for start in range(0, len(block) - _CARD + 1, _CARD):
            card = block[start : start + _CARD]
            if card[:8] == b"END     ":
                return values, b"".join(blocks) if len(block) == _FITS_BLOCK else None
            value = _raw_naxis_value(card)
            if value is not None:
                values.append(value)
    return values, None


def _raw_naxis_value(card: bytes) -> int | None:
    """The integer astropy reads from a card image it takes for NAXIS; None for any other card.

    astropy is lenient: the keyword in any case and the value indicator anywhere in the first
    nine columns (``naxis  = 2147483647`` is NAXIS to it).
    """
    indicator = card.find(b"= ", 0, 10)
    if indicator < 0 or card[:indicator].strip().upper() != b"NAXIS":
        return None
    try:
        return int(card[indicator + 2 :].split(b"/", 1)[0].strip())
    except ValueError:
        return None  # not an integer: astropy refuses it quickly by itself


def _naxis_problem(path: Path, offset: int, index: int, values: list[int] | None = None) -> str:
    """Why the HDU whose header starts at ``offset`` must not be handed to astropy ('' when it may be).

    astropy lists NAXIS1..NAXISn while it *opens* an HDU, so ``NAXIS = 2147483647`` (or a second
    NAXIS card saying so) would hang ``fits.open`` for hours, growing in memory; FITS allows 0..999.
    ``values``: that header's NAXIS values, when already read.
    """
    if values is None:
        try:
            values = _raw_naxis_values(path, offset)
        except OSError:
            return ""  # astropy will say what is wrong with the file
    absurd = [value for value in values if not 0 <= value <= MAX_FITS_AXES]
    if absurd:
        return f"HDU {index}: NAXIS = {absurd[0]} (FITS allows 0 to {MAX_FITS_AXES})"
    return ""


def _absurd_naxis_after(hdul: fits.HDUList, index: int, path: Path) -> str:
    """:func:`_naxis_problem` of HDU ``index`` (> 0), read raw where astropy says it starts."""
    if index == 0:
        return ""  # checked before the file was opened
    try:
        previous = hdul[index - 1].fileinfo()  # (HDUList.fileinfo would read every HDU)
        offset = int(previous["datLoc"]) + int(previous["datSpan"])
    except Exception:  # astropy reports a damaged structure itself when asked for the HDU
        return ""
    return _naxis_problem(path, offset, index)


def _looks_cut(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("truncat", "end card", "eof", "end of file", "empty or corrupt"))


def _check_file_start(path: Path) -> int:
    """File size after the cheap checks every FITS file must pass (exists, non-empty, 'SIMPLE  =')."""
    return _read_file_start(path)[0]


def _read_file_start(path: Path) -> tuple[int, bytes | None]:
    """:func:`_check_file_start`, and the primary header's blocks through its END card (None where
    they could not be told apart), read in the same open."""
    naxis_values: list[int] | None = None
    header_blocks: bytes | None = None
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            start = handle.read(_FITS_BLOCK)
            if size >= _FITS_BLOCK and start.startswith(b"SIMPLE  ="):
                # The primary header's NAXIS cards, read on from the block in hand (one open).
                try:
                    if len(start) == _FITS_BLOCK:
                        naxis_values, header_blocks = _scan_header(handle, start)
                    else:  # a short read: start over, block-aligned
                        handle.seek(0)
                        naxis_values, header_blocks = _scan_header(handle)
                except OSError:
                    naxis_values = []  # astropy will say what is wrong with the file
    except OSError as exc:
        raise FrameError(REASON_UNREADABLE, f"{type(exc).__name__}: {exc}", path=str(path)) from None
    if size == 0:
        raise FrameError(REASON_EMPTY_FILE, "0 bytes", path=str(path))
    if not start.startswith(b"SIMPLE  ="):
        raise FrameError(REASON_NOT_FITS, "the file does not start with the FITS keyword SIMPLE", path=str(path))
    if size < _FITS_BLOCK:
        raise FrameError(REASON_TRUNCATED, f"{size} bytes, shorter than one FITS header block", path=str(path))
    problem = _naxis_problem(path, 0, 0, naxis_values)
    if problem:
        raise FrameError(REASON_UNSUPPORTED_SHAPE, problem, path=str(path))
    return size, header_blocks


#: The integer BITPIX values FITS defines: any other one is left to astropy to report.
_FITS_BITPIX = frozenset({8, 16, 32, 64, -32, -64})
_BLANK_END_CARD = b"END" + b" " * (_CARD - 3)
#: A card astropy takes for the END of the header (``header.HEADER_END_RE``, its 'invalid' form).
_ENDS_HEADER = re.compile(rb"END(?:$| {0,76}[^A-Z0-9_-])")


def _plain_primary_image(path: Path, header_blocks: bytes, file_size: int) -> _ImagePlan | None:
    """The :class:`_ImagePlan` of a file whose primary HDU is a supported image, from its header
    blocks as read (astropy's ``fits.open`` gives the same header, from the same text, and costs
    a third of the whole header pass); None for anything else, which astropy's path then reads.

    Only the plain case is taken: one unambiguous END card followed by blank padding, ASCII text,
    cards that :class:`HeaderLookup` reads with no keyword given twice, ``SIMPLE = T`` first, no
    random groups, a FITS BITPIX, 2 or 3 positive axes that :func:`_classify_image` supports, no
    group or parameter counts but 1 and 0, and a file that ends with the data's padding
    (anything after it is another HDU to astropy).
    """
    end = next(
        (start for start in range(0, len(header_blocks), _CARD) if header_blocks[start : start + 8] == b"END     "), None
    )
    if end is None or header_blocks[end : end + _CARD] != _BLANK_END_CARD:
        return None
    if header_blocks[end + _CARD :].strip(b" ") or not header_blocks.isascii():
        return None
    if any(_ENDS_HEADER.match(header_blocks, start) for start in range(0, end, _CARD)):
        return None  # astropy ends the header at this card too ('END = 0', 'END/'): its path says so
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = header_blocks[:end].decode("ascii")
            header = fits.Header.fromstring(text)
            lookup = HeaderLookup.of(header, text)
            if lookup is None or lookup.repeats_a_keyword:
                return None
            first = lookup.cards[0]
            if first.keyword != "SIMPLE" or first.value is not True or "GROUPS" in lookup:
                return None
            bitpix, n_axes = lookup.get("BITPIX"), lookup.get("NAXIS")
            if type(bitpix) is not int or bitpix not in _FITS_BITPIX or type(n_axes) is not int or n_axes not in (2, 3):
                return None
            dims = [lookup.get(f"NAXIS{axis}") for axis in range(1, n_axes + 1)]
            if not all(type(size) is int and size > 0 for size in dims):
                return None
            if lookup.get("GCOUNT", 1) != 1 or lookup.get("PCOUNT", 0) != 0:
                return None  # (astropy sizes a primary image without them)
            data_end = len(header_blocks) + _data_nbytes(lookup)
            if not data_end <= file_size <= data_end + (-data_end) % _FITS_BLOCK:
                return None  # data cut short, or more after it: fits.open reads on (and may set EXTEND)
            classified = _classify_image(lookup, dims)
            if isinstance(classified, str):
                return None
            shape, layout = classified
            pattern = header_bayer_pattern(lookup) if layout == "cfa" else None
    except Exception:  # whatever it is, astropy's path reports it
        return None
    return _ImagePlan(0, header, shape, layout, pattern, lookup)


def _read_plain_primary(path: Path) -> tuple[int, bytes | None, _ImagePlan | None]:
    """:func:`_read_file_start`, and the plan of a plain primary image (:func:`_plain_primary_image`)
    where the file is one."""
    file_size, header_blocks = _read_file_start(path)
    plain = _plain_primary_image(path, header_blocks, file_size) if header_blocks else None
    return file_size, header_blocks, plain


def header_values_from_file(path: str | os.PathLike[str], hdu_index: int) -> HeaderValues | None:
    """The header of a frame's image HDU read again from its file, as the header pass reads it
    (a plain primary image's through :class:`HeaderLookup`), e.g. by a reader process that rebuilds
    the frame's WCS; None if it cannot be read."""
    path = Path(path)
    try:
        if hdu_index == 0:
            plain = _read_plain_primary(path)[2]
            if plain is not None:
                return plain.lookup
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_fits(path, memmap=True) as hdul:
                return fits.Header(hdul[hdu_index].header, copy=True)
    except Exception:  # the reader then asks for the frame with its WCS
        return None


def _open_fits(path: Path, **options: Any) -> fits.HDUList:
    return fits.open(path, mode="readonly", lazy_load_hdus=True, **options)


# ----------------------------------------------------------------------------- header pass


def read_frame_info(
    path: str | os.PathLike[str], *, auto_detect_seestar: bool = True, force_seestar_mode: bool = False
) -> FrameInfo:
    """Read one frame's headers (never its pixels) into a :class:`FrameInfo`.

    Raises :class:`FrameError` for files that cannot be used at all; WCS problems are
    recorded in ``wcs_status``/``wcs_reason``/``wcs_detail`` instead.
    """
    return _read_frame(Path(path), auto_detect_seestar, force_seestar_mode)[0]


def _read_frame(
    frame_path: Path, auto_detect_seestar: bool, force_seestar_mode: bool
) -> tuple[FrameInfo, WcsRecipe | None]:
    """:func:`read_frame_info`, and the recipe of its WCS when the fast path built it."""
    file_size, _, plain = _read_plain_primary(frame_path)
    if plain is not None:
        return _frame_info_from_header(frame_path, plain, plain.header, auto_detect_seestar, force_seestar_mode)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_fits(frame_path, memmap=True) as hdul:
                plan = _find_image(hdul, frame_path)
                _check_data_present(hdul, plan.hdu_index, frame_path, file_size)
                header = plan.header
                if type(hdul[plan.hdu_index]) not in (fits.PrimaryHDU, fits.ImageHDU) or type(header) is not fits.Header:
                    # A compressed image's header is derived from its table's: a plain copy keeps
                    # nothing of it alive. A primary or image HDU's header holds only its cards, so
                    # it is kept as it is (a copy cost a quarter of a millisecond per frame).
                    header = fits.Header(header, copy=True)
    except FrameError:
        raise
    except Exception as exc:
        reason = REASON_TRUNCATED if _looks_cut(exc) else REASON_UNREADABLE
        raise FrameError(reason, f"{type(exc).__name__}: {exc}", path=str(frame_path)) from None
    return _frame_info_from_header(frame_path, plan, header, auto_detect_seestar, force_seestar_mode)


def _frame_info_from_header(
    path: Path, plan: _ImagePlan, header: fits.Header, auto_detect_seestar: bool, force_seestar_mode: bool
) -> tuple[FrameInfo, WcsRecipe | None]:
    values = plan.lookup if plan.lookup is not None else header  # where the cards' values are read
    ra, dec = header_pointing(values)
    focal = _header_float(values, "FOCALLEN")
    pixel = _header_float(values, "XPIXSZ", "PIXSIZE1", "PIXSIZE")
    scale = 206.265 * pixel / focal if focal and pixel and focal > 0 and pixel > 0 else None
    if scale is not None and not math.isfinite(scale):  # e.g. XPIXSZ = 1E300, FOCALLEN = 1E-300
        scale = None
    exposure = _header_float(values, "EXPTIME", "EXPOSURE")
    wcs, status, reason, detail, recipe = _validate_wcs(values, plan.shape)
    is_seestar = force_seestar_mode or (auto_detect_seestar and is_seestar_header(values))
    info = FrameInfo(
        path=path,
        shape=plan.shape,
        n_channels=3 if plan.layout.startswith("rgb") else 1,
        layout=plan.layout,
        bayer_pattern=plan.bayer_pattern,
        exposure_s=exposure if exposure is not None and exposure >= 0 else None,
        date_obs=_header_str(values, "DATE-OBS"),
        eqmode=_header_int(values, "EQMODE"),
        ra_deg=ra,
        dec_deg=dec,
        focal_mm=focal,
        pixel_um=pixel,
        header_scale_arcsec=scale,
        instrument=_header_str(values, "INSTRUME"),
        is_seestar=bool(is_seestar),
        wcs=wcs,
        wcs_status=status,
        wcs_reason=reason,
        hdu_index=plan.hdu_index,
        header=header,
        wcs_detail=detail,
    )
    return info, recipe


# ----------------------------------------------------------------------------- header pass, many files

#: Inputs of at least this many files are read with reader processes beside the main one; fewer
#: are read in the main process alone. Until the forkserver has started (0.6 s: it imports the
#: engine) the main process reads on its own, so a first pass of a few hundred files gains little;
#: but runs of this size start the forkserver anyway (P2's quality metrics and P3's readers use
#: it from 48 frames on), and starting it here, beside the reading, takes it off their path.
PROCESS_HEADER_MIN_FILES = 64
#: ... and only on hosts with this many cores: on fewer, the forkserver's start (0.6 s of a core)
#: and the readers share the cores with the main process, which leaves too little to win.
PROCESS_HEADER_MIN_CORES = 4
#: Most files per reader task: enough to amortise a task's round trip, few enough to share the
#: work evenly and to keep the main process busy while the readers start.
_MAX_HEADER_CHUNK = 8

#: What a reader sends back per file: ("frame", FrameInfo without WCS, recipe) or
#: ("error", reason_key, detail, params) (a FrameError itself does not survive pickling).
_Shipped = tuple[Any, ...]


def _read_outcome(path: Path, auto_detect_seestar: bool, force_seestar_mode: bool) -> FrameInfo | FrameError:
    try:
        return _read_frame(path, auto_detect_seestar, force_seestar_mode)[0]
    except FrameError as exc:
        return exc


def _read_chunk(paths: list[Path], auto_detect_seestar: bool, force_seestar_mode: bool) -> list[_Shipped]:
    """The header pass of some files, in a reader process.

    The WCS does not travel (unpickling one costs the main process as much as building it
    through astropy): its recipe does, and the main process builds it again from that
    (:func:`wcs_from_recipe`, 0.1 ms), or through astropy where there is no recipe.
    """
    shipped: list[_Shipped] = []
    for path in paths:
        try:
            info, recipe = _read_frame(Path(path), auto_detect_seestar, force_seestar_mode)
        except FrameError as exc:
            shipped.append(("error", exc.reason_key, exc.detail, exc.params))
            continue
        info.wcs = None
        shipped.append(("frame", info, recipe))
    return shipped


def stamped_identity(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int], dict[str, Any]] | None:
    """The file's resume identity (:func:`.resume.stamped_file_identity`), for reader processes to
    compute beside their read (the run's signatures would otherwise read every header again in the
    main process); None when it cannot be read."""
    from .resume import stamped_file_identity

    try:
        return stamped_file_identity(path)
    except OSError:
        return None


def _unship(item: _Shipped) -> FrameInfo | FrameError:
    """The outcome :func:`read_frame_info` gives in this process for a reader's answer."""
    if item[0] == "error":
        _, reason_key, detail, params = item
        return FrameError(reason_key, detail, **{key: value for key, value in params.items() if key != "detail"})
    _, info, recipe = item
    if info.wcs_status == "valid":
        wcs = None
        if recipe is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    wcs = wcs_from_recipe(recipe)
                wcs.pixel_shape = (info.shape[1], info.shape[0])
            except Exception:
                wcs = None
        if wcs is None:  # the reader went through astropy's constructor: so does this process
            wcs = validate_wcs(info.header, info.shape)[0]
        info.wcs = wcs
    return info


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _header_readers(n_files: int, workers: int, min_files: int) -> int:
    """How many reader processes the header pass of ``n_files`` files gets (0: none)."""
    import multiprocessing

    if n_files < max(2, min_files):
        return 0
    if multiprocessing.current_process().daemon:  # a daemonic process cannot have children
        return 0
    from .mosaic_first import _main_module_is_importable

    if not _main_module_is_importable():
        return 0
    cores = _available_cores()
    if cores < PROCESS_HEADER_MIN_CORES:
        return 0
    count = workers if workers > 0 else cores - 1  # the main process reads too
    return max(0, min(count, n_files - 1))


class _SharedHeaderPass:
    """The chunks of a file list, read by the main process from the front and by a pool of reader
    processes from the back, until they meet.

    The pool is started, and fed, by a thread: starting the forkserver blocks for as long as it
    takes to import the engine there (0.6 s here), and the main process reads files meanwhile.
    A chunk given to the pool that the main process reaches before the pool has answered
    anything (still starting) is read by the main process too, and one whose task failed (pool
    broken, a process killed) is read again there, so the outcome is always the serial one.
    """

    def __init__(
        self, chunks: list[list[Path]], auto_detect_seestar: bool, force_seestar_mode: bool, readers: int
    ) -> None:
        import threading

        self._chunks = chunks
        self._args = (auto_detect_seestar, force_seestar_mode)
        self._readers = readers
        self._lock = threading.Lock()
        self._front = 0  # chunks below this are the main process's
        self._back = len(chunks)  # chunks from this one on are the pool's
        self._answers: dict[int, Any] = {}  # chunk -> Future of its shipped outcomes
        self._answering = threading.Event()  # the pool has answered a task: it is up
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="zemosaic-header-readers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more chunks for the pool; it is shut down (pending tasks cancelled) by the feeding
        thread, so that the main process never waits for a forkserver that is still starting."""
        self._stopped.set()

    def take(self, index: int) -> list[_Shipped] | None:
        """The pool's answer for chunk ``index``, or None: the main process reads it itself."""
        with self._lock:
            if index < self._back:
                self._front = index + 1
                return None
            answer = self._answers[index]
        if not answer.done() and not self._answering.is_set():
            return None
        try:
            return answer.result()
        except Exception:
            return None

    def _claim(self) -> tuple[int, Any] | None:
        from concurrent.futures import Future

        with self._lock:
            if self._back - 1 < self._front:
                return None
            self._back -= 1
            answer: Future = Future()
            self._answers[self._back] = answer
            return self._back, answer

    def _feed(self) -> None:
        import threading
        from concurrent.futures import ProcessPoolExecutor

        from .worker_env import process_context

        pool = None
        claimed: list[Any] = []
        try:
            pool = ProcessPoolExecutor(max_workers=self._readers, mp_context=process_context())
            # Two tasks per reader in flight: enough to keep them busy, while the chunks not yet
            # given out stay with the main process.
            slots = threading.Semaphore(2 * self._readers)
            while not self._stopped.is_set():
                if not slots.acquire(timeout=0.05):
                    continue
                claim = self._claim()
                if claim is None:
                    break
                index, answer = claim
                claimed.append(answer)
                task = pool.submit(_read_chunk, self._chunks[index], *self._args)
                task.add_done_callback(lambda done, answer=answer: self._settle(done, answer, slots))
            self._stopped.wait()
        except BaseException as exc:  # the pool cannot start or broke: the main process reads the rest
            self._stopped.set()
            for answer in claimed:
                if not answer.done():
                    answer.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _settle(self, task: Any, answer: Any, slots: Any) -> None:
        slots.release()
        if answer.done():
            return
        if task.cancelled():
            answer.cancel()
        elif task.exception() is not None:
            answer.set_exception(task.exception())
        else:
            self._answering.set()
            answer.set_result(task.result())


def iter_frame_infos(
    paths: Sequence[str | os.PathLike[str]],
    *,
    auto_detect_seestar: bool = True,
    force_seestar_mode: bool = False,
    workers: int = 0,
    min_files: int | None = None,
) -> Iterator[FrameInfo | FrameError]:
    """:func:`read_frame_info` of every path, in order: the FrameInfo, or the FrameError it raises.

    From ``min_files`` (default :data:`PROCESS_HEADER_MIN_FILES`) files on, on hosts of
    :data:`PROCESS_HEADER_MIN_CORES` cores or more, reader processes (``workers``; 0: one per
    core but one) share the work with this process (:class:`_SharedHeaderPass`), which still
    yields each outcome in order as soon as it is known; the outcomes are those of the serial
    pass, WCS included (rebuilt here from its recipe). Closing the iterator stops the readers.
    """
    files = [Path(path) for path in paths]
    readers = _header_readers(len(files), workers, PROCESS_HEADER_MIN_FILES if min_files is None else min_files)
    if readers == 0:
        for path in files:
            yield _read_outcome(path, auto_detect_seestar, force_seestar_mode)
        return
    size = max(1, min(_MAX_HEADER_CHUNK, len(files) // (4 * (readers + 1))))
    chunks = [files[start : start + size] for start in range(0, len(files), size)]
    shared = _SharedHeaderPass(chunks, auto_detect_seestar, force_seestar_mode, readers)
    shared.start()
    try:
        for index, chunk in enumerate(chunks):
            answer = shared.take(index)
            if answer is None:
                for path in chunk:
                    yield _read_outcome(path, auto_detect_seestar, force_seestar_mode)
            else:
                for item in answer:
                    yield _unship(item)
    finally:
        shared.stop()


# ----------------------------------------------------------------------------- pixels


def _scaled_pixels(raw: np.ndarray, header: fits.Header) -> tuple[np.ndarray, bool]:
    """Apply BZERO/BSCALE/BLANK exactly; returns (native-endian array, may_hold_nan).

    The result stays uint16/uint8 when that is exact (half the bytes to move to a GPU);
    other data become float32 via float64 arithmetic (one rounding at the end).
    """
    bscale = _header_float(header, "BSCALE")
    bzero = _header_float(header, "BZERO")
    bscale = 1.0 if bscale is None else bscale
    bzero = 0.0 if bzero is None else bzero
    if raw.dtype.kind in "iu":
        blank = _header_int(header, "BLANK")
        has_blank = blank is not None and bool(np.any(raw == blank))
        if not has_blank and bscale == 1.0:
            if raw.dtype.itemsize == 2 and raw.dtype.kind == "i" and bzero == 32768.0:
                # int16 + 32768 == uint16 with the top bit flipped: exact, and one pass
                # (the ufunc also swaps FITS big-endian bytes to native order).
                unsigned = raw.view(raw.dtype.str.replace("i", "u"))  # '>i2' -> '>u2'
                return np.bitwise_xor(unsigned, np.uint16(0x8000), dtype=np.uint16), False
            if bzero == 0.0 and raw.dtype.itemsize <= 2:
                return raw.astype(raw.dtype.newbyteorder("=")), False
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = (raw.astype(np.float64) * bscale + bzero).astype(np.float32)
        if has_blank:
            scaled[raw == blank] = np.nan
        overflowed = _out_of_range_to_nan(scaled)
        return scaled, has_blank or overflowed
    with np.errstate(over="ignore", invalid="ignore"):
        values = raw.astype(np.float32) if bscale == 1.0 and bzero == 0.0 else (
            raw.astype(np.float64) * bscale + bzero
        ).astype(np.float32)
    _out_of_range_to_nan(values)
    return values, True


def _out_of_range_to_nan(values: np.ndarray) -> bool:
    """Mark pixels beyond :data:`MAX_PIXEL_MAGNITUDE` (inf included) as undefined (NaN), in place.

    An infinity would poison every mean and sigma it enters, and values near the float32 limit
    overflow to one in the debayer averages or the stack sums; NaN is what the stackers skip.
    Returns True if any pixel was changed.
    """
    with np.errstate(invalid="ignore"):
        out_of_range = np.abs(values) > MAX_PIXEL_MAGNITUDE
    if not out_of_range.any():
        return False
    values[out_of_range] = np.nan
    return True


@contextmanager
def _unscaled_image_hdu(path: Path, hdu_index: int, file_size: int, memmap: bool) -> Iterator[Any]:
    """The frame's image HDU opened by astropy without scaling, once the file is known to hold its data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _open_fits(path, memmap=memmap, do_not_scale_image_data=True) as hdul:
            _check_data_present(hdul, hdu_index, path, file_size)
            yield hdul[hdu_index]


def _read_raw_image(info: FrameInfo) -> tuple[np.ndarray, fits.Header]:
    """The unscaled data array of the frame's image HDU and that HDU's header."""
    path = Path(info.path)
    file_size = _check_file_start(path)
    try:
        with _unscaled_image_hdu(path, info.hdu_index, file_size, memmap=False) as hdu:
            raw = hdu.data
            header = hdu.header
            if raw is None:
                raise FrameError(REASON_NO_IMAGE, f"HDU {info.hdu_index} has no data", path=str(path))
            raw = np.asarray(raw)
    except FrameError:
        raise
    except Exception as exc:
        reason = REASON_TRUNCATED if _looks_cut(exc) else REASON_UNREADABLE
        raise FrameError(reason, f"{type(exc).__name__}: {exc}", path=str(path)) from None
    return raw, header


@dataclass(frozen=True)
class RawPixels:
    """Where a frame's integer pixels lie in its file, for the integer formats that
    :func:`_scaled_pixels` keeps exact (BITPIX 8, or 16 with BZERO 0 or 32768, BSCALE 1, no BLANK).

    A reader process sends this (a few bytes) instead of the pixels (megabytes through a pipe,
    unpickled by the receiving process); the receiver reads them itself (:meth:`load`, the read
    releases the GIL) and decodes them on its array module with the values of :func:`_scaled_pixels`:
    on CuPy the big-endian bytes travel to the device as they are and are swapped there.
    """

    path: str
    offset: int  # byte offset of the data in the file
    shape: tuple[int, ...]  # as astropy gives the data array (NAXISn reversed)
    bitpix: int  # 8 or 16
    flip_sign: bool  # BITPIX 16 with BZERO 32768: uint16 = the int16 bits with the top bit flipped

    def read(self, into: np.ndarray | None = None) -> np.ndarray:
        """The raw big-endian values, shaped; read into ``into`` (e.g. pinned memory) when given."""
        dtype = np.dtype(">i2" if self.bitpix == 16 else "u1")
        count = math.prod(self.shape)
        raw = np.empty(count, dtype=dtype) if into is None else into.reshape(-1).view(dtype)
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                got = handle.readinto(memoryview(raw.view(np.uint8))) // dtype.itemsize
        except OSError as exc:
            raise FrameError(REASON_UNREADABLE, f"{type(exc).__name__}: {exc}", path=self.path) from None
        if got != count:
            raise FrameError(REASON_TRUNCATED, f"{got} of {count} pixels in the file", path=self.path)
        return raw.reshape(self.shape)

    def read_for_device(self, extra: np.ndarray | None = None) -> "StagedPixels":
        """:meth:`read` into page-locked memory (CuPy's pinned pool), whose copy to the device
        runs asynchronously on the copying thread's stream; ordinary memory without CuPy.

        ``extra``: a small array staged after the pixels in the same buffer (a frame's control
        grid), so that one copy takes both to the device (:class:`StagedPixels`)."""
        dtype = np.dtype(np.uint8 if self.bitpix == 8 else np.uint16)
        raw_bytes = math.prod(self.shape) * dtype.itemsize
        offset = -(-raw_bytes // _STAGING_ALIGN) * _STAGING_ALIGN
        extra = None if extra is None else np.ascontiguousarray(extra)
        total = offset + (0 if extra is None else extra.nbytes)
        # Sizes rounded up, so that frames of one shape reuse the pool's buffers (it keeps them by size).
        allocated = -(-total // _STAGING_ROUND) * _STAGING_ROUND
        try:
            import cupyx

            buffer = cupyx.empty_pinned((allocated,), dtype=np.uint8)[:total]
        except Exception:  # no CuPy or no pinned memory left: an ordinary buffer reads the same
            buffer = np.empty(total, dtype=np.uint8)
        raw = self.read(buffer[:raw_bytes])
        staged_extra = None
        if extra is not None:
            staged_extra = buffer[offset:total].view(extra.dtype).reshape(extra.shape)
            staged_extra[...] = extra
        return StagedPixels(buffer, raw, staged_extra, offset)

    def load(self, xp: Any = np, raw: np.ndarray | None = None) -> Any:
        """The decoded pixels on ``xp``: uint16 (BZERO 32768), int16 or uint8, as :func:`_scaled_pixels`.

        ``raw``: the values :meth:`read` already gave (a prefetch), instead of reading now.
        """
        raw = self.read() if raw is None else raw
        if self.bitpix == 8:
            return xp.asarray(raw)
        if getattr(xp, "cuda", None) is None:  # NumPy: exactly the fast paths of _scaled_pixels
            if self.flip_sign:
                return np.bitwise_xor(raw.view(">u2"), np.uint16(0x8000), dtype=np.uint16)
            return raw.astype(raw.dtype.newbyteorder("="))
        return self.decode_on_device(_upload(raw.view(np.uint16), xp), xp)

    def decode_on_device(self, swapped: Any, xp: Any, with_float: bool = False, float_into: Any = None) -> Any:
        """:meth:`load`'s values from the file's bytes on the device (``swapped``: uint16 as read,
        or uint8 for BITPIX 8), decoded in place where one kernel applies. ``with_float``:
        ``(values, the values as float32)``, both from that kernel where it applies; the float32
        values are written into ``float_into`` (a device array of the plane's size) when given."""
        if self.bitpix == 8:
            values, as_float = swapped, None
        else:
            from .gpu import fused_decode_big_endian_16

            as_float = (xp.empty(swapped.shape, dtype=xp.float32) if float_into is None
                        else float_into.reshape(swapped.shape)) if with_float else None
            if fused_decode_big_endian_16(swapped, self.flip_sign, xp, as_float) is None:  # one kernel where it applies
                swapped = xp.bitwise_or(xp.right_shift(swapped, 8), xp.left_shift(swapped, 8))  # uint16: wraps
                if self.flip_sign:
                    swapped = xp.bitwise_xor(swapped, np.uint16(0x8000))
                as_float = None
            values = swapped if self.flip_sign else swapped.view(xp.int16)
        if not with_float:
            return values
        if as_float is None and float_into is not None:
            as_float = float_into.reshape(values.shape)
            as_float[...] = values
        return values, (values.astype(xp.float32) if as_float is None else as_float)


#: Byte alignment of what :meth:`RawPixels.read_for_device` stages after the pixels.
_STAGING_ALIGN = 256
#: Granularity of its buffers' sizes (a frame's control grid takes a few kB).
_STAGING_ROUND = 1 << 16


@dataclass
class StagedPixels:
    """A frame's raw values (:attr:`raw`, big-endian as in the file) and an optional small array
    (:attr:`extra`, from ``offset``), side by side in one host buffer (page-locked with CuPy)."""

    buffer: np.ndarray  # uint8
    raw: np.ndarray
    extra: np.ndarray | None
    offset: int

    def upload(self, xp: Any) -> tuple[Any, Any]:
        """``(raw bytes as native uint16 or uint8, extra)`` on the device, both from one
        asynchronous copy of the buffer on the current stream (keep this alive until it has run)."""
        device = _upload(self.buffer, xp)
        dtype = xp.uint8 if self.raw.dtype.itemsize == 1 else xp.uint16
        raw = device[: self.raw.nbytes].view(dtype).reshape(self.raw.shape)
        extra = None
        if self.extra is not None:
            extra = device[self.offset : self.offset + self.extra.nbytes].view(self.extra.dtype).reshape(self.extra.shape)
        return raw, extra


@dataclass
class PrefetchedRaw:
    """A :class:`RawPixels` whose read was started on a loader thread (:meth:`RawPixels.read_for_device`):
    the device thread then only copies and decodes (:meth:`load`), the read's wait and its GIL-free
    I/O happen beside it. What was staged with the pixels is :attr:`extra_on_device` once loaded
    on the device."""

    plan: RawPixels
    pending: Any  # concurrent.futures.Future of the StagedPixels
    extra_on_device: Any = None

    def load(self, xp: Any = np, with_float: bool = False, float_into: Any = None) -> Any:
        """:meth:`RawPixels.load` of the staged values; ``with_float``: ``(values, values as float32)``,
        the float32 values in ``float_into`` when given (on the device)."""
        staged = self.pending.result()
        if getattr(xp, "cuda", None) is None:
            values = self.plan.load(xp, staged.raw)
            return (values, values.astype(np.float32)) if with_float else values
        swapped, self.extra_on_device = staged.upload(xp)
        return self.plan.decode_on_device(swapped, xp, with_float, float_into)


def _upload(host: np.ndarray, xp: Any) -> Any:
    """``host`` on ``xp``: on CuPy an asynchronous copy on the current stream (a pinned ``host``
    must then stay alive until that stream is synchronised, as the device units do)."""
    if getattr(xp, "cuda", None) is None:
        return xp.asarray(host)
    device = xp.empty(host.shape, dtype=host.dtype)
    device.set(np.ascontiguousarray(host), stream=xp.cuda.get_current_stream())
    return device


def raw_pixel_plan(info: FrameInfo) -> RawPixels | None:
    """A :class:`RawPixels` for the frame, from its header alone; ``None`` when its pixels need the
    general decoding of :func:`_read_raw_image` + :func:`_scaled_pixels` (floats, other integer
    scalings, a BLANK keyword, compressed data) or the file cannot be opened (that read then
    gives the exact reason). Raises :class:`FrameError` for a file cut before its data ends."""
    path = Path(info.path)
    try:
        file_size, header_blocks, plain = _read_plain_primary(path)
        if plain is not None and info.hdu_index == 0:  # the header pass's plain read: the data follow the header blocks
            header: HeaderValues = plain.lookup if plain.lookup is not None else plain.header
            offset = len(header_blocks or b"")
        else:
            with _unscaled_image_hdu(path, info.hdu_index, file_size, memmap=True) as hdu:
                if type(hdu) not in (fits.PrimaryHDU, fits.ImageHDU):
                    return None
                header = hdu.header
                offset = int(hdu.fileinfo()["datLoc"])
        bitpix = int(header.get("BITPIX"))
        n_axes = int(header.get("NAXIS"))
        shape = tuple(int(header.get(f"NAXIS{axis}")) for axis in range(n_axes, 0, -1))
        has_blank = "BLANK" in header
        bscale = _header_float(header, "BSCALE")
        bzero = _header_float(header, "BZERO")
    except FrameError as exc:
        if exc.reason_key == REASON_TRUNCATED:
            raise
        return None
    except Exception:
        return None
    if has_blank or bscale not in (None, 1.0) or bitpix not in (8, 16) or not shape or min(shape) < 1:
        return None
    bzero = 0.0 if bzero is None else bzero
    if bitpix == 16 and bzero == 32768.0:
        return RawPixels(str(path), offset, shape, 16, True)
    if bzero == 0.0:
        return RawPixels(str(path), offset, shape, bitpix, False)
    return None


def _to_chw(data: Any, layout: str, shape: tuple[int, int], xp: Any) -> Any:
    """Pixels in (C, H, W) order (2-D planes get C = 1)."""
    if data.ndim == 3 and layout == "rgb_hwc":
        data = xp.ascontiguousarray(xp.moveaxis(data, -1, 0))
    elif data.ndim == 2:
        data = data[None]
    if tuple(data.shape[1:]) != tuple(shape):
        raise ValueError(f"image shape {tuple(data.shape)} does not match the header pass {shape}")
    return data


def load_frame(
    info: FrameInfo,
    *,
    hot_pixel_correction: bool = True,
    hot_pixel_sigma: float = 8.0,
    xp: Any = np,
    stats: dict[str, Any] | None = None,
) -> Any:
    """Pixels of one frame as float32 ``(C, H, W)`` on array module ``xp``.

    CFA frames are hot-pixel corrected per colour site (optional) and debayered to
    ``C = 3``; RGB frames come as ``(3, H, W)``; mono frames as ``(1, H, W)``. If
    ``stats`` is a dict, ``stats["hot_pixels_fixed"]`` receives the count.
    Raises :class:`FrameError` on unreadable, truncated or all-NaN data.
    """
    raw, header = _read_raw_image(info)
    host, may_hold_nan = _scaled_pixels(raw, header)
    try:
        data = _to_chw(xp.asarray(host), info.layout, info.shape, xp)
    except ValueError as exc:
        raise FrameError(REASON_UNREADABLE, str(exc), path=str(info.path)) from None
    data = data.astype(xp.float32, copy=False)
    if may_hold_nan and not bool(xp.isfinite(data).any()):
        raise FrameError(REASON_ALL_NAN, "no finite pixel", path=str(info.path))
    fixed = 0
    if info.layout == "cfa" and info.bayer_pattern:
        plane = data[0]
        if hot_pixel_correction:
            plane, fixed = correct_hot_pixels(plane, info.bayer_pattern, float(hot_pixel_sigma), xp)
        data = debayer_bilinear(plane, info.bayer_pattern, xp)
    if stats is not None:
        stats["hot_pixels_fixed"] = fixed
    return data


_NOISE_CLIP = 3.0  # sigma of the iterative clipping of the background noise estimate
_NOISE_ITERATIONS = 5


def estimate_background_noise(data: Any, xp: Any = np, max_samples: int = 100_000, *, fused: bool = True) -> Any:
    """Robust background sigma per channel of a (C, H, W) image, shape (C,) float32.

    1.4826 x MAD of a strided subsample, iteratively clipped at 3 sigma so that stars
    and other bright structure do not inflate it. The stride is odd so that every Bayer
    phase of a debayered image is sampled (interpolated sites are less noisy).

    On the GPU (``fused``, the default) every channel's clipping loop runs in one CUDA kernel
    that selects the medians without sorting (:func:`.gpu.fused_clipped_mad_sigmas`), with the
    same result and no wait on the host.
    """
    n_channels, height, width = (int(size) for size in data.shape)
    step = max(1, int(math.ceil(math.sqrt(height * width / max_samples))))
    if step % 2 == 0:
        step += 1
    sample = data[:, ::step, ::step].reshape(n_channels, -1)
    if fused and getattr(xp, "cuda", None) is not None:  # CuPy
        from .gpu import fused_clipped_mad_sigmas

        sigmas_on_device = fused_clipped_mad_sigmas(sample, _NOISE_CLIP, _NOISE_ITERATIONS, xp)
        if sigmas_on_device is not None:
            return sigmas_on_device.astype(xp.float32)
    sigmas = [_clipped_mad_sigma(sample[channel], xp) for channel in range(n_channels)]
    return xp.asarray(sigmas, dtype=xp.float32)


def _clipped_mad_sigma(values: Any, xp: Any, clip: float = _NOISE_CLIP, iterations: int = _NOISE_ITERATIONS) -> float:
    values = values[xp.isfinite(values)]
    sigma = math.nan
    for _ in range(iterations):
        if int(values.size) < 8:
            break
        median = xp.median(values)
        deviation = xp.abs(values - median)
        sigma = 1.4826 * float(xp.median(deviation))
        if not sigma > 0:
            break
        keep = deviation <= clip * sigma
        if bool(keep.all()):
            break
        values = values[keep]
    return sigma


# ----------------------------------------------------------------------------- JSON helpers


def _json_number(value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _json_value(value: Any) -> Any:
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _json_number(float(value))
    return str(value)


def header_to_dict(header: fits.Header, skip: Iterable[str] = ("COMMENT", "HISTORY", "")) -> dict[str, Any]:
    """Header cards (commentary cards left out) as a JSON-safe dict."""
    skipped = set(skip)
    result: dict[str, Any] = {}
    for card in header.cards:
        if card.keyword in skipped:
            continue
        try:
            result[card.keyword] = _json_value(card.value)
        except Exception:  # an unparsable card (e.g. 'XBAYROFF= NAN') is left out, as the header pass ignores it
            continue
    return result

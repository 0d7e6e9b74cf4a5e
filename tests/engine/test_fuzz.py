"""Hostile input: property-based tests of header parsing, WCS validation, Bayer handling, config loading.

Every generated case must end in a usable result (a :class:`FrameInfo` whose pixels load to
float32 ``(C, H, W)`` with no infinity, a validated config) or in a clean rejection
(:class:`FrameError` / :class:`ConfigError`) whose key has English and French text — never
another exception. Input files are hashed before and after each case and must be
byte-identical.

FITS files are assembled card by card from raw bytes (so the cases include what astropy
would refuse to write: absurd NAXIS, wrong BITPIX, NaN/Inf and unparsable values, non-ASCII,
duplicate keys, short data), and written by astropy for the structural variants
(multi-extension, tile-compressed ``.fits.fz``).

The examples are derandomised (the same cases on every run, so CI is stable);
``ZEMOSAIC_FUZZ_SCALE=20 pytest tests/engine/test_fuzz.py`` explores twenty times as many.
Cases that once found a crash are kept as explicit regression tests at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_zemosaic.config import DEFAULT_CONFIG, OPTIONS, ConfigError, load_config, validate_config
from napari_zemosaic.engine import frames
from napari_zemosaic.engine.debayer import PATTERNS, correct_hot_pixels, debayer_bilinear
from napari_zemosaic.engine.frames import FrameError, FrameInfo, load_frame, read_frame_info, validate_wcs
from napari_zemosaic.i18n import load_catalog, tr

EN = load_catalog("en")
FR = load_catalog("fr")
SCALE = max(1, int(os.environ.get("ZEMOSAIC_FUZZ_SCALE", "1")))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )


# ============================================================================ raw FITS writer


def card(key: str, value: str | bytes | None = None) -> bytes:
    """One 80-byte card image: ``KEY     = value`` (value written verbatim), or a bare keyword."""
    head = f"{key:<8}".encode("utf-8", "replace")
    if value is None:
        raw = head
    else:
        raw = head + b"= " + (value if isinstance(value, bytes) else value.encode("utf-8", "replace"))
    return raw[:80].ljust(80, b" ")


def fits_bytes(cards: list[bytes], data: bytes = b"", *, end: bool = True) -> bytes:
    """A header made of ``cards`` (+ END), padded to 2880 bytes, then ``data`` padded the same way."""
    header = b"".join(cards) + (card("END") if end else b"")
    header = header.ljust(-(-len(header) // 2880) * 2880, b" ")
    padding = (-len(data)) % 2880
    return header + data + b"\0" * padding


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_key(key: str, params: dict[str, Any]) -> None:
    """A rejection's key exists in both languages and formats with its parameters."""
    assert key in EN and key in FR, key
    tr(key, "en", **params)
    tr(key, "fr", **params)


# ============================================================================ what "clean" means


class TookTooLong(Exception):
    """One file kept the header pass or the loader busy for more than :data:`CASE_TIME_LIMIT_S`."""


#: A hostile file must be judged in well under a second; a case that takes this long has found
#: a loop driven by a header value (it once hung for hours on ``NAXIS = 2147483647``).
CASE_TIME_LIMIT_S = 20.0


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Turn a hang into a failure that shows the case (POSIX main thread; no-op elsewhere)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(*_: Any) -> None:
        raise TookTooLong(f"more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_frame(path: Path, **options: Any) -> str:
    """read_frame_info + load_frame on ``path``: a usable frame or a clean FrameError; the file is untouched.

    Returns the outcome (a reason key, or "ok").
    """
    before = digest(path)
    try:
        with time_limit(CASE_TIME_LIMIT_S):
            outcome = _check_frame(path, **options)
    finally:
        assert digest(path) == before, "an input file was modified"
    return outcome


def _check_frame(path: Path, **options: Any) -> str:
    try:
        info = read_frame_info(path, **options)
    except FrameError as exc:
        assert_clean_key(exc.reason_key, {"path": str(path), **exc.params})
        return exc.reason_key
    check_frame_info(info)
    try:
        data = load_frame(info, hot_pixel_correction=True)
    except FrameError as exc:
        assert_clean_key(exc.reason_key, {"path": str(path), **exc.params})
        return "load:" + exc.reason_key
    assert isinstance(data, np.ndarray) and data.dtype == np.float32
    assert data.shape == (info.n_channels if info.layout != "cfa" else 3,) + info.shape
    assert not np.isinf(data).any(), "infinite pixel values reach the stacker"
    assert np.isfinite(data).any(), "a frame without any finite pixel was accepted"
    return "ok"


def check_frame_info(info: FrameInfo) -> None:
    height, width = info.shape
    assert isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
    assert info.layout in ("cfa", "mono", "rgb_chw", "rgb_hwc")
    assert info.n_channels == (3 if info.layout.startswith("rgb") else 1)
    assert (info.bayer_pattern in PATTERNS) if info.layout == "cfa" else info.bayer_pattern is None
    for value in (info.exposure_s, info.ra_deg, info.dec_deg, info.focal_mm, info.pixel_um, info.header_scale_arcsec):
        assert value is None or math.isfinite(value)
    if info.wcs is None:
        assert info.wcs_status in ("missing", "invalid") and info.wcs_reason in EN
    else:
        assert info.wcs_status == "valid" and info.wcs.pixel_shape == (width, height)
        assert info.centre is not None and all(math.isfinite(v) for v in info.centre)
    # The report and Dask workers need the summary as strict JSON, and the frame must round-trip.
    text = json.dumps(info.to_dict(include_header=True), allow_nan=False)
    again = FrameInfo.from_dict(json.loads(text))
    assert again.shape == info.shape and again.layout == info.layout and (again.wcs is None) == (info.wcs is None)


# ============================================================================ strategies
#
# Generators start from something a capture program could have written and then apply 0-3
# hostile mutations, so a good share of the cases gets through to the pixels and the WCS
# checks while the rest probes every rejection path.

#: Values no sane header holds: overflow, NaN/Inf spellings, broken strings, Fortran exponents, ...
_HOSTILE_VALUE = st.sampled_from([
    "NAN", "INF", "-INF", "1E400", "-1E400", "1E-400", "1.0D5", "1.2.3", "0x10", "", "T", "F", "(1.0, 2.0)",
    "'", "'unterminated", "'text'", "9" * 68, "-" + "9" * 67, "+5", "' 12 34 56 '", "'-05:06:07'", "'ééé'",
    "'RGGB'", "'rggb  '", "''", "1E308", "-0.0", "'NaN'", "'inf'", "/ only a comment", "'Jérôme'",
])
_ANY_VALUE = st.one_of(
    _HOSTILE_VALUE,
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: repr(v).upper()),
    st.text(max_size=16).map(lambda text: "'" + text.replace("'", "''") + "'"),
    st.binary(max_size=24),
)
BAYER_VALUES = ["'RGGB'", "'BGGR'", "'GRBG'", "'GBRG'", "'rggb'", "' GRBG '", "'RGBG'", "'XXXX'", "''", "'RGGBX'", "'ÉÉÉÉ'", "4"]
#: Plausible (first) and odd values of the metadata keywords the header pass reads.
_METADATA_VALUES: dict[str, list[str]] = {
    "EXPTIME": ["10.0", "-1", "0", "1E400", "NAN", "'10 s'"],
    "RA": ["83.82", "-10", "400", "'05 35 17.3'", "'5:35:17'", "'junk'"],
    "DEC": ["-5.39", "95", "'-05 23 28'", "'+89:59:59.9'", "'--'"],
    "OBJCTRA": ["'05 35 17.3'", "'25 00 00'", "'x y z'", "''"],
    "OBJCTDEC": ["'-05 23 28'", "'-95 00 00'", "'°'"],
    "FOCALLEN": ["250", "0", "-250", "1E-300", "NAN"],
    "XPIXSZ": ["2.9", "0", "-2.9", "1E300"],
    "BAYERPAT": BAYER_VALUES,
    "COLORTYP": ["'RGGB'", "'MONO'", "'GBRG'"],
    "XBAYROFF": ["0", "1", "-1", "3", "1E300", "NAN", "'1'", "2147483649"],
    "YBAYROFF": ["0", "1", "-3", "1.5", "1E18"],
    "INSTRUME": ["'Seestar S50'", "'ZWO ASI'", "'Séestar'", "''", "42"],
    "TELESCOP": ["'S50_1d568bdd'", "'S30_x'", "'Celestron'", "0"],
    "CREATOR": ["'ZWO Seestar S50'", "'N.I.N.A.'", "'SharpCap'"],
    "DATE-OBS": ["'2024-02-10T20:15:31.123'", "'not a date'", "'2024-13-45'", "5"],
    "EQMODE": ["0", "1", "'x'", "1E400"],
    "BZERO": ["32768", "0", "-32768", "1E30", "-1E38", "1E300", "3.5", "2147483648"],
    "BSCALE": ["1", "0", "-1", "1E30", "1E-30", "1E300", "0.5", "1E-300"],
    "BLANK": ["-32768", "0", "32767", "255", "99999999999", "'x'"],
}
_ODD_CARDS = [
    card("COMMENT", None), card("HISTORY", None), b"COMMENT  caf\xc3\xa9 \xff\xfe".ljust(80), b" " * 80,
    b"HIERARCH ESO DET TEMP = -10.5".ljust(80), card("lower", "1"), card("BAD KEY", "1"),
    card("CONTINUE", "'&'"), card("ÉTRANGE", "'x'"), b"\x00" * 80, card("END", "0"),
]
_STRUCTURE_MUTATIONS = {
    "BITPIX": ["0", "7", "-16", "24", "16.0", "'16'", "X", "-64"],
    "NAXIS": ["999", "-1", "2.5", "'2'", "0", "4"],
    "NAXIS1": ["0", "-5", "2147483648", "1000000000000", "1" + "0" * 30, "'8'"],
    "NAXIS2": ["0", "9223372036854775808", "1.5"],
    "SIMPLE": ["F", "'T'", "1"],
    "EXTEND": ["F", "'x'"],
    "GCOUNT": ["0", "2", "-1"],
    "PCOUNT": ["1000000", "-4"],
}


def tan_wcs_cards(draw: Any, shape: tuple[int, int]) -> dict[str, Any]:
    """A valid TAN (optionally TAN-SIP) WCS for an image of ``shape``: keyword -> value."""
    height, width = shape
    scale = draw(st.floats(0.5, 10.0)) / 3600.0
    angle = math.radians(draw(st.floats(0.0, 360.0)))
    flip = -1.0 if draw(st.booleans()) else 1.0
    sip = draw(st.booleans())
    cards: dict[str, Any] = {
        "CTYPE1": "RA---TAN-SIP" if sip else "RA---TAN",
        "CTYPE2": "DEC--TAN-SIP" if sip else "DEC--TAN",
        "CRVAL1": draw(st.floats(0.0, 359.999)),
        "CRVAL2": draw(st.floats(-89.0, 89.0)),
        "CRPIX1": (width + 1) / 2 + draw(st.floats(-3.0, 3.0)),
        "CRPIX2": (height + 1) / 2 + draw(st.floats(-3.0, 3.0)),
    }
    cos, sin = math.cos(angle), math.sin(angle)
    form = draw(st.sampled_from(["cd", "pc", "crota"]))
    if form == "cd":
        cards.update({"CD1_1": -flip * scale * cos, "CD1_2": scale * sin, "CD2_1": flip * scale * sin, "CD2_2": scale * cos})
    elif form == "pc":
        cards.update({"CDELT1": -flip * scale, "CDELT2": scale, "PC1_1": cos, "PC1_2": -sin * flip, "PC2_1": sin, "PC2_2": cos})
    else:
        cards.update({"CDELT1": -flip * scale, "CDELT2": scale, "CROTA2": math.degrees(angle)})
    if sip:
        half = max(width, height) / 2.0
        cards.update({"A_ORDER": 2, "B_ORDER": 2})
        for key in ("A_2_0", "A_1_1", "A_0_2", "B_2_0", "B_1_1", "B_0_2"):
            cards[key] = draw(st.floats(-0.5, 0.5)) / half**2  # at most ~0.5 px at the corners
    return cards


#: Hostile things to do to a WCS (keyword -> replacement value, or None to delete it).
_WCS_MUTATIONS: list[tuple[str, Any]] = [
    ("CRVAL1", math.nan), ("CRVAL1", math.inf), ("CRVAL2", 95.0), ("CRVAL2", -1e308), ("CRPIX1", math.nan),
    ("CRPIX2", 1e12), ("CD1_1", 0.0), ("CD2_2", math.nan), ("CD1_1", 1e300), ("CDELT1", 0.0), ("CDELT1", 1e-9),
    ("CDELT2", 1.0), ("PC1_1", math.inf), ("CROTA2", math.nan), ("CTYPE1", "RA---XXX"), ("CTYPE1", "LINEAR"),
    ("CTYPE2", "RA---TAN"), ("CTYPE1", "GLON-TAN"), ("CTYPE2", "GLAT-TAN"), ("CTYPE2", ""), ("CTYPE1", None),
    ("CTYPE2", None), ("CD2_2", None), ("A_ORDER", 30), ("A_ORDER", -1), ("B_ORDER", 9), ("A_2_0", 10.0),
    ("B_0_2", math.nan), ("A_3_3", 1e3), ("AP_ORDER", 2), ("AP_2_0", 1e6), ("WCSAXES", 0), ("WCSAXES", 3),
    ("WCSAXES", 9), ("LONPOLE", math.nan), ("LATPOLE", 400.0), ("PV2_1", 1e300), ("RADESYS", "NONSENSE"),
    ("EQUINOX", "J2000"), ("CUNIT1", "parsec"), ("CUNIT2", "deg"), ("MJDREF", math.nan), ("DATE-OBS", "yesterday"),
]


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, float):
        if math.isnan(value):
            return "NAN"
        if math.isinf(value):
            return "INF" if value > 0 else "-INF"
        return repr(value).upper()
    return str(value)


def _mutated(draw: Any, cards: dict[str, Any], max_mutations: int = 3) -> dict[str, Any]:
    result = dict(cards)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, max_mutations]))):
        key, value = draw(st.sampled_from(_WCS_MUTATIONS))
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


_BITPIX_DTYPE = {"8": "u1", "16": ">i2", "32": ">i4", "64": ">i8", "-32": ">f4", "-64": ">f8"}


@st.composite
def raw_fits_files(draw: Any) -> bytes:
    """A FITS file assembled from raw cards: a plausible frame, then 0-3 hostile mutations."""
    bitpix = draw(st.sampled_from(["16", "16", "16", "8", "32", "-32", "-64", "64"]))
    layout = draw(st.sampled_from(["2d", "2d", "2d", "rgb_last", "rgb_first", "planes", "1d", "4d", "0d"]))
    height, width = draw(st.integers(1, 17)), draw(st.integers(1, 13))
    dims = {
        "2d": [width, height], "rgb_last": [width, height, 3], "rgb_first": [3, width, height],
        "planes": [width, height, draw(st.sampled_from([1, 2, 4]))], "1d": [width], "4d": [4, 4, 3, 2], "0d": [],
    }[layout]
    cards: dict[str, str] = {"SIMPLE": "T", "BITPIX": bitpix, "NAXIS": str(len(dims))}
    cards.update({f"NAXIS{axis}": str(size) for axis, size in enumerate(dims, start=1)})
    if draw(st.booleans()):
        cards["EXTEND"] = "T"
    if bitpix == "16" and draw(st.booleans()):
        cards["BZERO"] = "32768"
    for key in draw(st.lists(st.sampled_from(sorted(_METADATA_VALUES)), max_size=8, unique=True)):
        choices = _METADATA_VALUES[key]
        cards[key] = choices[0] if draw(st.integers(0, 2)) else draw(st.sampled_from(choices))
    if layout != "0d" and draw(st.booleans()):
        shape = (height, width) if layout != "rgb_first" else (width, height)
        wcs = _mutated(draw, tan_wcs_cards(draw, shape))
        cards.update({key: _value_text(value) for key, value in wcs.items()})

    # Data: exactly what the header announces, from a random seed pattern.
    count = math.prod(dims) if dims else 0
    dtype = np.dtype(_BITPIX_DTYPE[bitpix])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        values = rng.normal(1000.0, 50.0, count)
        for index in draw(st.lists(st.integers(0, max(count - 1, 0)), max_size=3)) if count else []:
            values[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0]))
        data = values.astype(dtype).tobytes()
    else:
        data = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, count, dtype=dtype.newbyteorder("=")).astype(dtype).tobytes()

    images = [card(key, value) for key, value in cards.items()]
    end = True
    tail = b""
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        mutation = draw(st.sampled_from(["value", "duplicate", "odd_card", "structure", "data", "end", "tail", "cut"]))
        if mutation == "value" and images:
            index = draw(st.integers(0, len(images) - 1))
            images[index] = card(images[index][:8].decode("latin-1").strip(), draw(_ANY_VALUE))
        elif mutation == "duplicate" and images:
            index = draw(st.integers(0, len(images) - 1))
            key = images[index][:8].decode("latin-1").strip()
            images.insert(draw(st.integers(index, len(images))), card(key, draw(_ANY_VALUE)))
        elif mutation == "odd_card":
            images.insert(draw(st.integers(0, len(images))), draw(st.sampled_from(_ODD_CARDS)))
        elif mutation == "structure":
            key = draw(st.sampled_from(sorted(_STRUCTURE_MUTATIONS)))
            replacement = card(key, draw(st.sampled_from(_STRUCTURE_MUTATIONS[key])))
            position = next((i for i, image in enumerate(images) if image[:8].decode("latin-1").strip() == key), None)
            if position is None:
                images.insert(draw(st.integers(0, len(images))), replacement)
            else:
                images[position] = replacement
        elif mutation == "data":
            data = draw(st.sampled_from([b"", data[: len(data) // 2], data + b"\x7f" * 5000, bytes(7)]))
        elif mutation == "end":
            end = False
        elif mutation == "tail":
            tail = draw(st.sampled_from([
                b"XTENSION= 'IMAGE   '", b"garbage" * 40,
                fits_bytes([card("XTENSION", "'IMAGE   '"), card("BITPIX", "8"), card("NAXIS", "2"), card("NAXIS1", "4"), card("NAXIS2", "4")], bytes(16)),
            ]))
        elif mutation == "cut":
            tail = b"\x00"  # marker: cut the assembled file below
    blob = fits_bytes(images, data, end=end)
    if tail == b"\x00":
        return blob[: draw(st.integers(0, len(blob)))]
    return blob + tail


def _scratch() -> tempfile.TemporaryDirectory[str]:
    # Hypothesis runs many examples per test: a function-scoped tmp_path would be shared.
    return tempfile.TemporaryDirectory(prefix="zemosaic-fuzz-")


# ============================================================================ header pass + pixels


@fuzz_settings(1000)
@given(raw_fits_files(), st.booleans())
def test_raw_headers_give_a_frame_or_a_clean_rejection(blob: bytes, force_seestar: bool) -> None:
    with _scratch() as folder:
        path = Path(folder) / "frame.fits"
        path.write_bytes(blob)
        check_frame(path, force_seestar_mode=force_seestar)


def _outcome(path: Path) -> Any:
    """read_frame_info's outcome, comparable (its fields, header cards, WCS pickle and raw pixel
    plan), or its rejection."""
    try:
        info = read_frame_info(path)
    except FrameError as exc:
        return "error", exc.reason_key, exc.detail, repr(sorted(exc.params.items()))
    fields = {name: getattr(info, name) for name in info.__dataclass_fields__ if name not in ("wcs", "header")}
    try:
        plan: Any = frames.raw_pixel_plan(info)  # where the pixels lie in the file, for readers that skip astropy
    except FrameError as exc:
        plan = exc.reason_key
    wcs = pickle.dumps(info.wcs) if info.wcs is not None else None
    return "frame", repr(sorted(fields.items())), _card_texts(info.header), wcs, repr(plan)


def _card_texts(header: fits.Header) -> list[str]:
    """Each card's image, or what astropy says of a card it cannot write (it fixes cards as it formats them)."""
    texts = []
    for each in header.cards:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                texts.append(each.image)
            except Exception as exc:
                texts.append(f"{type(exc).__name__}: {exc}")
    return texts


@fuzz_settings(600)
@given(raw_fits_files())
def test_plain_primary_read_is_astropy_s_read(blob: bytes) -> None:
    """Hostile files read from their primary header blocks give what astropy's ``fits.open`` path
    gives: the frame, and where its integer pixels lie."""
    with _scratch() as folder:
        path = Path(folder) / "frame.fits"
        path.write_bytes(blob)
        with time_limit(CASE_TIME_LIMIT_S):
            plain = _outcome(path)
            with mock.patch.object(frames, "_plain_primary_image", lambda *args: None):
                through_astropy = _outcome(path)
    assert plain == through_astropy


_LOOKUP_KEYWORDS = sorted({*_METADATA_VALUES, *_STRUCTURE_MUTATIONS, "CTYPE1", "CRVAL1", "CD1_1", "A_ORDER", "DP1"})


@st.composite
def header_texts(draw: Any) -> str:
    """Cards of the metadata and structure keywords with any value, odd cards among them (no END)."""
    images: list[bytes] = []
    for _ in range(draw(st.integers(1, 14))):
        if draw(st.integers(0, 5)) == 0:
            image = draw(st.sampled_from([c for c in _ODD_CARDS if not c.startswith(b"END")]
                                         + [card("DP1", "'AXIS.1: 1'"), card("CPLX", "(1, 2)"), card("UNDEF", "")]))
        else:
            key = draw(st.sampled_from(_LOOKUP_KEYWORDS))
            choices = _METADATA_VALUES.get(key) or _STRUCTURE_MUTATIONS.get(key) or ["1"]
            value = draw(st.one_of(st.sampled_from(choices), _ANY_VALUE))
            image = card(key, value) + b" / " + draw(st.sampled_from([b"", b"a comment", b"'quoted'"]))
        images.append(image[:80].ljust(80))
    return b"".join(images).decode("ascii", "replace").replace("\ufffd", "?")


@fuzz_settings(1000)
@given(header_texts())
def test_header_lookup_answers_as_astropy(text: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = fits.Header.fromstring(text)
        lookup = frames.HeaderLookup.of(header, text)
        if lookup is None:
            return

        def typed(value: Any) -> Any:
            return type(value).__name__, repr(value)

        assert [(c.keyword, typed(c.value)) for c in lookup.cards] == [(c.keyword, typed(c.value)) for c in header.cards]
        for keyword in _LOOKUP_KEYWORDS + ["COMMENT", "HISTORY", "ABSENT"]:
            assert typed(lookup.get(keyword)) == typed(header.get(keyword)), keyword
            assert (keyword in lookup) == (keyword in header), keyword


_DTYPES = [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]


@st.composite
def structured_files(draw: Any) -> tuple[str, list[Any]]:
    """Files astropy writes: image in the primary, after a table, after an empty primary, tile-compressed."""
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.sampled_from([(8, 12), (7, 9), (3, 5, 6), (5, 4, 3), (2, 2), (1, 16), (16, 1), (9, 11)]))
    values = draw(st.sampled_from(["ramp", "constant", "extremes", "nan", "random"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if values == "ramp":
        data = (np.arange(math.prod(shape)) % 200).reshape(shape).astype(dtype)
    elif values == "constant":
        data = np.full(shape, 7, dtype=dtype)
    elif values == "extremes":
        low, high = (info.min, info.max) if info else (-3.4e38, 3.4e38)
        data = rng.choice(np.array([low, high, 0], dtype=dtype), size=shape)
    elif values == "nan":
        data = np.full(shape, np.nan if info is None else 0, dtype=dtype)
        if info is None and draw(st.booleans()):
            data.flat[0] = np.inf
    else:
        data = (rng.random(shape) * 1000).astype(dtype)
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in draw(st.lists(st.sampled_from(sorted(_METADATA_VALUES)), max_size=8, unique=True)):
            if key in ("BZERO", "BSCALE", "BLANK"):  # astropy owns these when it writes the data
                continue
            try:
                header[key] = fits.Card.fromstring(card(key, draw(st.sampled_from(_METADATA_VALUES[key])))).value
            except Exception:  # astropy refuses to hold this value: the raw-bytes test covers it
                continue
        if draw(st.booleans()):
            plane = data.shape[-2:] if data.ndim == 2 or data.shape[0] != 3 else data.shape[1:]
            for key, value in _mutated(draw, tan_wcs_cards(draw, plane), max_mutations=1).items():
                try:
                    set_card(header, key, value)
                except Exception:
                    continue
    container = draw(st.sampled_from(["primary", "extension", "after_table", "compressed", "compressed_rice", "two_images"]))
    return container, [data, header]


def _write_structured(path: Path, container: str, data: np.ndarray, header: fits.Header) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if container == "primary":
            hdus = [fits.PrimaryHDU(data, header=header)]
        elif container == "extension":
            hdus = [fits.PrimaryHDU(), fits.ImageHDU(data, header=header)]
        elif container == "after_table":
            table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.arange(3.0))])
            hdus = [fits.PrimaryHDU(), table, fits.ImageHDU(data, header=header)]
        elif container == "two_images":
            hdus = [fits.PrimaryHDU(data, header=header), fits.ImageHDU(np.zeros((4, 4), np.uint8))]
        else:
            path = path.with_name(path.name + ".fz")
            if data.dtype == np.float64 or data.dtype.itemsize > 4 or data.ndim != 2:
                data = np.atleast_2d(data.astype(np.float32) if data.dtype.kind == "f" else data.astype(np.int32))
                data = data.reshape(data.shape[-2], -1) if data.ndim > 2 else data
            compression = "RICE_1" if container == "compressed_rice" and data.dtype.kind in "iu" else "GZIP_1"
            hdus = [fits.PrimaryHDU(), fits.CompImageHDU(data, header=header, compression_type=compression)]
        fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


@fuzz_settings(200)
@given(structured_files())
def test_multi_extension_and_compressed_files(case: tuple[str, list[Any]]) -> None:
    container, (data, header) = case
    with _scratch() as folder:
        try:
            path = _write_structured(Path(folder) / "frame.fits", container, data, header)
        except Exception:  # astropy cannot write this combination: nothing to read
            return
        check_frame(path)


@fuzz_settings(30)
@given(st.lists(raw_fits_files(), min_size=2, max_size=5))
def test_ingest_and_quality_sort_every_hostile_file(blobs: list[bytes]) -> None:
    """The pipeline's P1 and the quality measurement on a folder of hostile files: each file is
    either used or excluded with a localised reason, and nothing raises."""
    from napari_zemosaic.config import validate_config as _validate
    from napari_zemosaic.engine.pipeline import ingest
    from napari_zemosaic.engine.quality import measure_one
    from napari_zemosaic.events import Reporter

    with _scratch() as folder:
        root = Path(folder)
        paths = []
        for index, blob in enumerate(blobs):
            paths.append(root / f"frame_{index:02d}.fits")
            paths[-1].write_bytes(blob)
        before = {path: digest(path) for path in paths}
        config = _validate({"solve_missing_wcs": False})
        generator = ingest(root, None, config, Reporter())
        while True:
            try:
                next(generator)
            except StopIteration as stop:
                result = stop.value
                break
        assert len(result.found) == len(paths)
        assert len(result.usable) + len(result.excluded) == len(paths)
        for excluded in result.excluded:
            assert_clean_key(excluded.reason_key, {"path": excluded.path, "detail": excluded.detail})
        for info in result.usable:
            metrics = measure_one(info)
            assert metrics.reason is None or metrics.reason in EN
        assert {path: digest(path) for path in paths} == before


# ============================================================================ WCS validation


def set_card(header: fits.Header, key: str, value: float | int | str) -> None:
    """``header[key] = value``, writing NaN/Inf the way broken files hold them (astropy refuses to)."""
    if isinstance(value, float) and not math.isfinite(value):
        text = "NAN" if math.isnan(value) else ("INF" if value > 0 else "-INF")
        header.append(fits.Card.fromstring(f"{key:<8}= {text}".ljust(80)))
    else:
        header[key] = value


@st.composite
def wcs_headers(draw: Any) -> tuple[fits.Header, tuple[int, int] | None]:
    """A valid TAN/TAN-SIP WCS of a random image size, then 0-3 hostile mutations, as a header."""
    height, width = draw(st.integers(1, 6000)), draw(st.integers(1, 6000))
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"], header["NAXIS2"] = width, height
    for key, value in _mutated(draw, tan_wcs_cards(draw, (height, width))).items():
        set_card(header, key, value)
    shape = draw(st.sampled_from([None, None, (height, width), (max(1, height // 3), width * 2)]))
    return header, shape


@fuzz_settings(600)
@given(wcs_headers())
def test_validate_wcs_never_raises(case: tuple[fits.Header, tuple[int, int] | None]) -> None:
    header, shape = case
    wcs, status, reason, detail = validate_wcs(header, shape)
    assert status in ("valid", "missing", "invalid")
    assert isinstance(detail, str)
    if status == "valid":
        assert wcs is not None and wcs.has_celestial and reason is None
        height, width = shape if shape is not None else (header["NAXIS2"], header["NAXIS1"])
        corners = wcs.all_pix2world([[0, 0], [width - 1, height - 1]], 0)
        assert np.all(np.isfinite(corners))
        scales = np.sqrt((np.asarray(wcs.pixel_scale_matrix) ** 2).sum(axis=0)) * 3600.0
        assert np.all((scales >= 0.3) & (scales <= 15.0))
    else:
        assert wcs is None and reason in EN and reason in FR


# ============================================================================ Bayer handling


@fuzz_settings(150)
@given(
    st.integers(2, 19),
    st.integers(2, 19),
    st.sampled_from(PATTERNS),
    st.sampled_from(["noise", "constant", "hot", "nan", "huge"]),
    st.integers(0, 2**16),
)
def test_debayer_and_hot_pixels_on_any_size(height: int, width: int, pattern: str, content: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cfa = (100.0 + rng.normal(0.0, 3.0, (height, width))).astype(np.float32)
    if content == "constant":
        cfa[:] = 42.0
    elif content == "hot":
        cfa[rng.integers(0, height), rng.integers(0, width)] = 60000.0
    elif content == "nan":
        cfa[rng.random((height, width)) < 0.3] = np.nan
    elif content == "huge":
        cfa *= np.float32(1e36)
    original = cfa.copy()
    corrected, fixed = correct_hot_pixels(cfa, pattern, 8.0, np)
    np.testing.assert_array_equal(cfa, original)  # the input is never modified
    assert corrected.shape == cfa.shape and corrected.dtype == np.float32 and 0 <= fixed <= cfa.size
    rgb = debayer_bilinear(corrected, pattern, np)
    assert rgb.shape == (3, height, width) and rgb.dtype == np.float32
    # Known colour sites keep their value exactly.
    channel = {"R": 0, "G": 1, "B": 2}
    for dy in (0, 1):
        for dx in (0, 1):
            plane = rgb[channel[pattern[2 * dy + dx]], dy::2, dx::2]
            np.testing.assert_array_equal(plane, corrected[dy::2, dx::2])
    if content == "constant":
        np.testing.assert_array_equal(rgb, np.float32(42.0))


@fuzz_settings(150)
@given(
    st.integers(1, 11),
    st.integers(1, 11),
    st.sampled_from(BAYER_VALUES + ["' RGGB'", "'BGGR    '", "'R G G B'", "'gbrg'"]),
    st.sampled_from(["0", "1", "-1", "2", "7", "1E300", "NAN", "'x'", "-9223372036854775809"]),
    st.sampled_from(["0", "1", "3", "NAN", "1E30"]),
)
def test_bayer_keywords_and_odd_sizes(height: int, width: int, pattern: str, x_offset: str, y_offset: str) -> None:
    data = np.arange(height * width, dtype=np.uint16).reshape(height, width)
    cards = [card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "2"), card("NAXIS1", str(width)),
             card("NAXIS2", str(height)), card("BZERO", "32768"), card("BAYERPAT", pattern),
             card("XBAYROFF", x_offset), card("YBAYROFF", y_offset)]
    raw = (data.astype(np.int32) - 32768).astype(">i2").tobytes()
    with _scratch() as folder:
        path = Path(folder) / "cfa.fit"
        path.write_bytes(fits_bytes(cards, raw))
        outcome = check_frame(path)
        assert outcome == "ok"  # any of these is a usable frame: a bad pattern means mono
        info = read_frame_info(path)
        if info.layout == "cfa":
            rgb = load_frame(info, hot_pixel_correction=False)
            # Each CFA value survives exactly at its own colour site.
            channel = {"R": 0, "G": 1, "B": 2}
            site = channel[info.bayer_pattern[0]]  # type: ignore[index]
            np.testing.assert_array_equal(rgb[site, ::2, ::2], data[::2, ::2].astype(np.float32))
        else:
            np.testing.assert_array_equal(load_frame(info)[0], data.astype(np.float32))


# ============================================================================ config files

_JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_JSON_VALUE = st.recursive(
    _JSON_LEAF, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _value_for(option_key: str) -> st.SearchStrategy[Any]:
    option = OPTIONS[option_key]
    plausible: list[Any] = [option.default]
    if option.kind == "choice":
        plausible += list(option.choices) + [c.upper() for c in option.choices if isinstance(c, str)]
    if option.kind in ("int", "float"):
        plausible += [0, 1, -1, 0.5, 1e308, "12", "1e3", "inf", "-inf", "nan", 10**40]
    if option.kind == "bool":
        plausible += [0, 1, "yes", "off", 2, "maybe"]
    if option.kind == "list":
        plausible += [[0.5, 99.8], [], [1], ["a", "b"], [[1, 2]], [99.8, 0.5], [-5, 200]]
    return st.one_of(st.sampled_from(plausible), _JSON_VALUE)


@st.composite
def config_texts(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["object"] * 6 + ["garbage", "scalar", "deep", "bom", "latin1", "dupes", "empty"]))
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "scalar":
        return json.dumps(draw(_JSON_VALUE)).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([50, 2_000, 100_000]))
        return ("[" * depth + "]" * depth).encode() if draw(st.booleans()) else ('{"a":' * depth + "1" + "}" * depth).encode()
    if kind == "empty":
        return b""
    keys = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=6, unique=True))
    document = {key: draw(_value_for(key)) for key in keys}
    document.update(draw(st.dictionaries(st.text(max_size=8), _JSON_VALUE, max_size=2)))
    text = json.dumps(document, allow_nan=True)
    if kind == "dupes" and keys:
        text = text[:-1] + (", " if document else "") + json.dumps(keys[0]) + ': "again"}'
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if kind == "latin1":
        return text.encode("latin-1", "replace") + b"\xe9"
    return text.encode()


@fuzz_settings(500)
@given(config_texts())
def test_config_files_load_or_name_the_problem(payload: bytes) -> None:
    with _scratch() as folder:
        path = Path(folder) / "config.json"
        path.write_bytes(payload)
        defaults_before = json.dumps(DEFAULT_CONFIG, sort_keys=True)
        try:
            config = load_config(path, use_user_file=False)
        except ConfigError as exc:
            assert_clean_key(exc.key, exc.params)
            assert exc.params.get("path") == str(path)  # the message names the file
            if exc.key == "config_error_invalid_value":
                assert exc.params["key"] in OPTIONS  # ... and the key
        else:
            assert validate_config(config) == config  # already valid: idempotent
            for key, option in OPTIONS.items():
                value = config[key]
                if option.kind == "float":
                    assert isinstance(value, float) and math.isfinite(value)
                if option.kind == "choice":
                    assert value in option.choices
            json.dumps({key: config[key] for key in OPTIONS}, allow_nan=False)  # strict JSON in run_report.json
        assert path.read_bytes() == payload  # the file is never rewritten
        assert json.dumps(DEFAULT_CONFIG, sort_keys=True) == defaults_before  # nor the defaults


@fuzz_settings(200)
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), _JSON_VALUE, max_size=6))
def test_validate_config_on_garbage_mappings(overrides: dict[str, Any]) -> None:
    try:
        config = validate_config(overrides)
    except ConfigError as exc:
        assert_clean_key(exc.key, exc.params)
        assert exc.params["key"] in OPTIONS
    else:
        assert validate_config(config) == config


# ============================================================================ regression cases
# (each once crashed the code it names, or slipped through a check, before the fix next to it)


def _raw_frame(tmp_path: Path, cards: list[bytes], data: bytes, name: str = "frame.fits") -> Path:
    path = tmp_path / name
    path.write_bytes(fits_bytes(cards, data))
    return path


def _uint16_cfa_cards(width: int, height: int, *extra: bytes) -> list[bytes]:
    return [card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "2"), card("NAXIS1", str(width)),
            card("NAXIS2", str(height)), card("BZERO", "32768"), *extra]


def test_unparsable_bayer_offset_is_ignored_not_fatal(tmp_path: Path) -> None:
    """``YBAYROFF= NAN`` made astropy raise VerifyError inside the image search: the whole frame was
    rejected as unreadable. An unreadable metadata keyword now counts as absent."""
    data = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8)
    raw = (data.astype(np.int32) - 32768).astype(">i2").tobytes()
    path = _raw_frame(tmp_path, _uint16_cfa_cards(8, 6, card("BAYERPAT", "'GRBG'"), card("XBAYROFF", "1"), card("YBAYROFF", "NAN")), raw)
    before = digest(path)
    info = read_frame_info(path)
    assert info.layout == "cfa" and info.bayer_pattern == "RGGB"  # GRBG shifted by one column only
    assert "XBAYROFF" in info.to_dict(include_header=True)["header"]  # the summary skips only the broken card
    rgb = load_frame(info, hot_pixel_correction=False)
    np.testing.assert_array_equal(rgb[0, ::2, ::2], data[::2, ::2])  # R sites keep their values
    assert digest(path) == before


@pytest.mark.parametrize(
    "odd_card", [card("END", "0"), b"\x00" * 80, card("X(*", "1"), card("EXP*", "5")], ids=["END-keyword", "NUL-card", "regex", "wildcard"]
)
def test_unwritable_header_cards_do_not_break_the_frame_round_trip(tmp_path: Path, odd_card: bytes) -> None:
    """astropy reads cards it refuses to write (a keyword 'END' with a value, a NUL keyword);
    ``FrameInfo.from_dict`` (which ships frames to workers) raised on them."""
    data = np.ones((4, 6), dtype=np.uint16)
    raw = (data.astype(np.int32) - 32768).astype(">i2").tobytes()
    cards = [odd_card, card("EXPTIME", "10.0")] if odd_card[:3] in (b"END", b"\x00" * 3) else [card("EXPTIME", "10.0"), odd_card]
    info = read_frame_info(_raw_frame(tmp_path, _uint16_cfa_cards(6, 4, *cards), raw))
    summary = info.to_dict(include_header=True)
    assert odd_card[:8].decode("latin-1").strip() in summary["header"] or "\x00" * 8 in summary["header"]
    again = FrameInfo.from_dict(json.loads(json.dumps(summary, allow_nan=False)))
    # 'EXP*' must not act as a wildcard that overwrites EXPTIME
    assert again.shape == (4, 6) and again.header["EXPTIME"] == 10.0 and again.exposure_s == 10.0


def test_infinite_and_huge_float_pixels_become_undefined(tmp_path: Path) -> None:
    """inf, and values near the float32 limit (they overflow in the debayer averages), reached the
    stacker; they are now NaN like any undefined pixel, and the rest of the frame is untouched."""
    values = np.full((4, 6), 1000.0)
    values[0, 0], values[1, 2], values[3, 5] = np.inf, 1e300, -3.0e38
    cards = [card("SIMPLE", "T"), card("BITPIX", "-64"), card("NAXIS", "2"), card("NAXIS1", "6"), card("NAXIS2", "4")]
    info = read_frame_info(_raw_frame(tmp_path, cards, values.astype(">f8").tobytes()))
    data = load_frame(info)
    bad = np.zeros((4, 6), dtype=bool)
    bad[0, 0] = bad[1, 2] = bad[3, 5] = True
    assert np.isnan(data[0][bad]).all() and (data[0][~bad] == 1000.0).all()

    cfa = np.full((4, 6), 3.0e38, dtype=np.float32)  # every site near the limit: a debayered sum would overflow
    cfa_cards = [card("SIMPLE", "T"), card("BITPIX", "-32"), card("NAXIS", "2"), card("NAXIS1", "6"),
                 card("NAXIS2", "4"), card("BAYERPAT", "'RGGB'")]
    cfa_info = read_frame_info(_raw_frame(tmp_path, cfa_cards, cfa.astype(">f4").tobytes(), "cfa.fits"))
    error = frame_error_of(load_frame, cfa_info)
    assert error.reason_key == "frame_excluded_all_nan"


def test_bscale_overflow_gives_an_all_nan_rejection(tmp_path: Path) -> None:
    raw = np.arange(1, 25, dtype=">i2").tobytes()  # every value x 1E300 is far beyond float32
    cards = [card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "2"), card("NAXIS1", "6"), card("NAXIS2", "4"),
             card("BSCALE", "1E300")]
    info = read_frame_info(_raw_frame(tmp_path, cards, raw))
    assert frame_error_of(load_frame, info).reason_key == "frame_excluded_all_nan"


def test_absurd_optics_give_no_infinite_pixel_scale(tmp_path: Path) -> None:
    raw = np.zeros(24, dtype=">i2").tobytes()
    cards = _uint16_cfa_cards(6, 4, card("XPIXSZ", "1E300"), card("FOCALLEN", "1E-300"))
    info = read_frame_info(_raw_frame(tmp_path, cards, raw))
    assert info.header_scale_arcsec is None and info.focal_mm == 1e-300


def frame_error_of(call: Callable[..., Any], *args: Any) -> FrameError:
    with pytest.raises(FrameError) as caught:
        call(*args)
    assert_clean_key(caught.value.reason_key, caught.value.params)
    return caught.value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("stacking_kappa_low", float("inf")),  # inf passed: "no rejection" by accident
        ("hot_pixel_sigma", "1e999"),
        ("max_memory_mb", 1e300),  # an int beyond C integers crashed the block planner later
        ("num_workers", 2**40),
        ("output_basename", "../elsewhere"),  # outputs written outside OUTPUT
        ("output_basename", ""),
        ("output_basename", "a\x00b"),
        ("preview_stretch_percentiles", ["a", "b"]),  # crashed the preview at the very end of a run
        ("preview_stretch_percentiles", [99.8, 0.5]),
        ("preview_stretch_percentiles", [1]),
    ],
)
def test_config_values_that_used_to_slip_through(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config({key: value})
    assert caught.value.key == "config_error_invalid_value" and caught.value.params["key"] == key
    assert_clean_key(caught.value.key, caught.value.params)


def test_config_file_problems_name_the_file_and_key(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # RecursionError escaped read_config_file
    with pytest.raises(ConfigError) as caught:
        load_config(deep, use_user_file=False)
    assert caught.value.key == "config_error_not_json" and caught.value.params["path"] == str(deep)

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"stacking_kappa_high": "Infinity"}))
    with pytest.raises(ConfigError) as caught:
        load_config(wrong, use_user_file=False)
    assert caught.value.key == "config_error_invalid_value_in_file"
    message = tr(caught.value.key, "en", **caught.value.params)
    assert str(wrong) in message and "stacking_kappa_high" in message

    bom = tmp_path / "bom.json"  # Windows editors write a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"stacking_kappa_low": 2.5}).encode())
    assert load_config(bom, use_user_file=False)["stacking_kappa_low"] == 2.5
    assert validate_config({"preview_stretch_percentiles": [1, "99.5"]})["preview_stretch_percentiles"] == [1.0, 99.5]


@pytest.mark.parametrize("naxis", ["1E15", "2147483647", "-3", "1000"])
def test_absurd_naxis_is_rejected_at_once(tmp_path: Path, naxis: str) -> None:
    """``NAXIS = 1E15`` made the image search ask for NAXIS1..NAXIS10^15 (it hung, growing in memory)."""
    cards = [card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", naxis), card("NAXIS1", "4"), card("NAXIS2", "4")]
    path = _raw_frame(tmp_path, cards, bytes(32))
    error = frame_error_of(read_frame_info, path)
    assert error.reason_key in ("frame_excluded_unsupported_shape", "frame_excluded_unreadable", "frame_excluded_no_image")


def test_absurd_naxis_in_an_extension_is_never_opened(tmp_path: Path) -> None:
    absurd = fits_bytes([card("XTENSION", "'IMAGE   '"), card("BITPIX", "16"), card("NAXIS", "2147483647"),
                         card("PCOUNT", "0"), card("GCOUNT", "1")])
    empty_primary = fits_bytes([card("SIMPLE", "T"), card("BITPIX", "8"), card("NAXIS", "0"), card("EXTEND", "T")])
    path = tmp_path / "extension.fits"
    path.write_bytes(empty_primary + absurd)
    assert frame_error_of(read_frame_info, path).reason_key == "frame_excluded_unsupported_shape"
    # After a usable image the absurd extension is never reached: the frame is used.
    image = fits_bytes([card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "2"), card("NAXIS1", "4"),
                        card("NAXIS2", "4"), card("EXTEND", "T")], bytes(32))
    usable = tmp_path / "usable.fits"
    usable.write_bytes(image + absurd)
    assert check_frame(usable) == "ok"


@pytest.mark.parametrize(
    "image",
    [b"NAXIS  = 2147483647", b"naxis   = 2147483647", b" NAXIS  = 2147483647", b"Naxis = 1000000 / axes", b"NAXIS   2147483647"],
)
@pytest.mark.parametrize("where", ["primary", "extension"])
def test_naxis_cards_astropy_reads_leniently_cannot_hang_the_pass(tmp_path: Path, image: bytes, where: str) -> None:
    """astropy takes a lower-case keyword, or a value indicator before column 9, for NAXIS: such an
    absurd card (found by the property test at a larger scale) hung the header pass."""
    cards = [card("BITPIX", "16"), image.ljust(80), card("NAXIS1", "4"), card("NAXIS2", "4")]
    if where == "primary":
        blob = fits_bytes([card("SIMPLE", "T"), *cards], bytes(32))
    else:
        empty = fits_bytes([card("SIMPLE", "T"), card("BITPIX", "8"), card("NAXIS", "0"), card("EXTEND", "T")])
        blob = empty + fits_bytes([card("XTENSION", "'IMAGE   '"), *cards, card("PCOUNT", "0"), card("GCOUNT", "1")], bytes(32))
    path = tmp_path / "frame.fits"
    path.write_bytes(blob)
    with time_limit(5.0):
        error = frame_error_of(read_frame_info, path)
    assert error.reason_key in ("frame_excluded_unsupported_shape", "frame_excluded_unreadable", "frame_excluded_no_image")
    assert "Took" not in error.detail


def test_conflicting_duplicate_naxis_is_rejected(tmp_path: Path) -> None:
    """``NAXIS1 = 3`` then ``NAXIS1 = 1``: the header pass saw an RGB image (the first card), astropy
    read one plane (the last), and a 1-channel array went on as a 3-channel frame."""
    cards = [card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "3"), card("NAXIS1", "3"), card("NAXIS1", "1"),
             card("NAXIS2", "1"), card("NAXIS3", "1")]
    path = _raw_frame(tmp_path, cards, bytes(6))
    error = frame_error_of(read_frame_info, path)
    assert error.reason_key == "frame_excluded_unreadable" and "NAXIS1" in error.detail
    same = _raw_frame(tmp_path, [card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "2"), card("NAXIS1", "4"),
                                 card("NAXIS1", "4"), card("NAXIS2", "2")], bytes(16), "same.fits")
    assert check_frame(same) == "ok"  # a harmless repeat is fine


def test_second_naxis_card_cannot_smuggle_an_absurd_value(tmp_path: Path) -> None:
    """A duplicate ``NAXIS = 1000000`` after a sane one: astropy used the last card and spent
    minutes listing a million axes."""
    cards = [card("SIMPLE", "T"), card("BITPIX", "16"), card("NAXIS", "2"), card("NAXIS1", "4"), card("NAXIS2", "4"),
             *[card("COMMENT") for _ in range(40)], card("NAXIS", "1000000")]  # in the second header block
    path = _raw_frame(tmp_path, cards, bytes(32))
    assert frame_error_of(read_frame_info, path).reason_key == "frame_excluded_unsupported_shape"

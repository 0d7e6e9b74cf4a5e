"""P1 header pass: the fast WCS construction and the reader processes give exactly the serial,
astropy-built outcomes (WCS pickles and pixel->sky mappings bit-identical, same headers, same
exclusions in the same order, same events)."""

from __future__ import annotations

import math
import multiprocessing
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from napari_zemosaic.engine import frames
from napari_zemosaic.engine.frames import FrameError, FrameInfo, iter_frame_infos, read_frame_info, validate_wcs

WIDTH, HEIGHT = 64, 48
SCALE = 2.4 / 3600.0  # deg/px: inside the accepted 0.3-15 arcsec/px


# ----------------------------------------------------------------------------- helpers


def wcs_cards(ra: float = 83.8, dec: float = -5.4, angle_deg: float = 12.0, sip: bool = True) -> list[tuple[str, Any]]:
    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    cards: list[tuple[str, Any]] = [
        ("CTYPE1", "RA---TAN-SIP" if sip else "RA---TAN"),
        ("CTYPE2", "DEC--TAN-SIP" if sip else "DEC--TAN"),
        ("CUNIT1", "deg"),
        ("CUNIT2", "deg"),
        ("CRVAL1", ra),
        ("CRVAL2", dec),
        ("CRPIX1", WIDTH / 2 + 0.5),
        ("CRPIX2", HEIGHT / 2 + 0.5),
        ("CD1_1", -SCALE * cos),
        ("CD1_2", SCALE * sin),
        ("CD2_1", SCALE * sin),
        ("CD2_2", SCALE * cos),
        ("RADESYS", "ICRS"),
        ("EQUINOX", 2000.0),
    ]
    if sip:
        cards += [
            ("A_ORDER", 2), ("A_2_0", 1.25e-6), ("A_1_1", -3.4e-6), ("A_0_2", 2.1e-6),
            ("B_ORDER", 2), ("B_2_0", -2.2e-6), ("B_1_1", 1.5e-6), ("B_0_2", -1.1e-6),
        ]
    return cards


def header_of(cards: list[tuple[str, Any]], naxis: tuple[Any, ...] = (WIDTH, HEIGHT)) -> fits.Header:
    header = fits.Header()
    header.append(("NAXIS", len(naxis)))
    for axis, size in enumerate(naxis, start=1):
        header.append((f"NAXIS{axis}", size))
    for card in cards:
        header.append(card)
    return header


def seestar_cards() -> list[tuple[str, Any]]:
    return [
        ("CREATOR", "ZWO Seestar S50"), ("INSTRUME", "Seestar S50"), ("TELESCOP", "S50_1d568bdd"),
        ("DATE-OBS", "2024-02-10T20:15:31.123"), ("EXPTIME", 10.0), ("BAYERPAT", "GRBG"),
        ("FOCALLEN", 250), ("XPIXSZ", 2.9), ("EQMODE", 0), ("RA", 83.82), ("DEC", -5.39),
    ]


def write_frame(path: Path, cards: list[tuple[str, Any]], seed: int = 0) -> Path:
    data = np.random.default_rng(seed).integers(100, 4000, size=(HEIGHT, WIDTH)).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)
    for card in cards:
        hdu.header.append(card)
    hdu.writeto(path)
    return path


def slow_wcs(header: fits.Header) -> WCS:
    """The WCS as astropy's constructor builds it (the header pass before the fast path)."""
    import warnings

    axes = frames._celestial_axes(header)
    assert axes is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(frames._wcs_header(header), relax=True, naxis=sorted(axes))


def assert_same_wcs(fast: WCS | None, slow: WCS | None) -> None:
    if slow is None:
        assert fast is None
        return
    assert fast is not None
    assert sorted(fast.__dict__) == sorted(slow.__dict__)
    assert pickle.dumps(fast) == pickle.dumps(slow)
    grid = np.array([[x, y] for x in (-40.0, 0.0, 17.3, 31.5, 63.0, 400.0) for y in (-7.0, 0.0, 23.5, 47.0, 300.0)])
    assert np.array_equal(fast.all_pix2world(grid, 0), slow.all_pix2world(grid, 0), equal_nan=True)
    assert np.array_equal(fast.wcs_pix2world(grid, 0), slow.wcs_pix2world(grid, 0), equal_nan=True)


@pytest.fixture(autouse=True)
def readers_on_any_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reader processes also on small CI hosts (a run takes them from 4 cores on)."""
    monkeypatch.setattr(frames, "PROCESS_HEADER_MIN_CORES", 1)


def outcome_key(outcome: FrameInfo | FrameError) -> Any:
    if isinstance(outcome, FrameError):
        return ("error", outcome.reason_key, outcome.detail, outcome.params)
    fields = {name: getattr(outcome, name) for name in outcome.__dataclass_fields__ if name not in ("wcs", "header")}
    return (
        "frame",
        repr(sorted(fields.items())),
        [card.image for card in outcome.header.cards],
        pickle.dumps(outcome.wcs) if outcome.wcs is not None else None,
    )


def assert_same_outcomes(parallel: list[Any], serial: list[Any]) -> None:
    assert [outcome_key(item) for item in parallel] == [outcome_key(item) for item in serial]
    for mine, theirs in zip(parallel, serial):
        if isinstance(theirs, FrameInfo):
            assert_same_wcs(mine.wcs, theirs.wcs)  # the pixel -> sky mapping, bit for bit
            assert mine.header == theirs.header


# ----------------------------------------------------------------------------- fast WCS


def _replace(cards: list[tuple[str, Any]], **changes: Any) -> list[tuple[str, Any]]:
    return [(key, changes.get(key, value)) for key, value in cards]


WCS_CASES: dict[str, tuple[fits.Header, bool]] = {
    # name: (header, whether the fast path takes it)
    "tan": (header_of(wcs_cards(sip=False)), True),
    "tan_sip": (header_of(wcs_cards()), True),
    "sip_with_inverse": (
        header_of(wcs_cards() + [("AP_ORDER", 2), ("AP_2_0", -1.2e-6), ("AP_1_1", 3.3e-6), ("AP_0_2", -2e-6),
                                 ("BP_ORDER", 2), ("BP_2_0", 2.1e-6), ("BP_1_1", -1.5e-6), ("BP_0_2", 1e-6)]),
        True,
    ),
    "sip_third_order": (header_of(wcs_cards() + [("A_3_0", 1e-9), ("B_0_3", -2e-9)]), True),
    "long_floats": (
        header_of(_replace(wcs_cards(), CRVAL1=83.12345678901234, CD1_1=-6.6666666666666671e-04,
                           CD2_2=0.00066666666666666671, A_1_1=-3.4567890123456789e-06)),
        True,
    ),
    "integer_values": (header_of(_replace(wcs_cards(), CRPIX1=32, CRPIX2=24, CRVAL1=84, A_ORDER=2))[:], True),
    "equinox_text": (header_of(_replace(wcs_cards(), EQUINOX="J2000") + [("EPOCH", 2000.0)]), True),
    "fk5_lonpole_latpole": (
        header_of(_replace(wcs_cards(), RADESYS="FK5") + [("LONPOLE", 180.0), ("LATPOLE", 0.0)]),
        True,
    ),
    "pc_cdelt": (
        header_of([c for c in wcs_cards(sip=False) if not c[0].startswith("CD")]
                  + [("CDELT1", -SCALE), ("CDELT2", SCALE), ("PC1_1", 0.98), ("PC1_2", 0.2), ("PC2_1", -0.2),
                     ("PC2_2", 0.98)]),
        True,
    ),
    "crota": (
        header_of([c for c in wcs_cards(sip=False) if not c[0].startswith("CD")]
                  + [("CDELT1", -SCALE), ("CDELT2", SCALE), ("CROTA2", 33.0)]),
        True,
    ),
    "arcsec_units": (
        header_of([c for c in _replace(wcs_cards(sip=False), CUNIT1="arcsec", CUNIT2="arcsec") if not c[0].startswith("CD")]
                  + [("CDELT1", -2.4), ("CDELT2", 2.4)]),
        True,
    ),
    "a_order_one": (header_of(_replace(wcs_cards(), A_ORDER=1, B_ORDER=1)), True),
    "b_order_one": (header_of(_replace(wcs_cards(), B_ORDER=1)), True),
    "float_naxis": (header_of(wcs_cards(), naxis=(64.0, 48.0)), True),
    "galactic": (header_of(_replace(wcs_cards(), CTYPE1="GLON-TAN-SIP", CTYPE2="GLAT-TAN-SIP")), True),
    "swapped_axes": (header_of(_replace(wcs_cards(sip=False), CTYPE1="DEC--TAN", CTYPE2="RA---TAN")), True),
    "cube_freq_last": (
        header_of(wcs_cards(sip=False) + [("CTYPE3", "FREQ"), ("CRVAL3", 1.4e9), ("CDELT3", 1e6), ("CRPIX3", 1.0)],
                  naxis=(WIDTH, HEIGHT, 3)),
        True,
    ),
    "cube_freq_first": (
        header_of([("CTYPE1", "FREQ"), ("CRVAL1", 1.4e9), ("CDELT1", 1e6), ("CRPIX1", 1.0),
                   ("CTYPE2", "RA---TAN"), ("CTYPE3", "DEC--TAN"), ("CRVAL2", 10.0), ("CRVAL3", 20.0),
                   ("CRPIX2", 32.5), ("CRPIX3", 24.5), ("CDELT2", -SCALE), ("CDELT3", SCALE)],
                  naxis=(3, WIDTH, HEIGHT)),
        True,
    ),
    # taken by astropy's constructor, as before
    "sip_without_suffix": (header_of(_replace(wcs_cards(), CTYPE1="RA---TAN", CTYPE2="DEC--TAN")), False),
    "pv_cards": (header_of(wcs_cards(sip=False) + [("PV2_1", 0.0), ("PV2_2", 0.0)]), False),
    "duplicate_crval": (header_of(wcs_cards() + [("CRVAL1", 84.0)]), False),
    "colon_text": (header_of(_replace(wcs_cards(), RADESYS="ICRS: x")), False),
}


@pytest.mark.parametrize("name", sorted(WCS_CASES))
def test_fast_wcs_is_the_astropy_wcs(name: str) -> None:
    header, fast_path = WCS_CASES[name]
    wcs, why, recipe = frames._build_celestial_wcs(header)
    assert why == ""
    assert (recipe is not None) == fast_path
    assert_same_wcs(wcs, slow_wcs(header))
    if recipe is not None:  # the recipe travels between processes: it rebuilds the same WCS
        assert_same_wcs(frames.wcs_from_recipe(pickle.loads(pickle.dumps(recipe))), slow_wcs(header))


def test_fast_wcs_matches_astropy_on_random_values() -> None:
    rng = np.random.default_rng(42)
    for _ in range(40):
        scale = rng.uniform(0.5, 12.0) / 3600.0
        angle = rng.uniform(0, 2 * math.pi)
        values = {
            "CRVAL1": float(rng.uniform(0, 360)), "CRVAL2": float(rng.uniform(-89, 89)),
            "CRPIX1": float(rng.uniform(-100, 200)), "CRPIX2": round(float(rng.uniform(-100, 200)), int(rng.integers(0, 4))),
            "CD1_1": -scale * math.cos(angle), "CD1_2": scale * math.sin(angle),
            "CD2_1": scale * math.sin(angle), "CD2_2": scale * math.cos(angle),
            "A_2_0": float(rng.normal(0, 1e-6)), "A_1_1": float(rng.normal(0, 1e-6)), "A_0_2": float(rng.normal(0, 1e-6)),
            "B_2_0": float(rng.normal(0, 1e-6)), "B_1_1": float(rng.normal(0, 1e-6)), "B_0_2": float(rng.normal(0, 1e-6)),
        }
        header = header_of(_replace(wcs_cards(), **values))
        wcs, _, recipe = frames._build_celestial_wcs(header)
        assert recipe is not None
        assert_same_wcs(wcs, slow_wcs(header))


@pytest.mark.parametrize("name", sorted(WCS_CASES))
def test_validate_wcs_verdicts_are_unchanged(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    header = WCS_CASES[name][0]
    fast = validate_wcs(header, (HEIGHT, WIDTH))
    monkeypatch.setattr(frames, "_fast_recipe", lambda header, axes: None)
    slow = validate_wcs(header, (HEIGHT, WIDTH))
    assert fast[1:] == slow[1:]
    assert_same_wcs(fast[0], slow[0])


@pytest.mark.parametrize(
    "cards",
    [
        _replace(wcs_cards(), CD1_1=1e-4, CD1_2=2e-4, CD2_1=1e-4, CD2_2=2e-4),  # singular
        _replace(wcs_cards(), CD1_1=-1e-2, CD2_2=1e-2, CD1_2=0.0, CD2_1=0.0),  # 36"/px: out of range
        _replace(wcs_cards(), CRVAL1="NAN"),  # non-numeric value: astropy's path names it
        _replace(wcs_cards(), CTYPE1="RA---XYZ", CTYPE2="DEC--XYZ"),  # wcslib refuses the projection
        _replace(wcs_cards(), A_ORDER=2, B_ORDER="two"),
        [card for card in wcs_cards() if card[0] != "B_ORDER"],  # A_ORDER without B_ORDER
        _replace(wcs_cards(), A_2_0=5e-2),  # a SIP that does not invert
    ],
)
def test_invalid_wcs_gets_the_same_reason(cards: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    header = header_of(cards)
    fast = validate_wcs(header, (HEIGHT, WIDTH))
    monkeypatch.setattr(frames, "_fast_recipe", lambda header, axes: None)
    slow = validate_wcs(header, (HEIGHT, WIDTH))
    assert fast[0] is None and slow[0] is None
    assert fast[1:] == slow[1:]


def test_float_naxis_below_two_is_refused_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    header = header_of(wcs_cards())
    header["NAXIS"] = 0.0  # astropy's constructor fails formatting it in a warning
    fast = validate_wcs(header, (HEIGHT, WIDTH))
    monkeypatch.setattr(frames, "_fast_recipe", lambda header, axes: None)
    assert fast == validate_wcs(header, (HEIGHT, WIDTH))
    assert fast[1] == "invalid"


_ODD_VALUES: list[Any] = [
    "NAN", "", "J2000", "RA---TAN", "DEC--SIN", "GLON-CAR", "RA---TPV", "FREQ", "x'y", "deg: x", "  ICRS", "a" * 70,
    True, False, 0, 1, 2, 3, 25, -1, 1e300, -1e-300, 0.0, 1.2345678901234567e-05, 10**30, 2.5, 90.0, 2.7e-4,
]
_EXTRA_KEYS = [
    "PV2_1", "LONPOLE", "LATPOLE", "CROTA2", "CDELT1", "CDELT2", "PC1_1", "PC2_1", "AP_ORDER", "AP_1_0", "BP_ORDER",
    "BP_0_1", "A_3_0", "A_DMAX", "WCSAXES", "CTYPE3", "CRVAL3", "NAXIS3", "RADECSYS", "EPOCH", "A_20_0", "PS1_0", "NAXIS",
]


def test_fast_path_agrees_on_mangled_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random damage to a TAN-SIP header (odd values and types, extra, missing and repeated cards):
    the verdict, reason and WCS are those of astropy's own path, whichever path is taken."""
    import random

    rng = random.Random(1234)
    cases: list[tuple[fits.Header, tuple[int, int] | None]] = []
    while len(cases) < 250:
        cards = wcs_cards()
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.4:
                index = rng.randrange(len(cards))
                cards[index] = (cards[index][0], rng.choice(_ODD_VALUES))
            elif roll < 0.65:
                cards.append((rng.choice(_EXTRA_KEYS), rng.choice(_ODD_VALUES + [0.5, 1e-4, 180.0])))
            elif roll < 0.85:
                del cards[rng.randrange(len(cards))]
            else:
                cards.append(rng.choice(cards))
        try:
            text = header_of(cards).tostring()
        except Exception:  # astropy refuses to write such a card at all
            continue
        cases.append((fits.Header.fromstring(text), rng.choice([None, (HEIGHT, WIDTH)])))
    fast = [validate_wcs(header.copy(), shape) for header, shape in cases]
    monkeypatch.setattr(frames, "_fast_recipe", lambda header, axes: None)
    slow = [validate_wcs(header.copy(), shape) for header, shape in cases]
    for mine, theirs in zip(fast, slow):
        assert mine[1:] == theirs[1:]
        assert_same_wcs(mine[0], theirs[0])


def test_fast_path_self_check_passes_here() -> None:
    assert frames._fast_wcs_agrees()


# ----------------------------------------------------------------------------- files


@pytest.fixture
def night(tmp_path: Path) -> list[Path]:
    """Good frames and one of each kind of trouble, interleaved."""
    folder = tmp_path / "night"
    folder.mkdir()
    paths: list[Path] = []
    for index in range(24):
        cards = seestar_cards() + wcs_cards(ra=83.8 + index * 0.001, dec=-5.4 + index * 0.0007, angle_deg=index)
        paths.append(write_frame(folder / f"light_{index:03d}.fit", cards, seed=index))
    no_wcs = write_frame(folder / "light_005a_nowcs.fit", seestar_cards())
    bad_wcs = write_frame(
        folder / "light_007a_singular.fit",
        seestar_cards() + _replace(wcs_cards(), CD1_1=1e-4, CD1_2=2e-4, CD2_1=1e-4, CD2_2=2e-4),
    )
    raw = paths[3].read_bytes()
    truncated = folder / "light_009a_truncated.fit"
    truncated.write_bytes(raw[: len(raw) - 3000])
    empty = folder / "light_011a_empty.fit"
    empty.write_bytes(b"")
    not_fits = folder / "light_013a_notes.fit"
    not_fits.write_text("not a FITS file\n" * 300)
    pv = write_frame(folder / "light_015a_pv.fit", seestar_cards() + wcs_cards(sip=False) + [("PV2_1", 0.0)])
    long_float = write_frame(
        folder / "light_017a_long.fit",
        seestar_cards() + _replace(wcs_cards(), CD1_1=-6.6666666666666671e-04, CRVAL1=83.12345678901234),
    )
    # an image in an extension (header kept as read) and a tile-compressed one (header copied)
    data = np.arange(HEIGHT * WIDTH, dtype=np.uint16).reshape(HEIGHT, WIDTH)
    extension = fits.ImageHDU(data)
    compressed = fits.CompImageHDU(data)
    for hdu in (extension, compressed):
        for card in seestar_cards() + wcs_cards():
            hdu.header.append(card)
    fits.HDUList([fits.PrimaryHDU(), extension]).writeto(folder / "light_019a_extension.fits")
    fits.HDUList([fits.PrimaryHDU(), compressed]).writeto(folder / "light_021a_compressed.fits.fz")
    return frames.scan_inputs(folder)


def test_serial_pass_is_the_astropy_only_pass(night: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = list(iter_frame_infos(night, min_files=10**9))
    monkeypatch.setattr(frames, "_fast_recipe", lambda header, axes: None)
    slow = list(iter_frame_infos(night, min_files=10**9))
    assert [outcome_key(item) for item in fast] == [outcome_key(item) for item in slow]
    reasons = {Path(item.params["path"]).name: item.reason_key for item in fast if isinstance(item, FrameError)}
    assert reasons == {
        "light_009a_truncated.fit": frames.REASON_TRUNCATED,
        "light_011a_empty.fit": frames.REASON_EMPTY_FILE,
        "light_013a_notes.fit": frames.REASON_NOT_FITS,
    }
    statuses = {item.path.name: item.wcs_status for item in fast if isinstance(item, FrameInfo)}
    assert statuses["light_005a_nowcs.fit"] == "missing"
    assert statuses["light_007a_singular.fit"] == "invalid"
    assert statuses["light_021a_compressed.fits.fz"] == statuses["light_019a_extension.fits"] == "valid"
    assert sum(status == "valid" for status in statuses.values()) == 24 + 4


def test_plain_primary_read_gives_astropy_s_outcomes(night: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a plain primary image from its header blocks (no ``fits.open``) and its values through
    HeaderLookup gives the outcomes of astropy's path: fields, header cards, WCS bit for bit."""
    taken: list[str] = []
    original = frames._plain_primary_image

    def spy(path: Path, header_blocks: bytes, file_size: int) -> Any:
        plan = original(path, header_blocks, file_size)
        if plan is not None and plan.lookup is not None:
            taken.append(path.name)
        return plan

    monkeypatch.setattr(frames, "_plain_primary_image", spy)
    plain = list(iter_frame_infos(night, min_files=10**9))
    monkeypatch.setattr(frames, "_plain_primary_image", lambda path, header_blocks, file_size: None)
    through_astropy = list(iter_frame_infos(night, min_files=10**9))
    assert_same_outcomes(plain, through_astropy)
    # every primary image of the night but the truncated one; neither extension nor compressed file
    assert len(taken) == 24 + 4 and not any(name.startswith(("light_009a", "light_019a", "light_021a")) for name in taken)


@pytest.mark.parametrize(
    "image, why",
    [
        ("CONTINUE= '&'", "long-string continuation"),
        ("HIERARCH= 5", "HIERARCH convention"),
        ("DP1     = 'AXIS.1: 1'", "record-valued card"),
        ("CPLX    = (1.0, 2.0)", "complex value"),
        ("UNDEF   =", "undefined value"),
        ("QUOTED  = 'it''s'", "quote inside a string"),
        ("lower   = 1", "lower-case keyword"),
        ("EXPTIME = 10 s", "value followed by text"),
        ("EXPTIME =10", "no blank after the value indicator"),
    ],
)
def test_header_lookup_leaves_unusual_cards_to_astropy(image: str, why: str) -> None:
    plain = "".join(card.ljust(80) for card in ("SIMPLE  =                    T", "NAXIS   =                    2"))
    text = plain + image.ljust(80)
    header = fits.Header.fromstring(text)
    assert frames.HeaderLookup.of(fits.Header.fromstring(plain), text) is None  # not that header's text
    assert frames.HeaderLookup.of(header, text) is None, why
    assert frames.HeaderLookup.of(fits.Header.fromstring(plain), plain) is not None


def test_header_lookup_reads_values_as_astropy_does() -> None:
    cards = [
        "SIMPLE  =                    T / comment", "BITPIX  =                  -32", "NAXIS   = 2",
        "EXPTIME =                 10.0", "GAIN    =                  +80 / no unit", "TEMP    = -0.0",
        "BIG     = 99999999999999999999999", "FORTRAN =               1.5D-3", "LOWEXP  = 2.5e3", "DOT     = .5",
        "TRAIL   = 5.", "INTEXP  = 1E5", "HUGE    = 1E400", "LEADING = 007", "FLAG    = F/comment",
        "OBJECT  = 'M42     '           / target", "EMPTY   = ''", "BLANKS  = '    '", "INDENT  = '  x  '",
        "DATE-OBS= '2024-02-10T20:15:31.123'", "NOTRVKC = '1: 2'", "COMMENT   a comment = 'x'",
        "HISTORY written by hand", "", "EXPTIME = 99.0 / a duplicate: the first one counts",
    ]
    text = "".join(card.ljust(80) for card in cards)
    header = fits.Header.fromstring(text)
    lookup = frames.HeaderLookup.of(header, text)
    assert lookup is not None

    def typed(value: Any) -> Any:
        return type(value).__name__, repr(value)

    assert [(card.keyword, typed(card.value)) for card in lookup.cards] == [
        (card.keyword, typed(card.value)) for card in header.cards
    ]
    for keyword in [card.keyword for card in header.cards] + ["ABSENT", "date-obs", "exptime"]:
        assert typed(lookup.get(keyword, "default")) == typed(header.get(keyword, "default")), keyword
        assert (keyword in lookup) == (keyword in header), keyword
    assert lookup.get("EXPTIME") == 10.0 and lookup.get("GAIN") == 80 and lookup.get("FLAG") is False
    assert lookup.repeats_a_keyword  # EXPTIME twice: the plain primary read declines such a header
    single = "".join(card.ljust(80) for card in cards[:-1] + ["COMMENT again"])  # commentary may repeat
    assert not frames.HeaderLookup.of(fits.Header.fromstring(single), single).repeats_a_keyword


def test_primary_header_is_not_copied_but_compressed_one_is(night: list[Path]) -> None:
    by_name = {path.name: path for path in night}
    primary = read_frame_info(by_name["light_000.fit"])
    assert type(primary.header) is fits.Header and primary.header["CTYPE1"] == "RA---TAN-SIP"
    compressed = read_frame_info(by_name["light_021a_compressed.fits.fz"])
    assert type(compressed.header) is fits.Header and compressed.header["CTYPE1"] == "RA---TAN-SIP"


def test_reader_round_trip_gives_the_serial_outcomes(night: list[Path]) -> None:
    """What a reader process ships (pickled for real) turns back into exactly the serial outcomes."""
    serial = list(iter_frame_infos(night, min_files=10**9))
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        halves = [night[: len(night) // 2], night[len(night) // 2 :]]
        shipped = [item for answer in pool.map(frames._read_chunk, halves, [True] * 2, [False] * 2) for item in answer]
    assert all(item[0] == "error" or item[1].wcs is None for item in shipped)  # no WCS travels
    assert sum(item[0] == "frame" and item[2] is not None for item in shipped) >= 24  # recipes do
    assert_same_outcomes([frames._unship(item) for item in shipped], serial)


def test_parallel_pass_gives_the_serial_outcomes(night: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    serial_outcomes = list(iter_frame_infos(night, min_files=10**9))
    assert_same_outcomes(list(iter_frame_infos(night, workers=2, min_files=0)), serial_outcomes)

    # Now with the main process waiting for every chunk the pool has taken (none read twice).
    answered: list[int] = []
    original = frames._SharedHeaderPass.take

    def take_waiting(self: Any, index: int) -> Any:
        self._answering.set()
        answer = original(self, index)
        if answer is not None:
            answered.append(index)
        return answer

    monkeypatch.setattr(frames._SharedHeaderPass, "take", take_waiting)
    assert_same_outcomes(list(iter_frame_infos(night, workers=2, min_files=0)), serial_outcomes)
    assert answered  # at least the chunk the pool took first came from a reader process


def test_pool_that_cannot_start_leaves_the_work_to_the_main_process(
    night: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_zemosaic.engine import worker_env

    def broken() -> Any:
        raise OSError("no processes here")

    monkeypatch.setattr(worker_env, "process_context", broken)
    serial = [outcome_key(item) for item in iter_frame_infos(night, min_files=10**9)]
    start = time.perf_counter()
    assert [outcome_key(item) for item in iter_frame_infos(night, workers=2, min_files=0)] == serial
    assert time.perf_counter() - start < 30


def _reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "zemosaic-header-readers"]


def test_closing_the_pass_early_stops_the_readers(night: list[Path]) -> None:
    for thread in _reader_threads():
        thread.join(timeout=30)
    outcomes = iter_frame_infos(night, workers=2, min_files=0)
    first = next(outcomes)
    assert isinstance(first, FrameInfo)
    assert _reader_threads()
    outcomes.close()
    for thread in _reader_threads():
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_small_inputs_and_daemonic_processes_read_serially(monkeypatch: pytest.MonkeyPatch) -> None:
    assert frames._header_readers(frames.PROCESS_HEADER_MIN_FILES - 1, 0, frames.PROCESS_HEADER_MIN_FILES) == 0
    assert frames._header_readers(500, 3, 0) == 3
    assert frames._header_readers(5, 8, 0) == 4  # never more readers than files but one
    monkeypatch.setattr(frames, "_available_cores", lambda: 2)
    assert frames._header_readers(500, 0, 0) == 1
    monkeypatch.setattr(frames, "PROCESS_HEADER_MIN_CORES", 4)
    assert frames._header_readers(500, 8, 0) == 0  # two cores: the main process alone
    monkeypatch.setattr(frames, "_available_cores", lambda: 16)
    assert frames._header_readers(500, 0, 0) == 15

    class Daemonic:
        daemon = True

    monkeypatch.setattr(multiprocessing, "current_process", lambda: Daemonic())
    assert frames._header_readers(500, 3, 0) == 0


# ----------------------------------------------------------------------------- ingest


def _event_key(event: Any) -> Any:
    from napari_zemosaic.events import ProgressEvent

    if isinstance(event, ProgressEvent):
        return ("progress", event.phase, event.done, event.total, event.key, event.params)
    return ("log", event.level, event.key, event.params)


def test_ingest_with_readers_gives_the_same_result_and_events(
    night: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_zemosaic.config import validate_config
    from napari_zemosaic.engine.pipeline import drain, ingest
    from napari_zemosaic.events import Reporter

    folder = night[0].parent
    config = validate_config({"num_workers": 2})

    def ingested() -> tuple[Any, list[Any]]:
        reporter = Reporter()
        events: list[Any] = []
        result = drain(ingest(folder, None, config, reporter), events.append)
        return result, [_event_key(event) for event in events]

    serial, serial_events = ingested()
    monkeypatch.setattr(frames, "PROCESS_HEADER_MIN_FILES", 0)
    parallel, parallel_events = ingested()
    assert parallel_events == serial_events
    assert [e.to_dict() for e in parallel.excluded] == [e.to_dict() for e in serial.excluded]
    assert [outcome_key(info) for info in parallel.usable] == [outcome_key(info) for info in serial.usable]
    assert parallel.found == serial.found and parallel.warnings == serial.warnings
    assert sum(1 for key in serial_events if key[0] == "progress") == len(night)
    assert [e.reason_key for e in serial.excluded] == [
        frames.REASON_TRUNCATED, frames.REASON_EMPTY_FILE, frames.REASON_NOT_FITS,
        frames.REASON_NO_WCS, frames.REASON_BAD_WCS,
    ]

"""What an image's header says and the pixels alone do not: the samples'
bit depth (16-bit and float images are refused on every reading path),
the microns per pixel (a TIFF's resolution in centimetres, an OME-TIFF's
OME-XML: striped through Pillow and tiled through OpenSlide alike), pixels
that are not square (refused for reads at an mpp), and a tiled TIFF's
Orientation (refused: OpenSlide 3.4 reads the tiles as stored). The files
are written byte by byte (TIFF, PNG) or with Pillow."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import streamcnn
from streamcnn import Slide
from streamcnn.data import SlideDataset

needs = pytest.mark.skipif(
    not streamcnn.slide.available(),
    reason="streamcnn built without OpenSlide (libopenslide-dev missing)")

SHORT, LONG, RATIONAL, ASCII = 3, 4, 5, 2
_FORMATS = {SHORT: "H", LONG: "I"}


def _samples(h, w, spp, nbytes, seed=0) -> torch.Tensor:
    """h x w x spp samples of nbytes bytes each (little-endian), as uint8."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, spp * nbytes), generator=g, dtype=torch.uint8)


def _tiff(pages) -> bytes:
    """A little-endian classic TIFF of deflate-compressed pages (libtiff
    second-guesses the byte counts of small uncompressed tiles). Each page is a
    dict: ``pixels`` (uint8 h x w x bytes-per-pixel), ``spp``, ``bits``,
    ``sample_format`` (1 unsigned, 2 signed, 3 float), ``tile`` (an int:
    tiled; None: one strip), ``tags`` ({tag: (type, values)}: ASCII as
    bytes, RATIONAL as (num, den) pairs, else integers)."""
    out = bytearray(b"II*\0\0\0\0\0")
    link = 4  # where the offset of the next page goes
    for page in pages:
        px, spp, bits = page["pixels"], page.get("spp", 3), page.get("bits", 8)
        h, w, bpp = px.shape
        tile = page.get("tile")
        if tile:
            chunks = []
            for ty in range(0, h, tile):
                for tx in range(0, w, tile):
                    t = torch.zeros(tile, tile, bpp, dtype=torch.uint8)
                    part = px[ty:ty + tile, tx:tx + tile]
                    t[:part.shape[0], :part.shape[1]] = part
                    chunks.append(zlib.compress(t.numpy().tobytes()))
            layout = {322: (SHORT, [tile]), 323: (SHORT, [tile])}
            offsets_tag, counts_tag = 324, 325
        else:
            chunks = [zlib.compress(px.numpy().tobytes())]
            layout = {278: (LONG, [h])}
            offsets_tag, counts_tag = 273, 279
        tags = {256: (LONG, [w]), 257: (LONG, [h]), 258: (SHORT, [bits] * spp),
                259: (SHORT, [8]), 262: (SHORT, [2 if spp >= 3 else 1]),
                277: (SHORT, [spp]), 284: (SHORT, [1]),
                339: (SHORT, [page.get("sample_format", 1)] * spp),
                offsets_tag: (LONG, [0] * len(chunks)),
                counts_tag: (LONG, [len(c) for c in chunks]), **layout, **page.get("tags", {})}
        ifd_at = len(out)
        struct.pack_into("<I", out, link, ifd_at)
        data_at = ifd_at + 2 + 12 * len(tags) + 4
        data = bytearray()
        pixels_at = None
        entries = []
        for pass_ in (0, 1):  # first the values, then the pixel data after them
            for tag in sorted(tags):
                typ, values = tags[tag]
                if tag == offsets_tag and pass_ == 1:
                    pos = [pixels_at + sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
                    values = pos
                if typ == ASCII:
                    raw, count = values + b"\0", len(values) + 1
                elif typ == RATIONAL:
                    raw = b"".join(struct.pack("<II", n, d) for n, d in values)
                    count = len(values)
                else:
                    raw, count = b"".join(struct.pack("<" + _FORMATS[typ], v)
                                          for v in values), len(values)
                if pass_ == 0:
                    if len(raw) > 4:
                        data += raw + b"\0" * (len(raw) % 2)
                    continue
                if len(raw) <= 4:
                    entries.append(struct.pack("<HHI", tag, typ, count) + raw.ljust(4, b"\0"))
                else:
                    entries.append(struct.pack("<HHII", tag, typ, count, data_at + len(data)))
                    data += raw + b"\0" * (len(raw) % 2)
            if pass_ == 0:
                pixels_at = data_at + len(data)
                data = bytearray()
        out += struct.pack("<H", len(tags)) + b"".join(entries) + b"\0\0\0\0"
        link = len(out) - 4
        assert len(out) == data_at and data_at + len(data) == pixels_at
        out += data + b"".join(chunks)
    return bytes(out)


def _write(path, **page) -> str:
    path.write_bytes(_tiff([page]))
    return str(path)


def _png(path, w, h, depth, colour) -> str:
    """A PNG of depth-bit samples (colour type 2 RGB, 0 grey), by hand
    (Pillow writes no 16-bit RGB PNG)."""
    spp = 3 if colour == 2 else 1
    row = (w * spp * depth + 7) // 8
    raw = b"".join(b"\0" + bytes((x * 37 + y) % 256 for x in range(row)) for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", w, h, depth, colour, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) +
        chunk(b"IEND", b""))
    return str(path)


# -- bit depth --------------------------------------------------------------------------

def test_16bit_png_refused(tmp_path):
    """Pillow opens a 16-bit RGB PNG as mode RGB (the high byte of each
    sample): the file's bit depth is what refuses it."""
    rgb16 = _png(tmp_path / "rgb16.png", 20, 10, 16, 2)
    with Image.open(rgb16) as im:
        assert im.mode == "RGB"  # what Pillow hides
    with pytest.raises(ValueError, match=r"^streamcnn: .*rgb16.png.*PNG image of 16-bit "
                                         r"samples.*convert it to 8-bit RGB"):
        Slide(rgb16)
    with pytest.raises(ValueError, match=r"grey16.png.*16-bit"):
        Slide(_png(tmp_path / "grey16.png", 20, 10, 16, 0))
    with Slide(_png(tmp_path / "rgb8.png", 20, 10, 8, 2)) as s:   # 8-bit reads
        assert s.dimensions == (20, 10) and s.read(level=0).shape == (3, 10, 20)


@pytest.mark.parametrize("bits,fmt,says", [(16, 1, "16-bit"), (32, 3, "32-bit float"),
                                           (32, 1, "32-bit"), (8, 2, "8-bit signed")])
@pytest.mark.parametrize("tile", [None, 16], ids=["striped", "tiled"])
def test_wide_tiff_samples_refused(tmp_path, bits, fmt, says, tile):
    """A striped TIFF (Pillow: 16-bit RGB read as its high bytes, float RGB
    not at all) and a tiled one (OpenSlide: libtiff's RGBA reading keeps
    the high byte, fails on 32 bits) are refused from their tags alike,
    with the bit depth named."""
    if tile and not streamcnn.slide.available():
        pytest.skip("streamcnn built without OpenSlide (libopenslide-dev missing)")
    path = _write(tmp_path / f"s{bits}_{fmt}.tif", pixels=_samples(40, 48, 3, bits // 8),
                  bits=bits, sample_format=fmt, tile=tile)
    kind = "tiled TIFF" if tile else "TIFF"
    with pytest.raises(ValueError, match=rf"^streamcnn: .*s{bits}_{fmt}.tif.*a {kind} image of "
                                         rf"{says} samples.*16-bit and float images are "
                                         "refused.*convert it to 8-bit RGB"):
        Slide(path)


@pytest.mark.parametrize("tile", [None, 16], ids=["striped", "tiled"])
def test_8bit_tiff_reads_exactly(tmp_path, tile):
    if tile and not streamcnn.slide.available():
        pytest.skip("streamcnn built without OpenSlide (libopenslide-dev missing)")
    px = _samples(40, 48, 3, 1)
    with Slide(_write(tmp_path / "a.tif", pixels=px, tile=tile)) as s:
        assert s.in_memory == (tile is None) and s.mpp is None
        assert torch.equal(s.read(level=0), px.permute(2, 0, 1))


def test_bilevel_palette_and_4bit_still_read(tmp_path):
    g = torch.Generator().manual_seed(1)
    grey = torch.randint(0, 256, (20, 30), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(grey > 128).save(tmp_path / "bilevel.tif")
    Image.fromarray(grey).quantize(16).save(tmp_path / "p4.png", bits=4)
    Image.fromarray(grey).quantize(16).save(tmp_path / "p.tif")
    for name in ("bilevel.tif", "p4.png", "p.tif"):
        with Image.open(tmp_path / name) as im:
            ref = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
        with Slide(str(tmp_path / name)) as s:
            assert torch.equal(s.read(level=0), ref.permute(2, 0, 1)), name


# -- microns per pixel --------------------------------------------------------------------

def _cm(x, y=None):
    """Resolution tags: x (and y) pixels per centimetre."""
    return {282: (RATIONAL, [(x, 1)]), 283: (RATIONAL, [(y or x, 1)]), 296: (SHORT, [3])}


def _ome(x, y, unit=None) -> dict:
    u = "" if unit is None else f' PhysicalSizeXUnit="{unit}" PhysicalSizeYUnit="{unit}"'
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
           'Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder='
           f'"XYCZT" Type="uint8" SizeX="48" SizeY="40" SizeC="3" SizeZ="1" SizeT="1" '
           f'PhysicalSizeX="{x}" PhysicalSizeY="{y}"{u}/></Image></OME>')
    return {270: (ASCII, xml.encode("utf-8"))}


@pytest.mark.parametrize("tile", [None, 16], ids=["striped", "tiled"])
def test_mpp_from_tiff_tags(tmp_path, tile):
    """The same rule for a striped TIFF (Pillow) and a tiled one (OpenSlide
    3.4 reports no mpp for a generic TIFF): a resolution in centimetres,
    an OME-XML PhysicalSizeX / Y (µm by default, other units converted);
    an inch resolution says nothing."""
    if tile and not streamcnn.slide.available():
        pytest.skip("streamcnn built without OpenSlide (libopenslide-dev missing)")
    px = _samples(40, 48, 3, 1)
    cases = {"cm": (_cm(20000), (0.5, 0.5)),
             "inch": ({282: (RATIONAL, [(50800, 1)]), 283: (RATIONAL, [(50800, 1)]),
                       296: (SHORT, [2])}, None),
             "none": ({}, None),
             "ome": (_ome(0.25, 0.25), (0.25, 0.25)),
             "ome_um": (_ome(0.25, 0.25, "\u00b5m"), (0.25, 0.25)),
             "ome_nm": (_ome(250, 250, "nm"), (0.25, 0.25)),
             "ome_mm": (_ome(0.00025, 0.00025, "mm"), (0.25, 0.25)),
             "ome_unknown_unit": (_ome(1, 1, "parsec"), None),
             "ome_over_cm": ({**_cm(20000), **_ome(0.25, 0.25)}, (0.25, 0.25)),
             "not_ome": ({270: (ASCII, b"<OMEGA>no</OMEGA"), **_cm(10000)}, (1.0, 1.0))}
    for name, (tags, want) in cases.items():
        path = _write(tmp_path / f"{name}.tif", pixels=px, tile=tile, tags=tags)
        with Slide(path) as s:
            assert s.in_memory == (tile is None), name
            if want is None:
                assert s.file_mpp is None and s.mpp is None, name
                continue
            assert s.file_mpp == pytest.approx(want), name
            assert float(s.properties["streamcnn.mpp-x"]) == pytest.approx(want[0]), name
            # reads at an mpp use it
            assert s.read(mpp=want[0] * 2).shape == (3, 20, 24), name
        with Slide(path, mpp=0.7) as s:  # mpp= still replaces the file's
            assert s.mpp == (0.7, 0.7) and s.file_mpp == pytest.approx(want), name


@needs
def test_tiled_mpp_from_the_level0_page(tmp_path):
    """OpenSlide's generic-TIFF level 0 is its largest tiled page, wherever
    it is in the file (after the first, marked a reduced image,
    NewSubfileType 1); its tags give the mpp."""
    small, big = _samples(16, 24, 3, 1, seed=1), _samples(64, 96, 3, 1, seed=2)
    path = tmp_path / "pyr.tif"
    path.write_bytes(_tiff([
        {"pixels": small, "tile": 16, "tags": _cm(5000)},
        {"pixels": big, "tile": 16, "tags": {254: (LONG, [1]), **_cm(20000)}}]))
    with Slide(str(path)) as s:
        assert s.level_dimensions == [(96, 64), (24, 16)]
        assert s.mpp == pytest.approx((0.5, 0.5))


# -- pixels that are not square -------------------------------------------------------

@pytest.mark.parametrize("tile", [None, 16], ids=["striped", "tiled"])
def test_pixels_not_square_refused_at_an_mpp(tmp_path, tile):
    """0.5 um in x, 1 um in y: one downsample for both axes would squash the
    image, so reads at an mpp (Slide.read, SlideDataset) are refused naming
    the file and both sizes; reads by level, and an mpp given, work."""
    if tile and not streamcnn.slide.available():
        pytest.skip("streamcnn built without OpenSlide (libopenslide-dev missing)")
    px = _samples(40, 48, 3, 1)
    path = _write(tmp_path / "aniso.tif", pixels=px, tile=tile, tags=_cm(20000, 10000))
    says = r"^streamcnn: .*aniso.tif.*not square \(0.5 um in x, 1 um in y\)"
    with Slide(path) as s:
        assert s.mpp == pytest.approx((0.5, 1.0))
        assert torch.equal(s.read(level=0), px.permute(2, 0, 1))
        with pytest.raises(ValueError, match=says):
            s.read(mpp=1.0)
        with pytest.raises(ValueError, match=says):
            s.downsample_for_mpp(1.0)
    with Slide(path, mpp=0.5) as s:  # the caller's square pixel size
        assert s.read(mpp=1.0).shape == (3, 20, 24)
    with Slide(path, default_mpp=0.5) as s:  # the file's still wins
        with pytest.raises(ValueError, match=says):
            s.read(mpp=1.0)
    # within MPP_ASPECT_TOLERANCE: square enough (scanners round)
    near = _write(tmp_path / "near.tif", pixels=px, tile=tile, tags=_cm(20000, 19990))
    with Slide(near) as s:
        assert s.downsample_for_mpp(1.0) == pytest.approx(2.0)
    # the dataset refuses it too; a table's mpp replaces it
    ds = SlideDataset([(path, 0)], 16, mpp=1.0, crop="center")
    with pytest.raises(ValueError, match=says):
        ds[0]
    ds = SlideDataset([(path, 0, 0.5)], 16, mpp=1.0, crop="center")
    assert ds[0][0].shape == (3, 16, 16)
    assert SlideDataset([(path, 0)], 16, level=0, crop="center")[0][0].shape == (3, 16, 16)


def test_turned_striped_tiff_swaps_its_mpp(tmp_path):
    """Pillow turns a striped TIFF by its Orientation: a quarter turn makes
    the stored rows columns, and the pixel sizes follow them."""
    path = _write(tmp_path / "o6.tif", pixels=_samples(40, 48, 3, 1),
                  tags={274: (SHORT, [6]), **_cm(20000, 10000)})
    with Slide(path) as s:
        assert s.dimensions == (40, 48) and s.mpp == pytest.approx((1.0, 0.5))


# -- orientation ------------------------------------------------------------------------

@needs
def test_tiled_tiff_orientation_refused(tmp_path):
    """OpenSlide 3.4 reads a tiled TIFF's tiles as stored, whatever its
    Orientation: refused (a striped TIFF is turned by Pillow,
    test_plain_images.py); 1 and an absent tag read."""
    px = _samples(40, 48, 3, 1)
    for o in range(2, 9):
        path = _write(tmp_path / f"o{o}.tif", pixels=px, tile=16, tags={274: (SHORT, [o])})
        with pytest.raises(ValueError, match=rf"^streamcnn: .*o{o}.tif.*Orientation tag is "
                                             rf"{o}.*write the file upright.*vips"):
            Slide(path)
    with Slide(_write(tmp_path / "o1.tif", pixels=px, tile=16,
                      tags={274: (SHORT, [1])})) as s:
        assert not s.in_memory and torch.equal(s.read(level=0), px.permute(2, 0, 1))

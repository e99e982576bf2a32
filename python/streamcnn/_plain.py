"""Plain images (PNG, JPEG, striped TIFF, BMP, WebP, ...) as one-level
slides, read with Pillow: what ``streamcnn.Slide`` falls back to when a file
is not a slide OpenSlide can read. Such an image has no chunks to read
separately: it is decoded whole, once, on its first read, and held until
the slide is closed."""

import math
import re
import threading
from typing import Dict, Optional, Tuple

import torch

from ._library import first_line
from .slide import uint8_buffer

# The most pixels an image decoded whole may have (3 bytes each: 1 << 30 is
# 3 GiB). Larger images belong in a tiled pyramidal TIFF, read in chunks.
MAX_IMAGE_PIXELS = 1 << 30

# Pillow modes and how they become RGB: "rgb" converts, "alpha" composites
# over the background (white, as OpenSlide's default), anything else is refused.
_RGB_MODES = {"RGB": "rgb", "L": "rgb", "1": "rgb", "CMYK": "rgb", "YCbCr": "rgb",
              "LAB": "rgb", "HSV": "rgb", "RGBX": "rgb", "P": "alpha", "PA": "alpha",
              "RGBA": "alpha", "RGBa": "alpha", "LA": "alpha", "La": "alpha"}
# Pillow's own bound on pixels (a decompression-bomb check) and its
# LOAD_TRUNCATED_IMAGES are module globals: under this lock the bound is
# lifted while a header is read (MAX_IMAGE_PIXELS above bounds the size
# instead) and truncated images are refused while pixels are decoded (one
# decode at a time in a process; DataLoader workers are processes).
_PIL_LOCK = threading.Lock()
_RESUNIT_CM = 3  # TIFF ResolutionUnit
_BAND_PIXELS = 1 << 22  # pixels converted to RGB at a time


class NotAnImage(ValueError):
    """Pillow does not recognise the file (the reason in words)."""


class PlainImage:
    """The header of an image file Pillow reads (nothing decoded yet)."""

    def __init__(self, path: str):
        from PIL import Image, UnidentifiedImageError
        self.path = path
        # a TIFF's samples from its tags, before Pillow (which cannot open a
        # float RGB TIFF, and takes the high byte of a 16-bit one)
        first = tiff_page_tags(path)
        depth = sample_depth(first) if first is not None else None
        if depth is not None:
            raise bit_depth_error(path, "TIFF", depth)
        with _PIL_LOCK:
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(path)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise NotAnImage(first_line(e)) from None
            finally:
                Image.MAX_IMAGE_PIXELS = old
        self._im: Optional["Image.Image"] = im
        self.format: str = im.format or "image"
        try:  # walk a TIFF's chain of pages: a truncated pyramid is damaged, not an image
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
        except (OSError, ValueError, TypeError, SyntaxError, EOFError) as e:
            self.close()
            raise ValueError(f"streamcnn: {path!r}: a damaged or truncated {self.format} file "
                             f"(its pages: {first_line(e)})") from None
        self.mode: str = im.mode
        w, h = im.size
        self._src_size: Tuple[int, int] = (w, h)
        self.orientation: int = _exif_orientation(im)
        if self.orientation >= 5:  # a quarter turn or a transpose
            w, h = h, w
        if w < 1 or h < 1:
            self.close()
            raise ValueError(f"streamcnn: {path!r}: a {self.format} image of {w} x {h} "
                             "pixels is empty")
        depth = _pillow_sample_depth(im, path)
        if depth is not None:
            self.close()
            raise bit_depth_error(path, self.format, depth)
        if self.mode not in _RGB_MODES:
            self.close()
            raise ValueError(f"streamcnn: {path!r}: {self.format} image mode {self.mode!r} is "
                             "not 8-bit colour or grey: convert it to 8-bit RGB")
        if w * h > MAX_IMAGE_PIXELS:
            self.close()
            raise ValueError(
                f"streamcnn: {path!r}: {self.format} image of {w} x {h} pixels is larger than "
                f"streamcnn._plain.MAX_IMAGE_PIXELS ({MAX_IMAGE_PIXELS}) for an image decoded "
                "whole: write it as a tiled pyramidal TIFF, which is read in chunks (e.g. "
                "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)")
        self.size: Tuple[int, int] = (w, h)
        self.properties: Dict[str, str] = {"streamcnn.reader": "pillow",
                                           "streamcnn.format": self.format,
                                           "streamcnn.mode": self.mode}
        self.mpp: Optional[Tuple[float, float]] = None
        if self.format == "TIFF":
            tags = getattr(im, "tag_v2", None)
            self.mpp = tiff_mpp(tags) if tags is not None else None
            if self.mpp is not None and _tag_int(tags, 274, 1) in (5, 6, 7, 8):
                self.mpp = self.mpp[1], self.mpp[0]  # Pillow turns the rows into columns
        if self.orientation != 1:
            self.properties["streamcnn.exif-orientation"] = str(self.orientation)
        if self.mpp is not None:
            self.properties["streamcnn.mpp-x"] = f"{self.mpp[0]:g}"
            self.properties["streamcnn.mpp-y"] = f"{self.mpp[1]:g}"
        self._pixels: Optional[torch.Tensor] = None
        self._lock = threading.Lock()

    def pixels(self) -> torch.Tensor:
        """The whole image, uint8 ``h x w x 3`` (decoded on the first call)."""
        with self._lock:
            if self._pixels is None:
                if self._im is None:
                    raise ValueError("streamcnn: the slide is closed")
                self._pixels = self._decode()
                self._im.close()
                self._im = None
            return self._pixels

    def _decode(self) -> torch.Tensor:
        with _PIL_LOCK:  # a truncated file must fail, whatever the process set
            from PIL import ImageFile
            old = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                return self._decode_strict()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = old

    def _decode_strict(self) -> torch.Tensor:
        im = self._im
        w, h = self._src_size
        turn = _transposes().get(self.orientation)
        try:
            im.load()
            if im.size != (w, h):
                raise ValueError(f"decoded to {im.size[0]} x {im.size[1]} pixels")
            ow, oh = self.size
            out = uint8_buffer((oh, ow, 3), f"{self.path!r} ({ow} x {oh} pixels)")
            # converted in bands of rows: the converted copies stay small;
            # each band turned as its EXIF orientation says, into its place
            step = max(1, _BAND_PIXELS // w)
            for y0 in range(0, h, step):
                y1 = min(h, y0 + step)
                band = _to_rgb(im.crop((0, y0, w, y1)))
                if turn is not None:
                    band = band.transpose(turn)
                pixels = torch.frombuffer(bytearray(band.tobytes()),
                                          dtype=torch.uint8).view(band.size[1], band.size[0], 3)
                a, b = (h - y1, h - y0) if self.orientation in _FROM_THE_END else (y0, y1)
                if self.orientation >= 5:   # source rows are columns of the output
                    out[:, a:b] = pixels
                else:
                    out[a:b] = pixels
        except (OSError, ValueError, SyntaxError) as e:
            # a truncated or damaged file shows itself only when decoded
            raise ValueError(f"streamcnn: {self.path!r}: cannot decode the "
                             f"{self.format} image ({first_line(e)})") from None
        except MemoryError:
            raise MemoryError(f"streamcnn: out of memory decoding {self.path!r} "
                              f"({w} x {h} pixels, {3 * w * h >> 20} MiB)") from None
        return out

    def read(self, x: int, y: int, w: int, h: int, background: Tuple[int, int, int],
             channels_last: bool) -> torch.Tensor:
        """``w x h`` pixels whose top-left is ``(x, y)`` (may reach outside:
        the background there), uint8 ``3 x h x w`` or ``h x w x 3``."""
        img = self.pixels()
        out = uint8_buffer((h, w, 3), f"a {w} x {h} region of {self.path!r}")
        iw, ih = self.size
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x0 >= x1 or y0 >= y1:
            out[:] = torch.tensor(background, dtype=torch.uint8)
        else:
            if x0 > x or y0 > y or x1 < x + w or y1 < y + h:
                out[:] = torch.tensor(background, dtype=torch.uint8)
            out[y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1]
        return out if channels_last else out.permute(2, 0, 1).contiguous()

    def close(self) -> None:
        if self._im is not None:
            self._im.close()
            self._im = None
        self._pixels = None


# EXIF orientations (what turns the stored pixels upright, as
# PIL.ImageOps.exif_transpose does): 2 mirror, 3 half turn, 4 flip, 5
# transpose, 6 quarter turn clockwise, 7 transverse, 8 counter-clockwise;
# from 5 on the stored rows become columns. _FROM_THE_END: a band of stored
# rows y0..y1 lands at h - y1 .. h - y0 (rows, or columns from 5 on).
_TRANSPOSE_NAMES = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                    6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
_FROM_THE_END = (3, 4, 6, 7)


def _transposes() -> Dict[int, object]:
    from PIL import Image
    return {k: getattr(Image.Transpose, v) for k, v in _TRANSPOSE_NAMES.items()}


def _exif_orientation(im) -> int:
    """The EXIF Orientation (1 .. 8) of a JPEG, PNG, WebP, ... from its
    header; 1 where there is none, or it is invalid. A TIFF: 1, as Pillow
    applies a TIFF's Orientation tag itself (its size is the upright one)."""
    if im.format == "TIFF":
        return 1
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        from PIL import Image
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _to_rgb(im):
    """An RGB copy of a Pillow image of one of the modes in _RGB_MODES."""
    from PIL import Image
    if _RGB_MODES[im.mode] == "alpha":
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def bit_depth_error(path: str, fmt: str, depth: str) -> ValueError:
    """The refusal of an image whose samples are ``depth`` (e.g. "16-bit"),
    not 8-bit unsigned."""
    return ValueError(f"streamcnn: {path!r}: a {fmt} image of {depth} samples: 16-bit and "
                      "float images are refused (streamcnn reads 8-bit unsigned samples); "
                      "convert it to 8-bit RGB (how to scale its values is your choice: "
                      "12-bit data stored in 16 bits needs another scale than 16-bit data)")


_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_TIFF_PAGES = 1024  # the most pages walked to find a level


def _tiff_directories(path: str):
    """The pages' tags of a TIFF, in file order, as Pillow
    ``ImageFileDirectory_v2`` read without decoding any pixels (at most
    _TIFF_PAGES); nothing for a file that is not a TIFF, and the walk ends
    quietly at a directory that cannot be read (the readers say what is
    wrong)."""
    from PIL.TiffImagePlugin import ImageFileDirectory_v2
    try:
        with open(path, "rb") as f:
            ifh = f.read(16)
            if ifh[:4] not in _TIFF_MAGIC:
                return
            ifh = ifh if ifh[2:4] in (b"+\0", b"\0+") else ifh[:8]  # BigTIFF: 16 bytes
            offset, seen = ImageFileDirectory_v2(ifh).next, set()
            while offset and offset not in seen and len(seen) < _TIFF_PAGES:
                seen.add(offset)
                f.seek(offset)
                tags = ImageFileDirectory_v2(ifh)
                tags.load(f)
                yield tags
                offset = tags.next
    except Exception:  # noqa: BLE001 - a damaged directory: the readers say what is wrong
        return


def tiff_page_tags(path: str, size: Optional[Tuple[int, int]] = None):
    """The tags of a TIFF's first page, or (``size = (w, h)``) of its first
    tiled page of that size (OpenSlide's generic TIFF level 0: the largest
    tiled page); None for a file that is not a TIFF, whose directories
    cannot be read, or without such a page."""
    return next((tags for tags in _tiff_directories(path) if size is None or (
        322 in tags and (_tag_int(tags, 256, 0), _tag_int(tags, 257, 0)) == size)), None)


def _tag_values(tags, tag: int, default: int) -> Tuple[int, ...]:
    v = tags.get(tag, default)
    try:
        return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),)
    except (TypeError, ValueError):
        return (default,)


def _tag_int(tags, tag: int, default: int) -> int:
    return _tag_values(tags, tag, default)[0]


_SAMPLE_FORMATS = {1: "", 2: " signed", 3: " float", 4: " untyped", 5: " complex signed",
                   6: " complex float"}


def sample_depth(tags) -> Optional[str]:
    """What a TIFF page's samples are (e.g. "16-bit", "32-bit float") when
    they are not 8-bit (or fewer: bilevel, 4-bit palette) unsigned integers
    (BitsPerSample, SampleFormat); None for those."""
    bits = _tag_values(tags, 258, 1)
    fmt = _tag_values(tags, 339, 1)
    if max(bits) <= 8 and set(fmt) == {1}:
        return None
    kind = next((f for f in fmt if f != 1), 1)
    return f"{max(bits)}-bit" + _SAMPLE_FORMATS.get(kind, f" SampleFormat {kind}")


# Pillow modes of samples wider than 8 bits (refused), and raw modes of
# such samples ("RGB;16B"; not BMP's 16-bit pixels of 5-bit samples, "BGR;16")
_WIDE_RAWMODE = re.compile(r";(16|32)[BLNFS]")
_DEEP_MODES = {"I": "32-bit", "F": "32-bit float", "I;16": "16-bit", "I;16L": "16-bit",
               "I;16B": "16-bit", "I;16N": "16-bit"}


def _pillow_sample_depth(im, path: str) -> Optional[str]:
    """The samples of an image Pillow opened when wider than 8 bits, else
    None. Pillow shows a 16-bit RGB PNG (or PPM, SGI) as mode RGB and keeps
    the high byte of each sample: the file's bit depth says it (a PNG's
    IHDR, the raw mode of Pillow's decoder, a PPM's maximum value)."""
    if im.format == "PNG":
        try:
            with open(path, "rb") as f:
                head = f.read(25)
        except OSError:
            head = b""
        if len(head) == 25 and head[12:16] == b"IHDR" and head[24] > 8:
            return f"{head[24]}-bit"
    if im.mode in _DEEP_MODES:
        return _DEEP_MODES[im.mode]
    for tile in getattr(im, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        wide = _WIDE_RAWMODE.search(raw) if isinstance(raw, str) else None
        if wide is not None:
            return f"{wide.group(1)}-bit"
        if tile[0] == "ppm" and isinstance(args, tuple) and len(args) > 1 \
                and isinstance(args[1], int) and args[1] > 255:
            return "16-bit"
    return None


def tiff_mpp(tags) -> Optional[Tuple[float, float]]:
    """Microns per pixel from a TIFF page's tags: an OME-TIFF's OME-XML
    (ImageDescription: PhysicalSizeX / Y of the first Pixels, in
    PhysicalSizeXUnit / YUnit, default µm), else the resolution tags when
    their unit is the centimetre (as OpenSlide's generic TIFF reader; an
    inch resolution is most often a default 72 or 96 dpi that says nothing
    of the pixel); None when neither says."""
    m = _ome_mpp(tags.get(270))
    if m is not None:
        return m
    if _tag_int(tags, 296, 2) != _RESUNIT_CM:
        return None
    try:
        rx, ry = float(tags.get(282)), float(tags.get(283))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(rx) and math.isfinite(ry) and rx > 0 and ry > 0):
        return None
    return 1e4 / rx, 1e4 / ry


# OME length units in microns
_OME_UNITS = {"µm": 1.0, "\u03bcm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4,
              "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(description) -> Optional[Tuple[float, float]]:
    """PhysicalSizeX / Y (in microns) of the first Pixels of an OME-XML
    ImageDescription; None when it is not OME-XML or does not give both."""
    if isinstance(description, str):  # Pillow decodes an ASCII tag as Latin-1
        description = description.encode("latin-1", "replace")
    if not isinstance(description, bytes) or b"<OME" not in description:
        return None
    import xml.etree.ElementTree as ET
    try:  # the bytes as written: the XML declaration names their encoding (UTF-8)
        root = ET.fromstring(description.strip(b"\0 \t\r\n"))
    except (ET.ParseError, ValueError, LookupError):
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    out = []
    for axis in "XY":
        try:
            v = float(pixels.get(f"PhysicalSize{axis}", "nan"))
        except ValueError:
            return None
        scale = _OME_UNITS.get(pixels.get(f"PhysicalSize{axis}Unit", "µm").strip())
        if scale is None or not (math.isfinite(v) and v > 0):
            return None
        out.append(v * scale)
    return out[0], out[1]

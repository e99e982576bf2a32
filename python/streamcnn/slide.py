"""Whole-slide images: ``streamcnn.Slide`` on the C reader (OpenSlide)."""

import ctypes
import math
import numbers
import operator
import os
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch

from ._library import clib

_ERR = 768
# The largest region read in one call: 3 bytes per pixel must fit in memory;
# this bound only catches nonsense sizes before allocating.
MAX_REGION_PIXELS = 1 << 36
MAX_ORIGIN = 1 << 37  # as the C reader's bound
# the C reader's words for a file OpenSlide does not recognise (then the file
# is tried as a plain image; a recognised but damaged slide is not)
_NOT_A_SLIDE = "is not a slide OpenSlide can read"
# read_scaled reads a region to resample in bands of about this many level
# rows (16 rows of the reader's 512-pixel chunks: the chunk row two bands
# share is read twice, ~6 %)
BAND_ROWS = 8192
# x and y microns per pixel further apart than this (relative) are pixels
# that are not square: reading such a slide at an mpp is refused
MPP_ASPECT_TOLERANCE = 0.01


def uint8_buffer(shape: Sequence[int], what: str) -> torch.Tensor:
    """``torch.empty(shape, dtype=torch.uint8)`` for the pixels of ``what``
    (a region, an image), or a MemoryError that says what they were and how
    large (torch's allocator names neither)."""
    try:
        return torch.empty(tuple(shape), dtype=torch.uint8)
    except RuntimeError as e:       # torch.OutOfMemoryError is one
        if "alloc" not in str(e):
            raise
        raise MemoryError(f"streamcnn: out of memory for {what} "
                          f"({math.prod(shape) / 2 ** 30:.1f} GiB)") from None


def _err() -> ctypes.Array:
    return ctypes.create_string_buffer(_ERR)


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def available() -> bool:
    """True when the library was built with OpenSlide (slides can be read)."""
    return bool(clib().sc_slide_available())


class Slide:
    """A whole-slide image opened with OpenSlide (Aperio .svs, Hamamatsu,
    MIRAX, ..., generic tiled pyramidal TIFF), or a plain image (PNG, JPEG,
    striped TIFF, BMP, WebP, ...: anything else Pillow reads) as a slide of
    one level.

    Coordinates ``(x, y)`` are level-0 pixels (OpenSlide's convention);
    sizes are ``(width, height)`` at the level read. Regions come back as
    ``torch.uint8`` RGB, ``3 x h x w`` (or ``h x w x 3``), with OpenSlide's
    premultiplied ARGB composited over the slide's background colour:
    transparent and out-of-bounds pixels are the background.

    ``mpp``: the microns per level-0 pixel, a number or ``(x, y)``; it
    replaces what the file says (``openslide.mpp-x``), for slides that
    carry a wrong one. ``default_mpp``: the same, only for a file that
    says nothing.

    A plain image is decoded whole on its first read and held until
    ``close()`` (3 bytes a pixel; at most ``streamcnn._plain.MAX_IMAGE_PIXELS``
    pixels, 2^30: larger images belong in a tiled pyramidal TIFF). Grey,
    palette, CMYK and alpha images become RGB (alpha composited over white);
    16-bit and float images are refused. A photo's EXIF orientation and a
    striped TIFF's Orientation turn it upright. A TIFF's resolution gives its
    ``mpp`` when the unit is the centimetre, as does an OME-TIFF's OME-XML;
    other plain images carry none (``properties``: ``streamcnn.reader`` =
    ``pillow``, ``streamcnn.format``). A generic tiled TIFF read through
    OpenSlide follows the same rules (its samples, its mpp), and one whose
    Orientation tag is not 1 is refused (OpenSlide would read it as stored).
    A slide whose pixels are not square is read by level only
    (``downsample_for_mpp``).

    The handle is safe to read from several threads; use one ``Slide`` per
    process (it does not pickle). ``close()`` (or a ``with`` block) frees it.
    """

    def __init__(self, path: str, mpp: Union[None, float, Sequence[float]] = None, *,
                 default_mpp: Union[None, float, Sequence[float]] = None):
        self.path = os.fspath(path)
        self._lib = clib()
        self._h = None
        self._plain = None
        self._unsafe: Set[int] = set()      # levels OpenSlide reads wrong
        self._tiff_mpp: Optional[Tuple[float, float]] = None
        self._mpp_override = _check_mpp(mpp)
        self._mpp_default = _check_mpp(default_mpp)
        err = _err()
        if self._lib.sc_slide_available():
            self._h = self._lib.sc_slide_open(self.path.encode(), err, _ERR)
        if not self._h:
            msg = err.value.decode(errors="replace")
            if not os.path.exists(self.path):
                raise FileNotFoundError(msg or f"streamcnn: {self.path!r} does not exist")
            if self._lib.sc_slide_available() and _NOT_A_SLIDE not in msg:
                raise ValueError(msg)  # a slide OpenSlide knows, damaged: no fallback
            self._open_plain()
            return
        lib = self._lib
        n = lib.sc_slide_level_count(self._h)
        dims, ds = [], []
        for level in range(n):
            w, h, d = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_double()
            lib.sc_slide_level(self._h, level, ctypes.byref(w), ctypes.byref(h), ctypes.byref(d))
            dims.append((w.value, h.value))
            ds.append(d.value)
        self.level_count: int = n
        self.level_dimensions: List[Tuple[int, int]] = dims
        self.level_downsamples: List[float] = ds
        rgb = (ctypes.c_uint8 * 3)()
        lib.sc_slide_background(self._h, rgb)
        self.background: Tuple[int, int, int] = tuple(rgb)
        self.properties: Dict[str, str] = {}
        names = lib.sc_slide_property_names(self._h)
        i = 0
        while names and names[i]:
            key = names[i].decode(errors="replace")
            val = lib.sc_slide_property(self._h, names[i])
            self.properties[key] = val.decode(errors="replace") if val else ""
            i += 1
        # levels OpenSlide reads wrong (a TIFF level smaller than its
        # tiles, not JPEG: sheared rows, no error; io/slide.c says more),
        # which the C reader refuses: they are resampled from a finer level
        self._unsafe = {level for level in range(n) if lib.sc_slide_level_sheared(self._h, level)}
        if 0 in self._unsafe:
            # the whole image is smaller than one of its tiles: Pillow
            # decodes the page (it is small); what OpenSlide read of the
            # file (an Aperio description's MPP, the vendor, the background
            # colour) stays
            props, bg = self.properties, self.background
            self.close()
            self._open_plain()
            self.properties = {**props, **self.properties}
            self.background = bg
            return
        if self.properties.get("openslide.vendor") == "generic-tiff":
            from ._plain import tiff_page_tags
            self._check_generic_tiff(tiff_page_tags(self.path, self.level_dimensions[0]))

    def _check_generic_tiff(self, tags) -> None:
        """What OpenSlide 3.4's generic TIFF reader leaves out, from ``tags``
        of the level-0 page (the largest tiled one; None: none found, nothing
        to check): samples other than 8-bit
        unsigned are refused (libtiff's RGBA reading keeps the high byte of
        16-bit samples and fails on 32-bit ones), and so is an Orientation
        other than 1 (OpenSlide reads the tiles as stored: the image would
        be turned or mirrored, heatmap coordinates with it); the microns per
        pixel come from an OME-TIFF's OME-XML or a resolution in centimetres
        when OpenSlide gives none (it does from OpenSlide 4 on), as for a
        striped TIFF (``streamcnn._plain.tiff_mpp``)."""
        from ._plain import _tag_int, bit_depth_error, sample_depth, tiff_mpp
        if tags is None:
            return
        depth = sample_depth(tags)
        if depth is not None:
            self.close()
            raise bit_depth_error(self.path, "tiled TIFF", depth)
        orientation = _tag_int(tags, 274, 1)
        if 2 <= orientation <= 8:
            self.close()
            raise ValueError(
                f"streamcnn: {self.path!r}: its TIFF Orientation tag is {orientation} (not "
                "1, upright), which OpenSlide does not apply to a tiled TIFF: it would be read "
                "turned or mirrored as stored, and heatmap coordinates with it; write the file "
                "upright, e.g. `vips autorot IN.tif OUT.tif[tile,pyramid,compression=jpeg]` "
                "(or `vips rot`)")
        if "openslide.mpp-x" not in self.properties:
            self._tiff_mpp = tiff_mpp(tags)
            if self._tiff_mpp is not None:
                self.properties["streamcnn.mpp-x"] = f"{self._tiff_mpp[0]:g}"
                self.properties["streamcnn.mpp-y"] = f"{self._tiff_mpp[1]:g}"

    def _open_plain(self) -> None:
        from ._plain import NotAnImage, PlainImage
        if os.path.isdir(self.path):
            raise ValueError(f"streamcnn: {self.path!r} is a directory, not a slide")
        try:
            self._plain = PlainImage(self.path)
        except NotAnImage as e:
            if self._lib.sc_slide_available():
                raise ValueError(
                    f"streamcnn: {self.path!r} is neither a slide OpenSlide can read (Aperio "
                    ".svs, Hamamatsu, MIRAX, ..., tiled pyramidal TIFF) nor an image Pillow "
                    f"can read (PNG, JPEG, TIFF, ...), or it is damaged or truncated "
                    f"(Pillow: {e})") from None
            raise ValueError(
                f"streamcnn: {self.path!r} is not an image Pillow can read (Pillow: {e}), "
                "and streamcnn was built without OpenSlide (STREAMCNN_OPENSLIDE=OFF), so it "
                "reads no whole-slide formats: install libopenslide-dev and libtiff-dev and "
                "rebuild") from None
        self.level_count = 1
        self.level_dimensions = [self._plain.size]
        self.level_downsamples = [1.0]
        self.background = (255, 255, 255)
        self.properties = dict(self._plain.properties)

    # -- metadata ----------------------------------------------------------------
    @property
    def dimensions(self) -> Tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def vendor(self) -> Optional[str]:
        return self.properties.get("openslide.vendor")

    @property
    def in_memory(self) -> bool:
        """True for a plain image (decoded whole, held while open)."""
        return self._plain is not None

    @property
    def mpp(self) -> Optional[Tuple[float, float]]:
        """Microns per level-0 pixel (x, y): the ``mpp`` given when opened,
        else the file's, else ``default_mpp``; None when none says."""
        if self._mpp_override is not None:
            return self._mpp_override
        return self.file_mpp or self._mpp_default

    @property
    def file_mpp(self) -> Optional[Tuple[float, float]]:
        """Microns per level-0 pixel (x, y) as the file says, or None."""
        if self._plain is not None and self._plain.mpp is not None:
            return self._plain.mpp
        try:
            m = (float(self.properties["openslide.mpp-x"]),
                 float(self.properties["openslide.mpp-y"]))
        except (KeyError, ValueError):
            return self._tiff_mpp  # a generic TIFF's OME-XML or resolution
        return m if all(math.isfinite(v) and v > 0 for v in m) else None

    # -- life ------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_h", None):
            self._lib.sc_slide_close(self._h)
            self._h = None
        if getattr(self, "_plain", None) is not None:
            self._plain.close()
            self._plain = None

    @property
    def closed(self) -> bool:
        return getattr(self, "_h", None) is None and getattr(self, "_plain", None) is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def __reduce__(self):
        raise TypeError("streamcnn.Slide does not pickle; open the slide in each process")

    def __repr__(self):
        if self.closed:
            return f"Slide({getattr(self, 'path', None)!r}, closed)"
        return (f"Slide({self.path!r}, levels={self.level_dimensions}, mpp={self.mpp}, "
                f"vendor={self.vendor!r})")

    # -- reading ---------------------------------------------------------------------
    def _check_level(self, level: int) -> int:
        if not isinstance(level, numbers.Integral) or isinstance(level, bool):
            raise TypeError(f"streamcnn: level must be an int, got {level!r}")
        level = int(level)
        if not 0 <= level < self.level_count:
            raise ValueError(f"streamcnn: level {level} is out of range for {self.path!r} "
                             f"(levels 0 .. {self.level_count - 1})")
        return level

    def read_region(self, location: Sequence[int], level: int, size: Sequence[int], *,
                    box: Optional[Sequence[int]] = None, channels_last: bool = False,
                    threads: Optional[int] = None) -> torch.Tensor:
        """Read ``size = (w, h)`` pixels of ``level`` whose top-left is
        ``location = (x, y)`` in level-0 coordinates, as uint8 ``3 x h x w``
        (``h x w x 3`` with channels_last). Read in chunks by ``threads``
        threads (default: up to 8).

        ``box = (bx, by, bw, bh)`` (level pixels, relative to the region's
        top-left, inside it): only that part of the region, pixel for pixel
        as the whole region's read gives it (also at levels whose downsample
        is not an integer, where a read of the part as a region of its own
        may differ by a sub-pixel shift); only the chunks meeting it are
        read."""
        if self.closed:
            raise ValueError("streamcnn: the slide is closed")
        level = self._check_level(level)
        x, y = whole_numbers(location, 2, "location (x, y)")
        w, h = whole_numbers(size, 2, "size (w, h)")
        if w < 1 or h < 1:
            raise ValueError(f"streamcnn: region size {w} x {h} must be positive")
        if max(abs(x), abs(y)) > MAX_ORIGIN:
            raise ValueError(f"streamcnn: region origin ({x}, {y}) is out of range "
                             f"(|x|, |y| <= {MAX_ORIGIN})")
        bx, by, bw, bh = _check_box(box, w, h, "region")
        if bw * bh > MAX_REGION_PIXELS:
            raise ValueError(f"streamcnn: region size {bw} x {bh} is too large "
                             f"(> {MAX_REGION_PIXELS} pixels)")
        threads = _check_threads(threads)
        if self._plain is not None:  # one level, no chunks: the box is the region
            return self._plain.read(x + bx, y + by, bw, bh, self.background, channels_last)
        if level in self._unsafe:
            # the level as the finer level read right gives it, resampled
            # (OpenSlide would return sheared rows)
            img = self.read_scaled((x, y), self.level_downsamples[level], (w, h),
                                   box=(bx, by, bw, bh), tolerance=0.0, threads=threads)
            return img.permute(1, 2, 0).contiguous() if channels_last else img
        shape = (bh, bw, 3) if channels_last else (3, bh, bw)
        out = uint8_buffer(shape, f"a {bw} x {bh} region of {self.path!r}")
        err = _err()
        rc = self._lib.sc_slide_read_box(self._h, level, x, y, w, h, bx, by, bw, bh,
                                         out.data_ptr(), int(channels_last), threads, err,
                                         _ERR)
        if rc != 0:
            msg = err.value.decode(errors="replace")
            if not os.path.exists(self.path):   # reopening cannot help then
                msg += f" ({self.path!r} no longer exists: it was removed while open)"
            raise RuntimeError(msg)
        return out

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.05) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (up to
        ``tolerance``, relative), of those read right (a level OpenSlide
        reads wrong is passed over: see ``_levels_read_wrong``)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance) and level not in self._unsafe:
                best = level
        return best

    def read(self, level: Optional[int] = None, mpp: Optional[float] = None,
             box: Optional[Sequence[int]] = None, *, tolerance: float = 0.05,
             threads: Optional[int] = None) -> torch.Tensor:
        """The region ``box = (x, y, w, h)`` (level-0 pixels; default: the
        whole slide) as uint8 ``3 x H x W``, either at ``level`` or at ``mpp``
        microns per pixel. For ``mpp`` the coarsest level at least that fine
        (within ``tolerance``) is read and, unless its resolution matches
        within ``tolerance``, resampled (antialiased bilinear) to exactly
        ``round(w / d) x round(h / d)`` with ``d = mpp / slide mpp``."""
        if (level is None) == (mpp is None):
            raise ValueError("streamcnn: give exactly one of level= or mpp=")
        x, y, w, h = whole_numbers(box, 4, "box (x, y, w, h)") if box is not None else \
            (0, 0, *self.dimensions)
        if w < 1 or h < 1:
            raise ValueError(f"streamcnn: box size {w} x {h} must be positive")
        if level is not None:
            self._check_level(level)
            # per axis: a level's downsample is the mean of its axes' (1001 x
            # 777 -> 501 x 389: 1.998, 1.9974), and w / mean overshot the
            # level by a column of background
            (lw, lh), (w0, h0) = self.level_dimensions[level], self.dimensions
            sx, sy = w0 / lw, h0 / lh
            return self.read_region((x, y), level, (max(1, math.ceil(w / sx - 1e-9)),
                                                    max(1, math.ceil(h / sy - 1e-9))),
                                    threads=threads)
        if self.mpp is None:
            raise ValueError(f"streamcnn: {self.path!r} has no microns-per-pixel metadata "
                             "(openslide.mpp-x); read it by level= instead")
        target = self.downsample_for_mpp(mpp)
        if target < 1 - tolerance:
            # (the training application refuses such reads; here the caller
            # may mean it, but should know that no pixel detail is added)
            warnings.warn(f"streamcnn: reading {self.path!r} at {mpp:g} um/px, finer than "
                          f"its {self.mpp[0]:g} um/px: the pixels are upsampled "
                          f"{1 / target:.3g}x", stacklevel=2)
        out_w, out_h = max(1, round(w / target)), max(1, round(h / target))
        return self.read_scaled((x, y), target, (out_w, out_h), tolerance=tolerance,
                                threads=threads)

    def downsample_for_mpp(self, mpp: float) -> float:
        """The downsample (w.r.t. level 0) of a read at ``mpp`` microns per
        pixel, ``mpp / self.mpp``. Refused (ValueError naming the file) for
        a slide without microns per pixel, and for one whose pixels are not
        square (x and y more than ``MPP_ASPECT_TOLERANCE`` apart): every
        read at an mpp (``read``, ``SlideDataset``) scales both axes by one
        downsample, which would squash such an image."""
        if not isinstance(mpp, numbers.Real) or isinstance(mpp, bool) or not mpp > 0 \
                or not math.isfinite(mpp):
            raise ValueError(f"streamcnn: mpp must be positive, got {mpp!r}")
        m = self.mpp
        if m is None:
            raise ValueError(f"streamcnn: {self.path!r} has no microns-per-pixel metadata "
                             "(openslide.mpp-x), so it cannot be read at an mpp")
        if abs(m[0] - m[1]) > MPP_ASPECT_TOLERANCE * min(m):
            raise ValueError(
                f"streamcnn: {self.path!r}: its pixels are not square ({m[0]:g} um in x, "
                f"{m[1]:g} um in y), so a read at {mpp:g} um/px would squash one axis; "
                "resample the file to square pixels, or give its pixel size (Slide(mpp=), a "
                "table's mpp column) where the file's is wrong")
        return mpp / m[0]

    def read_scaled(self, location: Sequence[int], downsample: float, size: Sequence[int], *,
                    box: Optional[Sequence[int]] = None, tolerance: float = 0.05,
                    threads: Optional[int] = None) -> torch.Tensor:
        """Exactly ``size = (w, h)`` pixels at ``downsample`` (w.r.t. level 0)
        whose top-left is ``location`` in level-0 pixels, uint8 ``3 x h x w``.
        Reads the coarsest level at least that fine (within ``tolerance``,
        relative); a level within ``tolerance`` of ``downsample`` is read
        as is, otherwise the region is resampled (antialiased bilinear,
        :func:`resize_uint8`).

        ``box = (bx, by, bw, bh)`` (output pixels, inside ``size``): only
        that part, bit for bit as the same part of the whole result; only
        the level pixels it needs are read and resampled (for a band of
        rows: memory and time in proportion to the band). A resampled read
        of more than ``2 * BAND_ROWS`` level rows goes in bands of
        ``BAND_ROWS``, so the level region is never held whole."""
        if not downsample > 0:
            raise ValueError(f"streamcnn: downsample must be positive, got {downsample!r}")
        out_w, out_h = whole_numbers(size, 2, "size (w, h)")
        if out_w < 1 or out_h < 1:
            raise ValueError(f"streamcnn: size {out_w} x {out_h} must be positive")
        bx, by, bw, bh = _check_box(box, out_w, out_h, "image")
        lvl = self.best_level_for_downsample(downsample, tolerance)
        ds = self.level_downsamples[lvl]
        if abs(ds - downsample) <= tolerance * downsample:
            return self.read_region(location, lvl, (out_w, out_h), box=(bx, by, bw, bh),
                                    threads=threads)
        rw = max(1, math.ceil(out_w * downsample / ds))
        rh = max(1, math.ceil(out_h * downsample / ds))
        what = f"a {bw} x {bh} image of {self.path!r}"
        # only the level pixels on the slide are read; those past its edge
        # (the region's pixel k is the level's x / ds + k: with a margin of
        # 2 for OpenSlide's sub-pixel placement) are the background colour,
        # as OpenSlide gives them, which the resampling fills in: a read
        # mostly past the edge (a small slide read big) reads the slide
        x0, y0 = whole_numbers(location, 2, "location (x, y)")
        (w0, h0) = self.dimensions
        c0, c1 = _on_slide(resample_span(rw, out_w, bx, bx + bw), x0, w0, ds)
        r0, r1 = _on_slide(resample_span(rh, out_h, by, by + bh), y0, h0, ds)
        if c0 >= c1 or r0 >= r1:       # background alone
            out = uint8_buffer((3, bh, bw), what)
            out.copy_(torch.tensor(self.background, dtype=torch.uint8).view(3, 1, 1))
            return out
        if r1 - r0 > 2 * BAND_ROWS and bh > 1:
            # in bands of ~BAND_ROWS level rows: the level region is never
            # held whole (each band is bit for bit those rows of the whole;
            # one output row is read whole: it cannot be split, and a band
            # of it was that row again, forever)
            out = uint8_buffer((3, bh, bw), what)
            step = max(1, BAND_ROWS * out_h // rh)
            for a in range(by, by + bh, step):
                b = min(by + bh, a + step)
                out[:, a - by:b - by] = self.read_scaled(
                    location, downsample, size, box=(bx, a, bw, b - a), tolerance=tolerance,
                    threads=threads)
            return out
        region = self.read_region(location, lvl, (rw, rh), box=(c0, r0, c1 - c0, r1 - r0),
                                  threads=threads)
        return resize_uint8(region, (out_h, out_w), source_size=(rh, rw),
                            source_offset=(r0, c0), box=(by, bx, bh, bw), threads=threads,
                            what=what, fill=self.background)

    def thumbnail(self, max_size: int = 1024) -> torch.Tensor:
        """The whole slide, longest side ``max_size`` pixels, uint8 3 x h x w
        (a slide smaller than that is enlarged, unlike OpenSlide's
        get_thumbnail: ``min(max_size, max(self.dimensions))`` keeps it)."""
        if max_size < 1:
            raise ValueError(f"streamcnn: max_size must be positive, got {max_size}")
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_size
        lvl = self.best_level_for_downsample(max(scale, 1.0))
        img = self.read(level=lvl)
        out = (max(1, round(h0 / scale)), max(1, round(w0 / scale)))
        if tuple(img.shape[1:]) == out:
            return img
        return resize_uint8(img, out, what=f"a {out[1]} x {out[0]} thumbnail of {self.path!r}")

    # -- tissue ----------------------------------------------------------------------
    def tissue_mask(self, max_size: int = 2048) -> Tuple[torch.Tensor, float]:
        """Boolean tissue mask of a thumbnail (longest side <= max_size) and
        the thumbnail's downsample w.r.t. level 0. Tissue is told from the
        (white) background by Otsu's threshold on saturation, or on the grey
        level (darker is tissue) where no pixel is saturated. A slide
        smaller than max_size is not upsampled: its mask is at level 0."""
        if max_size < 1:
            raise ValueError(f"streamcnn: max_size must be positive, got {max_size}")
        thumb = self.thumbnail(min(max_size, max(self.dimensions)))
        return tissue_mask(thumb), max(self.dimensions) / max(thumb.shape[1:])

    def tissue_box(self, max_size: int = 2048, margin: float = 0.0
                   ) -> Optional[Tuple[int, int, int, int]]:
        """Level-0 bounding box (x, y, w, h) of the tissue, grown by ``margin``
        (a fraction of its size, at least 0), clipped to the slide; None
        without tissue."""
        if not isinstance(margin, numbers.Real) or not margin >= 0 or \
                not math.isfinite(margin):
            raise ValueError(f"streamcnn: margin must be a fraction of at least 0, got "
                             f"{margin!r}")
        mask, ds = self.tissue_mask(max_size)
        return box_of_mask(mask, ds, self.dimensions, margin)


def box_of_mask(mask: torch.Tensor, ds: float, dimensions: Tuple[int, int],
                margin: float = 0.0) -> Optional[Tuple[int, int, int, int]]:
    """Level-0 bounding box (x, y, w, h) of a thumbnail mask whose pixels
    are ``ds`` level-0 pixels, grown by ``margin`` and clipped to
    ``dimensions``; None for an empty mask."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    w0, h0 = dimensions
    x0, x1 = cols[0].item() * ds, (cols[-1].item() + 1) * ds
    y0, y1 = rows[0].item() * ds, (rows[-1].item() + 1) * ds
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    x0, y0 = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
    x1, y1 = min(w0, math.ceil(x1 + mx)), min(h0, math.ceil(y1 + my))
    return x0, y0, x1 - x0, y1 - y0


def _check_mpp(mpp) -> Optional[Tuple[float, float]]:
    """``mpp`` (a number or ``(x, y)``) as a pair of positive finite floats."""
    if mpp is None:
        return None
    try:
        pair = (mpp, mpp) if isinstance(mpp, numbers.Real) else tuple(mpp)
        x, y = (float(v) for v in pair)
        if isinstance(mpp, bool) or any(isinstance(v, bool) for v in pair):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"streamcnn: mpp must be a number or (x, y), got {mpp!r}") from None
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        raise ValueError(f"streamcnn: mpp must be positive and finite, got {mpp!r}")
    return x, y


def _check_box(box, w: int, h: int, what: str) -> Tuple[int, int, int, int]:
    """``(x, y, w, h)`` of a part of a w x h region (default: all of it)."""
    if box is None:
        return 0, 0, w, h
    bx, by, bw, bh = whole_numbers(box, 4, "box (x, y, w, h)")
    if bw < 1 or bh < 1 or bx < 0 or by < 0 or bx + bw > w or by + bh > h:
        raise ValueError(f"streamcnn: box (x, y, w, h) = {(bx, by, bw, bh)} is not a "
                         f"non-empty part of the {w} x {h} {what}")
    return bx, by, bw, bh


def whole_numbers(values, n: int, what: str) -> Tuple[int, ...]:
    """``n`` pixel coordinates or sizes as ints: ints (numpy's and 0-d
    integer tensors too) and floats that are whole; a fraction of a pixel
    is a ValueError (it was cut off without a word), anything else a
    TypeError, naming ``what``."""
    try:
        vals = tuple(values)
    except TypeError:
        raise TypeError(f"streamcnn: {what} must be {n} ints, got {values!r}") from None
    if len(vals) != n:
        raise ValueError(f"streamcnn: {what} must be {n} ints, got {values!r}")
    out = []
    for v in vals:
        if isinstance(v, bool):
            raise TypeError(f"streamcnn: {what} must be {n} ints, got {values!r}")
        try:
            out.append(operator.index(v))
            continue
        except TypeError:
            pass
        if not isinstance(v, (numbers.Real, torch.Tensor)) or \
                (isinstance(v, torch.Tensor) and v.numel() != 1):
            raise TypeError(f"streamcnn: {what} must be {n} ints, got {values!r}")
        f = float(v)
        if not (math.isfinite(f) and f.is_integer()):
            raise ValueError(f"streamcnn: {what} must be whole numbers of pixels, got "
                             f"{values!r}")
        out.append(int(f))
    return tuple(out)


def _check_threads(threads) -> int:
    if threads is None:
        return _default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
        raise ValueError(f"streamcnn: threads must be an int in 1 .. 64, got {threads!r}")
    return threads


def resample_span(in_size: int, out_size: int, lo: int, hi: int) -> Tuple[int, int]:
    """The source indices ``[a, b)`` that output indices ``[lo, hi)`` read
    along one axis of an ``in_size -> out_size`` :func:`resize_uint8`."""
    span = (ctypes.c_int64 * 2)()
    err = _err()
    if clib().sc_resample_span(int(in_size), int(out_size), int(lo), int(hi), span, err,
                               _ERR):
        raise ValueError(err.value.decode(errors="replace"))
    return int(span[0]), int(span[1])


def _on_slide(span: Tuple[int, int], origin: int, extent: int, ds: float) -> Tuple[int, int]:
    """The part of a region's level-pixel ``span`` (along one axis) that
    may meet the slide: the region starts at level-0 ``origin``, the slide
    is ``extent`` level-0 pixels, the level's downsample is ``ds``; two
    pixels to spare on either side. Empty (lo >= hi) when none does."""
    lo = max(span[0], math.floor(-origin / ds) - 2)
    hi = min(span[1], math.ceil((extent - origin) / ds) + 2)
    return lo, hi


def resize_uint8(img: torch.Tensor, size: Tuple[int, int], *,
                 source_size: Optional[Tuple[int, int]] = None,
                 source_offset: Tuple[int, int] = (0, 0),
                 box: Optional[Tuple[int, int, int, int]] = None,
                 threads: Optional[int] = None,
                 what: str = "a resized image",
                 fill: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 ``C x h x w`` image to
    ``size = (H, W)`` (a triangle filter stretched by the downscale factor,
    as torch's ``interpolate(..., antialias=True)``, in fixed point, in the
    C library: within 1 of an exact float evaluation of the filter; rows
    first, then columns; no float copy of the image).

    Any part of the result is computed bit for bit as the same part of the
    whole: ``box = (y, x, h, w)`` of the result (default: all of it), from
    ``img`` holding only the part of the ``source_size = (h0, w0)`` source
    at ``source_offset = (y, x)`` (it must cover :func:`resample_span` of
    the box's rows and columns), unless ``fill`` (one uint8 value per
    channel) says what the source holds where ``img`` does not: then the
    result is bit for bit that of a source holding ``fill`` there.
    ``what``: the result, as an out-of-memory MemoryError names it
    (:func:`uint8_buffer`)."""
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3:
        raise ValueError("streamcnn: resize_uint8 expects a uint8 C x H x W tensor, got "
                         f"{getattr(img, 'dtype', type(img))} "
                         f"{tuple(getattr(img, 'shape', ()))}")
    if img.device.type != "cpu":
        raise ValueError("streamcnn: resize_uint8 works on CPU tensors")
    out_h, out_w = (int(v) for v in size)
    in_h, in_w = (int(v) for v in (source_size or img.shape[1:]))
    sy, sx = (int(v) for v in source_offset)
    y, x, h, w = (0, 0, out_h, out_w) if box is None else (int(v) for v in box)
    src = img.contiguous()
    out = uint8_buffer((img.shape[0], max(h, 0), max(w, 0)), what)
    fill_values = None
    if fill is not None:
        fill = list(fill)
        if len(fill) != img.shape[0] or not all(
                isinstance(v, numbers.Integral) and 0 <= v <= 255 for v in fill):
            raise ValueError(f"streamcnn: resize_uint8 fill must be {img.shape[0]} values in "
                             f"[0, 255] (one per channel), got {fill!r}")
        fill_values = (ctypes.c_uint8 * len(fill))(*fill)
    from ._library import ResampleArgs
    a = ResampleArgs(src=src.data_ptr(), planes=img.shape[0], src_y=sy, src_x=sx,
                     src_h=img.shape[1], src_w=img.shape[2], in_h=in_h, in_w=in_w,
                     out_h=out_h, out_w=out_w, box_y=y, box_x=x, box_h=h, box_w=w,
                     dst=out.data_ptr(), threads=_check_threads(threads),
                     fill=ctypes.cast(fill_values, ctypes.c_void_p) if fill else None)
    err = _err()
    if clib().sc_resample_u8(ctypes.byref(a), err, _ERR):
        raise ValueError(err.value.decode(errors="replace"))
    return out


def otsu_threshold(values: torch.Tensor) -> int:
    """Otsu's threshold (0 .. 255) of uint8 values: the cut maximising the
    between-class variance of the histogram."""
    hist = torch.bincount(values.flatten().long(), minlength=256).double()
    total = hist.sum()
    if total == 0:
        return 0
    levels = torch.arange(256, dtype=torch.float64)
    w0 = torch.cumsum(hist, 0)
    m0 = torch.cumsum(hist * levels, 0)
    mean = m0[-1] / total
    w1 = total - w0
    valid = (w0 > 0) & (w1 > 0)
    between = torch.zeros(256, dtype=torch.float64)
    between[valid] = (mean * w0[valid] - m0[valid]) ** 2 / (w0[valid] * w1[valid])
    return int(torch.argmax(between).item())


def _valley(values: torch.Tensor, t: int) -> Optional[int]:
    """Where uint8 ``values``, cut at ``t``, are two separate levels (class
    means ``TISSUE_CONTRAST`` apart, and between them a valley of the
    histogram's 5-level running mean at most ``TISSUE_VALLEY`` of the lower
    of the two peaks; a background shaded over many levels has none): the
    middle of that valley's floor. Else None."""
    lower, upper = values[values <= t], values[values > t]
    if lower.numel() == 0 or upper.numel() == 0:
        return None
    a, b = int(lower.double().mean()), int(upper.double().mean())
    if b - a < TISSUE_CONTRAST:
        return None
    hist = torch.bincount(values.flatten().long(), minlength=256).double()
    smooth = torch.nn.functional.avg_pool1d(hist[None, None], 5, 1, 2,
                                            count_include_pad=False)[0, 0]
    floor = smooth[a:b + 1].min()
    if floor > TISSUE_VALLEY * min(smooth[:a + 1].max(), smooth[b:].max()):
        return None
    at = torch.nonzero(smooth[a:b + 1] == floor).flatten()
    return a + int(at[at.numel() // 2])


TISSUE_CONTRAST = 15   # grey levels: less saturation or darkening is background
# the deepest a valley between two levels of a greyscale slide's bright
# class may be, as a fraction of the lower peak, for them to be background
# and tissue rather than one background spread out (shaded)
TISSUE_VALLEY = 0.25


def tissue_mask(thumb: torch.Tensor) -> torch.Tensor:
    """Tissue pixels of a uint8 3 x h x w thumbnail: saturation above Otsu's
    threshold (and a floor, so that a blank slide has no tissue). A slide
    with no saturated pixel (greyscale, or stained without colour) is told
    by darkness instead, as in brightfield: pixels below Otsu's threshold
    of the grey level that are also darker than the bright class's mean
    by the floor (so that a uniform slide, noisy or not, has no tissue),
    and where the bright class is itself two separate levels, its darker
    one (tissue around dark objects)."""
    rgb = thumb.to(torch.int16)
    sat = (rgb.max(dim=0).values - rgb.min(dim=0).values).to(torch.uint8)
    mask = sat > max(otsu_threshold(sat), TISSUE_CONTRAST)
    if bool(mask.any()):
        return mask
    grey = rgb.sum(dim=0).div(3, rounding_mode="floor").to(torch.uint8)
    t = otsu_threshold(grey)
    bright = grey[grey > t]
    if bright.numel() == 0:                       # one grey level: nothing to tell apart
        return mask
    # three levels (background, tissue, dark objects in it): Otsu's cut may
    # fall between the tissue and the objects, leaving the tissue with the
    # background; while the bright class is itself two separate levels,
    # its darker one is tissue too
    while True:
        v = _valley(bright, otsu_threshold(bright))
        if v is None:
            break
        t, bright = v, bright[bright > v]
    cut = min(t + 1, bright.double().mean().item() - TISSUE_CONTRAST)
    return grey < cut

"""Writing maps too large to hold as pyramidal tiled TIFFs that OpenSlide
(and so slide viewers) open as slides: :class:`PyramidWriter`, on the C
streaming writer (``sc_tiff_stream_*`` in ``io/tiffwrite.c``).

    with PyramidWriter("map.tif", width, height, mpp=0.5) as w:
        for rows in bands:                # uint8 r x width x 3, top to bottom
            w.write(rows)
    # closed: level 0 and its halvings, mpp in the metadata

Rows go in order; each level keeps one row of tiles (reduced levels are
averaged on the way and staged in temporary files beside the output), so
no level exists in memory as a whole. The file appears under its name only
when complete (written under a temporary name, renamed at the end); an
error or an exception inside the ``with`` block leaves nothing behind.
"""

import ctypes
import os
import tempfile
from typing import Optional

import torch

from ._library import clib

_COMPRESSIONS = {"none": 0, "deflate": 1}
_declared = False


def _lib():
    global _declared
    lib = clib()
    if not _declared:
        vp, cp, sz, i64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64
        lib.sc_tiff_stream_open.restype = vp
        lib.sc_tiff_stream_open.argtypes = [cp, i64, i64, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_int, ctypes.c_double, cp, cp, sz]
        lib.sc_tiff_stream_write.restype = ctypes.c_int
        lib.sc_tiff_stream_write.argtypes = [vp, vp, i64, cp, sz]
        lib.sc_tiff_stream_close.restype = ctypes.c_int
        lib.sc_tiff_stream_close.argtypes = [vp, cp, sz]
        lib.sc_tiff_stream_abort.restype = None
        lib.sc_tiff_stream_abort.argtypes = [vp]
        _declared = True
    return lib


def level_count(width: int, height: int, min_size: int = 512, max_levels: int = 10) -> int:
    """Levels of a pyramid: level 0 and halvings (ceil) while the longest
    side exceeds ``min_size`` and the shortest is at least 32 (as
    ``synthetic.pyramid``)."""
    n, w, h = 1, int(width), int(height)
    while max(w, h) > min_size and min(w, h) >= 32 and n < max_levels:
        w, h, n = (w + 1) // 2, (h + 1) // 2, n + 1
    return n


def aperio_description(width: int, height: int, tile: int, mpp: float) -> str:
    """An ImageDescription from which OpenSlide reports ``openslide.mpp-x``
    (its Aperio reader; the resolution tags are written as well)."""
    return (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
            f"({tile}x{tile}) RGB|AppMag = {10 / mpp:g}|MPP = {mpp:g}"
            "|Software = streamcnn heatmap")


def file_mode() -> int:
    """0666 less the umask: what ``open(path, "w")`` would have made
    (mkstemp's files, renamed into place, are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class PyramidWriter:
    """A ``width x height`` RGB pyramidal tiled TIFF at ``path``, fed rows
    top to bottom with :meth:`write` (uint8 ``r x width x 3``, or
    ``3 x r x width``), finished by :meth:`close` (or the end of a ``with``
    block). ``mpp``: microns per level-0 pixel, put in the metadata
    (Aperio-style ImageDescription and resolution tags) so that
    ``streamcnn.Slide(path).mpp`` reports it. ``levels``: default
    :func:`level_count`. ``compression``: ``"deflate"`` (lossless) or
    ``"none"``."""

    def __init__(self, path: str, width: int, height: int, *, mpp: Optional[float] = None,
                 tile: int = 512, levels: Optional[int] = None,
                 compression: str = "deflate", description: Optional[str] = None):
        if compression not in _COMPRESSIONS:
            raise ValueError(f"streamcnn: compression must be one of {list(_COMPRESSIONS)}, "
                             f"got {compression!r}")
        if mpp is not None and not (isinstance(mpp, (int, float)) and mpp > 0):
            raise ValueError(f"streamcnn: mpp must be positive, got {mpp!r}")
        self.path = os.fspath(path)
        self.width, self.height = int(width), int(height)
        self.levels = level_count(self.width, self.height) if levels is None else int(levels)
        self.mpp = mpp
        folder = os.path.dirname(os.path.abspath(self.path))
        if description is None and mpp is not None:
            description = aperio_description(self.width, self.height, tile, mpp)
        fd, self._tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".",
                                         suffix=".tmp", dir=folder)
        os.close(fd)
        err = ctypes.create_string_buffer(768)
        self._h = _lib().sc_tiff_stream_open(
            self._tmp.encode(), self.width, self.height, self.levels, int(tile),
            _COMPRESSIONS[compression], float(mpp or 0.0),
            description.encode() if description else None, err, len(err))
        if not self._h:
            _unlink(self._tmp)
            raise ValueError(err.value.decode(errors="replace").replace(self._tmp, self.path))
        self.rows_written = 0

    def write(self, rows: torch.Tensor) -> None:
        """Append rows (uint8 ``r x width x 3`` or ``3 x r x width``)."""
        if self._h is None:
            raise ValueError("streamcnn: the TIFF writer is closed")
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.uint8 or rows.dim() != 3:
            raise ValueError("streamcnn: rows must be a uint8 r x width x 3 tensor")
        if rows.shape[0] == 3 and rows.shape[2] == self.width and rows.shape[1] != self.width:
            rows = rows.permute(1, 2, 0)
        if rows.shape[1] != self.width or rows.shape[2] != 3:
            raise ValueError(f"streamcnn: rows must be r x {self.width} x 3, got "
                             f"{tuple(rows.shape)}")
        rows = rows.contiguous()
        err = ctypes.create_string_buffer(768)
        if _lib().sc_tiff_stream_write(self._h, rows.data_ptr(), rows.shape[0], err,
                                       len(err)) != 0:
            self.abort()
            raise RuntimeError(err.value.decode(errors="replace").replace(self._tmp,
                                                                           self.path))
        self.rows_written += rows.shape[0]

    def close(self) -> None:
        """Finish the file (all rows must have been written) and move it to
        its name."""
        if self._h is None:
            return
        h, self._h = self._h, None
        err = ctypes.create_string_buffer(768)
        if _lib().sc_tiff_stream_close(h, err, len(err)) != 0:
            _unlink(self._tmp)
            raise RuntimeError(err.value.decode(errors="replace").replace(self._tmp,
                                                                           self.path))
        os.chmod(self._tmp, file_mode())
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the file (nothing is left behind)."""
        if self._h is not None:
            h, self._h = self._h, None
            _lib().sc_tiff_stream_abort(h)
        _unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if getattr(self, "_h", None) is not None:
            self.abort()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

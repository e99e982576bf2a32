"""Locating and loading libstreamcnn, and its torch-free C entry points."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

_LIB_NAME = "libstreamcnn.so"
_loaded_path: str | None = None
_cdll: ctypes.CDLL | None = None


def first_line(e: BaseException, limit: Optional[int] = 200) -> str:
    """The first line of an exception's message (ANSI colour codes
    removed, at most ``limit`` characters; None: all of it), or its type's
    name: for messages of one line that quote another error."""
    import re
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def library_path() -> str:
    """Absolute path of the streamcnn shared library.

    A process that did not import streamcnn (e.g. one that only runs a
    TorchScript model) registers the operators with
    ``torch.ops.load_library(path)``. ``STREAMCNN_LIBRARY`` overrides the
    location (useful for a build tree).
    """
    env = os.environ.get("STREAMCNN_LIBRARY")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parent / "lib" / _LIB_NAME)


def load_library() -> str:
    """Load the library once (registers torch.ops.streamcnn)."""
    global _loaded_path, _cdll
    if _loaded_path is not None:
        return _loaded_path
    path = library_path()
    if not os.path.exists(path):
        raise ImportError(
            f"streamcnn: the compiled library is missing at {path}; "
            "install the package with `pip install .` (or run `make build`)"
        )
    torch.ops.load_library(path)
    _cdll = ctypes.CDLL(path)
    i64p, i64 = ctypes.POINTER(ctypes.c_int64), ctypes.c_int64
    _cdll.sc_program_info.restype = ctypes.c_int
    _cdll.sc_program_info.argtypes = [i64p, i64, i64p, ctypes.c_char_p, ctypes.c_size_t]
    _cdll.sc_tiling_info.restype = ctypes.c_int
    _cdll.sc_tiling_info.argtypes = [i64p, i64, i64, i64, i64, i64, i64p,
                                     ctypes.c_char_p, ctypes.c_size_t]
    _cdll.sc_work_info.restype = ctypes.c_int
    _cdll.sc_work_info.argtypes = [i64p, i64, i64, i64, i64, i64,
                                   ctypes.POINTER(ctypes.c_double), ctypes.c_char_p,
                                   ctypes.c_size_t]
    _cdll.sc_memory_info.restype = ctypes.c_int
    _cdll.sc_memory_info.argtypes = [i64p, i64, i64, i64, i64, i64, ctypes.c_int,
                                     ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                                     ctypes.POINTER(ctypes.c_double), ctypes.c_char_p,
                                     ctypes.c_size_t]
    _cdll.sc_tile_bounds.restype = ctypes.c_int
    _cdll.sc_tile_bounds.argtypes = [i64p, i64, i64, i64, i64, i64, ctypes.c_int, i64p, i64,
                                     i64p, i64, ctypes.c_char_p, ctypes.c_size_t]
    _cdll.sc_band_info.restype = ctypes.c_int
    _cdll.sc_band_info.argtypes = [i64p, i64, i64, i64, i64, i64, i64, i64,
                                   ctypes.POINTER(ctypes.c_double), ctypes.c_char_p,
                                   ctypes.c_size_t]
    _cdll.sc_cone_info.restype = ctypes.c_int
    _cdll.sc_cone_info.argtypes = [i64p, i64, i64, i64, i64, i64, i64p, ctypes.c_char_p,
                                   ctypes.c_size_t]
    _cdll.sc_macs.restype = None
    _cdll.sc_macs.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    _cdll.sc_backward_tiles.restype = None
    _cdll.sc_backward_tiles.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    _declare_slide_api(_cdll)
    _loaded_path = path
    return path


def _words(program: Sequence[int]):
    n = len(program)
    arr = (ctypes.c_int64 * max(n, 1))(*program)
    return arr, n


def _call(name: str, program: Sequence[int], *args) -> None:
    """Call the C query `name(words, n, *args, errbuf, errlen)`; ValueError
    with the C message when it fails."""
    load_library()
    arr, n = _words(program)
    err = ctypes.create_string_buffer(768)
    if getattr(_cdll, name)(arr, n, *args, err, len(err)) != 0:
        raise ValueError(err.value.decode())


def _query(name: str, program: Sequence[int], args: Sequence, out) -> list:
    """The same for a query with one output array `out` last; it as a list."""
    _call(name, program, *args, out)
    return list(out)


def program_info(program: Sequence[int]) -> List[int]:
    """Decode and validate a program in C; returns
    [in_channels, out_channels, rf_h, rf_w, stride_h, stride_w, n_params,
    n_instructions]. Raises ValueError with the decoder's message."""
    return _query("sc_program_info", program, (), (ctypes.c_int64 * 8)())


def tiling_info(program: Sequence[int], h: int, w: int, tile: Tuple[int, int]) -> List[int]:
    """[out_h, out_w, tile_out_h, tile_out_w, tiles_h, tiles_w] for an h x w
    image and an input tile (rows, cols). Raises ValueError."""
    return _query("sc_tiling_info", program, (h, w, tile[0], tile[1]),
                  (ctypes.c_int64 * 6)())


def tile_bounds(program: Sequence[int], h: int, w: int, tile: Tuple[int, int],
                cached: bool) -> Tuple[List[int], List[int]]:
    """Output rows and columns where the tiles start and end (n + 1 each),
    as halo caching (cached) or the cone recompute tiles; see
    sc_tile_bounds. Raises ValueError."""
    n = tiling_info(program, h, w, tile)[4:6]
    rows, cols = (ctypes.c_int64 * (n[0] + 1))(), (ctypes.c_int64 * (n[1] + 1))()
    _call("sc_tile_bounds", program, h, w, tile[0], tile[1], int(bool(cached)), rows,
          n[0] + 1, cols, n[1] + 1)
    return list(rows), list(cols)


def work_info(program: Sequence[int], h: int, w: int, tile: Tuple[int, int]) -> List[float]:
    """[whole MACs, tiled MACs, whole elements, tiled elements, cached MACs,
    cached elements, strip elements] of one forward pass (per batch element)
    over an h x w image; see sc_work_info."""
    return _query("sc_work_info", program, (h, w, tile[0], tile[1]),
                  (ctypes.c_double * 7)())


def band_info(program: Sequence[int], h: int, w: int, tile: Tuple[int, int],
              out_rows: Tuple[int, int]) -> List[float]:
    """[first image row, end image row (half-open) read, strip elements,
    multiply-adds with halo caching] of the stem output rows
    ``out_rows = (lo, hi)`` of an h x w image as the ``*_rows`` ops compute
    them, per batch element; see sc_band_info. Raises ValueError."""
    return _query("sc_band_info", program,
                  (h, w, tile[0], tile[1], int(out_rows[0]), int(out_rows[1])),
                  (ctypes.c_double * 4)())


def cone_info(program: Sequence[int], out_rows: Tuple[int, int],
              out_cols: Tuple[int, int]) -> List[int]:
    """[first row, end row, first column, end column] (half-open) of the
    image box the stem output box ``out_rows x out_cols`` (``(lo, hi)``
    each) depends on, unclipped: padding counts, so it may start before 0
    or end beyond any image; see sc_cone_info. Raises ValueError."""
    return _query("sc_cone_info", program,
                  (int(out_rows[0]), int(out_rows[1]), int(out_cols[0]), int(out_cols[1])),
                  (ctypes.c_int64 * 4)())


MEMORY_CACHED, MEMORY_CPU = 1, 2  # sc_memory_info's flags (streamcnn.h)


def memory_info(program: Sequence[int], h: int, w: int, tile: Tuple[int, int],
                cached: bool, mask: Optional[Sequence[bool]] = None,
                itemsize: int = 4, cpu: bool = False) -> List[float]:
    """[backward peak, forward peak, strips] of the largest tile, in bytes
    per batch element of a compute dtype of itemsize bytes (stem output and
    its gradient excluded); see sc_memory_info. mask: the gradients the
    backward computes, as its output_mask ([image] + one per parameter);
    None: all of them. cpu: the convolutions run on the CPU (ATen's im2col
    convolution holds its columns), else as with cuDNN."""
    arr = None
    if mask is not None:
        n_params = program_info(program)[6]
        if len(mask) != 1 + n_params:
            raise ValueError(f"streamcnn: mask needs 1 + {n_params} entries (image, then "
                             f"one per parameter), got {len(mask)}")
        arr = (ctypes.c_int * len(mask))(*[int(bool(m)) for m in mask])
    return _query("sc_memory_info", program,
                  (h, w, tile[0], tile[1],
                   (MEMORY_CACHED if cached else 0) | (MEMORY_CPU if cpu else 0), arr,
                   int(itemsize)),
                  (ctypes.c_double * 3)())


def macs_executed(reset: bool = False) -> Tuple[float, float, float]:
    """Multiply-adds the operators executed in their convolutions and
    channel linears since the last reset, on any thread (autograd runs a
    CUDA backward on a thread of its own): (forward incl. recomputes, input
    gradients, weight gradients). reset=True reads and zeroes the
    counters."""
    load_library()
    out = (ctypes.c_double * 3)()
    _cdll.sc_macs(out, int(bool(reset)))
    return out[0], out[1], out[2]


def backward_tiles(reset: bool = False) -> dict:
    """Backward tiles the operators ran since the last reset, on any thread:
    ``whole`` (as without sparsity), ``boxed`` (back-propagated through the
    cones of a few boxes around their non-zero output gradient; ``boxes``
    counts those), ``restricted`` (halo caching: recomputed and
    back-propagated only over the cone of their non-zero output and pending
    halo gradients), ``skipped`` (no non-zero gradient: neither recomputed
    nor back-propagated). The sparse backward is on unless the environment
    variable STREAMCNN_SPARSE_BACKWARD is 0 (off) or skip (skipping only).
    reset=True reads and zeroes the counters."""
    load_library()
    out = (ctypes.c_double * 5)()
    _cdll.sc_backward_tiles(out, int(bool(reset)))
    return {"whole": int(out[0]), "boxed": int(out[1]), "skipped": int(out[2]),
            "boxes": int(out[3]), "restricted": int(out[4])}


class ResampleArgs(ctypes.Structure):
    """``sc_resample_args`` of io/slide.h (sizes in pixels)."""
    _fields_ = [("src", ctypes.c_void_p), ("planes", ctypes.c_int64),
                ("src_y", ctypes.c_int64), ("src_x", ctypes.c_int64),
                ("src_h", ctypes.c_int64), ("src_w", ctypes.c_int64),
                ("in_h", ctypes.c_int64), ("in_w", ctypes.c_int64),
                ("out_h", ctypes.c_int64), ("out_w", ctypes.c_int64),
                ("box_y", ctypes.c_int64), ("box_x", ctypes.c_int64),
                ("box_h", ctypes.c_int64), ("box_w", ctypes.c_int64),
                ("dst", ctypes.c_void_p), ("threads", ctypes.c_int),
                ("fill", ctypes.c_void_p)]


def _declare_slide_api(lib: ctypes.CDLL) -> None:
    """ctypes prototypes of io/slide.h."""
    vp, cp, sz, i32, i64 = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                            ctypes.c_int32, ctypes.c_int64)
    i64p = ctypes.POINTER(ctypes.c_int64)
    protos = {
        "sc_slide_available": (ctypes.c_int, []),
        "sc_slide_open": (vp, [cp, cp, sz]),
        "sc_slide_close": (None, [vp]),
        "sc_slide_level_count": (i32, [vp]),
        "sc_slide_level": (ctypes.c_int, [vp, i32, i64p, i64p,
                                          ctypes.POINTER(ctypes.c_double)]),
        "sc_slide_level_sheared": (ctypes.c_int, [vp, i32]),
        "sc_slide_property": (cp, [vp, cp]),
        "sc_slide_property_names": (ctypes.POINTER(cp), [vp]),
        "sc_slide_background": (None, [vp, ctypes.POINTER(ctypes.c_uint8)]),
        "sc_slide_read": (ctypes.c_int, [vp, i32, i64, i64, i64, i64, vp, ctypes.c_int,
                                         ctypes.c_int, cp, sz]),
        "sc_slide_read_box": (ctypes.c_int, [vp, i32, i64, i64, i64, i64, i64, i64, i64, i64,
                                             vp, ctypes.c_int, ctypes.c_int, cp, sz]),
        "sc_resample_span": (ctypes.c_int, [i64, i64, i64, i64, i64p, cp, sz]),
        "sc_resample_u8": (ctypes.c_int, [ctypes.POINTER(ResampleArgs), cp, sz]),
        "sc_tiff_write_pyramid": (ctypes.c_int, [cp, ctypes.c_int, ctypes.POINTER(vp), i64p,
                                                 i64p, ctypes.c_int, ctypes.c_int,
                                                 ctypes.c_int, cp, cp, sz]),
        "sc_tiff_write_striped": (ctypes.c_int, [cp, vp, i64, i64, cp, sz]),
        "sc_set_progress": (None, [vp, vp]),
    }
    for name, (res, args) in protos.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def clib() -> ctypes.CDLL:
    """The library's C API through ctypes (loads it if needed)."""
    load_library()
    return _cdll

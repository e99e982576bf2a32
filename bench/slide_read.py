#!/usr/bin/env python
"""Read throughput of whole-slide regions: streamcnn's chunked, threaded
reader (uint8 RGB out) vs a plain loop of openslide_read_region calls (the
same library, called through ctypes, premultiplied ARGB out, no conversion).

Writes two synthetic 8192 x 8192 pyramidal TIFFs (deflate and JPEG, tiles of
256) into a temporary folder, then reads the whole level-0 region of each,
every mode on a freshly opened handle (OpenSlide's tile cache starts cold;
the file itself is in the page cache for all modes alike). Prints MP/s
(megapixels per second, median of --reps) and the ratio to the plain loop.

    python bench/slide_read.py [--size 8192] [--reps 3] [--threads 1 2 4]
"""

import argparse
import ctypes
import ctypes.util
import os
import platform
import statistics
import tempfile
import time

import torch

import streamcnn
from streamcnn.data import synthetic


def openslide_lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("openslide") or "libopenslide.so.0"
    lib = ctypes.CDLL(name)
    lib.openslide_open.restype = ctypes.c_void_p
    lib.openslide_open.argtypes = [ctypes.c_char_p]
    lib.openslide_close.argtypes = [ctypes.c_void_p]
    lib.openslide_read_region.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_int32, ctypes.c_int64,
                                          ctypes.c_int64]
    lib.openslide_get_error.restype = ctypes.c_char_p
    lib.openslide_get_error.argtypes = [ctypes.c_void_p]
    return lib


def plain_loop(lib, path: str, size: int, chunk: int) -> float:
    """openslide_read_region over the region in chunk x chunk pieces (one
    call when chunk >= size) into one ARGB buffer; seconds."""
    h = lib.openslide_open(path.encode())
    if not h:
        raise RuntimeError(f"openslide cannot open {path}")
    buf = torch.empty(chunk * chunk if chunk < size else size * size, dtype=torch.int32)
    t0 = time.perf_counter()
    if chunk >= size:
        lib.openslide_read_region(h, buf.data_ptr(), 0, 0, 0, size, size)
    else:
        for y in range(0, size, chunk):
            for x in range(0, size, chunk):
                lib.openslide_read_region(h, buf.data_ptr(), x, y, 0, chunk, chunk)
    dt = time.perf_counter() - t0
    err = lib.openslide_get_error(h)
    lib.openslide_close(h)
    if err:
        raise RuntimeError(err.decode())
    return dt


def ours(path: str, size: int, threads: int) -> float:
    with streamcnn.Slide(path) as s:
        t0 = time.perf_counter()
        s.read_region((0, 0), 0, (size, size), threads=threads)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    lib = openslide_lib()
    mp = args.size * args.size / 1e6
    print(f"# slide read, {args.size}x{args.size} level-0 region, synthetic pyramidal TIFF "
          f"(tiles 256); {platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; median of {args.reps}")
    print("| slide   | reader                                |    time |    MP/s | vs plain |")
    print("|---------|---------------------------------------|---------|---------|----------|")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        img = synthetic.tissue_image(args.size, args.size, seed=0, tissue_fraction=0.5)
        levels = synthetic.pyramid(img, 1024)
        del img
        paths = {}
        for comp in ("deflate", "jpeg"):
            paths[comp] = os.path.join(d, f"slide-{comp}.tif")
            synthetic.write_slide(paths[comp], levels, tile=256, compression=comp)
        del levels
        print(f"# wrote the slides in {time.perf_counter() - t0:.1f} s: " + ", ".join(
            f"{c} {os.path.getsize(p) / 1e6:.0f} MB" for c, p in paths.items()))
        for comp, path in paths.items():
            rows = [("openslide_read_region, 512² loop", lambda: plain_loop(
                        lib, path, args.size, 512)),
                    ("openslide_read_region, one call", lambda: plain_loop(
                        lib, path, args.size, args.size))]
            rows += [(f"streamcnn.Slide, {t} thread{'s' if t > 1 else ''}",
                      (lambda t=t: ours(path, args.size, t))) for t in args.threads]
            base = None
            for name, fn in rows:
                dt = statistics.median(fn() for _ in range(args.reps))
                if name.endswith("512² loop"):
                    base = dt
                ratio = f"{base / dt:7.2f}x" if base else "        "
                print(f"| {comp:7s} | {name:37s} | {dt:5.2f} s | {mp / dt:7.1f} | {ratio} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The slide resampler (``streamcnn.slide.resize_uint8``, io/resample.c:
fixed point, rows then columns) against what it replaced: torch's
antialiased bilinear ``interpolate`` one float32 plane at a time, rounded
back to uint8. Random uint8 images, 3 channels; prints seconds (median of
--reps), the ratio, the largest difference and the fraction of pixels that
differ, and checks that a band of rows, from only the source rows it needs,
equals those rows of the whole.

    python bench/resample.py [--cases 8192:4500 12288:8192 4096:6000] [--reps 3]
"""

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from streamcnn.slide import resample_span, resize_uint8


def torch_resize(img: torch.Tensor, size) -> torch.Tensor:
    out = torch.empty((img.shape[0], *size), dtype=torch.uint8)
    for c in range(img.shape[0]):
        plane = F.interpolate(img[None, c:c + 1].float(), size=size, mode="bilinear",
                              align_corners=False, antialias=True)
        out[c] = plane[0, 0].round_().clamp_(0, 255).to(torch.uint8)
    return out


def timed(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["8192:4500", "12288:8192", "4096:6000"],
                    help="IN:OUT square edges")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"# {platform.node()}, {platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); median of {args.reps}")
    print("| in -> out | torch interpolate s | resize_uint8 1 thread s | 2 threads s "
          "| torch / 2 threads | max diff | pixels differing | band == rows of whole |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for case in args.cases:
        n, m = (int(v) for v in case.split(":"))
        img = torch.randint(0, 256, (3, n, n), dtype=torch.uint8, generator=g)
        tt, ref = timed(lambda: torch_resize(img, (m, m)), args.reps)
        t1, _ = timed(lambda: resize_uint8(img, (m, m), threads=1), args.reps)
        t2, out = timed(lambda: resize_uint8(img, (m, m), threads=2), args.reps)
        d = (out.int() - ref.int()).abs()
        a, b = m // 3, m // 3 + 257
        r0, r1 = resample_span(n, m, a, b)
        band = resize_uint8(img[:, r0:r1], (m, m), source_size=(n, n), source_offset=(r0, 0),
                            box=(a, 0, b - a, m))
        same = torch.equal(band, out[:, a:b])
        print(f"| {n}² -> {m}² | {tt:.2f} | {t1:.2f} | {t2:.2f} | {tt / t2:.1f} | "
              f"{int(d.max())} | {float((d > 0).float().mean()):.3f} | {same} |")
        del img, ref, out, d


if __name__ == "__main__":
    main()

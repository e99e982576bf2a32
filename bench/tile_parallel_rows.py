#!/usr/bin/env python
"""What each rank of ``streamcnn train --tile-parallel N`` reads of an image:
its rows (``SlideDataset.read_rows`` on its ``RowPlan``) against the whole
image every rank read before.

Writes one synthetic JPEG ``.svs`` (``--slide`` pixels square, 0.25 µm/px),
then, for an ``--size`` x ``--size`` training image at ``--mpp`` (resampled
from level 0 unless the mpp is a level's) with augmentation on, and the
stem of ``--model`` to ``--upto`` streamed in ``--tile`` tiles, prints per N
the rows of the largest read, and for that rank and for the whole image:
the seconds and the peak resident memory above the process's baseline
(the rows include their colour jitter, as the training step applies it)
(each measurement in a fresh process: the reads are a function of the
plan, not of the collectives, so no process group is needed). The rows are
checked against the same rows of the whole augmented image (colour jitter
from the summed channel sums), bit for bit.

    python bench/tile_parallel_rows.py [--slide 12288] [--size 8192] [--mpp 0.375]
        [--ranks 1 2 4 8] [--reps 2]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _dataset(args):
    from streamcnn.data import SlideDataset
    return SlideDataset([(args.path, 0)], args.size, mpp=args.mpp, crop="center",
                        augment=True, seed=3, threads=args.threads)


def _plans(args, n):
    """Every rank's RowPlan for n ranks (balanced bands of the stem)."""
    from streamcnn.app.tile_parallel import plans_of
    from streamcnn.classifier import build_model
    from streamcnn.distributed import balanced_bands, band_rows
    model = build_model(args.model, num_outputs=2, stream_upto=args.upto,
                        tile_size=args.tile)
    prog, tile = model.stem.program, model.stem.tile_size
    bands = balanced_bands(prog, args.size, args.size, tile, n)
    needed = [band_rows(prog, args.size, args.size, tile, b) for b in bands]
    return plans_of(needed, args.size, args.size)


def child(args) -> None:
    """One measurement in this process: the whole item, or one rank's rows."""
    from streamcnn.app.common import peak_rss_mb
    ds = _dataset(args)
    ds.slide(0)                       # the handle and its metadata before the baseline
    ds.window(0)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if args.rows is None:
        out = ds[0][0]
    else:   # the rows and their colour jitter with the group's sums
        from streamcnn.data import Augment, AugmentDraw
        a, b, s0, s1 = args.rows
        got = ds.read_rows(0, (a, b), (s0, s1))
        out = Augment.colour(got["part"], AugmentDraw.from_tensor(got["draw"]), args.sums,
                             args.size * args.size)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb() - base
    print(json.dumps({"seconds": dt, "peak_mb": peak, "shape": list(out.shape)}))


def run(args, rows=None, sums=None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--path", args.path, "--size", str(args.size),
           "--mpp", str(args.mpp), "--threads", str(args.threads)]
    if rows is not None:
        cmd += ["--rows", *map(str, rows), "--sums", *map(str, sums)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def check(args, plans) -> list:
    """The ranks' rows, jittered with the summed sums, == the whole item;
    returns the sums."""
    from streamcnn.data import Augment, AugmentDraw
    ds = _dataset(args)
    whole = ds[0][0]
    parts = [ds.read_rows(0, p.read, p.sums) for p in plans]
    sums = sum(p["sums"] for p in parts).tolist()
    for plan, part in zip(plans, parts):
        a, b = plan.read
        if b > a:
            got = Augment.colour(part["part"], AugmentDraw.from_tensor(part["draw"]), sums,
                                 args.size * args.size)
            assert torch.equal(got, whole[:, a:b]), plan
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slide", type=int, default=12288)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--mpp", type=float, default=0.375)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--upto", default="layer2")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--path")
    ap.add_argument("--rows", type=int, nargs=4)
    ap.add_argument("--sums", type=int, nargs=3)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from streamcnn.data import synthetic
    with tempfile.TemporaryDirectory() as d:
        args.path = os.path.join(d, "s.svs")
        t0 = time.perf_counter()
        synthetic.make_slide(args.path, args.slide, args.slide, mpp=0.25, seed=1, tile=256,
                             compression="jpeg")
        print(f"# {platform.node()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cpus, torch {torch.__version__}; slide {args.slide}² "
              f"JPEG at 0.25 µm/px (written in {time.perf_counter() - t0:.0f} s); image "
              f"{args.size}² at {args.mpp} µm/px, augment on; {args.model} to {args.upto}, "
              f"tile {args.tile}; reader threads {args.threads}; median of {args.reps}")
        whole = [run(args) for _ in range(args.reps)]
        ws = statistics.median(r["seconds"] for r in whole)
        wm = statistics.median(r["peak_mb"] for r in whole)
        print("| ranks N | rows of the largest read | of the image | read s | vs whole "
              "| peak MB above baseline | vs whole |")
        print("|---|---|---|---|---|---|---|")
        print(f"| whole image | {args.size} | 1.000 | {ws:.2f} | 1.00 | {wm:.0f} | 1.00 |")
        for n in args.ranks:
            plans = _plans(args, n)
            sums = check(args, plans)
            big = max(plans, key=lambda p: p.read[1] - p.read[0])
            got = [run(args, (*big.read, *big.sums), sums) for _ in range(args.reps)]
            s = statistics.median(r["seconds"] for r in got)
            m = statistics.median(r["peak_mb"] for r in got)
            rows = big.read[1] - big.read[0]
            print(f"| {n} | {rows} ({big.read[0]}..{big.read[1]}) | {rows / args.size:.3f} "
                  f"| {s:.2f} | {s / ws:.2f} | {m:.0f} | {m / wm:.2f} |")


if __name__ == "__main__":
    main()

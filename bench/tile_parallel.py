"""Tile-parallel streaming: one image over 1 and 2 CPU processes (gloo), and
the modelled scaling to 8 ranks.

Measured: one training step (forward, head = sum of squares, backward) of a
ResNet-18 stem (conv1 .. layer2, float32) on one image, in one process with
StreamingModule and in P processes with TileParallel (P = 1, 2; torch threads
per process = cores / P). Modelled (C work model, sc_band_info): for a
ResNet-34 stem up to layer3 at 32768^2 and 65536^2 with tile 4096, the
largest band's multiply-adds relative to the whole pass (the ideal speed-up
is whole / largest band), and the communication per step: the all-gather of
the stem output (each rank receives P - 1 bands of the largest band's size:
they are padded) and the
all-reduce of the parameter gradients (ring: 2 (P - 1) / P x their bytes).
Time on N ranks = T1 x largest band / whole + communication / bandwidth.

    PYTHONPATH=python STREAMCNN_LIBRARY=build/dev/libstreamcnn.so \\
        python bench/tile_parallel.py [--size 1024] [--tile 512] [--reps 2]
"""

import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn


def _stem(upto):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None) if upto == "layer2" else \
        torchvision.models.resnet34(weights=None)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    names = names[:names.index(upto) + 1]
    return nn.Sequential(*[getattr(model, n) for n in names]).eval()


def _step(f, x):
    y = f(x)
    y.square().sum().backward()
    return y


def _worker(rank, world, path, size, tile, reps, threads, out):
    import streamcnn
    from streamcnn.distributed import TileParallel
    torch.set_num_threads(threads)
    if world > 0:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
    stem = _stem("layer2")
    sm = streamcnn.StreamingModule(stem, tile)
    f = TileParallel(sm) if world > 0 else sm
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # warm-up: the first calls take several times longer
        _step(f, x)     # (oneDNN primitives, first-touch pages; 15 s vs 2 s seen)
    times = []
    for _ in range(reps):
        if world > 0:
            dist.barrier()
        t0 = time.perf_counter()
        _step(f, x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as fh:
            fh.write(f"{min(times)}\n")
    if world > 0:
        dist.destroy_process_group()


def measure(world, size, tile, reps, cores):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "t")
        # every setup in fresh processes (world 0: StreamingModule alone)
        mp.start_processes(_worker, args=(world, os.path.join(d, "rv"), size, tile, reps,
                                          max(1, cores // max(world, 1)), out),
                           nprocs=max(world, 1), start_method="spawn")
        return float(open(out).read())


def model(size, tile, ranks, itemsize=4):
    import streamcnn
    from streamcnn.distributed import balanced_bands
    sm = streamcnn.StreamingModule(_stem("layer3"), tile)
    prog = sm.program
    oh, ow = streamcnn.tiling_info(prog, size, size, sm.tile_size)[:2]
    c_out = streamcnn.program_info(prog)[1]
    whole = streamcnn.band_info(prog, size, size, sm.tile_size, (0, oh))[3]
    n_grad = sum(p.numel() for p in sm.stem.parameters() if p.requires_grad)
    rows = []
    for n in ranks:
        bands = balanced_bands(prog, size, size, sm.tile_size, n)
        worst = max(streamcnn.band_info(prog, size, size, sm.tile_size, b)[3]
                    for b in bands if b[1] > b[0])
        max_rows = max(b - a for a, b in bands)
        gather = (n - 1) * max_rows * ow * c_out * itemsize  # bytes each rank receives
        reduce = 2 * (n - 1) / n * n_grad * itemsize if n > 1 else 0.0
        rows.append((n, whole / worst, gather, reduce))
    return oh, ow, c_out, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--bandwidth", type=float, default=100e9,
                    help="bytes/s assumed for the modelled communication (NVLink-class)")
    ap.add_argument("--t1", type=float, nargs=2, default=None, metavar=("T32K", "T64K"),
                    help="measured single-GPU step times (s) at 32768^2 / 65536^2 for "
                         "the modelled times")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"measured: ResNet-18 stem (conv1..layer2, float32), 1 x 3 x {a.size}^2, "
          f"tile {a.tile}, {cores} cores, best of {a.reps} steps (forward + backward)")
    print(f"{'setup':<34}{'step s':>10}{'speed-up':>10}")
    t_single = measure(0, a.size, a.tile, a.reps, cores)
    print(f"{'StreamingModule, 1 process':<34}{t_single:>10.2f}{1.0:>10.2f}")
    for p in (1, 2):
        t = measure(p, a.size, a.tile, a.reps, cores)
        print(f"{f'TileParallel, {p} process(es)':<34}{t:>10.2f}{t_single / t:>10.2f}")
    for i, size in enumerate((32768, 65536)):
        oh, ow, c, rows = model(size, 4096, (1, 2, 4, 8))
        print(f"\nmodel: ResNet-34 stem to layer3, {size}^2, tile 4096, output "
              f"{c} x {oh} x {ow} float32")
        print(f"{'ranks':>6}{'ideal speed-up':>16}{'all-gather GB':>15}{'all-reduce MB':>15}"
              f"{'comm s':>9}" + (f"{'step s':>9}" if a.t1 else ""))
        for n, speed, gather, reduce in rows:
            comm = (gather + reduce) / a.bandwidth
            line = f"{n:>6}{speed:>16.2f}{gather / 1e9:>15.2f}{reduce / 1e6:>15.1f}{comm:>9.2f}"
            if a.t1:
                line += f"{a.t1[i] / speed + comm:>9.2f}"
            print(line)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Sparse backward on the CPU: backward multiply-adds and time of a
max-pool head (the paper's: one arg-max location per channel; --topk K:
also the mean of the K largest) against an average-pool head (dense
gradient), with the sparse backward on (default)
and off (STREAMCNN_SPARSE_BACKWARD=0), with halo caching (--cone: also
without); "vs dense": against the average-pool head without sparsity; tiles run
whole, boxed, restricted (halo caching: to the cone of their non-zero
output and pending gradients) or skipped;
torchvision ResNet-18 conv1..layer1 (frozen BN), fp32, batch 1. Then the
modelled 65536² ResNet-34 conv1..layer3 case: the backward multiply-adds
of one arg-max location measured (a single-pixel gradient in the middle of
an image, every other tile skipped), times 256 locations, against the
dense backward's (recompute + input and weight gradients, from
StreamingModule.work and the counters' 2x ratio).
Environment: STREAMCNN_SPARSE_BACKWARD is set by the script.

    python bench/sparse_backward.py [--size 512] [--tile 96] [--reps 1] [--cone] [--all]
                                    [--no-model] [--topk K]
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torchvision

import streamcnn


def pool(y, head):
    """Global pooling per channel: max (one location), top<k> (the mean of
    the k largest: k locations), avg (dense)."""
    if head == "max":
        return y.amax(dim=(2, 3))
    if head.startswith("top"):
        return y.flatten(2).topk(int(head[3:]), dim=2).values.mean(dim=2)
    return y.mean(dim=(2, 3))


def measure(sm, x, head, mode, reps):
    os.environ["STREAMCNN_SPARSE_BACKWARD"] = mode
    best, macs, tiles = None, None, None
    for _ in range(reps):
        sm.zero_grad()
        y = sm(x)
        c = y.shape[1]
        w = torch.linspace(-1.0, 1.0, c)
        loss = (pool(y, head) * w).sum()
        streamcnn.macs_executed(reset=True)
        streamcnn.backward_tiles(reset=True)
        t0 = time.perf_counter()
        loss.backward()
        dt = time.perf_counter() - t0
        macs = streamcnn.macs_executed(reset=True)
        tiles = streamcnn.backward_tiles(reset=True)
        best = dt if best is None else min(best, dt)
    return best, sum(macs), tiles


def model_65536(tile, size):
    """One arg-max location's backward multiply-adds (all channels at one
    output pixel in the middle of a size x size image, so that its cone is
    whole), measured with the backward operator alone (no forward needed:
    the cone backward recomputes what it reads); the dense backward's at
    65536² from the model."""
    torch.manual_seed(0)
    r = torchvision.models.resnet34(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2,
                         r.layer3).eval()
    sm = streamcnn.StreamingModule(stem, tile, halo_cache=False)
    oh, ow = sm.tiling(size, size)["output"]
    params = sm.stream_params()
    g = torch.zeros(1, 256, oh, ow)
    g[0, :, oh // 2, ow // 2] = 1.0
    os.environ["STREAMCNN_SPARSE_BACKWARD"] = "1"
    streamcnn.macs_executed(reset=True)
    streamcnn.backward_tiles(reset=True)
    streamcnn.ops.backward(g, torch.randn(1, 3, size, size), params, sm.program,
                           sm.tile_size, [False] + [True] * len(params))
    one = sum(streamcnn.macs_executed(reset=True))
    tiles = streamcnn.backward_tiles(reset=True)
    return one, tiles, sm.work(65536, 65536)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tile", type=int, default=96)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--model-tile", type=int, default=1024)
    ap.add_argument("--model-size", type=int, default=576)
    ap.add_argument("--cone", action="store_true", help="also without halo caching")
    ap.add_argument("--all", action="store_true", help="also the max-pool head without sparsity")
    ap.add_argument("--no-model", action="store_true", help="skip the modelled 65536² case")
    ap.add_argument("--topk", type=int, default=0,
                    help="also a top-k head (the mean of each channel's k largest)")
    args = ap.parse_args()
    torch.manual_seed(0)
    r = torchvision.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1).eval()
    x = torch.randn(1, 3, args.size, args.size)
    print(f"# ResNet-18 conv1..layer1, {args.size}², tile {args.tile}, fp32, batch 1, "
          f"{torch.get_num_threads()} threads")
    print("| halo cache | head | sparse | tiles whole/boxed/restricted/skipped (boxes) "
          "| backward GMAC | vs dense | backward s | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for hc in (True, False) if args.cone else (True,):
        sm = streamcnn.StreamingModule(stem, args.tile, halo_cache=hc)
        n = sm.tiling(args.size, args.size)["tiles"]
        assert n[0] * n[1] >= 64, n
        base = None  # the dense backward: average-pool head, sparsity off
        top = ((f"top{args.topk}", "1"),) if args.topk else ()
        for head, mode in (("avg", "0"), ("avg", "1"), ("max", "1")) + top + (
                (("max", "0"),) if args.all else ()):
            t, m, tl = measure(sm, x, head, mode, args.reps)
            if base is None:
                base = (t, m)
            print(f"| {'on' if hc else 'off'} ({n[0]}x{n[1]}) | {head} | "
                  f"{'on' if mode == '1' else 'off'} | {tl['whole']}/{tl['boxed']}/"
                  f"{tl.get('restricted', 0)}/{tl['skipped']} ({tl['boxes']}) | {m / 1e9:.2f} | "
                  f"{m / base[1]:.3f}x | {t:.2f} | {t / base[0]:.3f}x |", flush=True)
    print()
    sys.stdout.flush()
    if args.no_model:
        return
    one, tiles, w = model_65536(args.model_tile, args.model_size)
    print(f"# modelled: ResNet-34 conv1..layer3 at 65536², tile {args.model_tile}, max-pool head: "
          f"256 arg-max locations x one location's backward (measured at {args.model_size}²: "
          f"{one / 1e9:.1f} GMAC, tiles {tiles}); dense backward = recompute + 2 x forward "
          "(input and weight gradients, as the counters show)")
    print("| halo cache | forward GMAC | dense backward GMAC | sparse backward GMAC (<=) "
          "| ratio | step / forward, dense | sparse |")
    print("|---|---|---|---|---|---|---|")
    whole = w["macs_whole"]
    for hc in (True, False):
        fwd = w["macs_cached"]  # the forward op always caches halos
        dense = (w["macs_cached"] if hc else w["macs_streamed"]) + 2.0 * whole
        sparse = 256 * one
        print(f"| {'on' if hc else 'off'} | {fwd / 1e9:.0f} | {dense / 1e9:.0f} | "
              f"{sparse / 1e9:.0f} | {sparse / dense:.4f} | {(fwd + dense) / fwd:.2f}x | "
              f"{(fwd + sparse) / fwd:.3f}x |")


if __name__ == "__main__":
    main()

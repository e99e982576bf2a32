#!/usr/bin/env python
"""Halo recompute overhead of streaming (no GPU needed: pure geometry).

For torchvision ResNet-34 conv1..layer3 (the network of the GPU benchmark),
prints the multiply-adds a streamed forward executes over those of one
whole-image forward (StreamingModule.work, from the C tiling plans), per
image size and tile size, and the same for a training step: the backward
streams the forward again, so a step is about (2 + 2) x streamed forward
against (1 + 2) x whole forward (backward ~ 2 x forward in multiply-adds).
Exact streaming with recompute therefore cannot beat 4/3 = 1.33x; halo
caching (issue 5) is what would bring the forward term to 1.0.

    python bench/recompute.py [--sizes 2048 4096 8192 16384 32768 65536] [--tiles 1024 1920 2880 4096]
"""

import argparse

import torch.nn as nn
import torchvision

import streamcnn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1024, 1920, 2880, 4096])
    args = ap.parse_args()
    r = torchvision.models.resnet34(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3).eval()
    print("# ResNet-34 conv1..layer3, receptive field "
          f"{streamcnn.StreamingModule(stem, 4096).receptive_field[0]}, multiply-adds "
          "streamed / whole-image")
    print("| image   | tile | tiles   | forward | train step | whole fwd GMAC |")
    print("|---------|------|---------|---------|------------|----------------|")
    for size in args.sizes:
        for tile in args.tiles:
            sm = streamcnn.StreamingModule(stem, tile)
            w = sm.work(size, size)
            n = sm.tiling(size, size)["tiles"]
            fwd = w["recompute"]
            print(f"| {size:>6}² | {tile:>4} | {n[0]:>3}x{n[1]:<3} | {fwd:6.3f}x | "
                  f"{(2 * fwd + 2 * fwd) / 3:9.3f}x | {w['macs_whole'] / 1e9:14.1f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Halo recompute overhead of streaming (no GPU needed: pure geometry).

For torchvision ResNet-34 conv1..layer3 (the network of the GPU benchmark),
prints the multiply-adds a streamed forward executes over those of one
whole-image forward (StreamingModule.work, from the C tiling plans), per
image size and tile size, and the same for a training step: the backward
streams the forward again, so a step is about (2 + 2) x streamed forward
against (1 + 2) x whole forward (backward ~ 2 x forward in multiply-adds).
Columns: "cone" (every tile recomputes its whole cone, halo_cache=False: the
forward op computes each value once either way, the backward recomputes
cones, so "step cone" is a little above what runs: 2.12x modelled where
macs_executed counted 2.01x for ResNet-18 conv1..layer2, 768², tile 256) and
"cached" (halo caching along rows, the default: only the column overlap is
recomputed), plus the strips the cache keeps from forward to backward
(float32). Exact streaming with one recompute cannot beat 4/3 = 1.33x;
cached with tiles as wide as the image reaches it. "step memory": the C
memory model's peak of a cached float32 training step of batch 1 (the
larger of the largest tile's forward and backward, with folded weights
and parameter gradients; the strips) plus one stem-output-sized tensor
(the output in the forward, its gradient in the backward: the GPU
benchmark's head, average pooling run as a mean, keeps nothing;
gpu_resnet34.step_model), what max_memory_allocated would show with the
image in host memory, less the parameters and the convolution library's
workspace.

    python bench/recompute.py [--sizes 2048 4096 8192 16384 32768 65536] [--tiles 1024 1920 2880 4096]
"""

import argparse

import torch.nn as nn
import torchvision

import streamcnn
from streamcnn._library import memory_info
from gpu_resnet34 import step_model


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
    print("| image   | tile | tiles   | fwd cone | step cone | fwd cached | step cached "
          "| strips fp32 | step memory | whole fwd GMAC |")
    print("|---------|------|---------|----------|-----------|------------|-------------"
          "|-------------|-------------|----------------|")
    for size in args.sizes:
        for tile in args.tiles:
            sm = streamcnn.StreamingModule(stem, tile)
            w = sm.work(size, size)
            n = sm.tiling(size, size)["tiles"]
            fwd, c = w["recompute"], w["recompute_cached"]
            oh, ow = sm.tiling(size, size)["output"]
            mask = [False] + [True] * len(sm.stream_params())  # no image gradient
            step = step_model(memory_info(sm.program, size, size, sm.tile_size, True, mask, 4),
                              256 * oh * ow * 4)
            print(f"| {size:>6}² | {tile:>4} | {n[0]:>3}x{n[1]:<3} | {fwd:7.3f}x | "
                  f"{4 * fwd / 3:8.3f}x | {c:9.3f}x | {4 * c / 3:10.3f}x | "
                  f"{w['strip_elements'] * 4 / 1e9:8.2f} GB | {step / 1e9:8.2f} GB "
                  f"| {w['macs_whole'] / 1e9:14.1f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""ATen calls per streamed training step (no GPU needed): on a GPU each is
at least one kernel launch, so per-tile calls are the streamed step's fixed
overhead. Counts the ATen operators the C core calls directly (the
profiler's aten:: events whose parent is not an aten:: event) in one
forward + backward of torchvision ResNet-34 conv1..layer3 (frozen BN,
halo caching, uint8 image normalised in the module), per operator, with
the total and the count per tile.

    python bench/aten_calls.py [--size 1536] [--tile 640] [--top 12]
"""

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_resnet34 as bench  # noqa: E402  (the benchmark's network and image)

import streamcnn  # noqa: E402


def count(size: int, tile: int):
    device = torch.device("cpu")
    stem, head = bench.build(device)
    image = bench.make_image(size, True, device)
    sm = streamcnn.StreamingModule(stem, tile, mean=bench.MEAN, std=bench.STD)

    def step():
        head(sm(image)).sum().backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    calls = collections.Counter(
        e.name for e in prof.events()
        if e.name.startswith("aten::") and e.cpu_parent is not None
        and not e.cpu_parent.name.startswith("aten::"))
    n = sm.tiling(size, size)["tiles"]
    return calls, n[0] * n[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1536)
    ap.add_argument("--tile", type=int, default=640)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    calls, tiles = count(args.size, args.tile)
    total = sum(calls.values())
    print(f"# ResNet-34 conv1..layer3, {args.size}², tile {args.tile}: {tiles} tiles, "
          f"{total} ATen calls per step, {total / tiles:.1f} per tile")
    print("| operator | calls | per tile |")
    print("|----------|------:|---------:|")
    for name, k in calls.most_common(args.top):
        print(f"| {name} | {k} | {k / tiles:.1f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""memory_budget on random stems: the measured peak of a training step
against its budget and against the memory model.

For each seed: a random float32 stem of supported layers (the equivalence
tests' random_stem: convolutions of every shape, pools, batch norms,
activations, residual blocks), some parameters frozen, a random image size
(150..500 px), batch 1 or 2, the image's gradient on or off, halo caching
on or off, and a budget between 5% and 80% of what one whole-image tile
needs. The module picks its tile from the budget; one training step
(forward + backward with a given output gradient) is measured: on the CPU
the peak of the bytes live in PyTorch's allocator (profiler memory
events), on CUDA max_memory_allocated, both above what was live before.
"over" counts the steps whose peak exceeds budget + stem output + its
gradient (the contract); peak / model is the measured peak (stem output
excluded) over the modelled bytes of the chosen tile. --inference: forwards
without gradient instead (any stem; over: peak > budget + stem output).

    python bench/budget_check.py [--seeds 200] [--start 100] [--device cpu] [--inference]
    python bench/budget_check.py --resnet 1536 [--device cpu]

--resnet SIZE instead: torchvision ResNet-34 conv1..layer3 (eval BN, all
parameters trainable), batch 1, SIZE² float32 image without gradient, a
training step's measured peak against the model for a few tile shapes,
with and without halo caching.
"""

import argparse
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "python"))
from gpu_resnet34 import cpu_allocator_peak  # noqa: E402
from test_equivalence import _valid_size, random_stem  # noqa: E402

import streamcnn  # noqa: E402
from streamcnn._library import memory_info  # noqa: E402


def step_peak(step, device):
    if device.type == "cpu":
        return cpu_allocator_peak(step)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def check(seed: int, device: torch.device, inference: bool = False):
    """One random case: a dict, or None where the seed gives no usable
    stem (no parameters to train, no valid size)."""
    rng = random.Random(seed)
    stem = random_stem(seed)  # float64, for the size search
    if not inference and not any(True for _ in stem.parameters()):
        return None
    for p in stem.parameters():
        if rng.random() < 0.15:
            p.requires_grad_(False)
    size = _valid_size(stem, rng, 150, 500)
    if size is None:
        return None
    stem.float().to(device)
    h, w = size
    batch = rng.choice([1, 1, 2])
    image_grad = rng.random() < 0.5
    halo_cache = rng.random() < 0.7
    x = torch.randn(batch, 3, h, w, device=device, requires_grad=image_grad)
    with torch.no_grad():
        g = torch.randn_like(stem(x))
    out = g.numel() * g.element_size()
    cpu = device.type == "cpu"
    try:
        whole = streamcnn.StreamingModule(stem, (h + 1000, w + 1000), in_channels=3,
                                          halo_cache=halo_cache)
    except ValueError:  # only identities
        return None
    mask = whole._grad_mask(image_grad, whole.stream_params())
    if not inference and not any(mask):
        return None
    bwd, fwd, strips = memory_info(whole.program, h, w, whole.tile_size, halo_cache, mask, 4,
                                   cpu)
    need = fwd if inference else max(bwd, fwd) + strips
    budget = int(need * batch * rng.uniform(0.05, 0.8)) + 200_000
    sm = streamcnn.StreamingModule(stem, memory_budget=budget, in_channels=3,
                                   halo_cache=halo_cache)
    try:
        choice = sm.budget_tile(batch, h, w, training=not inference, image_grad=image_grad,
                                device=device)
    except ValueError:
        return {"seed": seed, "fits": False}

    def step():
        if inference:
            with torch.no_grad():
                sm(x)
            return
        x.grad = None
        sm(x).backward(g)

    step()  # warm-up
    peak = step_peak(step, device)
    return {"seed": seed, "fits": True, "size": size, "batch": batch,
            "image_grad": image_grad, "budget": budget, "model": choice["bytes"],
            "peak": peak, "out": out,
            "over": peak > budget + (1 if inference else 2) * out,
            "ratio": (peak - out) / choice["bytes"], "tile": choice["tile_size"],
            "cached": choice["halo_cache"]}


def resnet(size: int, device: torch.device):
    import torch.nn as nn
    import torchvision
    torch.manual_seed(0)
    r = torchvision.models.resnet34()
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2,
                         r.layer3).eval().to(device)
    x = torch.randn(1, 3, size, size, device=device)
    g = torch.randn(1, 256, size // 16, size // 16, device=device)
    rf = streamcnn.StreamingModule(stem, 4096).receptive_field[0]
    big, small = size + rf, 640  # one tile across, and 640
    print(f"# ResNet-34 conv1..layer3, {size}², {device}: training step, stem output excluded")
    print("| tile        | tiles   | halo cache | peak MB | model MB | peak/model |")
    print("|-------------|---------|------------|---------|----------|------------|")
    for tile, cached in [((small, big), True), ((big, small), True), ((big, big), True),
                         ((small, small), True), ((small, small), False)]:
        sm = streamcnn.StreamingModule(stem, tile, halo_cache=cached)
        sm(x).backward(g)
        peak = step_peak(lambda: sm(x).backward(g), device) - g.numel() * 4
        mask = sm._grad_mask(False, sm.stream_params())
        b, f, st = memory_info(sm.program, size, size, sm.tile_size, cached, mask, 4,
                               device.type == "cpu")
        model = max(b, f) + st
        n = sm.tiling(size, size)["tiles"]
        print(f"| {tile[0]:>4} x {tile[1]:<4} | {n[0]:>3}x{n[1]:<3} | {str(cached):10} | "
              f"{peak / 1e6:7.1f} | {model / 1e6:8.1f} | {peak / model:10.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resnet", type=int, default=0, metavar="SIZE")
    ap.add_argument("--inference", action="store_true",
                    help="forwards without gradient (their budget holds the output only)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.resnet:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        return resnet(args.resnet, device)
    rows = [r for r in (check(s, device, args.inference)
                        for s in range(args.start, args.start + args.seeds)) if r is not None]
    fit = [r for r in rows if r["fits"]]
    over = [r for r in fit if r["over"]]
    ratios = sorted(r["ratio"] for r in fit)
    q = (lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]) if ratios else None
    print(f"# memory_budget on random stems, {device}, "
          f"{'inference' if args.inference else 'training steps'}, seeds {args.start}.."
          f"{args.start + args.seeds - 1}")
    print("| cases | no tile fits | over budget | peak/model p10 | median | p90 | max |")
    print("|-------|--------------|-------------|----------------|--------|-----|-----|")
    if ratios:
        print(f"| {len(fit):5} | {len(rows) - len(fit):12} | {len(over):11} | {q(0.1):14.2f} "
              f"| {q(0.5):6.2f} | {q(0.9):3.2f} | {ratios[-1]:.2f} |")
    for r in over:
        print(f"over: seed {r['seed']} size {r['size']} batch {r['batch']} image_grad "
              f"{r['image_grad']} tile {r['tile']} cached {r['cached']}: peak {r['peak']} > "
              f"budget {r['budget']} + output (and gradient) {r['out']} (model {r['model']})")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())

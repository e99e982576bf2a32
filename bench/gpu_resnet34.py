#!/usr/bin/env python
"""GPU benchmark of issue 5: torchvision ResNet-34 conv1..layer3 (frozen BN),
batch 1, forward + backward including a small head and loss, whole-image
PyTorch vs streamcnn, side by side in one run, with time and peak GPU
memory (torch.cuda.max_memory_allocated) per configuration.

    python bench/gpu_resnet34.py [--sizes 2048 4096 8192 16384 32768 65536]
        [--tile 1920 | --budget 8GB] [--reps 3] [--dtype fp32|bf16|fp16] [--cone]
        [--out results.json]

fp32 uses PyTorch's defaults (TF32 convolutions on), as the reference table
of the issue. Sizes from --uint8-from (default 32768) feed a uint8 image in
pinned host memory (on a GPU; the gather kernel reads each tile from it)
with per-tile normalisation (mean/std in the StreamingModule), the rest a
float32 image on the device. Whole-image runs that do not fit print "OOM". streamcnn runs
with halo caching (the default); --cone adds a column without it. The last
columns are the multiply-adds a streamed step actually executed (the C
core's counters, streamcnn.macs_executed) over those of a whole-image step
(the same gradients, one forward), with and without halo caching; then
the strips, and "model": the C memory model's peak of the streamed step
(largest tile's backward, strips, folded weights, parameter gradients,
sc_memory_info) plus the stem output, its gradient and the image where it
is on the device, to set against the measured peak (which also holds the
parameters, the head and cuDNN's workspace).
`--device cpu` runs the same code on the CPU (smoke test; small sizes only).
"""

import argparse
import json
import platform
import time

import torch
import torch.nn as nn
import torchvision

import streamcnn
from streamcnn._library import memory_info

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def build(device):
    torch.manual_seed(0)
    r = torchvision.models.resnet34(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2,
                         r.layer3).eval().to(device)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 2)).to(device)
    return stem, head


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device, reps):
    """Median seconds of `reps` steps after one warm-up, and peak memory (GPU:
    max_memory_allocated; CPU: None)."""
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times[len(times) // 2], peak


def run(args):
    device = torch.device(args.device)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    stem, head = build(device)
    params = list(stem.parameters()) + list(head.parameters())
    target = torch.tensor([1], device=device)
    rows = []
    for size in args.sizes:
        uint8 = size >= args.uint8_from
        g = torch.Generator(device="cpu").manual_seed(size)
        if uint8:
            image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=g)
        else:
            image = torch.randn(1, 3, size, size, generator=g)
        if uint8 and device.type == "cuda":  # stays in (pinned) host memory:
            image = image.pin_memory()        # tiles are streamed to the GPU
        else:
            image = image.to(device)
        norm = dict(mean=MEAN if uint8 else None, std=STD if uint8 else None)
        tiling = dict(memory_budget=args.budget) if args.budget else dict(tile_size=args.tile)
        sm = streamcnn.StreamingModule(stem, **tiling, **norm).to(device)
        if args.budget:  # the tile the budget gives (the forward sets it too)
            sm.tile_size = sm.budget_tile(1, size, size, autocast or torch.float32)["tile_size"]
        work = sm.work(size, size)
        t0, t1 = sm.tile_size

        def step_with(model):
            def step():
                for p in params:
                    p.grad = None
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out = head(model(image))
                loss = nn.functional.cross_entropy(out.float(), target)
                loss.backward()
            return step

        itemsize = 2 if autocast is not None else 4
        mask = [False] + [p.requires_grad for p in sm.stream_params()]
        bwd, _, strips = memory_info(sm.program, size, size, sm.tile_size, True, mask,
                                     itemsize)
        oh, ow = sm.tiling(size, size)["output"]
        on_device = image.numel() * image.element_size() if image.device == device else 0
        row = {"size": size, "tile": str(t0) if t0 == t1 else f"{t0}x{t1}", "uint8": uint8,
               "recompute": work["recompute"],
               "strips_gb": work["strip_elements"] * itemsize / 1e9,
               "model_gb": (bwd + strips + 2 * 256 * oh * ow * itemsize + on_device) / 1e9}
        models = [("whole", stem), ("stream", sm)]
        if args.cone:
            models.append(("cone", streamcnn.StreamingModule(
                stem, **tiling, **norm, halo_cache=False).to(device)))
        for name, model in models:
            if name == "whole" and (uint8 or size > args.whole_max):
                row[name] = None  # a uint8 image is the streamed path's input
                continue
            try:
                t, peak = measure(step_with(model), device, args.reps)
                row[name] = {"s": t, "peak_gb": peak / 1e9 if peak is not None else None}
                if name != "whole":  # executed multiply-adds of one step
                    streamcnn.macs_executed(reset=True)
                    step_with(model)()
                    sync(device)
                    f, bi, bw = streamcnn.macs_executed(reset=True)
                    row[name + "_macs"] = (f + bi + bw) / (work["macs_whole"] + bi + bw)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if "out of memory" not in str(e):
                    raise
                row[name] = "OOM"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        print_row(row, flush=True)
        del image
    return rows


def fmt(cell):
    if cell is None:
        return "          -"
    if cell == "OOM":
        return "        OOM"
    mem = f"{cell['peak_gb']:5.1f} GB" if cell["peak_gb"] is not None else "        "
    return f"{cell['s']:7.3f} s, {mem}"


def print_row(r, flush=False):
    def ratio(name):
        if isinstance(r.get("whole"), dict) and isinstance(r.get(name), dict):
            return f"{r[name]['s'] / r['whole']['s']:5.2f}x"
        return ""

    def macs(name):
        return f"{r[name + '_macs']:5.2f}x" if name + "_macs" in r else "     -"

    line = (f"| {r['size']:>6}² | {'uint8' if r['uint8'] else 'fp32 '} | {r['tile']:>4} | "
            f"{fmt(r['whole']):>19} | {fmt(r['stream']):>19} | {ratio('stream'):>6} | ")
    if "cone" in r:
        line += f"{fmt(r['cone']):>19} | {ratio('cone'):>6} | "
    line += f"{macs('stream')} | "
    if "cone" in r:
        line += f"{macs('cone')} | "
    print(line + f"{r['strips_gb']:6.2f} GB | {r['model_gb']:6.2f} GB |", flush=flush)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--tile", type=int, default=1920)
    ap.add_argument("--budget", help="memory_budget (e.g. 8GB) instead of --tile: each size "
                                     "gets the tile the budget gives")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--uint8-from", type=int, default=32768)
    ap.add_argument("--whole-max", type=int, default=16384,
                    help="largest size tried whole-image")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cone", action="store_true",
                    help="also run without halo caching (each tile's cone recomputed)")
    ap.add_argument("--out", help="also write the rows as JSON")
    args = ap.parse_args()
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.machine()}"
    print(f"# ResNet-34 conv1..layer3, batch 1, fwd+bwd, {args.dtype}; {card}; torch "
          f"{torch.__version__}; median of {args.reps} after a warm-up")
    head = ("| image   | input | tile |   whole-image PyTorch |             streamcnn | ratio  | ")
    rule = "|---------|-------|------|---------------------|---------------------|--------|"
    if args.cone:
        head += "  streamcnn, no cache | ratio  | "
        rule += "---------------------|--------|"
    head += "MACs/whole | "
    rule += "-----------|"
    if args.cone:
        head += "no cache | "
        rule += "---------|"
    print(head + "strips   | model    |")
    print(rule + "----------|----------|")
    rows = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "args": vars(args),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""GPU benchmark of issue 5: torchvision ResNet-34 conv1..layer3 (frozen BN),
batch 1, forward + backward including a small head and loss, whole-image
PyTorch vs streamcnn, side by side in one run, with time and peak GPU
memory (torch.cuda.max_memory_allocated) per configuration.

    python bench/gpu_resnet34.py [--sizes 2048 4096 8192 16384 32768 65536]
        [--tile 1920 | --budget 8GB] [--reps 3] [--dtype fp32|bf16|fp16] [--cone]
        [--out results.json]

fp32 uses PyTorch's defaults (TF32 convolutions on), as the reference table
of the issue. Columns: whole-image PyTorch on a float32 image on the device
("OOM" where it does not fit); streamcnn on the same image; streamcnn on a
uint8 image in pinned host memory (the target user's setting: the gather
kernel reads each tile from it and normalises with the StreamingModule's
mean/std, and the image takes no GPU memory), each with its ratio to
whole-image time. Sizes from --uint8-from (default 32768) have the host
column alone. streamcnn runs with halo caching (the default); --cone adds
a column without it. Then the multiply-adds a streamed step actually
executed (the C core's counters, streamcnn.macs_executed) over those of a
whole-image step (the same gradients, one forward), with and without halo
caching; the strips; and "model": the C memory model's peak of the
streamed step (step_model: the larger of the tile's forward and backward,
the strips, folded weights, parameter gradients, and one stem-output-sized
tensor, the output and then its gradient: the head's average pooling runs
as a mean, which keeps nothing), for the host image / with the device
image added, to set against the measured peaks (which also hold the
parameters, the head and cuDNN's workspace).
`--device cpu` runs the same code on the CPU (smoke test; small sizes
only); its peaks are those of PyTorch's CPU allocator during a step (from
the profiler's memory events), above what was live before it: without the
parameters and a device image.
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


def cpu_allocator_peak(step):
    """Peak bytes live in PyTorch's CPU allocator during step() above what
    was live before it, from the profiler's memory events (+ per
    allocation, - per free)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(step, device, reps, warmup=1):
    """Median seconds of `reps` steps after `warmup` warm-up steps; peak
    memory (GPU: max_memory_allocated over the timed steps, so with the
    parameters and a device image; CPU: the allocator's peak during one
    more, profiled step, above what was live before it); the C core's
    multiply-add counters over the last timed step (forward, input
    gradients, weight gradients)."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        sync(device)
        streamcnn.macs_executed(reset=True)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    macs = streamcnn.macs_executed(reset=True)
    times.sort()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = cpu_allocator_peak(step)
    return times[len(times) // 2], peak, macs


def training_step(model, head, image, target, autocast=None):
    """One benchmarked step as a function: the parameters' gradients of the
    stem and head cleared, head(model(image)) under autocast (a dtype, or
    None for none), cross-entropy against target, backward."""
    params = list(model.parameters()) + list(head.parameters())
    device = target.device

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = head(model(image))
        nn.functional.cross_entropy(out.float(), target).backward()
    return step


def step_model(info, out_bytes):
    """The C memory model's peak of a streamed training step with this
    benchmark's head (bytes, image on the host): the larger of the tile's
    forward and backward peaks (sc_memory_info's, with the bands, folded
    weights and parameter gradients), the strips, and one stem-output-sized
    tensor: the output in the forward, its gradient in the backward. The
    head never holds the output: AdaptiveAvgPool2d(1) runs as a mean, which
    saves nothing for its backward. info: memory_info(...) = [backward,
    forward, strips]."""
    bwd, fwd, strips = info
    return max(bwd, fwd) + strips + out_bytes


def make_image(size, uint8, device):
    """Random image of one size: uint8 in (pinned, on a GPU) host memory,
    the streamed path's input, else float32 on the device. A uint8 image
    over 1 GB repeats one random band of 2048 rows (drawing 12.9 GB of
    random bytes takes ~40 s, copying the band ~5 s; the timing does not
    depend on the pixels) and is allocated pinned in place."""
    g = torch.Generator(device="cpu").manual_seed(size)
    if not uint8:
        return torch.randn(1, 3, size, size, generator=g).to(device)
    pin = device.type == "cuda"
    if 3 * size * size <= 1e9:
        image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=g)
        return image.pin_memory() if pin else image
    image = torch.empty((1, 3, size, size), dtype=torch.uint8, pin_memory=pin)
    band = torch.randint(0, 256, (1, 3, 2048, size), dtype=torch.uint8, generator=g)
    for r in range(0, size, 2048):
        n = min(2048, size - r)
        image[:, :, r:r + n] = band[:, :, :n]
    return image


def run(args):
    device = torch.device(args.device)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    stem, head = build(device)
    target = torch.tensor([1], device=device)
    itemsize = 2 if autocast is not None else 4
    rows = []
    for size in args.sizes:
        host_only = size >= args.uint8_from
        images = {"host": make_image(size, True, device)}
        if not host_only:
            images["device"] = make_image(size, False, device)
        tiling = dict(memory_budget=args.budget) if args.budget else dict(tile_size=args.tile)

        def streaming(on, **kw):
            norm = dict(mean=MEAN, std=STD) if on == "host" else {}
            return streamcnn.StreamingModule(stem, **tiling, **norm, **kw).to(device)

        sm = streaming("host")
        if args.budget:  # the tile the budget gives (the forward sets it too)
            sm.tile_size = sm.budget_tile(1, size, size, autocast or torch.float32)["tile_size"]
        work = sm.work(size, size)
        t0, t1 = sm.tile_size

        mask = [False] + [p.requires_grad for p in sm.stream_params()]
        oh, ow = sm.tiling(size, size)["output"]
        # + under autocast the parameters' half copies (the op sums their
        # gradients in float32: in memory_info)
        model = step_model(memory_info(sm.program, size, size, sm.tile_size, True, mask,
                                       itemsize, device.type == "cpu"),
                           256 * oh * ow * itemsize) + sm._cast_bytes(autocast or torch.float32)
        row = {"size": size, "tile": str(t0) if t0 == t1 else f"{t0}x{t1}",
               "uint8": host_only, "recompute": work["recompute"],
               "strips_gb": work["strip_elements"] * itemsize / 1e9,
               "model_gb": model / 1e9,
               "image_gb": 3 * size * size * 4 / 1e9 if not host_only else 0.0}
        configs = [("whole", stem, "device"), ("stream", sm if host_only else streaming(
            "device"), "device"), ("host", sm, "host")]
        if args.cone:
            configs.append(("cone", streaming("device", halo_cache=False), "device"))
        for name, model, on in configs:
            if on not in images or (name == "whole" and size > args.whole_max):
                row[name] = None
                continue
            image = images[on]
            try:
                step = training_step(model, head, image, target, autocast)
                t, peak, (f, bi, bw) = measure(step, device, args.reps, args.warmup)
                row[name] = {"s": t, "peak_gb": peak / 1e9}
                if name != "whole":  # executed multiply-adds of one step
                    row[name + "_macs"] = (f + bi + bw) / (work["macs_whole"] + bi + bw)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if "out of memory" not in str(e):
                    raise
                row[name] = "OOM"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        print_row(row, args.cone, flush=True)
        del images
    return rows


def fmt(cell):
    if cell is None:
        return "          -"
    if cell == "OOM":
        return "        OOM"
    mem = f"{cell['peak_gb']:5.2f} GB"
    return f"{cell['s']:7.3f} s, {mem}"


def print_row(r, cone, flush=False):
    def ratio(name):
        if isinstance(r.get("whole"), dict) and isinstance(r.get(name), dict):
            return f"{r[name]['s'] / r['whole']['s']:5.2f}x"
        return ""

    def macs(name):
        return f"{r[name + '_macs']:5.2f}x" if name + "_macs" in r else "     -"

    line = f"| {r['size']:>6}² | {r['tile']:>4} | {fmt(r['whole']):>20} | "
    for name in ("stream", "host") + (("cone",) if cone else ()):
        line += f"{fmt(r.get(name)):>20} | {ratio(name):>6} | "
    line += f"{macs('host'):>10} | "
    if cone:
        line += f"{macs('cone'):>8} | "
    model = f"{r['model_gb']:5.2f}"
    if r["image_gb"]:
        model += f" / {r['model_gb'] + r['image_gb']:5.2f}"
    print(line + f"{r['strips_gb']:5.2f} GB | {model:>14} GB |", flush=flush)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--tile", type=int, default=1920)
    ap.add_argument("--budget", help="memory_budget (e.g. 8GB) instead of --tile: each size "
                                     "gets the tile the budget gives")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps before the timed ones (0: a smoke run)")
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
          f"{torch.__version__}; median of {args.reps} after {args.warmup} warm-up steps")
    head = ("| image   | tile |  whole-image PyTorch | streamcnn, dev. fp32 | ratio  | "
            "streamcnn, host u8   | ratio  | ")
    rule = "|---------|------|----------------------|----------------------|--------|" \
           "----------------------|--------|"
    if args.cone:
        head += "no cache, dev. fp32  | ratio  | "
        rule += "----------------------|--------|"
    head += "MACs/whole | "
    rule += "------------|"
    if args.cone:
        head += "no cache | "
        rule += "----------|"
    print(head + "strips   | model host / dev. |")
    print(rule + "----------|-------------------|")
    rows = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "args": vars(args),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Where the time of a training step goes (issue 5): torch.profiler over one
step of the GPU benchmark's network (ResNet-34 conv1..layer3, frozen BN,
batch 1, fwd+bwd with the head and loss), whole-image PyTorch and streamcnn
(uint8 image in pinned host memory, halo caching) side by side, after a
warm-up. Prints, per mode, the step's wall time under the profiler, the
summed device time by operator (top --top), and the device time of the
step's kernels grouped by name: convolutions (cuDNN), streamcnn's own tile
kernels (sc_copy_kernel, sc_gather_kernel), copies and fills, elementwise
and reductions (ReLU, masks, pooling, batch norm), other.

    python bench/gpu_profile.py [--size 8192] [--tile 1920] [--top 20] [--trace DIR]

`--device cpu` runs it on the CPU (CPU times; a smoke test).
"""

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_resnet34 as bench  # noqa: E402

import streamcnn  # noqa: E402

GROUPS = [  # device kernel name fragments -> group, first match wins
    ("streamcnn", ("sc_copy_kernel", "sc_gather_kernel")),
    ("convolution", ("conv", "cudnn", "implicit", "wgrad", "dgrad", "fprop", "xmma",
                     "gemm", "winograd", "fft")),
    ("copy", ("memcpy", "memset", "copy", "fill")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "pool", "threshold", "where",
                     "masked", "max", "batch_norm", "bn_")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile_step(step, device, top):
    """One profiled step after a warm-up: its wall time, the operator
    table, and on a GPU the device time (s) of its kernels and copies by
    group (from the profiler's device events)."""
    step()  # warm-up (libraries, cuDNN plans)
    bench.sync(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        bench.sync(device)
        wall = time.perf_counter() - t0
    table = prof.key_averages().table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=top)
    groups = {}
    if cuda:
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == torch.autograd.DeviceType.CUDA:
                g = group_of(e.name())
                groups[g] = groups.get(g, 0.0) + e.duration_ns() / 1e9
    return wall, table, groups, prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tile", type=int, default=1920)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trace", help="also write Chrome traces (whole.json, stream.json) here")
    args = ap.parse_args()
    device = torch.device(args.device)
    stem, head = bench.build(device)
    target = torch.tensor([1], device=device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# ResNet-34 conv1..layer3, {args.size}², tile {args.tile}, batch 1, fwd+bwd, "
          f"fp32 (TF32 as PyTorch's default); {card}; torch {torch.__version__}")
    whole_image = bench.make_image(args.size, False, device)
    host_image = bench.make_image(args.size, True, device)
    sm = streamcnn.StreamingModule(stem, args.tile, mean=bench.MEAN, std=bench.STD).to(device)
    print(f"# streamcnn tiles {sm.tiling(args.size, args.size)['tiles']}")

    summary = []
    for name, model, image in (("whole", stem, whole_image), ("stream", sm, host_image)):
        try:
            step = bench.training_step(model, head, image, target)
            wall, table, groups, prof = profile_step(step, device, args.top)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if "out of memory" not in str(e):
                raise
            print(f"\n## {name}: out of memory")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"\n## {name}: {wall:.3f} s under the profiler")
        print(table)
        if groups:
            total = sum(groups.values())
            print(f"device time {total:.3f} s: " + ", ".join(
                f"{g} {t:.3f} s ({100 * t / total:.0f}%)"
                for g, t in sorted(groups.items(), key=lambda kv: -kv[1])))
        summary.append((name, wall, groups))
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace, f"{name}.json"))
    names = [g for g, _ in GROUPS] + ["other"]
    print("\n| mode | wall (profiled) | device total | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for name, wall, groups in summary:
        if not groups:  # CPU: no device events
            print(f"| {name} | {wall:.3f} s |" + " - |" * (len(names) + 1))
            continue
        cells = [f"{groups.get(g, 0.0):.3f} s" for g in names]
        print(f"| {name} | {wall:.3f} s | {sum(groups.values()):.3f} s | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

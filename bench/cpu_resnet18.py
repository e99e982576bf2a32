#!/usr/bin/env python
"""CPU benchmark: torchvision ResNet-18 conv1..layer2 (frozen BN), fp32,
batch 1, forward + backward including a small head and loss (--model
densenet121: DenseNet-121 conv0..denseblock2, whose dense layers join
their features with torch.cat, the cat instruction; --model inception_v3:
Inception-v3 Conv2d_1a_3x3..Mixed_5d, whose blocks pool with F.avg_pool2d
and join branches with torch.cat; --model shufflenet_v2_x1_0: ShuffleNetV2
1.0 conv1..stage3, whose blocks split and shuffle the channels, the
channels instruction; --model googlenet: GoogLeNet conv1..inception4e,
ceil_mode max pools and cats; --model vgg16_bn: VGG-16-BN up to its third
max pool, full-resolution 3 x 3 convolutions of 64 .. 256 channels;
--model regnet_x_800mf: RegNetX-800MF stem..block3, grouped bottlenecks);
whole-image
PyTorch vs streamcnn with halo caching (``stream``, the default) and
without (``cone``: each tile recomputes its whole cone in the backward).
Every measurement runs in a fresh process (peak RSS
is per process) and each mode is measured in --runs processes, alternating,
since the whole-image peak alone varies by ~15% between processes (glibc
heap layout). Prints medians side by side with ratios, and the ranges.

    python bench/cpu_resnet18.py [--size 1536] [--tile 512] [--reps 3] [--runs 3]
                                 [--warmup 1]
                                 [--model resnet18|densenet121|inception_v3|shufflenet_v2_x1_0|
                                          googlenet|vgg16_bn|regnet_x_800mf]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


MODELS = {"resnet18": "ResNet-18 conv1..layer2", "densenet121": "DenseNet-121 conv0..denseblock2",
          "inception_v3": "Inception-v3 Conv2d_1a_3x3..Mixed_5d",
          "shufflenet_v2_x1_0": "ShuffleNetV2 1.0 conv1..stage3",
          "googlenet": "GoogLeNet conv1..inception4e", "vgg16_bn": "VGG-16-BN features[:24]",
          "regnet_x_800mf": "RegNetX-800MF stem..block3"}
# the application's models: (stream_upto, the stem's output channels)
_PARTS = {"googlenet": ("inception4e", 832), "vgg16_bn": (24, 256),
          "regnet_x_800mf": ("block3", 288)}


def child(mode: str, size: int, tile: int, reps: int, warmup: int, threads: int,
          model: str = "resnet18") -> dict:
    import torch
    import torch.nn as nn
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model == "densenet121":
        f = torchvision.models.densenet121(weights=None).features
        stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0, f.denseblock1, f.transition1,
                             f.denseblock2).eval()
        channels = 512
    elif model == "inception_v3":
        m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        names = [n for n, _ in m.named_children()]
        stem = nn.Sequential(*[getattr(m, n) for n in names[:names.index("Mixed_5d") + 1]]).eval()
        channels = 288
    elif model == "shufflenet_v2_x1_0":
        s = torchvision.models.shufflenet_v2_x1_0(weights=None)
        stem = nn.Sequential(s.conv1, s.maxpool, s.stage2, s.stage3).eval()
        channels = 232
    elif model in _PARTS:
        from streamcnn.classifier import _stem_layers
        upto, channels = _PARTS[model]
        # the stem alone in memory: the rest (VGG's 120M-parameter
        # classifier) made without weights
        stem = _stem_layers(model, upto).eval()
        stem.to_empty(device="cpu")
        for m in stem.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()      # the default initialisation, BN 0 / 1
    else:
        r = torchvision.models.resnet18(weights=None)
        stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2).eval()
        channels = 128
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2))
    if mode in ("stream", "cone"):
        import streamcnn
        stem = streamcnn.StreamingModule(stem, tile, halo_cache=mode == "stream")
    x = torch.randn(1, 3, size, size)
    target = torch.tensor([1])
    params = list(stem.parameters()) + list(head.parameters())

    def step():
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(head(stem(x)), target)
        loss.backward()
        return loss.item()

    for _ in range(warmup):  # allocator, oneDNN primitives
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"mode": mode, "time_s": times[len(times) // 2], "min_s": times[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1536)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps before them (0: a smoke run)")
    ap.add_argument("--runs", type=int, default=3, help="processes per mode")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model", choices=list(MODELS), default="resnet18")
    ap.add_argument("--child", choices=["whole", "stream", "cone"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.size, a.tile, a.reps, a.warmup, a.threads, a.model)))
        return
    runs = {"whole": [], "stream": [], "cone": []}
    for _ in range(a.runs):
        for mode in runs:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--size",
                                  str(a.size), "--tile", str(a.tile), "--reps", str(a.reps),
                                  "--warmup", str(a.warmup), "--threads", str(a.threads),
                                  "--model", a.model],
                                 check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    import statistics

    import torch
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("time_s", "peak_rss_mb")}
           for m, rs in runs.items()}
    print(f"# {MODELS[a.model]}, fp32, batch 1, fwd+bwd, {a.size}x{a.size}, "
          f"tile {a.tile}; torch {torch.__version__}, {a.threads} threads, "
          f"{platform.processor() or platform.machine()}; median of {a.runs} processes "
          f"x {a.reps} steps")
    print(f"| {'mode':8} | {'time':>9} | {'range':>15} | {'peak RSS':>9} | {'range':>13} |")
    print(f"|{'-' * 10}|{'-' * 11}|{'-' * 17}|{'-' * 11}|{'-' * 15}|")
    for m, rs in runs.items():
        t = [r["time_s"] for r in rs]
        p = [r["peak_rss_mb"] for r in rs]
        print(f"| {m:8} | {med[m]['time_s']:7.3f} s | {min(t):6.3f}-{max(t):6.3f} s | "
              f"{med[m]['peak_rss_mb']:6.0f} MB | {min(p):5.0f}-{max(p):5.0f} MB |")
    w = med["whole"]
    for m in ("stream", "cone"):
        s_ = med[m]
        print(f"| {m + '/whole':8} | {s_['time_s'] / w['time_s']:8.2f}x | {'':15} | "
              f"{s_['peak_rss_mb'] / w['peak_rss_mb']:8.2f}x | {'':13} |")


if __name__ == "__main__":
    main()

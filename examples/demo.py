#!/usr/bin/env python
"""streamcnn demo: train a ResNet-18 stem + head end to end on synthetic
multi-megapixel images, streamed tile by tile and, for comparison, as a
whole-image pass. Both runs start from the same weights and see the same
images, so their losses agree step by step (up to float32 rounding); the
streamed run needs a fraction of the memory.

    python examples/demo.py [--size 2048] [--tile 768] [--steps 4] [--device cpu]

Each mode runs in its own process so that peak memory is its own.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def synthetic_image(size: int, label: int, seed: int):
    """A tissue-like texture; class 1 adds a cluster of small dark blobs
    (a 'tumour') somewhere in the image."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, size // 64, size // 64, generator=g)
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    img = 0.7 * img + 0.3 * torch.rand(1, 3, size, size, generator=g)
    if label:
        cy, cx = (torch.randint(size // 8, size - size // 8, (2,), generator=g)).tolist()
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        for _ in range(12):
            dy, dx = (torch.randn(2, generator=g) * size / 40).tolist()
            r2 = (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2
            img[0, :, r2 < (size / 200) ** 2] *= 0.3
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (img - mean) / std


def run(mode: str, size: int, tile: int, steps: int, device: str) -> dict:
    import torch
    import torch.nn as nn
    import torchvision

    torch.manual_seed(0)
    r = torchvision.models.resnet18(weights=None)
    # the stem to stream: conv1 .. layer2, batch norm frozen (eval)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2).eval()
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, 2))
    if mode == "streamed":
        import streamcnn
        stem = streamcnn.StreamingModule(stem, tile)
    stem.to(device)
    head.to(device)
    params = list(stem.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    data = [(synthetic_image(size, label, seed=label), label) for label in (0, 1)]

    losses, times = [], []
    for step in range(steps):
        x, label = data[step % 2]
        x, y = x.to(device), torch.tensor([label], device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(stem(x)), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    out = {"mode": mode, "losses": losses, "step_s": min(times[1:] or times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="image edge in pixels")
    ap.add_argument("--tile", type=int, default=768, help="streamcnn tile_size")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--child", choices=["streamed", "whole-image"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run(a.child, a.size, a.tile, a.steps, a.device)))
        return

    print(f"streamcnn demo: ResNet-18 conv1..layer2 + max-pool/linear head, "
          f"{a.size}x{a.size} RGB ({a.size * a.size / 1e6:.1f} MP), {a.steps} SGD steps, "
          f"tile_size {a.tile}, {a.device}")
    rows = []
    for mode in ("streamed", "whole-image"):
        print(f"  running {mode} ...", flush=True)
        res = subprocess.run([sys.executable, __file__, "--child", mode, "--size", str(a.size),
                              "--tile", str(a.tile), "--steps", str(a.steps),
                              "--device", a.device], capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:])
            sys.exit(f"demo: the {mode} run failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print()
    mem = "peak GPU" if a.device == "cuda" else "peak RSS"
    print(f"| {'mode':11} | {'losses per step':38} | {'s/step':>7} | {mem:>9} |")
    print(f"|{'-' * 13}|{'-' * 40}|{'-' * 9}|{'-' * 11}|")
    for r in rows:
        losses = " ".join(f"{v:.5f}" for v in r["losses"])
        m = r.get("peak_gpu_mb", r["peak_rss_mb"])
        print(f"| {r['mode']:11} | {losses:38} | {r['step_s']:7.2f} | {m:6.0f} MB |")
    s, w = rows
    diff = max(abs(p - q) for p, q in zip(s["losses"], w["losses"]))
    print(f"\nlargest loss difference streamed vs whole-image: {diff:.2e} (float32)")
    print(f"streamed/whole-image: time {s['step_s'] / w['step_s']:.2f}x, memory "
          f"{s.get('peak_gpu_mb', s['peak_rss_mb']) / w.get('peak_gpu_mb', w['peak_rss_mb']):.2f}x")
    if diff > 1e-3:
        sys.exit("demo: the streamed and whole-image losses disagree")


if __name__ == "__main__":
    main()

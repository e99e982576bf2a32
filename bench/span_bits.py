#!/usr/bin/env python
"""Which results survive a change of span bit for bit: ATen's convolution
on a sub-box of its input against the same positions of the whole-span
call (forward, input gradient, weight gradient of a gradient that is zero
outside the sub-box), and the weight gradient over the whole span with the
input zeroed where the gradient is zero; then streamcnn itself: the
streamed forward against whole-image PyTorch, and the backward with the
sparse backward on, skip-only and off.

Why it matters (issue 19): a restricted or boxed tile runs the same ATen
ops over smaller spans than the dense tile. If ATen's result at a position
depended only on the values it sums, the restricted backward would equal
the dense one bit for bit (zeros add nothing); the table shows it does
not: the sums are blocked (and, for the weight gradient, reduced) by span
size, so the order of the non-zero terms changes. Skipping a tile changes
no span, and is bit-identical.

Environment: STREAMCNN_SPARSE_BACKWARD is set by the script.

    python bench/span_bits.py [--threads N]
"""

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import streamcnn


def ulps(a, b):
    """Largest |a - b| in units of the last place of max |b| (0: equal)."""
    d = (a - b).abs().max().item()
    if d == 0:
        return 0.0
    scale = b.abs().max().item()
    return d / (torch.finfo(b.dtype).eps * scale)


def conv_rows(dtype):
    """(case, forward, input grad, weight grad, weight grad zero-filled)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for cin, cout, k, stride, size in ((64, 64, 3, 1, 56), (64, 128, 1, 1, 40),
                                       (3, 64, 7, 2, 96), (128, 128, 3, 1, 28)):
        p = k // 2
        x = torch.randn(1, cin, size, size, dtype=dtype, generator=g)
        w = torch.randn(cout, cin, k, k, dtype=dtype, generator=g) / (cin * k * k) ** 0.5
        y = F.conv2d(x, w, stride=stride, padding=p)
        oh = y.shape[2]
        r0, r1 = oh // 4, oh // 4 + oh // 3  # an interior output box
        gout = torch.zeros_like(y)
        gout[:, :, r0:r1, r0:r1] = torch.randn(1, cout, r1 - r0, r1 - r0, dtype=dtype,
                                               generator=g)
        # the input box those outputs read (no padding reaches it)
        i0, i1 = r0 * stride - p, (r1 - 1) * stride - p + k
        xs = x[:, :, i0:i1, i0:i1].contiguous()
        gs = gout[:, :, r0:r1, r0:r1].contiguous()
        xf = x.clone().requires_grad_()
        wf = w.clone().requires_grad_()
        dxf, dwf = torch.autograd.grad(F.conv2d(xf, wf, stride=stride, padding=p), (xf, wf),
                                       gout)
        xsr = xs.clone().requires_grad_()
        wsr = w.clone().requires_grad_()
        ys = F.conv2d(xsr, wsr, stride=stride)
        dxs, dws = torch.autograd.grad(ys, (xsr, wsr), gs)
        xz = torch.zeros_like(x)
        xz[:, :, i0:i1, i0:i1] = xs
        wz = w.clone().requires_grad_()
        dwz = torch.autograd.grad(F.conv2d(xz, wz, stride=stride, padding=p), wz, gout)[0]
        rows.append((f"conv {k}x{k}/{stride} {cin}->{cout}, {size}² vs {i1 - i0}²",
                     ulps(ys.detach(), y[:, :, r0:r1, r0:r1]),
                     ulps(dxs, dxf[:, :, i0:i1, i0:i1]), ulps(dws, dwf), ulps(dwz, dwf)))
    return rows


def streamcnn_rows(dtype):
    """The streamed forward vs whole-image PyTorch, and the sparse backward
    (on / skip) vs the dense streamed backward, max-pool head."""
    torch.manual_seed(0)
    r = torchvision.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1).eval().to(dtype)
    x = torch.randn(1, 3, 256, 256, dtype=dtype)
    rows = []
    with torch.no_grad():
        whole = stem(x)
    for hc in (True, False):
        sm = streamcnn.StreamingModule(stem, 64, halo_cache=hc)
        grads = {}
        for mode in ("0", "skip", "1"):
            os.environ["STREAMCNN_SPARSE_BACKWARD"] = mode
            sm.zero_grad()
            xi = x.clone().requires_grad_()
            y = sm(xi)
            loss = (y.amax(dim=(2, 3)) * torch.linspace(-1, 1, y.shape[1],
                                                        dtype=dtype)).sum()
            streamcnn.backward_tiles(reset=True)
            loss.backward()
            grads[mode] = [xi.grad] + [p.grad.clone() for p in sm.parameters()]
            tiles = streamcnn.backward_tiles(reset=True)
            if mode == "0":
                fwd = ulps(y.detach(), whole)
            else:
                worst = max(ulps(a, b) for a, b in zip(grads[mode], grads["0"]))
                same = all(torch.equal(a, b) for a, b in zip(grads[mode], grads["0"]))
                rows.append((f"backward, halo cache {'on' if hc else 'off'}, sparse "
                             f"{'skip' if mode == 'skip' else 'on'} vs off "
                             f"(whole/boxed/restricted/skipped "
                             f"{tiles['whole']}/{tiles['boxed']}/"
                             f"{tiles.get('restricted', 0)}/{tiles['skipped']})",
                             same, worst))
        rows.insert(0, (f"forward, halo cache {'on' if hc else 'off'}, vs whole image",
                        fwd == 0.0, fwd))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print("# ATen on a sub-box vs the whole span: largest difference in ulps of the "
          "largest magnitude (0 = bit-identical)")
    print("| dtype | case | forward | input grad | weight grad | weight grad, whole span, "
          "input zeroed outside |")
    print("|---|---|--:|--:|--:|--:|")
    for dt in (torch.float32, torch.float64):
        for case, f, dx, dw, dwz in conv_rows(dt):
            print(f"| {str(dt)[6:]} | {case} | {f:.2f} | {dx:.2f} | {dw:.2f} | {dwz:.2f} |")
    print()
    print("# streamcnn, ResNet-18 conv1..layer1 (frozen BN), 256², tile 64, batch 1, "
          "max-pool head")
    print("| dtype | comparison | bit-identical | largest difference (ulps) |")
    print("|---|---|---|--:|")
    for dt in (torch.float32, torch.float64):
        for case, same, worst in streamcnn_rows(dt):
            print(f"| {str(dt)[6:]} | {case} | {'yes' if same else 'no'} | {worst:.2f} |")


if __name__ == "__main__":
    main()

"""No leaks: 10^4 forward+backward calls keep resident memory flat and
release every tensor reference the kernels received."""

import resource
import time

import torch
import torch.nn as nn

import streamcnn


def _resident_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def test_10k_forward_backward_calls_keep_rss_flat():
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 1, 1),
                         nn.Conv2d(4, 4, 3)).eval()
    sm = streamcnn.StreamingModule(stem, 14)  # 3 x 3 tiles on a 15 x 14 image
    assert sm.tiling(15, 14)["tiles"] == (3, 3)
    x = torch.randn(2, 3, 15, 14, requires_grad=True)
    params = sm.stream_params()
    uses = [t._use_count() for t in [x, *params]]

    def step():
        y = sm(x)
        y.square().sum().backward()

    for _ in range(1000):  # warm-up: allocator caches, autograd structures
        step()
    before = _resident_kb()
    t0 = time.perf_counter()
    for _ in range(10_000):
        step()
    elapsed = time.perf_counter() - t0
    after = _resident_kb()
    x.grad = None
    stem.zero_grad(set_to_none=True)
    assert [t._use_count() for t in [x, *params]] == uses
    assert after - before < 8_000, (
        f"resident memory grew by {after - before} kB over 10^4 calls ({elapsed:.1f} s)")

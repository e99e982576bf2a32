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


def test_2k_forward_backward_calls_keep_rss_flat():
    """2000 calls grow the resident set by under 1.5 MB: a leak of 0.75 kB
    or more per call shows (a 1 kB tensor kept per call grew it by 6.7 MB
    over 4000 calls; none: 0.1-0.3 MB; 2026-12-07). It ran 10^4 calls with
    an 8 MB bound, then 4000 with 3 MB: the same sensitivity in 5x and 2x
    the time."""
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

    for _ in range(500):  # warm-up: allocator caches, autograd structures
        step()
    before = _resident_kb()
    t0 = time.perf_counter()
    for _ in range(2000):
        step()
    elapsed = time.perf_counter() - t0
    after = _resident_kb()
    x.grad = None
    stem.zero_grad(set_to_none=True)
    assert [t._use_count() for t in [x, *params]] == uses
    assert after - before < 1_500, (
        f"resident memory grew by {after - before} kB over 2000 calls ({elapsed:.1f} s)")


def test_cone_path_and_failed_cached_calls_release_everything():
    """halo_cache=False (forward + cone backward) and backward_cached calls
    that fail on bad strips: flat memory, every reference released."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3)).eval()
    sm = streamcnn.StreamingModule(stem, 10, halo_cache=False)
    x = torch.randn(1, 3, 21, 19, requires_grad=True)
    params = sm.stream_params()
    detached = [p.detach() for p in params]
    y, strips = torch.ops.streamcnn.forward_cached(x.detach(), detached, sm.program,
                                                   sm.tile_size)
    g = torch.randn_like(y)
    bad = strips[:-1].clone()
    mask = [True] + [True] * len(params)
    uses = [t._use_count() for t in [x, *params, g, bad, *detached]]

    def step():
        sm(x).square().sum().backward()
        try:
            torch.ops.streamcnn.backward_cached(g, bad, x.detach(), detached, sm.program,
                                                sm.tile_size, mask)
        except RuntimeError as e:
            assert "strips must be" in str(e)
        else:
            raise AssertionError("bad strips were accepted")

    for _ in range(200):
        step()
    before = _resident_kb()
    for _ in range(1500):  # 2.7 kB a call shows, as with 3000 calls and 8 MB
        step()
    after = _resident_kb()
    x.grad = None
    stem.zero_grad(set_to_none=True)
    assert [t._use_count() for t in [x, *params, g, bad, *detached]] == uses
    assert after - before < 4_000, f"resident memory grew by {after - before} kB"


def test_half_values_with_float32_batch_norms_and_refusals_release_everything():
    """float16 values with float32 batch-norm parameters (the mixed-dtype
    batch-norm forward and backward, a frozen batch-norm weight included),
    and calls refused for a batch norm of two dtypes or a sparse image."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval().half()
    stem[1].float()
    stem[4].float()
    stem[4].weight.requires_grad_(False)
    sm = streamcnn.StreamingModule(stem, 10)
    x = torch.randn(1, 3, 21, 19, dtype=torch.float16, requires_grad=True)
    params = sm.stream_params()
    two_dtypes = [p.detach() for p in params]
    two_dtypes[5] = two_dtypes[5].half()  # the first batch norm's running_var
    sparse = x.detach().to_sparse()
    uses = [t._use_count() for t in [x, *params, *two_dtypes, sparse]]

    def step():
        sm(x).float().square().sum().backward()
        for image, ps, msg in ((x.detach(), two_dtypes, "running_var"),
                               (sparse, params, "dense")):
            try:
                torch.ops.streamcnn.forward(image, ps, sm.program, sm.tile_size)
            except RuntimeError as e:
                assert msg in str(e)
            else:
                raise AssertionError("a bad call was accepted")

    for _ in range(100):
        step()
    before = _resident_kb()
    for _ in range(1000):
        step()
    after = _resident_kb()
    x.grad = None
    stem.zero_grad(set_to_none=True)
    assert [t._use_count() for t in [x, *params, *two_dtypes, sparse]] == uses
    assert after - before < 8_000, f"resident memory grew by {after - before} kB"

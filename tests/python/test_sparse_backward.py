"""The exact sparse backward (op/sparse.c): a tile whose output gradient is
all zeros (and that receives no non-zero halo gradient) is skipped, a
sparse one back-propagates only the cones of a few boxes around its
non-zeros. STREAMCNN_SPARSE_BACKWARD=0 turns it off, =skip skips tiles only.
Oracles: the same backward without sparsity, and whole-image autograd in
float64."""

import contextlib
import os

import pytest
import torch
import torch.nn as nn

import streamcnn


@contextlib.contextmanager
def sparse_mode(value):
    old = os.environ.get("STREAMCNN_SPARSE_BACKWARD")
    os.environ["STREAMCNN_SPARSE_BACKWARD"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["STREAMCNN_SPARSE_BACKWARD"]
        else:
            os.environ["STREAMCNN_SPARSE_BACKWARD"] = old


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def _stem(dtype):
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.MaxPool2d(3, 2, 1), Block(8),
                         nn.Conv2d(8, 12, 3, stride=2, padding=1))
    for m in stem.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return stem.eval().to(dtype)


def _loss(y, head, w):
    if head == "max":  # the paper's global max pool: one location per channel
        return (y.amax(dim=(2, 3)) * w).sum()
    if head == "avg":  # dense
        return (y.mean(dim=(2, 3)) * w).sum()
    # a single output pixel
    return (y[:, :, 5, 7] * w).sum()


def _grads(stem, x, head, mode, halo_cache=True, tile=64, channels_last=False):
    sm = streamcnn.StreamingModule(stem, tile, halo_cache=halo_cache)
    x = x.clone().requires_grad_(True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    sm.zero_grad()
    y = sm(x)
    w = torch.linspace(-1.0, 1.0, y.shape[1], dtype=y.dtype)
    with sparse_mode(mode):
        streamcnn.macs_executed(reset=True)
        streamcnn.backward_tiles(reset=True)
        _loss(y, head, w).backward()
        macs = streamcnn.macs_executed(reset=True)
        tiles = streamcnn.backward_tiles(reset=True)
    return [x.grad] + [p.grad.clone() for p in stem.parameters()], macs, tiles


def _image(n, dtype, size=160):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size, dtype=dtype)


def _pair(dtype, mode, halo_cache, channels_last):
    """A max-pool head's gradients of a batch of 2: without sparsity, in mode."""
    stem, x = _stem(dtype), _image(2, dtype)
    return (stem, x, _grads(stem, x, "max", "0", halo_cache, channels_last=channels_last),
            _grads(stem, x, "max", mode, halo_cache, channels_last=channels_last))


@pytest.mark.parametrize("halo_cache", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_skip_bit_identical(halo_cache, channels_last):
    _, _, (dense, m0, t0), (skip, m1, t1) = _pair(torch.float32, "skip", halo_cache,
                                                   channels_last)
    assert t0["skipped"] == 0 and t0["boxed"] == 0
    assert t1["skipped"] > 0, t1  # 2 x 12 arg-max locations over 25 tiles
    assert t1["whole"] + t1["skipped"] == t0["whole"]
    for a, b in zip(dense, skip):
        assert torch.equal(a, b)
    assert sum(m1[1:]) < sum(m0[1:])


@pytest.mark.parametrize("halo_cache", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_boxes_float64_exact(halo_cache, channels_last):
    stem, x, (dense, m0, _), (boxed, m1, t1) = _pair(torch.float64, "1", halo_cache,
                                                     channels_last)
    assert t1["boxed"] > 0 and t1["skipped"] > 0, t1
    for a, b in zip(dense, boxed):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    # against whole-image autograd
    xr = x.clone().requires_grad_(True)
    stem.zero_grad()
    y = stem(xr)
    _loss(y, "max", torch.linspace(-1.0, 1.0, y.shape[1], dtype=y.dtype)).backward()
    ref = [xr.grad] + [p.grad for p in stem.parameters()]
    for a, b in zip(ref, boxed):
        assert (a - b).abs().max().item() <= 1e-10
    assert sum(m1[1:]) < sum(m0[1:])


@pytest.mark.parametrize("halo_cache", [True, False])
def test_boxes_float32_close(halo_cache):
    stem, x = _stem(torch.float32), _image(2, torch.float32)
    dense, _, _ = _grads(stem, x, "max", "0", halo_cache)
    boxed, _, t1 = _grads(stem, x, "max", "1", halo_cache)
    assert t1["boxed"] > 0
    for a, b in zip(dense, boxed):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("halo_cache", [True, False])
def test_single_pixel_one_box(halo_cache):
    stem, x = _stem(torch.float64), _image(1, torch.float64)
    dense, m0, t0 = _grads(stem, x, "pixel", "0", halo_cache)
    boxed, m1, t1 = _grads(stem, x, "pixel", "1", halo_cache)
    n = t0["whole"]
    assert (t1["boxed"], t1["boxes"], t1["skipped"]) == (1, 1, n - 1)
    for a, b in zip(dense, boxed):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert sum(m1[1:]) < 0.25 * sum(m0[1:])


@pytest.mark.parametrize("halo_cache", [True, False])
def test_dense_head_unchanged(halo_cache):
    stem, x = _stem(torch.float32), _image(2, torch.float32)
    dense, m0, t0 = _grads(stem, x, "avg", "0", halo_cache)
    sparse, m1, t1 = _grads(stem, x, "avg", "1", halo_cache)
    assert t1["whole"] == t0["whole"] and t1["skipped"] == t1["boxed"] == 0
    assert m1 == m0
    for a, b in zip(dense, sparse):
        assert torch.equal(a, b)


def test_bad_mode_names_the_variable():
    stem, x = _stem(torch.float32), _image(1, torch.float32, 96)
    sm = streamcnn.StreamingModule(stem, 64)
    y = sm(x.requires_grad_(True))
    with sparse_mode("sometimes"), pytest.raises(RuntimeError,
                                                  match="STREAMCNN_SPARSE_BACKWARD"):
        y.amax(dim=(2, 3)).sum().backward()

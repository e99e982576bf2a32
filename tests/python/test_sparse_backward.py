"""The exact sparse backward (op/sparse.c): a tile whose output gradient is
all zeros (and that receives no non-zero halo gradient) is skipped, a
sparse one back-propagates only the cones of a few boxes around its
non-zeros, or, with halo caching, runs restricted to the cone of its
non-zero output and pending halo gradients (passing on only that part of
its halo's gradient). STREAMCNN_SPARSE_BACKWARD=0 turns it off, =skip skips
tiles only.
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
    if isinstance(head, torch.Tensor):  # a given output gradient
        return (y * head).sum()
    if head == "max":  # the paper's global max pool: one location per channel
        return (y.amax(dim=(2, 3)) * w).sum()
    if head == "avg":  # dense
        return (y.mean(dim=(2, 3)) * w).sum()
    # a single output pixel
    return (y[:, :, 5, 7] * w).sum()


def _grads(stem, x, head, mode, halo_cache=True, tile=64, channels_last=False,
           deterministic=False):
    """The gradients (image, then parameters) of the loss of head, in mode,
    on the device of stem and x; the executed multiply-adds and tiles."""
    sm = streamcnn.StreamingModule(stem, tile, halo_cache=halo_cache,
                                   deterministic=deterministic)
    x = x.clone().requires_grad_(True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    sm.zero_grad()
    y = sm(x)
    w = torch.linspace(-1.0, 1.0, y.shape[1], dtype=y.dtype, device=y.device)
    if isinstance(head, torch.Tensor):
        head = head.to(y.device)
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
    # halo caching: tiles holding several arg-maxes run restricted, and
    # pass the gradient of their halos on
    assert (t1["restricted"] > 0) == halo_cache, t1
    for a, b in zip(dense, boxed):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(_autograd(stem, x, "max"), boxed):  # whole-image autograd
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


def _border_gradient(stem, x, tile=64):
    """A sparse output gradient whose cones cross the borders of the
    halo-cached tiles: a 3 x 3 block of random values on the corner where
    four tiles meet and the whole first row of another tile
    (each tile's part of them dense: those tiles run restricted and pass
    their halos' gradient on, the row's to tiles with no output
    gradient of their own) and single points on the first row, the first
    column and the first pixel of other tiles. Also the number of tiles
    whose own output gradient is non-zero."""
    sm = streamcnn.StreamingModule(stem, tile, halo_cache=True)
    t = sm.tiling(x.shape[2], x.shape[3])
    rows, cols = t["row_bounds"], t["col_bounds"]
    assert len(rows) >= 5 and len(cols) >= 5, t
    torch.manual_seed(2)
    g = torch.zeros(x.shape[0], 12, *t["output"], dtype=x.dtype)
    g[:, :, rows[2] - 1:rows[2] + 2, cols[2] - 1:cols[2] + 2] = torch.randn(
        x.shape[0], 12, 3, 3, dtype=x.dtype)
    g[:, :, rows[3], cols[3]:cols[4]] = torch.randn(x.shape[0], 12, cols[4] - cols[3],
                                                    dtype=x.dtype)
    g[0, 3, rows[1], cols[3] + 1] = 1.0
    g[-1, 5, rows[3] + 1, cols[1]] = -2.0
    g[0, 0, rows[4], cols[4]] = 0.5
    nz = g.abs().sum(dim=(0, 1)) != 0
    own = sum(int(nz[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].any())
              for i in range(len(rows) - 1) for j in range(len(cols) - 1))
    return g, own


def _autograd(stem, x, head):
    xr = x.clone().requires_grad_(True)
    stem.zero_grad()
    y = stem(xr)
    _loss(y, head, torch.linspace(-1.0, 1.0, y.shape[1], dtype=y.dtype)).backward()
    return [xr.grad] + [p.grad.clone() for p in stem.parameters()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_restricted_pending_float64(channels_last):
    stem, x = _stem(torch.float64), _image(2, torch.float64)
    g, own = _border_gradient(stem, x)
    dense, m0, t0 = _grads(stem, x, g, "0", True, channels_last=channels_last)
    skip, m2, _ = _grads(stem, x, g, "skip", True, channels_last=channels_last)
    sparse, m1, t1 = _grads(stem, x, g, "1", True, channels_last=channels_last)
    assert t1["restricted"] > 0 and t1["skipped"] > 0 and t1["whole"] == 0, t1
    # tiles without an output gradient of their own ran for their pending
    # halo gradients
    assert t1["restricted"] + t1["boxed"] > own, (t1, own)
    for a, b in zip(dense, sparse):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(_autograd(stem, x, g), sparse):
        assert (a - b).abs().max().item() <= 1e-10
    # restricting the tiles with pending gradients saves work over running
    # them whole (as skipping alone does)
    assert sum(m1) < 0.5 * sum(m2) and sum(m2) < sum(m0)


def test_restricted_without_halo_cache_unused():
    """Without halo caching nothing is pending: tiles are boxed or whole."""
    stem, x = _stem(torch.float64), _image(2, torch.float64)
    g, _ = _border_gradient(stem, x)
    dense, _, _ = _grads(stem, x, g, "0", False)
    sparse, _, t1 = _grads(stem, x, g, "1", False)
    assert t1["restricted"] == 0 and t1["boxed"] > 0, t1
    for a, b in zip(dense, sparse):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_restricted_float32_close():
    stem, x = _stem(torch.float32), _image(2, torch.float32)
    g, _ = _border_gradient(stem, x)
    dense, _, _ = _grads(stem, x, g, "0", True, channels_last=True)
    sparse, _, t1 = _grads(stem, x, g, "1", True, channels_last=True)
    assert t1["restricted"] > 0, t1
    for a, b in zip(dense, sparse):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)

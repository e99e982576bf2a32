"""torch.cat along the channels (DenseNet's dense blocks, Inception's
branches): the program's cat instruction. Streamed equals whole-image
autograd in float64 on random stems with joins (also in test_halo_cache:
cached against cone recompute), torchvision's DenseNet-121 and GoogLeNet
stems, both layouts, with and without halo caching, in row bands and with
the sparse backward; cats along anything but the channels
are refused, naming the fx node."""

import random

import pytest
import torch
import torch.nn as nn

import streamcnn
from conftest import compare, randomize_bn
from streamcnn.program import OP_CAT, _instructions, convert
from test_equivalence import FP64_TOL, _valid_size, random_stem
from test_tile_parallel import _bands_sum_to_the_whole


def _cats(program):
    return sum(op == OP_CAT for op, _ in _instructions(program))


@pytest.mark.parametrize("seed", range(24))
def test_random_joins_fp64(seed):
    """Random stems with joins: thin tiles (the receptive field), wider
    ones and one tile, batch 1 and 3."""
    stem = random_stem(500 + seed, cat=True)
    sm = streamcnn.StreamingModule(stem, 10**6, in_channels=3)
    rng = random.Random(seed)
    size = _valid_size(stem, rng, 1, 40) or _valid_size(stem, rng, 40, 120)
    assert size is not None, "no image size works for this stem"
    x = torch.randn(rng.choice([1, 3]), 3, *size, dtype=torch.float64, requires_grad=True)
    rf_h, rf_w = sm.receptive_field
    for t in {(rf_h, rf_w), (rf_h + rng.randint(1, 9), rf_w + rng.randint(1, 9)),
              (size[0] + rf_h, size[1] + rf_w)}:
        compare(stem, x, t, FP64_TOL, in_channels=3)


def test_random_joins_have_cats():
    """The random stems above do exercise the instruction."""
    n = sum(_cats(convert(random_stem(500 + s, cat=True), 3).program) for s in range(24))
    assert n >= 12, n


def _densenet_stem():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    f = tv.models.densenet121(weights=None).features
    # the stem, dense block 1 (6 layers: cats of 2 .. 7 features), the
    # transition (1 x 1 conv, 2 x 2 average pool), and the first two
    # layers of dense block 2
    block2 = nn.Sequential(*list(f.denseblock2.children())[:2])

    class Block2(nn.Module):  # _DenseBlock's forward over its first layers
        def __init__(self):
            super().__init__()
            self.layers = block2

        def forward(self, x):
            features = [x]
            for layer in self.layers:
                features.append(layer(features))
            return torch.cat(features, 1)

    stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0, f.denseblock1, f.transition1,
                         Block2()).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    return stem


def test_densenet121_one_cat_per_layer():
    """Layer k of a dense block joins the features of layers 0 .. k: the
    cat of layer k - 1's join and one more, so each layer adds one cat
    instruction (6 layers of block 1 and its output: 6; 2 layers of block
    2 and the output: 2)."""
    assert _cats(convert(_densenet_stem()).program) == 6 + 2


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_densenet121_fp64(layout):
    stem = _densenet_stem()
    sm = streamcnn.StreamingModule(stem, 10**6)
    rf = sm.receptive_field
    x = torch.randn(2, 3, 133, 101, dtype=torch.float64).to(memory_format=layout)
    for tile in [rf, (rf[0] + 13, 10**6)]:
        compare(stem, x.requires_grad_(), tile, FP64_TOL)


@pytest.mark.parametrize("cached", [True, False])
def test_densenet121_row_bands(cached):
    """The *_rows ops (tile-parallel): bands sum to the whole."""
    stem = _densenet_stem()
    sm = streamcnn.StreamingModule(stem, 96, halo_cache=cached)
    x = torch.randn(1, 3, 130, 60, dtype=torch.float64)
    g = torch.randn_like(stem(x))
    _bands_sum_to_the_whole(sm, x, g, [0, 3, 4, g.shape[2]], cached)


@pytest.mark.parametrize("halo_cache", [True, False])
def test_densenet121_sparse_backward(halo_cache):
    """A max-pool head's gradient (one non-zero per channel): tiles are
    skipped and boxed, and the gradients stay those of whole-image
    autograd."""
    from test_sparse_backward import _autograd, _grads
    stem = _densenet_stem()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 200, 180, dtype=torch.float64)
    got, _, tiles = _grads(stem, x, "max", "1", halo_cache, tile=120)
    assert tiles["skipped"] + tiles["boxed"] > 0, tiles
    for a, b in zip(_autograd(stem, x, "max"), got):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, a.abs().max().item())


def test_googlenet_inception_fp64():
    """GoogLeNet's stem and inception3a: four branches (1 x 1, 3 x 3, a
    second 3 x 3 and a ceil-mode 3 x 3 max pool) joined in one cat of 4."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    g = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    stem = nn.Sequential(g.conv1, g.maxpool1, g.conv2, g.conv3, g.maxpool2,
                         g.inception3a).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(3))
    assert _cats(convert(stem).program) == 3
    x = torch.randn(1, 3, 157, 129, dtype=torch.float64, requires_grad=True)
    sm = streamcnn.StreamingModule(stem, 10**6)
    compare(stem, x, sm.receptive_field, FP64_TOL)
    compare(stem, x, (sm.receptive_field[0] + 40, 10**6), FP64_TOL)


class _ImageJoin(nn.Module):
    """The image itself joined to a convolution of it, then a convolution."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x):
        return self.b(torch.cat([x, self.a(x)], 1))


def test_join_of_the_image():
    torch.manual_seed(0)
    stem = _ImageJoin().double()
    x = torch.randn(2, 3, 41, 37, dtype=torch.float64, requires_grad=True)
    compare(stem, x, (9, 11), FP64_TOL)
    # a uint8 image, converted per tile, and normalised by mean / std
    u8 = torch.randint(0, 256, (1, 3, 41, 37), dtype=torch.uint8)
    sm = streamcnn.StreamingModule(stem, 9)
    assert torch.allclose(sm(u8), stem(u8.double()), rtol=0, atol=1e-10)
    mean, std = (120.0, 100.0, 90.0), (50.0, 60.0, 70.0)
    sm = streamcnn.StreamingModule(stem, 9, mean=mean, std=std)
    ref = stem((u8.double() - torch.tensor(mean).view(1, 3, 1, 1))
               / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(sm(u8), ref, rtol=0, atol=1e-10)


class _RepeatedJoin(nn.Module):
    """The same values joined more than once, in two orders: each input's
    gradient is the sum over its places."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(14, 5, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(torch.cat([y, y, x, x], 1)) + self.b(torch.cat([y, x, y, x], 1))


def test_join_of_repeated_values():
    torch.manual_seed(0)
    stem = _RepeatedJoin().double()
    x = torch.randn(2, 3, 33, 29, dtype=torch.float64, requires_grad=True)
    for tile in [(5, 7), (12, 40)]:
        compare(stem, x, tile, FP64_TOL)


class _ChannelsLastJoin(nn.Module):
    """A join of tensors permuted to N x H x W x C, along their last dim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 4)
        self.out = nn.Linear(10, 5)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = torch.cat([self.norm(y), self.lin(y)], -1)
        return self.out(y).permute(0, 3, 1, 2)


def test_join_channels_last_tensors():
    torch.manual_seed(0)
    stem = _ChannelsLastJoin().double()
    x = torch.randn(1, 3, 30, 26, dtype=torch.float64, requires_grad=True)
    compare(stem, x, (7, 30), FP64_TOL)


class _BadJoin(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.w = nn.Parameter(torch.zeros(1, 2, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        if self.how == "rows":
            return torch.cat([x, y], 2)
        if self.how == "batch":
            return torch.cat((x, y))
        if self.how == "param":
            return torch.cat([y, self.w], 1)
        if self.how == "mixed":
            return torch.cat([y, y.permute(0, 2, 3, 1)], 1)
        if self.how == "stride":
            return torch.cat([x, self.conv(x)[:, :, ::2, ::2]], 1)
        raise AssertionError(self.how)


@pytest.mark.parametrize("how,match", [
    ("rows", r"cat along dim 2 of an NCHW tensor: only a cat of the channels \(dim 1\)"),
    ("batch", r"cat along dim 0"),
    ("param", r"its input .* is not a tensor produced by the stem"),
    ("mixed", r"joins N x C x H x W tensors and ones permuted"),
    ("stride", r"fx node 'getitem"),
])
def test_cats_that_are_not_local_are_refused(how, match):
    with pytest.raises(ValueError, match=match):
        streamcnn.StreamingModule(_BadJoin(how), 64)


class _StridedJoin(nn.Module):
    """Joins values of different strides (sizes differ): PyTorch's cat
    refuses it too, the program decoder names the cat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_join_of_different_strides_is_refused():
    with pytest.raises(ValueError, match=r"\(cat\): inputs 1 and 2 have different total "
                                         r"strides along rows"):
        streamcnn.StreamingModule(_StridedJoin(), 64)


def test_densenet121_memory_model():
    """The memory model counts a cat's new buffer and the copies of its
    gradient's channels: a training step's measured peak (PyTorch's CPU
    allocator, the stem output excluded) is within 15% of it with halo
    caching (97% seen at 768², 2026-12-06)."""
    from streamcnn._library import memory_info
    from test_budget import _allocator_peak
    stem = _densenet_stem().float()
    sm = streamcnn.StreamingModule(stem, 200)
    x = torch.randn(1, 3, 448, 448)
    sm(x[:, :, :200, :200]).sum().backward()   # parameter gradients exist
    with torch.no_grad():
        g = torch.randn_like(sm(x))
    peak = _allocator_peak(lambda: sm(x).backward(g)) - g.numel() * 4
    mask = sm._grad_mask(False, sm.stream_params())
    bwd, _, strips = memory_info(sm.program, 448, 448, sm.tile_size, True, mask, 4, cpu=True)
    assert 0.85 * (bwd + strips) <= peak <= 1.15 * (bwd + strips), (peak, bwd + strips)


class _EndsInJoin(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, stride=2)
        self.c = nn.MaxPool2d(3, 2)

    def forward(self, x):
        y = self.a(x)
        return torch.cat([self.b(y), self.c(y)], 1)


def test_export_and_compile_of_a_stem_ending_in_a_cat():
    """The fake kernel's output shape (program.output_shape) adds a cat's
    channels: torch.export and torch.compile give the eager result."""
    from streamcnn.program import output_shape
    torch.manual_seed(0)
    stem = _EndsInJoin()
    sm = streamcnn.StreamingModule(stem, 16)
    x = torch.randn(1, 3, 41, 37)
    assert output_shape(sm.program, 41, 37) == (6, 20, 18)
    ref = stem(x)
    ep = torch.export.export(sm, (x,))
    torch.testing.assert_close(ep.module()(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.compile(sm)(x), ref, rtol=1e-5, atol=1e-5)

"""Selections of the channels: chunk / split / narrow / x[:, i:j:s] along
the channels and channel shuffles (view to N x g x C/g x H x W, transpose
or permute, view or flatten back), as ShuffleNetV2 writes them. They read
sizes from tensors (x.size(), x.shape): the channel counts are constants,
the batch, the rows and the columns may only be passed on unchanged. The
program's `channels` instruction; a shuffle followed by a chunk is one
instruction per half. Streamed equals whole-image autograd in float64;
what is not local is refused naming the fx node."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from conftest import compare, randomize_bn
from streamcnn.program import OP_CHANNELS, _fit_channels, _instructions, convert
from test_equivalence import FP64_TOL
from test_tile_parallel import _bands_sum_to_the_whole


def _channel_ops(program):
    return [list(f) for op, f in _instructions(program) if op == OP_CHANNELS]


def _shuffle(x, groups):
    """torchvision's channel_shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class Shuffle(nn.Module):
    """conv -> 3 ways of shuffling 12 channels -> chunk -> convs -> cat."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.c = nn.Conv2d(12, 8, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.spelling == "torchvision":
            y = _shuffle(y, 3)
        elif self.spelling == "reshape-permute-flatten":
            n, _, h, w = y.shape
            y = y.reshape(n, 4, -1, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
        else:                                  # x.size(k), view, transpose, reshape
            y = y.view(y.size(0), 2, y.size(1) // 2, y.size(2), y.size(3))
            y = y.transpose(1, 2).reshape(y.size(0), -1, y.size(3), y.size(4))
        y1, y2 = y.chunk(2, dim=1)
        return self.c(torch.cat((y1, self.b(y2)), dim=1))


class Slices(nn.Module):
    """Every other spelling of a selection of the channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.s = nn.Parameter(torch.randn(1, 3, 1, 1))

    def forward(self, x):
        y = self.a(x)
        p, q = torch.split(y, [4, 6], dim=1)           # sections
        r = y.split(5, 1)[1]                           # a size: 5 + 5
        e = y[:, ::2] + y[:, 1::2]                     # strided slices, a residual
        n = y.narrow(1, 2, 3) * self.s                 # a per-channel scale
        c = y.size(1)
        h = y[:, c // 2:]                              # bounds from the channel count
        return torch.cat([self.b(p), q, r, e, n, h, torch.chunk(y, 3, 1)[2]], 1)


class EndsShuffled(nn.Module):
    """A stem whose output is a channel shuffle."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return _shuffle(self.a(x), 2)


@pytest.mark.parametrize("stem", [Shuffle("torchvision"), Shuffle("reshape-permute-flatten"),
                                  Shuffle("sizes"), Slices(), EndsShuffled()],
                         ids=["torchvision", "reshape-permute-flatten", "sizes", "slices",
                              "ends-shuffled"])
@pytest.mark.parametrize("halo_cache", [True, False])
def test_spellings_fp64(stem, halo_cache):
    """Each spelling streamed in tiles of the receptive field and wider
    ones, batch 2, both memory layouts, against whole-image autograd."""
    torch.manual_seed(0)
    stem = stem.double()
    sm = streamcnn.StreamingModule(stem, 10**6)
    rf = sm.receptive_field
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 37, 29, dtype=torch.float64).to(memory_format=layout)
        for tile in (rf, (rf[0] + 5, rf[1] + 9)):
            sm = streamcnn.StreamingModule(stem, tile, halo_cache=halo_cache)
            compare(stem, x.requires_grad_(), tile, FP64_TOL, sm=sm)


def test_shuffle_then_chunk_is_one_instruction_per_half():
    """A shuffle of 12 channels in 3 groups read only through its chunk:
    two `channels` instructions, each in the shuffle's form."""
    ops = _channel_ops(convert(Shuffle("torchvision")).program)
    # of value 2 (the ReLU's): y2 = shuffled channels 6..11 = 2 6 10 3 7 11
    # (read first, by self.b), y1 = 0 4 8 1 5 9
    assert ops == [[2, 6, 2, 3, 4, 1], [2, 6, 0, 3, 4, 1]]


def test_fit_channels():
    assert _fit_channels([5]) == (5, 1, 0, 1)
    assert _fit_channels(range(3, 9)) == (3, 1, 0, 1)
    assert _fit_channels(range(1, 12, 3)) == (1, 1, 0, 3)
    assert _fit_channels([0, 4, 8, 1, 5, 9]) == (0, 3, 4, 1)
    assert _fit_channels([0, 4, 1, 5, 2]) is None          # 5 is no multiple of 2 groups
    assert _fit_channels([3, 1, 2]) is None                 # a step back
    assert _fit_channels([0, 2, 1, 3, 5, 4]) is None


def test_a_selection_of_a_selection_that_has_no_form_of_its_own():
    """The first five of a shuffle of 8 channels (0 4 1 5 2) are no single
    instruction: the shuffle is emitted and the slice taken of it."""
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return _shuffle(self.a(x), 2)[:, :5]

    stem = S().double()
    assert _channel_ops(convert(stem).program) == [[1, 8, 0, 2, 4, 1], [2, 5, 0, 1, 0, 1]]
    x = torch.randn(1, 3, 20, 17, dtype=torch.float64, requires_grad=True)
    compare(stem, x, (5, 5), FP64_TOL)


def _shufflenet(upto):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.shufflenet_v2_x0_5(weights=None)
    stem = nn.Sequential(m.conv1, m.maxpool, m.stage2[:upto]).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    return stem


def test_shufflenet_instructions():
    """ShuffleNetV2's stage 2 (a stride-2 block, then 3 blocks that split
    the shuffled channels in two): a channel-shuffle-and-chunk
    instruction per half, no shuffle of its own except the output's."""
    ops = _channel_ops(convert(_shufflenet(4)).program)
    assert len(ops) == 3 * 2 + 1
    assert all(f[3] == 2 and f[4] == 24 and f[5] == 1 for f in ops)


@pytest.mark.parametrize("cached", [True, False])
def test_shufflenet_row_bands(cached):
    """The *_rows ops (tile-parallel): bands sum to the whole."""
    stem = _shufflenet(2)
    sm = streamcnn.StreamingModule(stem, 64, halo_cache=cached)
    x = torch.randn(1, 3, 96, 70, dtype=torch.float64)
    g = torch.randn_like(stem(x))
    _bands_sum_to_the_whole(sm, x, g, [0, 2, 3, g.shape[2]], cached)


@pytest.mark.parametrize("halo_cache", [True, False])
def test_shufflenet_sparse_backward(halo_cache):
    """An output gradient in one corner: tiles are skipped and boxed, and
    the gradients stay those of whole-image autograd."""
    from test_sparse_backward import _autograd, _grads
    stem = _shufflenet(2)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 200, 180, dtype=torch.float64)
    g = torch.zeros_like(stem(x))
    g[..., 2:5, 3:6] = torch.randn(g.shape[1], 3, 3, dtype=torch.float64)
    got, _, tiles = _grads(stem, x, g, "1", halo_cache, tile=80)
    assert tiles["skipped"] + tiles["boxed"] > 0, tiles
    for a, b in zip(_autograd(stem, x, g), got):
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, a.abs().max().item())


def _stem(fn):
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return fn(self, self.a(x))
    return S()


@pytest.mark.parametrize("fn,match", [
    (lambda s, y: y.transpose(2, 3), r"method .transpose\(\) .*: transpose\(2, 3\): only the "
                                     "two channel dimensions"),
    (lambda s, y: torch.transpose(y, 1, 2), r"call to torch.transpose .*: transpose\(1, 2\)"),
    (lambda s, y: y.view(y.size(0), 8, y.size(2) * y.size(3)),
     r"call to _operator.mul .*: it reads the shape of a tensor"),
    (lambda s, y: y.reshape(y.shape[0], 32, y.shape[2] // 2, y.shape[3] // 2),
     r"call to _operator.floordiv .*: it reads the shape of a tensor"),
    (lambda s, y: y.view(1, 8, y.size(2), y.size(3)), r"a view or reshape to \(1, 8, H, W\)"),
    (lambda s, y: y.view(y.size(0), 3, -1, y.size(2), y.size(3)),
     r"a view of 8 channels as \(3, -1\) channels"),
    (lambda s, y: y.chunk(2, dim=2)[0], r"along dim 2: only a split of the channels"),
    (lambda s, y: torch.split(y, 4)[0], r"along dim 0: only a split of the channels"),
    (lambda s, y: y[:, [0, 2]], r"indexing .*: only x\[:, i:j:step\]"),
    (lambda s, y: y[:, 3], r"indexing .*: only x\[:, i:j:step\]"),
    (lambda s, y: y[:, 5:5], r"slice .* of 8 channels is empty"),
    (lambda s, y: y[:, ::-1], r"its step positive"),
    (lambda s, y: s.b(y.view(y.size(0), 2, 4, y.size(2), y.size(3))),
     r"is a 5-d view N x 2 x 4 x H x W of the channels; view it back"),
    (lambda s, y: y.view(y.size(0), 2, 4, y.size(2), y.size(3)).chunk(2, 1)[0],
     r"splits or indexes a 5-d view of the channels"),
    (lambda s, y: torch.cat(y.view(y.size(0), 2, 4, y.size(2), y.size(3)).split(1, 1), 2),
     r"method .split\(\) .*: it splits or indexes a 5-d view of the channels"),
    (lambda s, y: y.view(y.size(0), 2, 4, y.size(2), y.size(3)).narrow(1, 0, 1),
     r"method .narrow\(\) .*: it splits or indexes a 5-d view of the channels"),
    (lambda s, y: y.view(y.size(0), 2, 4, y.size(2), y.size(3)).permute(0, 1, 2, 4, 3),
     r"permute\(0, 1, 2, 4, 3\) of a 5-d view"),
    (lambda s, y: y[:, :y.size(2)], r"its bounds must be constants"),
    (lambda s, y: F.max_pool2d(y, y.size(2)), r"max_pool2d .*: it reads the shape of a tensor"),
    (lambda s, y: y.narrow(1, 6, 3), r"narrow\(1, 6, 3\) of 8 channels: out of range"),
], ids=["transpose-hw", "transpose-4d", "view-hw", "reshape-halves", "view-batch",
        "view-bad-groups", "chunk-rows", "split-batch", "list-index", "int-index",
        "empty-slice", "negative-step", "5d-into-conv", "5d-chunk", "5d-split-cat",
        "5d-narrow", "5d-permute-hw",
        "slice-by-rows", "pool-by-rows", "narrow-past-the-end"])
def test_what_is_not_local_is_refused(fn, match):
    with pytest.raises(ValueError, match="streamcnn: cannot stream .*" + match):
        convert(_stem(fn))


def test_a_selection_permuted_to_channels_last():
    """A slice of the channels through a LayerNorm over the channels of
    each pixel (permuted to N x H x W x C and back): the slice is emitted,
    then permuted (a 4-d selection's permute is no channel shuffle)."""
    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.ln = nn.LayerNorm(4)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)[:, 2:6]
            y = y.contiguous() if self.contiguous else y
            return self.b(self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    for contiguous in (True, False):
        stem = S().double()
        stem.contiguous = contiguous
        x = torch.randn(2, 3, 30, 25, dtype=torch.float64, requires_grad=True)
        compare(stem, x, (5, 5), FP64_TOL)


class Composed(nn.Module):
    """What a new-user trial found wrong or refused, each of it local:
    sizes from channel counts as layer arguments (a kernel, a flag from a
    comparison, a slope), a shuffle of a chunk, a shuffle of a shuffle
    re-split into other groups, narrow from the end, identity views, y[:,
    ...], the cat of a chunk's parts."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = self.a(x)
        y = F.avg_pool2d(y, 3, 1, 1, count_include_pad=(y.size(1) != 12))   # False
        y = F.max_pool2d(y, y.shape[1] // 4, 1, 1)                            # kernel 3
        y = F.leaky_relu(y, y.size(1) / 100)
        n, c, h, w = y.shape
        p, q = y.chunk(2, 1)
        p = _shuffle(p, 2)                                                    # of a chunk
        y = torch.cat([p, q], 1)
        y = y.reshape(n, 2, -1, h, w).transpose(1, 2).reshape(n, 4, -1, h, w)
        y = y.transpose(1, 2).reshape(n, c, h, w)                            # re-split
        y = y.view(y.size()).reshape(y.shape)[:, ...]
        z = torch.cat(y.chunk(3, 1), 1) + torch.cat([y.narrow(1, -4, 4), y[:, :8]], 1)
        return self.b(z)


def test_composed_spellings_fp64():
    stem = Composed().double()
    x = torch.randn(2, 3, 23, 19, dtype=torch.float64, requires_grad=True)
    for tile in ((7, 7), (11, 16)):
        compare(stem, x, tile, FP64_TOL)


class ContiguousOfAShuffle(nn.Module):
    """A 5-d view given a value of its own (a shuffle of it has no one
    instruction's form), then made contiguous and shuffled again: it stays
    a 5-d view (it was refused as one read by a layer)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 6, 1)
        self.c = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        v = y.reshape(n, 2, -1, h, w).transpose(1, 2).reshape(n, 4, -1, h, w)
        u = v.transpose(1, 2).reshape(n, c, h, w)
        d = v.contiguous().transpose(1, 2).contiguous().reshape(n, c, h, w)
        return self.b(u) + self.c(d)


def test_contiguous_keeps_a_5d_view():
    stem = ContiguousOfAShuffle().double()
    x = torch.randn(2, 3, 20, 17, dtype=torch.float64, requires_grad=True)
    compare(stem, x, (7, 7), FP64_TOL)


class _InPlace(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        if self.kind == "narrow":
            torch.relu_(y.narrow(1, 2, 3))
        elif self.kind == "chunk":
            y.chunk(2, 1)[0].relu_()
        else:
            n = y.narrow(1, 0, 4)
            y.relu_()
            return self.b(torch.cat([n, y[:, 4:]], 1))
        return self.b(y)


@pytest.mark.parametrize("kind", ["narrow", "chunk", "view-read-after"])
def test_in_place_through_a_selection_is_refused(kind):
    """narrow, chunk and split return views: an in-place op on one changes
    the tensor it selects from (it was dropped: wrong results, 0.99)."""
    with pytest.raises(ValueError, match="cannot stream in-place .* a view of|of which "
                                         "'narrow' .* is a view"):
        convert(_InPlace(kind))


def test_selecting_the_input_image_needs_in_channels():
    """conv(x[:, :3]) of an RGBA image: the layers do not say how many
    channels the image has; with in_channels= it streams."""
    class RGB(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.a(x[:, :3])

    stem = RGB().double()
    with pytest.raises(ValueError, match=r"selects channels of its input image \(fx node "
                                         r"'getitem'\).*pass in_channels="):
        convert(stem)
    x = torch.randn(1, 4, 20, 17, dtype=torch.float64, requires_grad=True)
    compare(stem, x, (5, 5), FP64_TOL, in_channels=4)


def test_shufflenet_memory_model():
    """The memory model counts a channels instruction's new buffer and its
    gradient's zeros: a training step's measured peak (PyTorch's CPU
    allocator, the stem output excluded) is within 15% of it with halo
    caching (0.97 at 448² to stage2, 1.00 at 768² to stage3, 2026-12-07)."""
    tv = pytest.importorskip("torchvision")
    from streamcnn._library import memory_info
    from test_budget import _allocator_peak
    torch.manual_seed(0)
    m = tv.models.shufflenet_v2_x1_0(weights=None).eval()
    sm = streamcnn.StreamingModule(nn.Sequential(m.conv1, m.maxpool, m.stage2), 160)
    x = torch.randn(1, 3, 448, 448)
    sm(x[:, :, :160, :160]).sum().backward()   # parameter gradients exist
    with torch.no_grad():
        g = torch.randn_like(sm(x))
    peak = _allocator_peak(lambda: sm(x).backward(g)) - g.numel() * 4
    mask = sm._grad_mask(False, sm.stream_params())
    bwd, _, strips = memory_info(sm.program, 448, 448, sm.tile_size, True, mask, 4, cpu=True)
    assert 0.85 * (bwd + strips) <= peak <= 1.15 * (bwd + strips), (peak, bwd + strips)

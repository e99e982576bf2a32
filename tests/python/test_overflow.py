"""Huge sizes (issue 17): image extents up to 2^20 x 2^20 and 2^31, and
batch x channels x H x W beyond 2^31 elements, through the geometry, the
work and memory models, budget_tile and the fake (meta) path, against
Python's exact integers; what the int64 geometry cannot represent is
refused with a message, never answered wrongly."""

import math

import pytest
import torch
import torch.nn as nn
import torchvision

from streamcnn import StreamingModule
from streamcnn._library import memory_info, program_info, tile_bounds, tiling_info, work_info
from streamcnn.program import MAGIC, output_shape

MAX_EXTENT = 1 << 31


@pytest.fixture(scope="module")
def resnet():
    r = torchvision.models.resnet18().eval()
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2)
    return StreamingModule(stem, tile_size=1024)


def _exact_tiling(program, h, w, tile):
    """sc_tiling_info's answer in Python integers: the largest output tile
    whose input extent (t - 1) * stride + rf fits, then balanced."""
    info = program_info(program)
    rf, s = info[2:4], info[4:6]
    _, oh, ow = output_shape(program, h, w)
    out = [oh, ow]
    res = [oh, ow, 0, 0, 0, 0]
    for a in range(2):
        tmax = min((tile[a] - rf[a]) // s[a] + 1, MAX_EXTENT)
        count = -(-out[a] // tmax)
        t = -(-out[a] // count)
        res[2 + a], res[4 + a] = t, -(-out[a] // t)
    return res


def _exact_macs(program, h, w):
    """Whole-image convolution multiply-adds in Python integers: each
    convolution's output extent from output_shape of the program cut
    after it."""
    from streamcnn.program import OP_CONV, _instructions
    words, total, pos = list(program), 0, 5
    for i, (op, f) in enumerate(_instructions(program)):
        pos += 2 + words[pos + 1]
        if op != OP_CONV:
            continue
        prefix = words[:3] + [i + 1, words[4]] + words[5:pos]
        c_out, oh, ow = output_shape(prefix, h, w)
        c_in, groups, kh, kw = f[3], f[5], f[6], f[7]
        total += c_out * (c_in // groups) * kh * kw * oh * ow
    return total


SIZES = [(1 << 20, 1 << 20), (1 << 20, 3 << 18), ((1 << 20) + 7, (1 << 20) - 3),
         (MAX_EXTENT, 64), (MAX_EXTENT, MAX_EXTENT)]
TILES = [(4096, 4096), (MAX_EXTENT, MAX_EXTENT), (700, 1 << 20)]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("tile", TILES)
def test_tiling_info_exact_at_huge_sizes(resnet, h, w, tile):
    assert tiling_info(resnet.program, h, w, tile) == _exact_tiling(resnet.program, h, w, tile)


def test_extents_past_2p31_are_refused(resnet):
    for h, w in [(MAX_EXTENT + 1, 64), (64, 1 << 40), (-1, 64)]:
        with pytest.raises(ValueError, match="out of range"):
            tiling_info(resnet.program, h, w, (1024, 1024))
    with pytest.raises(ValueError, match="tile_size must be in"):
        tiling_info(resnet.program, 4096, 4096, (MAX_EXTENT + 1, 1024))


def test_tile_counts_past_2p24_are_refused():
    """Plans are made per tile: 2^31 rows in tiles of one row would take
    hours in work_info; more than 2^24 tiles along an axis are refused."""
    sm = StreamingModule(nn.Sequential(nn.Conv2d(1, 1, 1)), 1)
    assert work_info(sm.program, 1 << 24, 3, (1, 1))[4] > 0
    with pytest.raises(ValueError, match=r"gives 2147483648 tiles along the rows, more than "
                                         r"16777216: use a larger tile_size"):
        work_info(sm.program, MAX_EXTENT, 3, (1, 1))


@pytest.mark.parametrize("cached", [False, True])
def test_tile_bounds_at_2p20(resnet, cached):
    h = w = 1 << 20
    oh, ow, _, _, nh, nw = tiling_info(resnet.program, h, w, (8192, 8192))
    rows, cols = tile_bounds(resnet.program, h, w, (8192, 8192), cached)
    for b, n, out in ((rows, nh, oh), (cols, nw, ow)):
        assert len(b) == n + 1 and b[0] == 0 and b[-1] == out
        assert all(x < y for x, y in zip(b, b[1:]))
    t = resnet.tiling(h, w)  # the module's own tile, 1024
    n = tiling_info(resnet.program, h, w, tuple(resnet.tile_size))
    assert t["output"] == (oh, ow) and list(t["tiles"]) == n[4:6]
    assert len(t["row_bounds"]) == n[4] + 1 and t["row_bounds"][-1] == oh


def test_work_info_exact_at_2p20(resnet):
    h = w = 1 << 20
    work = work_info(resnet.program, h, w, (8192, 8192))
    exact = _exact_macs(resnet.program, h, w)
    assert exact > 2 ** 40
    assert work[0] == float(exact)  # < 2^53: exact in a double
    assert work[4] <= work[0] <= work[1]


def test_memory_model_image_gradient_at_2p20(resnet):
    """The image gradient the backward keeps is C x H x W x itemsize bytes
    per batch element, 12 TB here, to the byte."""
    h = w = 1 << 20
    prog = resnet.program
    n = prog[4]
    with_img = memory_info(prog, h, w, (8192, 8192), True, [True] * (n + 1), 4)
    without = memory_info(prog, h, w, (8192, 8192), True, [False] + [True] * n, 4)
    assert with_img[0] - without[0] == 3 * h * w * 4
    assert with_img[1:] == without[1:]
    assert all(math.isfinite(v) and v > 0 for v in with_img)


def test_budget_tile_batch_times_image_past_2p31():
    """batch 8 x 3 x 2^15 x 2^15 = 2.6e10 elements: the chosen tile's
    modelled bytes are 8 times one element's, and within the budget."""
    r = torchvision.models.resnet18().eval()
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
    budget = 6 << 30
    sm = StreamingModule(stem, memory_budget=budget)
    batch, h, w = 8, 1 << 15, 1 << 15
    assert batch * 3 * h * w > 2 ** 34
    choice = sm.budget_tile(batch, h, w)
    assert 0 < choice["bytes"] <= budget
    one = StreamingModule(stem, tile_size=choice["tile_size"])
    mask = [False] + [True] * one.program[4]  # parameters' gradients, not the image's
    per = memory_info(one.program, h, w, tuple(choice["tile_size"]), choice["halo_cache"],
                      mask, 4, True)
    assert choice["bytes"] == int((max(per[0], per[1]) + per[2]) * batch)
    t = tiling_info(sm.program, h, w, tuple(choice["tile_size"]))
    assert t[:2] == list(output_shape(sm.program, h, w)[1:])


def test_fake_path_past_2p31_elements(resnet):
    """The meta / fake kernels give the exact output shape for a batch
    whose elements overflow int32 (4 x 3 x 2^15 x 2^15)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    h = w = 1 << 15
    with FakeTensorMode(allow_non_fake_inputs=True):  # the parameters stay real
        x = torch.empty(4, 3, h, w)
        y = resnet(x)
    c, oh, ow = output_shape(resnet.program, h, w)
    assert tuple(y.shape) == (4, c, oh, ow)
    assert x.numel() > 2 ** 33


def _big_rf_program(n_big):
    """Strides 4096 x 4096 x 128 (total 2^31), then n_big convolutions of
    4096 taps with dilation 4096: a receptive field far past int64 for
    n_big = 600 (the decoder once returned it wrapped)."""
    def conv(x, k, s, d):
        return [1, 16, x, 0, -1, 1, 1, 1, k, k, s, s, d, d, 0, 0, 0, 0]
    words, n = [], 0
    for s in (4096, 4096, 128):
        words += conv(n, 1, s, 1)
        n += 1
    for _ in range(n_big):
        words += conv(n, 4096, 1, 4096)
        n += 1
    return [MAGIC, 1, 1, n, 1] + words


@pytest.mark.parametrize("n_big", [1, 600])
def test_receptive_field_past_2p31_refused(n_big):
    with pytest.raises(ValueError, match="receptive field .* exceeds 2147483648"):
        program_info(_big_rf_program(n_big))


def test_receptive_field_at_the_limit_exact():
    """Just inside the bound the receptive field is exact: 1 + 4095 taps
    x 4096 dilation x stride 2^17 at most."""
    def conv(x, k, s, d):
        return [1, 16, x, 0, -1, 1, 1, 1, k, k, s, s, d, d, 0, 0, 0, 0]
    prog = [MAGIC, 1, 1, 3, 1] + conv(0, 1, 4096, 1) + conv(1, 1, 32, 1) + \
        conv(2, 4, 1, 4096)
    info = program_info(prog)
    assert info[2] == 3 * 4096 * (4096 * 32) + 1 == info[3]
    assert info[4] == 4096 * 32

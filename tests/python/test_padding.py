"""Zero padding as a layer of its own (nn.ZeroPad2d, nn.ConstantPad2d with
value 0, F.pad, torch.constant_pad_nd), as stems ported from Keras /
TensorFlow write it: folded into the convolution or pool that reads it,
streamed exactly; every other use refused naming the layer."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from conftest import compare, randomize_bn
from streamcnn.program import OP_AVGPOOL, OP_CONV, OP_MAXPOOL, _instructions, convert


class KerasStem(nn.Module):
    """Keras' ResNet50 stem (ZeroPadding2D(3), a 7 x 7 / 2 'valid'
    convolution, batch norm, ReLU, ZeroPadding2D(1), a 3 x 3 / 2 max pool),
    then TensorFlow's 'same' padding of a stride-2 convolution on an even
    size (one more row and column at the end), an average pool of a padded
    tensor, and two paddings in a row (F.pad and torch.constant_pad_nd)."""

    def __init__(self):
        super().__init__()
        self.pad0 = nn.ZeroPad2d(3)
        self.conv1 = nn.Conv2d(3, 8, 7, 2)
        self.bn1 = nn.BatchNorm2d(8)
        self.pad1 = nn.ConstantPad2d((1, 1, 1, 1), 0.0)
        self.pool1 = nn.MaxPool2d(3, 2)
        self.conv2 = nn.Conv2d(8, 8, 3, 2)
        self.conv3 = nn.Conv2d(8, 4, 3, 1, padding=1)

    def forward(self, x):
        x = self.pool1(self.pad1(F.relu(self.bn1(self.conv1(self.pad0(x))))))
        y = self.conv2(F.pad(x, (0, 1, 0, 1)))
        y = F.avg_pool2d(F.pad(y, [1, 1, 1, 1]), 3, 1, count_include_pad=False)
        return self.conv3(torch.constant_pad_nd(F.pad(y, (1, 0)), (0, 0, 2, 1), 0.0))


def _keras_stem():
    torch.manual_seed(0)
    m = KerasStem().double()
    randomize_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


@pytest.mark.parametrize("size", [(64, 72), (65, 71)])
@pytest.mark.parametrize("halo_cache", [True, False])
def test_zero_padding_folds_into_the_layer_that_reads_it(size, halo_cache):
    """Forward, input and every parameter gradient equal whole-image
    autograd (float64), in tiles from the receptive field up, for even and
    odd sizes: the max pool's ties between ReLU zeros and padding zeros
    included."""
    m = _keras_stem()
    rf = streamcnn.StreamingModule(m, 4096).receptive_field[0]
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    for tile in (rf, rf + 7, rf + 16, 4096):
        sm = streamcnn.StreamingModule(m, tile, halo_cache=halo_cache)
        compare(m, x, tile, 1e-10, sm=sm)


def test_paddings_are_not_instructions():
    """The program holds the layers alone, their padding grown by the zero
    padding before them: (top, bottom, left, right) per convolution,
    symmetric for the pools (the average pool then counts the padding, as
    it counted the zeros)."""
    pads = {OP_CONV: slice(12, 16), OP_MAXPOOL: slice(7, 9), OP_AVGPOOL: slice(5, 7)}
    ops = [(op, tuple(f[pads[op]])) for op, f in _instructions(convert(_keras_stem()).program)
           if op in pads]
    assert ops == [(OP_CONV, (3, 3, 3, 3)), (OP_MAXPOOL, (1, 1)), (OP_CONV, (0, 1, 0, 1)),
                   (OP_AVGPOOL, (1, 1)), (OP_CONV, (3, 2, 2, 1))]
    avg = [f for op, f in _instructions(convert(_keras_stem()).program) if op == OP_AVGPOOL]
    assert avg[0][8] == 1           # count_include_pad


def test_uint8_image_padded_after_its_normalisation():
    """A uint8 image with mean / std: the stem's zero padding pads the
    normalised image, as the whole-image stem does."""
    m = nn.Sequential(nn.ZeroPad2d((2, 0, 1, 3)), nn.Conv2d(3, 4, 3, 2)).double().eval()
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    sm = streamcnn.StreamingModule(m, 9, mean=mean, std=std)
    x = (torch.rand(1, 3, 40, 33) * 255).to(torch.uint8)
    xn = (x.double() - torch.tensor(mean).view(1, 3, 1, 1).double()) / \
        torch.tensor(std).view(1, 3, 1, 1).double()
    torch.testing.assert_close(sm(x), m(xn), rtol=1e-12, atol=1e-12)


class _Pads(nn.Module):
    def __init__(self, fn, c=3):
        super().__init__()
        self.fn = fn
        self.conv = nn.Conv2d(c, 4, 3)

    def forward(self, x):
        return self.fn(self, x)


@pytest.mark.parametrize("fn,match", [
    (lambda s, x: s.conv(F.pad(x, (1, 1, 1, 1), value=1.0)), "pads with 1.0: only zero"),
    (lambda s, x: s.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")),
     "mode='reflect' padding is not supported"),
    (lambda s, x: s.conv(nn.functional.pad(x, (1, -1, 0, 0))), r"a negative pad crops"),
    (lambda s, x: s.conv(F.pad(x, (1, 1, 1, 1, 1, 1))), r"pads the columns, or the columns "
     "and rows"),
    (lambda s, x: s.conv(F.relu(F.pad(x, (1, 1, 1, 1)))),
     r"relu.*it reads 'pad', a zero padding \(F.pad / ZeroPad2d\): streamcnn folds"),
    (lambda s, x: F.max_pool2d(F.pad(s.conv(x), (1, 1, 1, 1)), 3, 1),
     "max-pools a zero-padded tensor that may be negative"),
    (lambda s, x: F.max_pool2d(F.pad(F.relu(s.conv(x)), (0, 1, 0, 1)), 3, 2),
     r"zero-padded unevenly \(top, bottom, left, right = \(0, 1, 0, 1\)\)"),
    (lambda s, x: F.avg_pool2d(F.pad(s.conv(x), (1, 1, 1, 1)), 3, 2, ceil_mode=True),
     "ceil_mode=True"),
    (lambda s, x: F.avg_pool2d(F.pad(s.conv(x), (2, 2, 2, 2)), 3, 1),
     r"padding \(2, 2\) with its own is more than half its kernel \(3, 3\)"),
    (lambda s, x: F.avg_pool2d(F.pad(s.conv(x), (1, 1, 1, 1)), 3, 1, 1,
                               count_include_pad=False), "count_include_pad=False"),
    (lambda s, x: F.pad(s.conv(x), (1, 1, 1, 1)), "the stem ends in a zero padding"),
])
def test_other_uses_are_refused(fn, match):
    with pytest.raises(ValueError, match=match):
        convert(_Pads(fn).eval())


def test_module_named_in_the_refusal():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConstantPad2d(2, 0.5), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"ConstantPad2d '1'.*pads with 0.5: only zero"):
        convert(stem.eval())
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ZeroPad2d(1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"BatchNorm2d '2'.*it reads '_1', a zero padding"):
        convert(stem.eval())


@pytest.mark.parametrize("cached", [True, False])
def test_row_bands_of_a_padded_stem(cached):
    """Tile-parallel row bands (each given only its rows of the image) of
    the Keras-style stem, whose convolutions pad the top and bottom
    unevenly: they concatenate to the whole output and their gradients sum
    to the whole-image ones."""
    from test_tile_parallel import _bands_sum_to_the_whole
    m = _keras_stem()
    sm = streamcnn.StreamingModule(m, 60, halo_cache=cached)
    x = torch.randn(2, 3, 131, 70, dtype=torch.float64)
    assert sm.tiling(131, 70)["tiles"][0] >= 3
    y = m(x)
    g = torch.randn_like(y)
    oh = y.shape[2]
    for cuts in ([0, 1, oh], [0, 5, 6, oh], [0, oh - 1, oh]):
        _bands_sum_to_the_whole(sm, x, g, cuts, cached)

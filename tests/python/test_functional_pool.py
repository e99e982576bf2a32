"""Functional pooling (F.max_pool2d, torch.max_pool2d, F.avg_pool2d), as
Inception-v3's blocks call it: the same instructions as the modules,
streamed equal to whole-image autograd in float64 (a stem of every form
and torchvision's Inception-v3 through Mixed_6a); refusals name the fx
node."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from conftest import compare, randomize_bn
from streamcnn.program import convert
from test_equivalence import FP64_TOL


class _Pools(nn.Module):
    """Every functional pooling form, positional and keyword arguments."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.c(x)
        x = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        x = torch.max_pool2d(x, 2, [])                 # ATen's: stride [] = kernel
        x = F.avg_pool2d(x, (3, 2), (1, 2), divisor_override=5)
        return F.max_pool2d(x, kernel_size=3, stride=None, dilation=2)


class _Modules(nn.Module):
    """_Pools with the module forms."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.p = nn.Sequential(
            nn.MaxPool2d(3, 2, 1, ceil_mode=True),
            nn.AvgPool2d(3, 1, 1, count_include_pad=False),
            nn.MaxPool2d(2),
            nn.AvgPool2d((3, 2), (1, 2), divisor_override=5),
            nn.MaxPool2d(3, dilation=2))

    def forward(self, x):
        return self.p(self.c(x))


def test_functional_forms_are_the_modules_instructions():
    f = _Pools()
    assert convert(f).program == convert(_Modules(f.c)).program


@pytest.mark.parametrize("tile", [(35, 47), (64, 90), (10**6, 10**6)])
def test_functional_pools_fp64(tile):
    torch.manual_seed(0)
    stem = _Pools().double()
    x = torch.randn(2, 3, 201, 187, dtype=torch.float64, requires_grad=True)
    sm = streamcnn.StreamingModule(stem, 10**6)
    assert sm.receptive_field == (35, 47)
    compare(stem, x, tile, FP64_TOL)


class _One(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.c(x))


@pytest.mark.parametrize("fn,match", [
    (lambda x: F.max_pool2d(x, 3, return_indices=True)[0], "return_indices=True"),
    (lambda x: F.max_pool2d_with_indices(x, 3)[0], "return_indices=True"),
    (lambda x: F.avg_pool2d(x, 2, divisor_override=0), "divisor_override=0"),
    (lambda x: F.max_pool2d(x, x.shape[2] // 4), "reads the shape of a tensor"),
    (lambda x: F.max_pool2d(x, x.size(3) // 4), "reads the shape of a tensor"),
    (lambda x: F.max_pool2d(x.permute(0, 2, 3, 1), 2), "permuted to N x H x W x C"),
])
def test_refused(fn, match):
    with pytest.raises(ValueError, match=r"fx node '.*'\): .*" + match):
        convert(_One(fn))


def _inception(upto):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    names = [n for n, _ in m.named_children()]
    stem = nn.Sequential(*[getattr(m, n) for n in names[:names.index(upto) + 1]])
    stem = stem.double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(2))
    return stem


def test_inception_v3_fp64():
    """Inception-v3 through Mixed_6a: Mixed_5b .. 5d pool a branch with
    F.avg_pool2d (count_include_pad, padding 1) and Mixed_6a with
    F.max_pool2d (stride 2), each joining its branches in one cat."""
    stem = _inception("Mixed_6a")
    sm = streamcnn.StreamingModule(stem, 10**6)
    assert sm.receptive_field == (159, 159) and sm.output_stride == (16, 16)
    x = torch.randn(1, 3, 250, 203, dtype=torch.float64, requires_grad=True)
    compare(stem, x, sm.receptive_field, FP64_TOL)
    compare(stem, x, (200, 10**6), FP64_TOL)

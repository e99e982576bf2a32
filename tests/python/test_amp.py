"""Half precision: under torch.autocast (CPU here; CUDA the same code path)
the stem runs in bfloat16 / float16 and weight gradients are summed over
tiles in float32. Streamed results must be as close to the float64 truth as
the whole-image pass in the same precision is (measured: identical output
errors, 7.5e-3 bf16 / 9.4e-4 fp16; gradient errors within a few % of the
whole-image ones)."""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import streamcnn
from conftest import randomize_bn

HALF = [torch.bfloat16, torch.float16]


def _err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def _resnet_stem():
    torch.manual_seed(0)
    r = torchvision.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1).eval()
    randomize_bn(stem, torch.Generator().manual_seed(2))
    return stem


def _truth(stem, x, g):
    s64 = copy.deepcopy(stem).double()
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    y = s64(x64)
    wrt = ([x64] if x.requires_grad else []) + list(s64.parameters())
    return y, torch.autograd.grad((y * g.double()).sum(), wrt)


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_matches_whole_image_precision(dtype):
    stem = _resnet_stem()
    sm = streamcnn.StreamingModule(stem, 96)
    x = torch.randn(1, 3, 200, 176)
    with torch.no_grad():
        g = torch.randn_like(stem(x))
    truth, gt = _truth(stem, x, g)
    params = list(stem.parameters())
    res = {}
    for name, f in (("stream", sm), ("whole", stem)):
        with torch.autocast("cpu", dtype=dtype):
            y = f(x)
        assert y.dtype == dtype
        grads = torch.autograd.grad((y.float() * g).sum(), params)
        assert all(gr.dtype == torch.float32 for gr in grads)
        res[name] = (_err(y, truth), max(_err(a, b) for a, b in zip(grads, gt)))
    (out_s, grad_s), (out_w, grad_w) = res["stream"], res["whole"]
    assert out_s <= 1.5 * out_w + 1e-3
    assert grad_s <= 1.5 * grad_w + 1e-3


@pytest.mark.parametrize("dtype", HALF)
def test_half_module_and_image(dtype):
    """Parameters and image in half precision, the input gradient too."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                         nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                         nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.MaxPool2d(2)).eval()
    randomize_bn(stem, torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 61, 47, requires_grad=True)
    with torch.no_grad():
        g = torch.randn_like(stem(x))
    truth, gt = _truth(stem, x, g)
    res = {}
    for name in ("stream", "whole"):
        sh = copy.deepcopy(stem).to(dtype)
        f = streamcnn.StreamingModule(sh, 23) if name == "stream" else sh
        xh = x.detach().to(dtype).requires_grad_()
        y = f(xh)
        assert y.dtype == dtype
        grads = torch.autograd.grad((y * g.to(dtype)).sum(), [xh] + list(sh.parameters()))
        assert all(gr.dtype == dtype for gr in grads)
        res[name] = (_err(y, truth), max(_err(a, b) for a, b in zip(grads, gt)))
    (out_s, grad_s), (out_w, grad_w) = res["stream"], res["whole"]
    assert out_s <= 1.5 * out_w + 1e-3, res
    assert grad_s <= 2 * grad_w + 1e-2, res


def test_autocast_with_uint8_image_and_normalisation():
    stem = _resnet_stem()
    mean, std = [124.0, 116.0, 104.0], [58.0, 57.0, 57.0]
    sm = streamcnn.StreamingModule(stem, 96, mean=mean, std=std)
    x8 = torch.randint(0, 256, (1, 3, 90, 110), dtype=torch.uint8)
    xf = (x8.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = sm(x8), stem(xf)
    assert y.dtype == torch.bfloat16
    truth = copy.deepcopy(stem).double()(xf.double())
    assert _err(y, truth) <= 1.5 * _err(ref, truth) + 1e-3


def test_autocast_compiled():
    stem = _resnet_stem()
    sm = streamcnn.StreamingModule(stem, 96)
    x = torch.randn(1, 3, 100, 90)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = sm(x)
        compiled = torch.compile(sm)(x)
    assert compiled.dtype == torch.bfloat16
    assert torch.equal(compiled, eager)


def test_autocast_leaves_float64_alone():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double()
    sm = streamcnn.StreamingModule(stem, 9)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sm(x)
    assert y.dtype == torch.float64 and torch.equal(y, sm(x))

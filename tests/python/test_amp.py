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
from conftest import DEVICES, randomize_bn

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


def _autocast_errors(stem, sm, x, dtype):
    """(output error, worst parameter-gradient error) against float64 of
    the streamed and of the whole-image pass under autocast; both give a
    finite output in the autocast dtype and float32 gradients."""
    with torch.no_grad():
        g = torch.randn_like(stem(x))
    truth, gt = _truth(stem, x, g)
    params = list(stem.parameters())
    res = {}
    for name, f in (("stream", sm), ("whole", stem)):
        with torch.autocast(x.device.type, dtype=dtype):
            y = f(x)
        assert y.dtype == dtype and bool(torch.isfinite(y).all())
        grads = torch.autograd.grad((y.float() * g).sum(), params)
        assert all(gr.dtype == torch.float32 for gr in grads)
        res[name] = (_err(y, truth), max(_err(a, b) for a, b in zip(grads, gt)))
    return res["stream"], res["whole"]


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_matches_whole_image_precision(dtype):
    stem = _resnet_stem()
    sm = streamcnn.StreamingModule(stem, 96)
    (out_s, grad_s), (out_w, grad_w) = _autocast_errors(stem, sm, torch.randn(1, 3, 200, 176),
                                                        dtype)
    assert out_s <= 1.5 * out_w + 1e-3
    assert grad_s <= 1.5 * grad_w + 1e-3


def _check_half_stream(stem, x, dtype, tile, check=None):
    """The stem converted to ``dtype`` (parameters and image), streamed in
    tiles of ``tile`` and whole: output and gradients (input included) in
    ``dtype`` and finite, and as close to the float64 truth as the
    whole-image pass's (within 1.5x and 2x + a little). ``check(sm)``
    looks at the StreamingModule first."""
    with torch.no_grad():
        g = torch.randn_like(stem(x))
    truth, gt = _truth(stem, x, g)
    res = {}
    for name in ("stream", "whole"):
        sh = copy.deepcopy(stem).to(dtype)
        f = streamcnn.StreamingModule(sh, tile) if name == "stream" else sh
        if check is not None and name == "stream":
            check(f)
        xh = x.detach().to(dtype).requires_grad_()
        y = f(xh)
        grads = torch.autograd.grad((y * g.to(dtype)).sum(), [xh] + list(sh.parameters()))
        assert y.dtype == dtype and all(gr.dtype == dtype for gr in grads)
        assert bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(a).all())
                                                     for a in grads), name
        res[name] = (_err(y, truth), max(_err(a, b) for a, b in zip(grads, gt)))
    (out_s, grad_s), (out_w, grad_w) = res["stream"], res["whole"]
    assert out_s <= 1.5 * out_w + 1e-3, res
    assert grad_s <= 2 * grad_w + 1e-2, res


@pytest.mark.parametrize("dtype", HALF)
def test_half_module_and_image(dtype):
    """Parameters and image in half precision, the input gradient too."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                         nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                         nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.MaxPool2d(2)).eval()
    randomize_bn(stem, torch.Generator().manual_seed(3))
    _check_half_stream(stem, torch.randn(2, 3, 61, 47, requires_grad=True), dtype, 23)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("pool", [dict(padding=8, count_include_pad=False),
                                  dict(ceil_mode=True)], ids=["exclude-pad", "ceil"])
def test_half_average_pool_of_large_sums(dtype, pool, device):
    """A 16 x 16 average pool whose divisors vary at the border (padding
    not counted; a ceil_mode window hanging over the edge) over activations
    of about 400: its window sums (up to 102400) pass float16's largest
    value (65504). ATen divides before its one rounding; the tiles divided
    window sums in float16 and gave inf."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(16, 5, **pool),
                         nn.Conv2d(4, 4, 1)).eval()
    with torch.no_grad():
        stem[0].weight.uniform_(0.6 / 27, 1.4 / 27)
        stem[0].bias.zero_()
    x = torch.empty(1, 3, 62, 57, device=device).uniform_(330, 470).requires_grad_()
    _check_half_stream(stem.to(device), x, dtype, 24)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [17, 18])
def test_bfloat16_one_column_tiles(tile, device):
    """oneDNN 3.10 (torch 2.11's CPU convolutions) computes a bfloat16
    convolution with a column stride of 2 and a one-column output of 5+
    rows wrongly (garbage, NaN; here the last tile column, 1 output column
    wide: errors of 0.3, varying between runs). Such a convolution now runs
    on its window's columns with stride 1 (on CUDA: cuDNN, as it is)."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 6, 3, 1, 2, dilation=2), nn.Conv2d(6, 6, 3, 2, 1),
                         nn.Conv2d(6, 4, 2)).eval().to(device)
    x = torch.randn(1, 3, 47, 53, device=device, requires_grad=True)

    def check(sm):
        assert sm.tiling(47, 53)["col_bounds"][-2:] == [25, 26]    # a one-column tile
        xb = x.detach().bfloat16()
        assert torch.equal(sm(xb), sm(xb))
    _check_half_stream(stem, x, torch.bfloat16, tile, check)


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


def _big_statistics_stem():
    """Activations of a few hundred (a first convolution of 0..255-scale
    pixels) and running variances past float16's largest value (65504)."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8)).eval()
    randomize_bn(stem, torch.Generator().manual_seed(4))
    with torch.no_grad():
        stem[0].weight.mul_(300)
        stem[1].running_var.uniform_(7e4, 1e5)
        stem[1].running_mean.fill_(50.0)
    return stem


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_autocast_keeps_batch_norm_parameters_float32(dtype, device):
    """Autocast leaves a batch norm's parameters float32; cast to float16,
    these running variances would be inf and the output all wrong (the
    library as of 2bb9fce: relative error 1.0 against the whole-image 6e-4)."""
    stem = _big_statistics_stem().to(device)
    sm = streamcnn.StreamingModule(stem, 21)
    res = _autocast_errors(stem, sm, torch.randn(2, 3, 40, 37, device=device), dtype)
    (out_s, grad_s), (out_w, grad_w) = res
    assert out_s <= 1.5 * out_w + 1e-3, res
    assert grad_s <= 1.5 * grad_w + 1e-2, res
    # the parameters were not cast for the call: still float32, same storage
    assert all(p.dtype == torch.float32 for p in stem.parameters())


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_leaves_a_stem_without_convolutions_alone(dtype):
    """Autocast casts convolutions and Linears only: a stem of batch norms,
    pools and activations runs in float32 there, and so it does here."""
    stem = nn.Sequential(nn.BatchNorm2d(3), nn.Sigmoid(), nn.MaxPool2d(3, 2)).eval()
    randomize_bn(stem, torch.Generator().manual_seed(5))
    sm = streamcnn.StreamingModule(stem, 9)
    x = torch.randn(1, 3, 30, 26)
    with torch.autocast("cpu", dtype=dtype):
        y, ref = sm(x), stem(x)
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("halo_cache", [True, False])
def test_half_module_with_float32_batch_norms(device, halo_cache):
    """module.half() with the batch norms kept float32 (a common recipe)
    works as in PyTorch: half values, float32 batch-norm gradients, also
    with a frozen batch-norm weight (whose backward reads no input)."""
    stem = _big_statistics_stem()
    with torch.no_grad():
        stem[1].running_var.uniform_(1e3, 2e3)  # float16 conv outputs stay finite
    stem = stem.half().to(device)
    for bn in (stem[1], stem[4]):
        bn.float()
    stem[4].weight.requires_grad_(False)
    sm = streamcnn.StreamingModule(stem, 21, halo_cache=halo_cache)
    x = torch.randn(2, 3, 40, 37, device=device, dtype=torch.float16, requires_grad=True)
    with torch.no_grad():
        g = torch.randn_like(stem(x))
    params = [p for p in stem.parameters() if p.requires_grad]
    res = {}
    for name, f in (("stream", sm), ("whole", stem)):
        y = f(x)
        assert y.dtype == torch.float16
        grads = torch.autograd.grad((y * g).sum(), [x] + params)
        assert [gr.dtype for gr in grads] == [x.dtype] + [p.dtype for p in params]
        res[name] = (y, grads)
    (y_s, g_s), (y_w, g_w) = res["stream"], res["whole"]
    assert _err(y_s, y_w.double()) <= 2e-3
    for a, b in zip(g_s, g_w):
        assert _err(a, b.double()) <= 1e-2


def test_uint8_image_with_float32_batch_norm_first():
    """With a uint8 image the computation takes the dtype of the first
    parameter that is not a batch norm's: here float16, after a float32
    batch norm of the pixels."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with torch.no_grad():
        stem[0].running_mean.fill_(120.0)
        stem[0].running_var.fill_(3600.0)
    stem[1].half()
    sm = streamcnn.StreamingModule(stem, 11)
    x8 = torch.randint(0, 256, (1, 3, 30, 25), dtype=torch.uint8)
    y = sm(x8)
    assert y.dtype == torch.float16
    ref = stem[2](stem[1](stem[0](x8.float()).half()))
    assert _err(y, ref.double()) <= 2e-3


def test_batch_norm_parameters_of_two_dtypes_are_refused():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval().half()
    stem[1].running_var.data = stem[1].running_var.float()
    sm = streamcnn.StreamingModule(stem, 9)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"running_var of instruction 1, .*\) is float32 "
                       r"but the image is float16.*may instead all be float32"):
        sm(x)
    # float32 batch-norm parameters in a float64 computation: refused too
    stem64 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval().double()
    stem64[1].float()
    with pytest.raises(TypeError, match="float64 but the stem's '1.weight' is torch.float32"):
        streamcnn.StreamingModule(stem64, 9)(torch.randn(1, 3, 20, 20, dtype=torch.float64))


@pytest.mark.parametrize("dtype", HALF)
def test_half_stem_normalises_in_float32(dtype):
    """mean / std stay float32 for a half-precision stem, made half before
    or after wrapping (and exact again after .double()): the gather
    normalises in float32 and rounds once, so the streamed output is as
    close to the float64 truth as the stem on the image normalised in
    float64 and then cast."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 8, 3)).eval()
    randomize_bn(stem, torch.Generator().manual_seed(6))
    mean, std = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    x8 = torch.randint(0, 256, (2, 3, 40, 37), dtype=torch.uint8)
    xf = (x8.double() - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    truth = copy.deepcopy(stem).double()(xf)
    stem[1:].to(dtype)  # the batch norm in front stays float32
    before = streamcnn.StreamingModule(stem, 15, mean=mean, std=std)
    after = streamcnn.StreamingModule(copy.deepcopy(stem).float(), 15, mean=mean, std=std)
    after.to(dtype)
    after.stem[0].float()
    for sm in (before, after):
        assert sm.norm_weight.dtype == sm.norm_bias.dtype == torch.float32
        y = sm(x8)
        assert y.dtype == dtype
        ref = stem(xf.to(dtype))  # normalised in float64, then cast
        assert _err(y, truth) <= 1.5 * _err(ref, truth) + 1e-3, (_err(y, truth), _err(ref, truth))
    after.double()  # constants exact in float64 again, not float32's rounding
    assert after.norm_weight.dtype == torch.float64
    assert _err(after(x8), after.stem(xf)) < 1e-10

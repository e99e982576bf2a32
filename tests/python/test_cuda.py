"""The CUDA path (issue 5), against whole-image autograd on the GPU: float64
at 1e-10, float32 with TF32 off at 1e-5 (stems without max-pool / ReLU
ties), CPU vs CUDA agreement, a uint8 image normalised per tile vs the same
image normalised in PyTorch, autocast as close to the float64 truth as the
whole-image autocast pass, deterministic runs bit-identical, with and
without halo caching; the tile kernels' results (normalising gather from
device and pinned images, gradient scatter-add) bit-identical to the CPU
kernels'; the sparse backward (skip-only bit-identical, boxes and restricted
tiles within 1e-12 of the dense backward); the channels instruction
(chunks and shuffles). Every test skips without a GPU, saying so."""

import copy
import random

import pytest
import torch
import torch.nn as nn

import streamcnn
from conftest import compare, randomize_bn, rel_err
from test_equivalence import FP32_TOL, FP64_TOL, _valid_size, random_stem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none here)")

CACHE = [True, False]


@pytest.fixture
def no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("halo_cache", CACHE)
@pytest.mark.parametrize("seed", [*range(10), "cat0", "cat1", "cat2", "cat3"])
def test_random_stems_fp64_cuda(seed, halo_cache):
    """Random stems; the "cat" seeds join branches along the channels (the
    cat instruction's copies into channel views of a tile buffer)."""
    if isinstance(seed, str):
        seed = 500 + int(seed[3:])
        stem = random_stem(seed, cat=True).cuda()
    else:
        stem = random_stem(seed).cuda()
    rng = random.Random(500 + seed)
    size = _valid_size(stem.cpu(), rng, 8, 60) or _valid_size(stem.cpu(), rng, 60, 120)
    stem.cuda()
    assert size is not None
    rf = streamcnn.StreamingModule(stem, 10**6, in_channels=3).receptive_field
    x = torch.randn(2, 3, *size, dtype=torch.float64, device="cuda", requires_grad=True)
    sm = streamcnn.StreamingModule(stem, (rf[0] + 3, rf[1] + 5), in_channels=3,
                                   halo_cache=halo_cache)
    compare(stem, x, sm.tile_size, FP64_TOL, sm=sm, in_channels=3)


@pytest.mark.parametrize("halo_cache", CACHE)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_selections_fp64_cuda(layout, halo_cache):
    """The channels instruction (chunks, slices, channel shuffles: strided
    channel views copied, the gradient scattered into zeros) on the GPU,
    in both tile layouts: a composed stem of test_channels and ShuffleNetV2
    0.5 to stage2."""
    from test_channels import Composed, _shufflenet
    for stem, size, tile in ((Composed().double(), (23, 19), (7, 7)),
                             (_shufflenet(4), (150, 130), (80, 80))):
        stem = stem.cuda()
        x = torch.randn(2, 3, *size, dtype=torch.float64, device="cuda")
        x = x.to(memory_format=layout).requires_grad_()
        sm = streamcnn.StreamingModule(stem, tile, halo_cache=halo_cache)
        compare(stem, x, tile, FP64_TOL, sm=sm)


@pytest.mark.parametrize("seed", range(4))
def test_smooth_stems_fp32_cuda_tf32_off(seed, no_tf32):
    stem = random_stem(100 + seed, smooth=True)
    rng = random.Random(seed)
    size = _valid_size(stem, rng, 8, 60) or _valid_size(stem, rng, 60, 120)
    stem = stem.float().cuda()
    x = torch.randn(2, 3, *size, device="cuda", requires_grad=True)
    rf = streamcnn.StreamingModule(stem, 10**6, in_channels=3).receptive_field
    compare(stem, x, (rf[0] + 3, rf[1] + 3), FP32_TOL, in_channels=3)


def _resnet_stem():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    r = tv.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2).eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    return stem


@pytest.mark.parametrize("halo_cache", CACHE)
def test_cpu_and_cuda_agree(halo_cache):
    stem = _resnet_stem().double()
    x = torch.randn(1, 3, 301, 263, dtype=torch.float64, requires_grad=True)
    out = {}
    for dev in ("cpu", "cuda"):
        s = copy.deepcopy(stem).to(dev)
        sm = streamcnn.StreamingModule(s, (160, 140), halo_cache=halo_cache)
        xd = x.detach().to(dev).requires_grad_()
        y = sm(xd)
        g = torch.ones_like(y) / y.numel()
        grads = torch.autograd.grad((y * g).sum(), [xd] + list(s.parameters()))
        out[dev] = [y.cpu()] + [t.cpu() for t in grads]
    for a, b in zip(out["cpu"], out["cuda"]):
        assert rel_err(b, a) < FP64_TOL


def test_uint8_image_normalised_per_tile_cuda():
    stem = _resnet_stem().double().cuda()
    mean, std = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    img = torch.randint(0, 256, (2, 3, 257, 229), dtype=torch.uint8, device="cuda")
    m = torch.tensor(mean, dtype=torch.float64, device="cuda").view(1, 3, 1, 1)
    d = torch.tensor(std, dtype=torch.float64, device="cuda").view(1, 3, 1, 1)
    ref = (img.double() - m) / d
    sm = streamcnn.StreamingModule(stem, 128, mean=mean, std=std)
    y, y_ref = sm(img), stem(ref)
    g = torch.randn_like(y_ref)
    a = torch.autograd.grad(y, list(stem.parameters()), g)
    b = torch.autograd.grad(y_ref, list(stem.parameters()), g)
    assert rel_err(y, y_ref) < FP64_TOL
    for u, v in zip(a, b):
        assert rel_err(u, v) < FP64_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda_as_close_as_whole_image(dtype):
    stem = _resnet_stem().cuda()
    x = torch.randn(1, 3, 320, 288, device="cuda")
    with torch.no_grad():
        g = torch.randn_like(stem(x))
    s64 = copy.deepcopy(stem).double()
    y64 = s64(x.double())
    g64 = torch.autograd.grad((y64 * g.double()).sum(), list(s64.parameters()))
    sm = streamcnn.StreamingModule(stem, 160)
    res = {}
    for name, f in (("stream", sm), ("whole", stem)):
        with torch.autocast("cuda", dtype=dtype):
            y = f(x)
        assert y.dtype == dtype
        grads = torch.autograd.grad((y.float() * g).sum(), list(stem.parameters()))
        assert all(t.dtype == torch.float32 for t in grads)
        res[name] = (rel_err(y.double(), y64),
                     max(rel_err(a.double(), b) for a, b in zip(grads, g64)))
    print(f"autocast {dtype}: stream out {res['stream'][0]:.2e} grad {res['stream'][1]:.2e}; "
          f"whole out {res['whole'][0]:.2e} grad {res['whole'][1]:.2e}")
    assert res["stream"][0] <= 1.5 * res["whole"][0] + 1e-3
    assert res["stream"][1] <= 1.5 * res["whole"][1] + 1e-3


@pytest.mark.parametrize("halo_cache", CACHE)
def test_deterministic_runs_are_bit_identical(halo_cache):
    stem = _resnet_stem().cuda()
    sm = streamcnn.StreamingModule(stem, 160, deterministic=True, halo_cache=halo_cache)
    x = torch.randn(1, 3, 320, 288, device="cuda", requires_grad=True)
    runs = []
    for _ in range(2):
        y = sm(x)
        runs.append([y] + list(torch.autograd.grad(y.square().sum(),
                                                   [x] + list(stem.parameters()))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the CUDA tile kernels against the CPU ones, bit for bit ----------------
# Stems of max pools only: with mean / std, the normalised image tile comes
# straight from the gather kernel and max pooling is exact, so the CUDA
# output must equal the CPU output bit for bit (tests/cuda/test_tile_elem.cu
# checks the same element code on the host; this runs the launches).

MEAN, STD = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]


def _pool_stem():
    return nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(2, 2))


@pytest.mark.parametrize("halo_cache", CACHE)
@pytest.mark.parametrize("where", ["cuda", "pinned"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16])
def test_gather_bit_identical_to_cpu(dtype, layout, where, halo_cache):
    gen = torch.Generator().manual_seed(3)
    if dtype == torch.uint8:
        img = torch.randint(0, 256, (2, 3, 203, 177), dtype=dtype, generator=gen)
    else:
        img = (torch.randn(2, 3, 203, 177, generator=gen) * 60 + 120).to(dtype)
    img = img.contiguous(memory_format=layout)
    sm = streamcnn.StreamingModule(_pool_stem(), 40, in_channels=3, mean=MEAN, std=STD,
                                   halo_cache=halo_cache)
    y_cpu = sm(img)
    src = img.pin_memory() if where == "pinned" else img.cuda()
    assert src.stride() == img.stride()
    y = sm.cuda()(src)
    assert y.device.type == "cuda" and y.dtype == y_cpu.dtype
    assert torch.equal(y.cpu(), y_cpu)


@pytest.mark.parametrize("halo_cache", CACHE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_scatter_add_bit_identical_to_cpu(dtype, halo_cache):
    """The image gradient: per-tile input gradients added into the image's
    (the copy kernel, accumulating). Overlapping 3 x 3 windows send up to
    four contributions to a pixel; integer gradients make every sum exact
    whatever the order of ATen's atomic adds."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 130, 98, generator=gen).to(dtype)
    stem = nn.Sequential(nn.MaxPool2d(3, stride=2), nn.MaxPool2d(3, stride=2, padding=1))
    sm = streamcnn.StreamingModule(stem, 37, in_channels=3, halo_cache=halo_cache)
    out = {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        y = sm.to(dev)(xd)
        g = torch.randint(-4, 5, y.shape, generator=gen.manual_seed(5)).to(dtype).to(dev)
        out[dev] = (y.cpu(), torch.autograd.grad(y, xd, g)[0].cpu())
    assert torch.equal(out["cpu"][0], out["cuda"][0])
    assert torch.equal(out["cpu"][1], out["cuda"][1])


# ---- the sparse backward on the GPU (op/sparse.c: non-zero maps copied to
# host memory, boxes, restricted tiles with pending halo gradients) ---------

def sparse_backward_checks(device, halo_cache):
    """The sparse backward of a max-pool head and of a gradient crossing
    tile borders, on ``device``: skip-only bit-identical to the dense
    backward (deterministic kernels), boxes / restricted tiles within 1e-12
    of it (float64) and within 1e-10 of whole-image autograd on the CPU."""
    from test_sparse_backward import _autograd, _border_gradient, _grads, _image, _stem
    stem = _stem(torch.float64)
    x = _image(2, torch.float64)
    g_border, _ = _border_gradient(stem, x)
    dev_stem, dev_x = copy.deepcopy(stem).to(device), x.to(device)

    def grads(head, mode):
        got, _, tiles = _grads(dev_stem, dev_x, head, mode, halo_cache, deterministic=True)
        return [g.cpu() for g in got], tiles

    for head in ("max", g_border):
        dense, t0 = grads(head, "0")
        skip, ts = grads(head, "skip")
        sparse, t1 = grads(head, "1")
        truth = _autograd(stem, x, head)
        assert t0["skipped"] == 0 and ts["skipped"] > 0 and t1["skipped"] > 0, (t0, ts, t1)
        assert t1["boxed"] + t1["restricted"] > 0, t1
        if halo_cache:
            assert t1["restricted"] > 0, t1
        for a, b in zip(dense, skip):
            assert torch.equal(a, b)
        for a, b, c in zip(dense, sparse, truth):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
            assert (b - c).abs().max().item() <= 1e-10


@pytest.mark.parametrize("halo_cache", CACHE)
def test_sparse_backward_cuda(halo_cache):
    sparse_backward_checks("cuda", halo_cache)

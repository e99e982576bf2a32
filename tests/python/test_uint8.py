"""uint8 images and per-tile mean/std normalisation: the tile gather converts
the pixels, so the float image never exists; results equal the whole-image
pass on the normalised float image."""

import pytest
import torch
import torch.nn as nn
import torchvision

import streamcnn
from conftest import randomize_bn, rel_err

MEAN, STD = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]


def _resnet_stem(dtype=torch.float64):
    torch.manual_seed(0)
    r = torchvision.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1).eval().to(dtype)
    randomize_bn(stem, torch.Generator().manual_seed(1))
    return stem


def _normalised(x8, dtype, mean=MEAN, std=STD):
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)
    return (x8.to(dtype) - m) / s


def _image(n=2, h=157, w=203, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def _check(stem, sm, x8, xf, tol):
    params = [p for p in stem.parameters() if p.requires_grad]
    y, ref = sm(x8), stem(xf)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert rel_err(y, ref) < tol
    g = torch.randn_like(ref)
    got = torch.autograd.grad((y * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(got, want):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tile", [96, 160])
def test_uint8_with_mean_std_fp64(channels_last, tile):
    stem = _resnet_stem()
    sm = streamcnn.StreamingModule(stem, tile, mean=MEAN, std=STD)
    x8 = _image()
    if channels_last:
        x8 = x8.contiguous(memory_format=torch.channels_last)
    _check(stem, sm, x8, _normalised(x8, torch.float64), 1e-10)


def test_uint8_fp32_channels_last_tiles():
    stem = _resnet_stem(torch.float32)
    sm = streamcnn.StreamingModule(stem, 128, mean=MEAN, std=STD)
    x8 = _image(1, 181, 140)
    y, ref = sm(x8), stem(_normalised(x8, torch.float32))
    assert y.dtype == torch.float32 and rel_err(y, ref) < 1e-5


def test_uint8_without_normalisation_and_pool_first():
    """Raw 0..255 values; the image feeds a max pool first (not a conv)."""
    stem = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.Conv2d(3, 4, 3, padding=1),
                         nn.ReLU()).double()
    sm = streamcnn.StreamingModule(stem, 21)
    x8 = _image(2, 45, 38)
    _check(stem, sm, x8, x8.double(), 1e-12)


def test_mean_std_on_float_images_and_scalars():
    stem = _resnet_stem()
    sm = streamcnn.StreamingModule(stem, 96, mean=0.5, std=0.25)
    x = torch.rand(1, 3, 70, 90, dtype=torch.float64)
    _check(stem, sm, x, (x - 0.5) / 0.25, 1e-10)
    # the normalisation is part of the state and moves with .to()
    assert set(sm.state_dict()) >= {"norm_weight", "norm_bias"}
    assert "norm_weight" not in streamcnn.StreamingModule(stem, 96).state_dict()


def test_uint8_scripted_and_op_checks(tmp_path):
    stem = _resnet_stem(torch.float32)
    sm = streamcnn.StreamingModule(stem, 128, mean=MEAN, std=STD)
    x8 = _image(1, 100, 120)
    scripted = torch.jit.script(sm)
    path = tmp_path / "sm.pt"
    scripted.save(str(path))
    assert torch.equal(torch.jit.load(str(path))(x8), sm(x8))
    params = [p.detach() for p in sm.stream_params()]
    torch.library.opcheck(torch.ops.streamcnn.forward.default,
                          (x8, params, sm.program, sm.tile_size))
    y = torch.ops.streamcnn.forward(x8, params, sm.program, sm.tile_size)
    mask = [True] + [False] * len(params)
    with pytest.raises(RuntimeError, match="uint8 image has no gradient"):
        torch.ops.streamcnn.backward(torch.ones_like(y), x8, params, sm.program,
                                     sm.tile_size, mask)


def test_gradient_penalty_needs_float_image():
    from streamcnn.reference import run_program
    stem = _resnet_stem()
    sm = streamcnn.StreamingModule(stem, 96, mean=MEAN, std=STD)
    x8 = _image(1, 60, 50)
    assert rel_err(run_program(x8, sm.stream_params(), sm.program),
                   stem(_normalised(x8, torch.float64))) < 1e-12


def test_bad_normalisation_and_dtypes():
    stem = _resnet_stem()
    with pytest.raises(ValueError, match="1 or 3 values"):
        streamcnn.StreamingModule(stem, 96, mean=[1.0, 2.0], std=STD)
    with pytest.raises(ValueError, match="std finite and positive"):
        streamcnn.StreamingModule(stem, 96, mean=MEAN, std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        streamcnn.StreamingModule(stem, 96, mean=float("nan"))
    sm = streamcnn.StreamingModule(stem, 96, mean=MEAN, std=STD)
    # parameters of two dtypes: no single compute dtype for a uint8 image
    stem[0].weight.data = stem[0].weight.data.float()
    with pytest.raises(TypeError, match="parameters' dtype"):
        sm(_image(1, 40, 40))
    with pytest.raises(RuntimeError, match=r"is float64 but the computation \(uint8 image: "
                                           r"its parameters' narrowest dtype\) is float32"):
        torch.ops.streamcnn.forward(_image(1, 40, 40), sm.stream_params(), sm.program,
                                    sm.tile_size)


def test_uint8_compiled_and_exported():
    stem = _resnet_stem(torch.float32)
    sm = streamcnn.StreamingModule(stem, 128, mean=MEAN, std=STD)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))
    model = nn.Sequential(sm, head).eval()
    x8 = _image(1, 97, 131)
    eager = model(x8)
    assert rel_err(torch.compile(model)(x8), eager) < 1e-5
    ep = torch.export.export(model, (x8,))
    assert rel_err(ep.module()(x8), eager) < 1e-5


def _aten_convolutions(f):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        f()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_normalisation_fused_into_the_tile_gather(dtype):
    """mean / std run in the image gather (one pass from the uint8 pixels
    to the normalised tile): no convolution is called for them, forward or
    backward, and the results equal the whole-image pass on the normalised
    image (float64: 1e-10)."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2)).eval().to(dtype)
    sm = streamcnn.StreamingModule(stem, 32, mean=MEAN, std=STD)
    x8 = _image(2, 70, 64)
    tiles = sm.tiling(70, 64)["tiles"]
    n_tiles = tiles[0] * tiles[1]
    y = None

    def forward():
        nonlocal y
        y = sm(x8)
    assert _aten_convolutions(forward) == 2 * n_tiles  # the stem's two only
    assert _aten_convolutions(lambda: y.float().square().sum().backward()) == 2 * n_tiles
    ref = stem(_normalised(x8, torch.float64).to(dtype))
    if dtype == torch.bfloat16:  # as close to the float64 truth as PyTorch
        truth = stem.double()(_normalised(x8, torch.float64))
        assert rel_err(y, truth) <= 1.5 * rel_err(ref, truth) + 1e-3
    else:
        assert rel_err(y, ref) < {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


def test_trained_first_depthwise_conv_is_not_fused():
    """A stem whose own first layer is a depthwise 1 x 1 convolution: fused
    into the gather when its weight is frozen, run as a convolution when it
    trains (its gradient needs the image tile); exact either way."""
    stem = nn.Sequential(nn.Conv2d(3, 3, 1, groups=3), nn.Conv2d(3, 4, 3), nn.ReLU()).double()
    x = torch.randn(1, 3, 40, 37, dtype=torch.float64, requires_grad=True)
    for trained in (True, False):
        stem[0].requires_grad_(trained)
        sm = streamcnn.StreamingModule(stem, 16)
        params = [x] + [p for p in stem.parameters() if p.requires_grad]
        g = torch.randn(1, 4, 38, 35, dtype=torch.float64)
        a = torch.autograd.grad(sm(x), params, g)
        b = torch.autograd.grad(stem(x), params, g)
        assert max(rel_err(u, v) for u, v in zip(a, b)) < 1e-10
        n_tiles = sm.tiling(40, 37)["tiles"][0] * sm.tiling(40, 37)["tiles"][1]
        with torch.no_grad():
            assert _aten_convolutions(lambda: sm(x)) == n_tiles  # inference: fused


def test_loaded_normalisation_survives_dtype_and_device_moves():
    """mean / std loaded from a state_dict are what .half() / .double()
    rebuild from (not the constructor's)."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3)).double()
    a = streamcnn.StreamingModule(stem, 9, mean=MEAN, std=STD)
    b = streamcnn.StreamingModule(stem, 9, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    b.load_state_dict(a.state_dict())
    b.float().double()
    x8 = _image(1, 20, 20)
    assert rel_err(b(x8), a(x8)) < 1e-12


def test_parameter_free_stem_normalises_in_the_image_dtype():
    """A stem without parameters computes in the image's dtype; its mean /
    std follow that dtype (exact in float64), whatever the buffers' dtype."""
    stem = nn.Sequential(nn.AvgPool2d(3, 2), nn.Tanh())
    sm = streamcnn.StreamingModule(stem, 9, in_channels=3, mean=MEAN, std=STD)
    x = torch.rand(1, 3, 30, 27, dtype=torch.float64) * 255
    xf = _normalised(x, torch.float64)
    for moved in (sm, sm.double(), sm.float()):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            y = moved(x.to(dtype))
            assert y.dtype == dtype and rel_err(y, stem(xf)) < tol


def test_normalisation_made_on_the_stems_device():
    """mean / std are made on the device of the stem's parameters (a stem
    already on the GPU gets them there, not on the CPU to be moved by hand):
    checked with the meta device, which needs no GPU."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).to("meta")
    sm = streamcnn.StreamingModule(stem, 9, mean=MEAN, std=STD)
    assert sm.norm_weight.device.type == "meta" and sm.norm_bias.device.type == "meta"
    assert sm.norm_weight.dtype == torch.float32
    cpu = streamcnn.StreamingModule(nn.Sequential(nn.Conv2d(3, 4, 3)), 9, mean=MEAN, std=STD)
    assert cpu.norm_weight.device.type == "cpu"

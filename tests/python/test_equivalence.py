"""Streamed forward/backward equals whole-image autograd (fp64 <= 1e-10,
fp32 <= 1e-5) on random stems, odd sizes, all tile sizes, torchvision
ResNet-18, channels_last and non-contiguous inputs."""

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from conftest import DEVICES, compare, randomize_bn, rel_err

FP64_TOL = 1e-10
FP32_TOL = 1e-5


class Residual(nn.Module):
    """body(x) + skip(x), in the three spellings fx sees."""

    def __init__(self, body, skip, style):
        super().__init__()
        self.body, self.skip, self.style = body, skip, style

    def forward(self, x):
        out = self.body(x)
        if self.style == 0:
            return out + self.skip(x)
        if self.style == 1:
            out += self.skip(x)
            return F.relu(out)
        return torch.add(self.skip(x), out).relu()


def _act(rng, smooth=False):
    smooth_acts = [nn.SiLU, nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.Sigmoid, nn.Tanh,
                   nn.Identity, lambda: nn.Dropout(0.3)]
    kinked = [lambda: nn.ReLU(inplace=rng.random() < 0.5), nn.ReLU6,
              lambda: nn.LeakyReLU(0.1), nn.Hardswish]
    return rng.choice(smooth_acts if smooth else smooth_acts + kinked)()


def _conv(rng, cin):
    k = rng.randint(1, 5)
    d = rng.choice([1, 1, 2]) if k > 1 else 1
    s = rng.choice([1, 1, 2, 3])
    if s == 1 and rng.random() < 0.2:
        pad = "same"
    else:
        pad = rng.randint(0, (d * (k - 1)) // 2 + 1)
    g = rng.choice([g for g in (1, 2, cin) if cin % g == 0])
    cout = g * rng.randint(1, 3)
    kw = rng.randint(1, 5) if rng.random() < 0.3 else k  # rectangular kernels
    if pad == "same":
        kw = k
    return nn.Conv2d(cin, cout, (k, kw), stride=s, padding=pad, dilation=d, groups=g,
                     bias=rng.random() < 0.6), cout


class Join(nn.Module):
    """torch.cat along the channels of branches that keep the size (and,
    with keep_input, of the input itself), as DenseNet and Inception join."""

    def __init__(self, branches, keep_input, spelling):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.keep_input, self.spelling = keep_input, spelling

    def forward(self, x):
        parts = ([x] if self.keep_input else []) + [b(x) for b in self.branches]
        if self.spelling == 0:
            return torch.cat(parts, 1)
        if self.spelling == 1:
            return torch.cat(parts, dim=-3)
        return torch.concat(tuple(parts), dim=1)


def _join(rng, c, smooth):
    """A random Join of c channels in: 1 to 3 branches of size-keeping
    convolutions (odd kernels, dilation, groups), pools and activations."""
    branches = []
    for _ in range(rng.randint(1, 3)):
        k, d = rng.choice([1, 3, 5]), rng.choice([1, 1, 2])
        pick = rng.random()
        if pick < 0.6:
            g = rng.choice([g for g in (1, c) if c % g == 0])
            cout = g * rng.randint(1, 2)
            branch = nn.Sequential(nn.Conv2d(c, cout, k, padding=d * (k // 2), dilation=d,
                                              groups=g, bias=rng.random() < 0.5),
                                   _act(rng, smooth))
        elif pick < 0.8 or smooth:
            branch = nn.AvgPool2d(3, 1, 1, count_include_pad=rng.random() < 0.5)
        else:
            branch = nn.MaxPool2d(3, 1, 1)
        branches.append(branch)
    return Join(branches, keep_input=rng.random() < 0.6, spelling=rng.randint(0, 2))


def random_stem(seed: int, in_ch: int = 3, smooth: bool = False, cat: bool = False) -> nn.Module:
    """A seeded random stem of supported layers; smooth=True leaves out
    max pooling and piecewise-linear activations (no near-tie flips, so
    float32 gradients are comparable at 1e-5); cat=True adds joins of
    branches along the channels (Join)."""
    rng = random.Random(seed)
    layers, c = [], in_ch
    kinds = ["conv", "conv", "avgpool", "bn", "act", "res"] + ([] if smooth else ["maxpool"])
    if cat:
        kinds += ["join", "join"]
    for _ in range(rng.randint(2, 6)):
        kind = rng.choice(kinds)
        if kind == "join":
            m = _join(rng, c, smooth)
            with torch.no_grad():
                c = m(torch.zeros(1, c, 9, 9)).shape[1]
            layers.append(m)
        elif kind == "conv":
            m, c = _conv(rng, c)
            layers.append(m)
        elif kind == "maxpool":
            k = rng.randint(1, 3)
            d = rng.choice([1, 2]) if k > 1 else 1
            layers.append(nn.MaxPool2d(k, stride=rng.randint(1, 3),
                                       padding=rng.randint(0, k // 2),
                                       dilation=d, ceil_mode=rng.random() < 0.5))
        elif kind == "avgpool":
            k = rng.randint(1, 3)
            layers.append(nn.AvgPool2d(k, stride=rng.randint(1, 3),
                                       padding=rng.randint(0, k // 2),
                                       ceil_mode=rng.random() < 0.5,
                                       count_include_pad=rng.random() < 0.5,
                                       divisor_override=rng.choice([None, None, 2])))
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c, affine=rng.random() < 0.8))
        elif kind == "act":
            layers.append(_act(rng, smooth))
        else:
            s = rng.choice([1, 2])
            cout = c if s == 1 and rng.random() < 0.5 else c + rng.randint(1, 3)
            body = nn.Sequential(nn.Conv2d(c, cout, 3, stride=s, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), _act(rng, smooth),
                                 nn.Conv2d(cout, cout, 3, padding=1))
            skip = nn.Identity() if (s == 1 and cout == c) else nn.Sequential(
                nn.Conv2d(c, cout, 1, stride=s, bias=False), nn.BatchNorm2d(cout))
            layers.append(Residual(body, skip, rng.randint(0, 2)))
            c = cout
    stem = nn.Sequential(*layers).double().eval()
    gen = torch.Generator().manual_seed(seed)
    for p in stem.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    randomize_bn(stem, gen)
    return stem


def _valid_size(stem, rng, lo, hi):
    """A random (h, w) for which the whole-image pass works and no max-pool
    window lies entirely in padding (ATen then outputs -inf and its backward
    writes through an out-of-range index: a PyTorch quirk, not a case to
    compare against)."""
    empty_window = []
    hooks = [m.register_forward_hook(
        lambda m, i, o: empty_window.append(not torch.isfinite(o).all()))
        for m in stem.modules() if isinstance(m, nn.MaxPool2d)]
    try:
        for _ in range(200):
            h, w = rng.randint(lo, hi), rng.randint(lo, hi)
            empty_window.clear()
            try:
                with torch.no_grad():
                    stem(torch.zeros(1, 3, h, w, dtype=torch.float64))
            except RuntimeError:
                continue
            if not any(empty_window):
                return h, w
        return None
    finally:
        for hk in hooks:
            hk.remove()


@pytest.mark.parametrize("seed", range(40))
def test_random_stems_fp64(seed):
    stem = random_stem(seed)
    sm = streamcnn.StreamingModule(stem, 10**6, in_channels=3)
    rng = random.Random(1000 + seed)
    size = _valid_size(stem, rng, 1, 40) or _valid_size(stem, rng, 40, 120)
    assert size is not None, "no image size works for this stem"
    h, w = size
    n = rng.choice([1, 3])
    x = torch.randn(n, 3, h, w, dtype=torch.float64, requires_grad=True)
    rf_h, rf_w = sm.receptive_field
    tiles = {(rf_h, rf_w), (rf_h + rng.randint(1, 9), rf_w + rng.randint(1, 9)),
             (max(h, rf_h) + 5, max(w, rf_w) + 5)}
    for t in tiles:
        compare(stem, x, t, FP64_TOL, in_channels=3)


@pytest.mark.parametrize("seed", range(8))
def test_random_stems_fp32(seed):
    stem = random_stem(100 + seed, smooth=True)
    rng = random.Random(seed)
    size = _valid_size(stem, rng, 8, 40) or _valid_size(stem, rng, 40, 120)
    assert size is not None, "no image size works for this stem"
    stem.float()
    x = torch.randn(2, 3, *size, requires_grad=True)
    rf = streamcnn.StreamingModule(stem, 10**6, in_channels=3).receptive_field
    compare(stem, x, (rf[0] + 3, rf[1] + 3), FP32_TOL, in_channels=3)


def _resnet18_stem():
    tv = pytest.importorskip("torchvision")
    r = tv.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2)
    stem = stem.double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(0))
    return stem


def test_resnet18_receptive_field():
    sm = streamcnn.StreamingModule(_resnet18_stem(), 512)
    assert sm.receptive_field == (99, 99)
    assert sm.output_stride == (8, 8)


@pytest.mark.parametrize("tile", [99, 140, (171, 230), 4096])
def test_resnet18_conv1_to_layer2(tile):
    stem = _resnet18_stem()
    x = torch.randn(1, 3, 97, 131, dtype=torch.float64, requires_grad=True)
    compare(stem, x, tile, FP64_TOL)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_resnet18_fp64_layouts_many_sizes(layout):
    """Exactness on many batch / size / tile combinations, both layouts."""
    stem = _resnet18_stem()
    rng = random.Random(7)
    for _ in range(6):
        n, h, w = rng.choice([1, 2, 3]), rng.randint(40, 130), rng.randint(40, 130)
        x = torch.randn(n, 3, h, w, dtype=torch.float64).to(memory_format=layout)
        compare(stem, x.requires_grad_(), rng.choice([99, 120, 150, 200]), FP64_TOL)


def test_resnet18_batch3_fp32():
    """float32 ResNet-18: output at 1e-5; gradients against float64 under
    TIE_BOUND (max-pool / ReLU near-ties, see conftest)."""
    stem = _resnet18_stem().float()
    rng = random.Random(3)
    for _ in range(4):
        n, h, w = rng.choice([1, 3]), rng.randint(40, 130), rng.randint(40, 130)
        x = torch.randn(n, 3, h, w, requires_grad=True)
        compare(stem, x, rng.choice([99, 150, 200]), FP32_TOL, ties=True)


def _smooth_resnet_stem():
    """ResNet-18 conv1..layer2 with SiLU for ReLU and an average pool for the
    max pool: the same geometry, residuals and batch norms, no near-ties."""
    tv = pytest.importorskip("torchvision")
    r = tv.models.resnet18(weights=None)
    for m in r.modules():
        for name, child in m.named_children():
            if isinstance(child, nn.ReLU):
                setattr(m, name, nn.SiLU())
    stem = nn.Sequential(r.conv1, r.bn1, nn.SiLU(), nn.AvgPool2d(3, 2, 1), r.layer1, r.layer2)
    stem = stem.eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    return stem


def test_smooth_resnet_fp32():
    stem = _smooth_resnet_stem()
    rng = random.Random(5)
    for _ in range(3):
        n, h, w = rng.choice([1, 3]), rng.randint(40, 130), rng.randint(40, 130)
        x = torch.randn(n, 3, h, w, requires_grad=True)
        compare(stem, x, rng.choice([99, 150, 200]), FP32_TOL)


def test_channels_last_and_noncontiguous():
    stem = _resnet18_stem()
    base = torch.randn(2, 3, 90, 77, dtype=torch.float64)
    x_cl = base.to(memory_format=torch.channels_last).requires_grad_()
    compare(stem, x_cl, 130, FP64_TOL)
    wide = torch.randn(2, 3, 90, 160, dtype=torch.float64)
    x_nc = wide[:, :, :, ::2].requires_grad_()  # strided view, not contiguous
    assert not x_nc.is_contiguous()
    compare(stem, x_nc, 130, FP64_TOL)
    x_t = torch.randn(2, 3, 77, 90, dtype=torch.float64).transpose(2, 3).requires_grad_()
    compare(stem, x_t, (120, 150), FP64_TOL)


def test_one_row_strips():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, (1, 5), padding=(0, 2)), nn.MaxPool2d((1, 3), (1, 2)),
                         nn.Conv2d(4, 2, 3, padding=1)).double().eval()
    x = torch.randn(2, 3, 1, 57, dtype=torch.float64, requires_grad=True)
    for t in [(5, 13), (6, 20), (64, 64)]:
        compare(stem, x, t, FP64_TOL)
    x = torch.randn(1, 3, 45, 1, dtype=torch.float64, requires_grad=True)
    stem2 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1)).double().eval()
    compare(stem2, x, (5, 5), FP64_TOL)


def test_padding_only_outputs():
    """Output rows that see only zero padding (padding > kernel reach)."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 1, padding=3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 3, padding=1)).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(3))
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    for t in [3, 4, 7, 40]:
        compare(stem, x, t, FP64_TOL)


def test_avgpool_divisors():
    """count_include_pad both ways, ceil_mode windows hanging over the edge."""
    for cip in (True, False):
        for ceil in (True, False):
            stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1),
                                 nn.AvgPool2d(3, 2, padding=1, ceil_mode=ceil,
                                              count_include_pad=cip),
                                 nn.AvgPool2d(2, 3, ceil_mode=ceil, count_include_pad=cip),
                                 ).double().eval()
            x = torch.randn(2, 2, 30, 23, dtype=torch.float64, requires_grad=True)
            for t in [9, 15, 64]:
                compare(stem, x, t, FP64_TOL)


def test_same_padding_even_kernel_and_groups():
    stem = nn.Sequential(nn.Conv2d(4, 8, 4, padding="same", groups=2),
                         nn.Conv2d(8, 8, (2, 5), padding="same", dilation=(3, 1), groups=8,
                                   bias=False),
                         nn.LeakyReLU(-0.3), nn.MaxPool2d(2, ceil_mode=True),
                         nn.Conv2d(8, 3, 3, stride=(2, 1), padding=(0, 2))).double().eval()
    x = torch.randn(1, 4, 31, 26, dtype=torch.float64, requires_grad=True)
    for t in [(12, 13), (20, 30), 100]:
        compare(stem, x, t, FP64_TOL)


def test_shared_module_used_twice():
    conv = nn.Conv2d(3, 3, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = conv, nn.Tanh()

        def forward(self, x):
            return self.conv(self.act(self.conv(x))) + x

    stem = Twice().double().eval()
    x = torch.randn(1, 3, 17, 21, dtype=torch.float64, requires_grad=True)
    compare(stem, x, 7, FP64_TOL)
    compare(stem, x, 12, FP64_TOL)


def test_frozen_parameters_and_image_without_grad():
    stem = _resnet18_stem()
    for p in list(stem[0].parameters()) + list(stem[1].parameters()):
        p.requires_grad_(False)
    x = torch.randn(1, 3, 64, 70, dtype=torch.float64)
    compare(stem, x, 120, FP64_TOL)
    sm = streamcnn.StreamingModule(stem, 120)
    sm(x).sum().backward()
    assert stem[0].weight.grad is None and stem[1].weight.grad is None
    assert stem[4][0].conv1.weight.grad is not None


def test_parameters_read_at_call_time():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double().eval()
    sm = streamcnn.StreamingModule(stem, 9)
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        stem[1].running_mean.add_(0.5)
    assert rel_err(sm(x), stem(x)) < FP64_TOL
    stem.float()
    xf = x.float()
    assert rel_err(sm(xf), stem(xf)) < FP32_TOL


def test_train_mode_keeps_batchnorm_frozen():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    sm = streamcnn.StreamingModule(stem, 9)
    sm.train()
    assert sm.training and stem.training and stem[0].training
    assert not stem[1].training and not stem[2].training
    sm.eval()
    assert not stem.training and not stem[0].training
    x = torch.randn(1, 3, 12, 12)
    assert rel_err(sm(x), stem.eval()(x)) < FP32_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_devices_fp64(device):
    stem = random_stem(7).to(device)
    x = torch.randn(2, 3, 33, 35, dtype=torch.float64, device=device, requires_grad=True)
    compare(stem, x, 19, FP64_TOL, in_channels=3)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3, padding=1, stride=2),
                                   nn.MaxPool2d(3, 2, 1), nn.BatchNorm2d(3)])
def test_bare_layer_as_the_stem(layer):
    """One torch.nn layer, not wrapped in a Sequential (fx would trace into
    its forward): converted as a layer; state_dict keys and frozen batch norm
    as for any stem."""
    layer = layer.double().eval()
    randomize_bn(layer, torch.Generator().manual_seed(0))
    sm = streamcnn.StreamingModule(layer, 9, in_channels=3)
    x = torch.randn(2, 3, 21, 17, dtype=torch.float64, requires_grad=True)
    compare(layer, x, 9, 1e-12, sm=sm)
    assert set(sm.state_dict()) == {f"module.{k}" for k in layer.state_dict()}
    sm.train()
    assert not isinstance(layer, nn.BatchNorm2d) or not layer.training


@pytest.mark.parametrize("halo_cache", [True, False])
@pytest.mark.parametrize("frozen", ["bn", "weights", "early", "all"])
def test_frozen_layers_keep_less_and_stay_exact(frozen, halo_cache):
    """A layer linear in its input (conv, frozen-statistics batch norm)
    whose weight takes no gradient keeps no input for its backward: the
    conv's input gradient reads only the input's shape, the batch norm's is
    g * w / sqrt(var + eps). The gradients stay exact, image's included."""
    stem = _resnet18_stem()
    for name, p in stem.named_parameters():
        p.requires_grad_(not (
            (frozen == "bn" and p.dim() == 1 and "conv" not in name) or
            (frozen == "weights" and name.endswith("weight")) or
            (frozen == "early" and name.split(".")[0] in ("0", "1", "4")) or
            frozen == "all"))
    sm = streamcnn.StreamingModule(stem, 120, halo_cache=halo_cache)
    for grad_x in (False, True):
        if frozen == "all" and not grad_x:
            continue
        x = torch.randn(1, 3, 150, 130, dtype=torch.float64, requires_grad=grad_x)
        compare(stem, x, 120, FP64_TOL, sm=sm)


def test_frozen_channel_ops_stay_exact():
    """The same for ConvNeXt's channel linears and layer scales (frozen:
    no input kept) next to trainable ones."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    stem = tv.models.convnext_tiny(weights=None).features[:2].double().eval()
    with torch.no_grad():
        for blk in stem.modules():
            if type(blk).__name__ == "CNBlock":
                blk.layer_scale.uniform_(0.5, 1.5)
    for i, blk in enumerate(m for m in stem.modules() if type(m).__name__ == "CNBlock"):
        if i % 2 == 0:  # every other block frozen but for its depthwise conv
            blk.layer_scale.requires_grad_(False)
            for lin in (blk.block[3], blk.block[5]):
                lin.weight.requires_grad_(False)
    x = torch.randn(1, 3, 77, 69, dtype=torch.float64, requires_grad=True)
    compare(stem, x, 224, FP64_TOL)


class _ConvBN(nn.Module):
    """conv (with bias) -> BN -> ReLU, a conv -> BN whose conv output is
    also read elsewhere (not fused), and a conv -> BN ending the stem."""

    def __init__(self, affine=True):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6, affine=affine)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, stride=2), nn.BatchNorm2d(6)
        self.c3, self.b3 = nn.Conv2d(6, 5, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = self.c2(y)
        return self.b3(self.c3(torch.relu(self.b2(z) + z)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["trainable", "frozen_weights", "zero_gamma", "not_affine",
                                  "cone", "frozen_bn", "beta_only"])
def test_batch_norm_folded_into_its_conv_is_exact(case, device):
    """In float32 / float64 a batch norm reading a conv's output alone is
    folded into it (weight w * s, bias (b - mean) * s + beta); its gradients
    come from the conv's weight gradient against the folded weight and the
    output gradient's channel sums, summed over the tiles and converted once
    (d/dgamma = inv * (<w, gw> + (b - mean) * sum g)): exact, also with
    gamma = 0, a conv bias, no affine, a frozen conv weight, a frozen batch
    norm, and only the batch norms' biases trained (no weight or input
    gradient: the sums alone)."""
    torch.manual_seed(1)
    stem = _ConvBN(affine=case != "not_affine").double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(2))
    stem.to(device)
    if case == "zero_gamma":
        with torch.no_grad():
            stem.b1.weight[1:3] = 0
            stem.b3.weight.zero_()
    if case in ("frozen_weights", "beta_only"):
        for c in (stem.c1, stem.c2, stem.c3):  # beta_only: the conv biases too
            c.weight.requires_grad_(False)
            if c.bias is not None:
                c.bias.requires_grad_(case == "frozen_weights")
    if case in ("frozen_bn", "beta_only"):
        for b in (stem.b1, stem.b2, stem.b3):
            b.weight.requires_grad_(False)
            b.bias.requires_grad_(case == "beta_only")
    sm = streamcnn.StreamingModule(stem, 24, halo_cache=case != "cone")
    x = torch.randn(2, 3, 41, 37, dtype=torch.float64, device=device,
                    requires_grad=case != "beta_only")
    compare(stem, x, 24, FP64_TOL, sm=sm)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 against fp32 on a GPU, as issue 5 asks
    try:
        compare(stem.float(), x.detach().float().requires_grad_(x.requires_grad), 24,
                FP32_TOL, sm=sm)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


class _SharedConvBN(nn.Module):
    """One conv applied twice, each time followed by its own batch norm:
    two folded pairs share the conv's weight and bias."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.b1, self.b2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)

    def forward(self, x):
        y = torch.relu(self.c0(x))
        y = torch.relu(self.b1(self.c(y)))
        return self.b2(self.c(y))


@pytest.mark.parametrize("halo_cache", [True, False])
def test_shared_conv_with_two_folded_batch_norms(halo_cache):
    """The shared weight's gradient is the sum of both folded pairs'
    (each converted once per call from its own sums)."""
    torch.manual_seed(0)
    stem = _SharedConvBN().double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 45, 39, dtype=torch.float64, requires_grad=True)
    compare(stem, x, 24, FP64_TOL, sm=streamcnn.StreamingModule(stem, 24,
                                                                halo_cache=halo_cache))


def test_batch_norm_folding_only_in_float32_and_float64():
    """No batch-norm kernel runs in a folded (float32) streamed pass; in
    bfloat16 (folding would round the folded weight once more) they do."""
    tv = pytest.importorskip("torchvision")
    from torch.profiler import ProfilerActivity, profile
    r = tv.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1).eval()
    sm = streamcnn.StreamingModule(stem, 200)

    def bn_calls(x):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sm(x).sum().backward()
        return sum(e.count for e in prof.key_averages() if "batch_norm" in e.key)

    assert bn_calls(torch.randn(1, 3, 300, 300)) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bn_calls(torch.randn(1, 3, 300, 300)) > 0


class _InPlace(nn.Module):
    """In-place ops whose result is not assigned: later reads of the tensor
    see the change, as in eager PyTorch (they were dropped: the streamed
    output was conv1's)."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1b = nn.Conv2d(3, 6, 3, padding=1) if style == "chain" else None
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv1(x)
        if self.style == "method":
            y.relu_()
        elif self.style == "function":
            torch.relu_(y)
        elif self.style == "inplace=True":
            F.leaky_relu(y, 0.2, True)
        elif self.style == "module":
            self.relu(y)
        elif self.style == "chain":
            y.add_(self.conv1b(x))
            F.relu(y, inplace=True)
        z = self.conv2(y)
        z += y
        return z


@pytest.mark.parametrize("style", ["method", "function", "inplace=True", "module", "chain"])
def test_in_place_ops_take_effect(style):
    stem = _InPlace(style).double().eval()
    x = torch.randn(1, 3, 23, 19, dtype=torch.float64, requires_grad=True)
    # the reference: whole-image PyTorch on a copy of the image (the stem
    # changes nothing in place that autograd needs)
    assert compare(stem, x, 9, FP64_TOL) < FP64_TOL
    sm = streamcnn.StreamingModule(stem, 9)
    y = sm(x)
    y.sum().backward()
    assert stem.conv2.weight.grad is not None and stem.conv2.weight.grad.abs().sum() > 0


def test_in_place_ops_that_cannot_be_streamed_are_refused():
    """An in-place op on the stem's input image, or on a tensor a view of
    which (here eval Dropout's: the tensor itself) is read after it."""
    class OnInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            x.relu_()
            return self.conv(x)

    class ViewReadAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop = nn.Conv2d(3, 3, 3), nn.Dropout()

        def forward(self, x):
            y = self.conv(x)
            v = self.drop(y)
            y.relu_()
            return v + y

    with pytest.raises(ValueError, match="in-place call_method relu_ \\(fx node 'relu_'\\): it "
                                         "changes the stem's input image in place"):
        streamcnn.StreamingModule(OnInput().eval(), 16)
    with pytest.raises(ValueError, match="it changes 'conv', of which 'drop' \\(read after it\\) "
                                         "is a view"):
        streamcnn.StreamingModule(ViewReadAfter().eval(), 16)

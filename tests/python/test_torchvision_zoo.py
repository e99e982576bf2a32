"""Which torchvision backbones stream, and which are refused and why (the
README's table): each family's feature extractor converts, or is refused
naming the layer that is not local. The families not tested elsewhere are
checked in float64 against the whole-image pass, forward and backward."""

import pytest
import torch
import torch.nn as nn

import streamcnn
from conftest import compare, randomize_bn
from streamcnn.program import convert
from test_equivalence import FP64_TOL

tv = pytest.importorskip("torchvision")


def _features(name: str, device="meta") -> nn.Module:
    """The part of a torchvision classifier before its global pool (made on
    the meta device: no weights; RegNets' on the CPU, as torchvision's
    RegNet copies a tensor's data while it is made)."""
    if name.startswith("regnet"):
        device = "cpu"
    quiet = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    with torch.device(device):
        m = getattr(tv.models, name)(weights=None, **quiet)
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return nn.Sequential(*list(m.children())[:-2])
    if name.startswith("regnet"):
        return nn.Sequential(m.stem, m.trunk_output)
    if name.startswith("mnasnet"):
        return m.layers
    if name.startswith("shufflenet"):
        return nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5)
    if name == "googlenet":
        return nn.Sequential(*[c for n, c in m.named_children()
                               if n not in ("aux1", "aux2", "avgpool", "dropout", "fc")])
    if name == "inception_v3":
        return nn.Sequential(*[c for n, c in m.named_children()
                               if n not in ("AuxLogits", "avgpool", "dropout", "fc")])
    if name.startswith("vit"):
        return m                  # its forward reshapes the patches into a sequence
    return m.features


STREAMS = ["alexnet", "vgg11_bn", "squeezenet1_1", "mobilenet_v2", "mnasnet0_5",
           "regnet_x_400mf", "resnet18", "resnext50_32x4d", "densenet121", "googlenet",
           "inception_v3", "convnext_tiny", "shufflenet_v2_x0_5"]
REFUSED = [
    ("efficientnet_b0", "AdaptiveAvgPool2d .*avgpool.*: it is not local"),    # squeeze-excitation
    ("mobilenet_v3_small", "AdaptiveAvgPool2d .*avgpool.*: it is not local"),
    ("regnet_y_400mf", "AdaptiveAvgPool2d .*se.avgpool.*: it is not local"),
    # attention over all patches (named before the patch count's shape arithmetic)
    ("vit_b_16", r"MultiheadAttention 'encoder.layers.encoder_layer_0.self_attention' .*: "
                 "it is not local"),
    ("swin_t", "call_function .*_get_relative_position_bias"),     # windowed attention
]


@pytest.mark.parametrize("name", STREAMS)
def test_whole_feature_extractor_converts(name):
    conv = convert(_features(name).eval())
    assert conv.program[3] > 0


@pytest.mark.parametrize("name,match", REFUSED)
def test_refused_naming_why(name, match):
    with pytest.raises(ValueError, match="streamcnn: cannot stream " + match):
        convert(_features(name).eval())


@pytest.mark.parametrize("name,upto,size", [
    ("alexnet", None, (259, 230)), ("vgg11_bn", None, (190, 170)),
    ("squeezenet1_1", None, (251, 240)),
    ("mobilenet_v2", 10, (180, 170)),      # inverted residuals: depthwise, ReLU6, adds
    ("mnasnet0_5", 10, (150, 140)),
    ("regnet_x_400mf", 3, (280, 270)),     # grouped bottlenecks: stem, trunk[:2]
    ("shufflenet_v2_x0_5", 3, (150, 130))])  # chunks and channel shuffles: conv1 .. stage2
def test_fp64(name, upto, size):
    """The families not tested elsewhere (to a depth that keeps the test
    short): streamed in tiles of the receptive field, several per side,
    against whole-image autograd."""
    torch.manual_seed(0)
    stem = _features(name, "cpu")
    if upto is not None:
        stem = nn.Sequential(stem[0], stem[1][:upto - 1]) if name.startswith("regnet") \
            else stem[:upto]
    stem = stem.double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    sm = streamcnn.StreamingModule(stem, 10**6)
    assert sm.receptive_field[0] < size[0] and sm.receptive_field[1] < size[1]
    x = torch.randn(1, 3, *size, dtype=torch.float64, requires_grad=True)
    compare(stem, x, sm.receptive_field, FP64_TOL)

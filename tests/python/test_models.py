"""torchvision backbones: ResNet stems with Bottleneck blocks, split helpers."""

import pytest
import torch
import torch.nn as nn

import streamcnn
from conftest import compare, randomize_bn, rel_err

tv = pytest.importorskip("torchvision")


def _resnet(name):
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None)
    randomize_bn(model, torch.Generator().manual_seed(1))
    return model


def test_resnet50_conv1_to_layer1_fp64():
    r = _resnet("resnet50").double()
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1).eval()
    x = torch.randn(1, 3, 61, 75, dtype=torch.float64, requires_grad=True)
    for tile in (51, 70, 200):
        compare(stem, x, tile, 1e-10)


def test_resnext_grouped_bottleneck_fp64():
    r = _resnet("resnext50_32x4d").double()
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1).eval()
    x = torch.randn(2, 3, 45, 52, dtype=torch.float64, requires_grad=True)
    compare(stem, x, 60, 1e-10)


@pytest.mark.parametrize("name, upto", [("resnet18", "layer2"), ("resnet34", "layer3"),
                                        ("resnet50", "layer1"), ("resnet101", "maxpool")])
def test_split_resnet(name, upto):
    model = _resnet(name).double().eval()
    stem, head = streamcnn.models.split_resnet(model, stream_upto=upto, tile_size=600)
    x = torch.randn(1, 3, 130, 110, dtype=torch.float64)
    assert rel_err(head(stem(x)), model(x)) < 1e-10
    # names follow torchvision's
    assert "module.conv1.weight" in stem.state_dict()
    assert "fc.weight" in head.state_dict()
    # training mode: the head trains, the stem's batch norms stay frozen
    model.train()
    stem.train()
    assert all(not m.training for m in stem.stem.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    head(stem(x)).sum().backward()
    assert model.conv1.weight.grad is not None and model.fc.weight.grad is not None


def test_resnet34_layer3_receptive_field():
    stem, _ = streamcnn.models.split_resnet(_resnet("resnet34"), stream_upto="layer3")
    # 7 (conv1) + 4 (max pool) + 6 * 8 (layer1) + 8 + 7 * 16 (layer2) + 16 + 11 * 32
    assert stem.receptive_field == (547, 547)
    assert stem.output_stride == (16, 16)


def test_split_resnet_bad_arguments():
    with pytest.raises(ValueError, match="stream_upto must be one of"):
        streamcnn.models.split_resnet(_resnet("resnet18"), stream_upto="layer9")
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        streamcnn.models.split_resnet(nn.Sequential(nn.Conv2d(3, 3, 3)))

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


def test_split_with_module_options():
    """memory_budget, mean / std and the other StreamingModule options pass
    through the splitters."""
    model = _resnet("resnet18").double().eval()
    mean, std = [120.0, 115.0, 100.0], [60.0, 58.0, 57.0]
    stem, head = streamcnn.models.split_resnet(model, "layer1", memory_budget="10MB",
                                               mean=mean, std=std, halo_cache=False)
    assert stem.memory_budget == 10 * 10**6 and not stem.halo_cache
    x8 = torch.randint(0, 256, (1, 3, 150, 131), dtype=torch.uint8)
    xf = (x8.double() - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert rel_err(head(stem(x8)), model(xf)) < 1e-10
    assert stem.tile_size[0] < 150 or stem.tile_size[1] < 131  # chosen from the budget
    stem, _ = streamcnn.models.split_convnext(_convnext(), 2, tile_size=200, progress=True)
    assert stem.tile_size == [200, 200] and stem.progress
    with pytest.raises(TypeError, match="unexpected keyword argument 'tile'"):
        streamcnn.models.split_resnet(model, "layer1", tile=100)


def test_split_resnet_bad_arguments():
    with pytest.raises(ValueError, match="stream_upto must be one of"):
        streamcnn.models.split_resnet(_resnet("resnet18"), stream_upto="layer9")
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        streamcnn.models.split_resnet(nn.Sequential(nn.Conv2d(3, 3, 3)))


def _densenet(name="densenet121"):
    torch.manual_seed(0)
    m = getattr(tv.models, name)(weights=None).double()
    randomize_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


def test_split_densenet():
    """DenseNet-121 streamed through its first dense block and transition:
    head(stem(x)) is model(x); torchvision's names; the stem trains with
    its batch norms frozen."""
    model = _densenet()
    stem, head = streamcnn.models.split_densenet(model, stream_upto="transition1",
                                                 tile_size=150)
    x = torch.randn(1, 3, 96, 80, dtype=torch.float64)
    assert rel_err(head(stem(x)), model(x)) < 1e-10
    assert "module.denseblock1.denselayer6.conv2.weight" in stem.state_dict()
    assert "features.denseblock2.denselayer1.conv1.weight" in head.state_dict()
    assert "classifier.weight" in head.state_dict()
    model.train()
    stem.train()
    head(stem(x)).sum().backward()
    assert model.features.denseblock1.denselayer6.conv2.weight.grad is not None
    assert not any(m.training for m in stem.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="stream_upto must be one of"):
        streamcnn.models.split_densenet(model, stream_upto="norm5")
    with pytest.raises(ValueError, match="not a torchvision DenseNet"):
        streamcnn.models.split_densenet(_resnet("resnet18"))


def _inception(transform_input):
    torch.manual_seed(0)
    m = tv.models.inception_v3(weights=None, aux_logits=True, init_weights=True,
                               transform_input=transform_input).double()
    randomize_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


@pytest.mark.parametrize("transform_input", [False, True])
def test_split_inception(transform_input):
    """Inception-v3 streamed through Mixed_5c: head(stem(x)) is model(x)
    (eval: the main output), also with torchvision's input transform
    folded into the stem's mean / std, given or not; the auxiliary
    classifier is in neither part; the stem trains with its batch norms
    frozen."""
    model = _inception(transform_input)
    stem, head = streamcnn.models.split_inception(model, stream_upto="Mixed_5c",
                                                  tile_size=140)
    x = torch.randn(1, 3, 299, 310, dtype=torch.float64)
    assert stem.tiling(299, 310)["tiles"][0] >= 3
    assert rel_err(head(stem(x)), model(x)) < 1e-10
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    stem2, _ = streamcnn.models.split_inception(model, stream_upto="Mixed_5c",
                                                tile_size=140, mean=mean, std=std)
    xu = (torch.rand(1, 3, 299, 310) * 255).to(torch.uint8)
    xn = (xu.double() - torch.tensor(mean).view(1, 3, 1, 1).double()) / \
        torch.tensor(std).view(1, 3, 1, 1).double()
    assert rel_err(head(stem2(xu)), model(xn)) < 1e-10
    assert "module.Mixed_5c.branch_pool.conv.weight" in stem.state_dict()
    assert "Mixed_7c.branch_pool.conv.weight" in head.state_dict()
    assert not any("AuxLogits" in k for k in list(stem.state_dict()) + list(head.state_dict()))
    model.train()
    stem.train()
    head.eval()
    head(stem(x)).sum().backward()
    assert model.Mixed_5b.branch_pool.conv.weight.grad is not None
    assert not any(m.training for m in stem.modules() if isinstance(m, nn.BatchNorm2d))


def test_split_inception_bad_arguments():
    model = _inception(True)
    with pytest.raises(ValueError, match="stream_upto must be one of"):
        streamcnn.models.split_inception(model, stream_upto="AuxLogits")
    with pytest.raises(ValueError, match="not a torchvision Inception-v3"):
        streamcnn.models.split_inception(_resnet("resnet18"))
    with pytest.raises(ValueError, match="need 1 or 3 values .one per image channel., got 2 and 3"):
        streamcnn.models.split_inception(model, tile_size=1400, mean=(1.0, 2.0))


def _split_checks(model, split, upto, tile, size, stem_key, head_key, grad_of):
    """head(stem(x)) is model(x) in float64 with the stem streamed in
    several tiles each way (eval, randomised batch statistics); the stem's
    and the head's state_dicts keep torchvision's names; a training step
    reaches the stem's weights while its batch norms stay frozen."""
    model = model.double()
    randomize_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    stem, head = split(model, stream_upto=upto, tile_size=tile)
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    nh, nw = stem.tiling(*size)["tiles"]
    assert nh >= 2 and nw >= 2, (nh, nw)
    assert rel_err(head(stem(x)), model(x)) < 1e-10
    assert stem_key in stem.state_dict(), list(stem.state_dict())[:5]
    assert head_key in head.state_dict(), list(head.state_dict())[:5]
    model.train()
    stem.train()
    head(stem(x)).sum().backward()
    assert grad_of(model).grad is not None
    assert not any(m.training for m in stem.modules() if isinstance(m, nn.BatchNorm2d))
    return stem, head


def test_split_mobilenet():
    """MobileNetV2 streamed through features[:7] (inverted residuals with
    depthwise convolutions, ReLU6 and adds): head(stem(x)) is model(x);
    torchvision's names; the stem trains with its batch norms frozen."""
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2(weights=None)
    stem, head = _split_checks(model, streamcnn.models.split_mobilenet, 7, 100, (190, 170),
                               "module.6.conv.2.weight", "features.7.conv.0.0.weight",
                               lambda m: m.features[6].conv[2].weight)
    assert stem.tiling(190, 170)["tiles"][0] >= 3
    assert "classifier.1.weight" in head.state_dict()
    with pytest.raises(ValueError, match=r"stream_upto must be an int in \[1, 18\]"):
        streamcnn.models.split_mobilenet(model, stream_upto=19)
    with pytest.raises(ValueError, match="not a torchvision MobileNetV2"):
        streamcnn.models.split_mobilenet(_densenet())


def test_split_shufflenet():
    """ShuffleNetV2 streamed through stage3 (channel splits and shuffles):
    head(stem(x)) is model(x); torchvision's names; the stem trains with
    its batch norms frozen."""
    torch.manual_seed(0)
    model = tv.models.shufflenet_v2_x0_5(weights=None)
    _, head = _split_checks(model, streamcnn.models.split_shufflenet, "stage3", 360, (700, 610),
                            "module.stage3.0.branch1.0.weight", "stage4.0.branch2.0.weight",
                            lambda m: m.stage2[1].branch2[0].weight)
    assert "fc.weight" in head.state_dict()
    with pytest.raises(ValueError, match=r"stream_upto must be one of \['maxpool', 'stage2'"):
        streamcnn.models.split_shufflenet(model, stream_upto="conv1")
    with pytest.raises(ValueError, match="not a torchvision ShuffleNetV2"):
        streamcnn.models.split_shufflenet(_densenet())


def _convnext(name="convnext_tiny"):
    torch.manual_seed(0)
    m = getattr(tv.models, name)(weights=None).double().eval()
    with torch.no_grad():  # layer scales of 1e-6 would hide the block branches
        for blk in m.modules():
            if type(blk).__name__ == "CNBlock":
                blk.layer_scale.uniform_(0.5, 1.5)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def test_convnext_tiny_features_4_fp64():
    stem = _convnext().features[:4]
    sm = streamcnn.StreamingModule(stem, 4096)
    assert sm.receptive_field == (224, 224) and sm.output_stride == (8, 8)
    x = torch.randn(1, 3, 45, 53, dtype=torch.float64, requires_grad=True)
    compare(stem, x, 224, 1e-10)  # the minimum tile: one output pixel per tile
    x = torch.randn(2, 3, 75, 93, dtype=torch.float64, requires_grad=True)
    for tile in (263, 4096):
        compare(stem, x, tile, 1e-10)


def test_convnext_reference_program_and_gradient_penalty():
    """The whole-image reference of a ConvNeXt program (channel LayerNorm,
    Linear, GELU, layer scale) equals the stem, and second derivatives
    through the streamed stem equal the whole-image ones."""
    from streamcnn.reference import run_program
    stem = _convnext().features[:2]
    sm = streamcnn.StreamingModule(stem, 80)
    x = torch.randn(1, 3, 97, 90, dtype=torch.float64, requires_grad=True)
    assert rel_err(run_program(x, sm.stream_params(), sm.program), stem(x)) < 1e-12
    params = [p for p in stem.parameters() if p.requires_grad][-4:]
    got = []
    for f in (sm, stem):
        (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        got.append(torch.autograd.grad(gx.square().sum(), [x] + params))
    for a, b in zip(*got):
        assert rel_err(a, b) < 1e-10


def test_convnext_small_downsample_stage_fp64():
    stem = _convnext("convnext_small").features[:3]  # patchify, stage 1, downsample
    x = torch.randn(1, 3, 41, 58, dtype=torch.float64, requires_grad=True)
    compare(stem, x, 120, 1e-10)


def test_split_convnext():
    model = _convnext()
    stem, head = streamcnn.models.split_convnext(model, stream_upto=2, tile_size=300)
    x = torch.randn(1, 3, 100, 90, dtype=torch.float64)
    assert rel_err(head(stem(x)), model(x)) < 1e-10
    assert "module.0.0.weight" in stem.state_dict()
    assert "classifier.2.weight" in head.state_dict()
    model.train()
    stem.train()
    head(stem(x)).sum().backward()
    blk = model.features[1][0]
    assert blk.layer_scale.grad is not None and blk.block[2].weight.grad is not None
    with pytest.raises(ValueError, match="stream_upto must be an int"):
        streamcnn.models.split_convnext(model, stream_upto=8)


def test_channel_ops_refused_where_not_local():
    class LinearOverWidth(nn.Module):  # Linear on the last dim of NCHW: mixes columns
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(10, 10)

        def forward(self, x):
            return self.fc(self.conv(x))

    with pytest.raises(ValueError, match="Linear 'fc'.*mixes pixels"):
        streamcnn.StreamingModule(LinearOverWidth(), 64)

    class NormOverSpace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.ln = nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 10, 10])

        def forward(self, x):
            return self.ln(self.conv(x))

    with pytest.raises(ValueError, match="LayerNorm 'ln'.*not over the channels"):
        streamcnn.StreamingModule(NormOverSpace(), 64)

    class WrongPermute(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).permute(0, 3, 2, 1).permute(0, 3, 2, 1)

    with pytest.raises(ValueError, match=r"permute\(0, 3, 2, 1\)"):
        streamcnn.StreamingModule(WrongPermute(), 64)

    class ScaleBySpatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.s = nn.Parameter(torch.ones(4, 5, 1))

        def forward(self, x):
            return self.s * self.conv(x)

    with pytest.raises(ValueError, match="not a per-channel scale"):
        streamcnn.StreamingModule(ScaleBySpatial(), 64)


def test_convnext_stochastic_depth_in_training_refused():
    stem = _convnext().features[:2].train()
    with pytest.raises(ValueError, match="StochasticDepth.*call .eval"):
        streamcnn.StreamingModule(stem, 400)


def test_convnext_stem_scripted_and_compiled_fp32():
    model = _convnext().float()
    stem, head = streamcnn.models.split_convnext(model, stream_upto=2, tile_size=260)
    net = nn.Sequential(stem, head).eval()
    x = torch.randn(1, 3, 120, 110)
    with torch.no_grad():
        eager = net(x)
        assert rel_err(torch.jit.script(net)(x), eager) < 1e-5
        assert rel_err(torch.compile(net)(x), eager) < 1e-5


@pytest.mark.parametrize("name,upto,key", [("vgg11_bn", 14, "module.12.running_var"),
                                            ("vgg13", 20, "module.17.weight")])
def test_split_vgg(name, upto, key):
    """VGG streamed through features[:upto] (3 x 3 convolutions, batch
    norms in the _bn ones, max pools); the head keeps its average pool and
    the classifier, so head(stem(x)) is model(x)."""
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None)
    _split_checks(model, streamcnn.models.split_vgg, upto, 120, (230, 200),
                  key, f"features.{len(model.features) - 3}.weight", lambda m: m.features[0].weight)
    last = len(model.features) - 1             # 28 (vgg11_bn), 24 (vgg13)
    for bad in (0, last + 1, "7"):
        with pytest.raises(ValueError, match=rf"stream_upto must be an int in \[1, {last}\]"):
            streamcnn.models.split_vgg(model, stream_upto=bad)
    with pytest.raises(ValueError, match="not a torchvision VGG"):
        streamcnn.models.split_vgg(tv.models.mobilenet_v2(weights=None))


def test_split_regnet():
    """RegNetX-400MF streamed through block2 (grouped bottlenecks, residual
    adds) and through its stem alone: head(stem(x)) is model(x); RegNetY
    is refused naming its squeeze-and-excitation pool."""
    torch.manual_seed(0)
    model = tv.models.regnet_x_400mf(weights=None)
    _split_checks(model, streamcnn.models.split_regnet, "block2", 150, (300, 280),
                  "module.trunk_output.block2.block2-0.f.b.0.weight",
                  "trunk_output.block3.block3-0.f.a.0.weight",
                  lambda m: m.trunk_output.block1[0].f.a[0].weight)
    stem, head = streamcnn.models.split_regnet(model.eval(), stream_upto="stem", tile_size=64)
    x = torch.randn(1, 3, 150, 140, dtype=torch.float64)
    assert rel_err(head(stem(x)), model(x)) < 1e-10
    assert list(stem.stem._modules) == ["stem"]
    with pytest.raises(ValueError, match=r"stream_upto must be one of \['stem', 'block1'"):
        streamcnn.models.split_regnet(model, stream_upto="trunk_output")
    with pytest.raises(ValueError, match="not a torchvision RegNet"):
        streamcnn.models.split_regnet(_densenet())
    with pytest.raises(ValueError, match=r"cannot stream .*se\.avgpool.*: it is not local"):
        streamcnn.models.split_regnet(tv.models.regnet_y_400mf(weights=None).eval(),
                                      stream_upto="block1", tile_size=200)


def test_split_mnasnet():
    """MNASNet 0.5 streamed through layers[:10] (inverted residuals with
    3 x 3 and 5 x 5 depthwise convolutions): head(stem(x)) is model(x)."""
    torch.manual_seed(0)
    model = tv.models.mnasnet0_5(weights=None)
    _split_checks(model, streamcnn.models.split_mnasnet, 10, 200, (330, 300),
                  "module.9.0.layers.3.weight", "layers.10.0.layers.0.weight",
                  lambda m: m.layers[0].weight)
    with pytest.raises(ValueError, match=r"stream_upto must be an int in \[1, 16\]"):
        streamcnn.models.split_mnasnet(model, stream_upto=17)
    with pytest.raises(ValueError, match="not a torchvision MNASNet"):
        streamcnn.models.split_mnasnet(_densenet())


@pytest.mark.parametrize("transform_input", [False, True])
def test_split_googlenet(transform_input):
    """GoogLeNet streamed through inception3b (ceil_mode max pools, branches
    joined by torch.cat): head(stem(x)) is model(x), also with
    torchvision's input transform folded into the stem's mean / std; the
    auxiliary classifiers are in neither part."""
    torch.manual_seed(0)
    model = tv.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                transform_input=transform_input)
    stem, head = _split_checks(model, streamcnn.models.split_googlenet, "inception3b", 120,
                               (250, 230), "module.inception3b.branch4.1.conv.weight",
                               "inception5b.branch4.1.conv.weight",
                               lambda m: m.conv1.conv.weight)
    assert not any("aux" in k for k in list(stem.state_dict()) + list(head.state_dict()))
    with pytest.raises(ValueError, match=r"stream_upto must be one of \['maxpool1', 'conv2'"):
        streamcnn.models.split_googlenet(model, stream_upto="aux1")
    with pytest.raises(ValueError, match="not a torchvision GoogLeNet"):
        streamcnn.models.split_googlenet(_densenet())

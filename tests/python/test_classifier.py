"""streamcnn.classifier: the training application's model (stem + head)."""

import types

import pytest
import torch

from conftest import rel_err
from streamcnn.classifier import (ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, GlobalPool,
                                  build_model, default_tile_size, load_weights)


def _normalised(x):
    m = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (x.double() - m) / s


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_resnet18_equals_whole_image(pool):
    torch.manual_seed(0)
    m = build_model("resnet18", num_outputs=2, head=pool, tile_size=448).double()
    x = (torch.rand(2, 3, 300, 260) * 255).to(torch.uint8)
    y = m(x)
    ref = m.head(m.stem.stem(_normalised(x)))
    assert y.shape == (2, 2)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch,upto", [("resnet152", "layer2"), ("resnext50_32x4d", "layer2"),
                                       ("wide_resnet50_2", "layer1"), ("convnext_small", 3),
                                       ("shufflenet_v2_x1_0", "stage2"), ("vgg16_bn", 24),
                                       ("regnet_x_800mf", "block2"), ("mnasnet1_0", 10),
                                       ("googlenet", "inception3b")])
def test_deeper_grouped_wider_backbones_equal_whole_image(arch, upto):
    """One of each kind the application offers beyond resnet18..50 and
    convnext_tiny: a deeper stem (receptive field 155), grouped and wider
    bottlenecks, a ConvNeXt with a downsampling layer, VGG, RegNetX,
    MNASNet, GoogLeNet (its input transform folded): streamed in several
    tiles each way, the model equals its stem run whole, then the head."""
    torch.manual_seed(2)
    probe = build_model(arch, stream_upto=upto, tile_size=4096)
    rf = probe.stem.receptive_field[0]
    tile = rf + 37
    # eval: the head's stochastic depth (ConvNeXt) is random in training mode
    m = build_model(arch, num_outputs=3, stream_upto=upto, tile_size=tile).double().eval()
    x = (torch.rand(1, 3, tile + 70, tile + 45) * 255).to(torch.uint8)
    nh, nw = m.stem.tiling(x.shape[2], x.shape[3])["tiles"]
    assert nh >= 2 and nw >= 2, (nh, nw)
    y = m(x)
    xn = _normalised(x)
    if arch == "googlenet":      # torchvision's transform_input (the stem folds it in)
        import torchvision
        xn = torchvision.models.GoogLeNet._transform_input(
            types.SimpleNamespace(transform_input=True), xn)
    ref = m.head(m.stem.stem(xn))
    assert y.shape == (1, 3)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)


def test_default_tile_gives_32_output_pixels_where_1024_is_too_small():
    """Without tile_size or memory_budget a stem streams in 1024 tiles or,
    where its receptive field is so large that 1024 gives fewer than 32
    output pixels per side, tiles that give 32 (a tile of the receptive
    field gives one, and was ~20x slower): every architecture builds with
    its defaults, and default_tile_size (made on the meta device, no
    weights) says which without building it. Built: the architectures named
    below and the smallest of each family (the other large ones took 17 of
    the test's 30 s); default_tile_size is asked of every one."""
    seen = {}
    named = {"resnet18", "resnet50", "resnet152", "convnext_tiny", "densenet121",
             "densenet201", "inception_v3", "mobilenet_v2", "shufflenet_v2_x1_0", "vgg16",
             "vgg19_bn", "googlenet", "mnasnet1_0", "regnet_x_3_2gf", "regnet_x_8gf",
             "resnext50_32x4d", "regnet_x_400mf", "mnasnet0_5", "vgg11"}
    for arch in ARCHITECTURES:
        if arch not in named:
            seen[arch] = default_tile_size(arch)
            continue
        m = build_model(arch)
        rf, stride = m.stem.receptive_field, m.stem.output_stride
        want = [max(1024, rf[k] + 31 * stride[k]) for k in (0, 1)]
        assert list(m.stem.tile_size) == want, arch
        assert all((want[k] - rf[k]) // stride[k] + 1 >= 32 for k in (0, 1)), arch
        assert default_tile_size(arch) == m.stem.tile_size[0], arch
        seen[arch] = m.stem.tile_size[0]
        del m
    assert named <= set(ARCHITECTURES)
    assert seen["resnet18"] == seen["resnet50"] == 1024
    assert seen["convnext_tiny"] == 1592 and seen["resnet152"] == 1787
    assert seen["densenet121"] == 1527 and seen["densenet201"] == 2295
    assert seen["inception_v3"] == 1423 and default_tile_size("inception_v3", "Mixed_7c") == 2303
    assert default_tile_size("densenet121", "transition2") == 1024
    assert default_tile_size("resnet152", "layer2") == 1024
    assert default_tile_size("convnext_tiny", "4") == 1024
    assert seen["mobilenet_v2"] == 1024 and default_tile_size("mobilenet_v2", 18) == 1483
    assert seen["shufflenet_v2_x1_0"] == 1024
    assert default_tile_size("shufflenet_v2_x1_0", "conv5") == 1519
    assert seen["vgg16"] == seen["vgg19_bn"] == seen["googlenet"] == seen["mnasnet1_0"] == 1024
    assert seen["regnet_x_3_2gf"] == 1063 and seen["regnet_x_8gf"] == 1047
    assert default_tile_size("regnet_x_400mf", "block4") == 1967
    with pytest.raises(ValueError, match="stream_upto"):
        default_tile_size("resnet18", "layer9")


def test_class_map_averages_to_output():
    torch.manual_seed(1)
    m = build_model("resnet18", num_outputs=3, head="avg", tile_size=448).double()
    x = (torch.rand(1, 3, 256, 256) * 255).to(torch.uint8)
    cam = m.head.class_map(m.head.body(m.stem(x)))
    assert cam.shape[:2] == (1, 3)
    torch.testing.assert_close(cam.mean(dim=(2, 3)), m(x), rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("efficientnet_b0")    # refused: squeeze-and-excitation
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("resnet18", head="sum")
    with pytest.raises(ValueError, match="pool must be one of"):
        GlobalPool("median")
    with pytest.raises(ValueError, match="stream_upto"):
        build_model("resnet18", stream_upto=3)


def test_weights_must_match(tmp_path):
    import torchvision
    good = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), good)
    m = build_model("resnet18", weights=str(good), tile_size=448)
    assert m.stem.receptive_field[0] <= 448
    bad = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), bad)
    with pytest.raises(ValueError, match="does not match resnet18"):
        build_model("resnet18", weights=str(bad), tile_size=448)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file .*junk.pt: not a "
                       "state_dict torch.save wrote$"):
        load_weights(torchvision.models.resnet18(weights=None), str(junk), "resnet18")
    whole = tmp_path / "whole.pt"           # torch.save(model): one line that says so
    torch.save(torchvision.models.resnet18(weights=None), whole)
    with pytest.raises(ValueError, match=r"holds pickled objects \(torchvision.models.resnet"
                       r".ResNet\), not a state_dict: save it with torch.save\(model."
                       r"state_dict\(\), path\)$"):
        load_weights(torchvision.models.resnet18(weights=None), str(whole), "resnet18")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("resnet18", weights=str(tmp_path / "nope.pt"))


def test_densenet_weights_with_torchvision_legacy_names(tmp_path):
    """torchvision's DenseNet weight files name 'denselayer1.norm.1.weight'
    what the module calls 'denselayer1.norm1.weight', and hold no
    num_batches_tracked: --weights loads them as torchvision itself does."""
    import re
    import torchvision
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v
          for k, v in torchvision.models.densenet121(weights=None).state_dict().items()}
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
              for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, path)
    m = build_model("densenet121", weights=str(path), stream_upto="transition1",
                    tile_size=200)
    layer = m.stem.stem.denseblock1.denselayer1
    assert torch.equal(layer.norm1.weight, sd["features.denseblock1.denselayer1.norm1.weight"])
    assert torch.equal(layer.conv2.weight, sd["features.denseblock1.denselayer1.conv2.weight"])
    assert torch.equal(m.head.body[0].denseblock2.denselayer3.norm2.running_var,
                       sd["features.denseblock2.denselayer3.norm2.running_var"])
    del legacy["features.denseblock1.denselayer1.conv.1.weight"]   # still checked
    torch.save(legacy, path)
    with pytest.raises(ValueError, match=r"1 missing keys \(e.g. \['features.denseblock1."
                       r"denselayer1.conv1.weight'\]\)"):
        build_model("densenet121", weights=str(path), tile_size=1100)


def _imagenet_style_file(arch, tmp_path, aux):
    """torchvision's ``arch`` as built for its ImageNet weights (auxiliary
    classifiers, transform_input), random batch statistics, in eval mode and
    float64, and its state_dict saved: (model, path)."""
    import torchvision
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None, aux_logits=True, init_weights=True,
                                            transform_input=True).eval()
    sd = {k: torch.randn_like(v) * 0.05 if k.endswith("running_mean") else
          torch.rand_like(v) + 0.5 if v.is_floating_point() and "running_var" in k else v
          for k, v in ref.state_dict().items()}
    assert any(k.startswith(aux) for k in sd)
    ref.load_state_dict(sd)
    path = tmp_path / f"{arch}.pth"
    torch.save(sd, path)
    return ref.double(), path


def test_inception_v3_weights_and_transform(tmp_path):
    """A torchvision Inception-v3 state_dict (its auxiliary classifier
    included) loads; the stem computes the model's features with
    torchvision's transform_input after the ImageNet normalisation, as
    inception_v3(weights=...) does ((x - 127.5) / 127.5 for uint8); the
    classifier's head runs Mixed_6a .. 7c on the stride-8 features."""
    ref, path = _imagenet_style_file("inception_v3", tmp_path, "AuxLogits.")
    m = build_model("inception_v3", weights=str(path), stream_upto="Mixed_5d", tile_size=300,
                    num_outputs=3).double().eval()
    torch.testing.assert_close(m.stem.norm_bias, torch.full((3,), -1.0, dtype=torch.float64))
    x = (torch.rand(1, 3, 299, 333) * 255).to(torch.uint8)
    got = m.head.body(m.stem(x))
    want = ref._transform_input(_normalised(x))
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c"):
        want = getattr(ref, name)(want)
    assert rel_err(got, want) < 1e-12    # (torchvision's init: values ~1e7)
    assert m(x).shape == (1, 3)
    with pytest.raises(ValueError, match="stream_upto for inception_v3 is a layer name"):
        build_model("inception_v3", stream_upto=3)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "inception_v3", "mobilenet_v2",
                                  "shufflenet_v2_x1_0", "vgg16", "regnet_x_400mf",
                                  "mnasnet1_0", "googlenet"])
def test_from_scratch_outputs_are_of_order_one(arch):
    """A backbone without weights starts well scaled although its stem's
    batch norms are frozen at their initial identity: torchvision's own
    Inception-v3 initialisation (truncated normal, std 0.1, made for batch
    statistics) gave logits of ~3e11 on a 512² image and training
    diverged; build_model initialises its convolutions He (fan_in)."""
    torch.manual_seed(0)
    m = build_model(arch, tile_size=2048).eval()     # the default stream_upto
    x = (torch.rand(1, 3, 512, 512) * 255).to(torch.uint8)
    with torch.no_grad():
        y = m(x)
    assert torch.isfinite(y).all() and y.abs().max() < 100, y


def test_min_image_size():
    """The smallest image each model takes, found on the meta device: a
    ResNet any, Inception-v3 75 (its unpadded strided convolutions),
    DenseNet-121 29 (to denseblock3; the head's transition pools 2 x 2);
    one pixel less fails in the model itself."""
    from streamcnn.classifier import min_image_size
    for arch, upto, want in [("resnet18", "layer3", 1), ("inception_v3", "Mixed_5b", 75),
                             ("densenet121", "denseblock3", 29)]:
        m = build_model(arch, stream_upto=upto, tile_size=2048).eval()
        assert min_image_size(m) == want, arch
        with torch.no_grad():
            assert m(torch.zeros(1, 3, want, want, dtype=torch.uint8)).shape == (1, 2)
            if want > 1:
                with pytest.raises(RuntimeError):
                    m(torch.zeros(1, 3, want - 1, want - 1, dtype=torch.uint8))


def test_vgg_stream_upto_counts():
    """VGG's default stream_upto is its features up to the fourth max pool
    (stride 16), its largest the last index (the fifth max pool)."""
    import torchvision
    from streamcnn.classifier import DEFAULT_STREAM_UPTO, LAST_FEATURE, VGGS
    for arch in VGGS:
        with torch.device("meta"):
            f = getattr(torchvision.models, arch)(weights=None).features
        pools = [i for i, m in enumerate(f) if isinstance(m, torch.nn.MaxPool2d)]
        assert DEFAULT_STREAM_UPTO[arch] == pools[3] + 1, arch
        assert LAST_FEATURE[arch] == len(f) - 1 == pools[4], arch
    with pytest.raises(ValueError, match=r"stream_upto for mnasnet0_5 is an int \(1 .. 16 of "
                       r"layers\), got 'layer3'"):
        build_model("mnasnet0_5", stream_upto="layer3")
    with pytest.raises(ValueError, match=r"stream_upto for regnet_x_400mf is a layer name "
                       r"\(stem, block1 .. block4\), got 3"):
        build_model("regnet_x_400mf", stream_upto=3)


def test_googlenet_imagenet_style_weights(tmp_path):
    """A torchvision GoogLeNet state_dict as its ImageNet weights come
    (auxiliary classifiers included) loads; with the input transform
    folded into the stem's normalisation the features equal torchvision's
    model run on the ImageNet-normalised image, transform_input on."""
    ref, path = _imagenet_style_file("googlenet", tmp_path, "aux1.")
    m = build_model("googlenet", weights=str(path), stream_upto="inception4a", tile_size=200,
                    num_outputs=3).double().eval()
    x = (torch.rand(1, 3, 260, 250) * 255).to(torch.uint8)
    assert m.stem.tiling(260, 250)["tiles"][0] >= 2
    got = m.head.body(m.stem(x))
    want = ref._transform_input(_normalised(x))
    for name in ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
                 "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                 "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"):
        want = getattr(ref, name)(want)
    assert rel_err(got, want) < 1e-12
    assert m(x).shape == (1, 3)

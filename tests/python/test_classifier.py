"""streamcnn.classifier: the training application's model (stem + head)."""

import pytest
import torch

from streamcnn.classifier import (IMAGENET_MEAN, IMAGENET_STD, GlobalPool, build_model,
                                  load_weights)


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


def test_class_map_averages_to_output():
    torch.manual_seed(1)
    m = build_model("resnet18", num_outputs=3, head="avg", tile_size=448).double()
    x = (torch.rand(1, 3, 256, 256) * 255).to(torch.uint8)
    cam = m.head.class_map(m.head.body(m.stem(x)))
    assert cam.shape[:2] == (1, 3)
    torch.testing.assert_close(cam.mean(dim=(2, 3)), m(x), rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg11")
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
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_weights(torchvision.models.resnet18(weights=None), str(junk), "resnet18")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("resnet18", weights=str(tmp_path / "nope.pt"))

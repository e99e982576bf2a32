"""TorchScript: a scripted StreamingModule (alone or inside a model) saves,
loads and runs in a fresh process that only loads the library."""

import copy
import subprocess
import sys

import torch
import torch.nn as nn

import streamcnn
from conftest import randomize_bn, rel_err

FRESH = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
m = torch.jit.load(sys.argv[2])
x = torch.load(sys.argv[3])
torch.save(m(x), sys.argv[4])
assert "streamcnn" not in sys.modules
"""


def _stem():
    stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.BatchNorm2d(8, affine=False), nn.SiLU()).eval()
    randomize_bn(stem, torch.Generator().manual_seed(0))
    return stem


class Model(nn.Module):
    def __init__(self, tile):
        super().__init__()
        self.stem = streamcnn.StreamingModule(_stem(), tile)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.stem(x))


def _run_fresh(tmp_path, scripted, x):
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", FRESH, streamcnn.library_path(), str(path),
                    str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True,
                   capture_output=True, text=True)
    return torch.load(tmp_path / "y.pt")


def test_script_streaming_module(tmp_path):
    sm = streamcnn.StreamingModule(_stem(), 40)
    scripted = torch.jit.script(sm)
    x = torch.randn(2, 3, 75, 61)
    want = sm.stem(x)
    assert rel_err(scripted(x), want) < 1e-5
    assert rel_err(_run_fresh(tmp_path, scripted, x), want) < 1e-5


def test_script_model_with_head_and_state_dict(tmp_path):
    model = Model(48).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 90, 100)
    want = model.head(model.stem.stem(x))
    assert rel_err(scripted(x), want) < 1e-5
    assert rel_err(_run_fresh(tmp_path, scripted, x), want) < 1e-5
    # the scripted stem carries the same parameters under the same names
    sd = scripted.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_scripted_backward_from_python():
    sm = streamcnn.StreamingModule(_stem().double(), 40)
    scripted = torch.jit.script(sm)
    x = torch.randn(1, 3, 50, 47, dtype=torch.float64, requires_grad=True)
    scripted(x).square().sum().backward()
    g_script = x.grad.clone()
    x.grad = None
    sm.stem(x).square().sum().backward()
    assert rel_err(g_script, x.grad) < 1e-10


def test_scripted_module_moves_to_another_dtype():
    """torch.jit.script copies the module's _apply onto the scripted module:
    .double() / .half() / .to() raised a TypeError from super() there. The
    mean / std come from their exact values in the new dtype (float32 for
    float16), as the eager module's."""
    mean, std = [120.0, 110.0, 100.0], [60.0, 55.0, 50.0]
    stem, head = _stem(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def streamed():
        return streamcnn.StreamingModule(copy.deepcopy(stem), 40, mean=mean, std=std)
    x8 = torch.randint(0, 256, (1, 3, 61, 52), dtype=torch.uint8)
    xf = (x8.double() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    want = copy.deepcopy(stem).double()(xf)
    scripted = torch.jit.script(nn.Sequential(streamed(), copy.deepcopy(head))).double()
    assert {v.dtype for v in scripted.buffers()} == {torch.float64, torch.int64}  # BN count
    assert rel_err(scripted(x8), copy.deepcopy(head).double()(want)) < 1e-12  # exact mean / std
    assert rel_err(torch.jit.script(streamed()).double()(x8), want) < 1e-12
    half = torch.jit.script(streamed()).to(torch.float16)
    assert half.norm_weight.dtype == torch.float32 and half(x8).dtype == torch.float16

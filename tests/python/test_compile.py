"""torch.compile and torch.export with a StreamingModule inside."""

import torch
import torch.nn as nn

import streamcnn
from conftest import randomize_bn, rel_err


def _model():
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(16, 16, 3, padding=1),
                         nn.SiLU()).eval()
    randomize_bn(stem, torch.Generator().manual_seed(0))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    return stem, nn.Sequential(streamcnn.StreamingModule(stem, 40), head)


def test_torch_compile_matches_eager_forward_and_backward():
    stem, model = _model()
    x = torch.randn(2, 3, 90, 77, requires_grad=True)
    params = [x] + list(model.parameters())
    eager = model(x)
    g_eager = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(model)
    out = compiled(x)
    g_comp = torch.autograd.grad(out.square().sum(), params)
    assert rel_err(out, eager) < 1e-5
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < 1e-5


def test_torch_export_keeps_the_op_as_one_node():
    stem, model = _model()
    model.eval()
    x = torch.randn(1, 3, 64, 80)
    ep = torch.export.export(model, (x,))
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.streamcnn.forward.default) == 1
    # nothing of the stem leaked into the graph as ATen ops
    assert torch.ops.aten.convolution.default not in calls
    assert rel_err(ep.module()(x), model(x)) == 0.0

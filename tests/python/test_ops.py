"""The raw operators: opcheck (schema, autograd registration, fake tensor,
AOT dispatch with dynamic shapes), gradcheck, and direct use."""

import pytest
import torch
import torch.nn as nn

import streamcnn
from conftest import randomize_bn, rel_err


def _stem():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(4, 5, 3, stride=2),
                         nn.AvgPool2d(2, 1, count_include_pad=False, padding=1)).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(0))
    return stem


def _args(requires_grad=True, batch=2):
    sm = streamcnn.StreamingModule(_stem(), 14)
    x = torch.randn(batch, 3, 23, 19, dtype=torch.float64, requires_grad=requires_grad)
    return sm, x


def test_opcheck_forward():
    sm, x = _args()
    torch.library.opcheck(torch.ops.streamcnn.forward.default,
                          (x, sm.stream_params(), sm.program, sm.tile_size))


def test_opcheck_forward_no_grad_inputs():
    sm, x = _args(requires_grad=False)
    params = [p.detach() for p in sm.stream_params()]
    torch.library.opcheck(torch.ops.streamcnn.forward.default,
                          (x, params, sm.program, sm.tile_size))


def test_opcheck_backward():
    sm, x = _args(requires_grad=False)
    params = [p.detach() for p in sm.stream_params()]
    y = torch.ops.streamcnn.forward(x, params, sm.program, sm.tile_size)
    g = torch.randn_like(y)
    mask = [True] + [i % 2 == 0 for i in range(len(params))]
    torch.library.opcheck(torch.ops.streamcnn.backward.default,
                          (g, x, params, sm.program, sm.tile_size, mask))


def test_opcheck_backward_requires_grad_inputs():
    """Schema, autograd registration and fake kernel with requires_grad inputs.
    test_aot_dispatch_dynamic differentiates through the backward op, i.e.
    double backward, which streamcnn refuses (next test)."""
    sm, x = _args()
    params = sm.stream_params()
    y = sm(x)
    g = torch.randn_like(y, requires_grad=True)
    mask = [True] + [p.requires_grad for p in params]
    torch.library.opcheck(torch.ops.streamcnn.backward.default,
                          (g, x, params, sm.program, sm.tile_size, mask),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_double_backward_is_refused_clearly():
    sm, x = _args()
    (gx,) = torch.autograd.grad(sm(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        gx.sum().backward()


def test_backward_op_matches_autograd():
    sm, x = _args()
    params = sm.stream_params()
    y_ref = sm.stem(x)
    g = torch.randn_like(y_ref)
    mask = [True] + [p.requires_grad for p in params]
    grads = torch.ops.streamcnn.backward(g, x.detach(), [p.detach() for p in params],
                                         sm.program, sm.tile_size, mask)
    want = torch.autograd.grad(y_ref, [x] + [p for p in params if p.requires_grad], g)
    assert len(grads) == len(want)
    for a, b in zip(grads, want):
        assert a.is_contiguous()
        assert rel_err(a, b) < 1e-10
    # only the image
    (gi,) = torch.ops.streamcnn.backward(g, x.detach(), params, sm.program, sm.tile_size,
                                          [True] + [False] * len(params))
    assert rel_err(gi, want[0]) < 1e-10
    # nothing
    assert torch.ops.streamcnn.backward(g, x.detach(), params, sm.program, sm.tile_size,
                                        [False] * (len(params) + 1)) == []


def test_gradcheck_small():
    stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 2, 2, padding=1)).double().eval()
    sm = streamcnn.StreamingModule(stem, 7)
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    params = sm.stream_params()

    def f(x, *ps):
        return torch.ops.streamcnn.forward(x, list(ps), sm.program, sm.tile_size)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_batch_zero():
    sm, _ = _args()
    x = torch.randn(0, 3, 23, 19, dtype=torch.float64, requires_grad=True)
    y = sm(x)
    assert y.shape == sm.stem(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_square_tile_list_and_tiling_info():
    sm, x = _args()
    y1 = torch.ops.streamcnn.forward(x, sm.stream_params(), sm.program, [14])
    y2 = torch.ops.streamcnn.forward(x, sm.stream_params(), sm.program, [14, 14])
    assert torch.equal(y1, y2)
    t = sm.tiling(23, 19)
    assert t["output"] == tuple(y1.shape[2:])
    assert t["tiles"][0] * t["output_tile"][0] >= t["output"][0]


def test_library_path_loads_in_fresh_process(tmp_path):
    import subprocess, sys  # noqa: E401
    code = ("import torch, sys; torch.ops.load_library(sys.argv[1]); "
            "print(torch.ops.streamcnn.forward.default._schema)")
    out = subprocess.run([sys.executable, "-c", code, streamcnn.library_path()],
                         capture_output=True, text=True, check=True).stdout
    assert "streamcnn::forward(Tensor image, Tensor[] params, int[] program" in out

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
    """All of opcheck, test_aot_dispatch_dynamic included: it differentiates
    through the backward op (double backward, whole-image reference)."""
    sm, x = _args()
    params = sm.stream_params()
    y = sm(x)
    g = torch.randn_like(y, requires_grad=True)
    mask = [True] + [p.requires_grad for p in params]
    torch.library.opcheck(torch.ops.streamcnn.backward.default,
                          (g, x, params, sm.program, sm.tile_size, mask))


def test_reference_program_equals_the_stem():
    from streamcnn.reference import run_program
    sm, x = _args(requires_grad=False)
    assert rel_err(run_program(x, sm.stream_params(), sm.program), sm.stem(x)) < 1e-12


def test_double_backward_matches_whole_image():
    """Gradient penalty: d/dtheta |d loss / dx|^2 through the streamed stem
    equals the whole-image one (fp64)."""
    sm, x = _args()
    params = [p for p in sm.stem.parameters() if p.requires_grad]
    results = []
    for f in (sm, sm.stem):
        (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x] + params))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("case", ["uint8-normalised", "bf16-autocast", "fp16-bn-float32"])
def test_double_backward_of_mixed_dtypes(case):
    """A gradient penalty on the parameters through a stem of a uint8 image
    with mean / std (the image takes no gradient), under bfloat16 autocast
    (its float32 batch norm statistics), and of a float16 stem whose batch
    norm stays float32: the whole-image reference of the double backward
    computes in the operator's dtype (it raised a dtype mismatch, and
    'only floating point tensors can require gradients')."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, 1, 1)).eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    kw, autocast = {}, case == "bf16-autocast"
    x = torch.randn(1, 3, 40, 44)
    if case == "uint8-normalised":
        stem.double()
        x = torch.randint(0, 256, (1, 3, 40, 44), dtype=torch.uint8)
        kw = dict(mean=100.0, std=50.0)
    elif case == "fp16-bn-float32":
        stem.half()
        stem[1].float()
        x = x.half()
    params = list(stem.parameters())
    sm = streamcnn.StreamingModule(stem, 32, **kw)

    def penalty(f, inp):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = f(inp)
        g = torch.autograd.grad((y.float() ** 2).sum() / 1e3, params, create_graph=True)
        return torch.autograd.grad(sum((gi.float() ** 2).sum() for gi in g), params)

    ref_in = (x.double() - 100) / 50 if x.dtype == torch.uint8 else x
    tol = 1e-10 if x.dtype == torch.uint8 else 2e-2
    for a, b in zip(penalty(sm, x), penalty(stem, ref_in)):
        assert bool(torch.isfinite(b).all())
        assert rel_err(a.double(), b.double()) < tol, case


def test_gradgradcheck():
    stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3,
                         stride=2)).double()
    sm = streamcnn.StreamingModule(stem, 7)
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    params = sm.stream_params()
    assert torch.autograd.gradgradcheck(
        lambda x, *ps: torch.ops.streamcnn.forward(x, list(ps), sm.program, sm.tile_size),
        (x, *params))


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


@pytest.mark.parametrize("groups,stride,dilation", [(1, (1, 1), (1, 1)), (2, (2, 1), (1, 2)),
                                                    (4, (3, 2), (2, 1))])
def test_reference_unfold_conv(groups, stride, dilation):
    """The conv spelling used when tracing double backward with symbolic shapes."""
    from streamcnn.reference import _conv_unfold
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64, generator=g)
    w = torch.randn(8, 4 // groups, 3, 2, dtype=torch.float64, generator=g)
    b = torch.randn(8, dtype=torch.float64, generator=g)
    want = torch.nn.functional.conv2d(x, w, b, stride, 0, dilation, groups)
    assert rel_err(_conv_unfold(x, w, b, stride, dilation, groups), want) < 1e-13


@pytest.mark.parametrize("op", ["forward_cached", "backward_cached"])
def test_opcheck_half_values_with_float32_batch_norm(op):
    """bfloat16 values with a batch norm's parameters float32 (as autocast
    leaves them): the fake kernels give the C core's dtypes, the batch
    norm's gradients float32 (uint8 image: the first non-batch-norm
    parameter's dtype)."""
    sm, x = _args(requires_grad=False)
    sm.module.half()
    sm.stem[1].float()
    params = [p.detach().bfloat16() if p.dtype == torch.float16 else p.detach()
              for p in sm.stream_params()]
    for image in (x.bfloat16(), (x * 40 + 120).clamp(0, 255).to(torch.uint8)):
        out, strips = torch.ops.streamcnn.forward_cached(image, params, sm.program,
                                                         sm.tile_size)
        assert out.dtype == torch.bfloat16
        if op == "forward_cached":
            torch.library.opcheck(torch.ops.streamcnn.forward_cached.default,
                                  (image, params, sm.program, sm.tile_size))
            continue
        mask = [image.dtype != torch.uint8] + [True] * len(params)
        args = (torch.randn_like(out), strips, image, params, sm.program, sm.tile_size, mask)
        grads = torch.ops.streamcnn.backward_cached(*args)
        assert [g.dtype for g in grads[mask[0]:]] == [p.dtype for p in params]
        torch.library.opcheck(torch.ops.streamcnn.backward_cached.default, args)


def test_inference_mode_and_functional_call():
    """Entry points the README names: inference_mode, and
    torch.func.functional_call with substituted parameters (read at call
    time, as in optimizer steps)."""
    sm, x = _args(requires_grad=False)
    with torch.inference_mode():
        y = sm(x)
    assert y.is_inference() and rel_err(y, sm.stem(x)) < 1e-12
    gen = torch.Generator().manual_seed(1)
    new = {k: (torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point()
               and "running" not in k else v) for k, v in sm.state_dict().items()}
    got = torch.func.functional_call(sm, new, (x,))
    ref = torch.func.functional_call(sm.stem, {k[len("module."):]: v for k, v in new.items()},
                                     (x,))
    assert rel_err(got, ref) < 1e-10 and rel_err(got, sm(x)) > 1e-3

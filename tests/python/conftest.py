"""Shared helpers: the whole-image autograd oracle and error metrics."""

import copy

import pytest
import torch

import streamcnn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"))]


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same random tensors whatever ran before it (a
    float32 bound can depend on the draw) and whichever subset runs."""
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the oracle); 0 when both are all zero."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / scale if scale > 0 else diff


def randomize_bn(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial frozen statistics and affine parameters."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def _grads(y, x, module, g):
    inputs = ([x] if x.requires_grad else []) + [p for p in module.parameters()
                                                if p.requires_grad]
    names = (["x"] if x.requires_grad else []) + [
        n for n, p in module.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(y, inputs, g))) if inputs else {}


# float32 gradients through max-pool argmax or ReLU masks: near-ties flip
# under any change of rounding (whole-image NCHW vs channels_last differ from
# float64 by up to ~1e-2 on a ResNet-18 stem, just as a tiled pass does; one
# flipped max-pool tie moves a whole gradient entry: the whole-image float32
# pass itself was 3.3e-2 and 6.0e-2 from float64 on 2 of 24 random ResNet-18
# inputs, the streamed one, with its batch norms folded into the
# convolutions, 6.3e-2 on one), so such stems get this sanity bound against
# the float64 ground truth; the exactness of the same stems is what the
# float64 tests check at 1e-10.
TIE_BOUND = 1e-1


def compare(stem, x, tile_size, tol, sm=None, in_channels=None, ties=False):
    """Streamed vs whole-image autograd: the output, the input grad (if x
    requires grad) and every trainable parameter's grad, each as a relative
    error (to its largest element). Returns the worst one.

    float64: each within `tol` of the whole-image pass.
    float32: each within `tol` of the whole-image float32 pass or, where
    float32 itself is not that accurate (ill-conditioned random stems; the
    two passes sum in different orders), no further from the float64 truth
    than 3x whole-image float32 is.
    ties=True (float32 stems with max pooling / ReLU): the output as above,
    the gradients within TIE_BOUND of the float64 whole-image pass.
    """
    sm = sm or streamcnn.StreamingModule(stem, tile_size, in_channels=in_channels)
    y_ref = stem(x)
    y = sm(x)
    g = torch.randn_like(y_ref)
    gr, gs = _grads(y_ref, x, stem, g), _grads(y, x, stem, g)
    errs = {"out": rel_err(y, y_ref), **{n: rel_err(gs[n], gr[n]) for n in gr}}
    bound = {n: tol for n in errs}
    if x.dtype == torch.float32:
        stem64 = copy.deepcopy(stem).double()
        x64 = x.detach().double().requires_grad_(x.requires_grad)
        y64 = stem64(x64)
        g64 = _grads(y64, x64, stem64, g.double())
        if ties:
            errs.update({n: rel_err(gs[n], g64[n]) for n in gr})
            bound.update({n: TIE_BOUND for n in gr})
        else:
            for n, got, ref, truth in [("out", y, y_ref, y64)] + [
                    (n, gs[n], gr[n], g64[n]) for n in gr]:
                if errs[n] > tol:  # judge by distance to the truth instead
                    errs[n] = rel_err(got, truth)
                    bound[n] = max(tol, 3 * rel_err(ref, truth))
    bad = {n: (e, bound[n]) for n, e in errs.items() if e > bound[n]}
    assert not bad, bad
    return max(errs.values())

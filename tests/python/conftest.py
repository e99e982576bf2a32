"""Shared helpers: the whole-image autograd oracle and error metrics."""

import pytest
import torch

import streamcnn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"))]


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


def compare(stem, x, tile_size, tol, sm=None, in_channels=None):
    """Streamed vs whole-image: output, input grad (if x requires grad) and
    every trainable parameter's grad. Returns the worst relative error."""
    sm = sm or streamcnn.StreamingModule(stem, tile_size, in_channels=in_channels)
    params = [p for p in stem.parameters() if p.requires_grad]
    y_ref = stem(x)
    y = sm(x)
    errs = {"out": rel_err(y, y_ref)}
    g = torch.randn_like(y_ref)
    inputs = ([x] if x.requires_grad else []) + params
    if inputs:
        gr = torch.autograd.grad(y_ref, inputs, g)
        gs = torch.autograd.grad(y, inputs, g)
        names = (["x"] if x.requires_grad else []) + [
            n for n, p in stem.named_parameters() if p.requires_grad]
        for n, a, b in zip(names, gs, gr):
            errs[n] = rel_err(a, b)
    worst = max(errs.values())
    assert worst <= tol, {k: v for k, v in errs.items() if v > tol}
    return worst

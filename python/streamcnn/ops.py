"""Python side of the operators: fake (meta) kernels and autograd.

The operators themselves are registered by the C library:

``torch.ops.streamcnn.forward(image, params, program, tile_size) -> Tensor``
    image ``N x C x H x W`` (float32/float64, CPU or CUDA), ``params`` the
    tensors the program indexes, ``program`` the int64 layer program,
    ``tile_size`` ``[rows, cols]`` (or ``[edge]``) of the largest input tile
    (halo included) read per step. Returns the stem output
    ``N x C' x H' x W'`` (contiguous), equal to the whole-image pass.

``torch.ops.streamcnn.backward(grad_output, image, params, program,
tile_size, output_mask) -> Tensor[]``
    Gradients of ``(grad_output * forward(...)).sum()`` with respect to the
    image (``output_mask[0]``) and each parameter (``output_mask[1 + k]``);
    one contiguous tensor per true entry, in order.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from ._library import load_library
from .program import output_shape

load_library()


@torch.library.register_fake("streamcnn::forward")
def _forward_fake(image, params, program, tile_size):
    torch._check(image.dim() == 4, lambda: "streamcnn: image must be N x C x H x W")
    c, h, w = output_shape(program, image.shape[2], image.shape[3])
    return image.new_empty((image.shape[0], c, h, w))


@torch.library.register_fake("streamcnn::backward")
def _backward_fake(grad_output, image, params, program, tile_size, output_mask):
    out = []
    if output_mask[0]:
        out.append(image.new_empty(image.shape))
    for p, m in zip(params, output_mask[1:]):
        if m:
            out.append(p.new_empty(p.shape))
    return out


def _setup_context(ctx, inputs, output):
    image, params, program, tile_size = inputs
    ctx.mask = [bool(image.requires_grad)] + [bool(p.requires_grad) for p in params]
    ctx.program = program
    ctx.tile_size = tile_size
    if any(ctx.mask):
        ctx.save_for_backward(image, *params)


def _backward(ctx, grad):
    n = len(ctx.mask) - 1
    if not any(ctx.mask):
        return None, [None] * n, None, None
    image, *params = ctx.saved_tensors
    grads = torch.ops.streamcnn.backward(grad, image, params, ctx.program, ctx.tile_size,
                                         ctx.mask)
    it = iter(grads)
    grad_image = next(it) if ctx.mask[0] else None
    grad_params = [next(it) if m else None for m in ctx.mask[1:]]
    return grad_image, grad_params, None, None


torch.library.register_autograd("streamcnn::forward", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "streamcnn: double backward (gradients of gradients, create_graph=True through a "
        "StreamingModule) is not supported")


# Without this, autograd would treat the backward op as a constant and give
# silently wrong second derivatives; with it, they raise.
torch.library.register_autograd("streamcnn::backward", _no_double_backward)


def forward(image: torch.Tensor, params: Sequence[torch.Tensor], program: Sequence[int],
            tile_size: Sequence[int]) -> torch.Tensor:
    """Differentiable streamed forward (thin wrapper of the operator)."""
    return torch.ops.streamcnn.forward(image, list(params), list(program), list(tile_size))


def backward(grad_output: torch.Tensor, image: torch.Tensor, params: Sequence[torch.Tensor],
             program: Sequence[int], tile_size: Sequence[int],
             output_mask: Sequence[bool]) -> List[torch.Tensor]:
    """Streamed gradients (thin wrapper of the operator)."""
    return torch.ops.streamcnn.backward(grad_output, image, list(params), list(program),
                                        list(tile_size), [bool(m) for m in output_mask])

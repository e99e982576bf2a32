"""Python side of the operators: fake (meta) kernels and autograd.

The operators themselves are registered by the C library:

``torch.ops.streamcnn.forward(image, params, program, tile_size) -> Tensor``
    image ``N x C x H x W`` (uint8/float16/bfloat16/float32/float64, CPU or
    CUDA; in host memory with the params on a CUDA device, each tile is
    streamed to the device, read directly by the gather kernel when the
    image is pinned), ``params`` the
    tensors the program indexes, ``program`` the int64 layer program,
    ``tile_size`` ``[rows, cols]`` (or ``[edge]``) of the largest input tile
    (halo included) read per step. Returns the stem output
    ``N x C' x H' x W'`` (contiguous), equal to the whole-image pass.

``torch.ops.streamcnn.backward(grad_output, image, params, program,
tile_size, output_mask) -> Tensor[]``
    Gradients of ``(grad_output * forward(...)).sum()`` with respect to the
    image (``output_mask[0]``) and each parameter (``output_mask[1 + k]``);
    one contiguous tensor per true entry, in order. Each tile recomputes
    its whole cone (halo included).

``torch.ops.streamcnn.forward_cached(image, params, program, tile_size)
-> (Tensor, Tensor)``
    The output of ``forward`` and the *strips*: a flat tensor with the rows
    of every value that each row of tiles shares with the row below (its
    halo). Not differentiable.

``torch.ops.streamcnn.backward_cached(grad_output, strips, image, params,
program, tile_size, output_mask) -> Tensor[]``
    The gradients of ``backward``, computed column by column, rows bottom
    up: each tile recomputes only its own rows (the halo comes from the
    strips) and passes the halo's gradient to the tile above, so every
    value is recomputed once (no overlap) at the cost of keeping the strips
    from the forward to the backward.

``forward`` also carries halos down the rows (each value computed once),
without keeping them.

``torch.ops.streamcnn.forward_rows(image, params, program, tile_size, rows)``,
``backward_rows(grad_output, image, params, program, tile_size, output_mask,
rows)``, ``forward_cached_rows(..., rows)``, ``backward_cached_rows(...,
rows)``
    The same for one band of stem output rows (tile-parallel streaming,
    ``streamcnn.distributed``): ``rows = [out_lo, out_hi, image_row0,
    image_height]`` asks for the output rows ``[out_lo, out_hi)`` of an
    image of ``image_height`` rows of which ``image`` holds the rows
    ``[image_row0, image_row0 + image.shape[2])`` (at least the rows the
    band reads, ``streamcnn.band_info``). The output is
    ``N x C' x (out_hi - out_lo) x W'``, equal to those rows of the
    whole-image output; the band's first tile row computes its whole cone,
    the image's true borders pad only where the cone reaches them. The
    backward takes that band's output gradient and returns the parameter
    gradients of the band and the image gradient over the rows ``image``
    holds (zeros outside the band's cone).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import List, Sequence

import torch

from . import progress as _progress
from ._library import load_library
from .program import output_shape

load_library()


def compute_dtype(image, params) -> torch.dtype:
    """The dtype the op computes in: the image's, or for a uint8 image
    (converted per tile) the parameters' (float32 without parameters): their
    narrowest, the first of two of one width, as the C core picks it (batch
    norms' and mean / std may be float32 in a float16 / bfloat16
    computation)."""
    if image.dtype != torch.uint8:
        return image.dtype
    if not len(params):
        return torch.float32
    return min(params, key=lambda p: p.element_size()).dtype


@torch.library.register_fake("streamcnn::forward")
def _forward_fake(image, params, program, tile_size):
    torch._check(image.dim() == 4, lambda: "streamcnn: image must be N x C x H x W")
    c, h, w = output_shape(program, image.shape[2], image.shape[3])
    dtype = compute_dtype(image, params)
    device = image.device
    if device.type == "cpu" and len(params) and params[0].device.type == "cuda":
        device = params[0].device  # a host image streamed to the device
    return image.new_empty((image.shape[0], c, h, w), dtype=dtype, device=device)


@torch.library.register_fake("streamcnn::backward")
def _backward_fake(grad_output, image, params, program, tile_size, output_mask):
    out = []
    if output_mask[0]:
        out.append(image.new_empty(image.shape))
    for p, m in zip(params, output_mask[1:]):
        if m:
            out.append(p.new_empty(p.shape))
    return out


def _strip_count(image, program, tile_size):
    """Elements of forward_cached's strips (a dynamic size when the image
    extent is symbolic)."""
    n, h, w = image.shape[0], image.shape[2], image.shape[3]
    if all(isinstance(v, int) for v in (n, h, w)):
        from ._library import work_info
        tile = list(tile_size)
        per_image = work_info(program, h, w, (tile[0], tile[-1]))[6]
        return int(per_image) * n
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.register_fake("streamcnn::forward_cached")
def _forward_cached_fake(image, params, program, tile_size):
    out = _forward_fake(image, params, program, tile_size)
    return out, out.new_empty((_strip_count(image, program, tile_size),))


@torch.library.register_fake("streamcnn::backward_cached")
def _backward_cached_fake(grad_output, strips, image, params, program, tile_size,
                          output_mask):
    return _backward_fake(grad_output, image, params, program, tile_size, output_mask)


def _band_rows(rows):
    torch._check(len(rows) == 4, lambda: "streamcnn: rows must be [out_lo, out_hi, "
                 "image_row0, image_height]")
    return int(rows[1]) - int(rows[0])


@torch.library.register_fake("streamcnn::forward_rows")
def _forward_rows_fake(image, params, program, tile_size, rows):
    torch._check(image.dim() == 4, lambda: "streamcnn: image must be N x C x H x W")
    c, h, w = output_shape(program, rows[3], image.shape[3])
    dtype = compute_dtype(image, params)
    device = image.device
    if device.type == "cpu" and len(params) and params[0].device.type == "cuda":
        device = params[0].device
    return image.new_empty((image.shape[0], c, _band_rows(rows), w), dtype=dtype,
                           device=device)


@torch.library.register_fake("streamcnn::forward_cached_rows")
def _forward_cached_rows_fake(image, params, program, tile_size, rows):
    out = _forward_rows_fake(image, params, program, tile_size, rows)
    n, w = image.shape[0], image.shape[3]
    if all(isinstance(v, int) for v in (n, w)):
        from ._library import band_info
        tile = list(tile_size)
        count = int(band_info(program, int(rows[3]), w, (tile[0], tile[-1]),
                              (rows[0], rows[1]))[2]) * n
    else:
        count = torch.library.get_ctx().new_dynamic_size()
    return out, out.new_empty((count,))


@torch.library.register_fake("streamcnn::backward_rows")
def _backward_rows_fake(grad_output, image, params, program, tile_size, output_mask,
                        rows):
    return _backward_fake(grad_output, image, params, program, tile_size, output_mask)


@torch.library.register_fake("streamcnn::backward_cached_rows")
def _backward_cached_rows_fake(grad_output, strips, image, params, program, tile_size,
                               output_mask, rows):
    return _backward_fake(grad_output, image, params, program, tile_size, output_mask)


_local = threading.local()


@contextlib.contextmanager
def call_options(progress: bool = False, deterministic: bool = False):
    """Options for the operator calls in this block on this thread, carried
    over to the backward of the forwards called in it: per-tile progress
    (streamcnn.progress) and deterministic algorithms (cuDNN's
    deterministic convolutions, no benchmark-chosen algorithms; the tile
    kernels and the tile order are deterministic anyway)."""
    prev = getattr(_local, "opts", (False, False))
    opts = (bool(progress) or prev[0], bool(deterministic) or prev[1])
    _local.opts = opts
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark)
    try:
        if opts[1]:
            cudnn.deterministic, cudnn.benchmark = True, False
        with _progress.show(opts[0]):
            yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved
        _local.opts = prev


def _setup_context(ctx, inputs, output):
    """For forward and forward_cached (and their *_rows, whose trailing
    rows go to the backward); the latter's output is (stem output,
    strips), and the strips go to backward_cached."""
    image, params, program, tile_size = inputs[:4]
    ctx.rows = list(inputs[4]) if len(inputs) > 4 else None
    ctx.opts = getattr(_local, "opts", (False, False))  # the forward's options
    ctx.mask = [bool(image.requires_grad)] + [bool(p.requires_grad) for p in params]
    ctx.program = program
    ctx.tile_size = tile_size
    ctx.cached = isinstance(output, (tuple, list))
    strips = (output[1],) if ctx.cached else ()
    if ctx.cached:
        ctx.mark_non_differentiable(output[1])
        # else autograd hands backward a zero tensor the strips' size as
        # their gradient: as much memory again as the strips
        ctx.set_materialize_grads(False)
    if any(ctx.mask):
        ctx.save_for_backward(*strips, image, *params)


def _backward(ctx, grad, *grad_strips):
    n = len(ctx.mask) - 1
    tail = (None,) * (2 if ctx.rows is None else 3)  # program, tile_size[, rows]
    if not any(ctx.mask) or grad is None:  # None: no gradient reached the output
        return (None, [None] * n) + tail
    with call_options(*ctx.opts):
        if ctx.rows is not None and ctx.cached:
            strips, image, *params = ctx.saved_tensors
            grads = torch.ops.streamcnn.backward_cached_rows(
                grad, strips, image, params, ctx.program, ctx.tile_size, ctx.mask, ctx.rows)
        elif ctx.rows is not None:
            image, *params = ctx.saved_tensors
            grads = torch.ops.streamcnn.backward_rows(grad, image, params, ctx.program,
                                                      ctx.tile_size, ctx.mask, ctx.rows)
        elif ctx.cached:
            strips, image, *params = ctx.saved_tensors
            grads = torch.ops.streamcnn.backward_cached(grad, strips, image, params,
                                                        ctx.program, ctx.tile_size, ctx.mask)
        else:
            image, *params = ctx.saved_tensors
            grads = torch.ops.streamcnn.backward(grad, image, params, ctx.program,
                                                 ctx.tile_size, ctx.mask)
    it = iter(grads)
    grad_image = next(it) if ctx.mask[0] else None
    grad_params = [next(it) if m else None for m in ctx.mask[1:]]
    return (grad_image, grad_params) + tail


torch.library.register_autograd("streamcnn::forward", _backward, setup_context=_setup_context)
torch.library.register_autograd("streamcnn::forward_cached", _backward,
                                setup_context=_setup_context)
torch.library.register_autograd("streamcnn::forward_rows", _backward,
                                setup_context=_setup_context)
torch.library.register_autograd("streamcnn::forward_cached_rows", _backward,
                                setup_context=_setup_context)


def _no_double_backward_rows(ctx, *grads):
    raise RuntimeError("streamcnn: double backward (create_graph=True) through a row band "
                       "(tile-parallel streaming) is not supported; run the stem in one "
                       "process for second derivatives")


def _setup_nothing(ctx, inputs, output):
    pass


# Without a formula autograd would treat these backward ops as constants and
# give silently wrong second derivatives: refuse instead.
torch.library.register_autograd("streamcnn::backward_rows", _no_double_backward_rows,
                                setup_context=_setup_nothing)
torch.library.register_autograd("streamcnn::backward_cached_rows", _no_double_backward_rows,
                                setup_context=_setup_nothing)


def _setup_double(ctx, inputs, output):
    grad_output, image, params, program, tile_size, output_mask = inputs
    ctx.program = list(program)
    ctx.mask = [bool(m) for m in output_mask]
    ctx.save_for_backward(grad_output, image, *params)


_warned_double = False


def _double_backward(ctx, grads):
    """Second derivatives: the tiled C core has no double backward, so the
    program is run whole-image with differentiable PyTorch ops
    (``reference.run_program``) and differentiated twice. Exact, but with the
    memory of a whole-image pass (warned once)."""
    global _warned_double
    if not _warned_double:
        _warned_double = True
        warnings.warn("streamcnn: double backward (create_graph=True through a streamed "
                      "stem) runs the stem whole-image, with the memory of an unstreamed "
                      "pass", stacklevel=2)
    from .reference import run_program

    grad_output, image, *params = ctx.saved_tensors
    mask = ctx.mask
    with torch.enable_grad():
        go = grad_output.detach().requires_grad_()
        x = image.detach().requires_grad_(image.is_floating_point())     # not uint8
        ps = [p.detach().requires_grad_(p.is_floating_point()) for p in params]
        y = run_program(x, ps, ctx.program)
        wrt = ([x] if mask[0] else []) + [p for p, m in zip(ps, mask[1:]) if m]
        firsts = torch.autograd.grad(y, wrt, go, create_graph=True, allow_unused=True)
        total = None
        for g1, cot in zip(firsts, grads):
            if g1 is None or cot is None or not g1.requires_grad:
                continue
            term = (g1 * cot).sum()
            total = term if total is None else total + term
        leaves = [go] + [t for t in [x, *ps] if t.requires_grad]
        if total is None:
            got = [None] * len(leaves)
        else:
            got = list(torch.autograd.grad(total, leaves, allow_unused=True))
    it = iter(got[1:])
    grad_image, *grad_params = [next(it) if t.requires_grad else None for t in [x, *ps]]
    return got[0], grad_image, grad_params, None, None, None


# Second derivatives (gradient penalties, create_graph=True) go through the
# whole-image reference; without a formula autograd would treat the backward
# op as a constant and give silently wrong second derivatives.
torch.library.register_autograd("streamcnn::backward", _double_backward,
                                setup_context=_setup_double)


def _setup_double_cached(ctx, inputs, output):
    grad_output, strips, image, params, program, tile_size, output_mask = inputs
    _setup_double(ctx, (grad_output, image, params, program, tile_size, output_mask), output)


def _double_backward_cached(ctx, grads):
    g_out, g_image, g_params, *_ = _double_backward(ctx, grads)
    return g_out, None, g_image, g_params, None, None, None


torch.library.register_autograd("streamcnn::backward_cached", _double_backward_cached,
                                setup_context=_setup_double_cached)


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

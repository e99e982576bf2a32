"""The layer program run as one whole-image pass of plain, differentiable
PyTorch ops: the meaning of a program, independent of tiling.

Used for second derivatives (double backward through ``streamcnn::backward``,
which the tiled C core does not provide) and by tests as an oracle of the
program itself. The program must be valid (the C decoder has checked it
when the operator ran).
"""

import struct
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .ops import compute_dtype

MAGIC = 0x53434E4E


def _f64(word: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(word)))[0]


def _opt(params: Sequence[torch.Tensor], i: int):
    return None if i < 0 else params[i]


def _act(x: torch.Tensor, kind: int, arg: int) -> torch.Tensor:
    if kind == 1:
        return F.relu(x)
    if kind == 2:
        return F.relu6(x)
    if kind == 3:
        return F.leaky_relu(x, _f64(arg))
    if kind == 4:
        return F.silu(x)
    if kind == 5:
        return F.gelu(x, approximate="tanh" if arg == 1 else "none")
    if kind == 6:
        return torch.sigmoid(x)
    if kind == 7:
        return torch.tanh(x)
    if kind == 8:
        return F.hardswish(x)
    raise ValueError(f"streamcnn: unknown activation kind {kind}")


def _symbolic(x: torch.Tensor) -> bool:
    """Sizes are symbolic (tracing with dynamic shapes)."""
    return any(isinstance(d, torch.SymInt) for d in x.shape)


def _conv_unfold(x, weight, bias, stride, dilation, groups):
    """conv2d (padding 0) as unfold + matmul. PyTorch's convolution double
    backward cannot trace symbolic shapes; this spelling can."""
    n, c, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, stride=stride)  # N, C*kh*kw, L
    cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    wmat = weight.reshape(groups, cout // groups, cg * kh * kw)
    y = torch.einsum("gok,ngkl->ngol", wmat, cols).reshape(n, cout, ho, wo)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


def run_program(image: torch.Tensor, params: Sequence[torch.Tensor],
                program: Sequence[int]) -> torch.Tensor:
    """``forward(image, params, program, tile)`` computed whole-image with
    differentiable PyTorch ops (any tile gives the same result). Every value
    is in the operator's compute dtype: a batch norm with float32 statistics
    in a half precision computation rounds its result to it, as the
    operator's does."""
    w = [int(v) for v in program]
    if len(w) < 5 or w[0] != MAGIC:
        raise ValueError("streamcnn: not a streamcnn program")
    n_instr = w[3]
    dtype = compute_dtype(image, params)
    values: List[torch.Tensor] = [image.to(dtype)]
    at = 5
    for _ in range(n_instr):
        op, nf = w[at], w[at + 1]
        f = w[at + 2:at + 2 + nf]
        at += 2 + nf
        x = values[f[0]]
        if op == 1:    # conv
            _, wi, bi, _, _, groups, _, _, sh, sw, dh, dw, pt, pb, pl, pr = f
            x = F.pad(x, (pl, pr, pt, pb))
            if _symbolic(x):
                y = _conv_unfold(x, params[wi], _opt(params, bi), (sh, sw), (dh, dw), groups)
            else:
                y = F.conv2d(x, params[wi], _opt(params, bi), (sh, sw), 0, (dh, dw), groups)
        elif op == 2:  # max pool
            _, kh, kw, sh, sw, dh, dw, ph, pw, ceil = f
            y = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bool(ceil))
        elif op == 3:  # avg pool
            _, kh, kw, sh, sw, ph, pw, ceil, cip, div = f
            y = F.avg_pool2d(x, (kh, kw), (sh, sw), (ph, pw), bool(ceil), bool(cip),
                             div or None)
        elif op == 4:  # batch norm (eval)
            _, wi, bi, mi, vi, eps = f
            # spelled out: differentiable in the statistics too (opcheck asks)
            shape = (1, -1, 1, 1)
            y = (x - params[mi].reshape(shape)) * torch.rsqrt(
                params[vi].reshape(shape) + _f64(eps))
            if wi >= 0:
                y = y * params[wi].reshape(shape)
            if bi >= 0:
                y = y + params[bi].reshape(shape)
        elif op == 5:  # activation
            y = _act(x, f[1], f[2])
        elif op == 6:  # add
            y = x + values[f[1]]
        elif op == 7:  # layer norm over the channels of each pixel
            _, wi, bi, eps = f
            c = x.shape[1]
            y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), _opt(params, wi), _opt(params, bi),
                             _f64(eps)).permute(0, 3, 1, 2)
        elif op == 8:  # linear on the channels of each pixel
            _, wi, bi, _, _ = f
            y = F.linear(x.permute(0, 2, 3, 1), params[wi], _opt(params, bi)).permute(0, 3, 1, 2)
        elif op == 9:  # per-channel scale
            y = x * params[f[1]].reshape(1, -1, 1, 1)
        elif op == 10:  # the channels of a, then of b
            y = torch.cat([x, values[f[1]]], 1)
        elif op == 11:  # channel q * groups + r is start + r * a + q * b
            _, c_out, start, groups, a, b = f
            k = torch.arange(c_out, device=x.device)
            y = x.index_select(1, start + (k % groups) * a + (k // groups) * b)
        else:
            raise ValueError(f"streamcnn: unknown opcode {op}")
        values.append(y.to(dtype))
    return values[-1].contiguous()

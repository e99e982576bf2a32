"""The layer program: encoding, conversion of an ``nn.Module`` stem with
``torch.fx``, and the output-shape arithmetic used by the fake kernels.

A program is a flat list of int64 words (the format is documented in
``op/program.c`` and the README). Values are numbered: 0 is the image,
``i + 1`` the output of instruction ``i``; the last value is the output.
Parameters (weights, biases, batch-norm statistics) are referenced by
index into a separate list of tensors that is passed with every call, so
the program holds no data and parameters are read at call time.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

MAGIC = 0x53434E4E
VERSION = 1
HEADER = 5

OP_CONV, OP_MAXPOOL, OP_AVGPOOL, OP_BATCHNORM, OP_ACT, OP_ADD = 1, 2, 3, 4, 5, 6
OP_LAYERNORM_C, OP_LINEAR_C, OP_SCALE_C, OP_CAT, OP_CHANNELS = 7, 8, 9, 10, 11
N_FIELDS = {OP_CONV: 16, OP_MAXPOOL: 10, OP_AVGPOOL: 10, OP_BATCHNORM: 6, OP_ACT: 3, OP_ADD: 2,
            OP_LAYERNORM_C: 4, OP_LINEAR_C: 5, OP_SCALE_C: 2, OP_CAT: 2, OP_CHANNELS: 6}

ACT_RELU, ACT_RELU6, ACT_LEAKY_RELU, ACT_SILU, ACT_GELU, ACT_SIGMOID, ACT_TANH, ACT_HARDSWISH = range(1, 9)

SUPPORTED = (
    "Conv2d (padding_mode='zeros'), MaxPool2d, AvgPool2d (and F.max_pool2d, F.avg_pool2d), "
    "zero padding (ZeroPad2d, ConstantPad2d / F.pad with value 0) that a Conv2d or pool reads, "
    "BatchNorm2d in eval mode (and F.batch_norm with training=False, "
    "FrozenBatchNorm2d), "
    "ReLU, ReLU6, LeakyReLU, SiLU, GELU, Sigmoid, Tanh, Hardswish, Identity, "
    "Dropout / StochasticDepth / timm's DropPath in eval mode, residual adds, "
    "torch.cat along the channels "
    "(DenseNet, Inception), chunk / split / slices of the channels and channel shuffles "
    "(ShuffleNet), and per-pixel channel ops "
    "(LayerNorm over channels, Linear on channels after a permute to channels-last, "
    "per-channel scales)"
)


def double_bits(x: float) -> int:
    """The IEEE-754 bits of a double as a signed int64 (program encoding)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class ProgramBuilder:
    """Appends instructions; each method returns the new value's index."""

    def __init__(self, in_channels: int):
        self.in_channels = int(in_channels)
        self.words: List[int] = []
        self.n_instr = 0
        self.params: List[Any] = []  # opaque keys, one per parameter slot
        self._param_index: Dict[Any, int] = {}
        # per value: the value whose rows and columns it has (itself, or
        # for a pointwise instruction its first input's)
        self.space: List[int] = [0]

    def param(self, key) -> int:
        """Index of a parameter slot for `key` (deduplicated)."""
        if key not in self._param_index:
            self._param_index[key] = len(self.params)
            self.params.append(key)
        return self._param_index[key]

    def _emit(self, op: int, fields: Sequence[int]) -> int:
        assert len(fields) == N_FIELDS[op]
        self.words += [op, len(fields), *[int(f) for f in fields]]
        self.n_instr += 1
        windowed = op in (OP_CONV, OP_MAXPOOL, OP_AVGPOOL)
        self.space.append(self.n_instr if windowed else self.space[int(fields[0])])
        return self.n_instr

    def conv(self, x, weight, bias, c_in, c_out, groups, kernel, stride, dilation, pad):
        """pad = (top, bottom, left, right)."""
        return self._emit(OP_CONV, [x, weight, bias, c_in, c_out, groups, *kernel, *stride,
                                    *dilation, *pad])

    def maxpool(self, x, kernel, stride, dilation, padding, ceil_mode):
        return self._emit(OP_MAXPOOL, [x, *kernel, *stride, *dilation, *padding, int(ceil_mode)])

    def avgpool(self, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return self._emit(OP_AVGPOOL, [x, *kernel, *stride, *padding, int(ceil_mode),
                                       int(count_include_pad), int(divisor_override or 0)])

    def batchnorm(self, x, weight, bias, mean, var, eps):
        return self._emit(OP_BATCHNORM, [x, weight, bias, mean, var, double_bits(eps)])

    def act(self, x, kind, arg=0):
        return self._emit(OP_ACT, [x, kind, arg])

    def add(self, a, b):
        return self._emit(OP_ADD, [a, b])

    def layernorm_c(self, x, weight, bias, eps):
        return self._emit(OP_LAYERNORM_C, [x, weight, bias, double_bits(eps)])

    def linear_c(self, x, weight, bias, c_in, c_out):
        return self._emit(OP_LINEAR_C, [x, weight, bias, c_in, c_out])

    def scale_c(self, x, scale):
        return self._emit(OP_SCALE_C, [x, scale])

    def cat(self, a, b):
        return self._emit(OP_CAT, [a, b])

    def channels(self, x, c_out, start, groups, a, b):
        """Output channel ``q * groups + r`` is input channel ``start + r * a
        + q * b``."""
        return self._emit(OP_CHANNELS, [x, c_out, start, groups, a, b])

    def program(self) -> List[int]:
        return [MAGIC, VERSION, self.in_channels, self.n_instr, len(self.params), *self.words]


# ---------------------------------------------------------------------------
# shapes (mirror of op/geometry.c, used by the fake kernels; works on SymInts)


def _instructions(program: Sequence[int]):
    """(opcode, fields) of each instruction of a valid program."""
    pos = HEADER
    for _ in range(program[3]):
        op, nf = program[pos], program[pos + 1]
        yield op, program[pos + 2: pos + 2 + nf]
        pos += 2 + nf


def prepend_normalize(program: Sequence[int]) -> List[int]:
    """The program with a per-channel affine map of the image in front: a
    depthwise 1 x 1 convolution (weight ``params[n]``, C x 1 x 1 x 1, bias
    ``params[n + 1]``, n = the program's parameter count), so that mean/std
    normalisation runs inside each tile. Every value index moves up by one
    (value 1 is now the normalised image); parameter indices stay."""
    w = [int(v) for v in program]
    c, n_instr, n_params = w[2], w[3], w[4]
    out = [w[0], w[1], c, n_instr + 1, n_params + 2,
           OP_CONV, 16, 0, n_params, n_params + 1, c, c, c, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    for op, fields in _instructions(w):
        f = list(fields)
        f[0] += 1                      # every instruction's first field is a value
        if op in (OP_ADD, OP_CAT):
            f[1] += 1                  # add and cat read two
        out += [op, len(f), *f]
    return out


def batchnorm_params(program: Sequence[int]) -> List[int]:
    """Indices of the parameters that batch norms read (weight, bias,
    running statistics): in a float16 / bfloat16 computation they may stay
    float32, as torch.autocast leaves them."""
    return sorted({k for op, f in _instructions(program) if op == OP_BATCHNORM
                   for k in f[1:5] if k >= 0})


def has_autocast_ops(program: Sequence[int]) -> bool:
    """Whether the program has a layer that torch.autocast runs in the
    lower precision (a convolution or a channel Linear)."""
    return any(op in (OP_CONV, OP_LINEAR_C) for op, _ in _instructions(program))


def _window_out(n, k, s, d, pad_lo, pad_hi, ceil_mode):
    num = n + pad_lo + pad_hi - (d * (k - 1) + 1)
    if ceil_mode:
        num = num + s - 1
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= n + pad_lo:
        out = out - 1
    return out


def output_shape(program: Sequence[int], h, w) -> Tuple[int, Any, Any]:
    """(channels, rows, cols) of the program's output for an h x w image.
    Assumes a valid program (the C decoder validates)."""
    if len(program) < HEADER or program[0] != MAGIC:
        raise ValueError("streamcnn: not a streamcnn program")
    sizes = [(program[2], h, w)]
    for op, f in _instructions(program):
        c, hh, ww = sizes[f[0]]
        if op == OP_CONV:
            kh, kw, sh, sw, dh, dw, pt, pb, pl, pr = f[6:16]
            sizes.append((f[4], _window_out(hh, kh, sh, dh, pt, pb, False),
                          _window_out(ww, kw, sw, dw, pl, pr, False)))
        elif op == OP_MAXPOOL:
            kh, kw, sh, sw, dh, dw, ph, pw, ceil = f[1:10]
            sizes.append((c, _window_out(hh, kh, sh, dh, ph, ph, ceil),
                          _window_out(ww, kw, sw, dw, pw, pw, ceil)))
        elif op == OP_AVGPOOL:
            kh, kw, sh, sw, ph, pw, ceil = f[1:8]
            sizes.append((c, _window_out(hh, kh, sh, 1, ph, ph, ceil),
                          _window_out(ww, kw, sw, 1, pw, pw, ceil)))
        elif op == OP_LINEAR_C:
            sizes.append((f[4], hh, ww))
        elif op == OP_CAT:
            sizes.append((c + sizes[f[1]][0], hh, ww))
        elif op == OP_CHANNELS:
            sizes.append((f[1], hh, ww))
        else:
            sizes.append((c, hh, ww))
    return sizes[-1]


# ---------------------------------------------------------------------------
# nn.Module -> program


@dataclass
class Converted:
    """Result of converting a stem."""

    program: List[int]
    # (qualified submodule name, attribute) of each parameter slot
    param_refs: List[Tuple[str, str]]
    # submodules whose train/eval mode matters (batch norm, dropout): kept
    # in eval mode
    mode_modules: List[Tuple[str, nn.Module]] = field(default_factory=list)
    # each instruction's layer, in words ("'layer1.0.conv1' (Conv2d)")
    labels: List[str] = field(default_factory=list)
    # other modules whose mode the trace depends on, and that mode
    traced_modes: List[Tuple[str, nn.Module, bool]] = field(default_factory=list)


def _shape_text(shape) -> str:
    return "(" + ", ".join(d.kind if isinstance(d, _Dim) else str(d) for d in shape) + ")"


def _unsupported(node: fx.Node, what: str, hint: str) -> ValueError:
    return ValueError(f"streamcnn: cannot stream {what} (fx node '{node.name}'"
                      f"{_inside(node)}): {hint}")


def _inside(node: fx.Node) -> str:
    """", in 'layer1.0.se' (SEModule)": the innermost module whose forward
    made a function or method node (fx's nn_module_stack), or ""."""
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module" or not stack:
        return ""
    path, kind = list(stack.values())[-1]
    path = _strip_leaf(str(path))
    if not path:
        return ""
    return f", in '{path}' ({getattr(kind, '__name__', kind)})"


_UPSAMPLE_HINT = (
    "upsampling is not supported in a streamed stem (its tiles only keep or reduce the "
    "resolution); keep it in the head, after the streamed stem"
)

_NONLOCAL_HINT = (
    "it is not local (an output pixel depends on the whole image), so it cannot be "
    "computed tile by tile; keep it in the head, after the streamed stem"
)

_NONLOCAL_MODULES = (
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.GroupNorm,
    nn.InstanceNorm2d, nn.MultiheadAttention, nn.Upsample, nn.Softmax, nn.Softmax2d,
    nn.LocalResponseNorm,
)


# functions and methods that are never local (what they read spans the image)
_NONLOCAL_FNS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.sum,
                 F.interpolate, F.group_norm)
_NONLOCAL_METHODS = ("mean", "sum")


def _nonlocal(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        return isinstance(m, _NONLOCAL_MODULES) and not isinstance(m, (nn.Flatten,
                                                                        nn.Unflatten))
    if node.op == "call_function" and node.target in (torch.mean, torch.sum) or \
            node.op == "call_method" and node.target in _NONLOCAL_METHODS:
        # over the rows or columns, or everything (a sum over the channels
        # is local, though not supported)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        return any(d is None or (isinstance(d, int) and d in (2, 3, -1, -2)) for d in dims)
    return node.op == "call_function" and node.target in _NONLOCAL_FNS


def _node_what(node: fx.Node, root: nn.Module) -> str:
    """How a message names a node's layer (as the converter's methods do)."""
    t = node.target
    if node.op == "call_module":
        return f"{type(root.get_submodule(str(t))).__name__} '{t}'"
    if node.op == "call_method":
        return f"method .{t}()"
    return f"call to {getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}"


def _same_forward(m: nn.Module, cls) -> bool:
    return isinstance(m, cls) and type(m).forward is cls.forward


# Layouts of the stem's values: a tensor is N x C x H x W, or that tensor
# permuted to N x H x W x C (as ConvNeXt does around LayerNorm / Linear).
NCHW, NHWC = "NCHW", "NHWC"
_PERMUTES = {(NCHW, (0, 2, 3, 1)): NHWC, (NHWC, (0, 3, 1, 2)): NCHW}


_SHAPE_HINT = ("it reads the shape of a tensor; a stem whose layers depend on the image's "
               "shape cannot be streamed (each tile has another shape): use constant layer "
               "arguments")


# -- channel selections: chunk / split / slices of the channels, channel
# shuffles (view to N x g x C/g x H x W, transpose, view back). They are
# followed as index lists over a value's channels and emitted as one
# `channels` instruction when a layer reads them (a shuffle then a chunk
# is one instruction per half).

@dataclass(frozen=True)
class _Dim:
    """A size read from a tensor (x.size(), x.shape) that differs from
    tile to tile or image to image: the batch ("N"), or the rows / columns
    ("H", "W") of value ``of``."""
    kind: str
    of: int = -1


@dataclass
class _Sel:
    """A tensor of the stem that is a selection of the channels of ``src``
    (an N x C x H x W tensor of the stem): its channel k is ``src``'s
    channel ``idx[k]``. ``split = (d1, d2)``: a 5-d view N x d1 x d2 x H x W
    of it (k = i1 * d2 + i2)."""
    src: fx.Node
    idx: Tuple[int, ...]
    split: Optional[Tuple[int, int]] = None


def _holds_dim(v) -> bool:
    return isinstance(v, _Dim) or (isinstance(v, (list, tuple)) and any(map(_holds_dim, v)))


def _fit_channels(idx: Sequence[int]) -> Optional[Tuple[int, int, int, int]]:
    """(start, groups, a, b) with ``idx[q * groups + r] == start + r * a +
    q * b`` (a, b >= 0), the form of a `channels` instruction; None when
    the list has no such form."""
    n, start = len(idx), idx[0]
    if n == 1:
        return start, 1, 0, 1
    a = idx[1] - start
    g = next((k for k in range(2, n) if idx[k] != start + k * a), n)
    if g == n:                                  # one arithmetic run
        return (start, 1, 0, a) if a >= 1 else None
    b = idx[g] - start
    if n % g or a < 0 or b < 0:
        return None
    ok = all(idx[q * g + r] == start + r * a + q * b for q in range(n // g) for r in range(g))
    return (start, g, a, b) if ok else None


# arithmetic and comparisons on sizes read from tensors
_SIZE_OPS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
             operator.truediv, operator.neg, operator.eq, operator.ne, operator.lt,
             operator.le, operator.gt, operator.ge)
# the reshapes and selections of the channels as functions, by method name
_CHANNEL_FNS = {torch.chunk: "chunk", torch.split: "split", torch.narrow: "narrow",
                torch.transpose: "transpose", torch.reshape: "reshape",
                torch.flatten: "flatten", torch.permute: "permute"}

# the functional poolings (F.max_pool2d is a dispatcher on return_indices;
# torch.max_pool2d is ATen's, whose stride [] means the kernel size)
_POOL_FNS = (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d, F.avg_pool2d)
_MAXPOOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVGPOOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")


def _grown(pad: Tuple[int, ...], extra: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    """(top, bottom, left, right) padding with a zero padding before the
    layer (``extra``, or None) added."""
    return pad if extra is None else tuple(a + b for a, b in zip(pad, extra))


def _pool_stride(stride, kernel) -> Tuple[int, int]:
    """A pooling's stride: None or an empty list means the kernel size."""
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        return _pair(kernel)
    return _pair(stride)


def _is_stochastic_depth(m: nn.Module) -> bool:
    """torchvision's StochasticDepth, timm's DropPath and DropBlock2d:
    identities in eval mode, random in training mode."""
    name = type(m).__name__
    return (name == "StochasticDepth" and hasattr(m, "p")) or (
        name in ("DropPath", "DropBlock2d") and hasattr(m, "drop_prob"))


def _drop_probability(m: nn.Module) -> float:
    return float(getattr(m, "p", None) or getattr(m, "drop_prob", None) or 0.0)


def _is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (timm's freeze_batch_norm_2d puts it
    in place of BatchNorm2d; timm has one of its own) and timm's
    FrozenBatchNormAct2d (in place of BatchNormAct2d): a batch norm whose
    statistics and affine parameters are buffers (then, for the latter, its
    ``drop`` and ``act``)."""
    tensors = {**m._buffers, **m._parameters}  # (fx's getattr gives proxies of parameters)
    return type(m).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d") and \
        hasattr(m, "eps") and all(isinstance(tensors.get(b), torch.Tensor)
                                  for b in ("weight", "bias", "running_mean", "running_var"))


class _StemTracer(fx.Tracer):
    """fx's tracer, with FrozenBatchNorm2d kept as a layer, the modules
    called remembered (their forward ran: ``called``), and the innermost
    module whose forward raised (for the message)."""

    def __init__(self):
        super().__init__()
        self.failed_in: Optional[Tuple[str, str]] = None
        self.called: set = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__name__ == "FrozenBatchNormAct2d":
            return False  # see call_module
        return _is_frozen_bn(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.called.add(self.path_of_module(m))
        if _is_frozen_bn(m) and type(m).__name__ == "FrozenBatchNormAct2d" and \
                len(args) == 1 and not kwargs:
            # its batch norm as a layer, then its dropout and activation
            # traced as modules of their own
            def forward(x):
                y = self.create_proxy("call_module", self.path_of_module(m), (x,), {})
                return m.act(m.drop(y))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def _stochastic_depth_fn():
    try:
        from torchvision.ops import stochastic_depth
        return stochastic_depth
    except ImportError:  # torchvision is optional
        return None


# operator's in-place forms (x += y traces to operator.iadd: it returns x,
# mutated)
_INPLACE_OPERATORS = (operator.iadd, operator.imul, operator.isub, operator.itruediv,
                      operator.ifloordiv, operator.ipow, operator.imod, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul)
# ops whose result may be the input tensor itself or a view of it: an
# in-place op on the input changes them too
_ALIAS_METHODS = ("contiguous", "permute", "view", "reshape", "transpose", "expand",
                  "detach", "__getitem__", "view_as", "flatten", "squeeze", "unsqueeze",
                  "chunk", "split", "narrow", "unbind", "tensor_split", "split_with_sizes",
                  "expand_as", "movedim", "swapaxes", "swapdims", "unflatten", "t",
                  "as_strided", "diagonal", "select", "unfold", "reshape_as")
_ALIAS_FUNCTIONS = (torch.permute, operator.getitem, torch.flatten, F.dropout, torch.reshape,
                    torch.transpose, torch.chunk, torch.split, torch.narrow, torch.unbind,
                    torch.tensor_split, torch.squeeze, torch.unsqueeze, torch.movedim,
                    torch.swapaxes, torch.swapdims, torch.unflatten, torch.t,
                    torch.as_strided, torch.diagonal, torch.select)


# reshapes that keep the elements' order (of a parameter: see _param_view)
_VIEW_METHODS = ("reshape", "view", "unsqueeze", "squeeze", "flatten")
_VIEW_FNS = {torch.reshape: "reshape", torch.unsqueeze: "unsqueeze",
             torch.squeeze: "squeeze", torch.flatten: "flatten"}


def _mutated(root: nn.Module, node: fx.Node) -> Optional[Any]:
    """The argument an in-place node writes into (``x.relu_()``,
    ``torch.relu_(x)``, ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``,
    ``x += y``), or None for an out-of-place node."""
    if not node.args:
        return None
    if node.op == "call_method":
        name = str(node.target)
        inplace = (name.endswith("_") and not name.startswith("_")) or \
            name in ("__iadd__", "__imul__", "__isub__", "__itruediv__")
    elif node.op == "call_function":
        t = node.target
        if t in _INPLACE_OPERATORS:
            inplace = True
        elif node.kwargs.get("inplace") is True:
            inplace = True
        else:
            name = getattr(t, "__name__", "")
            inplace = name.endswith("_") and not name.startswith("_")
            if not inplace:
                import inspect
                try:
                    bound = inspect.signature(t).bind(*node.args, **node.kwargs)
                    inplace = bound.arguments.get("inplace") is True
                except (TypeError, ValueError):
                    inplace = False
    elif node.op == "call_module":
        inplace = getattr(root.get_submodule(str(node.target)), "inplace", False) is True
    else:
        return None
    return node.args[0] if inplace else None


def _is_alias(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node``'s result may share its input's memory."""
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS or node.target is _stochastic_depth_fn()
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        return isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten)) or \
            _is_stochastic_depth(m)
    return False


def functionalize(graph: fx.Graph, root: nn.Module) -> None:
    """Rewrite ``graph`` so that in-place ops take effect as values: after
    ``y.relu_()`` (its result unused) every later use of ``y`` reads the
    relu's result, as it reads the mutated tensor in eager PyTorch (the
    conversion below follows values: without this the relu was dropped).
    Refused (ValueError naming the node): an in-place op on the stem's input
    image or on a parameter (streaming cannot change the caller's tensor),
    and one on a tensor an earlier view of which is read after it (the view
    would change too)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        x = _mutated(root, node)
        if not isinstance(x, fx.Node):
            continue
        what = f"in-place {node.op} {getattr(node.target, '__name__', node.target)}"
        if x.op in ("placeholder", "get_attr"):
            raise _unsupported(node, what, f"it changes the stem's "
                               f"{'input image' if x.op == 'placeholder' else 'parameter'} "
                               "in place, which a streamed pass cannot do; use its "
                               "out-of-place form")
        later = [u for u in x.users if u is not node and order[u] > order[node]]
        for u in x.users:
            if u is not node and order[u] < order[node] and _is_alias(u, root) and \
                    any(order[v] > order[node] for v in u.users):
                raise _unsupported(node, what, f"it changes '{x.name}', of which '{u.name}' "
                                   "(read after it) is a view; use the out-of-place form")
        src = x
        while _is_alias(src, root) and src.args and isinstance(src.args[0], fx.Node):
            src = src.args[0]           # x is (a view of) src: src changes too
            if src.op in ("placeholder", "get_attr") or any(
                    order[v] > order[node] for v in src.users if v is not node):
                raise _unsupported(node, what, f"it changes '{x.name}', a view of "
                                   f"'{src.name}', which is read after it (or is the "
                                   "stem's input); use the out-of-place form")
        for u in later:
            u.replace_input_with(x, node)


class _Converter:
    def __init__(self, root: nn.Module, in_channels: Optional[int]):
        self.root = root
        self.in_channels = in_channels
        self.b: Optional[ProgramBuilder] = None
        self.val: Dict[fx.Node, int] = {}
        self.chan: Dict[fx.Node, int] = {}
        self.layout: Dict[fx.Node, str] = {}
        self.attrs: Dict[fx.Node, Tuple[str, str]] = {}  # get_attr -> (path, attr)
        self.labels: Dict[int, str] = {}  # value -> the layer that made it, in words
        self.traced_modes: List[Tuple[str, nn.Module, bool]] = []
        # reshapes of a parameter -> (its slot, the reshaped tensor, the parameter)
        self.attr_views: Dict[fx.Node, Tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.mode_modules: List[Tuple[str, nn.Module]] = []
        # value of the cat of a tuple of values: DenseNet's layer k joins
        # the features of layers 0 .. k, the cat of layer k - 1's and one
        # more, so each layer adds one cat instruction, not k
        self.cats: Dict[Tuple[int, ...], int] = {}
        # shapes and sizes read from tensors (ints, _Dim, tuples of them),
        # chunk / split results (lists of index ranges), and channel
        # selections not emitted yet
        self.syms: Dict[fx.Node, Any] = {}
        self.chunks: Dict[fx.Node, Tuple[fx.Node, List[range]]] = {}
        self.sels: Dict[fx.Node, _Sel] = {}
        self.in_selected: Optional[fx.Node] = None
        # zero paddings (F.pad, ZeroPad2d) -> (the padded tensor, (top,
        # bottom, left, right)): the convolution or pool reading one pads
        # by as much more
        self.pads: Dict[fx.Node, Tuple[fx.Node, Tuple[int, int, int, int]]] = {}
        # values known to be >= 0 (ReLU, ReLU6, sigmoid, a max pool of one):
        # a max pool's -inf padding is a zero padding there
        self.nonneg: set = set()

    # -- helpers ------------------------------------------------------------
    def _p(self, path: str, attr: str) -> int:
        return self.b.param((path, attr))

    def _input(self, node: fx.Node, arg) -> fx.Node:
        if isinstance(arg, fx.Node) and arg in self.pads:
            raise _unsupported(node, _node_what(node, self.root),
                               f"it reads '{arg.name}', a zero padding (F.pad / ZeroPad2d): "
                               "streamcnn folds zero padding into the Conv2d, max pool or "
                               "average pool that reads it, and pads nothing else")
        if isinstance(arg, fx.Node) and arg in self.sels:
            self._emit_sel(node, arg)
        if not isinstance(arg, fx.Node) or arg not in self.val:
            raise _unsupported(node, f"{node.op} {node.target}",
                               f"its input {arg!r} is not a tensor produced by the stem")
        return arg

    # -- channel selections ------------------------------------------------
    def _is_tensor(self, arg) -> bool:
        return isinstance(arg, fx.Node) and (arg in self.val or arg in self.sels)

    def _sel_of(self, node, what, arg) -> _Sel:
        """The channel selection a tensor of the stem is (a value: all its
        channels)."""
        if isinstance(arg, fx.Node) and arg in self.sels:
            return self.sels[arg]
        x = self._input(node, arg)
        if self.layout[x] != NCHW:
            raise _unsupported(node, what, "it reshapes or selects the channels of a tensor "
                               "permuted to N x H x W x C; do it on N x C x H x W")
        return _Sel(x, tuple(range(self.chan[x])))

    def _pick(self, node, what, arg, pick: Sequence[int]) -> None:
        """``node`` is channels ``pick`` of tensor ``arg`` (N x C x H x W).
        Selections compose (a chunk of a shuffle is one instruction); where
        the composition has no instruction's form, ``arg`` is emitted and
        ``node`` picks from it."""
        sel = self._flat_sel(node, what, arg)
        idx = tuple(sel.idx[i] for i in pick)
        if _fit_channels(idx) is None:
            self._emit_sel(node, arg)
            sel, idx = _Sel(arg, tuple(range(self.chan[arg]))), tuple(pick)
        self._set_sel(node, _Sel(sel.src, idx))

    def _flat_sel(self, node, what, arg) -> _Sel:
        """The selection a tensor split or indexed along the channels is:
        one of N x C x H x W (not a 5-d view)."""
        sel = self._sel_of(node, what, arg)
        if sel.split is not None:
            raise _unsupported(node, what, "it splits or indexes a 5-d view of the channels; "
                               "view it back to N x C x H x W first")
        return sel

    def _set_sel(self, node, sel: _Sel) -> None:
        if sel.split is None and sel.idx == tuple(range(self.chan[sel.src])):
            return self._alias(node, sel.src)           # all the channels, in order
        self.sels[node] = sel

    def _emit_sel(self, node, arg) -> None:
        """A layer reads selection ``arg``: its `channels` instruction."""
        sel = self.sels[arg]
        if sel.split is None and arg in self.val:
            return
        if sel.split is not None:
            raise _unsupported(node, f"{node.op} {node.target}", f"its input {arg.name} is a "
                               f"5-d view N x {sel.split[0]} x {sel.split[1]} x H x W of the "
                               "channels; view it back to N x C x H x W first")
        if _fit_channels(sel.idx) is None:   # _pick, _view, _transpose keep that form
            raise AssertionError(f"streamcnn: internal error: channels {sel.idx}")
        self._set(arg, self._channels(sel.src, sel.idx), len(sel.idx), NCHW)

    def _channels(self, src, idx) -> int:
        """The `channels` instruction taking channels ``idx`` (of the
        instruction's form) of tensor ``src``: its value."""
        return self.b.channels(self.val[src], len(idx), *_fit_channels(idx))

    def _spatial(self, x) -> int:
        """Which rows and columns a tensor of the stem has: those of the
        value it (or the value it selects channels of) is, as far as the
        conversion can tell (pointwise instructions keep their input's;
        windowed ones make new ones, even of the same size)."""
        return self.b.space[self.val[self.sels[x].src if x in self.sels else x]]

    def _constants(self, node, what, v):
        """A layer's argument with the sizes read from tensors put in:
        channel counts and what was computed from them (constants); one that
        holds the batch, rows or columns (each tile has its own) is
        refused."""
        if isinstance(v, fx.Node) and v in self.syms:
            c = self.syms[v]
            if _holds_dim(c):
                raise _unsupported(node, what, _SHAPE_HINT)
            return c
        if isinstance(v, (list, tuple)):
            return type(v)(self._constants(node, what, a) for a in v)
        return v

    def _shape_of(self, node, what, x):
        if not self._is_tensor(x):
            raise _unsupported(node, what, f"{x!r} is not a tensor of the stem")
        if x in self.val and self.layout[x] != NCHW:
            raise _unsupported(node, what, "it reads the shape of a tensor permuted to "
                               "N x H x W x C")
        sel = self.sels.get(x)
        s = self._spatial(x)
        if sel is not None and sel.split is not None:
            return (_Dim("N"), *sel.split, _Dim("H", s), _Dim("W", s))
        c = len(sel.idx) if sel is not None else self.chan[x]
        return (_Dim("N"), c, _Dim("H", s), _Dim("W", s))

    def _sym(self, node, what, arg):
        """An int or size argument: a constant, or a size read from a
        tensor (x.size(), x.shape)."""
        if isinstance(arg, fx.Node):
            if arg not in self.syms:
                raise _unsupported(node, what, f"its argument {arg.name} is not a constant "
                                   "or a size of a tensor")
            return self.syms[arg]
        return arg

    def _size(self, node, what, args, kw):
        shape = self._shape_of(node, what, args[0])
        dim = args[1] if len(args) > 1 else kw.get("dim")
        self.syms[node] = shape if dim is None else shape[int(dim) % len(shape)]

    def _sym_arith(self, node, what, args) -> None:
        """Arithmetic on sizes: on the channel counts (constants), computed;
        on the batch, rows or columns (each tile has its own), refused."""
        vals = [self._sym(node, what, a) for a in args]
        if any(isinstance(v, _Dim) for v in vals) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise _unsupported(node, what, _SHAPE_HINT)
        self.syms[node] = node.target(*vals)

    def _getitem(self, node, what, src, key) -> None:
        if src in self.syms:                          # a size of a shape
            shape = self.syms[src]
            if not isinstance(shape, tuple) or not isinstance(key, int):
                raise _unsupported(node, what, _SHAPE_HINT)
            self.syms[node] = shape[key]
            return
        if src in self.chunks:                        # one of a chunk / split
            x, parts = self.chunks[src]
            if not isinstance(key, int) or not -len(parts) <= key < len(parts) or \
                    not parts[key]:
                raise _unsupported(node, what, f"part {key!r} of a split of the channels "
                                   "into sizes " + str([len(p) for p in parts]))
            return self._pick(node, what, x, parts[key])
        # x[:, a:b:s] (and trailing full slices): a slice of the channels
        full = slice(None, None, None)
        keys = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in keys) == 1:      # as many full slices as it stands for
            at = keys.index(Ellipsis)
            keys = keys[:at] + (full,) * (5 - len(keys)) + keys[at + 1:]
        keys = keys + (full,) * (2 - len(keys))        # y[:] is y[:, :]
        if len(keys) > 4 or keys[0] != full or not isinstance(keys[1], slice) or \
                any(k != full for k in keys[2:]):
            raise _unsupported(node, what, f"indexing {key!r}: only x[:, i:j:step] (a slice of "
                               "the channels) is local")
        sel = self._sel_of(node, what, src)
        k = keys[1]
        bounds = [self._sym(node, what, v) for v in (k.start, k.stop, k.step)]
        if any(isinstance(v, _Dim) for v in bounds) or (bounds[2] or 1) < 1:
            raise _unsupported(node, what, f"slice {k!r} of the channels: its bounds must be "
                               "constants (or channel counts) and its step positive")
        picked = range(len(sel.idx))[slice(*bounds)]
        if not picked:
            raise _unsupported(node, what, f"slice {k!r} of {len(sel.idx)} channels is empty")
        self._pick(node, what, src, picked)

    def _split(self, node, what, x, sizes, dim, chunks: bool) -> None:
        """chunk(x, n, dim=1) (``chunks``) / split(x, size or sizes, dim=1)."""
        if not isinstance(dim, int) or dim % 4 != 1:
            raise _unsupported(node, what, f"along dim {dim!r}: only a split of the channels "
                               "(dim 1) is local")
        n = len(self._flat_sel(node, what, x).idx)
        sizes = self._sym(node, what, sizes)
        if isinstance(sizes, (list, tuple)):
            sizes = [self._sym(node, what, s) for s in sizes]
        if isinstance(sizes, int) and not isinstance(sizes, bool) and sizes >= 1:
            step = -(-n // sizes) if chunks else sizes
            parts = [range(i, min(i + step, n)) for i in range(0, n, step)]
        elif not chunks and isinstance(sizes, list) and sum(sizes) == n and all(
                isinstance(s, int) and s >= 0 for s in sizes):
            ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
            parts = [range(e - s, e) for s, e in zip(sizes, ends)]
        else:
            raise _unsupported(node, what, f"split of {n} channels by {sizes!r}")
        self.chunks[node] = (x, parts)

    def _view(self, node, what, x, shape) -> None:
        """view / reshape: N x C x H x W <-> N x g x C/g x H x W, keeping
        the batch, the rows and the columns."""
        sel = self._sel_of(node, what, x)
        s = self._spatial(x)
        shape = [self._sym(node, what, v) for v in shape]
        if len(shape) == 1 and isinstance(shape[0], (list, tuple)):   # x.view(y.size())
            shape = [self._sym(node, what, v) for v in shape[0]]
        n = len(sel.idx)
        if len(shape) not in (4, 5) or not (isinstance(shape[0], _Dim) and
                                            shape[0].kind == "N") or \
                shape[-2:] != [_Dim("H", s), _Dim("W", s)]:
            raise _unsupported(node, what, f"a view or reshape to {_shape_text(shape)}: only "
                               "one that keeps the batch, the rows and the columns (sizes read "
                               "from this tensor) and reshapes the channels is local")
        chans = shape[1:-2]
        if not all(isinstance(c, int) and not isinstance(c, bool) and (c == -1 or c >= 1)
                   for c in chans) or chans.count(-1) > 1:
            raise _unsupported(node, what, f"channel sizes {_shape_text(chans)} of a view must "
                               "be constants or channel counts")
        known = 1
        for c in chans:
            known *= 1 if c == -1 else c
        if -1 in chans and n % known == 0:
            chans = [n // known if c == -1 else c for c in chans]
        if chans[0] * (chans[1] if len(chans) == 2 else 1) != n:
            raise _unsupported(node, what, f"a view of {n} channels as "
                               f"{_shape_text(shape[1:-2])} channels")
        if len(chans) == 2 and sel.split is None and x in self.sels:
            # a 5-d view of a selection: of the selection, emitted (its
            # transposes stay one instruction's form)
            self._emit_sel(node, x)
            sel = _Sel(x, tuple(range(n)))
        self._set_sel(node, _Sel(sel.src, sel.idx, tuple(chans) if len(chans) == 2 else None))

    def _transpose(self, node, what, x, d0, d1) -> None:
        sel = self.sels.get(x) if isinstance(x, fx.Node) else None
        if sel is None or sel.split is None or {int(d0) % 5, int(d1) % 5} != {1, 2}:
            raise _unsupported(node, what, f"transpose({d0}, {d1}): only the two channel "
                               "dimensions of a 5-d view N x g x C/g x H x W may be swapped "
                               "(a channel shuffle)")
        d1_, d2_ = sel.split

        def swapped(order):
            return tuple(order[j2 * d2_ + j1] for j1 in range(d2_) for j2 in range(d1_))
        idx = swapped(sel.idx)
        if _fit_channels(idx) is None:
            # (a view of a shuffle, shuffled again) no one instruction:
            # emit x flattened (that fits), a value of x's, and swap that
            if x not in self.val:
                self._set(x, self._channels(sel.src, sel.idx), len(sel.idx), NCHW)
            sel, idx = _Sel(x, ()), swapped(range(len(sel.idx)))
        self._set_sel(node, _Sel(sel.src, idx, (d2_, d1_)))

    def _set(self, node, value, channels, layout=NCHW):
        if value > 0 and value not in self.labels:  # the node that made the value
            if node.op == "call_module":
                path = _strip_leaf(str(node.target))
                kind = type(self.root.get_submodule(str(node.target))).__name__
                label = f"'{path}' ({kind})" if path else f"the stem ({kind})"
            else:
                label = f"fx node '{node.name}'{_inside(node)}"
            # (and the instructions it emitted before: a cat of n joins)
            for v in range(value, 0, -1):
                if v in self.labels:
                    break
                self.labels[v] = label
        self.val[node] = value
        self.chan[node] = channels
        self.layout[node] = layout

    def _alias(self, node, src, layout=None):
        self._set(node, self.val[src], self.chan[src], layout or self.layout[src])

    def _act(self, node, x, kind, arg=0):
        v = self.b.act(self.val[x], kind, arg)
        if kind in (ACT_RELU, ACT_RELU6, ACT_SIGMOID):
            self.nonneg.add(v)
        self._set(node, v, self.chan[x], self.layout[x])

    # -- zero padding ---------------------------------------------------------
    def _pad(self, node, what, arg, pad, mode="constant", value=None):
        """F.pad / torch.constant_pad_nd / ZeroPad2d / ConstantPad2d with
        zeros: no instruction of its own; the convolution or pool that reads
        it pads by as much more (_unpad)."""
        if mode != "constant":
            raise _unsupported(node, what, f"mode={mode!r} padding is not supported, only "
                               "zero ('constant') padding")
        if value is not None and not (isinstance(value, (int, float)) and value == 0):
            raise _unsupported(node, what, f"it pads with {value!r}: only zero padding is "
                               "supported")
        if not (isinstance(pad, (list, tuple)) and len(pad) in (2, 4) and
                all(isinstance(p, int) and not isinstance(p, bool) for p in pad)):
            raise _unsupported(node, what, f"pad={pad!r}: streamcnn pads the columns, or the "
                               "columns and rows (2 or 4 ints: left, right, top, bottom)")
        if any(p < 0 for p in pad):
            raise _unsupported(node, what, f"pad={tuple(pad)!r}: a negative pad crops; crop "
                               "the image before the stem instead")
        left, right = pad[0], pad[1]
        top, bottom = (pad[2], pad[3]) if len(pad) == 4 else (0, 0)
        src, had = self._unpad(arg)       # a padding of a padding: one
        x = self._input(node, src)
        self._need_nchw(node, what, x)
        self.pads[node] = (x, _grown((top, bottom, left, right), had))

    def _unpad(self, arg) -> Tuple[Any, Optional[Tuple[int, int, int, int]]]:
        """(the tensor a zero padding pads, its (top, bottom, left, right)),
        or (arg, None) for anything else."""
        if isinstance(arg, fx.Node) and arg in self.pads:
            return self.pads[arg]
        return arg, None

    def _pool_pad(self, node, what, kernel, padding, ceil_mode, extra):
        """A pool's padding with a zero padding before it folded in: the same
        on both sides of each axis (a pool pads each side alike), at most half
        the kernel (ATen's bound), and not in ceil_mode (its last window's
        rule differs for padding and image)."""
        ph, pw = _pair(padding)
        if extra is None:
            return ph, pw
        top, bottom, left, right = extra
        if ceil_mode:
            raise _unsupported(node, what, "it pools a zero-padded tensor with ceil_mode=True; "
                               "use the pool's own padding")
        if top != bottom or left != right:
            raise _unsupported(node, what, f"it pools a tensor zero-padded unevenly "
                               f"(top, bottom, left, right = {extra}); a pool pads both sides "
                               "of an axis alike")
        kh, kw = _pair(kernel)
        if ph + top > kh // 2 or pw + left > kw // 2:
            raise _unsupported(node, what, f"it pools a zero-padded tensor: padding "
                               f"{(ph + top, pw + left)} with its own is more than half its "
                               f"kernel {(kh, kw)}")
        return ph + top, pw + left

    def _need_nchw(self, node, what, x):
        if self.layout[x] != NCHW:
            raise _unsupported(node, what, "it reads a tensor permuted to N x H x W x C; "
                               "permute it back to N x C x H x W first")

    def _param(self, node, what, arg, role, view_ok=False):
        """Parameter slot of a tensor attribute (get_attr) used by a function;
        returns (slot, tensor). view_ok: arg may be a reshape of one (the
        tensor returned is the reshaped one; the slot holds the parameter,
        its elements in the same order)."""
        if isinstance(arg, fx.Node) and arg in self.attr_views:
            if not view_ok:
                raise _unsupported(node, what, f"its {role} is a reshaped parameter "
                                   f"('{arg.name}'); pass the parameter itself")
            return self.attr_views[arg][:2]
        if not isinstance(arg, fx.Node) or arg not in self.attrs:
            raise _unsupported(node, what, f"its {role} must be a parameter or buffer of the "
                               f"stem, got {arg!r}")
        path, attr = self.attrs[arg]
        t = getattr(self.root.get_submodule(path) if path else self.root, attr)
        if not isinstance(t, torch.Tensor):
            raise _unsupported(node, what, f"its {role} '{arg.target}' is not a tensor")
        return self._p(path, attr), t

    def _param_view(self, node) -> bool:
        """A reshape of a parameter (``gamma.reshape(1, -1, 1, 1)``, timm's
        layer scale; ``gamma.view(-1, 1, 1)``): its elements are the
        parameter's in the same order, so a per-channel scale reads the
        parameter itself (see _param). True when node is one."""
        t = node.target
        name = t if node.op == "call_method" else _VIEW_FNS.get(t)
        if name not in _VIEW_METHODS or not node.args:
            return False
        src = node.args[0]
        if not isinstance(src, fx.Node) or not (src in self.attrs or src in self.attr_views):
            return False
        what = f"{node.op} {getattr(t, '__name__', t)}"
        slot, base = self._param(node, what, src, "input", view_ok=True)
        param = self.attr_views[src][2] if src in self.attr_views else base
        args = self._constants(node, what, tuple(node.args[1:]))
        kw = {k: self._constants(node, what, v) for k, v in node.kwargs.items()}
        try:
            with torch.no_grad():
                viewed = getattr(base.detach(), name)(*args, **kw)
        except Exception as e:  # noqa: BLE001 - re-raised naming the node
            raise _unsupported(node, what, f"reshaping the parameter failed: {e}") from None
        if sum(d > 1 for d in param.shape) > 1 or param.dim() > 4:
            raise _unsupported(node, what, f"a parameter of shape {tuple(param.shape)} "
                               "reshaped: only one of a single dimension (a per-channel "
                               "vector) is read as a per-channel scale")
        self.attr_views[node] = (slot, viewed, param)
        return True

    def _layernorm(self, node, what, x, shape, w, b, eps):
        c = self.chan[x]
        if self.layout[x] != NHWC or tuple(shape) != (c,):
            raise _unsupported(node, what, f"a layer norm over {tuple(shape)} of an "
                               f"{self.layout[x]} tensor is not over the channels of each "
                               f"pixel alone: {_NONLOCAL_HINT}")
        v = self.b.layernorm_c(self.val[x], w, b, eps)
        self._set(node, v, c, NHWC)

    def _scale(self, node, what, args):
        a, b = args[0], args[1]
        x, s_ = (a, b) if self._is_tensor(a) else (b, a)
        x = self._input(node, x)
        slot, t = self._param(node, what, s_, "scale", view_ok=True)
        c = self.chan[x]
        shape = tuple(t.shape)
        per_channel = (shape in ((c, 1, 1), (1, c, 1, 1)) if self.layout[x] == NCHW else
                       len(shape) >= 1 and shape[-1] == c and all(d == 1 for d in shape[:-1]))
        if not per_channel:
            raise _unsupported(node, what, f"multiplying a {self.layout[x]} tensor of {c} "
                               f"channels by a tensor of shape {shape} is not a per-channel "
                               "scale")
        self._set(node, self.b.scale_c(self.val[x], slot), c, self.layout[x])

    def _permute(self, node, what, x, dims):
        dims = tuple(int(d) % 4 for d in dims) if len(dims) == 4 else tuple(dims)
        layout = _PERMUTES.get((self.layout[x], dims))
        if layout is None:
            raise _unsupported(node, what, f"permute{dims} of an {self.layout[x]} tensor: only "
                               "N x C x H x W <-> N x H x W x C is supported")
        self._alias(node, x, layout)

    def _batchnorm_fn(self, node, what, x, rest, kw):
        """F.batch_norm with running statistics and training=False, as timm's
        BatchNormAct2d calls it: the batch norm instruction. The module
        holding the statistics keeps its mode (see run)."""
        self._need_nchw(node, what, x)
        a = dict(zip(["running_mean", "running_var", "weight", "bias", "training", "momentum",
                      "eps"], rest), **kw)
        if a.get("running_mean") is None or a.get("running_var") is None:
            raise _unsupported(node, what, "batch norm without running statistics "
                               "(track_running_stats=False) uses whole-image statistics even "
                               "in eval mode; it cannot be streamed")
        training = a.get("training", False)
        if isinstance(training, fx.Node) or bool(training):
            raise _unsupported(node, what, "batch norm with training=True normalises with "
                               "whole-image batch statistics; freeze it: call .eval() on the "
                               "stem (its weight and bias still train)")
        slots = {}
        for role in ("running_mean", "running_var", "weight", "bias"):
            if a.get(role) is None:
                slots[role] = -1
                continue
            slots[role], t = self._param(node, what, a[role], role)
            if t.numel() != self.chan[x] or t.dim() != 1:
                raise _unsupported(node, what, f"its {role} has shape {tuple(t.shape)}, not "
                                   f"({self.chan[x]},) for {self.chan[x]} channels")
        eps = a.get("eps", 1e-5)
        if type(eps) not in (int, float):
            raise _unsupported(node, what, f"its eps must be a number, got {eps!r}")
        v = self.b.batchnorm(self.val[x], slots["weight"], slots["bias"],
                             slots["running_mean"], slots["running_var"], float(eps))
        self._set(node, v, self.chan[x])

    def _maxpool(self, node, what, x, kernel, stride, padding, dilation, ceil_mode,
                 return_indices, extra=None):
        """extra: a zero padding before it (_unpad). The pool pads with
        -inf, the same as zeros on values >= 0 (every window holds a value
        of the image: the padding is at most half the kernel)."""
        self._need_nchw(node, what, x)
        if return_indices:
            raise _unsupported(node, what, "return_indices=True is not supported")
        if extra is not None and self.val[x] not in self.nonneg:
            raise _unsupported(node, what, "it max-pools a zero-padded tensor that may be "
                               "negative (the pool's own padding is -inf); zero padding folds "
                               "into a max pool after a ReLU, ReLU6 or sigmoid")
        pad = self._pool_pad(node, what, kernel, padding, ceil_mode, extra)
        v = self.b.maxpool(self.val[x], _pair(kernel), _pool_stride(stride, kernel),
                           _pair(dilation), pad, bool(ceil_mode))
        if self.val[x] in self.nonneg:
            self.nonneg.add(v)
        self._set(node, v, self.chan[x])

    def _avgpool(self, node, what, x, kernel, stride, padding, ceil_mode, count_include_pad,
                 divisor_override, extra=None):
        """extra: a zero padding before it (_unpad), whose zeros the pool
        counts: folded in as padding with count_include_pad."""
        self._need_nchw(node, what, x)
        if divisor_override is not None and not (isinstance(divisor_override, int)
                                                 and divisor_override > 0):
            raise _unsupported(node, what, f"divisor_override={divisor_override!r}: it must be "
                               "None or a positive int")
        if extra is not None:
            if not count_include_pad and divisor_override is None and _pair(padding) != (0, 0):
                raise _unsupported(node, what, "it pools a zero-padded tensor with padding of "
                                   "its own and count_include_pad=False (it would count the "
                                   "zeros, not its own padding)")
            count_include_pad = True
        pad = self._pool_pad(node, what, kernel, padding, ceil_mode, extra)
        v = self.b.avgpool(self.val[x], _pair(kernel), _pool_stride(stride, kernel),
                           pad, bool(ceil_mode), bool(count_include_pad),
                           divisor_override)
        self._set(node, v, self.chan[x])

    def _pool_fn(self, node, what, x, rest, kw, extra=None):
        """F.max_pool2d / torch.max_pool2d / F.max_pool2d_with_indices and
        F.avg_pool2d: the modules' instructions from the call's arguments."""
        t = node.target
        names = (_AVGPOOL_ARGS if t is F.avg_pool2d else _MAXPOOL_ARGS)
        unknown = set(kw) - set(names)
        if len(rest) > len(names) or unknown:
            raise _unsupported(node, what, f"unexpected arguments {sorted(unknown) or rest!r}")
        a = dict(zip(names, rest), **kw)
        if "kernel_size" not in a:
            raise _unsupported(node, what, "no kernel_size")
        if t is F.avg_pool2d:
            return self._avgpool(node, what, x, a["kernel_size"], a.get("stride"),
                                 a.get("padding", 0), a.get("ceil_mode", False),
                                 a.get("count_include_pad", True), a.get("divisor_override"),
                                 extra)
        return self._maxpool(node, what, x, a["kernel_size"], a.get("stride"),
                             a.get("padding", 0), a.get("dilation", 1), a.get("ceil_mode", False),
                             t is F.max_pool2d_with_indices or a.get("return_indices", False),
                             extra)

    # -- modules --------------------------------------------------------------
    def module(self, node: fx.Node):
        path = str(node.target)
        m = self.root.get_submodule(path)
        what = _node_what(node, self.root)
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(node, what, "expected a single tensor argument")
        if type(m) in (nn.ZeroPad2d, nn.ConstantPad2d):
            return self._pad(node, what, node.args[0], list(m.padding), value=m.value)
        arg, extra = node.args[0], None
        if any(_same_forward(m, k) for k in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            arg, extra = self._unpad(arg)
        x = self._input(node, arg)
        c = self.chan[x]

        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d,
                          nn.modules.batchnorm._BatchNorm)) or _is_frozen_bn(m):
            self._need_nchw(node, what, x)

        if _is_frozen_bn(m):  # a leaf of _StemTracer
            if m.running_mean.numel() != c:
                raise _unsupported(node, what, f"expects {m.running_mean.numel()} channels, "
                                   f"gets {c}")
            v = self.b.batchnorm(self.val[x], self._p(path, "weight"), self._p(path, "bias"),
                                 self._p(path, "running_mean"), self._p(path, "running_var"),
                                 float(m.eps))
            return self._set(node, v, c)

        if _same_forward(m, nn.LayerNorm):
            w = self._p(path, "weight") if m.weight is not None else -1
            bias = self._p(path, "bias") if m.bias is not None else -1
            return self._layernorm(node, what, x, m.normalized_shape, w, bias, m.eps)

        if _same_forward(m, nn.Linear):
            if self.layout[x] != NHWC or m.in_features != c:
                raise _unsupported(node, what, "a Linear on the last dimension of an "
                                   f"{self.layout[x]} tensor mixes pixels: {_NONLOCAL_HINT}")
            bias = self._p(path, "bias") if m.bias is not None else -1
            v = self.b.linear_c(self.val[x], self._p(path, "weight"), bias, m.in_features,
                                m.out_features)
            return self._set(node, v, m.out_features, NHWC)

        if _same_forward(m, nn.Conv2d):
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                raise _unsupported(node, what, "run one forward first to initialise the lazy module")
            if m.padding_mode != "zeros":
                raise _unsupported(node, what, f"padding_mode='{m.padding_mode}' is not supported, "
                                   "only 'zeros'")
            if m.in_channels != c:
                raise _unsupported(node, what, f"expects {m.in_channels} input channels, gets {c}")
            kh, kw = _pair(m.kernel_size)
            sh, sw = _pair(m.stride)
            dh, dw = _pair(m.dilation)
            if isinstance(m.padding, str):
                if m.padding == "valid":
                    pad = (0, 0, 0, 0)
                else:  # 'same': ATen puts the odd extra row/col at the end
                    th, tw = dh * (kh - 1), dw * (kw - 1)
                    pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                ph, pw = _pair(m.padding)
                pad = (ph, ph, pw, pw)
            pad = _grown(pad, extra)    # by a zero padding before it
            w = self._p(path, "weight")
            bias = self._p(path, "bias") if m.bias is not None else -1
            v = self.b.conv(self.val[x], w, bias, m.in_channels, m.out_channels, m.groups,
                            (kh, kw), (sh, sw), (dh, dw), pad)
            return self._set(node, v, m.out_channels)

        if _same_forward(m, nn.MaxPool2d):
            return self._maxpool(node, what, x, m.kernel_size, m.stride, m.padding, m.dilation,
                                 m.ceil_mode, m.return_indices, extra)

        if _same_forward(m, nn.AvgPool2d):
            return self._avgpool(node, what, x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                 m.count_include_pad, m.divisor_override, extra)

        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward in (
                nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward):
            if m.training:
                raise _unsupported(node, what, "BatchNorm in training mode normalises with "
                                   "whole-image batch statistics; freeze it: call .eval() on "
                                   "the stem (its weight and bias still train)")
            if not m.track_running_stats or m.running_mean is None:
                raise _unsupported(node, what, "track_running_stats=False uses whole-image "
                                   "statistics even in eval mode; it cannot be streamed")
            if m.num_features != c:
                raise _unsupported(node, what, f"expects {m.num_features} channels, gets {c}")
            self.mode_modules.append((path, m))
            w = self._p(path, "weight") if m.weight is not None else -1
            bias = self._p(path, "bias") if m.bias is not None else -1
            v = self.b.batchnorm(self.val[x], w, bias, self._p(path, "running_mean"),
                                 self._p(path, "running_var"), m.eps)
            return self._set(node, v, c)

        if _is_stochastic_depth(m):  # a leaf only with a custom tracer
            if m.training and _drop_probability(m) > 0:
                raise _unsupported(node, what, "stochastic depth in training mode drops "
                                   "whole samples at random; call .eval() on the stem")
            return self._alias(node, x)
        if type(m) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                       nn.FeatureAlphaDropout):
            if m.training and m.p > 0:
                raise _unsupported(node, what, "dropout in training mode is random per pixel "
                                   "and cannot be replayed tile by tile; call .eval() on the "
                                   "stem or move dropout into the head")
            self.mode_modules.append((path, m))
            return self._alias(node, x)
        if type(m) is nn.Identity:
            return self._alias(node, x)
        if type(m) is nn.ReLU:
            return self._act(node, x, ACT_RELU)
        if type(m) is nn.ReLU6:
            return self._act(node, x, ACT_RELU6)
        if type(m) is nn.LeakyReLU:
            return self._act(node, x, ACT_LEAKY_RELU, double_bits(m.negative_slope))
        if type(m) is nn.SiLU:
            return self._act(node, x, ACT_SILU)
        if type(m) is nn.GELU:
            return self._act(node, x, ACT_GELU, 1 if m.approximate == "tanh" else 0)
        if type(m) is nn.Sigmoid:
            return self._act(node, x, ACT_SIGMOID)
        if type(m) is nn.Tanh:
            return self._act(node, x, ACT_TANH)
        if type(m) is nn.Hardswish:
            return self._act(node, x, ACT_HARDSWISH)
        if isinstance(m, _NONLOCAL_MODULES):
            raise _unsupported(node, what, _NONLOCAL_HINT)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise _unsupported(node, what, "only BatchNorm2d in eval mode is supported")
        raise _unsupported(node, what, f"this module type is not supported. Supported: {SUPPORTED}")

    # -- functions and methods -----------------------------------------------------
    def _add(self, node, what, a, b, alpha=1):
        if alpha != 1:
            raise _unsupported(node, what, "add with alpha != 1 is not supported")
        for u, v in ((a, b), (b, a)):  # x + 0 (timm's MobileOne: identity_out = 0)
            if type(v) in (int, float) and v == 0 and self._is_tensor(u):
                return self._alias(node, self._input(node, u))
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or \
                a in self.attrs or b in self.attrs:
            raise _unsupported(node, what, "adding a constant or a parameter is not "
                               "supported; only sums of two tensors of the stem (residual "
                               "connections)")
        a, b = self._input(node, a), self._input(node, b)
        if self.chan[a] != self.chan[b] or self.layout[a] != self.layout[b]:
            raise _unsupported(node, what, f"adds a {self.layout[a]} tensor of {self.chan[a]} "
                               f"channels and a {self.layout[b]} one of {self.chan[b]}")
        self._set(node, self.b.add(self.val[a], self.val[b]), self.chan[a], self.layout[a])

    def _cat(self, node, what, args, kw):
        seq = args[0] if args else kw.get("tensors")
        dim = args[1] if len(args) > 1 else kw.get("dim", kw.get("axis", 0))
        if isinstance(seq, fx.Node) and seq in self.chunks and isinstance(dim, int) and \
                dim % 4 == 1:
            # the parts of a split of the channels, joined again: the tensor
            return self._alias(node, self._input(node, self.chunks[seq][0]))
        if kw.get("out") is not None:
            raise _unsupported(node, what, "cat with out= is not supported")
        if not isinstance(seq, (list, tuple)) or not seq:
            raise _unsupported(node, what, "cat of something that is not a list of tensors of "
                               "the stem")
        xs = [self._input(node, a) for a in seq]
        layouts = {self.layout[x] for x in xs}
        if len(layouts) > 1:
            raise _unsupported(node, what, "joins N x C x H x W tensors and ones permuted to "
                               "N x H x W x C")
        layout = layouts.pop()
        channel_dim = 1 if layout == NCHW else 3
        if not isinstance(dim, int) or dim % 4 != channel_dim:
            raise _unsupported(node, what, f"cat along dim {dim!r} of an {layout} tensor: only "
                               f"a cat of the channels (dim {channel_dim}) is local; one along "
                               "the batch, the rows or the columns is not")
        vals = tuple(self.val[x] for x in xs)
        k = len(vals)
        while k > 1 and vals[:k] not in self.cats:
            k -= 1
        v = self.cats[vals[:k]] if k > 1 else vals[0]
        for j in range(k, len(vals)):
            v = self.b.cat(v, vals[j])
            self.cats[vals[:j + 1]] = v
        self._set(node, v, sum(self.chan[x] for x in xs), layout)

    def _channel_fn(self, node, what, name, args, kw) -> bool:
        """The reshapes and selections of the channels, as functions
        (torch.chunk) or methods (x.chunk): True when ``name`` is one."""
        x = args[0] if args else None
        if name == "size":
            self._size(node, what, args, kw)
        elif name in ("view", "reshape"):
            shape = args[1:]
            if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
                shape = shape[0]
            self._view(node, what, x, list(shape or kw.get("shape", ())))
        elif name == "transpose":
            a = dict(zip(("dim0", "dim1"), args[1:]), **kw)
            self._transpose(node, what, x, a.get("dim0"), a.get("dim1"))
        elif name == "permute" and x in self.sels and self.sels[x].split is not None:
            dims = args[1] if len(args) == 2 else args[1:] or kw.get("dims")
            if tuple(int(d) % 5 for d in dims) != (0, 2, 1, 3, 4):
                raise _unsupported(node, what, f"permute{tuple(dims)} of a 5-d view of the "
                                   "channels: only (0, 2, 1, 3, 4), a channel shuffle")
            self._transpose(node, what, x, 1, 2)
        elif name == "flatten" and x in self.sels and self.sels[x].split is not None:
            a = dict(zip(("start_dim", "end_dim"), args[1:]), **kw)
            if (a.get("start_dim", 0) % 5, a.get("end_dim", -1) % 5) != (1, 2):
                raise _unsupported(node, what, "only flatten(1, 2) of a 5-d view of the "
                                   "channels is local")
            self._set_sel(node, _Sel(self.sels[x].src, self.sels[x].idx))
        elif name == "contiguous" and x in self.sels and \
                (self.sels[x].split is not None or x not in self.val):
            self.sels[node] = self.sels[x]      # (a 5-d view may have a value: _transpose)
        elif name in ("chunk", "split"):
            first = "chunks" if name == "chunk" else "split_size_or_sections"
            a = dict(zip((first, "dim"), args[1:]), **kw)
            if "split_size" in a:
                a[first] = a.pop("split_size")
            self._split(node, what, x, a.get(first), a.get("dim", 0), name == "chunk")
        elif name == "narrow":
            a = dict(zip(("dim", "start", "length"), args[1:]), **kw)
            dim = a.get("dim")
            if not isinstance(dim, int) or dim % 4 != 1:
                raise _unsupported(node, what, f"narrow along dim {dim!r}: only the channels "
                                   "(dim 1) are narrowed locally")
            start, length = (self._sym(node, what, a.get(k)) for k in ("start", "length"))
            if not all(isinstance(v, int) for v in (start, length)):
                raise _unsupported(node, what, _SHAPE_HINT)
            n = len(self._flat_sel(node, what, x).idx)
            if start < 0:                    # as torch.narrow: from the end
                start += n
            if not (0 <= start and 0 <= length and start + length <= n):
                raise _unsupported(node, what, f"narrow(1, {a.get('start')}, {length}) of {n} "
                                   "channels: out of range")
            self._getitem(node, what, x, (slice(None), slice(start, start + length)))
        else:
            return False
        return True

    def function(self, node: fx.Node):
        t = node.target
        what = _node_what(node, self.root)
        args, kw = node.args, dict(node.kwargs)
        if t is operator.getitem and len(args) == 2:
            return self._getitem(node, what, args[0], args[1])
        if t in _SIZE_OPS and not any(self._is_tensor(a) for a in args):
            return self._sym_arith(node, what, args)
        if t is getattr and len(args) == 2 and args[1] == "shape":
            self.syms[node] = self._shape_of(node, ".shape", args[0])
            return None
        name = _CHANNEL_FNS.get(t)
        if name is not None and (name != "flatten" or args[0] in self.sels) and \
                self._channel_fn(node, what, name, args, kw):
            return None
        args = self._constants(node, what, tuple(args))
        kw = {k: self._constants(node, what, v) for k, v in kw.items()}
        if t in (torch.cat, torch.concat, torch.concatenate):
            return self._cat(node, what, args, kw)
        if t in (operator.add, operator.iadd, torch.add):
            return self._add(node, what, args[0], args[1], kw.get("alpha", 1))
        if t in (operator.mul, operator.imul, torch.mul) and len(args) == 2 and not kw:
            return self._scale(node, what, args)
        if not args:
            raise _unsupported(node, what, f"unsupported call. Supported: {SUPPORTED}")
        if t is F.pad:
            a = dict(zip(["pad", "mode", "value"], args[1:]), **kw)
            return self._pad(node, what, args[0], a.get("pad"), a.get("mode", "constant"),
                             a.get("value"))
        if t is torch.constant_pad_nd:
            a = dict(zip(["pad", "value"], args[1:]), **kw)
            return self._pad(node, what, args[0], a.get("pad"), value=a.get("value", 0))
        extra = None
        if t in _POOL_FNS:
            x0, extra = self._unpad(args[0])
            args = (x0,) + tuple(args[1:])
        x = self._input(node, args[0])
        rest = args[1:]
        if t in (F.relu, torch.relu, torch.relu_, F.relu_):
            return self._act(node, x, ACT_RELU)
        if t is F.relu6:
            return self._act(node, x, ACT_RELU6)
        if t in (F.leaky_relu, F.leaky_relu_):
            slope = rest[0] if rest else kw.get("negative_slope", 0.01)
            return self._act(node, x, ACT_LEAKY_RELU, double_bits(slope))
        if t is F.silu:
            return self._act(node, x, ACT_SILU)
        if t is F.gelu:
            approx = kw.get("approximate", "none")
            return self._act(node, x, ACT_GELU, 1 if approx == "tanh" else 0)
        if t in (torch.sigmoid, F.sigmoid):
            return self._act(node, x, ACT_SIGMOID)
        if t in (torch.tanh, F.tanh):
            return self._act(node, x, ACT_TANH)
        if t is F.hardswish:
            return self._act(node, x, ACT_HARDSWISH)
        if t in _POOL_FNS:
            return self._pool_fn(node, what, x, rest, kw, extra)
        if t is torch.permute:
            dims = rest[0] if rest else kw["dims"]
            return self._permute(node, what, x, dims)
        if t is F.batch_norm:
            return self._batchnorm_fn(node, what, x, rest, kw)
        if t is F.layer_norm:
            names = ["normalized_shape", "weight", "bias", "eps"]
            a = dict(zip(names, rest), **kw)
            w = self._param(node, what, a["weight"], "weight")[0] \
                if a.get("weight") is not None else -1
            b = self._param(node, what, a["bias"], "bias")[0] if a.get("bias") is not None else -1
            return self._layernorm(node, what, x, a["normalized_shape"], w, b,
                                   a.get("eps", 1e-5))
        sd = _stochastic_depth_fn()
        if sd is not None and t is sd:
            names = ["p", "mode", "training"]
            a = dict(zip(names, rest), **kw)
            if a.get("training", True) and a.get("p", 0.0) > 0:
                raise _unsupported(node, what, "stochastic depth in training mode drops "
                                   "whole samples at random; call .eval() on the stem")
            return self._alias(node, x)
        if t is F.dropout:
            training = rest[1] if len(rest) > 1 else kw.get("training", True)
            if training:
                raise _unsupported(node, what, "dropout with training=True cannot be streamed")
            return self._alias(node, x)
        if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, F.linear,
                 torch.mean, torch.sum, F.interpolate, F.layer_norm, F.group_norm):
            raise _unsupported(node, what, _NONLOCAL_HINT)
        raise _unsupported(node, what, "this function is not supported. Supported: "
                           f"{SUPPORTED}; use the nn module forms")

    def method(self, node: fx.Node):
        name = node.target
        what = _node_what(node, self.root)
        if name in ("mul", "mul_", "__mul__") and len(node.args) == 2:
            return self._scale(node, what, node.args)
        if self._channel_fn(node, what, name, node.args, dict(node.kwargs)):
            return None
        args = self._constants(node, what, tuple(node.args))
        kw = {k: self._constants(node, what, v) for k, v in node.kwargs.items()}
        x = self._input(node, args[0])
        if name in ("relu", "relu_"):
            return self._act(node, x, ACT_RELU)
        if name in ("sigmoid", "sigmoid_"):
            return self._act(node, x, ACT_SIGMOID)
        if name in ("tanh", "tanh_"):
            return self._act(node, x, ACT_TANH)
        if name in ("add", "add_", "__add__", "__iadd__"):
            return self._add(node, what, args[0], args[1], kw.get("alpha", 1))
        if name == "contiguous":
            return self._alias(node, x)
        if name == "permute":
            dims = args[1] if len(args) == 2 else args[1:]
            return self._permute(node, what, x, dims)
        if name in ("mean", "sum", "flatten"):
            raise _unsupported(node, what, _NONLOCAL_HINT)
        raise _unsupported(node, what, f"this method is not supported. Supported: {SUPPORTED}")

    # -- driver -------------------------------------------------------------------------
    def _modes_traced(self, graph) -> List[Tuple[str, nn.Module, bool]]:
        """The stem's modules whose mode changes the trace (timm's
        BatchNormAct2d, a block with ``if self.training``, a model whose
        forward_features reads it: fx traced them in the mode they have
        now), found by tracing again with modes flipped (all at once, then
        halves of those that change it); with that mode. A module that
        reads its mode elsewhere (that model's forward_head's dropout) or
        only under a flag that is off (DenseNet's dropout at drop_rate 0)
        is free."""
        pinned = {p for p, _ in self.mode_modules}
        cands = [(n, m) for n, m in self.root.named_modules() if n not in pinned]
        reference = str(graph)
        buffers = [b for b in self.root.buffers()]
        saved = [b.detach().clone() for b in buffers]
        versions = [b._version for b in buffers]
        rng = torch.random.get_rng_state()

        modes = [(m, m.training) for m in self.root.modules()]

        def changes(group) -> bool:
            # a module with a train() of its own is flipped through it (a
            # feature extractor swaps graphs there), the others by the flag
            own = [m for _, m in group if type(m).train is not nn.Module.train]
            for _, m in group:
                m.training = not m.training
            try:  # a module's code in the other mode may also fail to trace
                for m in own:
                    m.train(m.training)
                return str(_StemTracer().trace(self.root)) != reference
            except Exception:  # noqa: BLE001 - it depends on its mode
                return True
            finally:
                for m in reversed(own):
                    m.train(not m.training)
                for m, mode in modes:
                    m.training = mode
                with torch.no_grad():  # eager code of the other mode ran
                    for b, v, n in zip(buffers, saved, versions):  # (num_batches_tracked
                        # += 1) only where it was written: a copy_ moves the
                        # version counter, and an autograd graph recorded
                        # through the stem before (its batch norms' saved
                        # buffers) could no longer be differentiated
                        if b._version != n:
                            b.copy_(v)
                torch.random.set_rng_state(rng)

        def culprits(group):
            if not group or not changes(group):
                return []
            if len(group) == 1:
                return list(group)
            half = len(group) // 2
            return culprits(group[:half]) + culprits(group[half:])

        return [(n, m, bool(m.training)) for n, m in culprits(cands)]

    def run(self) -> Converted:
        tracer = _StemTracer()
        try:
            graph, failure = tracer.trace(self.root), None
        except Exception as e:  # noqa: BLE001 - re-raised with context, below
            graph, failure = None, e
        # stochastic depth the stem calls is traced through (eval: identity);
        # keep those modules frozen too, and refuse them in training mode
        for name, m in self.root.named_modules():
            if _is_stochastic_depth(m) and name in tracer.called:
                if m.training and _drop_probability(m) > 0:
                    raise ValueError(f"streamcnn: cannot stream {type(m).__name__} "
                                     f"'{name}': in training mode it drops whole samples at "
                                     "random; call .eval() on the stem")
                self.mode_modules.append((name, m))
        if failure is not None:
            e = failure
            where = ""
            if tracer.failed_in is not None:
                path, kind = tracer.failed_in
                path = _strip_leaf(path)
                where = f" in '{path}' ({kind})" if path else f" in {kind}"
            raise ValueError(
                f"streamcnn: torch.fx could not trace the stem{where} "
                f"({type(e).__name__}: {e}); streamcnn needs a stem made of supported "
                f"layers ({SUPPORTED})") from e
        self.traced_modes = self._modes_traced(graph)
        functionalize(graph, self.root)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError("streamcnn: the stem's forward must take exactly one tensor "
                             f"argument, it takes {len(placeholders)}")
        outputs = [n for n in graph.nodes if n.op == "output"]
        out = outputs[0].args[0]
        if not isinstance(out, fx.Node):
            raise ValueError("streamcnn: the stem must return a single tensor")

        # nodes the output depends on, in graph (topological) order
        live, stack = set(), [out]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(n.all_input_nodes)

        in_channels = self.in_channels or self._guess_in_channels(graph, live)
        if not in_channels and self.in_selected is not None:
            raise ValueError(f"streamcnn: the stem selects channels of its input image (fx "
                             f"node '{self.in_selected.name}'), so its layers do not say how "
                             "many the image has: pass in_channels= (the image's channels)")
        self.b = ProgramBuilder(in_channels or 1)
        self._set(placeholders[0], 0, in_channels)
        # a layer that cannot be local is named first: cutting the stem
        # before it is what to do, whatever else a block holds
        for node in graph.nodes:
            if node in live and _nonlocal(node, self.root):
                upsample = node.target is F.interpolate or node.op == "call_module" and \
                    isinstance(self.root.get_submodule(str(node.target)), nn.Upsample)
                raise _unsupported(node, _node_what(node, self.root),
                                   _UPSAMPLE_HINT if upsample else _NONLOCAL_HINT)
        for node in graph.nodes:
            if node not in live or node.op == "placeholder":
                continue
            if node.op in ("call_method", "call_function") and self._param_view(node):
                continue
            if node.op == "call_module":
                self.module(node)
            elif node.op == "call_function":
                self.function(node)
            elif node.op == "call_method":
                self.method(node)
            elif node.op == "get_attr":  # a parameter a function uses
                path, _, attr = str(node.target).rpartition(".")
                self.attrs[node] = (path, attr)
            else:
                raise _unsupported(node, node.op, "unsupported graph node")
        if self.b.n_instr == 0:
            raise ValueError("streamcnn: the stem has no layers to stream")
        if not in_channels:
            raise ValueError("streamcnn: cannot infer the stem's input channels (no Conv2d or "
                             "BatchNorm2d); pass in_channels=")
        if out in self.pads:
            raise ValueError(f"streamcnn: the stem ends in a zero padding ('{out.name}'); "
                             "streamcnn folds zero padding into the Conv2d or pool that reads "
                             "it: pad in the layers after the stem")
        if out in self.sels:        # it ends selecting (or viewing 5-d) channels
            self._emit_sel(outputs[0], out)
        if out not in self.val:
            raise ValueError(f"streamcnn: the stem returns {out.name}, which is not a tensor "
                             "it computes")
        if self.layout[out] != NCHW:
            raise ValueError("streamcnn: the stem returns a tensor permuted to N x H x W x C; "
                             "it must return N x C x H x W")
        if self.val[out] != self.b.n_instr:
            # the output is an earlier value (e.g. a trailing Identity of a
            # value that is also used elsewhere): make it the last one
            raise ValueError("streamcnn: the stem's output must be its last computed value")
        return Converted(self.b.program(), list(self.b.params), self.mode_modules,
                         [self.labels.get(v, "") for v in range(1, self.b.n_instr + 1)],
                         self.traced_modes)

    def _guess_in_channels(self, graph, live) -> Optional[int]:
        """Channels of the first Conv2d / batch norm: every layer before it
        keeps the channel count; None (``in_selected`` the node) where the
        stem selects channels of its input: then they do not say."""
        image = next(n for n in graph.nodes if n.op == "placeholder")
        for u in image.users:
            if u in live and (u.target in (operator.getitem, torch.chunk, torch.split,
                                           torch.narrow, torch.tensor_split) or
                              u.target in ("__getitem__", "chunk", "split", "narrow",
                                           "tensor_split")):
                self.in_selected = u
                return None
        for node in graph.nodes:
            if node in live and node.op == "call_module":
                m = self.root.get_submodule(str(node.target))
                if isinstance(m, nn.Conv2d):
                    return m.in_channels
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    return m.num_features
                if _is_frozen_bn(m):
                    return m.running_mean.numel()
        return None


_LEAF = "_streamcnn_leaf"


def _strip_leaf(path: str) -> str:
    """A path relative to the bare layer's wrapper (convert), else as it is."""
    if not path.startswith(_LEAF):
        return path
    return "" if path == _LEAF else path[len(_LEAF) + 1:]


def convert(module: nn.Module, in_channels: Optional[int] = None) -> Converted:
    """Trace `module` with torch.fx and convert it to a program.

    Raises ValueError naming the first node that cannot be streamed and what
    to do about it.
    """
    for name, m in module.named_modules():
        if type(m).__name__ == "StreamingModule" and type(m).__module__ == "streamcnn.module":
            raise ValueError(f"streamcnn: the stem holds a StreamingModule "
                             f"('{name or '(the stem)'}'): streams do not nest; stream the "
                             "plain layers once (its .stem is the module it streams)")
    # A bare torch.nn layer (e.g. one Conv2d) is traced from inside a wrapper,
    # as fx would otherwise trace into its forward; paths stay relative to it.
    if (type(module).__module__.startswith("torch.nn.") or _is_frozen_bn(module)) and \
            not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        conv = _Converter(nn.Sequential(OrderedDict([(_LEAF, module)])), in_channels).run()
        return Converted(conv.program, [(_strip_leaf(p), a) for p, a in conv.param_refs],
                         [(_strip_leaf(p), m) for p, m in conv.mode_modules], conv.labels,
                         [(_strip_leaf(p), m, t) for p, m, t in conv.traced_modes])
    return _Converter(module, in_channels).run()

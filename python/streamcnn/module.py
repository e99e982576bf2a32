"""``StreamingModule``: run an ``nn.Module`` stem tile by tile."""


import operator
import re
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from . import ops  # noqa: F401  (registers fake kernels and autograd)
from .ops import compute_dtype
from .budget import Budget, choose_tile, input_extent, parse_bytes, tile_bytes
from ._library import program_info, tile_bounds, tiling_info, work_info
from .program import batchnorm_params, convert, has_autocast_ops, prepend_normalize

TileSize = Union[int, Sequence[int]]


def _tensor(t: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """Refine Optional[Tensor] (e.g. Conv2d.bias) for TorchScript; a tensor
    the program reads must still be there."""
    if t is None:
        raise ValueError("streamcnn: the stem's " + name + " is None, but it was a tensor "
                         "when this StreamingModule was built; build a new one after "
                         "changing the stem's layers")
    return t


# a module's hooks, by the attribute torch keeps them in; none is called
# when the stem is streamed (its layers run as one program, tile by tile)
_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
          ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks",
                 "_global_backward_pre_hooks", "_global_backward_hooks")
# attributes that may change after the program is built: the mode (train()
# keeps the layers it matters for frozen), in-place flags, and what frozen
# layers do not use (a batch norm's momentum, a dropout's p in eval mode:
# training scripts set them on every module)
_FREE_ATTRS = ("training", "inplace", "momentum", "p")
_SETTING_TYPES = (bool, int, float, str, tuple, list, type(None))
# the hook-based forms of torch.nn.utils, and their parametrizations
_HOOK_UTILS = {"WeightNorm": "torch.nn.utils.parametrizations.weight_norm",
               "SpectralNorm": "torch.nn.utils.parametrizations.spectral_norm"}


def _check_hooks(stem: nn.Module) -> None:
    """Refuse a stem whose modules have hooks (they were silently not
    called: a forward hook's change of the output lost, a feature capture
    empty); warn once of global module hooks (they are not called for the
    stem's layers either)."""
    for name, m in stem.named_modules():
        for attr, kind in _HOOKS:
            hooks = getattr(m, attr, None)
            if not hooks:
                continue
            kind_of = type(next(iter(hooks.values()))).__name__
            if kind_of in _HOOK_UTILS:
                hint = (f"it is the {kind_of} of torch.nn.utils, which works by a hook: use "
                        f"{_HOOK_UTILS[kind_of]} (a parametrization) instead")
            else:
                hint = ("hooks of the stem's modules are not called when it is streamed (its "
                        "layers run as one program, tile by tile): remove it; hook the "
                        "StreamingModule for its output, or use streamcnn.heatmaps for maps")
            raise ValueError(f"streamcnn: module '{name or '(the stem)'}' ({type(m).__name__}) "
                             f"has a {kind}: {hint}")
    import torch.nn.modules.module as mm
    if any(getattr(mm, g, None) for g in _GLOBAL_HOOKS):
        warnings.warn("streamcnn: global module hooks (torch.nn.modules.module."
                      "register_module_*_hook) are not called for the layers of a streamed "
                      "stem", UserWarning, stacklevel=4)


def _settings(stem: nn.Module) -> dict:
    """The stem's layers as the program read them: each module's class and
    plain attributes (stride, padding, eps, ...), by name."""
    return {name: (type(m), {k: v for k, v in vars(m).items()
                             if not k.startswith("_") and k not in _FREE_ATTRS
                             and isinstance(v, _SETTING_TYPES)})
            for name, m in stem.named_modules()}


def _check_settings(before: dict, stem: nn.Module) -> None:
    """Refuse a stem whose layers changed since the program was built (the
    program keeps what it read: a changed eps or stride was silently
    ignored), naming the first change."""
    now = _settings(stem)
    if now == before:
        return
    again = "; build a new StreamingModule after changing the stem's layers"
    for name in list(before) + [n for n in now if n not in before]:
        label = f"'{name or '(the stem)'}'"
        if name not in now or name not in before:
            raise ValueError(f"streamcnn: the stem's module {label} was "
                             f"{'removed' if name not in now else 'added'} after this "
                             f"StreamingModule was built{again}")
        (t0, a0), (t1, a1) = before[name], now[name]
        if t0 is not t1:
            raise ValueError(f"streamcnn: the stem's module {label} was replaced ({t0.__name__} "
                             f"by {t1.__name__}) after this StreamingModule was built{again}")
        for k in sorted(set(a0) | set(a1)):
            v0, v1 = a0.get(k), a1.get(k)
            if v0 != v1 and repr(v0) != repr(v1):
                raise ValueError(f"streamcnn: {label} ({t0.__name__}) changed {k} from {v0!r} "
                                 f"to {v1!r} after this StreamingModule was built{again}")


def _name_instructions(message: str, labels: Sequence[str]) -> str:
    """The C core's "instruction 3 (add)" with its layer: "instruction 3
    (add: fx node 'add', in 'level2' (Tree))"."""
    def named(m):
        i = int(m.group(1))
        label = labels[i] if 0 <= i < len(labels) and labels[i] else ""
        return f"instruction {i} ({m.group(2)}: {label})" if label else m.group(0)
    return re.sub(r"instruction (\d+) \((\w+)\)", named, message)


def _ref_name(path: str, attr: str) -> str:
    """The name of the stem's tensor ``attr`` of submodule ``path``."""
    return f"{path}.{attr}" if path else attr


def _param_gatherer(stem: nn.Module, refs: List[Tuple[str, str]]) -> fx.GraphModule:
    """A generated module whose forward returns the tensors ``refs`` name, read
    at call time. It holds the stem's own children (same objects), so the
    tensors are shared, never copied, and its state_dict has the stem's keys."""
    graph = fx.Graph()
    installs = [graph.get_attr(name) for name, _ in stem.named_children()]
    # the stem's own tensors (a bare layer as the stem): all of them, so that
    # the state_dict keys are the stem's (e.g. num_batches_tracked)
    installs += [graph.get_attr(name) for name, _ in stem.named_parameters(recurse=False)]
    installs += [graph.get_attr(name) for name, _ in stem.named_buffers(recurse=False)]
    outs = [graph.call_function(_tensor, (graph.get_attr(_ref_name(path, attr)),
                                          _ref_name(path, attr)))
            for path, attr in refs]
    graph.output(outs)
    gm = fx.GraphModule(stem, graph, class_name="StreamParams")
    for node in installs:  # only needed to install whole children
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


# the dtypes a stem computes in; an image may also be uint8 (converted per tile)
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_IMAGE_DTYPES = (torch.uint8,) + _COMPUTE_DTYPES


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """mean / std's dtype in a stem computing in dtype: float32 for float16
    / bfloat16 (the image gather normalises in float32 and rounds once)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# fewer output pixels per tile side than this, and each tile's fixed costs
# (its calls, the halo's edges) dominate
SMALL_OUTPUT_TILE = 8
# output pixels a default tile gives at least (per side), and the tile the
# warning suggests: a tile of the receptive field gives one. DenseNet-121 to
# denseblock3, forward on the 2-core development VM: 2048², 1 px 66 s,
# 16 px 3.4 s; 4096², 4 px 34.5 s, 8 px 22.1 s, 16 px 14.2 s, 32 px 13.5 s,
# 64 px 17.7 s, 128 px 26.3 s
MIN_OUTPUT_TILE = 32


def _warn_small_tiles(tile: List[int], info) -> None:
    """A UserWarning where a tile gives fewer than SMALL_OUTPUT_TILE output
    pixels per side (a tile of the receptive field gives one): exact, but
    many times slower than a larger tile."""
    rf, stride = info[2:4], info[4:6]
    out = [(tile[k] - rf[k]) // stride[k] + 1 for k in (0, 1)]
    if min(out) >= SMALL_OUTPUT_TILE or max(stride) == 1:
        return
    good = [input_extent(rf[k], stride[k], MIN_OUTPUT_TILE) for k in (0, 1)]
    warnings.warn(
        f"streamcnn: tile_size {tuple(tile)} gives {out[0]} x {out[1]} output pixels per tile "
        f"(receptive field {rf[0]} x {rf[1]}, output stride {stride[0]} x {stride[1]}): each "
        "tile's fixed costs dominate and streaming is several times slower than with larger "
        f"tiles; tile_size {tuple(good)} gives {MIN_OUTPUT_TILE} x {MIN_OUTPUT_TILE}",
        UserWarning, stacklevel=3)


def _tile_pair(tile_size: TileSize) -> List[int]:
    if isinstance(tile_size, bool):
        raise TypeError("streamcnn: tile_size must be an int or a pair of ints")
    if hasattr(tile_size, "__index__") and not hasattr(tile_size, "__len__"):
        pair = [operator.index(tile_size)] * 2  # int, numpy integer
    elif isinstance(tile_size, torch.Tensor) and tile_size.dim() == 0:
        try:
            pair = [operator.index(tile_size)] * 2  # an integer 0-d tensor
        except TypeError:
            raise TypeError("streamcnn: tile_size must be an int or a pair of ints, got "
                            f"{tile_size!r}") from None
    else:
        try:
            if isinstance(tile_size, str) or any(isinstance(t, bool) for t in tile_size):
                raise TypeError
            pair = [operator.index(t) for t in tile_size]  # 32.0 is refused, as alone
        except TypeError:
            raise TypeError("streamcnn: tile_size must be an int or a pair of ints, got "
                            f"{tile_size!r}") from None
        if len(pair) != 2:
            raise ValueError(f"streamcnn: tile_size must be an int or (rows, cols), got "
                             f"{tile_size!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"streamcnn: tile_size must be positive, got {tile_size!r}")
    if pair[0] > 2**31 or pair[1] > 2**31:
        raise ValueError(f"streamcnn: tile_size must be at most {2**31} (the largest image "
                         f"extent), got {tile_size!r}")
    return pair


def per_channel_norm(mean, std, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """mean and std (None: 0 and 1; a number or ``channels`` numbers) as two
    float64 tensors of ``channels`` values; a TypeError or ValueError names
    what is wrong."""
    try:
        m = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float64).flatten()
        d = torch.as_tensor(1.0 if std is None else std, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError("streamcnn: mean and std must be numbers or sequences of "
                        f"numbers, got mean={mean!r}, std={std!r}") from None
    if m.numel() == 1:
        m = m.expand(channels)
    if d.numel() == 1:
        d = d.expand(channels)
    if m.numel() != channels or d.numel() != channels:
        raise ValueError(f"streamcnn: mean and std need 1 or {channels} values (one per "
                         f"image channel), got {m.numel()} and {d.numel()}")
    if not bool(torch.isfinite(m).all()) or not bool((d > 0).all()) \
            or not bool(torch.isfinite(d).all()):
        raise ValueError("streamcnn: mean must be finite and std finite and positive")
    return m, d


class StreamingModule(nn.Module):
    """Run ``module`` (a CNN stem) tile by tile, forward and backward, with
    outputs and gradients equal to ``module(x)`` on the whole image.

    Args:
        module: the stem, any module ``torch.fx`` can trace into supported
            layers: Conv2d (any kernel, stride, padding incl. 'same',
            dilation, groups; padding_mode='zeros'), MaxPool2d, AvgPool2d,
            BatchNorm2d in eval mode, ReLU, ReLU6, LeakyReLU, SiLU, GELU,
            Sigmoid, Tanh, Hardswish, Identity, Dropout in eval mode, and
            residual adds (torchvision BasicBlock / Bottleneck).
        tile_size: the largest input tile edge, halo included, the op reads
            per step: an int or ``(rows, cols)``. At least the stem's
            receptive field (``.receptive_field``); larger tiles recompute
            less and use more memory.
        memory_budget: instead of tile_size: bytes (a number, or a string
            such as ``"6GB"`` or ``"512MiB"``) the streamed pass may hold
            besides the stem output and its gradient. Each call picks the
            tile for its image size, batch and dtype from the C core's
            memory model (the largest tile's forward or backward plus the
            strips; ``budget_tile()``), the one with the least recompute that fits,
            and stores it in ``tile_size`` (which TorchScript and
            torch.compile use as it is).
        in_channels: channels of the image, when the stem has no Conv2d or
            BatchNorm2d to read them from.
        mean, std: optional per-channel (or scalar) normalisation applied to
            the image inside each tile by the tile gather (buffers
            ``norm_weight`` / ``norm_bias`` of this module, float32 or
            float64; no gradient).
        progress: show per-tile progress of the forward (and of the backward
            it leads to) on stderr; eager mode only, off by default.
        deterministic: bit-identical results run to run: cuDNN's
            deterministic convolution algorithms during the forward and its
            backward (the tile kernels, tile order and float32 weight-grad
            sums are deterministic anyway); eager mode only.
        halo_cache: compute every value once per column of tiles: each row
            of tiles takes the rows it shares with the row above (its halo)
            from a cache instead of recomputing them, and when a gradient
            is needed the forward keeps those halos (``work()['strip_elements']``
            values per image) for the backward, which then recomputes each
            tile's own rows only and passes the halo's gradient up. Exact
            either way; off: each tile recomputes its whole cone in the
            backward and nothing is kept.

    ``sm(x)`` takes ``x`` of shape ``N x C x H x W`` (float32, float64,
    float16 or bfloat16 with the dtype and device of the stem's parameters,
    or uint8; in float16 / bfloat16 the batch norms' parameters may be
    float32) of any size and
    returns ``module(x)``; a uint8 image is converted tile by tile (the
    float image never exists) and the stem computes in its parameters' dtype
    (their narrowest: batch norms' and mean / std may be float32).
    With ``mean`` / ``std`` (per channel, in the image's units, e.g. 0..255
    for uint8) it returns ``module((x - mean) / std)``, normalised per tile. ``loss.backward()`` fills ``.grad`` of the stem's
    parameters that require grad, and of ``x`` when it requires grad.
    Parameters and buffers are read at call time, so optimizer steps,
    ``load_state_dict`` and ``.to()`` are seen.

    ``sm.module`` holds the stem's submodules (the same objects, so the
    stem you passed sees every update) and ``sm.state_dict()`` has the keys
    of ``module.state_dict()`` under ``module.``; ``sm.stem`` is the module
    you passed.

    The stem's BatchNorm and Dropout layers must be in eval mode (frozen
    statistics; the affine weight and bias still train) and stay in eval
    mode when ``.train()`` is called: a streamed stem cannot use
    whole-image batch statistics.

    ``torch.jit.script`` works on this module (and on models containing
    it); the scripted forward calls ``torch.ops.streamcnn.forward`` and
    runs in any process that loads ``streamcnn.library_path()``.
    """

    __jit_unused_properties__ = ["stem"]
    __jit_ignored_attributes__ = ["_budget_tiles", "_layer_settings"]  # eager-only

    _norm_exact: List[List[float]]  # mean / std's exact constants (TorchScript type)

    def __init__(self, module: nn.Module, tile_size: Optional[TileSize] = None, *,
                 in_channels: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None,
                 progress: bool = False, deterministic: bool = False,
                 halo_cache: bool = True, memory_budget: Optional[Budget] = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"streamcnn: expected an nn.Module, got {type(module).__name__}")
        if (tile_size is None) == (memory_budget is None):
            raise TypeError("streamcnn: give either tile_size or memory_budget (one of them)")
        for name, flag in (("progress", progress), ("deterministic", deterministic),
                           ("halo_cache", halo_cache)):
            if not isinstance(flag, bool):
                raise TypeError(f"streamcnn: {name} must be True or False, got {flag!r}")
        if in_channels is not None and (isinstance(in_channels, bool) or not hasattr(
                in_channels, "__index__") or operator.index(in_channels) < 1):
            raise ValueError(f"streamcnn: in_channels must be a positive int, got "
                             f"{in_channels!r}")
        self.memory_budget: int = 0 if memory_budget is None else parse_bytes(memory_budget)
        _check_hooks(module)
        conv = convert(module, in_channels)
        info = program_info(conv.program)  # validated by the C decoder
        tile = _tile_pair(tile_size if tile_size is not None else [info[2], info[3]])
        if tile[0] < info[2] or tile[1] < info[3]:
            raise ValueError(
                f"streamcnn: tile_size {tuple(tile)} is smaller than what one output "
                f"pixel needs: the minimum tile_size for this stem is {info[2]} x {info[3]} "
                "(its receptive field)")
        if tile_size is not None:
            _warn_small_tiles(tile, info)
        self.module = _param_gatherer(module, conv.param_refs)
        # the stem's tensors the program reads, and their shapes then
        self._param_names: List[str] = [_ref_name(p, a) for p, a in conv.param_refs]
        self._param_shapes: List[List[int]] = [list(t.shape) for t in self.module()]
        self.program: List[int] = conv.program
        labels = list(conv.labels)
        self.progress: bool = bool(progress)
        self.deterministic: bool = bool(deterministic)
        self.halo_cache: bool = bool(halo_cache)
        self.normalize: bool = mean is not None or std is not None
        if self.normalize:
            m, d = per_channel_norm(mean, std, info[0])
            # the compute dtype's, but at least float32: the gather
            # normalises in float32 and rounds once (also after .half(),
            # see _apply)
            stem_params = [t for t in self.module() if t.is_floating_point()]
            dtype = _norm_dtype(min(stem_params, key=lambda t: t.element_size()).dtype
                                if stem_params else torch.float32)
            # the tile runs (x - mean) / std as a depthwise 1 x 1 convolution
            # (which the image gather applies); the exact constants are kept
            # for dtype changes (_apply)
            self._norm_exact = [(1 / d).tolist(), (-m / d).tolist()]
            # on the stem's device: a stem already on the GPU gets its
            # normalisation there too (as .cuda() after would move it)
            weight, bias = self._norm_tensors(
                dtype, stem_params[0].device if stem_params else torch.device("cpu"))
            self.register_buffer("norm_weight", weight)
            self.register_buffer("norm_bias", bias)
            self.program = prepend_normalize(conv.program)
            labels = ["the mean / std normalisation"] + labels
        else:  # (unused; buffers so that TorchScript sees tensors)
            self._norm_exact = [[], []]
            self.register_buffer("norm_weight", torch.empty(0), persistent=False)
            self.register_buffer("norm_bias", torch.empty(0), persistent=False)
        self.tile_size: List[int] = tile
        self.in_channels: int = info[0]
        self.out_channels: int = info[1]
        self.receptive_field: Tuple[int, int] = (info[2], info[3])
        self.output_stride: Tuple[int, int] = (info[4], info[5])
        self._instr_labels: List[str] = labels  # each instruction's layer, in words
        # modules the program keeps in eval mode (batch norms, dropouts,
        # stochastic depth), and other modules whose mode the trace depends
        # on, with that mode (parents first: train() recurses)
        self._mode_paths: List[str] = [p for p, _ in conv.mode_modules]
        for _, m in conv.mode_modules:  # (in training mode only with p = 0)
            m.eval()
        traced = sorted(conv.traced_modes, key=lambda t: (t[0] != "", t[0].count(".")))
        self._traced_paths: List[str] = [p for p, _, _ in traced]
        self._traced_modes: List[bool] = [t for _, _, t in traced]
        # parameters that may stay float32 in a half-precision computation
        # (batch norms', and mean / std, which the image gather applies in
        # float32), and whether autocast would run any layer of the stem in
        # half
        n_params = conv.program[4]  # the norm's weight and bias come after
        self._float32_ok: List[int] = batchnorm_params(self.program) + (
            [n_params, n_params + 1] if self.normalize else [])
        self._autocast_casts: bool = has_autocast_ops(conv.program)
        self._norm_only: bool = self.normalize and n_params == 0
        self._stem = (module,)  # a tuple: not registered a second time
        self._budget_tiles: dict = {}
        self._layer_settings: dict = _settings(module)
        # memory_budget: whether a tile was chosen (an eager or compiled call,
        # fix_tile); TorchScript and torch.export stream tile_size as it is
        self._tile_chosen: bool = tile_size is not None
        self._fixed: bool = False           # fix_tile took the budget's choice

    @torch.jit.unused
    def _unchosen_tile(self, how: str) -> str:
        return (f"streamcnn: memory_budget picks the tile at an eager call, for the image's "
                f"size; none was picked before {how}, which would stream tiles of the "
                f"receptive field {tuple(self.tile_size)} (many times slower): call "
                "fix_tile(height, width) or the module once on such an image first, or give "
                "tile_size")

    @torch.jit.unused
    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: a memory_budget module must
        have picked its tile (the scripted forward streams tile_size)."""
        if self.memory_budget and not self._tile_chosen:
            raise ValueError(self._unchosen_tile("torch.jit.script"))
        return self

    @property
    def stem(self) -> nn.Module:
        """The module passed in (its submodules are shared with ``.module``)."""
        return self._stem[0]

    @torch.jit.unused
    def _apply(self, fn, recurse=True):
        """.to() / .half() / .double() as usual, except that mean / std are
        rebuilt from their exact values in the new dtype, and in float32
        for float16 / bfloat16 (the image gather normalises in float32 and
        rounds once), never rounded twice. ``self`` may be the module
        torch.jit.script made of this one (it copies this method onto it), so
        no ``super()`` and no other method of this class through ``self``."""
        nn.Module._apply(self, fn, recurse)
        if getattr(self, "normalize", False):
            w = self.norm_weight
            self.norm_weight, self.norm_bias = StreamingModule._norm_tensors(
                self, _norm_dtype(w.dtype), w.device)
        return self

    def _norm_tensors(self, dtype: torch.dtype, device: torch.device) -> List[torch.Tensor]:
        """mean / std as the program's depthwise 1 x 1 convolution (weight
        C x 1 x 1 x 1, bias C), in dtype from their exact values."""
        w, b = self._norm_exact[0], self._norm_exact[1]
        return [torch.tensor(w, dtype=dtype, device=device).reshape(len(w), 1, 1, 1),
                torch.tensor(b, dtype=dtype, device=device)]

    @torch.jit.unused
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Loaded mean / std become the exact values _apply rebuilds from."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if getattr(self, "normalize", False):
            for j, name in enumerate(("norm_weight", "norm_bias")):
                t = state_dict.get(prefix + name)
                if isinstance(t, torch.Tensor) and t.numel() == len(self._norm_exact[j]):
                    self._norm_exact[j] = t.detach().double().flatten().tolist()

    def stream_params(self) -> List[torch.Tensor]:
        """The tensors the program indexes, read from the stem now (and the
        normalisation's, when mean/std were given)."""
        params: List[torch.Tensor] = self.module()
        if self.normalize:
            params = params + [self.norm_weight, self.norm_bias]
        return params

    @torch.jit.unused
    def tiling(self, height: int, width: int) -> dict:
        """How an image of height x width is tiled (for inspection): the
        output size, the output tile edge, the tile counts, and the output
        rows / columns where the tiles start and end (``row_bounds``,
        ``col_bounds``) as a training step's backward tiles them: with halo
        caching the first tile of each row and column is smaller (it reads
        its whole cone, the others only their own part and a thin halo);
        with halo_cache=False all are output_tile but the last. (The
        forward op always caches halos, so it tiles as halo caching.)"""
        oh, ow, th, tw, nh, nw = self._named(tiling_info, self.program, height, width,
                                             self.tile_size)
        rows, cols = tile_bounds(self.program, height, width, self.tile_size,
                                 self.halo_cache)
        return {"output": (oh, ow), "output_tile": (th, tw), "tiles": (nh, nw),
                "row_bounds": rows, "col_bounds": cols}

    @torch.jit.unused
    def budget_tile(self, batch: int, height: int, width: int,
                    dtype: torch.dtype = torch.float32, training: bool = True,
                    image_grad: bool = False, device=None) -> dict:
        """What memory_budget chooses for a batch of height x width images
        computed in dtype, for a training step or (training=False) a forward
        without gradient: ``tile_size``, ``halo_cache`` (used only where
        this module's halo_cache is on and the strips fit) and the modelled
        peak ``bytes`` (stem output and its gradient excluded). The step
        computes the gradients of the parameters that require one now (a
        frozen layer keeps less for its backward) and, with image_grad, the
        image's. device: where the stem runs (its convolutions' transients
        differ); None: the parameters' device."""
        if dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"streamcnn: dtype is the one the stem computes in (float32, "
                             f"float64, float16 or bfloat16), got {dtype}: a uint8 image is "
                             "computed in the parameters' dtype (or autocast's)")
        mask = self._grad_mask(image_grad, self.stream_params())
        if device is None:
            device = next((p.device for p in self.stream_params()), torch.device("cpu"))
        cpu = torch.device(device).type == "cpu"
        tile, cached = self._budget_choice(batch, height, width, dtype, self.halo_cache,
                                           training, mask, cpu)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return {"tile_size": tile, "halo_cache": cached,
                "bytes": tile_bytes(self.program, height, width, (tile[0], tile[1]), cached,
                                    batch, itemsize, training, mask, cpu)
                + self._cast_bytes(dtype)}

    @torch.jit.unused
    def _cast_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the parameter copies a call computing in dtype makes:
        under autocast (a float16 / bfloat16 compute dtype, float32
        parameters) each float32 parameter but the batch norms' is cast
        (_autocast_args), and the copies live through the step."""
        if dtype not in (torch.float16, torch.bfloat16):
            return 0
        keep32 = set(self._float32_ok)
        return sum(p.numel() * 2 for k, p in enumerate(self.stream_params())
                   if p.dtype == torch.float32 and k not in keep32)

    @torch.jit.unused
    def fix_tile(self, height: int, width: int, *, batch: int = 1,
                 dtype: torch.dtype = torch.float32, training: bool = True,
                 image_grad: bool = False, device=None) -> dict:
        """Fix what memory_budget picks for such images (``budget_tile``'s
        arguments and result): from now on the module streams that
        ``tile_size`` with that ``halo_cache`` and picks no more
        (``memory_budget`` becomes 0). What ``TileParallel`` needs, every
        rank streaming the same tiles: the choice is a function of the
        program, the sizes, the dtype, the budget, the device type and the
        parameters' dtypes and sizes (autocast's copies) only, so every
        rank fixes the same tile."""
        choice = self.budget_tile(batch, height, width, dtype, training, image_grad, device)
        self.tile_size = [int(v) for v in choice["tile_size"]]
        self.halo_cache = bool(choice["halo_cache"])
        self._fixed = True
        self.memory_budget = 0
        self._tile_chosen = True
        return choice

    @staticmethod
    def _grad_mask(image_grad: bool, params: List[torch.Tensor]) -> Tuple[bool, ...]:
        return (bool(image_grad),) + tuple(bool(p.requires_grad) for p in params)

    @torch.jit.unused
    def _budget_choice(self, batch: int, height: int, width: int, dtype: torch.dtype,
                       allow_cached: bool, training: bool, mask: Tuple[bool, ...],
                       cpu: bool) -> Tuple[List[int], bool]:
        if not self.memory_budget:
            if getattr(self, "_fixed", False):   # (a module pickled before has none)
                raise ValueError(f"streamcnn: fix_tile fixed this module's tile "
                                 f"({self.tile_size}): it has no memory_budget to choose "
                                 "with any more")
            raise ValueError("streamcnn: this module was built with a tile_size, not a "
                             "memory_budget")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        key = (int(batch), int(height), int(width), itemsize, bool(allow_cached),
               bool(training), mask, bool(cpu), self._cast_bytes(dtype))
        if key not in self._budget_tiles:
            self._budget_tiles[key] = self._named(
                choose_tile, self.program, key[1], key[2], key[0], itemsize, self.memory_budget,
                key[4], self.receptive_field, self.output_stride, key[5], mask, key[7], key[8])
        tile, cached = self._budget_tiles[key]
        return [tile[0], tile[1]], cached

    @torch.jit.unused
    def work(self, height: int, width: int) -> dict:
        """Work of one forward over a height x width image, whole-image vs
        streamed with this tile_size (per batch element): multiply-adds of
        the convolutions / channel linears (``macs_whole``, ``macs_streamed``)
        and elements of the values computed, with every tile computing its
        whole cone (``macs_streamed``, ``recompute`` = macs_streamed /
        macs_whole: the overlap recompute) and with halo caching along the
        rows (``macs_cached``, ``recompute_cached``: only the columns
        overlap); ``strip_elements`` is what the halo cache keeps from the
        forward to the backward. A training step runs the forward twice
        (the backward recomputes it): about (2 + 2) x macs against
        (1 + 2) x macs_whole."""
        mw, ms, ew, es, mc, ec, st = self._named(work_info, self.program, height, width,
                                                 self.tile_size)
        return {"macs_whole": mw, "macs_streamed": ms, "elements_whole": ew,
                "elements_streamed": es, "recompute": ms / mw if mw else 1.0,
                "macs_cached": mc, "elements_cached": ec,
                "recompute_cached": mc / mw if mw else 1.0, "strip_elements": st}

    # -- modes ---------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self._stem[0].training = mode  # its children follow through .module
        # modules traced in a mode keep it (through their own train(): a
        # feature extractor swaps graphs), batch norms / dropouts stay frozen
        for path, traced in zip(self._traced_paths, self._traced_modes):
            self._mode_module(path).train(traced)
        for path in self._mode_paths:
            self._mode_module(path).eval()
        return self

    @torch.jit.unused
    def _named(self, query, *args):
        """A query of the C core whose size errors name the instruction's
        layer."""
        try:
            return query(*args)
        except ValueError as e:
            raise ValueError(_name_instructions(str(e), self._instr_labels)) from None

    @torch.jit.unused
    def _mode_module(self, path: str) -> nn.Module:
        return self._stem[0] if path == "" else self.module.get_submodule(path)

    @torch.jit.unused
    def _check(self, x: torch.Tensor, params: List[torch.Tensor]) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"streamcnn: expected a tensor, got {type(x).__name__}")
        if x.is_nested:
            raise TypeError("streamcnn: the image must be a dense tensor, got a nested "
                            "tensor: stream its images one by one (or pad them to one size)")
        if x.layout != torch.strided:
            raise TypeError(f"streamcnn: the image must be a dense (strided) tensor, got "
                            f"{x.layout}: call x.to_dense()")
        if x.dim() != 4:
            raise ValueError(f"streamcnn: expected an N x C x H x W image, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"streamcnn: the stem expects {self.in_channels} channels, the "
                             f"image has {x.shape[1]} (shape {tuple(x.shape)})")
        if x.dtype not in _IMAGE_DTYPES:
            raise TypeError(f"streamcnn: the image must be uint8, float16, bfloat16, float32 "
                            f"or float64, got {x.dtype}")
        if x.dtype == torch.uint8 and x.requires_grad:
            raise ValueError("streamcnn: a uint8 image cannot require grad")
        want = compute_dtype(x, params)
        half = want in (torch.float16, torch.bfloat16)
        keep32 = set(self._float32_ok)
        for k, p in enumerate(params):
            if p.dtype == want or (half and k in keep32 and p.dtype == torch.float32):
                continue  # batch norms' and mean / std may stay float32 in half
            if x.dtype == torch.uint8:
                raise TypeError(f"streamcnn: with a uint8 image the stem computes in its "
                                f"parameters' dtype, which must be one: found {want} and "
                                f"{p.dtype}")
            if all(q.dtype == p.dtype for q in params[:len(self._param_names)]):
                raise TypeError(f"streamcnn: the image is {x.dtype} but the stem's "
                                f"parameters are {p.dtype}; convert one of them (e.g. "
                                f"x.to({p.dtype}) or module.to({x.dtype}))")
            name = self._param_names[k] if k < len(self._param_names) else "mean / std"
            raise TypeError(f"streamcnn: the image is {x.dtype} but the stem's '{name}' is "
                            f"{p.dtype}: its parameters and the image must share a dtype "
                            f"(module.to({x.dtype}))")
        for p in params:
            if p.device != x.device and not (x.device.type == "cpu"
                                             and p.device.type == "cuda"):
                raise ValueError(f"streamcnn: the image is on {x.device} but the stem's "
                                 f"parameters are on {p.device}")
            if p.device != x.device and x.requires_grad:
                raise ValueError("streamcnn: an image in host memory streamed to the GPU "
                                 "has no gradient; move it to the GPU to differentiate it")
        _check_hooks(self._stem[0])
        _check_settings(self._layer_settings, self._stem[0])
        for name, shape, p in zip(self._param_names, self._param_shapes, params):
            if list(p.shape) != shape:
                raise ValueError(f"streamcnn: the stem's '{name}' has shape {list(p.shape)}, "
                                 f"{shape} when this StreamingModule was built; build a new "
                                 "StreamingModule after changing the stem's layers")
        for path in self._mode_paths:
            m = self._mode_module(path)
            if m.training:
                raise ValueError(f"streamcnn: '{path}' ({type(m).__name__}) was switched to "
                                 "training mode; streaming needs it frozen: call .eval() on it")
        for path, traced in zip(self._traced_paths, self._traced_modes):
            m = self._mode_module(path)
            if m.training != traced:
                now, then = ("training", "eval") if m.training else ("eval", "training")
                name = f"'{path}'" if path else "the stem"
                raise ValueError(f"streamcnn: {name} ({type(m).__name__}) was switched to "
                                 f"{now} mode; what it computes depends on its mode, and it "
                                 f"was traced in {then} mode when this StreamingModule was "
                                 f"built: call .{then.replace('training', 'train')}() on it, "
                                 "or build a new StreamingModule")
        self._named(tiling_info, self.program, x.shape[2], x.shape[3], self.tile_size)

    @staticmethod
    @torch.jit.unused
    def _stem_device(x: torch.Tensor, params: List[torch.Tensor]) -> torch.device:
        """Where the stem runs: its parameters' device (an image in host
        memory is streamed to them), else the image's."""
        return params[0].device if params else x.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self.stream_params()
        if self._norm_only and x.dtype in (torch.float32, torch.float64) and \
                params[0].dtype != x.dtype:
            # a stem without parameters computes in the image's dtype: mean
            # / std follow it, from their exact values
            params = self._norm_tensors(x.dtype, params[0].device)
        if not torch.jit.is_scripting():
            # autocast of the device the stem runs on (a host image's stem
            # is on the GPU: autocast("cuda") applies)
            where = self._stem_device(x, params).type if isinstance(x, torch.Tensor) else ""
            if where in ("cpu", "cuda") and torch.is_autocast_enabled(where):
                return self._forward_autocast(x, params)
            return self._forward_eager(x, params)
        return self._call(x, params, self.halo_cache)

    def _call(self, x: torch.Tensor, params: List[torch.Tensor], cached: bool) -> torch.Tensor:
        """The op: forward_cached when a gradient will be asked for and
        cached (halo_cache) is on (its strips go to the backward), else
        forward."""
        if cached and torch.is_grad_enabled():
            wants = x.requires_grad
            for p in params:
                wants = wants or p.requires_grad
            if wants:
                return torch.ops.streamcnn.forward_cached(x, params, self.program,
                                                          self.tile_size)[0]
        return torch.ops.streamcnn.forward(x, params, self.program, self.tile_size)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor, params: List[torch.Tensor]) -> torch.Tensor:
        """Checks and call options (progress, deterministic) around the op;
        compiled code calls the op alone; an exported program (inference)
        calls forward."""
        cached = self.halo_cache and not torch.compiler.is_exporting()
        if torch.compiler.is_compiling():
            if self.memory_budget:
                if torch.compiler.is_exporting():   # one graph: no eager pick
                    # (also torch.compile's fullgraph=True, which wraps this
                    # message in Dynamo's "Observed exception")
                    if not self._tile_chosen:
                        raise ValueError(self._unchosen_tile(
                            "torch.export (or torch.compile(fullgraph=True))"))
                else:
                    cached = self._pick_tile(x, params, cached)
            return self._call(x, params, cached)
        self._check(x, params)
        if self.memory_budget:
            cached = self._pick_tile(x, params, cached)
        if self.progress or self.deterministic:
            from .ops import call_options
            with call_options(self.progress, self.deterministic):
                return self._call(x, params, cached)
        return self._call(x, params, cached)

    @torch.jit.unused
    @torch.compiler.disable
    def _pick_tile(self, x: torch.Tensor, params: List[torch.Tensor], cached: bool) -> bool:
        """memory_budget: set tile_size to the budget's choice for this call
        (batch, size, dtype, gradients, device); returns whether to cache
        halos. Eager also under torch.compile (a graph break: the choice is
        Python and C code), so compiled calls honour the budget as eager
        ones do."""
        training = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params))
        mask = self._grad_mask(x.requires_grad, params)
        cpu = self._stem_device(x, params).type == "cpu"
        tile, cached = self._budget_choice(x.shape[0], x.shape[2], x.shape[3],
                                           compute_dtype(x, params), cached, training, mask,
                                           cpu)
        self.tile_size = tile
        self._tile_chosen = True
        return cached

    @torch.jit.unused
    def _forward_autocast(self, x: torch.Tensor, params: List[torch.Tensor]) -> torch.Tensor:
        """Under torch.autocast: the stem runs in the autocast dtype (image
        and parameters cast, as autocast casts a convolution's inputs, but
        batch norms keep their float32 parameters, as they do under autocast:
        float16 running variances would overflow past 65504; and mean / std
        stay float32: the image gather normalises in float32 and rounds
        once, as normalising in PyTorch and then casting does); the gradients
        flow back through the casts to the float32 parameters, and the op
        sums weight gradients over tiles in float32. A stem without a
        convolution or Linear, which autocast leaves alone, runs as it is."""
        if not self._autocast_casts:
            return self._forward_eager(x, params)
        dev = self._stem_device(x, params).type
        x, params = self._autocast_args(x, params, dev)
        with torch.autocast(dev, enabled=False):
            return self._forward_eager(x, params)

    @torch.jit.unused
    def _autocast_args(self, x: torch.Tensor, params: List[torch.Tensor],
                       dev: str) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The image and parameters cast as autocast on ``dev`` casts a
        convolution's inputs: float32 to the autocast dtype; float64 (and
        uint8 images) left alone; batch norms and mean / std kept float32
        (see _forward_autocast). The casts are differentiable."""
        dtype = torch.get_autocast_dtype(dev)
        keep32 = set(self._float32_ok)
        params = [p.to(dtype) if p.dtype == torch.float32 and k not in keep32 else p
                  for k, p in enumerate(params)]
        if x.dtype == torch.float32:
            x = x.to(dtype)
        return x, params

    def extra_repr(self) -> str:
        if "output_stride" not in self.__dict__:
            # the constructor raised (a traceback or debugger shows self)
            return "<not built>"
        budget = f"memory_budget={self.memory_budget}, " if self.memory_budget else ""
        return (f"{budget}tile_size={tuple(self.tile_size)}, "
                f"receptive_field={self.receptive_field}, output_stride={self.output_stride}, "
                f"halo_cache={self.halo_cache}")

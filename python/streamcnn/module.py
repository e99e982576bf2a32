"""``StreamingModule``: run an ``nn.Module`` stem tile by tile."""


from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn

from . import ops  # noqa: F401  (registers fake kernels and autograd)
from ._library import program_info, tiling_info
from .program import convert

TileSize = Union[int, Sequence[int]]


def _tensor(t: Optional[torch.Tensor]) -> torch.Tensor:
    """Refine Optional[Tensor] (e.g. Conv2d.bias) for TorchScript."""
    assert t is not None
    return t


def _param_gatherer(stem: nn.Module, refs: List[Tuple[str, str]]) -> fx.GraphModule:
    """A generated module whose forward returns the tensors ``refs`` name, read
    at call time. It holds the stem's own children (same objects), so the
    tensors are shared, never copied, and its state_dict has the stem's keys."""
    graph = fx.Graph()
    installs = [graph.get_attr(name) for name, _ in stem.named_children()]
    outs = [graph.call_function(_tensor, (graph.get_attr(f"{path}.{attr}" if path else attr),))
            for path, attr in refs]
    graph.output(outs)
    gm = fx.GraphModule(stem, graph, class_name="StreamParams")
    for node in installs:  # only needed to install whole children
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _tile_pair(tile_size: TileSize) -> List[int]:
    if isinstance(tile_size, bool):
        raise TypeError("streamcnn: tile_size must be an int or a pair of ints")
    if isinstance(tile_size, int):
        pair = [tile_size, tile_size]
    else:
        try:
            pair = [int(t) for t in tile_size]
        except TypeError:
            raise TypeError("streamcnn: tile_size must be an int or a pair of ints, got "
                            f"{tile_size!r}") from None
        if any(isinstance(t, bool) or int(t) != t for t in tile_size) or len(pair) != 2:
            raise ValueError(f"streamcnn: tile_size must be an int or (rows, cols), got "
                             f"{tile_size!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"streamcnn: tile_size must be positive, got {tile_size!r}")
    return pair


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
        in_channels: channels of the image, when the stem has no Conv2d or
            BatchNorm2d to read them from.

    ``sm(x)`` takes ``x`` of shape ``N x C x H x W`` (float32 or float64,
    the dtype and device of the stem's parameters) of any size and returns
    ``module(x)``. ``loss.backward()`` fills ``.grad`` of the stem's
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

    def __init__(self, module: nn.Module, tile_size: TileSize, *,
                 in_channels: Optional[int] = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"streamcnn: expected an nn.Module, got {type(module).__name__}")
        conv = convert(module, in_channels)
        info = program_info(conv.program)  # validated by the C decoder
        tile = _tile_pair(tile_size)
        if tile[0] < info[2] or tile[1] < info[3]:
            raise ValueError(
                f"streamcnn: tile_size {tuple(tile)} is smaller than what one output "
                f"pixel needs: the minimum tile_size for this stem is {info[2]} x {info[3]} "
                "(its receptive field)")
        self.module = _param_gatherer(module, conv.param_refs)
        self.program: List[int] = conv.program
        self.tile_size: List[int] = tile
        self.in_channels: int = info[0]
        self.out_channels: int = info[1]
        self.receptive_field: Tuple[int, int] = (info[2], info[3])
        self.output_stride: Tuple[int, int] = (info[4], info[5])
        self._mode_paths: List[str] = [p for p, _ in conv.mode_modules]
        self._stem = (module,)  # a tuple: not registered a second time

    @property
    def stem(self) -> nn.Module:
        """The module passed in (its submodules are shared with ``.module``)."""
        return self._stem[0]

    @torch.jit.unused
    def stream_params(self) -> List[torch.Tensor]:
        """The tensors the program indexes, read from the stem now."""
        return self.module()

    @torch.jit.unused
    def tiling(self, height: int, width: int) -> dict:
        """How an image of height x width is tiled (for inspection)."""
        oh, ow, th, tw, nh, nw = tiling_info(self.program, height, width, self.tile_size)
        return {"output": (oh, ow), "output_tile": (th, tw), "tiles": (nh, nw)}

    # -- modes ---------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self._stem[0].training = mode  # its children follow through .module
        for path in self._mode_paths:  # batch norm / dropout stay frozen
            self.module.get_submodule(path).eval()
        return self

    @torch.jit.unused
    def _check(self, x: torch.Tensor, params: List[torch.Tensor]) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"streamcnn: expected a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"streamcnn: expected an N x C x H x W image, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"streamcnn: the stem expects {self.in_channels} channels, the "
                             f"image has {x.shape[1]} (shape {tuple(x.shape)})")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"streamcnn: the image must be float32 or float64, got {x.dtype}")
        for p in params:
            if p.dtype != x.dtype:
                raise TypeError(f"streamcnn: the image is {x.dtype} but the stem's parameters "
                                f"are {p.dtype}; convert one of them (e.g. x.to({p.dtype}) or "
                                f"module.to({x.dtype}))")
            if p.device != x.device:
                raise ValueError(f"streamcnn: the image is on {x.device} but the stem's "
                                 f"parameters are on {p.device}")
        for path in self._mode_paths:
            m = self.module.get_submodule(path)
            if m.training:
                raise ValueError(f"streamcnn: '{path}' ({type(m).__name__}) was switched to "
                                 "training mode; streaming needs it frozen: call .eval() on it")
        tiling_info(self.program, x.shape[2], x.shape[3], self.tile_size)  # size errors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self.module()
        if not torch.jit.is_scripting():
            if not torch.compiler.is_compiling():
                self._check(x, params)
        return torch.ops.streamcnn.forward(x, params, self.program, self.tile_size)

    def extra_repr(self) -> str:
        return (f"tile_size={tuple(self.tile_size)}, receptive_field={self.receptive_field}, "
                f"output_stride={self.output_stride}")

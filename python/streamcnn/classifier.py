"""Slide classifiers: a streamed torchvision stem, the rest of the network,
a global pool and a linear layer -- the model the training application
trains, checkpoints, evaluates, exports and draws heatmaps of.

    model = build_model("resnet18", num_outputs=2, head="max", tile_size=512)
    logits = model(uint8_images)                  # N x num_outputs
    f = model.stem(x); a = model.head.body(f)     # feature map before the pool
    cam = model.head.class_map(a)                 # N x num_outputs x h x w

``model.head(model.stem(x)) == model(x)``; ``head.body`` holds the layers of
the backbone after ``stream_upto`` (run whole-image on the small stem
output), ``head.pool`` the global pool ("max", as in the paper, or "avg"),
``head.fc`` the linear layer.
"""

import re
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import models
from .models import (split_convnext, split_densenet, split_googlenet, split_inception,
                     split_mnasnet, split_mobilenet, split_regnet, split_resnet,
                     split_shufflenet, split_vgg)
from .budget import input_extent
from .module import StreamingModule

# ImageNet statistics in uint8 units (0..255): torchvision's weights expect them.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# torchvision's ResNets (ResNeXt and Wide ResNet are ResNets with grouped or
# wider bottlenecks) and ConvNeXts: every layer of theirs streams exactly.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
           "wide_resnet50_2", "wide_resnet101_2")
CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
# DenseNets: their dense blocks join features with torch.cat along the channels
DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201")
# Inception-v3: its blocks pool with F.avg_pool2d / F.max_pool2d and join
# branches with torch.cat
INCEPTIONS = ("inception_v3",)
# MobileNetV2: inverted residuals (depthwise convolutions, ReLU6, adds)
MOBILENETS = ("mobilenet_v2",)
# ShuffleNetV2: channel splits (chunk) and channel shuffles
SHUFFLENETS = ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
               "shufflenet_v2_x2_0")
# VGG: 3 x 3 convolutions (batch norms in the _bn ones), ReLUs and max pools
VGGS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
# RegNetX: grouped bottlenecks (RegNetY's squeeze-and-excitation does not stream)
REGNETS = ("regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf",
           "regnet_x_8gf", "regnet_x_16gf", "regnet_x_32gf")
# MNASNet: inverted residuals with 3 x 3 and 5 x 5 depthwise convolutions
MNASNETS = ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3")
# GoogLeNet (Inception v1): ceil_mode max pools, branches joined by torch.cat
GOOGLENETS = ("googlenet",)
ARCHITECTURES = RESNETS + CONVNEXTS + DENSENETS + INCEPTIONS + MOBILENETS + SHUFFLENETS + \
    VGGS + REGNETS + MNASNETS + GOOGLENETS
# VGG's features: the layers up to the fourth max pool (stride 16), and the
# last index (the fifth max pool) (test_classifier.py checks them)
_VGG_UPTO = {"vgg11": 16, "vgg11_bn": 22, "vgg13": 20, "vgg13_bn": 28, "vgg16": 24,
             "vgg16_bn": 34, "vgg19": 28, "vgg19_bn": 40}
_VGG_LAST = {"vgg11": 20, "vgg11_bn": 28, "vgg13": 24, "vgg13_bn": 34, "vgg16": 30,
             "vgg16_bn": 43, "vgg19": 36, "vgg19_bn": 52}
POOLS = ("max", "avg")


def _children_but(*names: str):
    """The head's body: the split's rest without its pool / classifier."""
    return lambda rest: nn.Sequential(*[m for n, m in rest.named_children()
                                        if n not in names])


class _Family(NamedTuple):
    """How build_model splits a family of backbones: ``split`` (a
    models.split_* function) gives the stem and the rest, ``body`` the
    head's layers from the rest, ``parts`` (a models.*_parts function) the
    stem's layers alone; ``default_upto`` is the last streamed layer when
    none is given (the stage before the last: stride 16, the head's body
    the last stage on a 1/16 feature map), ``stages`` what stream_upto
    names: the layer names in words, or the last int of ``features``
    (either an arch -> value dict where the archs differ)."""
    archs: Tuple[str, ...]
    split: Callable
    parts: Callable
    body: Callable[[nn.Module], nn.Module]
    default_upto: Union[str, int, Dict[str, int]]
    stages: Union[str, int, Dict[str, int]]

    def of(self, field: str, arch: str) -> Union[str, int]:
        """default_upto or stages of arch."""
        v = getattr(self, field)
        return v[arch] if isinstance(v, dict) else v


_FAMILIES = (
    _Family(RESNETS, split_resnet, models.resnet_parts,
            _children_but("avgpool", "flatten", "fc"), "layer3",
            "maxpool, layer1 .. layer4"),
    # ConvNeXt's classifier is LayerNorm2d, Flatten, Linear: keep the norm
    # in the body (per location, so the class map stays linear in it)
    _Family(CONVNEXTS, split_convnext, models.convnext_parts,
            lambda rest: nn.Sequential(rest.features, rest.classifier[0]), 6, 7),
    _Family(DENSENETS, split_densenet, models.densenet_parts,
            lambda rest: nn.Sequential(rest.features, rest.relu), "denseblock3",
            "pool0, denseblock1, transition1 .. denseblock4"),
    _Family(INCEPTIONS, split_inception, models.inception_parts,
            _children_but("avgpool", "dropout", "flatten", "fc"), "Mixed_6e",
            "maxpool1, Conv2d_3b_1x1 .. Mixed_7c"),
    _Family(MOBILENETS, split_mobilenet, models.mobilenet_parts,
            lambda rest: rest.features, 14, 18),
    _Family(SHUFFLENETS, split_shufflenet, models.shufflenet_parts,
            _children_but("avgpool", "flatten", "fc"), "stage3", "maxpool, stage2 .. conv5"),
    _Family(VGGS, split_vgg, models.vgg_parts, lambda rest: rest.features, _VGG_UPTO,
            _VGG_LAST),
    _Family(REGNETS, split_regnet, models.regnet_parts, lambda rest: rest.trunk_output,
            "block3", "stem, block1 .. block4"),
    _Family(MNASNETS, split_mnasnet, models.mnasnet_parts, lambda rest: rest.layers, 12, 16),
    _Family(GOOGLENETS, split_googlenet, models.googlenet_parts,
            _children_but("avgpool", "dropout", "flatten", "fc"), "inception4e",
            "maxpool1, conv2 .. inception5b"),
)
_FAMILY = {a: f for f in _FAMILIES for a in f.archs}
assert set(_FAMILY) == set(ARCHITECTURES)
# stream_upto is a layer name for these, an int of features for the others
NAMED_STAGES = tuple(a for a in ARCHITECTURES if isinstance(_FAMILY[a].stages, str))
# the largest stream_upto of those with an int: the last index of features
LAST_FEATURE = {a: _FAMILY[a].of("stages", a) for a in ARCHITECTURES if a not in NAMED_STAGES}
DEFAULT_STREAM_UPTO = {a: _FAMILY[a].of("default_upto", a) for a in ARCHITECTURES}
# what the int of those counts: the layers of features (MNASNet's layers)
COUNTED_LAYERS = {a: "layers" if a in MNASNETS else "features" for a in LAST_FEATURE}


class GlobalPool(nn.Module):
    """N x C x h x w -> N x C: the maximum (``"max"``) or the mean (``"avg"``)
    over all locations."""

    def __init__(self, kind: str = "max"):
        super().__init__()
        if kind not in POOLS:
            raise ValueError(f"streamcnn: head pool must be one of {list(POOLS)}, got {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return repr(self.kind)


class Head(nn.Module):
    """``fc(pool(body(features)))``: the part of the classifier after the
    streamed stem."""

    def __init__(self, body: nn.Module, pool: GlobalPool, fc: nn.Linear):
        super().__init__()
        self.body = body
        self.pool = pool
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)))

    def class_map(self, a: torch.Tensor) -> torch.Tensor:
        """The class-activation map of ``a = body(features)``: the linear
        layer applied at every location, N x num_outputs x h x w. For an
        average pool its mean over the locations is the model's output."""
        return torch.einsum("nchw,kc->nkhw", a, self.fc.weight) + \
            self.fc.bias.view(1, -1, 1, 1)


class SlideClassifier(nn.Module):
    """``head(stem(x))`` with ``stem`` a :class:`StreamingModule`."""

    def __init__(self, stem: StreamingModule, head: Head):
        super().__init__()
        self.stem = stem
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


def _backbone(arch: str) -> nn.Module:
    import torchvision.models as tvm
    if arch not in ARCHITECTURES:
        raise ValueError(f"streamcnn: unknown model {arch!r}; choose one of {list(ARCHITECTURES)}")
    if arch in INCEPTIONS + GOOGLENETS:
        # as torchvision builds them for its ImageNet weights: the input
        # transform on (the stem folds it into its mean / std) and the
        # auxiliary classifiers there, so that those weights load (the
        # classifier does not use them)
        model = getattr(tvm, arch)(weights=None, aux_logits=True, transform_input=True,
                                   init_weights=False)
        # torchvision's own initialisation (truncated normal, std 0.1 for
        # Inception-v3, 0.01 for GoogLeNet) counts on batch statistics:
        # with the stem's batch norms frozen at their initial identity, a
        # 512² image's logits were ~3e11 (Inception-v3) and training
        # diverged. He initialisation keeps them ~1.
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        return model
    return getattr(tvm, arch)(weights=None)


_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_weights(model: nn.Module, path: str, arch: str) -> None:
    """Load a local torchvision state_dict (no download). A file that is not
    a state_dict, or whose keys or shapes do not match ``arch``, raises a
    ValueError naming the file and the first differences."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"streamcnn: weights file {path} does not exist") from None
    except Exception as e:
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if glob:        # pickled objects, e.g. torch.save(model)
            raise ValueError(f"streamcnn: weights file {path} holds pickled objects "
                             f"({glob.group(1)}), not a state_dict: save it with "
                             "torch.save(model.state_dict(), path)") from None
        raise ValueError(f"streamcnn: cannot read weights file {path}: not a state_dict "
                         "torch.save wrote") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if arch in DENSENETS and isinstance(state, dict):
        # torchvision's DenseNet files name 'denselayer1.norm.1.weight' what
        # the module calls 'denselayer1.norm1.weight' (torchvision renames
        # them when it loads its weights itself)
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k) if isinstance(k, str) else k: v
                 for k, v in state.items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"streamcnn: weights file {path} is not a state_dict (name -> tensor)")
    own = model.state_dict()
    # batch norm fills in a missing num_batches_tracked (files saved before
    # torch 0.4.1 have none, torchvision's DenseNet weights among them)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: file "
                         f"{tuple(state[k].shape)}, model {tuple(own[k].shape)})")
        raise ValueError(f"streamcnn: weights file {path} does not match {arch}: "
                         + "; ".join(parts))
    model.load_state_dict(state)


def build_model(arch: str, *, num_outputs: int = 2, stream_upto: Union[str, int, None] = None,
                head: str = "max", weights: Optional[str] = None,
                tile_size: Union[int, Sequence[int], None] = None,
                memory_budget: Union[int, str, None] = None,
                mean: Optional[Sequence[float]] = IMAGENET_MEAN,
                std: Optional[Sequence[float]] = IMAGENET_STD,
                halo_cache: bool = True, deterministic: bool = False) -> SlideClassifier:
    """A :class:`SlideClassifier` from a torchvision backbone.

    ``arch``: one of :data:`ARCHITECTURES`; ``weights``: a local torchvision
    state_dict for the whole backbone (its ``fc`` / classifier is replaced
    afterwards; nothing is downloaded); ``stream_upto``: the last streamed
    layer (ResNets: ``"maxpool"``, ``"layer1"`` .. ``"layer4"``; ConvNeXt:
    an int 1 .. 7 of ``features``; DenseNets: ``"pool0"``,
    ``"denseblock1"``, ``"transition1"`` .. ``"denseblock4"``; Inception-v3:
    ``"maxpool1"``, ``"Conv2d_3b_1x1"`` .. ``"Mixed_7c"``; MobileNetV2: an int
    1 .. 18 of ``features``; ShuffleNetV2: ``"maxpool"``, ``"stage2"`` ..
    ``"conv5"``; VGG: an int 1 .. len - 1 of ``features``; RegNetX:
    ``"stem"``, ``"block1"`` .. ``"block4"``; MNASNet: an int 1 .. 16 of
    ``layers``; GoogLeNet: ``"maxpool1"``, ``"conv2"`` .. ``"inception5b"``),
    default :data:`DEFAULT_STREAM_UPTO`;
    ``head``: the global pool, ``"max"`` or ``"avg"``; ``num_outputs``: the
    linear layer's outputs (2 for classification, 1 for regression).
    ``mean`` / ``std`` normalise uint8 images inside the stem (0..255
    units); Inception-v3 and GoogLeNet then apply torchvision's ``transform_input``
    (as with its ImageNet weights: with the default mean / std the stem
    computes ``(x - 127.5) / 127.5``). ``tile_size`` or ``memory_budget``
    tile the stem (when neither is given: :func:`default_tile_size`, 1024
    or a tile of 32 output pixels where the receptive field is larger)."""
    if head not in POOLS:
        raise ValueError(f"streamcnn: head must be one of {list(POOLS)}, got {head!r}")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"streamcnn: num_outputs must be a positive int, got {num_outputs!r}")
    backbone = _backbone(arch)
    if weights is not None:
        load_weights(backbone, weights, arch)
    upto = _stream_upto(arch, stream_upto)
    options = dict(memory_budget=memory_budget, halo_cache=halo_cache,
                   deterministic=deterministic)
    if mean is not None or std is not None:
        options.update(mean=mean, std=std)
    family = _FAMILY[arch]
    stem, rest = family.split(backbone, upto, tile_size, **options)
    body = family.body(rest)
    fc = nn.Linear(_channels(stem, body), num_outputs)
    return SlideClassifier(stem, Head(body, GlobalPool(head), fc))


def _stream_upto(arch: str, stream_upto: Union[str, int, None]) -> Union[str, int]:
    """The last streamed layer of ``arch`` (the default for None): a layer
    name (:data:`NAMED_STAGES`) or an int of ``features`` (``layers`` for
    MNASNet)."""
    upto = DEFAULT_STREAM_UPTO[arch] if stream_upto is None else stream_upto
    if arch in NAMED_STAGES:
        if not isinstance(upto, str):
            raise ValueError(f"streamcnn: stream_upto for {arch} is a layer name "
                             f"({_FAMILY[arch].stages}), got {upto!r}")
        return upto
    if isinstance(upto, str):
        try:
            return int(upto)
        except ValueError:
            raise ValueError(f"streamcnn: stream_upto for {arch} is an int (1 .. "
                             f"{LAST_FEATURE[arch]} of {COUNTED_LAYERS[arch]}), got {upto!r}") from None
    return upto


def default_tile_size(arch: str, stream_upto: Union[str, int, None] = None) -> int:
    """The tile edge :func:`build_model` streams ``arch`` to ``stream_upto``
    in when given neither ``tile_size`` nor ``memory_budget``: 1024, or
    where that gives fewer than 32 output pixels per side, the tile that
    gives 32 (:func:`streamcnn.models.default_tile_size`; worked out on the meta
    device, no weights are made)."""
    upto = _stream_upto(arch, stream_upto)
    return max(models.default_tile_size(_stem_layers(arch, upto)))


def _stem_layers(arch: str, stream_upto: Union[str, int, None] = None) -> nn.Module:
    """The layers :func:`build_model` would stream (its norms frozen, not
    wrapped), made on the meta device: shapes, no weights (RegNet on the
    CPU: torchvision works out its widths with tensors it reads back while
    it makes one; 0.8 s for the 32GF one)."""
    with torch.device("cpu" if arch in REGNETS else "meta"):
        backbone = _backbone(arch)
    return _FAMILY[arch].parts(backbone, _stream_upto(arch, stream_upto))[0]


def _channels(stem: StreamingModule, body: nn.Module) -> int:
    """Channels of body(stem(x)), from a forward of the plain modules on
    the meta device (shapes only: the receptive field's forward itself took
    90 s for ConvNeXt-Large's features[:6], 2824²)."""
    # 32 x 32 stem outputs: enough for the body's own strided layers
    # (Inception-v3's Mixed_7a needs 3 x 3)
    size = [input_extent(r, s, 32) for r, s in zip(stem.receptive_field, stem.output_stride)]
    return int(_meta_forward(stem, body, size).shape[1])


def _meta_forward(stem: StreamingModule, body: nn.Module, size: Sequence[int]) -> torch.Tensor:
    """body(stem.stem(x)) of a 1 x 3 x size image on the meta device (body
    in eval mode)."""
    net = nn.Sequential(stem.stem, body)
    state = {k: torch.empty_like(v, device="meta")
             for k, v in net.state_dict(keep_vars=True).items()}
    was = body.training
    body.eval()
    try:
        with torch.no_grad():
            return torch.func.functional_call(net, state, (torch.zeros(1, 3, *size,
                                                                       device="meta"),))
    finally:
        body.train(was)


def _fits(model: SlideClassifier, size: int) -> bool:
    try:
        y = _meta_forward(model.stem, model.head.body, (size, size))
    except RuntimeError:     # a layer's input smaller than its window
        return False
    return y.shape[2] > 0 and y.shape[3] > 0   # a location for the global pool


def min_image_size(model: SlideClassifier, limit: int = 1 << 16) -> int:
    """The smallest edge of a square image the model takes (each layer's
    input at least its window, a location left for the global pool): 1 for
    a ResNet, 75 for Inception-v3 (found on the meta device). ValueError
    when none up to ``limit`` does."""
    if _fits(model, 1):
        return 1
    hi = 2
    while not _fits(model, hi):
        if hi >= limit:
            raise ValueError(f"streamcnn: the model takes no image of up to {limit} pixels")
        hi = min(2 * hi, limit)
    lo = hi // 2                     # lo fails, hi fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits(model, mid):
            hi = mid
        else:
            lo = mid
    return hi


def split(model: SlideClassifier) -> Tuple[StreamingModule, Head]:
    """``(stem, head)`` of a classifier."""
    return model.stem, model.head

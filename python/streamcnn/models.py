"""Splitting torchvision backbones into a streamed stem and a head."""

from collections import OrderedDict
from typing import Any, List, Optional, Tuple

import torch.nn as nn

from ._library import program_info
from .budget import input_extent
from .module import MIN_OUTPUT_TILE, StreamingModule, TileSize, per_channel_norm
from .program import convert

_RESNET_STAGES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
_DENSENET_STAGES = ["conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1",
                    "denseblock2", "transition2", "denseblock3", "transition3", "denseblock4",
                    "norm5"]
_INCEPTION_STAGES = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"]
_SHUFFLENET_STAGES = ["conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"]
# torchvision's Inception3._transform_input (on for its ImageNet weights):
# channel c of an ImageNet-normalised image becomes x * scale + shift
_INCEPTION_SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
_INCEPTION_SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)
DEFAULT_TILE = 1024


def default_tile_size(stem: nn.Module) -> List[int]:
    """The tile a backbone's stem streams in when neither a tile size nor
    a memory budget is given: 1024 x 1024, or where the stem's receptive
    field is so large that 1024 would give fewer than
    ``MIN_OUTPUT_TILE`` (32) output pixels per side, the tile that gives
    that many (receptive field + 31 x output stride: ResNet-152 to layer3
    1787, ConvNeXt-Tiny's features[:6] 1592, DenseNet-121 to denseblock3
    1527)."""
    info = program_info(convert(stem).program)
    return [max(DEFAULT_TILE, input_extent(info[2 + k], info[4 + k], MIN_OUTPUT_TILE))
            for k in (0, 1)]


def _wrap(stem: nn.Module, tile_size: Optional[TileSize], options: Any) -> StreamingModule:
    """The stem streamed: :func:`default_tile_size` unless a tile size or
    a memory_budget is given."""
    if tile_size is None and options.get("memory_budget") is None:
        tile_size = default_tile_size(stem)
    return StreamingModule(stem, tile_size, **options)


def _freeze_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == \
                "StochasticDepth" or isinstance(m, nn.Dropout):
            m.eval()


def split_resnet(model: nn.Module, stream_upto: str = "layer3",
                 tile_size: Optional[TileSize] = None,
                 **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision ResNet (18/34/50/101/152, ResNeXt, Wide ResNet) into
    ``(streaming_stem, head)`` such that ``head(stem(x))`` computes
    ``model(x)`` (with the stem's batch norms in eval mode).

    The stem is ``conv1 .. stream_upto`` (one of ``"maxpool"``, ``"layer1"`` ..
    ``"layer4"``) wrapped in :class:`StreamingModule`; the head is the rest of
    the network: the remaining layers, the average pool, flatten and ``fc``.
    ``tile_size`` (default :func:`default_tile_size` unless ``memory_budget``
    is given) and the
    keyword ``options`` (``memory_budget``, ``mean``, ``std``,
    ``halo_cache``, ``progress``, ``deterministic``) go to the
    :class:`StreamingModule`.

    Note: the stem's BatchNorm layers are put in eval mode and stay there
    (frozen running statistics; their weight and bias still train): a
    streamed stem cannot use whole-image batch statistics. The head's layers
    follow ``.train()`` / ``.eval()`` as usual. Both share the model's
    modules (no copies), and their state_dict keys keep the torchvision names
    (``module.layer1.0.conv1.weight`` in the stem, ``layer4...``, ``fc...`` in
    the head).
    """
    stem, head = resnet_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def resnet_parts(model: nn.Module, stream_upto: str = "layer3"
                 ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_resnet`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen)."""
    return _staged_parts(model, "ResNet", _RESNET_STAGES, 3, stream_upto,
                         getattr(model, "avgpool", None))


def _staged_parts(model: nn.Module, kind: str, stages: List[str], first: int,
                  stream_upto: str, pool: Optional[nn.Module]
                  ) -> Tuple[nn.Sequential, nn.Sequential]:
    """``(stem, head)`` of a backbone whose forward runs the children
    ``stages`` in order, then ``pool``, flatten and ``fc``: the stem is
    ``stages`` up to ``stream_upto`` (one of ``stages[first:]``), its norms
    frozen; the head the rest."""
    missing = [n for n in stages + ["fc"] if not hasattr(model, n)] + \
        (["avgpool"] if pool is None else [])
    if missing:
        raise ValueError(f"streamcnn: not a torchvision {kind} (missing {missing})")
    if stream_upto not in stages[first:]:
        raise ValueError(f"streamcnn: stream_upto must be one of {stages[first:]}, "
                         f"got {stream_upto!r}")
    k = stages.index(stream_upto) + 1
    stem = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in stages[:k]))
    _freeze_norms(stem)
    head = nn.Sequential(OrderedDict(
        [(n, getattr(model, n)) for n in stages[k:]] +
        [("avgpool", pool), ("flatten", nn.Flatten(1)), ("fc", model.fc)]))
    return stem, head


def split_convnext(model: nn.Module, stream_upto: int = 4,
                   tile_size: Optional[TileSize] = None,
                   **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision ConvNeXt (tiny / small / base / large) into
    ``(streaming_stem, head)`` with ``head(stem(x))`` computing ``model(x)``
    (with stochastic depth off in the stem).

    The stem is ``features[:stream_upto]`` (1 .. 7: the patchify stem, then
    alternating stages and downsampling layers) wrapped in
    :class:`StreamingModule`; the head is ``features[stream_upto:]``, the
    average pool and the classifier. ``tile_size`` and ``options`` as for
    :func:`split_resnet`.

    Note: ConvNeXt normalises with LayerNorm over the channels of each
    pixel, which is local and streams exactly (and trains). The stem's
    stochastic depth is put in eval mode and stays there (it drops whole
    samples at random, which a tiled pass cannot reproduce); the head keeps
    following ``.train()`` / ``.eval()``.
    """
    stem, head = convnext_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def convnext_parts(model: nn.Module, stream_upto: int = 4
                   ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_convnext`'s ``(stem, head)`` with the stem not yet
    streamed (its stochastic depth off)."""
    if not (hasattr(model, "features") and hasattr(model, "avgpool") and
            hasattr(model, "classifier")):
        raise ValueError("streamcnn: not a torchvision ConvNeXt (needs features, avgpool, "
                         "classifier)")
    n = len(model.features)
    if not isinstance(stream_upto, int) or not 1 <= stream_upto < n:
        raise ValueError(f"streamcnn: stream_upto must be an int in [1, {n - 1}], got "
                         f"{stream_upto!r}")
    stem = model.features[:stream_upto]
    _freeze_norms(stem)
    head = nn.Sequential(OrderedDict([("features", model.features[stream_upto:]),
                                      ("avgpool", model.avgpool),
                                      ("classifier", model.classifier)]))
    return stem, head


def split_densenet(model: nn.Module, stream_upto: str = "denseblock3",
                   tile_size: Optional[TileSize] = None,
                   **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision DenseNet (121 / 161 / 169 / 201) into
    ``(streaming_stem, head)`` with ``head(stem(x))`` computing ``model(x)``
    (with the stem's batch norms in eval mode).

    The stem is ``features`` up to ``stream_upto`` (one of ``"pool0"``,
    ``"denseblock1"``, ``"transition1"`` .. ``"denseblock4"``) wrapped in
    :class:`StreamingModule`: the dense blocks' joins are ``torch.cat``
    along the channels, which streams exactly. The head is the rest of
    ``features``, the final ReLU, the average pool and the classifier.
    ``tile_size`` and ``options`` as for :func:`split_resnet`; the stem's
    batch norms are frozen, as there.
    """
    stem, head = densenet_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def densenet_parts(model: nn.Module, stream_upto: str = "denseblock3"
                   ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_densenet`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen)."""
    features = getattr(model, "features", None)
    missing = [n for n in _DENSENET_STAGES if not hasattr(features, n)]
    if not isinstance(features, nn.Sequential) or missing or not hasattr(model, "classifier"):
        raise ValueError("streamcnn: not a torchvision DenseNet (needs features with "
                         f"{_DENSENET_STAGES[0]} .. {_DENSENET_STAGES[-1]}, and classifier)")
    stages = _DENSENET_STAGES[3:-1]
    if stream_upto not in stages:
        raise ValueError(f"streamcnn: stream_upto must be one of {stages}, got {stream_upto!r}")
    names = list(features._modules)
    k = names.index(stream_upto) + 1
    stem = features[:k]
    _freeze_norms(stem)
    # DenseNet.forward: features, relu, adaptive average pool, flatten, classifier
    head = nn.Sequential(OrderedDict([("features", features[k:]), ("relu", nn.ReLU()),
                                      ("avgpool", nn.AdaptiveAvgPool2d(1)),
                                      ("flatten", nn.Flatten(1)),
                                      ("classifier", model.classifier)]))
    return stem, head


def split_inception(model: nn.Module, stream_upto: str = "Mixed_6e",
                    tile_size: Optional[TileSize] = None,
                    **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision Inception-v3 into ``(streaming_stem, head)``
    with ``head(stem(x))`` computing ``model(x)`` in eval mode (the main
    output; the auxiliary classifier is left out).

    The stem is ``Conv2d_1a_3x3 .. stream_upto`` (one of ``"maxpool1"``,
    ``"Conv2d_3b_1x1"`` .. ``"Mixed_7c"``; the default ``"Mixed_6e"`` is
    everything before the stride-32 stage) wrapped in
    :class:`StreamingModule`: the Inception blocks' ``F.avg_pool2d`` /
    ``F.max_pool2d`` and their ``torch.cat`` of branches stream exactly.
    The head is the remaining blocks, the average pool, dropout, flatten
    and ``fc``. ``tile_size`` and ``options`` as for :func:`split_resnet`;
    the stem's batch norms are frozen, as there.

    With ``model.transform_input`` (torchvision sets it with its ImageNet
    weights) the model rescales an ImageNet-normalised image per channel
    before its first layer; the stem does the same, folded into its
    ``mean`` / ``std`` (given ones, e.g. for uint8 images, or none: the
    image is already normalised).
    """
    stem, head = inception_parts(model, stream_upto)
    if getattr(model, "transform_input", False):
        options = dict(options, **_fold_transform_input(options.get("mean"),
                                                        options.get("std")))
    return _wrap(stem, tile_size, options), head


def _fold_transform_input(mean, std) -> dict:
    """mean' / std' with (x - mean') / std' = ((x - mean) / std) * scale + shift
    per channel (torchvision Inception's transform_input after a given
    normalisation)."""
    m, d = (t.tolist() for t in per_channel_norm(mean, std, 3))  # 3: RGB, as Inception takes
    return {"mean": [m[c] - _INCEPTION_SHIFT[c] * d[c] / _INCEPTION_SCALE[c] for c in range(3)],
            "std": [d[c] / _INCEPTION_SCALE[c] for c in range(3)]}


def inception_parts(model: nn.Module, stream_upto: str = "Mixed_6e"
                    ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_inception`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen) and without the input transform."""
    missing = [n for n in _INCEPTION_STAGES + ["avgpool", "fc"] if not hasattr(model, n)]
    if missing:
        raise ValueError(f"streamcnn: not a torchvision Inception-v3 (missing {missing})")
    stages = _INCEPTION_STAGES[3:]
    if stream_upto not in stages:
        raise ValueError(f"streamcnn: stream_upto must be one of {stages}, got {stream_upto!r}")
    k = _INCEPTION_STAGES.index(stream_upto) + 1
    stem = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in _INCEPTION_STAGES[:k]))
    _freeze_norms(stem)
    # Inception3._forward after Mixed_7c: avgpool, dropout, flatten, fc
    head = nn.Sequential(OrderedDict(
        [(n, getattr(model, n)) for n in _INCEPTION_STAGES[k:]] +
        [("avgpool", model.avgpool), ("dropout", getattr(model, "dropout", nn.Identity())),
         ("flatten", nn.Flatten(1)), ("fc", model.fc)]))
    return stem, head


def split_mobilenet(model: nn.Module, stream_upto: int = 14,
                    tile_size: Optional[TileSize] = None,
                    **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision MobileNetV2 into ``(streaming_stem, head)`` with
    ``head(stem(x))`` computing ``model(x)`` (with the stem's batch norms
    in eval mode).

    The stem is ``features[:stream_upto]`` (1 .. 18; the default 14 is
    everything before the stride-32 stage) wrapped in
    :class:`StreamingModule`: inverted residuals (depthwise convolutions,
    ReLU6, residual adds) stream exactly. The head is the rest of
    ``features``, the average pool and the classifier. ``tile_size`` and
    ``options`` as for :func:`split_resnet`; the stem's batch norms are
    frozen, as there.
    """
    stem, head = mobilenet_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def mobilenet_parts(model: nn.Module, stream_upto: int = 14
                    ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_mobilenet`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen)."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not hasattr(model, "classifier") or \
            hasattr(model, "avgpool") or \
            not any(type(m).__name__ == "InvertedResidual" for m in features):
        raise ValueError("streamcnn: not a torchvision MobileNetV2 (needs features of "
                         "inverted residuals, classifier, and no avgpool)")
    n = len(features)
    if not isinstance(stream_upto, int) or not 1 <= stream_upto < n:
        raise ValueError(f"streamcnn: stream_upto must be an int in [1, {n - 1}], got "
                         f"{stream_upto!r}")
    stem = features[:stream_upto]
    _freeze_norms(stem)
    # MobileNetV2.forward: features, adaptive average pool, flatten, classifier
    head = nn.Sequential(OrderedDict([("features", features[stream_upto:]),
                                      ("avgpool", nn.AdaptiveAvgPool2d(1)),
                                      ("flatten", nn.Flatten(1)),
                                      ("classifier", model.classifier)]))
    return stem, head


def split_shufflenet(model: nn.Module, stream_upto: str = "stage3",
                     tile_size: Optional[TileSize] = None,
                     **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision ShuffleNetV2 (x0.5 .. x2.0) into
    ``(streaming_stem, head)`` with ``head(stem(x))`` computing ``model(x)``
    (with the stem's batch norms in eval mode).

    The stem is ``conv1 .. stream_upto`` (one of ``"maxpool"``, ``"stage2"``
    .. ``"stage4"``, ``"conv5"``) wrapped in :class:`StreamingModule`: its
    channel splits and shuffles stream exactly. The head is the rest, the
    average pool and ``fc``. ``tile_size`` and ``options`` as for
    :func:`split_resnet`; the stem's batch norms are frozen, as there.
    """
    stem, head = shufflenet_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def shufflenet_parts(model: nn.Module, stream_upto: str = "stage3"
                     ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_shufflenet`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen)."""
    # ShuffleNetV2._forward_impl: the stages, conv5, the mean over the
    # image, fc
    return _staged_parts(model, "ShuffleNetV2", _SHUFFLENET_STAGES, 1, stream_upto,
                         nn.AdaptiveAvgPool2d(1))

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
_GOOGLENET_STAGES = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
                     "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                     "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"]
_REGNET_STAGES = ["block1", "block2", "block3", "block4"]
# torchvision's Inception3._transform_input and GoogLeNet's (on for their
# ImageNet weights):
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
                         [("avgpool", None), ("flatten", nn.Flatten(1)), ("fc", None)])


def _staged_parts(model: nn.Module, kind: str, stages: List[str], first: int,
                  stream_upto: str, tail: List[Tuple[str, Optional[nn.Module]]]
                  ) -> Tuple[nn.Sequential, nn.Sequential]:
    """``(stem, head)`` of a backbone whose forward runs the children
    ``stages`` in order, then ``tail`` (name, module; None: the model's
    child of that name): the stem is ``stages`` up to ``stream_upto`` (one
    of ``stages[first:]``), its norms frozen; the head the rest."""
    missing = [n for n in stages if not hasattr(model, n)] + \
        [n for n, m in tail if m is None and not hasattr(model, n)]
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
        [(n, getattr(model, n) if m is None else m) for n, m in tail]))
    return stem, head


def _counted_parts(model: nn.Module, features: str, stream_upto: int,
                   tail: List[Tuple[str, Optional[nn.Module]]]
                   ) -> Tuple[nn.Sequential, nn.Sequential]:
    """``(stem, head)`` of a backbone whose forward runs the Sequential
    ``model.<features>``, then ``tail`` (as for :func:`_staged_parts`):
    the stem is its first ``stream_upto`` layers (1 .. len - 1), its norms
    and stochastic depth frozen; the head ``<features>`` from there on,
    then the tail."""
    layers = getattr(model, features)
    n = len(layers)
    if not isinstance(stream_upto, int) or isinstance(stream_upto, bool) or \
            not 1 <= stream_upto < n:
        raise ValueError(f"streamcnn: stream_upto must be an int in [1, {n - 1}], got "
                         f"{stream_upto!r}")
    stem = layers[:stream_upto]
    _freeze_norms(stem)
    head = nn.Sequential(OrderedDict(
        [(features, layers[stream_upto:])] +
        [(name, getattr(model, name) if m is None else m) for name, m in tail]))
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
    if not (isinstance(getattr(model, "features", None), nn.Sequential) and
            hasattr(model, "avgpool") and hasattr(model, "classifier")):
        raise ValueError("streamcnn: not a torchvision ConvNeXt (needs features, avgpool, "
                         "classifier)")
    return _counted_parts(model, "features", stream_upto,
                          [("avgpool", None), ("classifier", None)])


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
    # Inception3._forward after Mixed_7c: avgpool, dropout, flatten, fc
    return _staged_parts(model, "Inception-v3", _INCEPTION_STAGES, 3, stream_upto,
                         _pool_dropout_fc(model))


def _pool_dropout_fc(model: nn.Module) -> List[Tuple[str, Optional[nn.Module]]]:
    """The tail of torchvision's Inception-v3 and GoogLeNet: their average
    pool, dropout (an Identity where the model has none), flatten, fc."""
    return [("avgpool", None), ("dropout", getattr(model, "dropout", nn.Identity())),
            ("flatten", nn.Flatten(1)), ("fc", None)]


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
    # MobileNetV2.forward: features, adaptive average pool, flatten, classifier
    return _counted_parts(model, "features", stream_upto, _mean_classifier())


def _mean_classifier() -> List[Tuple[str, Optional[nn.Module]]]:
    """The tail of torchvision's MobileNetV2 and MNASNet: the mean over the
    image, flatten, their classifier."""
    return [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)),
            ("classifier", None)]


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
                         [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)),
                          ("fc", None)])


def split_vgg(model: nn.Module, stream_upto: int = 24,
              tile_size: Optional[TileSize] = None,
              **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision VGG (11 / 13 / 16 / 19, with or without batch
    norm) into ``(streaming_stem, head)`` with ``head(stem(x))`` computing
    ``model(x)`` (with the stem's batch norms in eval mode).

    The stem is ``features[:stream_upto]`` (1 .. len(features) - 1; the
    default 24 is VGG-16 up to its fourth max pool, stride 16) wrapped in
    :class:`StreamingModule`. The head is the rest of ``features``, the
    average pool, flatten and the classifier. ``tile_size`` and
    ``options`` as for :func:`split_resnet`; the stem's batch norms (the
    ``_bn`` variants) are frozen, as there.
    """
    stem, head = vgg_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def vgg_parts(model: nn.Module, stream_upto: int = 24
              ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_vgg`'s ``(stem, head)`` with the stem not yet streamed
    (its norms frozen)."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not hasattr(model, "avgpool") or \
            not hasattr(model, "classifier") or \
            not all(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d))
                    for m in features):
        raise ValueError("streamcnn: not a torchvision VGG (needs features of convolutions, "
                         "batch norms, ReLUs and max pools, avgpool, classifier)")
    # VGG.forward: features, avgpool, flatten, classifier
    return _counted_parts(model, "features", stream_upto,
                          [("avgpool", None), ("flatten", nn.Flatten(1)), ("classifier", None)])


def split_regnet(model: nn.Module, stream_upto: str = "block3",
                 tile_size: Optional[TileSize] = None,
                 **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision RegNetX (400MF .. 32GF) into
    ``(streaming_stem, head)`` with ``head(stem(x))`` computing ``model(x)``
    (with the stem's batch norms in eval mode).

    The stem is ``stem`` and ``trunk_output`` up to ``stream_upto`` (one of
    ``"stem"``, ``"block1"`` .. ``"block4"``) wrapped in
    :class:`StreamingModule`: its grouped bottlenecks and residual adds
    stream exactly. The head is the rest of ``trunk_output``, the average
    pool, flatten and ``fc``. ``tile_size`` and ``options`` as for
    :func:`split_resnet`; the stem's batch norms are frozen, as there.
    RegNetY is refused: its squeeze-and-excitation pools the whole image.
    """
    stem, head = regnet_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def regnet_parts(model: nn.Module, stream_upto: str = "block3"
                 ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_regnet`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen)."""
    trunk = getattr(model, "trunk_output", None)
    if not isinstance(trunk, nn.Sequential) or list(trunk._modules) != _REGNET_STAGES or \
            not all(hasattr(model, n) for n in ("stem", "avgpool", "fc")):
        raise ValueError("streamcnn: not a torchvision RegNet (needs stem, trunk_output of "
                         f"{_REGNET_STAGES}, avgpool, fc)")
    stages = ["stem"] + _REGNET_STAGES
    if stream_upto not in stages:
        raise ValueError(f"streamcnn: stream_upto must be one of {stages}, got {stream_upto!r}")
    k = stages.index(stream_upto)         # blocks in the stem
    stem = nn.Sequential(OrderedDict([("stem", model.stem)] +
                                     ([("trunk_output", trunk[:k])] if k else [])))
    _freeze_norms(stem)
    # RegNet.forward: stem, trunk_output, avgpool, flatten, fc
    head = nn.Sequential(OrderedDict([("trunk_output", trunk[k:]), ("avgpool", model.avgpool),
                                      ("flatten", nn.Flatten(1)), ("fc", model.fc)]))
    return stem, head


def split_mnasnet(model: nn.Module, stream_upto: int = 12,
                  tile_size: Optional[TileSize] = None,
                  **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision MNASNet (0.5 / 0.75 / 1.0 / 1.3) into
    ``(streaming_stem, head)`` with ``head(stem(x))`` computing ``model(x)``
    (with the stem's batch norms in eval mode).

    The stem is ``layers[:stream_upto]`` (1 .. 16; the default 12 is
    everything before the stride-32 stacks) wrapped in
    :class:`StreamingModule`: inverted residuals (depthwise convolutions,
    5 x 5 ones among them, residual adds) stream exactly. The head is the
    rest of ``layers``, the mean over the image and the classifier.
    ``tile_size`` and ``options`` as for :func:`split_resnet`; the stem's
    batch norms are frozen, as there.
    """
    stem, head = mnasnet_parts(model, stream_upto)
    return _wrap(stem, tile_size, options), head


def mnasnet_parts(model: nn.Module, stream_upto: int = 12
                  ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_mnasnet`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.Sequential) or not hasattr(model, "classifier") or \
            not any(type(m).__name__ == "_InvertedResidual" for m in layers.modules()):
        raise ValueError("streamcnn: not a torchvision MNASNet (needs layers of inverted "
                         "residuals, classifier)")
    # MNASNet.forward: layers, the mean over the image, classifier
    return _counted_parts(model, "layers", stream_upto, _mean_classifier())


def split_googlenet(model: nn.Module, stream_upto: str = "inception4e",
                    tile_size: Optional[TileSize] = None,
                    **options: Any) -> Tuple[StreamingModule, nn.Sequential]:
    """Split a torchvision GoogLeNet (Inception v1) into
    ``(streaming_stem, head)`` with ``head(stem(x))`` computing ``model(x)``
    in eval mode (the main output; the auxiliary classifiers are left out).

    The stem is ``conv1 .. stream_upto`` (one of ``"maxpool1"``, ``"conv2"``
    .. ``"inception5b"``; the default ``"inception4e"`` is everything before
    the stride-32 stage) wrapped in :class:`StreamingModule`: its
    ``ceil_mode`` max pools and the ``torch.cat`` of its branches stream
    exactly. The head is the remaining layers, the average pool, dropout,
    flatten and ``fc``. ``tile_size`` and ``options`` as for
    :func:`split_resnet`; the stem's batch norms are frozen, as there.
    ``model.transform_input`` (set with torchvision's ImageNet weights) is
    folded into the stem's ``mean`` / ``std`` as for
    :func:`split_inception`.
    """
    stem, head = googlenet_parts(model, stream_upto)
    if getattr(model, "transform_input", False):
        options = dict(options, **_fold_transform_input(options.get("mean"),
                                                        options.get("std")))
    return _wrap(stem, tile_size, options), head


def googlenet_parts(model: nn.Module, stream_upto: str = "inception4e"
                    ) -> Tuple[nn.Sequential, nn.Sequential]:
    """:func:`split_googlenet`'s ``(stem, head)`` with the stem not yet
    streamed (its norms frozen) and without the input transform."""
    # GoogLeNet._forward after inception5b: avgpool, flatten, dropout, fc
    # (dropout before or after flatten: the same values)
    return _staged_parts(model, "GoogLeNet", _GOOGLENET_STAGES, 1, stream_upto,
                         _pool_dropout_fc(model))

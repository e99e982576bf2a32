"""Work accounting (sc_work_info / StreamingModule.work): the halo
recompute overhead of a tiling, against hand counts."""

import pytest
import torch.nn as nn

import streamcnn


def test_single_conv_counts():
    # 3x3 conv, 4 -> 8 channels, stride 1, no padding: 30x40 -> 28x38
    sm = streamcnn.StreamingModule(nn.Conv2d(4, 8, 3), 12)
    w = sm.work(30, 40)
    assert w["macs_whole"] == 28 * 38 * 8 * 4 * 9
    assert w["elements_whole"] == 28 * 38 * 8
    # a pointwise-free stem: output tiles of 10 x 10 (balanced: 28 -> 10+10+8
    # is 3 tiles of ceil(28/3) = 10; 38 -> 4 tiles of 10) recompute nothing
    assert w["macs_streamed"] == w["macs_whole"] and w["recompute"] == 1.0


def test_recompute_of_a_two_layer_stem():
    # two 3x3 convs: each output tile of t rows needs t + 2 rows of the
    # middle value; rows 30 -> 28 -> 26, tile 12 -> output tiles of 9 (26 =
    # 9+9+8 balanced), middle spans 11, 11, 10 -> 32 rows instead of 28
    stem = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 5, 3))
    sm = streamcnn.StreamingModule(stem, 13)
    assert sm.tiling(30, 30)["output_tile"] == (9, 9)
    w = sm.work(30, 30)
    mid = 32 * 32 * 3 * 2 * 9
    out = 26 * 26 * 5 * 3 * 9
    assert w["macs_whole"] == 28 * 28 * 3 * 2 * 9 + out
    assert w["macs_streamed"] == mid + out
    assert w["recompute"] > 1.0
    # a tile holding the whole image: no recompute
    assert streamcnn.StreamingModule(stem, 64).work(30, 30)["recompute"] == 1.0


def test_work_bad_sizes():
    sm = streamcnn.StreamingModule(nn.Conv2d(1, 1, 5), 8)
    with pytest.raises(ValueError):
        sm.work(3, 3)


def _strided():
    return nn.Sequential(nn.Conv2d(3, 4, 7, stride=2, padding=3), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, stride=2, padding=1))


def test_small_tiles_warn():
    """A tile that gives fewer than 8 output pixels per side is exact but
    slow: a UserWarning says so and names the tile that gives 32; none for
    larger tiles, a memory budget or a stem without stride."""
    import warnings
    sm = streamcnn.StreamingModule(_strided(), memory_budget="1GB")
    rf, s = sm.receptive_field, sm.output_stride
    assert s == (8, 8)
    good = rf[0] + 31 * s[0]
    with pytest.warns(UserWarning, match=rf"tile_size \({rf[0]}, {rf[1] + 16}\) gives 1 x 3 "
                      rf"output pixels per tile \(receptive field {rf[0]} x {rf[1]}, output "
                      rf"stride 8 x 8\): .* tile_size \({good}, {good}\) gives 32 x 32"):
        streamcnn.StreamingModule(_strided(), (rf[0], rf[1] + 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        streamcnn.StreamingModule(_strided(), rf[0] + 7 * 8)
        streamcnn.StreamingModule(_strided(), memory_budget="1MB")
        streamcnn.StreamingModule(nn.Conv2d(3, 3, 5), 5)
    with pytest.warns(UserWarning, match="gives 7 x 7 output pixels"):
        streamcnn.StreamingModule(_strided(), rf[0] + 6 * 8)

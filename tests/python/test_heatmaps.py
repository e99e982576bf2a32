"""streamcnn.heatmaps against whole-image autograd, and the streaming TIFF
writer against the in-memory pyramid."""

import functools
import os

import pytest
import torch
import torch.nn.functional as F

import streamcnn
from streamcnn import heatmaps as hm
from streamcnn.classifier import build_model

from conftest import rel_err

pytestmark = pytest.mark.skipif(not streamcnn.slide.available(),
                                reason="built without OpenSlide / libtiff")

MEAN, STD = (124.0, 116.0, 104.0), (58.0, 57.0, 57.0)


@functools.lru_cache(maxsize=None)
def _model(head="max", upto="layer1", outputs=2):
    """One model per configuration for the whole file (building is slow)."""
    torch.manual_seed(0)
    m = build_model("resnet18", num_outputs=outputs, stream_upto=upto, head=head,
                    tile_size=128, mean=MEAN,
                    std=STD).double().eval()
    return m


def _whole(m, x):
    """logits of the plain modules on a float64 image (normalised as the stem does)."""
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return m.head(m.stem.stem((x - mean) / std))


def _reference_saliency(m, img, target=None):
    x = img.double().requires_grad_(True)
    logits = _whole(m, x)
    t = logits.argmax(1) if target is None else torch.full((img.shape[0],), target)
    logits.gather(1, t[:, None]).sum().backward()
    return x.grad.abs().amax(dim=1), logits.detach(), t


def test_cone_matches_decoder():
    m = _model(upto="layer2")
    c = hm.stem_cone(m.stem)
    assert c.receptive_field == m.stem.receptive_field
    assert c.stride == m.stem.output_stride
    full = hm.map_cone(m.stem, m.head)  # stem + layer3 + layer4
    assert full.stride == (32, 32)


def test_cone_info_resnet_conv1_pool():
    """The unclipped cone of ResNet's conv1 (7, stride 2, padding 3) and
    max pool (3, 2, 1), by hand: output 0 reads rows [-5, 6)."""
    stem = streamcnn.StreamingModule(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 7, 2, 3), torch.nn.MaxPool2d(3, 2, 1)), tile_size=64)
    assert streamcnn.cone_info(stem.program, (0, 1), (0, 1)) == [-5, 6, -5, 6]
    # rows [-2, 3): conv rows [-5, 6), image [-13, 14); columns [10, 12):
    # conv [19, 24), image [35, 50)
    assert streamcnn.cone_info(stem.program, (-2, 3), (10, 12)) == [-13, 14, 35, 50]
    assert hm.program_cone(stem.program) == hm.Cone((4, 4), (5, 5), (6, 6))
    with pytest.raises(ValueError, match=r"output rows \[3, 3\) is not a non-empty range"):
        streamcnn.cone_info(stem.program, (3, 3), (0, 1))
    with pytest.raises(ValueError, match="magic"):
        streamcnn.cone_info([1, 2, 3, 4, 5], (0, 1), (0, 1))


class _Branch(torch.nn.Module):
    """x + conv(x) and a strided conv: a residual hull (the branch reads
    more rows than the identity)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(2, 3, 3, 2, 1)
        self.b = torch.nn.Conv2d(3, 3, (5, 3), 1, (4, 1), dilation=(2, 1))
        self.c = torch.nn.AvgPool2d(3, 2, 1)

    def forward(self, x):
        x = self.a(x)
        return self.c(x + self.b(x))


@pytest.mark.parametrize("box", [((0, 1), (0, 1)), ((2, 4), (1, 3)), ((5, 7), (3, 4)),
                                 ((6, 7), (0, 4))])
def test_cone_info_is_the_gradient_support(box):
    """For a linear stem (no max pool, no activation; random weights) the
    image pixels an output box depends on are where the box's gradient is
    non-zero: exactly its cone clipped to the image (whole-image autograd,
    float64; boxes in the interior and at every border)."""
    torch.manual_seed(0)
    net = _Branch().double().eval()
    stem = streamcnn.StreamingModule(net, tile_size=32)
    x = torch.randn(1, 2, 27, 15, dtype=torch.float64, requires_grad=True)
    y = net(x)
    (rows, cols) = box
    assert rows[1] <= y.shape[2] and cols[1] <= y.shape[3]
    y[:, :, rows[0]:rows[1], cols[0]:cols[1]].sum().backward()
    nz = x.grad.abs().sum(dim=(0, 1)) != 0
    r = torch.nonzero(nz.any(dim=1)).flatten()
    c = torch.nonzero(nz.any(dim=0)).flatten()
    r0, r1, c0, c1 = streamcnn.cone_info(stem.program, rows, cols)
    assert (int(r[0]), int(r[-1]) + 1) == (max(r0, 0), min(r1, 27))
    assert (int(c[0]), int(c[-1]) + 1) == (max(c0, 0), min(c1, 15))


def test_cone_info_affine_on_random_stems():
    """On random stems (all supported layers): the cone of rows [lo, hi) is
    [lo S - before, (hi - 1) S + after) and output 0's is one receptive
    field long, as the C decoder's receptive field and stride say."""
    import random
    from test_equivalence import random_stem
    for seed in range(12):
        stem = streamcnn.StreamingModule(random_stem(seed).eval(), tile_size=512, in_channels=3)
        cone = hm.program_cone(stem.program)
        assert cone.receptive_field == stem.receptive_field
        assert cone.stride == stem.output_stride
        rng = random.Random(seed)
        for _ in range(5):
            lo, c = rng.randint(-40, 40), rng.randint(-40, 40)
            hi, d = lo + rng.randint(1, 9), c + rng.randint(1, 9)
            s, b, a = cone.stride, cone.before, cone.after
            assert streamcnn.cone_info(stem.program, (lo, hi), (c, d)) == [
                lo * s[0] - b[0], (hi - 1) * s[0] + a[0], c * s[1] - b[1], (d - 1) * s[1] + a[1]]


@pytest.mark.parametrize("band_rows", [12, 40, 10_000])
def test_saliency_uint8_equals_autograd(band_rows):
    """The band scheme (uint8 image, float64 bands) is the whole-image
    input gradient, with bands cut inside the halo (12, 40 rows: many
    overlapping bands) or one band."""
    m = _model()
    img = torch.randint(0, 256, (1, 3, 77, 61), dtype=torch.uint8)
    ref, logits, t = _reference_saliency(m, img)
    n_out = m.stem(img).shape[2]
    assert len(hm.band_plan(hm.stem_cone(m.stem), 77, n_out, band_rows)) == \
        (1 if band_rows > 1000 else -(-n_out // max(1, band_rows // 4)))
    sal, lg, tt = hm.saliency(m.stem, m.head, img, band_rows=band_rows, return_logits=True)
    assert sal.dtype == torch.float64 and sal.shape == ref.shape
    assert rel_err(sal, ref) <= 1e-10
    assert rel_err(lg, logits) <= 1e-10 and torch.equal(tt, t)


def test_saliency_float_image_target_and_pool():
    """A float64 image, an explicit target, an average head, and the map
    max-pooled on the fly (pool 3, bands not aligned to it)."""
    m = _model(head="avg")
    img = torch.rand(3, 70, 53, dtype=torch.float64) * 255
    ref, _, _ = _reference_saliency(m, img[None], target=0)
    sal = hm.saliency(m.stem, m.head, img, target=0, band_rows=20)
    assert rel_err(sal, ref) <= 1e-10
    pooled = hm.saliency(m.stem, m.head, img, target=0, band_rows=20, pool=3)
    assert rel_err(pooled, F.max_pool2d(ref[None], 3, 3, ceil_mode=True)[0]) <= 1e-10
    # a target of another length than the batch (it said "needs 1 or 1 entries")
    with pytest.raises(ValueError, match=r"target must be an int, got 2 entries for a batch "
                                         r"of 1"):
        hm.saliency(m.stem, m.head, img, target=[0, 1])
    # a class name, a float, a bool: refused naming target (a name was
    # torch's "invalid data type 'str'", 1.7 and True were cut to 1)
    import numpy as np
    for bad in ("tumour", 1.7, True, [0.0], torch.tensor([1.0])):
        with pytest.raises(TypeError, match="target must be an output index"):
            hm.saliency(m.stem, m.head, img, target=bad, band_rows=20)
    for ok in (np.int64(0), torch.tensor(0), [0], (0,)):
        assert torch.equal(hm.saliency(m.stem, m.head, img, target=ok, band_rows=20), sal)
    # features of another shape than stem(image) (an expand error deep inside)
    f = m.stem(img[None])
    assert torch.equal(hm.saliency(m.stem, m.head, img, target=0, band_rows=20, features=f),
                       sal)
    with pytest.raises(ValueError, match=r"features must be stem\(image\), 1 x \d+ x \d+ x "
                                         r"\d+ for this image, got \(1, \d+, 5, 5\)"):
        hm.saliency(m.stem, m.head, img, target=0, features=f[:, :, :5, :5])
    with pytest.raises(ValueError, match="band_rows must be a positive int, got True"):
        hm.saliency(m.stem, m.head, img, target=0, band_rows=True)


def test_saliency_misaligned_bands_would_fail(monkeypatch):
    """The test above can fail: bands one stride short of their outputs'
    cones (too little halo) give a different gradient."""
    m = _model()
    img = torch.randint(0, 256, (1, 3, 77, 61), dtype=torch.uint8)
    ref, _, _ = _reference_saliency(m, img)
    real = hm.band_plan

    def shifted(cone, h, o, br):
        return [hm.BandPlan(b.o0, b.o1, b.r0 + cone.stride[0] if b.r0 else 0, b.r1)
                for b in real(cone, h, o, br)]
    monkeypatch.setattr(hm, "band_plan", shifted)
    assert rel_err(hm.saliency(m.stem, m.head, img, band_rows=12), ref) > 1e-3


@pytest.mark.parametrize("head", ["max", "avg"])
def test_cam_equals_whole_image(head):
    m = _model(head=head)
    img = torch.randint(0, 256, (2, 3, 96, 80), dtype=torch.uint8)
    r = hm.cam(m.stem, m.head, img)
    with torch.no_grad():
        a = m.head.body(m.stem.stem((img.double() - torch.tensor(MEAN, dtype=torch.float64)
                                     .view(1, 3, 1, 1)) / torch.tensor(STD, dtype=torch.float64)
                                    .view(1, 3, 1, 1)))
        logits = m.head.fc(m.head.pool(a))
        ref = m.head.class_map(a)[torch.arange(2), logits.argmax(1)]
    assert rel_err(r.features, ref) <= 1e-10
    assert rel_err(r.logits, logits) <= 1e-10
    assert r.cam.shape == (2, 96, 80)
    assert rel_err(r.cam, hm.upsample_map(ref, r.cone, (96, 80))) <= 1e-6
    bias = m.head.fc.bias[r.target]
    if head == "max":          # the winners decompose the logit
        got = r.winners.sum(dim=(1, 2)) + bias
        assert rel_err(got, logits.gather(1, r.target[:, None])[:, 0]) <= 1e-10
        assert int((r.winners != 0).sum()) <= 2 * a.shape[1]
    else:                      # an average head's logit is the map's mean
        assert r.winners is None
        assert rel_err(r.features.mean(dim=(1, 2)), logits.gather(1, r.target[:, None])[:, 0]) \
            <= 1e-10


def test_upsample_window_equals_slice():
    """A window of the upsampled map (origin=) is the same window of the
    whole upsampled map: the TIFF writer upsamples band by band."""
    cone = hm.Cone((16, 16), (40, 40), (41, 41))
    m = torch.randn(2, 7, 9, dtype=torch.float64)
    whole = hm.upsample_map(m, cone, (112, 144))
    part = hm.upsample_map(m, cone, (30, 50), origin=(37, 61))
    assert torch.equal(part, whole[:, 37:67, 61:111])
    # each location's value sits at its receptive field's centre
    cy, cx = cone.center
    assert abs(whole[0, int(cy) + 16 * 3, int(cx) + 16 * 4].item() - m[0, 3, 4].item()) < 0.1 * \
        m.abs().max().item()
    # bad arguments are named (a 3-entry size, e.g. an image's C x H x W,
    # was read as its first two; a negative one was a torch.arange error)
    for kw, says in (({"size": (-5, 10)}, r"size \(rows, cols\) must be positive"),
                     ({"size": (3, 112, 144)}, r"size \(rows, cols\) must be 2 ints"),
                     ({"size": (112.5, 144)}, r"size \(rows, cols\) must be whole numbers of pixels"),
                     ({"size": (112, 144), "origin": 3}, r"origin \(row, col\) must be two"),
                     ({"size": (112, 144), "origin": (0, float("nan"))}, "origin"),
                     ({"size": (112, 144), "scale": 0}, "scale must be a positive number"),
                     ({"size": (112, 144), "scale": -1.0}, "scale must be a positive number")):
        with pytest.raises(ValueError, match=says):
            hm.upsample_map(m, cone, **kw)
    with pytest.raises(ValueError, match="the map must be h x w or N x h x w"):
        hm.upsample_map(m[None], cone, (112, 144))
    import numpy as np
    assert torch.equal(hm.upsample_map(m, cone, (np.int64(112), torch.tensor(144)),
                                       origin=(np.float64(0), 0)), whole)


def test_display_helpers():
    m = torch.arange(100, dtype=torch.float32).view(10, 10)
    n = hm.normalize(m, 0, 100)
    assert n.min() == 0 and n.max() == 1
    assert torch.equal(hm.normalize(torch.ones(4, 4)), torch.zeros(4, 4))
    # percentiles outside 0 .. 100 or the wrong way round are named (200
    # was torch.quantile's error, (99, 1) gave zeros)
    for lo, hi, says in ((200, 300, "low must be a percentile in 0 .. 100"),
                         (1, 101, "high must be a percentile in 0 .. 100"),
                         (99, 1, "the wrong way round")):
        with pytest.raises(ValueError, match=says):
            hm.normalize(m, lo, hi)
    s = hm.smooth(m, 1.0)
    assert s.shape == m.shape and abs(s.mean().item() - m.mean().item()) < 1e-3
    rgb = hm.colorize(n)
    assert rgb.shape == (10, 10, 3) and rgb.dtype == torch.uint8


# -- the streaming TIFF writer ------------------------------------------------------


def test_pyramid_writer_levels_exact(tmp_path):
    from streamcnn.data.synthetic import pyramid
    from streamcnn.tiff import PyramidWriter
    img = torch.randint(0, 256, (776, 1100, 3), dtype=torch.uint8)
    path = tmp_path / "m.tif"
    with PyramidWriter(path, 1100, 776, mpp=0.5, tile=256) as w:
        for r in range(0, 776, 100):       # bands not aligned to the tiles
            w.write(img[r:r + 100])
    assert sorted(os.listdir(tmp_path)) == ["m.tif"]   # no temporaries left
    # the mode open() gives (0644 under umask 022), not mkstemp's 0600:
    # viewers run by other users open the map
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    ref = pyramid(img)
    with streamcnn.Slide(path) as s:
        assert s.level_dimensions == [(lv.shape[1], lv.shape[0]) for lv in ref]
        assert s.mpp == (0.5, 0.5)
        for lvl in range(s.level_count):
            got = s.read_region((0, 0), lvl, s.level_dimensions[lvl], channels_last=True)
            assert torch.equal(got, ref[lvl]), lvl


def test_pyramid_writer_errors(tmp_path):
    from streamcnn.tiff import PyramidWriter
    w = PyramidWriter(tmp_path / "a.tif", 64, 40, tile=16)
    w.write(torch.zeros(10, 64, 3, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="got 10 of its 40 rows"):
        w.close()
    w = PyramidWriter(tmp_path / "b.tif", 64, 40, tile=16)
    with pytest.raises(RuntimeError, match="rows written"):
        w.write(torch.zeros(41, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="r x 64 x 3"):
        PyramidWriter(tmp_path / "c.tif", 64, 40, tile=16).write(
            torch.zeros(4, 63, 3, dtype=torch.uint8))
    with pytest.raises(KeyError):
        with PyramidWriter(tmp_path / "d.tif", 64, 40, tile=16) as w:
            w.write(torch.zeros(4, 64, 3, dtype=torch.uint8))
            raise KeyError("boom")
    with pytest.raises(ValueError, match="multiple of 16"):
        PyramidWriter(tmp_path / "e.tif", 64, 40, tile=20)
    with pytest.raises((ValueError, OSError)):
        PyramidWriter(tmp_path / "no" / "such" / "f.tif", 64, 40)
    import gc
    gc.collect()                # c.tif's writer was dropped unclosed: aborted
    assert os.listdir(tmp_path) == []   # nothing partial, no temporaries

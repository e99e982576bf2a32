"""Whole-slide reading (OpenSlide through the C reader) against synthetic
slides whose pixels the tests know exactly."""

import gc
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import streamcnn
from streamcnn import Slide
from streamcnn.data import synthetic

HAVE = streamcnn.slide.available()
needs = pytest.mark.skipif(
    not HAVE, reason="streamcnn built without OpenSlide (libopenslide-dev missing)")


def test_built_with_openslide_when_installed():
    """A system with OpenSlide must give a build that reads slides: the skip
    above may not hide a build that failed to find it."""
    if shutil.which("pkg-config") is None:
        pytest.skip("no pkg-config to ask whether OpenSlide is installed")
    installed = subprocess.run(["pkg-config", "--exists", "openslide"]).returncode == 0
    if installed:
        assert streamcnn.slide.available()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    out = {}
    # extents divisible by 8: integer downsamples, exact reduced levels;
    # deflate is lossless; 1336 / 128 and 904 / 128 leave partial tiles
    out["deflate"] = (str(d / "a.tif"),
                      synthetic.make_slide(str(d / "a.tif"), 1336, 904, seed=3, tile=128,
                                           min_size=200))
    out["odd"] = (str(d / "o.tif"),
                  synthetic.make_slide(str(d / "o.tif"), 1333, 1101, seed=6, tile=128,
                                       min_size=200))
    out["svs"] = (str(d / "b.svs"),
                  synthetic.make_slide(str(d / "b.svs"), 1200, 800, seed=4, mpp=0.25,
                                       tile=256, min_size=200))
    out["jpeg"] = (str(d / "c.tif"),
                   synthetic.make_slide(str(d / "c.tif"), 2100, 1500, seed=5, tile=256,
                                        compression="jpeg"))
    return out


def hwc(levels, level):
    return levels[level].permute(2, 0, 1)


@needs
def test_metadata(slides):
    path, levels = slides["deflate"]
    with Slide(path) as s:
        assert s.level_count == len(levels) == 4
        assert s.level_dimensions == [(lv.shape[1], lv.shape[0]) for lv in levels]
        assert s.level_downsamples[0] == 1.0
        assert s.level_downsamples[1:] == [2.0, 4.0, 8.0]
        assert s.vendor == "generic-tiff"
        assert s.mpp is None
        assert s.background == (255, 255, 255)
        assert "openslide.vendor" in s.properties
        assert "Slide(" in repr(s)


@needs
def test_pixel_exact_level0_and_reduced(slides):
    path, levels = slides["deflate"]
    with Slide(path) as s:
        for level in range(s.level_count):
            w, h = s.level_dimensions[level]
            whole = s.read_region((0, 0), level, (w, h))
            assert whole.dtype == torch.uint8 and whole.shape == (3, h, w)
            assert torch.equal(whole, hwc(levels, level)), level
            last = s.read_region((0, 0), level, (w, h), channels_last=True)
            assert torch.equal(last, levels[level])
        # sub-regions at odd offsets that cut tiles and chunks
        assert torch.equal(s.read_region((77, 131), 0, (601, 555), threads=3),
                           hwc(levels, 0)[:, 131:686, 77:678])
        ds = round(s.level_downsamples[1])
        assert torch.equal(s.read_region((34 * ds, 12 * ds), 1, (300, 201)),
                           hwc(levels, 1)[:, 12:213, 34:334])
        assert torch.equal(s.read(level=1, box=(34 * ds, 12 * ds, 300 * ds, 201 * ds)),
                           hwc(levels, 1)[:, 12:213, 34:334])


@needs
def test_non_integer_downsample(slides):
    """Odd level-0 extents: OpenSlide's downsamples are not integers and it
    resamples at a sub-pixel offset; the chunked read is close to the true
    level and the same for any thread count."""
    path, levels = slides["odd"]
    with Slide(path) as s:
        assert s.level_downsamples[1] != 2.0
        for level in (1, 2):
            w, h = s.level_dimensions[level]
            one = s.read_region((0, 0), level, (w, h), threads=1)
            assert torch.equal(s.read_region((0, 0), level, (w, h), threads=4), one)
            # the first 512 x 512 chunk is where the region starts: exact
            assert torch.equal(one[:, :512, :512], hwc(levels, level)[:, :512, :512])
            err = (one.float() - hwc(levels, level).float()).abs()
            assert err.mean() < 2, err.mean()


@needs
@pytest.mark.parametrize("name", ["odd", "jpeg"])
def test_parts_equal_the_whole_read(slides, name):
    """A part (box) of a region, of a resampled read, equals the same part of
    the whole read bit for bit: also at levels whose downsample is not an
    integer (where OpenSlide paints each chunk at a sub-pixel offset) and
    through the resampler. What a tile-parallel rank reads rests on it."""
    path, _ = slides[name]
    g = torch.Generator().manual_seed(11)
    with Slide(path) as s:
        for level in range(min(3, s.level_count)):
            w, h = s.level_dimensions[level]
            loc = (-37, 21)
            whole = s.read_region(loc, level, (w, h), threads=2)
            for _ in range(6):
                bx, by = (int(torch.randint(0, n, (1,), generator=g)) for n in (w, h))
                bw = int(torch.randint(1, w - bx + 1, (1,), generator=g))
                bh = int(torch.randint(1, h - by + 1, (1,), generator=g))
                part = s.read_region(loc, level, (w, h), box=(bx, by, bw, bh),
                                     threads=int(torch.randint(1, 4, (1,), generator=g)))
                assert torch.equal(part, whole[:, by:by + bh, bx:bx + bw]), (level, bx, by)
        # resampled reads: a downsample between levels, one at a level, an upscale
        for ds in (3.3, 2 * s.level_downsamples[1] / 2, 0.7):
            size = (round(s.dimensions[0] / ds) - 3, round(s.dimensions[1] / ds) - 5)
            whole = s.read_scaled((5, 9), ds, size)
            assert whole.shape == (3, size[1], size[0])
            for rows in ((0, 1), (0, 40), (17, 93), (size[1] - 31, size[1])):
                band = s.read_scaled((5, 9), ds, size, box=(0, rows[0], size[0],
                                                            rows[1] - rows[0]))
                assert torch.equal(band, whole[:, rows[0]:rows[1]]), (ds, rows)
            box = s.read_scaled((5, 9), ds, size, box=(33, 12, 50, 61), threads=3)
            assert torch.equal(box, whole[:, 12:73, 33:83])
            # a large region is read and resampled in bands of BAND_ROWS
            # level rows (made small here): the same pixels
            if ds != 2 * s.level_downsamples[1] / 2:
                import streamcnn.slide as slide_module
                keep = slide_module.BAND_ROWS
                slide_module.BAND_ROWS = 40
                try:
                    assert torch.equal(s.read_scaled((5, 9), ds, size), whole)
                    assert torch.equal(s.read_scaled((5, 9), ds, size, box=(7, 3, 90, 200)),
                                       whole[:, 3:203, 7:97])
                finally:
                    slide_module.BAND_ROWS = keep
        for bad in [(0, 0, 0, 5), (-1, 0, 5, 5), (0, 0, w + 1, 1), (1, 2, 3)]:
            with pytest.raises(ValueError, match="box"):
                s.read_region((0, 0), level, (w, h), box=bad)
        with pytest.raises(ValueError, match="box"):
            s.read_scaled((0, 0), 3.3, (100, 100), box=(90, 0, 20, 10))


def test_resize_uint8_against_torch_and_its_parts():
    """The fixed-point resampler is within 1 of torch's antialiased bilinear
    (float32 sums) at random sizes up and down, and any box of the result,
    computed from only the source rows and columns it needs
    (resample_span), equals the same box of the whole."""
    from streamcnn.slide import resample_span, resize_uint8
    g = torch.Generator().manual_seed(5)
    for _ in range(12):
        h, w, oh, ow = (int(v) for v in torch.randint(1, 160, (4,), generator=g))
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        out = resize_uint8(img, (oh, ow))
        ref = torch.nn.functional.interpolate(img[None].float(), size=(oh, ow),
                                              mode="bilinear", antialias=True,
                                              align_corners=False)[0]
        assert (out.float() - ref.round().clamp(0, 255)).abs().max() <= 1, (h, w, oh, ow)
        y0 = int(torch.randint(0, oh, (1,), generator=g))
        y1 = int(torch.randint(y0 + 1, oh + 1, (1,), generator=g))
        x0 = int(torch.randint(0, ow, (1,), generator=g))
        x1 = int(torch.randint(x0 + 1, ow + 1, (1,), generator=g))
        (a, b), (c, d) = resample_span(h, oh, y0, y1), resample_span(w, ow, x0, x1)
        part = resize_uint8(img[:, a:b, c:d], (oh, ow), source_size=(h, w),
                            source_offset=(a, c), box=(y0, x0, y1 - y0, x1 - x0))
        assert torch.equal(part, out[:, y0:y1, x0:x1])
        if b - a > 1:   # a source part one row short is refused, naming both
            with pytest.raises(ValueError, match="source box holds rows"):
                resize_uint8(img[:, a + 1:b, c:d], (oh, ow), source_size=(h, w),
                             source_offset=(a + 1, c), box=(y0, x0, y1 - y0, x1 - x0))
    flat = torch.full((3, 33, 47), 201, dtype=torch.uint8)
    assert (resize_uint8(flat, (70, 9)) == 201).all()
    img = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=g)
    assert torch.equal(resize_uint8(img, (20, 30)), img)
    with pytest.raises(ValueError, match="uint8 C x H x W"):
        resize_uint8(img.float(), (5, 5))
    with pytest.raises(ValueError, match="sizes"):
        resize_uint8(img, (0, 5))
    with pytest.raises(ValueError, match="output range"):
        resize_uint8(img, (10, 10), box=(8, 0, 5, 10))
    with pytest.raises(ValueError, match="threads"):
        resize_uint8(img, (10, 10), threads=0)


def test_resize_uint8_fill_is_a_source_holding_it():
    """With ``fill``, a source part that holds only some of what a box reads
    (or none of a box's rows or columns) resamples bit for bit as the whole
    source holding the fill outside the part; a bad fill is refused."""
    from streamcnn.slide import resample_span, resize_uint8
    g = torch.Generator().manual_seed(8)
    fill = [17, 200, 255]
    for _ in range(30):
        h, w, oh, ow = (int(v) for v in torch.randint(1, 120, (4,), generator=g))
        whole = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1).repeat(1, h, w)
        a, c = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,),
                                                                              generator=g))
        b = int(torch.randint(a + 1, h + 1, (1,), generator=g))
        d = int(torch.randint(c + 1, w + 1, (1,), generator=g))
        whole[:, a:b, c:d] = torch.randint(0, 256, (3, b - a, d - c), dtype=torch.uint8,
                                           generator=g)
        y0 = int(torch.randint(0, oh, (1,), generator=g))
        y1 = int(torch.randint(y0 + 1, oh + 1, (1,), generator=g))
        x0 = int(torch.randint(0, ow, (1,), generator=g))
        x1 = int(torch.randint(x0 + 1, ow + 1, (1,), generator=g))
        want = resize_uint8(whole, (oh, ow))[:, y0:y1, x0:x1]
        got = resize_uint8(whole[:, a:b, c:d].clone(), (oh, ow), source_size=(h, w),
                           source_offset=(a, c), box=(y0, x0, y1 - y0, x1 - x0), fill=fill)
        assert torch.equal(got, want), (h, w, oh, ow, a, b, c, d)
        (ra, rb), (ca, cb) = resample_span(h, oh, y0, y1), resample_span(w, ow, x0, x1)
        if not (a <= ra and rb <= b and c <= ca and cb <= d):   # without fill: refused
            with pytest.raises(ValueError, match="source box holds rows"):
                resize_uint8(whole[:, a:b, c:d].clone(), (oh, ow), source_size=(h, w),
                             source_offset=(a, c), box=(y0, x0, y1 - y0, x1 - x0))
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    for bad in ([1, 2], [0, 0, 256], [0, 0, -1], [0.5, 0, 0]):
        with pytest.raises(ValueError, match="fill must be 3 values in"):
            resize_uint8(img, (2, 2), fill=bad)


@needs
def test_reads_past_the_edge_read_the_slide_alone(tmp_path, monkeypatch):
    """A resampled read mostly past the slide's edge (a small slide read at
    a coarse mpp, a box around it) reads only the level pixels on the slide
    and fills the rest with the background colour, bit for bit as a read of
    the whole region (here a slide whose levels' downsamples are not
    integers, so OpenSlide places them at sub-pixel offsets); a read at
    1e5 um/px read a 50000 x 50000 region (16 s, 7.7 GB) for its one pixel."""
    from streamcnn.slide import resize_uint8
    g = torch.Generator().manual_seed(2)
    l0 = torch.randint(0, 256, (301, 403, 3), generator=g, dtype=torch.uint8)
    l1 = torch.randint(0, 256, (151, 202, 3), generator=g, dtype=torch.uint8)
    l2 = torch.randint(0, 256, (76, 101, 3), generator=g, dtype=torch.uint8)
    path = str(tmp_path / "odd.tif")
    synthetic.write_slide(path, [l0, l1, l2], tile=64)
    with Slide(path, mpp=0.5) as s:
        read_sizes = []
        read_region = s.read_region

        def spy(location, level, size, **kw):
            box = kw.get("box") or (0, 0, *size)
            read_sizes.append(box[2] * box[3])
            return read_region(location, level, size, **kw)
        monkeypatch.setattr(s, "read_region", spy)
        for box, mpp in (((-517, -333, 1403, 1001), 5.1), ((200, 100, 4000, 3000), 7.3),
                         ((-90, 250, 300, 200), 1.3), ((0, 0, 403, 301), 9.9)):
            got = s.read(mpp=mpp, box=box)
            d = mpp / 0.5
            lvl = s.best_level_for_downsample(d)
            ds = s.level_downsamples[lvl]
            out_w, out_h = max(1, round(box[2] / d)), max(1, round(box[3] / d))
            rw, rh = max(1, math.ceil(out_w * d / ds)), max(1, math.ceil(out_h * d / ds))
            region = read_region(box[:2], lvl, (rw, rh))   # the whole region, background too
            want = resize_uint8(region, (out_h, out_w))
            assert torch.equal(got, want), (box, mpp)
            lw, lh = s.level_dimensions[lvl]
            assert read_sizes[-1] <= (lw + 5) * (lh + 5), (box, mpp, read_sizes)
        read_sizes.clear()
        far = s.read(mpp=1e5)
        assert tuple(far.shape) == (3, 1, 1) and read_sizes[-1] <= 110 * 85
        assert (s.read(mpp=3.0, box=(5000, 5000, 600, 600)) ==
                torch.tensor(s.background, dtype=torch.uint8).view(3, 1, 1)).all()
        # finer than the slide: upsampled, and said so (once per read)
        with pytest.warns(UserWarning, match=r"at 0.25 um/px, finer than its 0.5 um/px: the "
                                             r"pixels are upsampled 2x"):
            assert s.read(mpp=0.25, box=(0, 0, 40, 30)).shape == (3, 60, 80)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            s.read(mpp=0.49, box=(0, 0, 40, 30))        # within the tolerance
            s.read(mpp=1.0, box=(0, 0, 40, 30))


@needs
def test_threads_equal_single_thread(slides):
    path, levels = slides["jpeg"]
    with Slide(path) as s:
        one = s.read_region((-100, 50), 0, (2000, 1300), threads=1)
        for t in (2, 4, 7):
            assert torch.equal(s.read_region((-100, 50), 0, (2000, 1300), threads=t), one)
        # JPEG is lossy but close to the source
        err = (one[:, :, 100:].int() - hwc(levels, 0)[:, 50:1350, :1900].int()).abs()
        assert err.float().mean() < 4


@needs
def test_out_of_bounds_is_background(slides):
    path, levels = slides["deflate"]
    with Slide(path) as s:
        w, h = s.dimensions
        r = s.read_region((-50, -20), 0, (200, 100))
        assert (r[:, :20, :] == 255).all() and (r[:, :, :50] == 255).all()
        assert torch.equal(r[:, 20:, 50:], hwc(levels, 0)[:, :80, :150])
        far = s.read_region((w + 10, h + 10), 0, (64, 64))
        assert (far == 255).all()
        edge = s.read_region((w - 30, h - 40), 0, (100, 100), channels_last=True)
        assert torch.equal(edge[:40, :30], levels[0][h - 40:, w - 30:])
        assert (edge[40:] == 255).all() and (edge[:, 30:] == 255).all()


@needs
def test_mpp_level_choice_and_resampling(slides):
    path, levels = slides["svs"]
    with Slide(path) as s:
        assert s.vendor == "aperio"
        assert s.mpp == (0.25, 0.25)
        assert s.properties["aperio.AppMag"] == "20"
        # 0.5 um/px is level 1 exactly: read as is
        assert torch.equal(s.read(mpp=0.5), hwc(levels, 1))
        # within the tolerance of level 1: still level 1, no resampling
        assert torch.equal(s.read(mpp=0.51), hwc(levels, 1)[:, :round(800 / 2.04),
                                                            :round(1200 / 2.04)])
        assert s.best_level_for_downsample(2.0) == 1
        assert s.best_level_for_downsample(3.7) == 1
        assert s.best_level_for_downsample(3.9) == 2      # 4 is within 5 %
        assert s.best_level_for_downsample(3.9, tolerance=0) == 1
        assert s.best_level_for_downsample(4.0) == 2
        assert s.best_level_for_downsample(1.5) == 0
        # 0.75 um/px: read level 1 and resample to exactly 400 x 266
        r = s.read(mpp=0.75, box=(0, 0, 1200, 798))
        assert r.shape == (3, 266, 400)
        ref = torch.nn.functional.interpolate(hwc(levels, 1)[None, :, :399].float(),
                                              size=(266, 400), mode="bilinear",
                                              antialias=True, align_corners=False)
        assert (r.float() - ref[0]).abs().max() <= 1
        # a box at an mpp: level-0 box scaled by 1/3
        assert s.read(mpp=0.75, box=(300, 150, 600, 300)).shape == (3, 100, 200)


@needs
def test_thumbnail_and_tissue_box(tmp_path):
    path = str(tmp_path / "t.tif")
    img, mask = synthetic.tissue_image(1600, 1200, seed=7, return_mask=True)
    synthetic.write_slide(path, synthetic.pyramid(img, 256), tile=128)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    true = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
    with Slide(path) as s:
        th = s.thumbnail(400)
        assert th.shape == (3, 300, 400)
        x, y, w, h = s.tissue_box(max_size=400)
        ds = 4  # thumbnail pixels in level-0 pixels
        assert abs(x - true[0]) <= ds and abs(y - true[1]) <= ds
        assert abs(x + w - true[2]) <= ds and abs(y + h - true[3]) <= ds
        m, d = s.tissue_mask(400)
        assert d == 4 and m.shape == (300, 400)
        # the mask agrees with the generator's on most pixels
        truth = torch.nn.functional.avg_pool2d(mask[None, None].float(), 4)[0, 0] > 0.5
        assert (m == truth).float().mean() > 0.97
        # a slide smaller than max_size: its mask at level 0, not upsampled
        m, d = s.tissue_mask(4000)
        assert d == 1 and m.shape == (1200, 1600)
        x, y, w, h = s.tissue_box(max_size=4000)
        assert (x, y, x + w, y + h) == true
        with pytest.raises(ValueError, match="max_size must be positive"):
            s.tissue_mask(0)
    blank = str(tmp_path / "blank.tif")
    synthetic.write_slide(blank, [torch.full((300, 300, 3), 255, dtype=torch.uint8)], tile=64)
    with Slide(blank) as s:
        assert s.tissue_box() is None


@needs
def test_tissue_of_a_greyscale_slide(tmp_path):
    # no pixel is saturated: the tissue is told by being darker than the background
    img, mask = synthetic.tissue_image(1600, 1200, seed=7, return_mask=True)
    grey = img.double().mean(dim=2).round().to(torch.uint8)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    true = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
    from PIL import Image
    rgb = str(tmp_path / "grey.tif")          # a slide whose three channels are equal
    synthetic.write_slide(rgb, synthetic.pyramid(grey[..., None].expand(-1, -1, 3), 256),
                          tile=128)
    one = str(tmp_path / "grey.png")          # a one-channel image
    Image.fromarray(grey.numpy(), mode="L").save(one)
    for path in (rgb, one):
        with Slide(path) as s:
            m, d = s.tissue_mask(400)
            truth = torch.nn.functional.avg_pool2d(mask[None, None].float(), 4)[0, 0] > 0.5
            assert (m == truth).float().mean() > 0.95
            x, y, w, h = s.tissue_box(max_size=400)
            assert abs(x - true[0]) <= 8 and abs(y - true[1]) <= 8
            assert abs(x + w - true[2]) <= 8 and abs(y + h - true[3]) <= 8
    # three levels: background, tissue, dark objects in it (Otsu's cut fell
    # between the tissue and the objects: the box was the objects'); and a
    # background shaded over 30 levels is still background
    yy, xx = torch.meshgrid(torch.arange(600), torch.arange(800), indexing="ij")
    ellipse = ((yy - 300) / 220.0) ** 2 + ((xx - 400) / 300.0) ** 2 <= 1
    g = torch.Generator().manual_seed(5)
    for k, back in enumerate((torch.full((600, 800), 252.0),
                              225 + 30 * xx.double() / 799)):     # a shaded background
        plane = back.clone()
        plane[ellipse] = 190.0
        plane[200:360, 300:500] = 45.0                           # dark objects: a
        plane[120:200, 250:350] = 55.0                           # fifth of the tissue
        plane = (plane + 3 * torch.randn(plane.shape, generator=g)).round().clamp(0, 255)
        path = str(tmp_path / f"levels{k}.png")
        Image.fromarray(plane.to(torch.uint8).numpy(), mode="L").save(path)
        with Slide(path) as s:
            m, _ = s.tissue_mask()
            assert (m == ellipse).float().mean() > 0.99, k
            x, y, w, h = s.tissue_box()
            assert abs(x - 100) <= 4 and abs(y - 80) <= 4 and abs(x + w - 700) <= 4 and \
                abs(y + h - 520) <= 4, (k, (x, y, w, h))
    # uniform grey, with or without noise, and white with a faint shade: no tissue
    g = torch.Generator().manual_seed(3)
    noisy = (128 + torch.randint(-4, 5, (300, 300), generator=g)).to(torch.uint8)
    shade = torch.full((300, 300), 250, dtype=torch.uint8)
    shade[100:200, 100:200] = 240
    for k, plane in enumerate((torch.full((300, 300), 128, dtype=torch.uint8), noisy, shade)):
        path = str(tmp_path / f"uniform{k}.tif")
        synthetic.write_slide(path, [plane[..., None].expand(-1, -1, 3).contiguous()], tile=64)
        with Slide(path) as s:
            assert s.tissue_box() is None, k


# -- bad inputs ------------------------------------------------------------------------

OOM_CHILD = r"""
import resource, sys
from PIL import Image
import torch
from streamcnn import Slide
slide, png = sys.argv[1:3]
Image.new("RGB", (64, 48), (9, 8, 7)).save(png)
with open("/proc/self/statm") as f:
    vm = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
with Slide(slide) as s, Slide(png) as p:
    calls = [lambda: s.read_region((0, 0), 0, (100000, 100000)),
             lambda: s.read_scaled((0, 0), 0.5, (100000, 100000)),
             lambda: p.read_region((0, 0), 0, (100000, 100000))]
    for call in calls:
        try:
            call()
            print("no error")
        except MemoryError as e:
            print(e)
    print(s.read_region((0, 0), 0, (64, 48)).shape[1:], p.read_region((0, 0), 0, (64, 48)).sum().item())
"""


@needs
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves terabytes of address space "
                           "(RLIMIT_AS cannot limit it)")
def test_region_larger_than_memory(slides, tmp_path):
    """A region within the size limit that memory cannot hold (30 GB with
    the address space limited to 1 GB more than in use) raises MemoryError
    naming the region, the file and the size (torch's allocator names
    neither); the slides still read afterwards."""
    out = subprocess.run([sys.executable, "-c", OOM_CHILD, slides["deflate"][0],
                          str(tmp_path / "p.png")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout
    for line, path, what in zip(lines, [slides["deflate"][0]] * 2 + [str(tmp_path / "p.png")],
                                ("region", "image", "region")):
        assert line.startswith(f"streamcnn: out of memory for a 100000 x 100000 {what} "
                               f"of {path!r} (27.9 GiB)"), line
    assert lines[3] == f"torch.Size([48, 64]) {64 * 48 * (9 + 8 + 7)}"


@needs
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        Slide(str(tmp_path / "nope.svs"))
    with pytest.raises(ValueError, match="a directory"):
        Slide(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="empty slide path"):
        Slide("")


@needs
def test_striped_tiff_and_garbage(tmp_path):
    striped = str(tmp_path / "striped.tif")
    synthetic.write_striped_tiff(striped, torch.zeros(64, 80, 3, dtype=torch.uint8))
    with Slide(striped) as s:  # not a slide: a plain image (test_plain_images.py)
        assert s.in_memory and s.dimensions == (80, 64)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"II*\x00" + bytes(range(256)) * 20)
    with pytest.raises(ValueError, match="junk.svs"):
        Slide(str(junk))
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.tif"):
        Slide(str(empty))


@needs
def test_truncated_and_corrupt(slides, tmp_path):
    path, _ = slides["deflate"]
    data = open(path, "rb").read()
    for frac in (0.2, 0.5, 0.95):
        cut = tmp_path / f"cut{frac}.tif"
        cut.write_bytes(data[:int(len(data) * frac)])
        with pytest.raises((ValueError, RuntimeError), match=f"cut{frac}.tif"):
            with Slide(str(cut)) as s:
                s.read(level=0)
    # intact directories, damaged tile data: opens, reading fails and names
    # the file; the error latches (OpenSlide), every later read says so too
    bad = bytearray(data)
    n = len(bad)
    g = torch.Generator().manual_seed(0)
    bad[n // 10:n // 3] = bytes(torch.randint(0, 256, (n // 3 - n // 10,), generator=g,
                                              dtype=torch.uint8).tolist())
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(bytes(bad))
    with Slide(str(corrupt)) as s:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="corrupt.tif.*reopen"):
                s.read(level=0)


@needs
def test_libtiff_message_in_the_error_not_on_stderr(tmp_path, capfd):
    """A tile libtiff cannot decode: its message is in the error, after
    OpenSlide's (which names only the call: "TIFFRGBAImageGet failed"),
    and not printed on stderr by libtiff's default handler beside it."""
    path = tmp_path / "z.tif"
    synthetic.write_slide(str(path), [torch.full((256, 256, 3), 200, dtype=torch.uint8)],
                          tile=128, compression="deflate")
    from PIL import Image
    with Image.open(path) as im:
        spots = list(im.tag_v2[324])                            # TileOffsets
    data = bytearray(path.read_bytes())
    for off in spots:
        data[off:off + 4] = b"\x55" * 4                          # no zlib header
    path.write_bytes(bytes(data))
    capfd.readouterr()
    with Slide(str(path)) as s:
        with pytest.raises(RuntimeError) as e:
            s.read(level=0)
    msg = str(e.value)
    assert msg.startswith(f"streamcnn: OpenSlide failed reading '{path}'"), msg
    assert re.search(r"TIFFRGBAImageGet failed \(libtiff: ZIPDecode: Decoding error at "
                     r"scanline \d+\)$", msg), msg
    assert "ZIPDecode" not in capfd.readouterr().err


def _bigtiff(pixels, tile=16, desc_count=None):
    """A one-level tiled, uncompressed RGB BigTIFF (little-endian) of the
    uint8 H x W x 3 tensor, written byte by byte (our writers choose
    BigTIFF only past ~1.8 GB). desc_count: add an ASCII ImageDescription
    tag claiming that many bytes (a damaged file)."""
    import struct
    h, w, _ = pixels.shape
    across, down = -(-w // tile), -(-h // tile)
    tiles = []
    for ty in range(down):
        for tx in range(across):
            t = torch.zeros(tile, tile, 3, dtype=torch.uint8)
            part = pixels[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]
            t[:part.shape[0], :part.shape[1]] = part
            tiles.append(t.numpy().tobytes())
    n = len(tiles)
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, None), (259, 3, 1, 1),
               (262, 3, 1, 2), (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, tile),
               (323, 3, 1, tile), (324, 16, n, None), (325, 16, n, None)]
    if desc_count is not None:
        entries.append((270, 2, desc_count, None))
    entries.sort()
    ifd_at = 16
    ifd_len = 8 + 20 * len(entries) + 8
    data_at = ifd_at + ifd_len
    offsets_at, counts_at = data_at, data_at + 8 * n
    tiles_at = counts_at + 8 * n
    out = bytearray(b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd_at))
    out += struct.pack("<Q", len(entries))
    for tag, typ, count, value in entries:
        if tag == 258:
            raw = struct.pack("<HHHH", 8, 8, 8, 0)
        elif tag == 324:
            raw = struct.pack("<Q", offsets_at)
        elif tag == 325:
            raw = struct.pack("<Q", counts_at)
        elif tag == 270:
            raw = struct.pack("<Q", tiles_at)
        else:
            raw = struct.pack("<Q", value) if typ == 4 else struct.pack("<HHHH", value, 0, 0, 0)
        out += struct.pack("<HHQ", tag, typ, count) + raw
    out += struct.pack("<Q", 0)
    assert len(out) == data_at
    out += b"".join(struct.pack("<Q", tiles_at + i * len(tiles[0])) for i in range(n))
    out += b"".join(struct.pack("<Q", len(t)) for t in tiles)
    out += b"".join(tiles)
    return bytes(out)


@needs
def test_bigtiff_opens_and_damaged_bigtiff_refused(tmp_path):
    """The pre-OpenSlide directory check walks BigTIFF too (8-byte counts
    and offsets): an intact one opens, one whose tag
    claims more bytes than the file holds is refused with the tag named."""
    g = torch.Generator().manual_seed(7)
    px = torch.randint(0, 256, (32, 48, 3), generator=g, dtype=torch.uint8)
    good = tmp_path / "big.tif"
    good.write_bytes(_bigtiff(px))
    with Slide(str(good)) as s:  # the check lets it through to OpenSlide
        assert s.dimensions == (48, 32) and s.level_count == 1
    bad = tmp_path / "bigbad.tif"
    bad.write_bytes(_bigtiff(px, desc_count=1 << 40))
    with pytest.raises(ValueError, match=r"bigbad.tif.*tag 270 of directory 0 claims 1099511627776"):
        Slide(str(bad))


@needs
def test_small_first_tiled_directory(tmp_path):
    """Vendors other than Aperio may put a small tiled image first (Leica SCN
    its macro image; OpenSlide's generic TIFF driver sorts the levels by
    size): the pre-check lets them through, and the slide reads exactly.
    An Aperio file so ordered is refused (the crasher below is one)."""
    g = torch.Generator().manual_seed(5)
    lv = [torch.randint(0, 256, (n, n, 3), generator=g, dtype=torch.uint8)
          for n in (64, 512, 256)]
    path = tmp_path / "macro_first.tif"
    synthetic.write_slide(str(path), lv, tile=64)
    with Slide(str(path)) as s:
        assert s.level_dimensions == [(512, 512), (256, 256), (64, 64)]
        assert torch.equal(s.read_region((0, 0), 0, (512, 512), channels_last=True), lv[1])
        assert torch.equal(s.read_region((0, 0), 2, (64, 64), channels_last=True), lv[0])
    aperio = tmp_path / "macro_first.svs"
    synthetic.write_slide(str(aperio), lv, tile=64,
                          description=synthetic.aperio_description(64, 64, 64, 0.5))
    with pytest.raises(ValueError, match=r"macro_first.svs.*damaged Aperio slide: tiled "
                                         r"directory 1 \(512x512\)"):
        Slide(str(aperio))


@needs
@pytest.mark.parametrize("name,says", [
    # OpenSlide 3.4 dies with SIGFPE: a per-axis downsample rounds to 0
    ("aperio_level1_wider_than_level0.tiff", "over twice the size of the first one"),
    # OpenSlide 3.4 mallocs the 4.3 GB an ASCII tag claims in an 11 KB file
    ("tag_count_past_end_of_file.tiff", "tag 270 of directory 0 claims 4278190175 values"),
])
def test_openslide_crasher_refused(tmp_path, name, says):
    """The fuzzer's inputs on which OpenSlide 3.4 takes the process down or
    allocates gigabytes: refused with a message before OpenSlide sees them. In a subprocess, so
    that a regression fails this test instead of killing the test run."""
    src = os.path.join(os.path.dirname(__file__), "..", "fuzz", "regress", "slide", name)
    dst = tmp_path / "crasher.svs"
    shutil.copy(src, dst)
    code = ("import streamcnn\n"
            "try:\n"
            f"    streamcnn.Slide({str(dst)!r})\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "refused:" in r.stdout and "crasher.svs" in r.stdout
    assert says in r.stdout, r.stdout


@needs
def test_bad_arguments(slides):
    path, _ = slides["deflate"]
    s = Slide(path)
    with pytest.raises(ValueError, match="level 4 is out of range"):
        s.read_region((0, 0), 4, (10, 10))
    with pytest.raises(ValueError, match="level -1 is out of range"):
        s.read(level=-1)
    with pytest.raises(TypeError, match="level must be an int"):
        s.read_region((0, 0), 1.0, (10, 10))
    with pytest.raises(ValueError, match="must be positive"):
        s.read_region((0, 0), 0, (-5, 10))
    with pytest.raises(ValueError, match="must be positive"):
        s.read_region((0, 0), 0, (0, 10))
    with pytest.raises(ValueError, match="too large"):
        s.read_region((0, 0), 0, (1 << 20, 1 << 20))
    with pytest.raises(ValueError, match="out of range"):
        s.read_region((1 << 40, 0), 0, (4, 4))
    with pytest.raises(ValueError, match="threads"):
        s.read_region((0, 0), 0, (4, 4), threads=0)
    # pixel coordinates: whole numbers of any integer type; a fraction of a
    # pixel is refused (it was cut off: (10.9, 0) read as (10, 0))
    import numpy as np
    ref = s.read_region((10, 20), 1, (6, 5))
    for loc, lvl, size in (((np.int64(10), np.int32(20)), np.int64(1), (np.int64(6), 5)),
                           ((torch.tensor(10), 20.0), 1, (6.0, torch.tensor(5)))):
        assert torch.equal(s.read_region(loc, lvl, size), ref)
    assert torch.equal(s.read_region((10, 20), 1, (6, 5), box=(np.int64(1), 1, 2.0, 3)),
                       ref[:, 1:4, 1:3])
    for loc, size, box, says in (((10.9, 20), (6, 5), None, r"location \(x, y\) must be whole"),
                                 ((10, 20), (6.5, 5), None, r"size \(w, h\) must be whole"),
                                 ((10, 20), (6, 5), (0, 0, 1.5, 1), r"box .* must be whole"),
                                 ((float("nan"), 20), (6, 5), None, "must be whole")):
        with pytest.raises(ValueError, match=says):
            s.read_region(loc, 1, size, box=box)
        with pytest.raises(ValueError, match=says):
            s.read_scaled(loc, 2.0, size, box=box)
    for loc, size in ((("10", 20), (6, 5)), ((10, 20), (6, None)), (10, (6, 5)),
                      ((10, 20), (True, 5))):
        with pytest.raises(TypeError, match="must be 2 ints"):
            s.read_region(loc, 1, size)
    with pytest.raises(ValueError, match=r"location \(x, y\) must be 2 ints"):
        s.read_region((1, 2, 3), 1, (6, 5))
    assert torch.equal(s.read(level=1, box=(np.int64(20), 40.0, 12, torch.tensor(10))),
                       s.read(level=1, box=(20, 40, 12, 10)))
    with pytest.raises(ValueError, match=r"box \(x, y, w, h\) must be whole"):
        s.read(level=1, box=(20.5, 40, 12, 10))
    with pytest.raises(ValueError, match="no microns-per-pixel"):
        s.read(mpp=0.5)
    with pytest.raises(ValueError, match="exactly one of"):
        s.read()
    with pytest.raises(ValueError, match="exactly one of"):
        s.read(level=0, mpp=1.0)
    with pytest.raises(TypeError, match="does not pickle"):
        import pickle
        pickle.dumps(s)
    s.close()
    s.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        s.read_region((0, 0), 0, (4, 4))


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@needs
def test_open_close_no_leaks(slides, tmp_path):
    """10^4 open/read/close cycles and 10^4 failed opens: no handle or memory
    left behind."""
    path, _ = slides["svs"]
    missing = str(tmp_path / "missing.svs")
    for _ in range(200):  # warm up allocator caches
        with Slide(path) as s:
            s.read_region((0, 0), 2, (8, 8))
    gc.collect()
    fds, rss = _open_fds(), _rss_kb()
    for i in range(10_000):
        s = Slide(path)
        if i % 10 == 0:
            s.read_region((i % 500, 0), 0, (16, 16))
        s.close()
        try:
            Slide(missing)
        except FileNotFoundError:
            pass
    gc.collect()
    assert _open_fds() == fds
    assert _rss_kb() - rss < 30_000, "RSS grew by more than 30 MB"


def test_built_without_openslide_message(monkeypatch, tmp_path):
    """The Python side of a build without OpenSlide (the C side is ctest
    slide_off): a clear error, no crash, whatever this build has."""
    import streamcnn.slide as slide_mod

    class NoSlides:
        def __getattr__(self, name):
            return getattr(streamcnn._library.clib(), name)

        @staticmethod
        def sc_slide_available():
            return 0

    monkeypatch.setattr(slide_mod, "clib", lambda: NoSlides())
    assert not slide_mod.available()
    with pytest.raises(FileNotFoundError, match="any.svs"):
        Slide(str(tmp_path / "any.svs"))
    (tmp_path / "any.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="any.svs.*built without OpenSlide"):
        Slide(str(tmp_path / "any.svs"))
    # plain images need no OpenSlide
    synthetic.write_striped_tiff(str(tmp_path / "s.tif"), torch.full((8, 9, 3), 7,
                                                                      dtype=torch.uint8))
    with Slide(str(tmp_path / "s.tif")) as s:
        assert (s.read(level=0) == 7).all()


@needs
def test_image_smaller_than_its_tiles_reads_right(tmp_path):
    """A tiled TIFF (not JPEG) narrower and shorter than its tiles:
    OpenSlide 3.4 with libtiff 4.5 shears its rows (pixels off by up to
    255, no error; the coarse levels of many pyramids). Such a level is
    never read through OpenSlide: level 0 is decoded by Pillow (exact),
    a coarser level is resampled from a finer one read right."""
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (37, 150, 3), generator=g, dtype=torch.uint8)
    path = tmp_path / "small.tif"
    path.write_bytes(_bigtiff(pixels, tile=64))     # 3 tiles of 64 x 64 in one row
    with Slide(str(path)) as s:
        assert s.dimensions == (150, 37)
        assert torch.equal(s.read(level=0).permute(1, 2, 0), pixels)
        assert torch.equal(s.read_region((5, 3), 0, (20, 10), channels_last=True),
                           pixels[3:13, 5:25])
    # an Aperio file of that kind: what OpenSlide read of it (the
    # description's MPP, the vendor) stays with the pixels Pillow decodes
    path.write_bytes(_tiled_tiff([pixels], 64, "Aperio Image Library v12.0.0\r\n150x37 "
                                 "-> 150x37 - |AppMag = 40|MPP = 0.2520"))
    with Slide(str(path)) as s:
        assert s.in_memory and s.vendor == "aperio"
        assert s.file_mpp == (0.252, 0.252) and s.mpp == (0.252, 0.252)
        assert torch.equal(s.read(level=0).permute(1, 2, 0), pixels)


@needs
def test_level_reads_are_the_level_and_huge_resampled_reads_are_named(tmp_path):
    """read(level=L) of an odd slide is exactly the level (1001 x 777 ->
    501 x 389: it was 502 wide, the mean downsample overshooting by a
    column of background, and thumbnail(501) resampled that); a resampled
    read or thumbnail too large for memory is a MemoryError naming it (it
    was ATen's allocation error); tissue_box refuses a negative margin
    (it returned a box of negative size)."""
    g = torch.Generator().manual_seed(0)
    l0 = torch.randint(0, 256, (777, 1001, 3), generator=g, dtype=torch.uint8)
    l1 = torch.randint(0, 256, (389, 501, 3), generator=g, dtype=torch.uint8)
    path = str(tmp_path / "odd.tif")
    synthetic.write_slide(path, [l0, l1], tile=128)
    with Slide(path, mpp=0.5) as s:
        assert torch.equal(s.read(level=1).permute(1, 2, 0), l1)
        assert torch.equal(s.thumbnail(501).permute(1, 2, 0), l1)
        with pytest.raises(MemoryError, match=r"out of memory for a 500500 x 388500 image of"):
            s.read(mpp=0.001)
        with pytest.raises(MemoryError, match=r"out of memory for a 1000000 x 776224 "
                                              r"thumbnail of"):
            s.thumbnail(1000000)
        with pytest.raises(ValueError, match="margin must be a fraction of at least 0"):
            s.tissue_box(margin=-5)


@needs
def test_file_removed_while_open_is_said(slides, tmp_path):
    """OpenSlide reopens the file by its path for a read: a file removed
    while open fails naming that (the advice to reopen cannot help)."""
    path = tmp_path / "gone.tif"
    shutil.copy(slides["deflate"][0], path)
    with Slide(str(path)) as s:
        path.unlink()
        with pytest.raises(RuntimeError, match="no longer exists: it was removed while open"):
            s.read(level=0)


def _tiled_tiff(levels, tile, description=None):
    """A pyramidal tiled, uncompressed RGB TIFF (little-endian, classic) of
    the uint8 H x W x 3 tensors ``levels``, one page each, every page in
    ``tile`` x ``tile`` tiles even where the page is smaller (as tifffile
    writes them; our writer shrinks the tile to the page); ``description``:
    the first page's ImageDescription."""
    import struct
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    link = 4                                    # where the next IFD's offset goes
    for k, px in enumerate(levels):
        h, w, _ = px.shape
        tiles = []
        for ty in range(-(-h // tile)):
            for tx in range(-(-w // tile)):
                t = torch.zeros(tile, tile, 3, dtype=torch.uint8)
                part = px[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]
                t[:part.shape[0], :part.shape[1]] = part
                tiles.append(t.numpy().tobytes())
        n = len(tiles)
        data_at = len(out)
        bps_at = data_at
        offs_at, cnts_at = bps_at + 8, bps_at + 8 + 4 * n
        tiles_at = cnts_at + 4 * n
        out += struct.pack("<HHHH", 8, 8, 8, 0)
        out += b"".join(struct.pack("<I", tiles_at + i * tile * tile * 3) for i in range(n))
        out += b"".join(struct.pack("<I", tile * tile * 3) for _ in range(n))
        out += b"".join(tiles)
        text = []
        if description is not None and k == 0:
            raw_text = description.encode() + b"\0"
            text = [(270, 2, len(raw_text), len(out))]
            out += raw_text
        entries = [(254, 4, 1, 1 if k else 0), (256, 4, 1, w), (257, 4, 1, h),
                   (258, 3, 3, bps_at), (259, 3, 1, 1), (262, 3, 1, 2), *text, (277, 3, 1, 3),
                   (284, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile),
                   (324, 4, n, offs_at if n > 1 else tiles_at),
                   (325, 4, n, cnts_at if n > 1 else tile * tile * 3)]
        ifd_at = len(out)
        out[link:link + 4] = struct.pack("<I", ifd_at)
        out += struct.pack("<H", len(entries))
        for tag, typ, count, value in entries:
            raw = struct.pack("<HH", value, 0) if typ == 3 and count == 1 else \
                struct.pack("<I", value)
            out += struct.pack("<HHI", tag, typ, count) + raw
        link = len(out)
        out += struct.pack("<I", 0)
    return bytes(out)


@needs
def test_pyramid_level_smaller_than_its_tiles_is_resampled(tmp_path):
    """Level 2 (200 x 120) of a pyramid in 128 x 128 tiles: OpenSlide shears
    its rows; reads at its scale resample level 1 instead: within 1 of the
    stored level on a smooth image (it was off by up to 255), and reads at
    an mpp and thumbnails take level 1 too."""
    yy, xx = torch.meshgrid(torch.arange(480.0), torch.arange(800.0), indexing="ij")
    l0 = torch.stack([xx * 255 / 799, yy * 255 / 479,
                      128 + 100 * torch.sin(xx / 40) * torch.cos(yy / 50)], -1)

    def down(img, f):       # the mean of f x f blocks, rounded
        h, w, _ = img.shape
        return img.reshape(h // f, f, w // f, f, 3).mean((1, 3))

    levels = [l0, down(l0, 2), down(l0, 4)]
    levels = [lv.round().clamp(0, 255).to(torch.uint8) for lv in levels]
    path = tmp_path / "pyr.tif"
    path.write_bytes(_tiled_tiff(levels, 128))
    with Slide(str(path), mpp=0.5) as s:
        assert s.level_dimensions == [(800, 480), (400, 240), (200, 120)]
        assert torch.equal(s.read(level=1).permute(1, 2, 0), levels[1])  # a tile and more
        got = s.read(level=2).permute(1, 2, 0)
        assert got.shape == levels[2].shape
        assert (got.int() - levels[2].int()).abs().max() <= 1
        assert s.best_level_for_downsample(4.0) == 1
        assert tuple(s.thumbnail(200).shape) == (3, 120, 200)
        assert (s.read(mpp=2.0).int() - levels[2].permute(2, 0, 1).int()).abs().max() <= 1


@needs
def test_c_reader_refuses_levels_openslide_reads_wrong(tmp_path):
    """The C API (io/slide.h) itself refuses a read of a TIFF level smaller
    than its tiles (not JPEG), which OpenSlide would return with sheared
    rows, naming the level, its size and its tiles and what to do instead;
    sc_slide_level_sheared says which levels those are. Levels read right
    read as before."""
    import ctypes
    lib = streamcnn._library.clib()
    g = torch.Generator().manual_seed(5)
    levels = [torch.randint(0, 256, (300, 500, 3), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (150, 250, 3), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (75, 125, 3), generator=g, dtype=torch.uint8)]
    path = tmp_path / "pyr.tif"
    path.write_bytes(_tiled_tiff(levels, 128))
    err = ctypes.create_string_buffer(512)
    h = lib.sc_slide_open(str(path).encode(), err, 512)
    assert h, err.value
    try:
        assert [lib.sc_slide_level_sheared(h, k) for k in range(-1, 4)] == [-1, 0, 0, 1, -1]
        out = torch.empty(3, 10, 10, dtype=torch.uint8)
        assert lib.sc_slide_read(h, 1, 0, 0, 10, 10, out.data_ptr(), 0, 1, err, 512) == 0
        assert torch.equal(out.permute(1, 2, 0), levels[1][:10, :10])
        assert lib.sc_slide_read(h, 2, 0, 0, 10, 10, out.data_ptr(), 0, 1, err, 512) != 0
        assert re.search(r"level 2 of '.*pyr.tif' \(125 x 75\) is smaller than its 128 x 128 "
                         r"tiles and not JPEG-compressed, which OpenSlide .* reads wrong "
                         r"\(sheared rows, no error\): read a finer level and resample it",
                         err.value.decode())
    finally:
        lib.sc_slide_close(h)
    assert lib.sc_slide_level_sheared(None, 0) == -1
    # a single-level image smaller than its tiles: level 0 is refused too
    path.write_bytes(_tiled_tiff(levels[2:], 128))
    h = lib.sc_slide_open(str(path).encode(), err, 512)
    assert h, err.value
    try:
        assert lib.sc_slide_level_sheared(h, 0) == 1
        assert lib.sc_slide_read(h, 0, 0, 0, 4, 4, out.data_ptr(), 0, 1, err, 512) != 0
        assert "at level 0, decode the TIFF with another reader" in err.value.decode()
    finally:
        lib.sc_slide_close(h)

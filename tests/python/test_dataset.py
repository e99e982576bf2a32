"""SlideDataset over synthetic slides: crops, padding, resolution, labels,
augmentation and DataLoader workers."""

import pickle

import pytest
import torch

import streamcnn
from streamcnn import Slide
from streamcnn.data import Augment, SlideDataset, synthetic

pytestmark = pytest.mark.skipif(
    not streamcnn.slide.available(),
    reason="streamcnn built without OpenSlide (libopenslide-dev missing)")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    rows = []
    for i in range(4):
        name = f"s{i}.svs"
        synthetic.make_slide(str(d / name), 1024 + 64 * i, 768, mpp=0.5, seed=10 + i,
                             tumour=i % 2 == 1, tile=128, min_size=128)
        rows.append(f"{name},{'tumour' if i % 2 else 'normal'}")
    plain = d / "plain.tif"
    synthetic.make_slide(str(plain), 512, 512, seed=20, tile=128)
    csv = d / "slides.csv"
    csv.write_text("path,label,comment\n" + "\n".join(rows) + "\n")
    return d, csv


def test_labels_and_center_crop(table):
    d, csv = table
    ds = SlideDataset(csv, 200, level=1, crop="center")
    assert len(ds) == 4 and ds.classes == ["normal", "tumour"]
    assert ds.labels == [0, 1, 0, 1]
    img, label = ds[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 200, 200) and label == 1
    with Slide(d / "s1.svs") as s:
        w, h = s.dimensions
        # level 1 (downsample 2): a 400 x 400 level-0 window at the centre
        ref = s.read_region((w // 2 - 200, h // 2 - 200), 1, (200, 200))
    assert torch.equal(img, ref)
    assert torch.equal(ds[-3][0], img)
    with pytest.raises(IndexError):
        ds[4]
    # integer labels stay integers
    ds2 = SlideDataset([(d / "s0.svs", 3), (d / "s1.svs", 7)], 64, level=0)
    assert ds2.classes is None and [ds2[i][1] for i in range(2)] == [3, 7]
    # as pandas writes them (a float column): integers too, not names sorted
    # as text ("10.0" before "2.0")
    ds3 = SlideDataset([(d / "s0.svs", "2.0"), (d / "s1.svs", "10.0")], 64, level=0)
    assert ds3.classes is None and ds3.labels == [2, 10]
    ds4 = SlideDataset([(d / "s0.svs", "0.5"), (d / "s1.svs", "1")], 64, level=0)
    assert ds4.classes == ["0.5", "1"]
    # class names that are numbers in the order of their values ("10.0"
    # was before "2.5"), then the others as text
    rows = [(d / "s0.svs", v) for v in ("10.0", "2.5", "b", "0.3", "a", "nan", "-1.5")]
    ds5 = SlideDataset(rows, 64, level=0)
    assert ds5.classes == ["-1.5", "0.3", "2.5", "10.0", "a", "b", "nan"]
    assert ds5.labels == [3, 2, 5, 1, 4, 6, 0]
    # ints of numpy and torch are ints; a label is never empty
    import numpy as np
    ds6 = SlideDataset([(d / "s0.svs", np.int64(4)), (d / "s1.svs", torch.tensor(9))], 64,
                       level=0)
    assert ds6.classes is None and ds6.labels == [4, 9]
    for bad in ("", "  ", None):
        with pytest.raises(ValueError, match="table row 1: the label is empty"):
            SlideDataset([(d / "s0.svs", 1), (d / "s1.svs", bad)], 64, level=0)
    empty = d / "empty_label.csv"
    empty.write_text("path,label\ns0.svs,tumour\ns1.svs,\n")
    with pytest.raises(ValueError, match=r"empty_label.csv line 3: the label is empty"):
        SlideDataset(empty, 64, level=0)


def test_tissue_crop_pads_with_background(table):
    d, csv = table
    # at 4 um/px (downsample 8) the tissue is far smaller than 256 x 256
    ds = SlideDataset(csv, 256, mpp=4.0, crop="tissue")
    img, _ = ds[0]
    (x, y, rw, rh), (r0, c0), _, down = ds.window(0)
    assert down == 8 and rw < 256 and rh < 256
    with Slide(d / "s0.svs") as s:
        bx, by, bw, bh = s.tissue_box(1024)
        part = s.read_scaled((x, y), 8, (rw, rh))
    assert abs(rw - bw / 8) <= 1 and abs(rh - bh / 8) <= 1
    assert torch.equal(img[:, r0:r0 + rh, c0:c0 + rw], part)
    border = torch.ones(256, 256, dtype=torch.bool)
    border[r0:r0 + rh, c0:c0 + rw] = False
    assert (img[:, border] == 255).all()
    # the tissue is centred
    assert abs(r0 - (256 - rh - r0)) <= 1 and abs(c0 - (256 - rw - c0)) <= 1
    # at full resolution the tissue is larger than the image: no padding
    ds0 = SlideDataset(csv, 128, level=0, crop="tissue")
    (_, _, rw, rh), off, _, _ = ds0.window(0)
    assert (rw, rh) == (128, 128) and off == (0, 0)
    assert (ds0[0][0] != 255).any()


def test_mpp_resampling_and_missing_mpp(table):
    d, csv = table
    # 0.75 um/px on 0.5 um/px slides: level 0 resampled by 1.5
    ds = SlideDataset(csv, 96, mpp=0.75, crop="center")
    img, _ = ds[2]
    with Slide(d / "s2.svs") as s:
        w, h = s.dimensions
        ref = s.read(mpp=0.75, box=(round(w / 2 - 72), round(h / 2 - 72), 144, 144))
    assert img.shape == (3, 96, 96) and torch.equal(img, ref)
    no_mpp = SlideDataset([(d / "plain.tif", 0)], 64, mpp=1.0)
    with pytest.raises(ValueError, match="plain.tif.*no microns-per-pixel"):
        no_mpp[0]
    too_deep = SlideDataset([(d / "plain.tif", 0)], 64, level=7)
    with pytest.raises(ValueError, match="level 7 is out of range.*plain.tif"):
        too_deep[0]


def test_random_crop_and_augment_are_seeded(table):
    d, csv = table
    ds = SlideDataset(csv, 128, level=1, crop="random", augment=True, seed=5)
    a = [ds[i][0] for i in range(4)]
    b = [ds[i][0] for i in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ds.set_epoch(1)
    c = [ds[i][0] for i in range(4)]
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # random windows are centred on tissue
    for i in range(4):
        (x, y, w, h), _, _, down = ds.window(i, torch.Generator().manual_seed(i))
        assert (w, h) == (128, 128) and down == 2


def test_augment():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=g)
    geo = Augment(brightness=0, contrast=0, saturation=0)
    seen = set()
    for k in range(40):
        out = geo(img, torch.Generator().manual_seed(k))
        assert out.dtype == torch.uint8 and out.shape == img.shape
        # flips and rotations only permute pixels
        assert torch.equal(out.flatten(1).sort(dim=1).values, img.flatten(1).sort(dim=1).values)
        seen.add(out.numpy().tobytes())
    assert len(seen) == 8  # the dihedral group of the square
    jit = Augment(flip=False, rot90=False, brightness=0.1, contrast=0.1, saturation=0.1)
    out = jit(img, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and (out.float() - img.float()).abs().mean() < 40
    rect = torch.zeros(3, 10, 20, dtype=torch.uint8)
    assert Augment()(rect).shape == (3, 10, 20)  # no rot90 off the square
    with pytest.raises(ValueError, match="brightness"):
        Augment(brightness=1.5)
    with pytest.raises(ValueError, match="uint8 3 x H x W"):
        Augment()(img.float())


def test_augment_steps_on_parts():
    """draw / geometry / colour: the rows of the result come from
    AugmentDraw.source_box of the image, and the jitter of any rows, given
    the whole image's channel sums, equals those rows of the whole's: for
    every flip, turn and row range."""
    from streamcnn.data import AugmentDraw
    g = torch.Generator().manual_seed(3)
    for h, w in [(7, 7), (6, 9)]:
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        sums = img.sum((1, 2)).tolist()
        for k in range(4 if h == w else 1):
            for fw in (False, True):
                for fh in (False, True):
                    d = AugmentDraw(fw, fh, k, 1.07, 0.91, 1.05)
                    whole = Augment.geometry(img, d)
                    jit = Augment.colour(whole, d, sums, h * w)
                    for a in range(whole.shape[1]):
                        for b in range(a + 1, whole.shape[1] + 1):
                            x, y, bw, bh = d.source_box(h, w, (a, b))
                            part = Augment.geometry(img[:, y:y + bh, x:x + bw], d)
                            assert torch.equal(part, whole[:, a:b]), (k, fw, fh, a, b)
                            assert torch.equal(Augment.colour(part, d, sums, h * w),
                                               jit[:, a:b])
    # the call is the three steps; a draw round-trips through a tensor
    aug = Augment()
    img = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8, generator=g)
    d = aug.draw(12, 12, torch.Generator().manual_seed(4))
    assert AugmentDraw.from_tensor(d.as_tensor()) == d
    geo = Augment.geometry(img, d)
    assert torch.equal(aug(img, torch.Generator().manual_seed(4)),
                       Augment.colour(geo, d, geo.sum((1, 2)).tolist(), 144))
    # contrast is around the mean: a constant image stays constant under it
    flat = torch.full((3, 5, 5), 100, dtype=torch.uint8)
    assert (Augment.colour(flat, AugmentDraw(contrast=1.09), [2500] * 3, 25) == 100).all()


def test_augment_geometry_is_flips_then_rot90():
    """Augment.geometry (one flip at most, an odd turn as a transposed
    view) equals the flips then torch.rot90 it stands for, for all 16
    draws; its blocked copy (dataset.contiguous) equals .contiguous() for
    any block size, edges included; a call returns a contiguous image
    whose sums are the input's."""
    from streamcnn.data import AugmentDraw
    from streamcnn.data.dataset import contiguous
    g = torch.Generator().manual_seed(5)
    for h, w in [(7, 7), (6, 9)]:
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        for k in range(4 if h == w else 1):
            for fw in (False, True):
                for fh in (False, True):
                    d = AugmentDraw(fw, fh, k)
                    ref = img.flip(2) if fw else img
                    ref = ref.flip(1) if fh else ref
                    ref = torch.rot90(ref, k, dims=(1, 2))
                    got = Augment.geometry(img, d)
                    assert torch.equal(got, ref), (k, fw, fh)
                    for block in (1, 2, 3, 256):
                        c = contiguous(got, block)
                        assert c.is_contiguous() and torch.equal(c, ref)
                    out = Augment(brightness=0, contrast=0, saturation=0).geometry(img, d)
                    assert torch.equal(out, ref)
    aug = Augment()
    sq = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=g)
    for seed in range(8):
        out = aug(sq, torch.Generator().manual_seed(seed))
        assert out.is_contiguous()
    plain = Augment(brightness=0, contrast=0, saturation=0)
    turned = [plain(sq, torch.Generator().manual_seed(s)) for s in range(16)]
    assert all(t.is_contiguous() and torch.equal(t.sum((1, 2)), sq.sum((1, 2)))
               for t in turned)
    assert any(t.shape == sq.shape and not torch.equal(t, sq) for t in turned)


@pytest.mark.parametrize("crop", ["tissue", "random", "center"])
def test_read_rows_equals_the_rows_of_the_item(table, crop):
    """What a tile-parallel rank reads: rows [a, b) of an item (random crop,
    flips, turns), jittered with the sums of disjoint row ranges added up,
    equal those rows of ds[i] bit for bit; mpp 1.3 resamples the slide."""
    d, csv = table
    ds = SlideDataset(csv, 150, mpp=1.3, crop=crop, augment=True, seed=7)
    # the same draws without the jitter: the image the sums are taken of
    geo = SlideDataset(csv, 150, mpp=1.3, crop=crop, seed=7,
                       augment=Augment(brightness=0, contrast=0, saturation=0))
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        geo.set_epoch(epoch)
        for i in range(len(ds)):
            whole, _ = ds[i]
            cuts = [0, 37, 38, 101, 150]
            parts = [ds.read_rows(i, (max(0, a - 5), min(150, b + 9)), (a, b))
                     for a, b in zip(cuts, cuts[1:])]
            sums = sum(p["sums"] for p in parts)
            plain = geo[i][0]
            assert torch.equal(sums, plain.sum((1, 2)))
            for (a, b), p in zip(zip(cuts, cuts[1:]), parts):
                lo, hi = max(0, a - 5), min(150, b + 9)
                assert torch.equal(p["part"], plain[:, lo:hi])
                dr = streamcnn.data.AugmentDraw.from_tensor(p["draw"])
                got = Augment.colour(p["part"], dr, sums.tolist(), 150 * 150)
                assert torch.equal(got, whole[:, lo:hi]), (epoch, i, a, b)
    # no rows: an empty part; bad ranges are refused
    p = ds.read_rows(0, (20, 20))
    assert p["part"].shape == (3, 0, 150) and int(p["sums"].sum()) == 0
    with pytest.raises(ValueError, match="sum_rows"):
        ds.read_rows(0, (10, 20), (5, 15))
    with pytest.raises(ValueError, match="rows"):
        ds.read_rows(0, (10, 151))
    custom = SlideDataset(csv, 64, level=1, augment=lambda im: im)
    with pytest.raises(ValueError, match="whole images only"):
        custom.read_rows(0, (0, 10))


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_dataloader_workers(table, ctx):
    d, csv = table
    ds = SlideDataset(csv, 96, level=2, crop="random", augment=True, seed=1)
    ref = torch.stack([ds[i][0] for i in range(len(ds))])  # opens handles here first
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2,
                                         multiprocessing_context=ctx)
    imgs, labels = zip(*loader)
    assert torch.equal(torch.cat(imgs), ref)
    assert torch.cat(labels).tolist() == [0, 1, 0, 1]
    # the dataset pickles without its open handles
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], ref[0])
    # workers that persist across epochs draw each epoch's augmentations
    # (they kept drawing epoch 0's: the epoch lived in their copy)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         multiprocessing_context=ctx, persistent_workers=True)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        want = torch.stack([ds[i][0] for i in range(len(ds))])
        got = torch.cat([b[0] for b in loader])
        assert torch.equal(got, want), epoch
        seen.append(got)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert clone.epoch == 0 and ds.epoch == 2


def test_max_open(table):
    d, csv = table
    ds = SlideDataset(csv, 32, level=2, crop="center", max_open=2)
    for i in range(4):
        ds[i]
    assert len(ds._open) == 2
    ds.close()
    assert len(ds._open) == 0


def test_bad_tables_and_arguments(table, tmp_path):
    d, csv = table
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.svs,0\n")
    with pytest.raises(ValueError, match="'path' and 'label'"):
        SlideDataset(bad, 64, level=0)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    with pytest.raises(ValueError, match="empty"):
        SlideDataset(empty, 64, level=0)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nnothere.svs,1\nalso.svs,0\n")
    with pytest.raises(FileNotFoundError, match="nothere.svs.*and 1 more"):
        SlideDataset(missing, 64, level=0)
    with pytest.raises(FileNotFoundError):
        SlideDataset(tmp_path / "no.csv", 64, level=0)
    with pytest.raises(ValueError, match="exactly one of"):
        SlideDataset(csv, 64)
    with pytest.raises(ValueError, match="exactly one of"):
        SlideDataset(csv, 64, level=0, mpp=1.0)
    with pytest.raises(ValueError, match="crop"):
        SlideDataset(csv, 64, level=0, crop="middle")
    with pytest.raises(ValueError, match="size"):
        SlideDataset(csv, -3, level=0)
    with pytest.raises(ValueError, match="size"):
        SlideDataset(csv, (1 << 20, 1 << 20), level=0)
    with pytest.raises(ValueError, match="mpp must be positive"):
        SlideDataset(csv, 64, mpp=0.0)
    with pytest.raises(TypeError, match="augment"):
        SlideDataset(csv, 64, level=0, augment="yes")
    with pytest.raises(ValueError, match="pair"):
        SlideDataset([("a.svs",)], 64, level=0)
    # a file that is not a slide fails when read, naming it
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide")
    ds = SlideDataset([(junk, 0)], 64, level=0)
    with pytest.raises(ValueError, match="junk.svs"):
        ds[0]

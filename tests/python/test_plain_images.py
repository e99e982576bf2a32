"""Plain images (PNG, JPEG, striped TIFF, BMP, WebP, ...) read as one-level
slides through Pillow, microns per pixel given by the caller (``Slide(mpp=,
default_mpp=)``, a table's ``mpp`` column, ``SlideDataset(slide_mpp=)``),
and every bad input."""

import gc
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import streamcnn
import streamcnn._plain as plain
from streamcnn import Slide
from streamcnn.data import SlideDataset, synthetic
from streamcnn.slide import resize_uint8


def _pixels(h=61, w=83, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)


LOSSLESS = [("png", {}), ("bmp", {}), ("tif", {}), ("tif", {"compression": "tiff_lzw"}),
            ("webp", {"lossless": True})]


@pytest.mark.parametrize("ext,opts", LOSSLESS)
def test_lossless_formats_read_exactly(tmp_path, ext, opts):
    a = _pixels()
    path = tmp_path / f"im.{ext}"
    Image.fromarray(a).save(path, **opts)
    with Slide(str(path)) as s:
        assert s.in_memory and s.level_count == 1
        assert s.level_dimensions == [(83, 61)] and s.level_downsamples == [1.0]
        assert s.properties["streamcnn.reader"] == "pillow"
        assert s.mpp is None and s.vendor is None and s.background == (255, 255, 255)
        whole = s.read(level=0)
        assert torch.equal(whole, _chw(a))
        # a region reaching outside: the background there
        r = s.read_region((-3, 50), 0, (20, 15))
        assert torch.equal(r[:, :11, 3:], _chw(a[50:61, 0:17]))
        assert (r[:, 11:] == 255).all() and (r[:, :, :3] == 255).all()
        assert torch.equal(s.read_region((-3, 50), 0, (20, 15), channels_last=True),
                           r.permute(1, 2, 0))
        assert (s.read_region((500, 500), 0, (4, 4)) == 255).all()
        # parts are the whole's pixels; a resampled read is resize_uint8 of the region
        assert torch.equal(s.read_region((5, 7), 0, (40, 30), box=(3, 4, 10, 9)),
                           _chw(a[11:20, 8:18]))
        scaled = s.read_scaled((0, 0), 2.5, (33, 24))
        assert torch.equal(scaled, resize_uint8(_chw(a[:60, :83]).contiguous(), (24, 33),
                                                source_size=(60, 83)))
        assert torch.equal(s.read_scaled((0, 0), 2.5, (33, 24), box=(4, 5, 20, 11)),
                           scaled[:, 5:16, 4:24])


def test_jpeg_reads_as_pillow_decodes(tmp_path):
    a = _pixels(120, 97)
    path = tmp_path / "im.jpg"
    Image.fromarray(a).save(path, quality=80)
    with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB"))
    with Slide(str(path)) as s:
        assert s.properties["streamcnn.format"] == "JPEG"
        assert torch.equal(s.read(level=0), _chw(ref))


@pytest.mark.parametrize("ext,opts", [("png", {}), ("jpg", {"quality": 90}),
                                      ("webp", {"lossless": True})])
def test_exif_orientation_is_applied(tmp_path, monkeypatch, ext, opts):
    """A photo's EXIF Orientation (1 .. 8) turns the image upright as
    PIL.ImageOps.exif_transpose (and image viewers) do: the slide's size is
    the upright one and every pixel is where exif_transpose puts it, also
    when the image is converted in several bands of rows. A striped TIFF's
    Orientation tag Pillow applies itself as it decodes (not twice)."""
    from PIL import ImageOps
    monkeypatch.setattr(plain, "_BAND_PIXELS", 83 * 7)   # bands of 7 rows of 61
    a = _pixels()
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        path = tmp_path / f"o{o}.{ext}"
        Image.fromarray(a).save(path, exif=exif.tobytes(), **opts)
        with Image.open(path) as im:
            want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        with Slide(str(path)) as s:
            assert s.dimensions == (want.shape[1], want.shape[0]), o
            assert s.dimensions == ((83, 61) if o < 5 else (61, 83)), o
            assert s.properties.get("streamcnn.exif-orientation") == (None if o == 1 else str(o))
            assert torch.equal(s.read(level=0), _chw(want)), o
            assert torch.equal(s.read_region((5, 7), 0, (20, 30)),
                               _chw(want[7:37, 5:25])), o
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "o6.tif", exif=exif.tobytes())
    with Slide(str(tmp_path / "o6.tif")) as s:  # Pillow turns a TIFF itself, once
        assert s.dimensions == (61, 83) and "streamcnn.exif-orientation" not in s.properties
        assert torch.equal(s.read(level=0), _chw(np.rot90(a, k=-1)))
    # a damaged EXIF block: the pixels as stored
    Image.fromarray(a).save(tmp_path / "bad.png", exif=b"Exif\x00\x00MM\x00*junk")
    with Slide(str(tmp_path / "bad.png")) as s:
        assert s.dimensions == (83, 61) and torch.equal(s.read(level=0), _chw(a))


def test_striped_tiff_reads(tmp_path):
    """OpenSlide refuses a striped TIFF; it is read as a plain image."""
    striped = str(tmp_path / "striped.tif")
    img = torch.from_numpy(_pixels(64, 80))
    synthetic.write_striped_tiff(striped, img)
    with Slide(striped) as s:
        assert s.in_memory and s.dimensions == (80, 64)
        assert torch.equal(s.read(level=0), img.permute(2, 0, 1))


def test_modes_become_rgb(tmp_path):
    """Grey, bilevel, palette, CMYK and alpha images as Pillow converts them;
    alpha composited over white."""
    a = _pixels(20, 30)
    grey = a[..., 0]
    cases = {"L": Image.fromarray(grey, "L"),
             "1": Image.fromarray(grey > 128),
             "P": Image.fromarray(a).quantize(16),
             "CMYK": Image.fromarray(a).convert("CMYK"),
             "RGBA": Image.fromarray(np.dstack([a, np.arange(600).reshape(20, 30) % 256])
                                     .astype(np.uint8), "RGBA"),
             "LA": Image.fromarray(np.dstack([grey, 255 - grey]).astype(np.uint8), "LA")}
    for mode, im in cases.items():
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        if mode == "CMYK":
            path = tmp_path / "cmyk.tif"
        im.save(path)
        with Image.open(path) as back:
            assert back.mode == mode, (mode, back.mode)
            if mode in ("RGBA", "LA"):
                rgba = np.asarray(back.convert("RGBA")).astype(np.float64)
                al = rgba[..., 3:] / 255
                ref = np.floor(rgba[..., :3] * al + 255 * (1 - al) + 0.5)
            else:
                ref = np.asarray(back.convert("RGB")).astype(np.float64)
        with Slide(str(path)) as s:
            got = s.read(level=0).permute(1, 2, 0).double().numpy()
            # Pillow's integer compositing rounds; within 1 of the exact blend
            assert np.abs(got - ref).max() <= (1 if mode in ("RGBA", "LA") else 0), mode
    # fully transparent is the background, fully opaque the colour
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, :3] = (10, 200, 30)
    rgba[:2, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    with Slide(str(tmp_path / "t.png")) as s:
        px = s.read(level=0)
        assert (px[:, 2:] == 255).all() and px[:, :2].permute(1, 2, 0).tolist() == \
            [[[10, 200, 30]] * 4] * 2


def test_16bit_and_float_refused(tmp_path):
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 50).save(
        tmp_path / "a16.png")
    Image.fromarray(np.ones((20, 30), np.float32)).save(tmp_path / "f.tif")
    for name, depth in (("a16.png", "16-bit"), ("f.tif", "32-bit float")):
        with pytest.raises(ValueError, match=f"{name}.*{depth} samples.*convert it to 8-bit RGB"):
            Slide(str(tmp_path / name))


def test_mpp_from_tiff_resolution(tmp_path):
    a = _pixels()
    Image.fromarray(a).save(tmp_path / "cm.tif", resolution=20000.0, resolution_unit=3)
    Image.fromarray(a).save(tmp_path / "inch.tif", resolution=300.0, resolution_unit=2)
    Image.fromarray(a).save(tmp_path / "dpi.png", dpi=(300, 300))
    with Slide(str(tmp_path / "cm.tif")) as s:
        assert s.mpp == pytest.approx((0.5, 0.5)) and s.file_mpp == s.mpp
        assert s.read(mpp=1.0).shape == (3, 30, 42)  # 61 x 83 at half the resolution
    for name in ("inch.tif", "dpi.png"):  # 300 dpi says nothing of the pixel
        with Slide(str(tmp_path / name)) as s:
            assert s.mpp is None
            with pytest.raises(ValueError, match="microns-per-pixel"):
                s.read(mpp=1.0)


def test_mpp_given(tmp_path):
    Image.fromarray(_pixels()).save(tmp_path / "a.png")
    Image.fromarray(_pixels()).save(tmp_path / "cm.tif", resolution=20000.0,
                                    resolution_unit=3)
    png, tif = str(tmp_path / "a.png"), str(tmp_path / "cm.tif")
    assert Slide(png, mpp=0.25).mpp == (0.25, 0.25)
    assert Slide(png, mpp=(0.25, 0.3)).mpp == (0.25, 0.3)
    assert Slide(png, mpp=np.float32(0.5)).mpp == (0.5, 0.5)
    assert Slide(png, default_mpp=2).mpp == (2.0, 2.0)
    assert Slide(tif, default_mpp=2).mpp == pytest.approx((0.5, 0.5))  # the file's wins
    assert Slide(tif, mpp=2).mpp == (2.0, 2.0)                         # mpp= replaces it
    with Slide(png, mpp=0.5) as s:
        assert s.read(mpp=1.0).shape == (3, 30, 42)
    for bad in (0, -1, float("nan"), float("inf"), "x", True, (1, 2, 3), (1, 0), [None, 1]):
        with pytest.raises(ValueError, match="mpp"):
            Slide(png, mpp=bad)
        with pytest.raises(ValueError, match="mpp"):
            Slide(png, default_mpp=bad)


def test_openslide_slides_take_mpp_too(tmp_path):
    if not streamcnn.slide.available():
        pytest.skip("streamcnn built without OpenSlide")
    path = str(tmp_path / "s.svs")
    synthetic.make_slide(path, 256, 192, seed=1, tile=64, mpp=0.5)
    with Slide(path) as s:
        assert not s.in_memory and s.mpp == (0.5, 0.5)
    with Slide(path, mpp=0.25, default_mpp=9) as s:
        assert s.mpp == (0.25, 0.25) and s.file_mpp == (0.5, 0.5)
    synthetic.make_slide(str(tmp_path / "g.tif"), 256, 192, seed=1, tile=64)
    with Slide(str(tmp_path / "g.tif"), default_mpp=0.7) as s:
        assert s.file_mpp is None and s.mpp == (0.7, 0.7)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(ValueError, match="junk.bin.*neither a slide OpenSlide can read.*nor an "
                                         "image Pillow can read"):
        Slide(str(junk))
    with pytest.raises(ValueError, match="a directory"):
        Slide(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        Slide(str(tmp_path / "nope.png"))
    # truncated: the header opens, the pixels do not decode; the next read says so again
    Image.fromarray(_pixels(200, 200)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with Slide(str(tmp_path / "cut.png")) as s:
        for _ in range(2):
            with pytest.raises(ValueError, match="cut.png.*cannot decode the PNG image"):
                s.read(level=0)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        Slide(str(tmp_path / "empty.png"))


def test_pixel_bound_refuses_before_decoding(tmp_path, monkeypatch):
    """An image over MAX_IMAGE_PIXELS is refused from its header (a PNG
    claiming 100000^2 pixels in a few bytes allocates nothing), with the way
    out; Pillow's own bound is left as it was."""
    Image.fromarray(_pixels(40, 50)).save(tmp_path / "a.png")
    monkeypatch.setattr(plain, "MAX_IMAGE_PIXELS", 1999)
    with pytest.raises(ValueError, match=r"50 x 40 pixels is larger than.*tiled pyramidal "
                                         r"TIFF.*vips tiffsave"):
        Slide(str(tmp_path / "a.png"))
    monkeypatch.undo()
    # a PNG claiming 100000 x 100000 pixels in 100 bytes
    chunk = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + _png_chunk(
        b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="100000 x 100000 pixels is larger than"):
        Slide(str(tmp_path / "bomb.png"))
    assert Image.MAX_IMAGE_PIXELS == before


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_closed_and_threads(tmp_path):
    a = _pixels(300, 200)
    Image.fromarray(a).save(tmp_path / "a.png")
    s = Slide(str(tmp_path / "a.png"))
    results = []

    def read(k):  # the first reads race to decode: one decode, the same pixels
        results.append((k, s.read_region((k, k), 0, (50, 40))))

    threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for k, r in results:
        assert torch.equal(r, _chw(a[k:k + 40, k:k + 50]))
    s.close()
    assert s.closed and "closed" in repr(s)
    with pytest.raises(ValueError, match="closed"):
        s.read(level=0)
    s.close()  # twice is fine
    gc.collect()


def _write_pngs(folder, n=4, size=96):
    rows = []
    for i in range(n):
        a = _pixels(size + 8 * i, size, seed=i)
        Image.fromarray(a).save(folder / f"im{i}.png")
        rows.append((folder / f"im{i}.png", i % 2, a))
    return rows


def test_dataset_on_plain_images(tmp_path):
    rows = _write_pngs(tmp_path)
    # slide_mpp for files that carry none; the center crop at 2x that mpp
    ds = SlideDataset([(str(p), lab) for p, lab, _ in rows], 32, mpp=1.0, crop="center",
                      slide_mpp=0.5)
    for i, (p, lab, a) in enumerate(rows):
        img, y = ds[i]
        h, w = a.shape[:2]
        x0, y0 = round(w / 2 - 32), round(h / 2 - 32)
        with Slide(str(p), mpp=0.5) as s:
            assert torch.equal(img, s.read_scaled((x0, y0), 2.0, (32, 32)))
        assert y == lab
    # a table's mpp replaces slide_mpp (and the file's) per row
    t = tmp_path / "t.csv"
    t.write_text("path,label,mpp\nim0.png,0,1.0\nim1.png,1,\n")
    ds2 = SlideDataset(str(t), 32, mpp=1.0, crop="center", slide_mpp=0.5)
    assert ds2.mpps == [1.0, None]
    assert ds2.slide(0).mpp == (1.0, 1.0) and ds2.slide(1).mpp == (0.5, 0.5)
    assert torch.equal(ds2[1][0], ds[1][0])
    # at most max_decoded plain images held decoded
    ds3 = SlideDataset([(str(p), lab) for p, lab, _ in rows], 32, mpp=1.0, crop="tissue",
                       slide_mpp=0.5, max_decoded=2)
    for i in range(len(rows)):
        ds3[i]
        assert sum(s.in_memory for s in ds3._open.values()) <= 2
    assert len(ds3._open) == 2


def test_dataset_bad_mpp(tmp_path):
    rows = _write_pngs(tmp_path, n=2)
    pairs = [(str(p), lab) for p, lab, _ in rows]
    ds = SlideDataset(pairs, 32, mpp=1.0)
    with pytest.raises(ValueError, match="im0.png.*no microns-per-pixel.*slide_mpp"):
        ds[0]
    assert SlideDataset(pairs, 32, level=0)[0][0].shape == (3, 32, 32)  # by level: no mpp
    t = tmp_path / "t.csv"
    for bad in ("0", "-1", "abc", "nan", "inf"):
        t.write_text(f"path,label,mpp\nim0.png,0,{bad}\n")
        with pytest.raises(ValueError, match=f"t.csv line 2: mpp '{bad}' is not a positive"):
            SlideDataset(str(t), 32, mpp=1.0)
    with pytest.raises(ValueError, match="table row 0: mpp -2"):
        SlideDataset([(pairs[0][0], 0, -2)], 32, mpp=1.0)
    with pytest.raises(ValueError, match="table row 0 must be"):
        SlideDataset([(pairs[0][0], 0, 1, 2)], 32, mpp=1.0)
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(ValueError, match="slide_mpp"):
            SlideDataset(pairs, 32, mpp=1.0, slide_mpp=bad)
    with pytest.raises(ValueError, match="max_decoded"):
        SlideDataset(pairs, 32, mpp=1.0, max_decoded=0)


def test_multipage_tiff_reads_its_first_page(tmp_path):
    a, b = _pixels(40, 50, seed=1), _pixels(20, 25, seed=2)
    Image.fromarray(a).save(tmp_path / "pages.tif", save_all=True,
                            append_images=[Image.fromarray(b)])
    with Slide(str(tmp_path / "pages.tif")) as s:
        assert s.level_count == 1 and s.dimensions == (50, 40)
        assert torch.equal(s.read(level=0), _chw(a))


def test_truncated_refused_even_when_pillow_is_told_to_load_them(tmp_path):
    """A training script that sets ImageFile.LOAD_TRUNCATED_IMAGES (a common
    way to silence errors) still gets an error, never a partly grey image."""
    from PIL import ImageFile
    Image.fromarray(_pixels(200, 200)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Slide(str(tmp_path / "cut.jpg")) as s:
            with pytest.raises(ValueError, match="cut.jpg.*cannot decode"):
                s.read(level=0)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is kept
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


MUTATE = r"""
import os, random, sys, warnings
import numpy as np
from PIL import Image
from streamcnn import Slide
warnings.simplefilter("ignore")
folder, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
a = np.random.RandomState(1).randint(0, 256, (37, 45, 3)).astype(np.uint8)
seeds = []
for ext, opts in (("png", {}), ("jpg", {"quality": 70}), ("tif", {"compression": "tiff_lzw"}),
                  ("bmp", {}), ("gif", {}), ("webp", {})):
    p = os.path.join(folder, "seed." + ext)
    Image.fromarray(a).save(p, **opts)
    seeds.append((ext, open(p, "rb").read()))
counts = {"opened": 0, "read": 0, "refused": 0}
for k in range(n):
    ext, data = seeds[k % len(seeds)]
    b = bytearray(data)
    what = rng.random()
    if what < 0.3:
        b = b[:rng.randrange(1, len(b))]
    else:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 64) if rng.random() < 0.5 else len(b))
            b[i] = rng.randrange(256)
    p = os.path.join(folder, f"m{k}.{ext}")
    with open(p, "wb") as f:
        f.write(bytes(b))
    try:
        with Slide(p) as s:
            counts["opened"] += 1
            w, h = s.dimensions
            x = s.read_region((0, 0), 0, (min(w, 64), min(h, 64)))
            assert x.shape == (3, min(h, 64), min(w, 64)) and x.dtype.is_floating_point is False
            counts["read"] += 1
    except (ValueError, MemoryError) as e:
        assert "streamcnn" in str(e), repr(e)
        counts["refused"] += 1
    os.unlink(p)
print(counts)
"""


def test_mutated_files_raise_or_read_never_crash(tmp_path):
    """600 truncated or byte-flipped PNG, JPEG, TIFF, BMP, GIF and WebP
    files: each opens and reads a full-shape region, or raises a ValueError
    naming streamcnn; the process survives (run in a child)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", MUTATE, str(tmp_path), "600"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    counts = eval(r.stdout.strip().splitlines()[-1])
    assert counts["read"] > 50 and counts["refused"] > 50, counts

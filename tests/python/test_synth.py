"""The CAMELYON-like generator (tumour evidence only at high resolution) and
``streamcnn synth``: files, split, sidecars, determinism and bad input."""

import argparse
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from streamcnn.app import synth
from streamcnn.data import SlideDataset, synthetic
from streamcnn.slide import Slide


def _args(*argv):
    p = argparse.ArgumentParser()
    synth.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the generator -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    """A normal and a tumour image of the same seed (so the same normal tissue)."""
    a, ta, none = synthetic.camelyon_image(520, 516, seed=11, tissue_fraction=0.5,
                                           cluster_um=40)
    b, tb, boxes = synthetic.camelyon_image(520, 516, seed=11, tumour=True,
                                            tissue_fraction=0.5, cluster_um=40)
    return a, ta, b, tb, none, boxes


def test_deterministic_and_tissue(pair):
    a, ta, b, tb, none, boxes = pair
    assert a.dtype == torch.uint8 and a.shape == (516, 520, 3)
    assert torch.equal(ta, tb) and none == []
    assert 0.45 < ta.float().mean() < 0.55
    assert (a[~ta] == 255).all() and (a[ta].float().mean(-1) < 230).all()   # tissue on white
    b2, _, boxes2 = synthetic.camelyon_image(520, 516, seed=11, tumour=True,
                                             tissue_fraction=0.5, cluster_um=40)
    assert torch.equal(b, b2) and boxes == boxes2
    c, _, _ = synthetic.camelyon_image(520, 516, seed=12, tumour=True, tissue_fraction=0.5,
                                       cluster_um=40)
    assert not torch.equal(b, c)


def test_clusters_only_where_reported(pair):
    a, ta, b, tb, _, boxes = pair
    assert len(boxes) == 3
    inside = torch.zeros(516, 520, dtype=torch.bool)
    for c in boxes:
        assert c["radius"] == pytest.approx(40 / 2 / 0.5)
        x0, y0, x1, y1 = c["box"]
        assert 0 <= x0 < c["x"] < x1 <= 520 and 0 <= y0 < c["y"] < y1 <= 516
        assert ta[c["y"], c["x"]]                       # centred on tissue
        inside[y0:y1, x0:x1] = True
        assert (a[y0:y1, x0:x1] != b[y0:y1, x0:x1]).any()  # each cluster is there
    diff = (a != b).any(-1)
    assert diff.any() and not diff[~inside].any()


def test_signal_only_at_high_resolution(pair):
    """4x: bit-identical to the normal slide; 2x: only a 2 x 2-constant part
    differs; 1x: more differs than that."""
    a, _, b, _, _, _ = pair
    la, lb = synthetic.pyramid(a, 64), synthetic.pyramid(b, 64)
    assert len(la) >= 3
    for k in range(2, len(la)):
        assert torch.equal(la[k], lb[k])
    d1 = lb[1].int() - la[1].int()
    assert d1.abs().max() > 0
    d0 = b.int() - a.int()
    h, w = d1.shape[0] * 2, d1.shape[1] * 2
    coarse = d1.repeat_interleave(2, 0).repeat_interleave(2, 1)
    fine = d0[:h, :w] - coarse                      # the 1-pixel part: zero sum on 2 x 2
    assert fine.abs().max() >= 10
    assert fine.reshape(h // 2, 2, w // 2, 2, 3).sum(dim=(1, 3)).abs().max() == 0
    # the mean colour of the tissue is unchanged
    assert d0.sum() == 0


def test_coarse_zero_makes_2x_identical():
    a, _, _ = synthetic.camelyon_image(256, 256, seed=3, tissue_fraction=0.5)
    b, _, boxes = synthetic.camelyon_image(256, 256, seed=3, tumour=True, coarse=0,
                                           tissue_fraction=0.5, cluster_um=30)
    assert boxes and not torch.equal(a, b)
    la, lb = synthetic.pyramid(a, 64), synthetic.pyramid(b, 64)
    assert torch.equal(la[1], lb[1])


def test_camelyon_bad_arguments():
    with pytest.raises(ValueError, match="at least 16"):
        synthetic.camelyon_image(8, 100)
    with pytest.raises(ValueError, match="mpp"):
        synthetic.camelyon_image(64, 64, mpp=0)
    with pytest.raises(ValueError, match="tissue_fraction"):
        synthetic.camelyon_image(64, 64, tissue_fraction=1.5)


def test_slide_file_4x_read_equals_normal(tmp_path):
    """Through the real file (JPEG tiles, OpenSlide): reading the tumour slide
    at 4x the pixel size gives the same pixels as its normal twin."""
    pa, pb = str(tmp_path / "a.svs"), str(tmp_path / "b.svs")
    assert synthetic.make_camelyon_slide(pa, 512, seed=5, tissue_fraction=0.5) == []
    boxes = synthetic.make_camelyon_slide(pb, 512, seed=5, tumour=True, tissue_fraction=0.5,
                                          cluster_um=40)
    assert boxes
    with Slide(pa) as sa, Slide(pb) as sb:
        assert sa.mpp == pytest.approx((0.5, 0.5)) and sa.level_count == 3
        assert sa.level_downsamples[1:] == pytest.approx((2, 4))
        assert (sb.mpp, sb.level_downsamples) == (sa.mpp, sa.level_downsamples)
    ds = SlideDataset([(pa, 0), (pb, 1)], 128, mpp=2.0, crop="center")
    assert torch.equal(ds[0][0], ds[1][0])
    full = SlideDataset([(pa, 0), (pb, 1)], 512, mpp=0.5, crop="center")
    assert not torch.equal(full[0][0], full[1][0])


# -- streamcnn synth ---------------------------------------------------------------------

def test_synth_writes_a_data_set(tmp_path, capsys):
    out = tmp_path / "set"
    assert synth.run(_args(out, "--slides", 5, "--size", 256, "--seed", 2,
                           "--tumour-size", 30, "--quiet")) == 0
    assert capsys.readouterr().out == ""
    train, val = _rows(out / "train.csv"), _rows(out / "val.csv")
    assert list(train[0]) == ["path", "label"]
    assert len(train) + len(val) == 5
    assert {r["label"] for r in train} == {"0", "1"} == {r["label"] for r in val}
    paths = [r["path"] for r in train + val]
    assert sorted(paths) == [f"slide_{i:03d}.svs" for i in range(5)]
    assert sum(int(r["label"]) for r in train + val) == 2          # balanced: 5 // 2 tumour
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".")]             # no temporary left
    for r in train + val:
        side = json.loads((out / r["path"].replace(".svs", ".json")).read_text())
        assert side["label"] == int(r["label"]) and side["mpp"] == 0.5
        assert (len(side["clusters"]) == 3) == (side["label"] == 1)
        for c in side["clusters"]:
            assert set(c) == {"x", "y", "radius", "box"}
    ds = SlideDataset(str(out / "train.csv"), 256, mpp=0.5)
    img, label = ds[0]
    assert img.shape == (3, 256, 256) and label in (0, 1)
    assert json.loads((out / "synth.json").read_text())["slides"] == 5


def test_synth_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        synth.run(_args(d, "--slides", 4, "--size", 256, "--tumour-size", 30, "--quiet"))
    for name in ("train.csv", "val.csv", "slide_001.svs", "slide_001.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--slides", 3], "--slides must be at least 4"),
    (["--size", 100], "--size must be in"),
    (["--mpp", 0], "--mpp must be positive"),
    (["--val-fraction", 1], "--val-fraction"),
    (["--tumour-size", 200], "--tumour-size 200 um is 400 px"),
    (["--fine", 0, "--coarse", 0], "not both 0"),
])
def test_synth_bad_options(tmp_path, argv, message):
    out = tmp_path / "set"
    with pytest.raises(ValueError, match=message) as e:
        synth.run(_args(out, "--size", 256, "--quiet", *argv))
    assert str(e.value).startswith("streamcnn: ")
    assert not out.exists()


def test_synth_bad_out_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        synth.run(_args(f, "--slides", 4, "--size", 256, "--quiet"))
    with pytest.raises(ValueError, match="parent folder"):
        synth.run(_args(f / "sub", "--slides", 4, "--size", 256, "--quiet"))
    # a folder nobody can write into (root included): /proc
    with pytest.raises(ValueError, match="cannot write into OUT_DIR|not writable"):
        synth.run(_args("/proc/self", "--slides", 4, "--size", 256, "--quiet"))


def test_synth_refuses_an_existing_set_and_overwrites(tmp_path):
    out = tmp_path / "set"
    opts = ["--size", 256, "--tumour-size", 30, "--quiet"]
    synth.run(_args(out, "--slides", 6, *opts))
    before = (out / "train.csv").read_bytes()
    with pytest.raises(ValueError, match="already holds a data set"):
        synth.run(_args(out, "--slides", 4, *opts))
    assert (out / "train.csv").read_bytes() == before
    synth.run(_args(out, "--slides", 4, "--seed", 1, "--overwrite", *opts))
    assert sorted(n for n in os.listdir(out) if n.endswith(".svs")) == \
        [f"slide_{i:03d}.svs" for i in range(4)]                   # stale slides gone
    assert len(_rows(out / "train.csv")) + len(_rows(out / "val.csv")) == 4


def test_synth_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def broken(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = synthetic.make_camelyon_slide
    monkeypatch.setattr(synthetic, "make_camelyon_slide", broken)
    out = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        synth.run(_args(out, "--slides", 4, "--size", 256, "--tumour-size", 30, "--quiet"))
    assert not out.exists()                         # created by the run: removed again
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        synth.run(_args(kept, "--slides", 4, "--size", 256, "--tumour-size", 30, "--quiet"))
    assert os.listdir(kept) == ["notes.txt"]        # an existing folder: only ours removed


def test_split_is_stratified():
    labels = [i % 2 for i in range(20)]
    train, val = synth.split(labels, 0.25, seed=0)
    assert sorted(train + val) == list(range(20))
    assert sum(labels[i] for i in val) == 2 and len(val) == 4       # round(0.25 * 10) per class
    train, val = synth.split([0, 1, 0, 1], 0.9, seed=0)
    assert len(train) == 2 and len(val) == 2


# -- through the console script ----------------------------------------------------------

STREAMCNN = os.path.join(os.path.dirname(sys.executable), "streamcnn")


@pytest.mark.skipif(not os.path.exists(STREAMCNN), reason="the console script is installed "
                    "by pip install . / make build; not in this environment")
def test_console_script(tmp_path):
    out = tmp_path / "set"
    r = subprocess.run([STREAMCNN, "synth", str(out), "--slides", "4", "--size", "256",
                        "--tumour-size", "30"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 4 slides (2 with tumour" in r.stdout
    assert len(_rows(out / "train.csv")) == 2 and len(_rows(out / "val.csv")) == 2
    bad = tmp_path / "bad"
    r = subprocess.run([STREAMCNN, "synth", str(bad), "--slides", "3"], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "streamcnn: --slides must be at least 4 (two of each class, so that train.csv and "
        "val.csv both hold both classes), got 3"]
    assert not bad.exists()

"""streamcnn predict: outputs, the CAM TIFF as a slide, bad input, and a
pointing game on synthetic tumour slides."""

import argparse
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streamcnn
from streamcnn.app import predict
from streamcnn.app.checkpoint import save_checkpoint
from streamcnn.classifier import build_model
from streamcnn.data import synthetic

pytestmark = pytest.mark.skipif(not streamcnn.slide.available(),
                                reason="built without OpenSlide / libtiff")

MEAN, STD = [124.0, 116.0, 104.0], [58.0, 57.0, 57.0]


def _config(task="classification", outputs=2, head="max", mpp=1.0, size=128, crop=None):
    return dict(model="resnet18", stream_upto="layer1", head=head, num_outputs=outputs,
                tile_size=256, memory_budget=None, mean=MEAN, std=STD, task=task,
                image_size=size, mpp=mpp, **({} if crop is None else {"crop": crop}))


def _checkpoint(path, **kw):
    cfg = _config(**kw)
    torch.manual_seed(0)
    m = build_model("resnet18", num_outputs=cfg["num_outputs"], stream_upto="layer1",
                    head=cfg["head"], tile_size=256, mean=MEAN, std=STD)
    save_checkpoint(str(path), {"config": cfg, "model": m.state_dict()})
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    synthetic.make_slide(str(d / "a.svs"), 520, 400, tumour=True, seed=1, mpp=0.5)
    synthetic.make_slide(str(d / "b.svs"), 384, 384, seed=2, mpp=0.5)
    synthetic.write_slide(str(d / "blank.svs"),
                          [torch.full((256, 320, 3), 255, dtype=torch.uint8)],
                          description=synthetic.aperio_description(320, 256, 256, 0.5))
    synthetic.make_slide(str(d / "coarse.svs"), 256, 256, seed=3, mpp=2.0)
    synthetic.write_striped_tiff(str(d / "striped.tif"),
                                 torch.zeros(64, 64, 3, dtype=torch.uint8))
    return {"dir": d, "ckpt": _checkpoint(d / "c.pt"),
            "reg": _checkpoint(d / "r.pt", task="regression", outputs=1)}


def _args(*argv):
    p = argparse.ArgumentParser()
    predict.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def _rows(out):
    with open(os.path.join(out, "predictions.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_full_slide_outputs_and_tiff(data, tmp_path, capsys):
    d = data["dir"]
    out = tmp_path / "out"
    rc = predict.run(_args(data["ckpt"], d / "a.svs", d / "b.svs", "--out", out,
                           "--full-slide", "--quiet"))
    assert rc == 0
    rows = _rows(out)
    assert [r["slide"] for r in rows] == ["a", "b"] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        p0, p1 = float(r["prob_0"]), float(r["prob_1"])
        assert abs(p0 + p1 - 1) < 1e-5 and r["prediction"] in ("0", "1")
        assert r["mpp"] == "1"
    for name, (w0, h0) in (("a", (520, 400)), ("b", (384, 384))):
        for suffix in ("_cam.png", "_saliency.png", "_cam.tif"):
            assert (out / f"{name}{suffix}").stat().st_size > 0
        # the CAM covers the whole slide at the analysis mpp (1 um/px = 2x level 0)
        with streamcnn.Slide(out / f"{name}_cam.tif") as s:
            assert s.dimensions == ((w0 + 1) // 2, (h0 + 1) // 2)
            assert s.mpp == (1.0, 1.0)
            assert s.level_count == 1
            px = s.read_region((0, 0), 0, s.dimensions)
        # coloured inside the analysed box, white outside
        r = rows[0 if name == "a" else 1]
        x, y = int(r["x"]) // 2, int(r["y"]) // 2
        bw, bh = (int(v) for v in r["region"].split("x"))
        inside = px[:, y + 2:y + bh - 2, x + 2:x + bw - 2]
        assert (inside != 255).any(dim=0).float().mean() > 0.9
        outside = torch.ones(px.shape[1:], dtype=torch.bool)
        outside[max(0, y - 1):y + bh + 1, max(0, x - 1):x + bw + 1] = False   # (half-pixel origin)
        assert (px[:, outside] == 255).all()
    assert not [f for f in os.listdir(out) if f.startswith(".")]   # no temporaries


def test_cam_tiff_pyramid_levels(data, tmp_path):
    """A larger analysis region: the TIFF has reduced levels, each half the
    previous, with the mpp at level 0."""
    d = data["dir"]
    synthetic.make_slide(str(d / "big.svs"), 1400, 1100, seed=5, mpp=0.5)
    out = tmp_path / "o"
    rc = predict.run(_args(data["ckpt"], d / "big.svs", "--out", out, "--mpp", "0.5",
                           "--heatmap", "cam", "--quiet"))
    assert rc == 0
    with streamcnn.Slide(out / "big_cam.tif") as s:
        assert s.level_dimensions == [(1400, 1100), (700, 550), (350, 275)]
        assert s.mpp == (0.5, 0.5)
    assert not (out / "big_saliency.png").exists()


def test_bad_slides_reported_others_processed(data, tmp_path, capsys):
    d = data["dir"]
    out = tmp_path / "out"
    rc = predict.run(_args(data["ckpt"], d / "missing.svs", d / "striped.tif",
                           d / "coarse.svs", d / "b.svs", "--out", out, "--quiet"))
    assert rc == 2
    err = capsys.readouterr().err
    rows = {r["slide"]: r for r in _rows(out)}
    assert rows["b"]["status"] == "ok" and (out / "b_cam.tif").exists()
    assert rows["missing"]["status"] == "error" and "missing.svs does not exist" in err
    assert rows["striped"]["status"] == "error" and "striped.tif" in rows["striped"]["message"]
    # the checkpoint's 1 um/px is finer than the slide's 2 um/px: say the slide's mpp
    assert rows["coarse"]["status"] == "error"
    assert "has 2 um/px at its finest level (as the file says); it cannot provide 1 um/px " \
        "without upsampling: use --mpp 2 or coarser" in \
        rows["coarse"]["message"]
    for name in ("missing", "striped", "coarse"):
        assert not list(out.glob(f"{name}_*"))


def test_mpp_cannot_provide(data, tmp_path, capsys):
    rc = predict.run(_args(data["ckpt"], data["dir"] / "a.svs", "--out", tmp_path,
                           "--mpp", "0.25", "--quiet"))
    assert rc == 2
    assert "has 0.5 um/px at its finest level (as the file says); it cannot provide 0.25 " \
        "um/px" in \
        capsys.readouterr().err


def test_blank_slide_score_empty_map_warning(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = predict.run(_args(data["ckpt"], data["dir"] / "blank.svs", "--out", out, "--quiet"))
    assert rc == 2      # reported like a bad input, with its score and empty maps
    assert "has no tissue (blank)" in capsys.readouterr().err
    (row,) = _rows(out)
    assert row["status"] == "blank" and 0 <= float(row["score"]) <= 1
    with streamcnn.Slide(out / "blank_cam.tif") as s:
        assert (s.read_region((0, 0), 0, s.dimensions) == 255).all()   # empty map
    assert (out / "blank_cam.png").exists() and (out / "blank_saliency.png").exists()


def test_regression_checkpoint(data, tmp_path):
    with pytest.raises(ValueError, match="regression model .* has no class map"):
        predict.run(_args(data["reg"], data["dir"] / "b.svs", "--out", tmp_path / "no",
                          "--heatmap", "cam"))
    assert not (tmp_path / "no").exists()       # refused: nothing written
    out = tmp_path / "o"
    assert predict.run(_args(data["reg"], data["dir"] / "b.svs", "--out", out,
                             "--quiet")) == 0
    (row,) = _rows(out)
    float(row["prediction"])
    assert (out / "b_saliency.png").exists() and not (out / "b_cam.png").exists()


def test_output_dir_not_writable(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="output directory .* is not writable"):
        predict.run(_args(data["ckpt"], data["dir"] / "b.svs", "--out", blocker / "sub"))
    with pytest.raises(ValueError, match="output directory .*file exists and is not a "
                       "directory"):
        predict.run(_args(data["ckpt"], data["dir"] / "b.svs", "--out", blocker))


def test_target_by_index_or_name(data, tmp_path):
    """--target: a class index, or a name of the run's --classes; anything
    else is refused before the output folder is made."""
    named = str(tmp_path / "named.pt")
    ckpt = torch.load(data["ckpt"], weights_only=False)
    ckpt["config"]["classes"] = "normal,tumour"
    torch.save(ckpt, named)
    for target, out in (("tumour", "a"), ("1", "b")):
        assert predict.run(_args(named, data["dir"] / "b.svs", "--out", tmp_path / out,
                                 "--heatmap", "cam", "--target", target, "--quiet")) == 0
        assert _rows(tmp_path / out)[0]["target"] == "1"
    for ckpt, target, match in ((named, "stroma", r"--target 'stroma' is neither a class "
                                 r"index nor a class name \(the run's --classes: normal, "
                                 r"tumour\)"),
                                (data["ckpt"], "tumour", "the run named no --classes"),
                                (named, "2", "--target 2 is out of range for 2 classes"),
                                (data["reg"], "1", "--target 1 is out of range for 1 output")):
        with pytest.raises(ValueError, match=match):
            predict.run(_args(ckpt, data["dir"] / "b.svs", "--out", tmp_path / "no",
                              "--heatmap", "saliency", "--target", target))
        assert not (tmp_path / "no").exists()


def test_command_line_exit_code(data, tmp_path):
    """As a process: a one-line message on stderr and exit code 2."""
    env = dict(os.environ)
    r = subprocess.run([str(Path(sys.executable).parent / "streamcnn"), "predict", data["reg"],
                        str(data["dir"] / "b.svs"), "--out", str(tmp_path), "--heatmap",
                        "both"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("streamcnn: ") and "regression" in lines[0]


def test_slides_after_the_options(data, tmp_path, capsys):
    """The command line takes SLIDEs on either side of the options (as
    'predict CKPT --out DIR *.svs' is typed), and options between them."""
    from streamcnn import cli
    d = data["dir"]
    out = tmp_path / "out"
    argv = ["predict", data["ckpt"], "--out", str(out), str(d / "a.svs"), "--heatmap", "none",
            str(d / "b.svs"), "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert [r["slide"] for r in _rows(out)] == ["a", "b"]
    assert cli.main(["predict", "--out", str(out)]) == 2
    assert "the following arguments are required: checkpoint" in capsys.readouterr().err
    assert cli.main(argv[:4] + ["--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_pointing_game_after_training():
    """After a tiny training on synthetic tumour / normal slides, the CAM's
    top location (through the streamed stem) lies on a true tumour cluster
    (the generator's boxes) on held-out slides; the full measurement is
    bench/pointing_game.py."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "bench"))
    try:
        import pointing_game as pg
    finally:
        sys.path.pop(0)
    sm, head, loss = pg.train(n_train=4, steps=150, batch=16)
    hits, n, chance, rows = pg.pointing_game(sm, head, range(200, 204))
    print(f"pointing game: {hits}/{n} hits, chance {chance:.2f}, loss {loss:.4f}", rows)
    assert chance < 0.4
    assert hits >= 3, rows


def test_slides_from_a_table(data, tmp_path, capsys):
    """--csv: the slides of a table (paths relative to it, its mpp column
    per slide), after any given on the command line; bad tables stop
    before anything is written."""
    d = data["dir"]
    t = d / "t.csv"
    # striped.tif carries no mpp: the table gives it (2 um/px: coarser than the
    # checkpoint's 1, so it is refused like coarse.svs, by the table's value)
    t.write_text("label;path;mpp\nx;a.svs;\ny;striped.tif;2\n")
    out = tmp_path / "out"
    rc = predict.run(_args(data["ckpt"], d / "b.svs", "--csv", t, "--out", out, "--quiet",
                           "--heatmap", "none"))
    rows = _rows(out)
    assert [r["slide"] for r in rows] == ["b", "a", "striped"] and rc == 2
    assert rows[0]["status"] == rows[1]["status"] == "ok"
    assert "has 2 um/px at its finest level" in rows[2]["message"]
    # the table's mpp replaces a.svs's 0.5: 1 um/px is 4 of its pixels
    t.write_text("path,mpp\na.svs,0.25\n")
    assert predict.run(_args(data["ckpt"], "--csv", t, "--out", tmp_path / "o2", "--quiet",
                             "--heatmap", "none")) == 0
    assert _rows(tmp_path / "o2")[0]["downsample"] == "4"
    for text, msg in (("file\na.svs\n", "needs a header with a 'path' column"),
                      ("path,mpp\na.svs,-1\n", "line 2: mpp '-1' is not a positive"),
                      ("path,mpp\n,\n\n", "no slides"), ("path\n", "no slides"),
                      ("path,mpp\n,0.5\n", "line 2: empty path")):
        t.write_text(text)
        with pytest.raises(ValueError, match=msg):
            predict.run(_args(data["ckpt"], "--csv", t, "--out", tmp_path / "bad", "--quiet"))
        assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        predict.run(_args(data["ckpt"], "--csv", d / "nope.csv", "--out", tmp_path / "bad"))
    with pytest.raises(ValueError, match="no slides: give SLIDE"):
        predict.run(_args(data["ckpt"], "--out", tmp_path / "bad"))


def test_slide_smaller_than_the_model_takes(data, tmp_path, capsys):
    """Inception-v3 takes images of 75 pixels at least: a slide read
    smaller than that fails naming both sizes (the others are predicted),
    and an --image-size below it is refused before anything is written."""
    cfg = dict(_config(size=96), model="inception_v3", stream_upto="Mixed_5b", tile_size=160)
    torch.manual_seed(0)
    m = build_model("inception_v3", stream_upto="Mixed_5b", tile_size=160, mean=MEAN, std=STD)
    ckpt = str(tmp_path / "inception.pt")
    save_checkpoint(ckpt, {"config": cfg, "model": m.state_dict()})
    d = data["dir"]
    out = tmp_path / "out"
    rc = predict.run(_args(ckpt, d / "a.svs", d / "b.svs", "--full-slide", "--mpp", "4",
                           "--heatmap", "cam", "--out", out, "--quiet"))
    assert rc == 2
    rows = {r["slide"]: r for r in _rows(out)}
    assert rows["b"]["status"] == "error" and not list(out.glob("b_*"))
    assert re.fullmatch(re.escape(f"{d / 'b.svs'}: the slide at 4 um/px is ") +
                        r"\d+ x \d+ pixels, smaller than the 75 x 75 the model takes",
                        rows["b"]["message"]), rows["b"]["message"]
    rc = predict.run(_args(ckpt, d / "a.svs", "--full-slide", "--mpp", "1", "--heatmap", "cam",
                           "--out", tmp_path / "ok", "--quiet"))
    (row,) = _rows(tmp_path / "ok")
    assert rc == 0 and row["status"] == "ok"
    assert min(int(v) for v in row["region"].split("x")) >= 75, row["region"]
    with pytest.raises(ValueError, match="--image-size 74 is smaller than the 75 x 75 pixels "
                       "the model takes"):
        predict.run(_args(ckpt, d / "a.svs", "--image-size", "74", "--out", tmp_path / "no"))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("layer", ["stem", "body"])
def test_features_saved(data, tmp_path, layer):
    """--features stem|body writes NAME_features.pt: the feature map of the
    region the scores are of (the stem's output, or the head's body's), the
    pooled embedding whose linear layer gives the logits, and its
    coordinates (the heatmaps' cone); the CSV names the file. A failed
    slide leaves none."""
    from streamcnn.app.checkpoint import load_model
    from streamcnn.heatmaps import map_cone, stem_cone
    d = data["dir"]
    out = tmp_path / "out"
    rc = predict.run(_args(data["ckpt"], d / "a.svs", d / "missing.svs", "--out", out,
                           "--full-slide", "--heatmap", "none", "--features", layer, "--quiet"))
    assert rc == 2
    rows = {r["slide"]: r for r in _rows(out)}
    assert rows["a"]["features"] == "a_features.pt" and rows["missing"]["status"] == "error"
    assert sorted(os.listdir(out)) == ["a_features.pt", "predict.json", "predictions.csv"]
    saved = torch.load(out / "a_features.pt")
    model, _ = load_model(data["ckpt"])
    with streamcnn.Slide(str(d / "a.svs")) as s:
        x, y = int(rows["a"]["x"]), int(rows["a"]["y"])
        w, h = (int(v) for v in rows["a"]["region"].split("x"))
        assert saved["origin"] == (x, y) and saved["downsample"] == 2.0 and saved["mpp"] == 1.0
        img = s.read_scaled((x, y), 2.0, (w, h))
    with torch.no_grad():
        f = model.stem(img.unsqueeze(0))
        body = model.head.body(f)
        want = (f if layer == "stem" else body)[0]
        emb = model.head.pool(body)[0]
    torch.testing.assert_close(saved["features"], want)
    torch.testing.assert_close(saved["embedding"], emb)
    with torch.no_grad():
        logits = model.head.fc(saved["embedding"])
    p1 = float(torch.softmax(logits.double(), 0)[1])
    assert abs(p1 - float(rows["a"]["prob_1"])) < 1e-5
    cone = stem_cone(model.stem) if layer == "stem" else map_cone(model.stem, model.head)
    assert saved["stride"] == cone.stride and saved["center"] == cone.center
    assert saved["receptive_field"] == cone.receptive_field
    assert saved["layer"] == layer and saved["model"] == "resnet18"


def test_interrupted_run_resumes(data, tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM in the middle of a slide: the slides done so far
    are in predictions.partial.csv, the slide it was in has no files, and
    --resume analyses only what is left (and slides that failed), to the
    rows of an uninterrupted run."""
    from streamcnn.app.common import Terminated
    d = data["dir"]
    slides = [d / "a.svs", d / "missing.svs", d / "b.svs", d / "blank.svs"]
    whole = tmp_path / "whole"
    assert predict.run(_args(data["ckpt"], *slides, "--out", whole, "--quiet")) == 2
    real, calls = predict._predict_slide, []

    def stop_at(k, exc):
        def fake(path, name, *a, **kw):
            calls.append(name)
            if len(calls) == k:
                open(os.path.join(a[2].out, name + "_cam.png"), "wb").close()  # half done
                raise exc()
            return real(path, name, *a, **kw)
        return fake

    def partial():
        with open(out / "predictions.partial.csv", newline="") as f:
            return [(r["slide"], r["status"]) for r in csv.DictReader(f)]

    out = tmp_path / "out"
    args = [data["ckpt"], *slides, "--out", out, "--quiet", "--resume"]
    # Ctrl-C in b.svs (--resume without an earlier run: it starts)
    monkeypatch.setattr(predict, "_predict_slide", stop_at(3, KeyboardInterrupt))
    capsys.readouterr()
    assert predict.run(_args(*args)) == 130
    err = capsys.readouterr().err
    assert "streamcnn: interrupted after 2 of 4 slides; " in err and "--resume" in err
    assert calls == ["a", "missing", "b"]
    assert partial() == [("a", "ok"), ("missing", "error")]
    assert not (out / "predictions.csv").exists()
    assert not (out / "b_cam.png").exists()              # the slide it was in
    # what a SIGKILL in the middle of writing leaves (no finally ran): the
    # next run in the folder removes its temporary files, not others'
    stale = [".b_cam.tif.x64hiz9y.tmp", ".predictions.partial.csv.abcd_123.tmp"]
    for n in stale + [".notes.txt.abcd_123.tmp"]:
        (out / n).write_bytes(b"x")
    # SIGTERM in blank.svs: a.svs kept, missing.svs tried again
    calls.clear()
    monkeypatch.setattr(predict, "_predict_slide", stop_at(3, Terminated))
    assert predict.run(_args(*args)) == 143
    assert "streamcnn: terminated after 3 of 4 slides; " in capsys.readouterr().err
    left = set(os.listdir(out))
    assert not left & set(stale) and ".notes.txt.abcd_123.tmp" in left, left
    assert calls == ["missing", "b", "blank"]
    assert partial() == [("a", "ok"), ("missing", "error"), ("b", "ok")]
    calls.clear()
    monkeypatch.setattr(predict, "_predict_slide", stop_at(99, None))
    assert predict.run(_args(data["ckpt"], *slides, "--out", out, "--quiet", "--resume")) == 2
    assert calls == ["missing", "blank"]       # the failed slide again, and the one left
    assert not (out / "predictions.partial.csv").exists()
    assert _rows(out) == _rows(whole)
    for name in ("a", "b", "blank"):
        for sfx in ("_cam.png", "_saliency.png", "_cam.tif"):
            assert (out / f"{name}{sfx}").stat().st_size > 0
    # a run that ended: --resume with one slide more analyses that one
    calls.clear()
    assert predict.run(_args(data["ckpt"], *slides, d / "coarse.svs", "--out", out,
                             "--quiet", "--resume")) == 2
    assert calls == ["missing", "coarse"]
    # a file of a kept slide removed: that slide again
    calls.clear()
    (out / "b_cam.tif").unlink()
    assert predict.run(_args(data["ckpt"], *slides, "--out", out, "--quiet",
                             "--resume")) == 2
    assert calls == ["missing", "b"] and (out / "b_cam.tif").exists()


def test_resume_with_other_settings_refused(data, tmp_path, capsys):
    d = data["dir"]
    out = tmp_path / "out"
    # --resume without an earlier run: it starts
    assert predict.run(_args(data["ckpt"], d / "b.svs", "--out", out, "--quiet",
                             "--heatmap", "cam", "--resume")) == 0
    assert (out / "predict.json").exists()
    for extra, said in ((["--heatmap", "both"], "heatmap: 'cam' then, 'both' now"),
                        (["--heatmap", "cam", "--mpp", "2"], "mpp: 1.0 then, 2.0 now"),
                        (["--heatmap", "cam", "--full-slide"], "full_slide")):
        with pytest.raises(ValueError, match=re.escape(said)):
            predict.run(_args(data["ckpt"], d / "b.svs", "--out", out, "--quiet",
                              "--resume", *extra))
    # another checkpoint at the same path (retrained) is other settings too
    _checkpoint(tmp_path / "c2.pt")
    with pytest.raises(ValueError, match="checkpoint: "):
        predict.run(_args(tmp_path / "c2.pt", d / "b.svs", "--out", out, "--quiet",
                          "--heatmap", "cam", "--resume"))
    # the tile size only changes the speed
    assert predict.run(_args(data["ckpt"], d / "b.svs", "--out", out, "--quiet",
                             "--heatmap", "cam", "--resume", "--tile-size", "300")) == 0
    # without --resume the folder's run is replaced, whatever its settings
    assert predict.run(_args(data["ckpt"], d / "b.svs", "--out", out, "--quiet")) == 0
    (out / "predict.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not what predict writes"):
        predict.run(_args(data["ckpt"], d / "b.svs", "--out", out, "--quiet", "--resume"))


def test_one_predict_per_output_folder(data, tmp_path):
    from streamcnn.app.common import RunFolderBusy, lock_folder
    out = tmp_path / "out"
    out.mkdir()
    fd = lock_folder(str(out))
    try:
        with pytest.raises(RunFolderBusy, match="output folder .* in use by another "
                                                "streamcnn predict"):
            predict.run(_args(data["ckpt"], data["dir"] / "b.svs", "--out", out, "--quiet"))
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("crop", ["tissue", "center"])
def test_training_view_is_what_evaluate_reads(data, tmp_path, crop):
    """The default region is the training view of the run's crop: the same
    pixels as the training data (SlideDataset; a slide smaller than the
    view padded with its background, the crop's centre), so predict's
    probabilities are those of evaluate and val_predictions.csv; the
    origin in the table is where the view's pixel (0, 0) lies."""
    from streamcnn.app.checkpoint import load_model
    from streamcnn.data import SlideDataset
    d = data["dir"]
    ckpt = _checkpoint(tmp_path / "c.pt", crop=crop, size=160)
    out = tmp_path / "out"
    slides = [d / "a.svs", d / "b.svs"]
    assert predict.run(_args(ckpt, *slides, "--out", out, "--heatmap", "none",
                             "--quiet")) == 0
    model, _ = load_model(ckpt)
    ds = SlideDataset([(str(p), 0) for p in slides], 160, mpp=1.0, crop=crop)
    for i, r in enumerate(_rows(out)):
        with torch.no_grad():
            p = torch.softmax(model(ds[i][0].unsqueeze(0)).double(), 1)[0]
        assert abs(float(r["prob_1"]) - float(p[1])) < 1e-6, (crop, r["slide"])
        (x, y, _, _), (r0, c0), _, ds_ = ds.window(i)
        assert (float(r["x"]), float(r["y"])) == (x - c0 * ds_, y - r0 * ds_)
        assert r["region"] == "160x160"


def test_maps_of_a_slide_smaller_than_the_view(data, tmp_path, monkeypatch):
    """A slide far smaller than the analysed region (a 48 x 40 image read as
    a 128^2 view at 2x its pixels: 5x its size): the maps over the
    thumbnail are computed for the part on the slide alone, at most the
    thumbnail's size (it was the whole region at the thumbnail's scale:
    6.6 GB at the default --png-size for a 200^2 image, a 3 x 2 image
    asked for 3.9 TB); the PNG's size follows --png-size, which has a
    maximum."""
    from streamcnn import heatmaps as hm
    d = tmp_path / "d"
    d.mkdir()
    synthetic.make_slide(str(d / "small.svs"), 48, 40, seed=4, mpp=0.5)
    sizes, real = [], hm.upsample_map

    def spy(m, cone, size, **kw):
        sizes.append(tuple(size))
        return real(m, cone, size, **kw)
    monkeypatch.setattr(hm, "upsample_map", spy)
    out = tmp_path / "out"
    assert predict.run(_args(data["ckpt"], d / "small.svs", "--out", out, "--quiet",
                             "--png-size", "300")) == 0
    # the PNG's map: the slide's thumbnail (300 x 250); the TIFF's: the slide at 1 um/px
    assert (250, 300) in sizes and max(max(s) for s in sizes) <= 300, sizes
    from PIL import Image
    for f in ("small_cam.png", "small_saliency.png"):
        with Image.open(out / f) as im:   # at least 100 dpi: 800 x 667 and the colour bar
            assert 850 <= im.size[0] <= 1000 and 700 <= im.size[1] <= 760, im.size
    sizes.clear()
    assert predict.run(_args(data["ckpt"], d / "small.svs", "--out", out, "--quiet",
                             "--png-size", "1600", "--heatmap", "cam")) == 0
    assert max(max(s) for s in sizes) <= 1600
    with Image.open(out / "small_cam.png") as im:
        assert im.size[0] >= 1600                # the figure holds the thumbnail's pixels
    with pytest.raises(ValueError, match=r"--png-size must be in 16 \.\. 4096, got 5000"):
        predict.run(_args(data["ckpt"], d / "small.svs", "--out", out, "--png-size", "5000"))


@pytest.mark.parametrize("shape", [(3000, 100), (100, 3000)])
def test_maps_of_a_thin_slide_fill_their_figure(data, tmp_path, shape):
    """A slide 30 times wider than high (or higher than wide) gets a
    figure of its shape: the thumbnail, its colour bar along it and the
    text, cropped (it was drawn small in the middle of a mostly white
    figure, its colour bar as high as the figure)."""
    from PIL import Image
    w, h = shape
    img = synthetic.tissue_image(w, h, seed=4)
    Image.fromarray(img.numpy()).save(tmp_path / "thin.png")
    out = tmp_path / "out"
    assert predict.run(_args(data["ckpt"], tmp_path / "thin.png", "--out", out, "--quiet",
                             "--full-slide", "--slide-mpp", "1")) == 0
    for f in ("thin_cam.png", "thin_saliency.png"):
        with Image.open(out / f) as im:
            # 8 inches of thumbnail at 128 dpi (1024 pixels) and the margins
            # (it was 1216 x 512: 9.5 x 4 inches at least)
            long, short = max(im.size), min(im.size)
            assert 1024 <= long <= 1150 and short <= 320, (f, im.size)
            assert (im.size[0] > im.size[1]) == (w > h)


def test_rerun_without_resume_replaces_the_earlier_run(data, tmp_path):
    """Without --resume a run replaces the earlier one in the folder: the
    maps of slides it does not analyse again are removed with its tables
    (they were left beside the new ones as if current); files predict did
    not write stay, and a folder without predict.json is not touched."""
    d = data["dir"]
    out = tmp_path / "out"
    assert predict.run(_args(data["ckpt"], d / "a.svs", d / "b.svs", "--out", out,
                             "--heatmap", "cam", "--quiet")) == 0
    (out / "notes.txt").write_text("mine")
    assert predict.run(_args(data["ckpt"], d / "b.svs", "--out", out, "--heatmap", "cam",
                             "--quiet")) == 0
    assert sorted(os.listdir(out)) == ["b_cam.png", "b_cam.tif", "notes.txt", "predict.json",
                                       "predictions.csv"]
    assert [r["slide"] for r in _rows(out)] == ["b"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.csv").write_text("slide,path\na,a.svs\n")
    (other / "a_cam.png").write_bytes(b"not ours")
    assert predict.run(_args(data["ckpt"], d / "b.svs", "--out", other, "--heatmap", "cam",
                             "--quiet")) == 0
    assert (other / "a_cam.png").read_bytes() == b"not ours"


def test_pixels_not_square_are_that_slides_error(data, tmp_path):
    """A slide whose pixels are not square (0.5 um in x, 1 um in y) is read
    by predict at an mpp through Slide.downsample_for_mpp: that slide's
    error naming both sizes (it was squashed 2x in y), the others done."""
    from test_tiff_tags import _cm, _samples, _write
    path = _write(tmp_path / "aniso.tif", pixels=_samples(40, 48, 3, 1), tile=16,
                  tags=_cm(20000, 10000))
    out = tmp_path / "out"
    assert predict.run(_args(data["ckpt"], path, data["dir"] / "b.svs", "--out", out,
                             "--heatmap", "none", "--quiet")) == 2
    rows = {r["slide"]: r for r in _rows(out)}
    assert rows["b"]["status"] == "ok" and rows["aniso"]["status"] == "error"
    assert "not square (0.5 um in x, 1 um in y)" in rows["aniso"]["message"]


def test_read_scale_named(data, tmp_path):
    """An --mpp that would read a slide as less than one pixel is that
    slide's error naming the option (it was the reader's "resample span:
    sizes 0 -> 1")."""
    out = tmp_path / "out"
    assert predict.run(_args(data["ckpt"], data["dir"] / "b.svs", "--out", out, "--mpp",
                             "1e300", "--heatmap", "none", "--quiet")) == 2
    msg = _rows(out)[0]["message"]
    assert msg.startswith(f"--mpp 1e+300 would read slide {data['dir'] / 'b.svs'} "
                          "as "), msg
    assert "less than one (384 x 384 pixels of 0.5 um, as the file says)" in msg


@pytest.mark.parametrize("name,says", [("gpu", "not cpu, cuda or cuda:N"),
                                       ("cuda:x", "not cpu, cuda or cuda:N"),
                                       ("mps", "not cpu, cuda or cuda:N"),
                                       ("cuda:99", None)])
def test_bad_device_named(data, tmp_path, name, says):
    """--device that is not a device, or a CUDA device this machine lacks:
    one line naming it before anything is written (it was a traceback from
    model.to(device))."""
    if says is None:
        says = ("no CUDA device is available" if not torch.cuda.is_available() else
                "there are")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(f"streamcnn: --device {name}: {says}")):
        predict.run(_args(data["ckpt"], data["dir"] / "b.svs", "--out", out, "--device", name))
    assert not out.exists()


def test_inputs_are_never_outputs(data, tmp_path, capsys):
    """A run that would write or remove a file it reads is refused before
    anything is written, naming both: a slide called like an output
    (X_cam.png of slide X in --out: it was overwritten by X's map), a
    slide a rerun would remove as the earlier run's map (through a
    symbolic link too), the --csv table as predictions.csv, the
    checkpoint; a folder holding evaluate's results is refused."""
    import shutil
    d = data["dir"]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(d / "b.svs", out / "b_cam.png")
    shutil.copy(d / "b.svs", out / "b.svs")
    before = (out / "b_cam.png").read_bytes()
    with pytest.raises(ValueError, match=re.escape(
            f"streamcnn: slide {out / 'b_cam.png'} is where predict writes b_cam.png: "
            "move it out of the output folder, or give another --out")):
        predict.run(_args(data["ckpt"], out / "b.svs", out / "b_cam.png", "--out", out,
                          "--quiet"))
    assert sorted(os.listdir(out)) == ["b.svs", "b_cam.png"]
    assert (out / "b_cam.png").read_bytes() == before
    # an earlier run that analysed "a": its a_saliency.png would be removed
    # by a rerun; here it is (a link to) a slide of this run
    assert predict.run(_args(data["ckpt"], d / "a.svs", "--out", out, "--heatmap", "none",
                             "--quiet")) == 0
    link = tmp_path / "keep" / "link.svs"
    link.parent.mkdir()
    os.replace(out / "b_cam.png", out / "a_saliency.png")
    os.symlink(out / "a_saliency.png", link)
    with pytest.raises(ValueError, match=r"slide .*link\.svs is where predict writes "
                                         r"a_saliency\.png"):
        predict.run(_args(data["ckpt"], link, "--out", out, "--quiet"))
    assert (out / "a_saliency.png").read_bytes() == before
    # with --resume the earlier run's files are kept: no refusal for them
    assert predict.run(_args(data["ckpt"], link, "--out", out, "--heatmap", "none",
                             "--resume", "--quiet")) == 0
    assert (out / "a_saliency.png").read_bytes() == before
    # the table, the checkpoint
    table = tmp_path / "t" / "predictions.csv"
    table.parent.mkdir()
    table.write_text(f"path\n{d / 'b.svs'}\n")
    with pytest.raises(ValueError, match=r"--csv table .* is where predict writes "
                                         r"predictions\.csv"):
        predict.run(_args(data["ckpt"], "--csv", table, "--out", table.parent))
    assert table.read_text() == f"path\n{d / 'b.svs'}\n"
    shutil.copy(data["ckpt"], tmp_path / "t" / "c_features.pt")
    with pytest.raises(ValueError, match=r"checkpoint .* is where predict writes "
                                         r"c_features\.pt"):
        predict.run(_args(tmp_path / "t" / "c_features.pt", d / "b.svs", tmp_path / "t" /
                          "c.svs", "--out", table.parent, "--quiet"))
    # a slide listed twice: said, analysed for each listing
    capsys.readouterr()
    assert predict.run(_args(data["ckpt"], d / "b.svs", d / "b.svs", "--out", tmp_path / "2",
                             "--heatmap", "none", "--quiet")) == 0
    assert f"streamcnn: warning: slide {d / 'b.svs'} is listed 2 times: it is analysed once " \
        "per listing" in capsys.readouterr().err
    assert [r["slide"] for r in _rows(tmp_path / "2")] == ["b", "b_2"]
    # another folder's b.svs and a slide called b_2: every name its own (the
    # second b's maps were written over b_2's, one row named b_2 twice)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(d / "b.svs", other / "b.svs")
    shutil.copy(d / "a.svs", other / "b_2.svs")
    assert predict.run(_args(data["ckpt"], d / "b.svs", other / "b.svs", other / "b_2.svs",
                             d / "b.svs", "--out", tmp_path / "3", "--heatmap", "cam",
                             "--quiet")) == 0
    rows = _rows(tmp_path / "3")
    assert [r["slide"] for r in rows] == ["b", "b_2", "b_2_2", "b_3"]
    assert all((tmp_path / "3" / f"{r['slide']}_cam.png").exists() for r in rows)
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "evaluate.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds the results of streamcnn evaluate"):
        predict.run(_args(data["ckpt"], d / "b.svs", "--out", ev))

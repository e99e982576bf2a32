"""The ``streamcnn`` command line end to end, through the console script in
a subprocess: synth -> train -> evaluate -> export -> the TorchScript file in
a fresh process; the run folder's files; every bad input (exit 2, one line naming
the file / field / row, nothing written); Ctrl-C during an epoch. Runs whose
own process adds nothing under test (the options' runs, the resumes, the
single-class run, the bad inputs) call ``streamcnn.cli.main`` in this
process: each console-script process costs an interpreter start and the
torch / torchvision imports (~5-8 s here)."""

import csv
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import numpy as np
import torch
import yaml

import streamcnn
import streamcnn.classifier
from app_slides import write_set
from streamcnn.app.checkpoint import MODEL_KEYS, load_checkpoint, load_model

STREAMCNN = Path(sys.executable).parent / "streamcnn"
# small and fast: 256^2 images (the 512^2 slides at 1 um/px), ResNet-18
# streamed up to layer1 in 160-px tiles (several tiles per image)
SMALL = ["--image-size", "256", "--mpp", "1.0", "--model", "resnet18", "--stream-upto",
         "layer1", "--tile-size", "160", "--device", "cpu", "--quiet"]


def cli(*args, timeout=600, check_rc=None):
    assert STREAMCNN.exists(), (f"{STREAMCNN} is missing: install the package "
                                "(make build, or pip install --no-build-isolation .)")
    res = subprocess.run([str(STREAMCNN), *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    if check_rc is not None:
        assert res.returncode == check_rc, (res.returncode, res.stdout[-3000:],
                                            res.stderr[-3000:])
    return res


def cli_here(capsys, *args, check_rc=0):
    """``streamcnn ARGS`` in this process (``streamcnn.cli.main``, what the
    console script runs), for the runs where a process of its own adds
    nothing under test (the console script, its exit status through the
    OS and Ctrl-C are tested by the subprocess runs above and below):
    the same fields as ``cli``'s result."""
    from streamcnn.cli import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    res = subprocess.CompletedProcess(list(args), rc, cap.out, cap.err)
    if check_rc is not None:
        assert rc == check_rc, (rc, cap.out[-3000:], cap.err[-3000:])
    return res


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    write_set(d, n_train=4, n_val=4, size=512, seed=3)
    return d


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    """``streamcnn synth``: 8 slides of 512^2 (6 train, 2 validation)."""
    d = tmp_path_factory.mktemp("synth") / "data"
    cli("synth", d, "--slides", "8", "--size", "512", "--seed", "1", "--quiet", check_rc=0)
    return d


@pytest.fixture(scope="module")
def run_dir(synth_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    cli("train", "--train", synth_set / "train.csv", "--val", synth_set / "val.csv", "--out",
        out, *SMALL, "--mpp", "0.5", "--epochs", "2", "--batch-size", "3", "--optimizer",
        "sgd", "--lr", "0.01", "--augment", check_rc=0)
    return out


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder(run_dir):
    from PIL import Image
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(["config.yaml", "metrics.csv", "last.pt", "best.pt", "curves.png",
                            "roc.png", "val_predictions.csv"]), names
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert all(k in cfg for k in MODEL_KEYS) and cfg["epochs"] == 2 and cfg["augment"] is True
    rows = _csv(run_dir / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_auc", "seconds",
                             "peak_memory_mb"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(float(r["train_loss"])) and float(r["val_loss"]) > 0
        assert 0 <= float(r["val_auc"]) <= 1
        assert float(r["seconds"]) > 0 and float(r["peak_memory_mb"]) > 50
    last = load_checkpoint(str(run_dir / "last.pt"))
    assert last["epoch"] == 2 and len(last["metrics"]) == 2
    for k in ("model", "optimizer", "scheduler", "scaler", "rng", "config"):
        assert k in last, k
    assert set(last["rng"]) >= {"python", "numpy", "torch"}
    best = load_checkpoint(str(run_dir / "best.pt"))
    assert best["epoch"] in (1, 2)
    for png, size in (("curves.png", (900, 360)), ("roc.png", (450, 450))):
        with Image.open(run_dir / png) as im:
            assert im.format == "PNG" and im.size == size, (png, im.size)
            im.load()
    preds = _csv(run_dir / "val_predictions.csv")
    assert list(preds[0]) == ["path", "label", "score"]
    assert [(p["path"], p["label"]) for p in preds] == [
        (r["path"], r["label"]) for r in _csv(Path(cfg["val"]))]
    assert all(0 <= float(p["score"]) <= 1 for p in preds)
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_and_export(run_dir, synth_set, tmp_path):
    """synth -> train (run_dir) -> evaluate -> export -> the TorchScript file
    in a fresh process that only loads the operator library."""
    slides = synth_set
    res = cli("evaluate", run_dir / "last.pt", "--csv", slides / "val.csv", "--out",
              tmp_path / "ev", "--quiet", check_rc=0)
    auc = float(res.stdout.split()[1])
    rows = _csv(run_dir / "metrics.csv")
    assert abs(auc - float(rows[-1]["val_auc"])) < 1e-4, (auc, rows[-1])   # 4 decimals
    got = _csv(tmp_path / "ev" / "predictions.csv")
    want = _csv(run_dir / "val_predictions.csv")      # the last epoch's, from training
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(got, want)) < 1e-5

    cli("export", run_dir / "last.pt", tmp_path / "model.pt", check_rc=0)
    model, cfg = load_model(str(run_dir / "last.pt"))
    from streamcnn.data import SlideDataset
    ds = SlideDataset(str(slides / "val.csv"), cfg["image_size"], mpp=cfg["mpp"],
                      crop=cfg["crop"])
    x = torch.stack([ds[0][0], ds[1][0]])
    with torch.no_grad():
        want = model(x)
    torch.save(x, tmp_path / "x.pt")
    fresh = ("import sys, torch\n"
             "torch.ops.load_library(sys.argv[1])\n"
             "m = torch.jit.load(sys.argv[2])\n"
             "torch.save(m(torch.load(sys.argv[3])), sys.argv[4])\n"
             "assert 'streamcnn' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", fresh, streamcnn.library_path(),
                    str(tmp_path / "model.pt"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, capture_output=True, timeout=300)
    got = torch.load(tmp_path / "y.pt")
    assert got.shape == (2, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -- bad input ----------------------------------------------------------------------------
def _bad(capsys, args, *needles, out=None):
    """``streamcnn ARGS`` in this process (fast): exit status 2 and one line
    on stderr naming what is wrong; the run folder ``out`` not created."""
    from streamcnn.cli import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, (rc, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamcnn: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    if out is not None:
        assert not Path(out).exists(), "a refused run wrote its folder"
    return lines[0]


def test_console_script_usage_error(slides, tmp_path):
    res = cli(*_train(slides, tmp_path / "run", "--model", "efficientnet_b0"), timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "streamcnn: train: argument --model: invalid choice: 'efficientnet_b0' (choose from "
        + ", ".join(repr(a) for a in streamcnn.classifier.ARCHITECTURES) + ")"], res.stderr
    assert not (tmp_path / "run").exists()


def test_default_tile_covers_the_receptive_field(slides, tmp_path, capsys):
    """--model convnext_tiny without --tile-size: its stem to features[6]
    needs 1096 pixels for one output pixel, so the default tile is 1592
    (32 output pixels), not 1024 (which the stem refused); the run trains
    and says so."""
    out = tmp_path / "run"
    cli_here(capsys, "train", "--train", slides / "train.csv", "--val", slides / "val.csv",
             "--out", out, "--image-size", "256", "--mpp", "1.0", "--model", "convnext_tiny",
             "--device", "cpu", "--quiet", "--epochs", "1")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["tile_size"] == 1592 and saved["stream_upto"] == 6
    assert (out / "best.pt").exists()
    model, _ = load_model(str(out / "best.pt"))
    assert list(model.stem.tile_size) == [1592, 1592]


def test_image_too_small_for_the_model(slides, tmp_path, capsys):
    """An --image-size a layer of the network cannot take (Inception-v3's
    strided convolutions need 75 pixels) is one line naming the smallest
    size, before the run folder is written; 75 itself trains."""
    out = tmp_path / "run"
    args = ["train", "--train", slides / "train.csv", "--val", slides / "val.csv", "--out",
            out, "--mpp", "1.0", "--model", "inception_v3", "--stream-upto", "Mixed_5b",
            "--tile-size", "160", "--device", "cpu", "--quiet", "--epochs", "1"]
    _bad(capsys, args + ["--image-size", "74"], "--image-size 74 is too small for --model "
         "inception_v3 (streamed to Mixed_5b): it takes images of at least 75 x 75 pixels",
         out=out)
    cli_here(capsys, *args, "--image-size", "75")
    assert (out / "best.pt").exists()


def test_small_tile_warns_in_one_line(slides, tmp_path, capsys):
    """A --tile-size that gives 4 output pixels per tile (ResNet-18 to
    layer1: receptive field 43, stride 4) trains, and the library's warning
    is one line "streamcnn: warning: ...", not Python's two-line form."""
    import warnings
    small = list(SMALL)
    small[small.index("160")] = "56"
    small[small.index("256")] = "64"
    with warnings.catch_warnings():
        warnings.simplefilter("default")      # (the test suite ignores this warning)
        res = cli_here(capsys, "train", "--train", slides / "train.csv", "--val",
                       slides / "val.csv", "--out", tmp_path / "run", *small, "--epochs", "1")
    lines = [ln for ln in res.stderr.splitlines() if "output pixels per tile" in ln]
    assert lines == ["streamcnn: warning: tile_size (56, 56) gives 4 x 4 output pixels per "
                     "tile (receptive field 43 x 43, output stride 4 x 4): each tile's fixed "
                     "costs dominate and streaming is several times slower than with larger "
                     "tiles; tile_size (167, 167) gives 32 x 32"], res.stderr
    assert "UserWarning" not in res.stderr


def test_library_warnings_said_by_the_first_rank(monkeypatch, capsys):
    """Under torchrun or --tile-parallel (RANK set) a library warning is
    said by rank 0 alone, in one line (each rank said it, in Python's
    two-line form from --tile-parallel's spawned ranks); other warnings as
    Python shows them."""
    import warnings
    from streamcnn.cli import library_warnings
    for rank, shown in (("0", True), ("1", False), ("", True), (None, True)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with library_warnings():
                warnings.warn("streamcnn: small tiles", UserWarning)
                warnings.warn("another", UserWarning)
        err = capsys.readouterr().err
        assert ("streamcnn: warning: small tiles\n" in err) == shown, (rank, err)
        assert "streamcnn: warning: another" not in err      # (Python's way, pytest's here)


def _train(slides, out, *extra, train=None, val=None):
    return ["train", "--train", train or slides / "train.csv", "--val", val or slides /
            "val.csv", "--out", out, *SMALL, *extra]


def test_bad_tables(slides, tmp_path, capsys):
    out = tmp_path / "run"
    _bad(capsys, _train(slides, out, train=tmp_path / "nope.csv"), "nope.csv", "does not exist",
         out=out)
    _bad(capsys, _train(slides, out, val=tmp_path), str(tmp_path), "is a directory", out=out)
    t = tmp_path / "t.csv"
    t.write_text("file,y\ntrain_0.svs,0\n")
    _bad(capsys, _train(slides, out, train=t), "t.csv", "'path' and 'label'", out=out)
    t.write_text(f"path,label\n{slides / 'train_0.svs'},0\nmissing.svs,1\n")
    _bad(capsys, _train(slides, out, train=t), "t.csv line 3", "missing.svs", "does not exist",
         f"(a relative path is read from the table's folder {tmp_path})", out=out)
    # paths written from the shell's folder, the table in another: said so
    sub = tmp_path / "tables"
    sub.mkdir()
    t2 = sub / "t.csv"
    t2.write_text(f"path,label\n{slides.name}/train_0.svs,0\n")
    cwd = os.getcwd()
    os.chdir(slides.parent)
    try:
        _bad(capsys, _train(slides, out, train=t2), "t.csv line 2", "does not exist",
             f"read from the table's folder {sub}; {slides.name}/train_0.svs is there from the "
             "working directory)", out=out)
    finally:
        os.chdir(cwd)
    # a slide with two labels: both lines, in the class names where given
    t.write_text(f"path,label\n{slides / 'train_0.svs'},tumour\n{slides / 'train_1.svs'},normal"
                 f"\n{slides / 'train_0.svs'},normal\n")
    _bad(capsys, _train(slides, out, "--classes", "normal,tumour", train=t),
         f"t.csv line 4: slide {slides / 'train_0.svs'} is listed with labels tumour (line 2) "
         "and normal", out=out)
    (tmp_path / "notaslide.svs").write_text("hello")
    t.write_text("path,label\nnotaslide.svs,1\n")
    _bad(capsys, _train(slides, out, train=t), "t.csv line 2", "notaslide.svs",
         "not a readable slide", out=out)
    t.write_text(f"path,label\n{slides / 'train_0.svs'},0\n{slides / 'train_1.svs'},2\n")
    _bad(capsys, _train(slides, out, train=t), "t.csv line 3", "label '2'", "not 0 or 1", out=out)
    t.write_text(f"path,label\n{slides / 'train_0.svs'},1.5\n{slides / 'train_1.svs'},abc\n")
    _bad(capsys, _train(slides, out, "--task", "regression", train=t), "t.csv line 3", "'abc'",
         "not a number", out=out)


def test_bad_options(slides, tmp_path, capsys):
    out = tmp_path / "run"
    _bad(capsys, _train(slides, out, "--model", "efficientnet_b0"), "--model", "efficientnet_b0",
         out=out)
    _bad(capsys, _train(slides, out, "--stream-upto", "layer9"), "stream_upto", "layer9", out=out)
    _bad(capsys, _train(slides, out, "--tile-size", "20"), "tile_size", "43", "receptive field",
         out=out)
    _bad(capsys, _train(slides, out, "--tile-size", "256", "--memory-budget", "1GB"),
         "--tile-size or --memory-budget", out=out)
    _bad(capsys, _train(slides, out, "--lr", "-1"), "lr", "positive", out=out)
    # (nan and inf were "lr must be float"; a value starting with "-" was
    # argparse's bare "expected one argument")
    for flag in ("--lr", "--gamma", "--clip-grad"):
        _bad(capsys, _train(slides, out, flag, "nan"), f"{flag[2:].replace('-', '_')} must be a "
             "finite number, got nan", out=out)
    _bad(capsys, _train(slides, out, "--class-weights", "-1,1"), "--class-weights: expected one "
         "argument", "given as --class-weights=VALUE", out=out)
    _bad(capsys, _train(slides, out, "--class-weights=-1,1"), "--class-weights '-1,1'",
         "non-negative", out=out)
    # no abbreviations: --epoch was taken as --epochs without a word
    _bad(capsys, _train(slides, out, "--epoch", "2"), "unrecognized arguments: --epoch 2",
         out=out)
    import torchvision
    w = tmp_path / "r18_10.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), w)
    _bad(capsys, _train(slides, out, "--weights", w), "r18_10.pt", "does not match resnet18",
         "shape mismatches", "fc.", out=out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nlearning_rate: 0.1\n")
    _bad(capsys, _train(slides, out, "--config", cfg), "c.yaml", "unknown option", "learning_rate",
         out=out)
    cfg.write_text("epochs: two\n")
    _bad(capsys, _train(slides, out, "--config", cfg), "c.yaml", "epochs must be int", out=out)
    toml = tmp_path / "c.toml"
    toml.write_text("epochs = [\n")
    _bad(capsys, _train(slides, out, "--config", toml), "c.toml", "not valid TOML", out=out)
    _bad(capsys, ["train", "--val", slides / "val.csv", "--out", out], "--train is required",
         out=out)
    if not torch.cuda.is_available():
        _bad(capsys, _train(slides, out, "--device", "cuda"), "--device cuda: no CUDA "
             "device is available", out=out)


def test_bad_tile_parallel(slides, tmp_path, capsys, monkeypatch):
    """--tile-parallel: a count that is not a positive int, options that do
    not compose with it and a torchrun world it does not divide, refused
    before any process starts (exit 2, one line, nothing written)."""
    out = tmp_path / "run"
    for v in ("0", "-1"):
        _bad(capsys, _train(slides, out, "--tile-parallel", v), "tile_parallel",
             "positive number of processes", f"got {v}", out=out)
    for v in ("1.5", "two"):
        _bad(capsys, _train(slides, out, "--tile-parallel", v), "--tile-parallel",
             f"invalid int value: '{v}'", out=out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tile_parallel: 1.5\n")
    _bad(capsys, _train(slides, out, "--config", cfg), "c.yaml", "tile_parallel must be int",
         out=out)
    monkeypatch.setenv("STREAMCNN_DIST_TIMEOUT", "soon")
    _bad(capsys, _train(slides, out, "--tile-parallel", "2"), "STREAMCNN_DIST_TIMEOUT",
         "'soon'", out=out)
    monkeypatch.delenv("STREAMCNN_DIST_TIMEOUT")
    # as torchrun describes the processes (the check comes before the rendezvous)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    _bad(capsys, _train(slides, out, "--tile-parallel", "2"),
         "--tile-parallel 2 must divide the 3 processes", out=out)
    monkeypatch.setenv("WORLD_SIZE", "4")
    _bad(capsys, _train(slides, out, "--tile-parallel", "2", "--batch-size", "3"),
         "--batch-size 3", "2 data-parallel groups", out=out)


def test_tile_parallel_error_in_the_ranks(slides, tmp_path):
    """A user error the spawned ranks find (weights that do not fit the
    model): every rank ends, one line on stderr, exit 2, nothing written."""
    import torchvision
    w = tmp_path / "r18_10.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), w)
    out = tmp_path / "run"
    res = cli(*_train(slides, out, "--tile-parallel", "2", "--weights", w), timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamcnn: "), res.stderr[-3000:]
    assert "r18_10.pt" in lines[0] and "does not match resnet18" in lines[0], lines
    assert not out.exists()


def test_tile_parallel_sigterm(slides, tmp_path):
    """SIGTERM to the command that spawned the tile-parallel ranks (a
    scheduler stopping the job) ends the ranks as Ctrl-C does: rank 0 says
    what last.pt holds, as terminated, exit 143, at once (before, the
    command waited for ranks that never got the signal)."""
    out = tmp_path / "run"
    val = tmp_path / "val.csv"
    val.write_text(f"path,label\n{slides / 'val_0.svs'},0\n{slides / 'val_1.svs'},1\n")
    args = _train(slides, out, "--epochs", "50", "--batch-size", "1", "--tile-parallel", "2",
                  val=val)
    proc = subprocess.Popen([str(STREAMCNN), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not (out / "metrics.csv").exists():    # epoch 1 ended
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 300
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
    # rank 0 says which epoch last.pt holds, or, when the stop reached it
    # outside the epochs' loop (in the epoch's end: plots, a barrier),
    # that it holds the last finished one
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("streamcnn: terminated") and "continue with --resume" \
        in lines[0], lines
    assert load_checkpoint(str(out / "last.pt"))["epoch"] >= 1


def _spawned_ranks(pid: int) -> int:
    """How many of ``pid``'s children are multiprocessing's spawned processes."""
    n = 0
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return 0
    for k in kids:
        try:
            n += b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()
        except OSError:
            pass
    return n


def _left_in_session(sid, wait=10.0):
    """The processes of session ``sid`` still running (not zombies) after
    up to ``wait`` seconds for them to end."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{d}/stat").read()
                if os.getsid(int(d)) == sid and stat.rsplit(")", 1)[1].split()[0] != "Z":
                    left.append(open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" "))
            except OSError:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs /proc/PID/task/PID/children (Linux)")
@pytest.mark.parametrize("when", ["ranks starting", "epoch 2"])
def test_tile_parallel_ctrl_c_to_the_group(slides, tmp_path, when):
    """Ctrl-C in a terminal (SIGINT to every process of the group) while
    the spawned ranks import torch, or as epoch 2 starts its DataLoader
    worker: one line, exit 130, and no process of the group left behind.
    Before, a rank or a worker still importing torch printed a
    KeyboardInterrupt traceback, and the ranks' workers were spawned (each
    epoch importing torch again: 15 s epochs for 4 s); a worker the SIGINT
    reached as it started printed "Exception ignored" tracebacks, or hung
    in the rank's handler on the lock of a value shared with the parent
    (the ranks then killed after 20 s, the worker left running)."""
    out = tmp_path / "run"
    val = tmp_path / "val.csv"
    val.write_text(f"path,label\n{slides / 'val_0.svs'},0\n{slides / 'val_1.svs'},1\n")
    args = _train(slides, out, "--epochs", "3", "--batch-size", "1", "--tile-parallel", "2",
                  "--workers", "1", val=val)
    proc = subprocess.Popen([str(STREAMCNN), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.monotonic()
        if when == "epoch 2":
            while not (out / "metrics.csv").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() - t0 < 300
                time.sleep(0.05)
            # at once: as epoch 2's worker starts (the SIGINT reaching it
            # while it forks, the hardest case)
        else:
            while _spawned_ranks(proc.pid) < 2:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() - t0 < 300
                time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        assert not _left_in_session(proc.pid)
    finally:
        if proc.poll() is None or _left_in_session(proc.pid, 0):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    lines = [ln for ln in stderr.strip().splitlines() if "leaked semaphore" not in ln
             and "warnings.warn(" not in ln]
    assert len(lines) == 1 and lines[0].startswith("streamcnn: interrupted"), stderr[-3000:]


def _rank_ends_on_sigint(code, ready):
    # (pytest started in the background ignores SIGINT, and a forked child
    # inherits that: as _spawned, the rank installs its own handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ready.set()               # (in the try: the SIGINT may come at once)
        time.sleep(60)
    except KeyboardInterrupt:
        os._exit(code)


def _rank_stuck(ready):
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # as inside a long C call
    ready.set()
    time.sleep(60)


def test_stop_ranks_kills_a_stuck_rank(capsys):
    """After SIGTERM or SIGINT (a `kill -INT` of the command alone, which
    the ranks did not get) the ranks get SIGINT, and the shared stop
    signal says which; one that does not end within the grace time is
    killed, and the command says so itself when rank 0 did not (its exit
    status is not the stop's: 143, 130)."""
    import multiprocessing as mp
    from streamcnn.app.tile_parallel import stop_ranks
    ctx = mp.get_context("fork")

    def start(*targets):
        ranks = []
        for target, args in targets:
            ready = ctx.Event()
            ranks.append(ctx.Process(target=target, args=(*args, ready)))
            ranks[-1].start()
            assert ready.wait(60)
        return ranks

    ranks = start((_rank_ends_on_sigint, (143,)), (_rank_stuck, ()))
    stop_sig = ctx.Value("i", 0)
    t0 = time.monotonic()
    assert stop_ranks(ranks, terminated=True, grace=2.0, stop_sig=stop_sig) == 143
    assert 1.5 < time.monotonic() - t0 < 30
    assert stop_sig.value == signal.SIGTERM
    assert ranks[0].exitcode == 143 and ranks[1].exitcode == -signal.SIGKILL
    assert capsys.readouterr().err == ""                # rank 0 said where the run is
    # SIGINT to the command alone: passed on (the ranks ended, none killed)
    ranks = start((_rank_ends_on_sigint, (130,)), (_rank_ends_on_sigint, (130,)))
    t0 = time.monotonic()
    assert stop_ranks(ranks, terminated=False, grace=20.0, stop_sig=stop_sig) == 130
    assert time.monotonic() - t0 < 10 and stop_sig.value == signal.SIGINT
    assert [r.exitcode for r in ranks] == [130, 130]
    assert capsys.readouterr().err == ""
    ranks = start((_rank_stuck, ()))
    assert stop_ranks(ranks, terminated=False, grace=0.5) == 130
    err = capsys.readouterr().err
    assert err.startswith("streamcnn: interrupted: the ranks were stopped") and "--resume" in err


def test_bad_run_folder(synth_set, run_dir, tmp_path, capsys):
    slides = synth_set
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    _bad(capsys, _train(slides, run_dir), "holds another run", "--resume", "--overwrite")
    _bad(capsys, _train(slides, run_dir, "--resume", "--lr", "0.5", "--head", "avg",
                "--optimizer", "sgd", "--batch-size", "3", "--augment"), "last.pt",
         "another config", "lr 0.01 (checkpoint) vs 0.5 (now)", "head 'max' (checkpoint)")
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    # --resume into a folder with a run's files but no last.pt (not one a
    # training left: it writes last.pt first); one without a run starts
    # (test_train_starts_where_no_epoch_ended)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "metrics.csv").write_text("epoch\n")
    _bad(capsys, _train(slides, stray, "--resume"), "--resume", "no checkpoint", "last.pt",
         "holds metrics.csv", "--overwrite")
    assert [p.name for p in stray.iterdir()] == ["metrics.csv"]
    # a memory budget too small for the training images: refused before
    # the run folder is written (it was at the first step, config.yaml kept)
    small = _train(slides, tmp_path / "budget", "--memory-budget", "1MB")
    i = small.index("--tile-size")
    _bad(capsys, small[:i] + small[i + 2:], "memory_budget of 1000000 bytes is too small",
         out=tmp_path / "budget")
    _bad(capsys, ["evaluate", tmp_path / "none.pt", "--csv", slides / "val.csv"], "none.pt",
         "does not exist")
    _bad(capsys, ["export", slides / "train.csv", tmp_path / "m.pt"], "train.csv",
         "cannot read checkpoint", "not a file torch.save wrote")
    # export over the checkpoint it reads (it wrote TorchScript over it, the
    # checkpoint lost), however spelled; into a "folder" that is a file
    before = (run_dir / "last.pt").read_bytes()
    for same in (run_dir / "last.pt", run_dir / ".." / run_dir.name / "last.pt"):
        _bad(capsys, ["export", run_dir / "last.pt", same], "is the checkpoint",
             "would lose the checkpoint")
    assert (run_dir / "last.pt").read_bytes() == before
    (tmp_path / "afile").write_text("")
    _bad(capsys, ["export", run_dir / "last.pt", tmp_path / "afile" / "m.pt"], "afile",
         "is a file")
    # train --out below a file (it was a NotADirectoryError traceback)
    _bad(capsys, _train(slides, tmp_path / "afile" / "sub" / "run"), "afile",
         "is a file, not a folder")
    # an exported TorchScript model given for a checkpoint: one line, no
    # torch warning
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ts.pt"))
    _bad(capsys, ["evaluate", tmp_path / "ts.pt", "--csv", slides / "val.csv"], "ts.pt",
         "is a TorchScript model", "last.pt or best.pt")
    assert not (tmp_path / "m.pt").exists()
    # a finished run resumed: nothing to do, exit 0
    res = cli_here(capsys, *_train(slides, run_dir, "--resume", "--mpp", "0.5"))
    assert "last.pt has finished epoch 2 of 2; nothing to do" in res.stdout
    res = cli_here(capsys, *_train(slides, run_dir, "--resume", "--mpp", "0.5", "--epochs", "1"))
    assert "last.pt has trained 2 epochs, more than --epochs 1; nothing to do" in res.stdout


def test_single_class_validation_and_toml_config(slides, tmp_path, capsys):
    """AUC undefined: a warning, nan in metrics.csv, training goes on; a
    TOML config with a flag overriding it, and --overwrite."""
    val = tmp_path / "val.csv"
    val.write_text(f"path,label\n{slides / 'val_1.svs'},1\n{slides / 'val_3.svs'},1\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('epochs = 3\nbatch-size = 2\noptimizer = "sgd"\nlr = 0.02\n'
                   'schedule = "constant"\n')
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("epoch\n")            # "another run"
    res = cli_here(capsys, *_train(slides, out, "--config", cfg, "--epochs", "1",
                                   "--overwrite", val=val))
    assert "single class" in res.stderr and "AUC is undefined" in res.stderr
    rows = _csv(out / "metrics.csv")
    assert len(rows) == 1 and math.isnan(float(rows[0]["val_auc"]))
    assert math.isfinite(float(rows[0]["val_loss"]))
    assert not (out / "roc.png").exists() and (out / "best.pt").exists()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.02 and saved["schedule"] == "constant"


def test_tables_conflicting_or_shared_slides(tmp_path, capsys):
    """A slide twice in a table with different labels is refused (twice with
    one label, e.g. oversampled, is fine); slides in both the training and
    the validation table are a warning."""
    from streamcnn.app import train as T
    from streamcnn.app.common import Table, UsageError
    a, b = str(tmp_path / "a.svs"), str(tmp_path / "b.svs")
    tr = Table("train.csv", [a, b, a], ["a.svs", "b.svs", "a.svs"], [0.0, 1.0, 0.0], [None] * 3)
    va = Table("val.csv", [b], ["b.svs"], [1.0], [None])
    T._check_tables(tr, va, True)
    assert capsys.readouterr().err.strip() == (f"streamcnn: warning: {b} in both train.csv and "
                                               "val.csv: the validation metric of slides "
                                               "trained on is optimistic")
    T._check_tables(tr, va, False)
    assert capsys.readouterr().err == ""
    bad = Table("t.csv", [a, str(tmp_path / "." / "a.svs")], ["a.svs", "./a.svs"], [0.0, 1.0],
                [None] * 2)
    from streamcnn.app.common import check_labels_agree
    with pytest.raises(UsageError, match="t.csv: slide .*a.svs is listed with labels 0 and 1"):
        check_labels_agree(bad)             # (read_slide_table's check, train's and evaluate's)
    check_labels_agree(tr)


def test_config_paths_relative_to_the_file(tmp_path):
    """A config's file names are relative to its folder, normalised (no
    ``cfg/../runs`` in the run's messages and config.yaml)."""
    from streamcnn.app.config import read_config_file
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "c.toml"
    cfg.write_text('out = "../runs/a"\ntrain = "./data/train.csv"\nval = "/abs/v.csv"\n')
    got = read_config_file(str(cfg))
    assert got["out"] == str(tmp_path / "runs" / "a")
    assert got["train"] == str(tmp_path / "cfg" / "data" / "train.csv")
    assert got["val"] == "/abs/v.csv"


def test_config_lists(tmp_path):
    """classes and class_weights as YAML / TOML lists (what a user writes),
    kept as the flags write them; other lists refused naming the key."""
    from streamcnn.app.common import UsageError
    from streamcnn.app.config import read_config_file
    y = tmp_path / "c.yaml"
    y.write_text("classes: [normal, tumour]\nclass_weights: [1, 2.5]\n")
    assert read_config_file(str(y)) == {"classes": "normal,tumour", "class_weights": "1,2.5"}
    t = tmp_path / "c.toml"
    t.write_text('classes = ["a", "b", "c"]\n')
    assert read_config_file(str(t)) == {"classes": "a,b,c"}
    for bad in ("classes: [[a, b], c]", "classes: []", "class_weights: [true, 1]",
                "optimizer: [sgd]"):
        y.write_text(bad + "\n")
        with pytest.raises(UsageError, match="c.yaml: .* must be str"):
            read_config_file(str(y))


@pytest.mark.parametrize("sig, rc, said, group", [
    (signal.SIGINT, 130, "interrupted", False),
    (signal.SIGTERM, 143, "terminated", False),
    # Slurm stopping a job step: SIGTERM to every process of it, the
    # DataLoader workers too (they leave it to the main process)
    (signal.SIGTERM, 143, "terminated", True)])
def test_ctrl_c_keeps_last_checkpoint(slides, tmp_path, capsys, sig, rc, said, group):
    """Ctrl-C, or SIGTERM (a batch scheduler stopping the job), during
    epoch 2: one line says what last.pt holds, the checkpoint of epoch 1 is
    whole, and --resume goes on from it."""
    out = tmp_path / "run"
    val = tmp_path / "val.csv"
    val.write_text(f"path,label\n{slides / 'val_0.svs'},0\n{slides / 'val_1.svs'},1\n")
    args = _train(slides, out, "--epochs", "2", "--batch-size", "1",
                  *(["--workers", "2"] if group else []), val=val)
    # SIGINT back to its default in the child: a test run started in the
    # background (`make test &`) ignores SIGINT, the child would inherit
    # that, and Python installs its KeyboardInterrupt handler only over SIG_DFL
    proc = subprocess.Popen([str(STREAMCNN), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.monotonic()
        while not (out / "metrics.csv").exists():   # written after last.pt, at epoch 1's end
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 300
            time.sleep(0.05)
        time.sleep(0.5)                            # into epoch 2 (4 steps of >= 0.5 s)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == rc, (proc.returncode, stderr[-2000:])
    assert f"streamcnn: {said} during epoch 2; " in stderr and "holds epoch 1" in stderr
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["epoch"] == 1
    model, cfg = load_model(str(out / "last.pt"))
    assert cfg["epochs"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # and the run goes on from there
    cli_here(capsys, *_train(slides, out, "--resume", val=val))
    assert [int(r["epoch"]) for r in _csv(out / "metrics.csv")] == [1, 2]


@pytest.mark.parametrize("sig, rc, said", [(signal.SIGINT, 130, "interrupted"),
                                            (signal.SIGTERM, 143, "terminated")])
def test_stop_at_an_epochs_end_waits_for_its_files(slides, tmp_path, capsys, monkeypatch,
                                                   sig, rc, said):
    """A stop while the end of an epoch writes its files (a trial sent it
    after val_predictions.csv, before last.pt: the message said last.pt
    held epoch 1 where there was none, and --resume refused the folder)
    waits for all of them: the epoch's checkpoint, metrics and plots are
    written, the message is true, and --resume goes on."""
    import streamcnn.app.train as train_mod
    real = train_mod.write_predictions

    def and_stop(*a, **k):
        real(*a, **k)
        signal.raise_signal(sig)       # as the signal arriving here would
    monkeypatch.setattr(train_mod, "write_predictions", and_stop)
    out = tmp_path / "run"
    from streamcnn.cli import _stop_signals
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with _stop_signals():          # the console script's handlers
            res = cli_here(capsys, *_train(slides, out, "--epochs", "2"), check_rc=rc)
    finally:
        signal.signal(signal.SIGINT, old)
    assert f"streamcnn: {said} after epoch 1; " in res.stderr, res.stderr
    assert "last.pt holds epoch 1" in res.stderr
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
    assert [int(r["epoch"]) for r in _csv(out / "metrics.csv")] == [1]
    assert (out / "curves.png").exists() and (out / "best.pt").exists()
    monkeypatch.setattr(train_mod, "write_predictions", real)
    cli_here(capsys, *_train(slides, out, "--resume"))
    assert [int(r["epoch"]) for r in _csv(out / "metrics.csv")] == [1, 2]


def test_one_training_per_run_folder(slides, tmp_path, capsys):
    """A second training into a run folder that one holds (started twice,
    a requeued job while the first still runs) is refused before it
    writes anything; the lock ends with the training that held it."""
    from streamcnn.app.common import RunFolderBusy, lock_folder
    out = tmp_path / "run"
    out.mkdir()
    fd = lock_folder(str(out))         # as a training in another process holds it
    assert fd is not None
    try:
        res = cli_here(capsys, *_train(slides, out, "--epochs", "1"), check_rc=2)
        assert "is in use by another streamcnn train" in res.stderr and str(out) in res.stderr
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    cli_here(capsys, *_train(slides, out, "--epochs", "1"))
    fd = lock_folder(str(out))         # released when that training ended
    assert fd is not None
    os.close(fd)
    with pytest.raises(RunFolderBusy):
        held = lock_folder(str(out))
        try:
            lock_folder(str(out))
        finally:
            os.close(held)
    # a folder refused for its files while the training holding it writes
    # them (its first epoch's end: no last.pt yet) is refused for the lock
    for f in os.listdir(out):
        if f not in ("config.yaml", "val_predictions.csv"):
            os.unlink(out / f)
    fd = lock_folder(str(out))
    try:
        for extra in (["--resume"], []):
            res = cli_here(capsys, *_train(slides, out, "--epochs", "1", *extra), check_rc=2)
            assert "is in use by another streamcnn train" in res.stderr, res.stderr
    finally:
        os.close(fd)
    res = cli_here(capsys, *_train(slides, out, "--epochs", "1", "--resume"), check_rc=2)
    assert "--resume: no checkpoint" in res.stderr, res.stderr


def test_train_starts_where_no_epoch_ended(slides, tmp_path, capsys):
    """A run stopped in epoch 1 leaves config.yaml alone: the same command,
    with --resume (a requeued job) or without, starts it again from epoch
    1 with its own options, saying so in one line; --resume into a folder
    that does not exist or is empty starts the run too."""
    note = "holds a run that stopped before its first epoch ended (config.yaml alone, no " \
        "checkpoint): starting it again from epoch 1 with these options"
    out = tmp_path / "run"
    for extra in (["--resume"], []):
        out.mkdir(exist_ok=True)
        for f in out.iterdir():
            f.unlink()
        # what the stopped run wrote, of other options: nothing was trained
        (out / "config.yaml").write_text("lr: 0.5\nepochs: 7\n")
        res = cli_here(capsys, *_train(slides, out, "--epochs", "1", *extra))
        assert [ln for ln in res.stderr.splitlines() if "streamcnn" in ln] == [
            f"streamcnn: {out} {note}"], res.stderr
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg["lr"] == 1e-3 and cfg["epochs"] == 1
        assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
    # and a run with a checkpoint is resumed (nothing to do), not restarted
    res = cli_here(capsys, *_train(slides, out, "--epochs", "1", "--resume"))
    assert "nothing to do" in res.stdout and "starting" not in res.stderr
    for where in (tmp_path / "new" / "run", tmp_path / "empty"):
        if where.name == "empty":
            where.mkdir()
        res = cli_here(capsys, *_train(slides, where, "--epochs", "1", "--resume"))
        assert [ln for ln in res.stderr.splitlines() if "streamcnn" in ln] == [
            f"streamcnn: --resume: {where} holds no run yet: starting one from epoch 1"]
        assert [int(r["epoch"]) for r in _csv(where / "metrics.csv")] == [1]


def test_ranks_must_see_one_run_folder(slides, tmp_path, capsys, monkeypatch):
    """Each rank decides from the run folder it sees whether to resume; ranks
    that see different ones (a folder not on a shared file system) stop
    before anything is written, naming the epochs."""
    from streamcnn.app.common import Dist
    real = Dist.gather
    # a rank 1 whose --out holds the last.pt of epoch 3
    monkeypatch.setattr(Dist, "gather", lambda self, obj: real(self, obj) + [3]
                        if isinstance(obj, int) else real(self, obj))
    out = tmp_path / "run"
    _bad(capsys, _train(slides, out, "--resume"), f"the ranks see different run folders {out}",
         "rank 0 would start after epoch 0, rank 1 after epoch 3", "shares", out=out)


def test_read_scale_refused_up_front(slides, tmp_path, capsys):
    """An --mpp, --slide-mpp or mpp cell that would read a slide as less
    than one pixel (the reader failed on a span of 0 pixels, config.yaml
    written), make the image of less than one slide pixel or upsample a
    slide (finer than its own mpp), is refused
    before anything is written, naming the value, the CSV line and where
    the slide's mpp comes from."""
    from PIL import Image
    out = tmp_path / "run"
    where = f"--train CSV {slides / 'train.csv'} line 2"
    _bad(capsys, _train(slides, out, "--mpp", "1e300"), f"{where}: --mpp 1e+300 would read "
         f"slide {slides / 'train_0.svs'} as 2.56e-298 x 2.56e-298 pixels, less than one (512 x "
         "512 pixels of 0.5 um, as the file says)", out=out)
    _bad(capsys, _train(slides, out, "--mpp", "300"), "--mpp 300 would read", "as 0.853 x "
         "0.853 pixels", out=out)
    _bad(capsys, _train(slides, out, "--mpp", "1e-300"), f"{where}: --mpp 1e-300 would make "
         f"the 256 x 256 image of slide {slides / 'train_0.svs'} from 5.12e-298 x 5.12e-298 of "
         "its pixels, less than one (of 0.5 um, as the file says)", out=out)
    t = tmp_path / "t.csv"
    t.write_text(f"path,label,mpp\n{slides / 'train_0.svs'},0,\n"
                 f"{slides / 'train_1.svs'},1,1e300\n")
    _bad(capsys, _train(slides, out, train=t), f"--train CSV {t} line 3: --mpp 1 would make",
         "(of 1e+300 um, as its mpp cell says)", out=out)
    Image.new("RGB", (300, 200), (200, 120, 160)).save(tmp_path / "a.png")
    t.write_text("path,label\na.png,0\n")
    _bad(capsys, _train(slides, out, "--slide-mpp", "1e-300", train=t), f"--train CSV {t} line "
         "2: --mpp 1 would read slide", "as 3e-298 x 2e-298 pixels, less than one (300 x 200 "
         "pixels of 1e-300 um, as --slide-mpp says)", out=out)
    # pixels that are not square (0.5 um in x, 1 um in y): refused at the
    # table, not squashed at the first read
    from test_tiff_tags import _cm, _samples, _write
    _write(tmp_path / "aniso.tif", pixels=_samples(40, 48, 3, 1), tile=16,
           tags=_cm(20000, 10000))
    t.write_text("path,label\naniso.tif,0\n")
    _bad(capsys, _train(slides, out, train=t), f"--train CSV {t} line 2: ",
         "its pixels are not square (0.5 um in x, 1 um in y)", out=out)
    # an --mpp finer than a slide's own (beyond 5%) would upsample it: its
    # pixels made up (it was done silently; predict refused it)
    _bad(capsys, _train(slides, out, "--mpp", "0.25"), f"{where}: slide "
         f"{slides / 'train_0.svs'} has 0.5 um/px at its finest level (as the file says); it "
         "cannot provide 0.25 um/px without upsampling: use --mpp 0.5 or coarser, or leave it "
         "out", out=out)
    t.write_text(f"path,label,mpp\n{slides / 'val_0.svs'},0,1\n")
    _bad(capsys, _train(slides, out, "--mpp", "0.5", val=t), f"--val CSV {t} line 2: slide",
         "has 1 um/px at its finest level (as its mpp cell says)", out=out)
    t.write_text(f"path,label,mpp\n{slides / 'val_0.svs'},0,0.25\n")
    cli_here(capsys, *_train(slides, out, "--epochs", "1", "--mpp", "0.48", val=t))
    # evaluate: the run's --mpp against the table's slides, before any file
    t.write_text(f"path,label,mpp\n{slides / 'val_0.svs'},0,2e6\n")
    _bad(capsys, ["evaluate", out / "last.pt", "--csv", t, "--out", tmp_path / "ev"],
         f"--csv {t} line 2: the run's --mpp 0.48 would make the 256 x 256 image of slide",
         "(of 2e+06 um, as its mpp cell says)", out=tmp_path / "ev")
    t.write_text(f"path,label,mpp\n{slides / 'val_0.svs'},0,0.6\n")
    _bad(capsys, ["evaluate", out / "last.pt", "--csv", t, "--out", tmp_path / "ev"],
         f"--csv {t} line 2: slide {slides / 'val_0.svs'} has 0.6 um/px at its finest level "
         "(as its mpp cell says); it cannot provide 0.48 um/px without upsampling: the run "
         "reads slides at 0.48 um/px; leave it out", out=tmp_path / "ev")


def test_weights_that_do_not_fit_the_config(slides, tmp_path, capsys):
    """A checkpoint whose weights are of another model than its config
    describes (another architecture, another number of outputs) is one
    short line: the file, the model, the counts and the first few keys of
    each kind (load_state_dict's message listed every key, kilobytes)."""
    out = tmp_path / "run"
    cli_here(capsys, *_train(slides, out, "--epochs", "1"))
    ckpt = torch.load(out / "best.pt", weights_only=False)
    ckpt["config"].update(model="densenet121", stream_upto="denseblock1")
    torch.save(ckpt, tmp_path / "dense.pt")
    with pytest.raises(ValueError) as e:
        load_model(str(tmp_path / "dense.pt"))
    msg = str(e.value)
    assert msg.startswith(f"streamcnn: checkpoint {tmp_path / 'dense.pt'}: its weights do not "
                          "fit the model its config describes (densenet121 streamed to "
                          "denseblock1, 2 outputs): 725 of the model's 729 entries missing "
                          "(stem.module.conv0.weight, stem.module.norm0.weight, ...); 120 "
                          "unexpected (stem.module.conv1.weight, stem.module.bn1.weight, ...); "
                          "1 of another shape (head.fc.weight: [2, 512] in the file, [2, 1024] "
                          "in the model)"), msg
    assert "\n" not in msg and len(msg) - len(str(tmp_path)) < 450
    for cmd in (["evaluate", tmp_path / "dense.pt", "--csv", slides / "val.csv"],
                ["export", tmp_path / "dense.pt", tmp_path / "m.pt"]):
        _bad(capsys, cmd, "dense.pt", "its weights do not fit", "725 of the model's 729")
    # --resume from a last.pt whose head was saved of 3 classes
    ckpt = torch.load(out / "last.pt", weights_only=False)
    ckpt["model"]["head.fc.weight"] = torch.zeros(3, 512)
    del ckpt["model"]["head.fc.bias"]
    torch.save(ckpt, out / "last.pt")
    line = _bad(capsys, _train(slides, out, "--resume"),
                f"--resume: checkpoint {out / 'last.pt'}: its weights do not fit the model its "
                "config describes (resnet18 streamed to layer1, 2 outputs): 1 of the model's",
                "entries missing (head.fc.bias); 1 of another shape (head.fc.weight: [3, 512] in "
                "the file, [2, 512] in the model)")
    assert len(line) - len(str(out)) < 300


@pytest.mark.parametrize("options, metric", [
    # regression (labels as numbers, Spearman), bf16 autocast, a DataLoader
    # worker, a memory budget instead of a tile size
    (["--task", "regression", "--amp", "bf16", "--workers", "1", "--memory-budget", "300MB",
      "--optimizer", "adamw", "--lr", "1e-4"], "val_spearman"),
    # fp16 autocast with a GradScaler, a step schedule
    (["--amp", "fp16", "--schedule", "step", "--step-epochs", "1", "--tile-size", "160"],
     "val_auc"),
])
def test_train_options(slides, tmp_path, capsys, recwarn, options, metric):
    """The options a short run does not otherwise reach train, evaluate and
    write a well-formed run folder; fp16's GradScaler skipping a step draws
    no torch warning (the schedule stepping first: meant)."""
    out = tmp_path / "run"
    small = [a for a in SMALL]
    i = small.index("--tile-size")
    del small[i:i + 2]
    cli_here(capsys, "train", "--train", slides / "train.csv", "--val", slides / "val.csv",
             "--out", out, *small, "--epochs", "1", "--batch-size", "2", *options)
    (row,) = _csv(out / "metrics.csv")
    assert metric in row and math.isfinite(float(row["train_loss"]))
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)], \
        [str(w.message) for w in recwarn]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["amp"] == options[options.index("--amp") + 1]
    ev = cli_here(capsys, "evaluate", out / "last.pt", "--csv", slides / "val.csv", "--out",
                  tmp_path / "ev")
    name = "Spearman" if metric == "val_spearman" else "AUC"
    assert name in ev.stdout, ev.stdout
    preds = _csv(tmp_path / "ev" / "predictions.csv")
    assert len(preds) == 4 and all(math.isfinite(float(p["score"])) for p in preds)


def test_plain_images_and_slide_mpp(tmp_path, capsys):
    """PNG and JPEG images, whose files say nothing of the pixel size:
    without --slide-mpp or an mpp column, exit 2 naming the row and the
    way out; with them, train -> evaluate -> predict, evaluate and predict
    taking --slide-mpp from the checkpoint."""
    from PIL import Image
    from app_slides import slide_image
    d = tmp_path / "images"
    d.mkdir()
    for split, n in (("train", 4), ("val", 2)):
        names = []
        for i in range(n):
            name = f"{split}_{i}.{'png' if i % 2 == 0 else 'jpg'}"
            Image.fromarray(slide_image(512, bool(i % 2), seed=50 + 10 * n + i).numpy()).save(
                d / name)
            names.append(f"{name},{i % 2}")
        (d / f"{split}.csv").write_text("path,label\n" + "\n".join(names) + "\n")
    out = tmp_path / "run"
    _bad(capsys, _train(d, out), "train.csv line 2", "train_0.png",
         "no microns-per-pixel metadata", "--slide-mpp", out=out)
    _bad(capsys, _train(d, out, "--slide-mpp", "0"), "--slide-mpp", "positive", out=out)
    (d / "cols.csv").write_text("path,label,mpp\ntrain_0.png,0,abc\n")
    _bad(capsys, _train(d, out, "--slide-mpp", "0.5", train=d / "cols.csv"),
         "cols.csv line 2", "mpp 'abc'", out=out)
    # the validation table gives one image its own pixel size
    (d / "val_mpp.csv").write_text("path,label,mpp\nval_0.png,0,1.0\nval_1.jpg,1,\n")
    cli_here(capsys, *_train(d, out, "--slide-mpp", "0.5", "--epochs", "1", "--batch-size",
                             "2", val=d / "val_mpp.csv"))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["slide_mpp"] == 0.5
    preds = _csv(out / "val_predictions.csv")
    assert len(preds) == 2 and all(math.isfinite(float(r["score"])) for r in preds)
    cli_here(capsys, "evaluate", out / "best.pt", "--csv", d / "val_mpp.csv", "--out",
             tmp_path / "ev", "--quiet")
    got = _csv(tmp_path / "ev" / "predictions.csv")
    assert [r["score"] for r in got] == [r["score"] for r in preds], (got, preds)
    cli_here(capsys, "predict", out / "best.pt", d / "val_1.jpg", "--out",
             tmp_path / "maps", "--heatmap", "cam", "--quiet")
    row = _csv(tmp_path / "maps" / "predictions.csv")[0]
    assert (row["status"], row["mpp"], row["downsample"]) == ("ok", "1", "2"), row
    assert (tmp_path / "maps" / "val_1_cam.png").exists()
    assert (tmp_path / "maps" / "val_1_cam.tif").exists()
    # --slide-mpp replaces the checkpoint's: 1 um/px is 4 pixels of 0.25 um
    cli_here(capsys, "predict", out / "best.pt", d / "val_1.jpg", "--out", tmp_path / "m2",
             "--heatmap", "none", "--slide-mpp", "0.25", "--quiet")
    assert _csv(tmp_path / "m2" / "predictions.csv")[0]["downsample"] == "4"
    _bad(capsys, ["predict", out / "best.pt", d / "val_1.jpg", "--out", tmp_path / "m3",
                  "--slide-mpp", "-1"], "--slide-mpp must be positive")


def test_multiclass(slides, tmp_path, capsys, monkeypatch):
    """--num-classes 3: labels 0 .. 2, three logits, val_auc the macro
    one-vs-rest AUC, predictions with the class probabilities (evaluate
    gives the run's), a per-class ROC plot, predict's class maps of any
    class; bad labels and options refused."""
    from sklearn.metrics import roc_auc_score
    train, val = tmp_path / "train3.csv", tmp_path / "val3.csv"
    train.write_text("path,label\n" + "".join(f"{slides / f'train_{i}.svs'},{i % 3}\n"
                                              for i in range(4)))
    val.write_text("path,label\n" + "".join(f"{slides / f'val_{i}.svs'},{c}\n"
                                            for i, c in enumerate((0, 1, 2, 1))))
    out = tmp_path / "run"
    _bad(capsys, _train(slides, out, train=train), "train3.csv line 4", "label '2'",
         "not 0 or 1", out=out)
    (tmp_path / "v.csv").write_text(f"path,label\n{slides / 'val_0.svs'},3\n")
    _bad(capsys, _train(slides, out, "--num-classes", "3", train=train, val=tmp_path / "v.csv"),
         "v.csv line 2", "label '3'", "integer in 0 .. 2", "--num-classes 3", out=out)
    _bad(capsys, _train(slides, out, "--num-classes", "1"), "--num-classes", "at least 2",
         out=out)
    _bad(capsys, _train(slides, out, "--num-classes", "3", "--task", "regression"),
         "--num-classes 3 is for --task classification", out=out)
    cli_here(capsys, *_train(slides, out, "--num-classes", "3", "--epochs", "1",
                             "--batch-size", "2", train=train, val=val))
    model, cfg = load_model(str(out / "best.pt"))
    assert cfg["num_classes"] == 3 and cfg["num_outputs"] == 3
    assert model.head.fc.out_features == 3
    preds = _csv(out / "val_predictions.csv")
    assert list(preds[0]) == ["path", "label", "prediction", "prob_0", "prob_1", "prob_2"]
    probs = [[float(r[f"prob_{j}"]) for j in range(3)] for r in preds]
    assert all(abs(sum(p) - 1) < 1e-5 for p in probs)
    assert all(int(r["prediction"]) == max(range(3), key=p.__getitem__)
               for r, p in zip(preds, probs))
    auc = float(_csv(out / "metrics.csv")[0]["val_auc"])
    want = roc_auc_score([int(r["label"]) for r in preds], probs, multi_class="ovr")
    assert abs(auc - want) < 1e-4, (auc, want)  # probabilities written to 6 digits
    assert (out / "roc.png").exists()
    res = cli_here(capsys, "evaluate", out / "best.pt", "--csv", val, "--out", tmp_path / "ev",
                   "--quiet")
    assert res.stdout.startswith("AUC ") and abs(float(res.stdout.split()[1]) - auc) < 1e-4
    assert _csv(tmp_path / "ev" / "predictions.csv") == preds
    # stopped and resumed: the same probabilities (kept exactly in the partial file)
    _stop_in_slide(monkeypatch, 3, KeyboardInterrupt)
    ev = ["evaluate", out / "best.pt", "--csv", val, "--out", tmp_path / "ev3", "--quiet"]
    cli_here(capsys, *ev, check_rc=130)
    assert list(_csv(tmp_path / "ev3" / "predictions.partial.csv")[0]) == \
        ["path", "label", "prediction", "prob_0", "prob_1", "prob_2", "mpp", "loss"]
    _stop_in_slide(monkeypatch, 99, None)
    assert cli_here(capsys, *ev, "--resume").stdout == res.stdout.replace("/ev/", "/ev3/")
    assert _csv(tmp_path / "ev3" / "predictions.csv") == preds
    cli_here(capsys, "predict", out / "best.pt", slides / "val_2.svs", "--out",
             tmp_path / "maps", "--heatmap", "cam", "--target", "2", "--quiet")
    row = _csv(tmp_path / "maps" / "predictions.csv")[0]
    assert row["target"] == "2" and "prob_2" in row and row["status"] == "ok"
    # a validation set lacking a class: the macro AUC is undefined (nan, a warning)
    val2 = tmp_path / "val2.csv"
    val2.write_text(f"path,label\n{slides / 'val_0.svs'},0\n{slides / 'val_1.svs'},1\n")
    res = cli_here(capsys, "evaluate", out / "best.pt", "--csv", val2, "--out",
                   tmp_path / "ev2", "--quiet")
    assert "nan" in res.stdout and "no slide of class(es) 2" in res.stdout


@pytest.mark.parametrize("model,upto", [("densenet121", "transition1"),
                                        ("inception_v3", "Mixed_5b"), ("mobilenet_v2", "7"),
                                        ("googlenet", "inception3a"), ("vgg11_bn", "14"),
                                        ("regnet_x_400mf", "block1"), ("mnasnet0_5", "9")])
def test_other_backbones_train_evaluate_predict_and_export(slides, tmp_path, capsys, model,
                                                           upto):
    """--model densenet121 streamed to transition1 (its dense block's
    joins are cats along the channels), inception_v3 to Mixed_5b (its
    branches pool with F.avg_pool2d and are joined by a cat) and
    mobilenet_v2 to features[:7] (depthwise convolutions, ReLU6), googlenet
    (ceil_mode pools, its input transform folded), vgg11_bn, RegNetX and
    MNASNet: a run,
    its evaluation, a heatmap and the TorchScript export, which gives the
    model's scores."""
    out = tmp_path / "run"
    small = list(SMALL)
    small[small.index("resnet18")] = model
    small[small.index("layer1")] = upto
    cli_here(capsys, "train", "--train", slides / "train.csv", "--val", slides / "val.csv",
             "--out", out, *small, "--epochs", "1", "--batch-size", "2")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == model and str(cfg["stream_upto"]) == upto
    (row,) = _csv(out / "metrics.csv")
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))
    res = cli_here(capsys, "evaluate", out / "best.pt", "--csv", slides / "val.csv", "--out",
                   tmp_path / "ev", "--quiet")
    assert res.stdout.startswith("AUC ")
    cli_here(capsys, "predict", out / "best.pt", slides / "val_1.svs", "--out",
             tmp_path / "maps", "--heatmap", "cam", "--quiet")
    assert _csv(tmp_path / "maps" / "predictions.csv")[0]["status"] == "ok"
    cli_here(capsys, "export", out / "best.pt", tmp_path / "model.pt")
    model, cfg = load_model(str(out / "best.pt"))
    x = (torch.rand(1, 3, 256, 256) * 255).to(torch.uint8)
    with torch.no_grad():
        want = model(x)
        got = torch.jit.load(str(tmp_path / "model.pt"))(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _damage_tiles(path):
    """Overwrite the start of every tile of every page of a tiled TIFF: the
    file still opens (its directories are intact), every pixel read fails."""
    from PIL import Image
    spots = []
    with Image.open(path) as im:
        for page in range(getattr(im, "n_frames", 1)):
            im.seek(page)
            spots += list(im.tag_v2.get(324, ()))          # TileOffsets
    data = bytearray(path.read_bytes())
    for off in spots:
        data[off:off + 4] = b"\x55" * 4
    path.write_bytes(bytes(data))


def test_evaluate_table_checks(slides, tmp_path, capsys):
    """evaluate refuses a slide listed twice with different labels (its
    metric counted it as both) as train does, and a named label of a run
    without class names says so instead of pointing at a train option."""
    out = tmp_path / "run"
    cli_here(capsys, *_train(slides, out, "--epochs", "1"))
    t = tmp_path / "t.csv"
    t.write_text(f"path,label\n{slides / 'val_0.svs'},0\n{slides / 'val_0.svs'},1\n")
    _bad(capsys, ["evaluate", out / "last.pt", "--csv", t, "--out", tmp_path / "ev"],
         f"{t} line 3: slide {slides / 'val_0.svs'} is listed with labels 0 (line 2) and 1",
         out=tmp_path / "ev")
    t.write_text(f"path,label\n{slides / 'val_0.svs'},normal\n")
    _bad(capsys, ["evaluate", out / "last.pt", "--csv", t, "--out", tmp_path / "ev"],
         "label 'normal' is not 0 or 1", "the run named no classes (train --classes)",
         out=tmp_path / "ev")


def _damaged_set(slides, d, split):
    """``d/t.csv``: SPLIT_0.svs (label 0) and SPLIT_1.svs (1), copied from
    ``slides``, the second with its tiles damaged."""
    import shutil
    d.mkdir()
    for f in (f"{split}_0.svs", f"{split}_1.svs"):
        shutil.copy(slides / f, d / f)
    _damage_tiles(d / f"{split}_1.svs")
    (d / "t.csv").write_text(f"path,label\n{split}_0.svs,0\n{split}_1.svs,1\n")
    return d


def test_slide_damaged_after_the_checks(slides, tmp_path, capsys):
    """A slide that opens (the checks before the run pass) but whose tiles
    cannot be decoded stops the run with one line naming it and exit 2,
    in the process or from a DataLoader worker; evaluate likewise."""
    d = _damaged_set(slides, tmp_path / "d", "train")
    want = (f"slide {d / 'train_1.svs'} (of {d / 't.csv'}) cannot be read: OpenSlide "
            "failed reading")
    out = tmp_path / "run"
    for workers in ("0", "1"):
        res = cli_here(capsys, *_train(slides, out, "--workers", workers, "--overwrite",
                                       train=d / "t.csv"), check_rc=2)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("streamcnn: " + want), res.stderr
        assert "Not a JPEG file" in lines[0]
    good = tmp_path / "good"
    cli_here(capsys, *_train(slides, good, "--epochs", "1"))
    res = cli_here(capsys, "evaluate", good / "last.pt", "--csv", d / "t.csv", "--quiet",
                   "--out", tmp_path / "ev", check_rc=2)
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("streamcnn: " + want), res.stderr
    assert not (tmp_path / "ev" / "predictions.csv").exists()


def test_failed_writes_keep_the_previous_files(slides, tmp_path, capsys, monkeypatch):
    """A full disk: a write that fails (fsync: ENOSPC; torch.save's
    'file write failed') raises WriteError naming the file, leaves the
    previous file and no temporary behind; train stops with one line and
    exit 1, its last checkpoint loadable."""
    from streamcnn.app import checkpoint as ckpt_io
    from streamcnn.app.common import WriteError, write_atomic
    f = tmp_path / "a.json"
    write_atomic(str(f), b"old")

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="cannot write .*a.json .*No space left on device.*"
                       "as it was is kept"):
        write_atomic(str(f), b"new")
    monkeypatch.undo()
    assert f.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.json"]
    out = tmp_path / "run"
    saves = []
    real = torch.save

    def failing(obj, fh, *a, **k):
        saves.append(1)
        if len(saves) > 2:           # epoch 1 writes best.pt and last.pt
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter"
                               " failed writing file data/3: file write failed")
        return real(obj, fh, *a, **k)
    monkeypatch.setattr(ckpt_io.torch, "save", failing)
    res = cli_here(capsys, *_train(slides, out, "--epochs", "2"), check_rc=1)
    monkeypatch.undo()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamcnn: cannot write ") and \
        "file write failed); the file as it was is kept" in lines[0], res.stderr
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_patience_stops_early_and_resumes(slides, tmp_path, capsys, monkeypatch):
    """--patience N: the run stops once the metric that picks best.pt has
    not improved for N epochs (here a validation metric that falls: best
    stays epoch 1); resumed with the same patience there is nothing to do,
    with --patience 0 it trains on to --epochs."""
    from streamcnn.app import train as T
    rows = [{"epoch": i + 1, "val_loss": 1.0, "val_auc": v}
            for i, v in enumerate([0.5, 0.7, 0.6, 0.7])]
    assert T._stale(rows, "val_auc", 2) == ("val_auc has not improved for 2 epochs "
                                            "(--patience 2; best epoch 2)")
    assert T._stale(rows, "val_auc", 3) == "" and T._stale(rows, "val_auc", 0) == ""
    nan = [{"epoch": i + 1, "val_loss": v, "val_auc": math.nan}
           for i, v in enumerate([3.0, 2.0, 2.5])]             # no AUC: the loss decides
    assert T._stale(nan, "val_auc", 1).endswith("best epoch 2)")
    # equal metrics: the lower validation loss is the better epoch
    ties = [{"epoch": i + 1, "val_loss": v, "val_auc": 1.0}
            for i, v in enumerate([0.9, 0.5, 0.7])]
    assert T._best_index(ties, "val_auc") == 1
    assert T._stale(ties, "val_auc", 1).endswith("best epoch 2)")
    falling = itertools.count()         # best.pt stays epoch 1, whatever the losses
    monkeypatch.setattr(T, "metric", lambda *a, **k: (0.5 - 0.01 * next(falling), ""))
    out = tmp_path / "run"
    res = cli_here(capsys, *_train(slides, out, "--epochs", "4", "--patience", "1"))
    assert "early stop after epoch 2: val_auc has not improved for 1 epochs" in res.stderr
    assert [r["epoch"] for r in _csv(out / "metrics.csv")] == ["1", "2"]
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 2
    assert load_checkpoint(str(out / "best.pt"))["epoch"] == 1
    res = cli_here(capsys, *_train(slides, out, "--epochs", "4", "--patience", "1",
                                   "--resume"))
    assert "stopped early at epoch 2" in res.stdout and "nothing to do" in res.stdout
    cli_here(capsys, *_train(slides, out, "--epochs", "4", "--patience", "0", "--resume"))
    assert [r["epoch"] for r in _csv(out / "metrics.csv")] == ["1", "2", "3", "4"]
    _bad(capsys, _train(slides, tmp_path / "r2", "--patience", "-1"),
         "--patience", "non-negative", out=tmp_path / "r2")


def test_freeze_stem_trains_the_head_alone(slides, tmp_path, capsys):
    """--freeze-stem: after training, the stem's weights are those the run
    started from (its seeded build), the head's moved; config.yaml says so;
    a resume that would unfreeze it is refused."""
    from streamcnn.app import train as T
    out = tmp_path / "run"
    cli_here(capsys, *_train(slides, out, "--epochs", "2", "--freeze-stem"))
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["config"]["freeze_stem"] is True
    assert yaml.safe_load((out / "config.yaml").read_text())["freeze_stem"] is True
    start = T._build_model(ck["config"]).state_dict()
    stem = [k for k in start if k.startswith("stem.") and start[k].is_floating_point()]
    head = [k for k in start if k.startswith("head.") and start[k].is_floating_point()]
    assert stem and head
    assert all(torch.equal(ck["model"][k], start[k]) for k in stem)
    assert any(not torch.equal(ck["model"][k], start[k]) for k in head)
    # the optimizer holds the head's parameters only
    n_head = sum(1 for p in T._build_model(ck["config"]).head.parameters())
    assert len(ck["optimizer"]["param_groups"][0]["params"]) == n_head
    _bad(capsys, _train(slides, out, "--epochs", "3", "--resume", "--no-freeze-stem"),
         "freeze_stem True (checkpoint) vs False (now)")


def test_spreadsheet_tables(slides, tmp_path):
    """Tables as spreadsheets save them: a UTF-8 byte-order mark, CRLF line
    ends, semicolons or tabs between the columns; the same rows as a plain
    CSV, in the application and in SlideDataset."""
    from streamcnn.app.common import UsageError, read_slide_table
    from streamcnn.data import SlideDataset
    want = read_slide_table(str(slides / "train.csv"), "classification")
    lines = (slides / "train.csv").read_text().strip().splitlines()
    for sep in (",", ";", "\t"):
        t = slides / f"t{ord(sep)}.csv"   # beside the slides: the paths are relative
        t.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(ln.replace(",", sep) for ln in lines)
                      .encode() + b"\r\n")
        got = read_slide_table(str(t), "classification")
        assert (got.paths, got.labels) == (want.paths, want.labels), sep
        ds = SlideDataset(str(t), 64, mpp=4.0)
        assert ds.paths == want.paths and ds.labels == [int(v) for v in want.labels]
    # blank lines and rows of empty cells (a spreadsheet's ",,") are left out
    # by both readers, and a bad row is named by its line in the file
    t = slides / "gaps.csv"
    t.write_text("path,label,mpp\n\n" + "\n,,\n".join(lines[1:]) + "\n,,\n,,\n")
    got = read_slide_table(str(t), "classification")
    assert (got.paths, got.labels) == (want.paths, want.labels)
    assert SlideDataset(str(t), 64, mpp=4.0).paths == want.paths
    t.write_text(f"path,label,mpp\n\n{lines[1]}\n,,\n{lines[2]},abc\n")
    with pytest.raises(UsageError, match="gaps.csv line 5: mpp 'abc'"):
        read_slide_table(str(t), "classification")
    with pytest.raises(ValueError, match="gaps.csv line 5: mpp 'abc'"):
        SlideDataset(str(t), 64, mpp=4.0)
    t.write_text(f"path,label\n{lines[1]}\n,1\n")
    with pytest.raises(ValueError, match="gaps.csv line 3: empty path"):
        SlideDataset(str(t), 64, mpp=4.0)
    t.write_text("path,label\n" + "a" * 200000 + ",1\n")  # csv.Error: over its field limit
    with pytest.raises(ValueError, match="slide table .*gaps.csv: field larger than"):
        SlideDataset(str(t), 64, mpp=4.0)
    with pytest.raises(UsageError, match="CSV .*gaps.csv: field larger than"):
        read_slide_table(str(t), "classification")
    t.write_bytes(b"path,label\n\xff\xfe,1\n")            # not UTF-8
    with pytest.raises(ValueError, match=r"slide table .*gaps.csv is not UTF-8 text \(line 2\)"):
        SlideDataset(str(t), 64, mpp=4.0)
    with pytest.raises(ValueError, match="is a directory, not a CSV file"):
        SlideDataset(str(slides), 64, mpp=4.0)


@pytest.fixture
def user(slides):
    """Tables as users' tools write them, of train.csv's rows (``.rows``,
    read as ``.want``): ``.read(text or bytes, **kw)`` writes ``.t``
    (user.csv beside the slides) and reads it with read_slide_table;
    ``.same(table)``: train.csv's slides and labels."""
    from types import SimpleNamespace
    from streamcnn.app.common import read_slide_table
    u = SimpleNamespace(t=slides / "user.csv",
                        want=read_slide_table(str(slides / "train.csv"), "classification"),
                        rows=(slides / "train.csv").read_text().strip().splitlines()[1:])

    def read(text, **kw):
        u.t.write_bytes(text if isinstance(text, bytes) else text.encode())
        return read_slide_table(str(u.t), "classification", **kw)

    def same(got):
        assert (got.paths, got.labels) == (u.want.paths, u.want.labels)
    u.read, u.same = read, same
    return u


def test_table_decimal_commas(user, tmp_path):
    """Semicolon and tab tables (locales with a decimal comma): 0,25 in the
    mpp column and a regression target of 1,5 read as numbers; a path with a
    comma is left alone; a comma table keeps its commas as separators."""
    from streamcnn.app.common import read_slide_table
    for sep in (";", "\t"):
        got = user.read(f"path{sep}label{sep}mpp\n" + "".join(
            f"{r.replace(',', sep)}{sep}0,25\n" for r in user.rows))
        user.same(got)
        assert got.mpps == [0.25] * len(user.rows)
        reg = read_slide_table(str(user.t), "regression")
        assert reg.labels == user.want.labels
        user.t.write_text(f"path{sep}label\n" + "".join(
            f"{r.split(',')[0]}{sep}{k},5\n" for k, r in enumerate(user.rows)))
        assert read_slide_table(str(user.t), "regression").labels == \
            [k + 0.5 for k in range(len(user.rows))]
    import shutil
    shutil.copy(user.want.paths[0], tmp_path / "a,5")
    (tmp_path / "t.csv").write_text("path;label\na,5;1\n")
    assert read_slide_table(str(tmp_path / "t.csv"), "classification").paths == \
        [str(tmp_path / "a,5")]


def test_table_header_names(user):
    """Header names in any case, spaces around them (the mpp column too); a
    column named twice is refused, not the last one used."""
    from streamcnn.app.common import UsageError
    got = user.read(" PATH ;Label; Mpp \n" + "".join(f"{r.replace(',', ';')};0.5\n"
                                                    for r in user.rows))
    user.same(got)
    assert got.mpps == [0.5] * len(user.rows)
    with pytest.raises(UsageError, match=r"user.csv needs a header with 'path' and 'label' "
                                         r"columns, got \['file', 'Label'\]"):
        user.read("file,Label\n" + "\n".join(user.rows))
    for head, col in (("path,label,label", "label"), ("Path, LABEL ,label", "label"),
                      ("path,label,mpp,MPP", "mpp")):
        with pytest.raises(UsageError, match=f"CSV .*user.csv line 1: the header has more "
                                             f"than one '{col}' column"):
            user.read(head + "\n" + "".join(f"{r},0\n" for r in user.rows))


def test_table_blank_lines_and_cr(user):
    """Blank lines (or of separators alone) before the header are left out,
    messages keep the file's line numbers; an old Mac's CR line ends read
    as any others, also inside a quoted field."""
    from streamcnn.app.common import UsageError
    from streamcnn.data.dataset import read_csv
    rows, p1 = user.rows, user.rows[1].split(",")[0]
    user.same(user.read("\n,,\n ; \n\npath,label\n" + "\n".join(rows) + "\n"))
    with pytest.raises(UsageError, match="user.csv line 6: label 'x'"):
        user.read(f"\n,,\n\npath,label\n{rows[0]}\n{p1},x\n")
    user.same(user.read("path;label\r" + "\r".join(r.replace(",", ";") for r in rows) + "\r"))
    user.same(user.read("path,label,note\r" + "".join(f'{r},"two\rlines"\r' for r in rows)))
    assert [(n, r["note"]) for n, r in read_csv(user.t, ("path",))[1][:2]] == \
        [(3, "two\rlines"), (5, "two\rlines")]
    with pytest.raises(UsageError, match="user.csv line 3: label 'x'"):
        user.read(f"path,label\r{rows[0]}\r{p1},x\r")


def test_table_encodings(user, tmp_path, capsys):
    """UTF-16 by its byte-order mark (Excel's "Unicode text"); bytes that
    are not UTF-8 (cp1252, UTF-16 without its mark) refused with one line
    naming the file and the line of the first bad byte, not guessed."""
    from streamcnn.app.common import UsageError
    from streamcnn.data import SlideDataset
    text = "Path\tLabel\r\n" + "".join(r.replace(",", "\t") + "\r\n" for r in user.rows)
    for data in (b"\xff\xfe" + text.encode("utf-16-le"), b"\xfe\xff" + text.encode("utf-16-be")):
        user.same(user.read(data))
        assert SlideDataset(str(user.t), 64, mpp=4.0).paths == user.want.paths
    cp1252 = f"path,label\n{user.rows[0]}\n".encode() + "café.svs,1\n".encode("cp1252")
    for data, line in ((cp1252, 3), (text.encode("utf-16-le"), 1)):
        msg = rf"user.csv is not UTF-8 text \(line {line}\): save it as 'CSV UTF-8'"
        with pytest.raises(UsageError, match="CSV .*" + msg):
            user.read(data)
        with pytest.raises(ValueError, match="slide table .*" + msg):
            SlideDataset(str(user.t), 64, mpp=4.0)
    out = tmp_path / "run"
    _bad(capsys, _train(user.t.parent, out, train=user.t), "is not UTF-8 text (line 1)",
         out=out)


def test_table_float_labels(user):
    """Classification labels as pandas writes a float column (1.0, 2.00)
    are those indices, also beside --num-classes and --classes; a fraction
    is refused as before."""
    from streamcnn.app.common import UsageError
    user.same(user.read("path,label\n" + "".join(f"{r}.0\n" for r in user.rows)))
    p = [r.split(",")[0] for r in user.rows]
    assert user.read(f"path,label\n{p[0]},2.00\n{p[1]},0.0\n", num_classes=3).labels == \
        [2.0, 0.0]
    assert user.read(f"path,label\n{p[0]},tumour\n{p[1]},0.0\n",
                     classes=["normal", "tumour"]).labels == [1.0, 0.0]
    for label, kw, msg in (("0.5", {}, "is not 0 or 1 (task classification)"),
                           ("1.2", {"num_classes": 3}, "is not an integer in 0 .. 2"),
                           ("2.0", {}, "is not 0 or 1"), ("1.", {}, "is not 0 or 1"),
                           ("1.5", {"classes": ["a", "b"]}, "is not one of a, b")):
        with pytest.raises(UsageError, match=re.escape(f"user.csv line 3: label '{label}' "
                                                       f"{msg}")):
            user.read(f"path,label\n{p[0]},0\n{p[1]},{label}\n", **kw)


def test_class_weights(slides, tmp_path, capsys):
    """--class-weights: balanced is scikit-learn's n / (K n_c); each image's
    cross-entropy times its class's weight (also alone in a batch, where
    torch's weighted mean would cancel it); bad values refused."""
    from sklearn.utils.class_weight import compute_class_weight
    from streamcnn.app.common import class_weights, loss_of
    labels = [0.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    w = class_weights("balanced", labels, 3)
    want = compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float32))
    assert class_weights("none", labels, 3) is None
    assert class_weights("1,0,2.5", labels, 3).tolist() == [1.0, 0.0, 2.5]
    out = torch.randn(1, 3)
    for c in range(3):
        y = torch.tensor([float(c)])
        assert torch.allclose(loss_of(out, y, "classification", w),
                              w[c] * torch.nn.functional.cross_entropy(out, y.long()))
    out = tmp_path / "run"
    for bad in ("1,2,3", "a,b", "-1,1", "0,0", "nan,1", "", "unbalanced"):
        _bad(capsys, _train(slides, out, f"--class-weights={bad}"),
             f"--class-weights {bad!r} is not none, balanced or 2 comma-separated", out=out)
    _bad(capsys, _train(slides, out, "--class-weights", "balanced", "--task", "regression"),
         "--class-weights is for --task classification", out=out)
    one = tmp_path / "one.csv"
    one.write_text(f"path,label\n{slides / 'train_0.svs'},0\n")
    _bad(capsys, _train(slides, out, "--class-weights", "balanced", train=one),
         "--class-weights balanced", "no slide of class(es) 1", out=out)
    # 3 slides of class 0 and 1 of class 1: weights 2/3 and 2; the loss of
    # epoch 1 with weights 2,2 is twice that of none (AdamW does not see the
    # scale: the same steps)
    train = tmp_path / "t.csv"
    train.write_text("path,label\n" + "".join(f"{slides / f'train_{i}.svs'},{int(i == 3)}\n"
                                              for i in range(4)))
    losses = {}
    for wts in ("none", "2,2", "balanced"):
        run = tmp_path / f"run_{wts.replace(',', '_')}"
        cli_here(capsys, *_train(slides, run, "--class-weights", wts, "--epochs", "1",
                                 "--batch-size", "2", "--clip-grad", "0", train=train))
        losses[wts] = float(_csv(run / "metrics.csv")[0]["train_loss"])
        assert load_checkpoint(str(run / "last.pt"))["config"]["class_weights"] == wts
    assert abs(losses["2,2"] / losses["none"] - 2) < 1e-3, losses
    assert losses["balanced"] != losses["none"]


def test_named_classes(slides, tmp_path, capsys):
    """--classes normal,tumour: labels by name (or index), the names kept in
    the config and written beside the indices in every output; a table of
    names without --classes says to give it; bad --classes refused."""
    val = tmp_path / "val.csv"
    train = tmp_path / "train.csv"
    train.write_text("path,label\n" + "".join(
        f"{slides / f'train_{i}.svs'},{('normal', 'tumour')[i % 2]}\n" for i in range(4)))
    val.write_text("path,label\n" + "".join(
        f"{slides / f'val_{i}.svs'},{('normal', '1')[i % 2]}\n" for i in range(4)))
    out = tmp_path / "run"
    _bad(capsys, _train(slides, out, train=train), "train.csv line 2", "label 'normal'",
         "not 0 or 1", "give --classes", out=out)
    _bad(capsys, _train(slides, out, "--classes", "normal,tumor", train=train),
         "train.csv line 3", "label 'tumour' is not one of normal, tumor", out=out)
    for bad in ("normal", "a,a", "a,,b", "0,1", " , x"):
        _bad(capsys, _train(slides, out, f"--classes={bad}", train=train),
             f"--classes {bad!r} is not 2 or more distinct", out=out)
    _bad(capsys, _train(slides, out, "--classes", "a,b,c", "--num-classes", "2", train=train),
         "--num-classes 2 and --classes 'a,b,c' (3 names) disagree", out=out)
    cli_here(capsys, *_train(slides, out, "--classes", "normal,tumour", "--epochs", "1",
                             "--batch-size", "2", train=train, val=val))
    _, cfg = load_model(str(out / "best.pt"))
    assert cfg["classes"] == "normal,tumour" and cfg["num_classes"] == 2
    preds = _csv(out / "val_predictions.csv")
    assert list(preds[0]) == ["path", "label", "label_name", "score"]
    assert [(r["label"], r["label_name"]) for r in preds] == \
        [("0", "normal"), ("1", "tumour")] * 2
    cli_here(capsys, "evaluate", out / "best.pt", "--csv", val, "--out", tmp_path / "ev",
             "--quiet")
    assert _csv(tmp_path / "ev" / "predictions.csv") == preds
    cli_here(capsys, "predict", out / "best.pt", slides / "val_1.svs", "--out",
             tmp_path / "maps", "--heatmap", "none", "--quiet")
    row = _csv(tmp_path / "maps" / "predictions.csv")[0]
    assert row["prediction_name"] == ("normal", "tumour")[int(row["prediction"])]
    assert row["target_name"] == ("normal", "tumour")[int(row["target"])]
    # three named classes: prediction_name beside prediction
    train.write_text("path,label\n" + "".join(
        f"{slides / f'train_{i}.svs'},{'abc'[i % 3]}\n" for i in range(4)))
    val.write_text("path,label\n" + "".join(
        f"{slides / f'val_{i}.svs'},{'abc'[i % 3]}\n" for i in range(3)))
    out3 = tmp_path / "run3"
    cli_here(capsys, *_train(slides, out3, "--classes", "a,b,c", "--epochs", "1",
                             "--batch-size", "2", train=train, val=val))
    preds = _csv(out3 / "val_predictions.csv")
    assert list(preds[0]) == ["path", "label", "label_name", "prediction", "prediction_name",
                              "prob_0", "prob_1", "prob_2"]
    assert all(r["prediction_name"] == "abc"[int(r["prediction"])] for r in preds)


def test_bootstrap_interval(monkeypatch):
    """metric_interval: a stratified percentile bootstrap of the slides
    (scipy), against a plain numpy one of the AUC (20000 resamples,
    Mann-Whitney counting): the same interval to the noise of 2000
    resamples; every resample keeps each class's count; seeded; no
    interval (and why) for a class of one slide, a single class, or a
    regression whose resamples can be constant."""
    from streamcnn.app import common
    rng = np.random.default_rng(1)
    y = [0] * 30 + [1] * 20
    s = [float(v) for v in np.concatenate([rng.normal(0.4, 0.2, 30), rng.normal(0.6, 0.2, 20)])]
    value = common.metric(y, s, "classification")[0]
    lo, hi, why = common.metric_interval(y, s, "classification", resamples=2000, seed=3)
    neg, pos = np.array(s[:30]), np.array(s[30:])
    r = np.random.default_rng(7)
    a = neg[r.integers(0, 30, (20000, 30))][:, None, :]
    b = pos[r.integers(0, 20, (20000, 20))][:, :, None]
    auc = (b > a).mean((1, 2)) + 0.5 * (b == a).mean((1, 2))
    ref = np.percentile(auc, [2.5, 97.5])
    assert why == "" and lo < value < hi
    assert abs(lo - ref[0]) < 0.015 and abs(hi - ref[1]) < 0.015, (lo, hi, ref)
    assert common.metric_interval(y, s, "classification", resamples=2000, seed=3)[:2] == (lo, hi)
    lo50, hi50, _ = common.metric_interval(y, s, "classification", resamples=2000,
                                           confidence=0.5, seed=3)
    assert lo < lo50 < value < hi50 < hi
    seen = []
    real = common.metric

    def spy(labels, scores, task, kind=None):
        seen.append(sorted(int(v) for v in labels))
        return real(labels, scores, task, kind)
    monkeypatch.setattr(common, "metric", spy)
    common.metric_interval(y, s, "classification", resamples=60)
    assert len(seen) >= 60 and all(v == sorted(y) for v in seen)
    monkeypatch.undo()
    # three classes, kappa of the predicted classes
    y3 = [0, 0, 1, 1, 2, 2, 2]
    s3 = [[.7, .2, .1], [.4, .5, .1], [.1, .6, .3], [.2, .5, .3], [.1, .1, .8], [.2, .2, .6],
          [.1, .7, .2]]
    k = common.metric(y3, s3, "classification", "kappa")[0]
    lo, hi, why = common.metric_interval(y3, s3, "classification", "kappa", resamples=300)
    assert why == "" and lo <= k <= hi
    lo, hi, why = common.metric_interval([0, 0, 1], [.1, .2, .9], "classification")
    assert math.isnan(lo) and math.isnan(hi) and why.startswith("class(es) 1 have a single")
    lo, hi, why = common.metric_interval([1, 1, 1], [.1, .2, .9], "classification")
    assert math.isnan(lo) and "single class" in why
    lo, hi, why = common.metric_interval([1.0, 2.0, 3.0], [0.1, 0.3, 0.2], "regression",
                                         resamples=200)
    assert math.isnan(lo) and "undefined on some resamples" in why


def test_metric_choice(slides, tmp_path, capsys):
    """--metric kappa / accuracy / balanced_accuracy: the metrics.csv column
    and what picks best.pt; the values are scikit-learn's of the predicted
    classes; evaluate prints the run's metric or --metric's; metrics of the
    other task refused."""
    from sklearn import metrics as skm
    from streamcnn.app.common import metric
    # unit: binary P(class 1) and three-class probabilities
    y2, s2 = [0, 1, 1, 0], [0.2, 0.7, 0.4, 0.5]
    p2 = [0, 1, 0, 1]
    assert metric(y2, s2, "classification", "accuracy")[0] == skm.accuracy_score(y2, p2)
    assert metric(y2, s2, "classification", "kappa")[0] == pytest.approx(
        skm.cohen_kappa_score(y2, p2, weights="quadratic"))
    y3 = [0, 1, 2, 2, 1]
    s3 = [[.7, .2, .1], [.1, .3, .6], [.1, .1, .8], [.2, .5, .3], [.2, .6, .2]]
    p3 = [0, 2, 2, 1, 1]
    assert metric(y3, s3, "classification", "kappa")[0] == pytest.approx(
        skm.cohen_kappa_score(y3, p3, weights="quadratic"))
    assert metric(y3, s3, "classification", "balanced_accuracy")[0] == pytest.approx(
        skm.balanced_accuracy_score(y3, p3))
    v, why = metric([1, 1], [0.9, 0.8], "classification", "kappa")
    assert math.isnan(v) and "kappa is undefined" in why
    # a checkpoint from before these options resumes with them at what it ran with
    from streamcnn.app import config as C
    old = {"task": "classification", "lr": 0.1}
    assert C.differences(old, {"metric": "auc", "num_classes": 2, "classes": None,
                               "class_weights": "none", "slide_mpp": None}) == {}
    assert C.differences(old, {"metric": "kappa"}) == {"metric": ("auc", "kappa")}
    out = tmp_path / "run"
    _bad(capsys, _train(slides, out, "--metric", "spearman"), "--metric spearman",
         "not a metric of --task classification", out=out)
    _bad(capsys, _train(slides, out, "--metric", "kappa", "--task", "regression"),
         "--metric kappa", "not a metric of --task regression", out=out)
    cli_here(capsys, *_train(slides, out, "--metric", "kappa", "--epochs", "1",
                             "--batch-size", "2"))
    rows = _csv(out / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_kappa", "seconds",
                             "peak_memory_mb"]
    preds = _csv(out / "val_predictions.csv")
    y = [int(r["label"]) for r in preds]
    p = [int(float(r["score"]) >= 0.5) for r in preds]
    want = skm.cohen_kappa_score(y, p, weights="quadratic")
    got = float(rows[0]["val_kappa"])
    assert (math.isnan(got) and len(set(y + p)) == 1) or abs(got - want) < 1e-9, (got, want)
    res = cli_here(capsys, "evaluate", out / "best.pt", "--csv", slides / "val.csv", "--out",
                   tmp_path / "ev", "--quiet")
    assert res.stdout.split()[0] == "kappa"
    res = cli_here(capsys, "evaluate", out / "best.pt", "--csv", slides / "val.csv", "--out",
                   tmp_path / "ev", "--quiet", "--metric", "accuracy")
    assert res.stdout.split()[:2] == ["accuracy", f"{skm.accuracy_score(y, p):.4f}"]
    # the interval (2 validation slides of each class) printed and in metrics.json
    summary = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert summary["metric"] == "accuracy" and summary["slides"] == 4
    assert summary["value"] == pytest.approx(skm.accuracy_score(y, p))
    assert summary["resamples"] == 2000 and summary["stratified"] is True
    assert summary["ci_low"] <= summary["value"] <= summary["ci_high"]
    assert f"(95% CI {summary['ci_low']:.4f}-{summary['ci_high']:.4f}, 2000 stratified " \
        "bootstrap resamples; loss" in res.stdout
    res = cli_here(capsys, "evaluate", out / "best.pt", "--csv", slides / "val.csv", "--out",
                   tmp_path / "ev", "--quiet", "--bootstrap", "0")
    assert "CI" not in res.stdout
    summary = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert summary["ci_low"] is None and summary["resamples"] == 0
    # a class of a single slide: no interval, and no resamples recorded
    # (metrics.json said 2000 of a bootstrap that did not run)
    rows = _csv(slides / "val.csv")
    one = [r for r in rows if r["label"] == "0"] + [r for r in rows if r["label"] == "1"][:1]
    table = tmp_path / "one.csv"
    table.write_text("path,label\n" + "".join(
        f"{os.path.join(str(slides), r['path'])},{r['label']}\n" for r in one))
    res = cli_here(capsys, "evaluate", out / "best.pt", "--csv", table, "--out",
                   tmp_path / "ev1", "--quiet", "--metric", "accuracy")
    assert "no 95% CI: class(es) 1 have a single slide" in res.stdout
    summary = json.loads((tmp_path / "ev1" / "metrics.json").read_text())
    assert summary["ci_low"] is None and summary["resamples"] == 0 and summary["no_interval"]
    for flag, bad, what in (("--bootstrap", "-1", "--bootstrap must be non-negative"),
                            ("--confidence", "1", "--confidence must be in (0, 1)"),
                            ("--confidence", "0", "--confidence must be in (0, 1)")):
        _bad(capsys, ["evaluate", out / "best.pt", "--csv", slides / "val.csv", flag, bad],
             what)
    _bad(capsys, ["evaluate", out / "best.pt", "--csv", slides / "val.csv", "--metric",
                  "spearman"], "--metric spearman is not a metric of a classification model")


def _stop_in_slide(monkeypatch, k, exc):
    """Raise ``exc`` when the k-th slide of a run (1-based) is moved to the
    device, i.e. in the middle of scoring it; the returned list counts the
    slides started."""
    from streamcnn.app import common
    real = getattr(common.to_device, "real", common.to_device)  # not an earlier fake
    started = []

    def fake(img, device):
        started.append(len(started) + 1)
        if len(started) == k:
            raise exc()
        return real(img, device)
    fake.real = real
    monkeypatch.setattr(common, "to_device", fake)
    return started


def test_evaluate_resumes(slides, tmp_path, capsys, monkeypatch):
    """evaluate stopped (Ctrl-C, SIGTERM, a slide that cannot be read) keeps
    the slides scored so far in predictions.partial.csv; --resume scores the
    rest and prints and writes what an uninterrupted run does, bit for bit;
    rows added to the CSV are scored, other settings refused, and a run
    without --resume starts over."""
    from streamcnn.app.common import Terminated
    run = tmp_path / "run"
    cli_here(capsys, *_train(slides, run, "--epochs", "1", "--batch-size", "4"))
    val = slides / "val.csv"
    ev = ["evaluate", run / "last.pt", "--csv", val, "--quiet", "--bootstrap", "200"]
    whole = cli_here(capsys, *ev, "--out", tmp_path / "whole")
    out = tmp_path / "out"
    started = _stop_in_slide(monkeypatch, 3, KeyboardInterrupt)
    # (--resume without an earlier run starts)
    res = cli_here(capsys, *ev, "--out", out, "--resume", check_rc=130)
    partial = out / "predictions.partial.csv"
    assert res.stderr.strip() == (f"streamcnn: interrupted after 2 of 4 slides; {partial} "
                                  "holds their rows; continue with --resume")
    rows = _csv(partial)
    assert [r["path"] for r in rows] == [r["path"] for r in _csv(val)][:2]
    assert list(rows[0]) == ["path", "label", "score", "mpp", "loss"]
    assert not (out / "predictions.csv").exists() and not (out / "metrics.json").exists()
    # what a SIGKILL in the middle of writing leaves: the next evaluate in
    # the folder removes its own temporary files, not train's
    stale = [".metrics.json.abcd_123.tmp", ".predictions.partial.csv.x64hiz9y.tmp"]
    for n in stale + [".last.pt.abcd_123.tmp"]:
        (out / n).write_bytes(b"x")
    started = _stop_in_slide(monkeypatch, 2, Terminated)
    res = cli_here(capsys, *ev, "--out", out, "--resume", check_rc=143)
    assert "streamcnn: terminated after 3 of 4 slides; " in res.stderr
    left = set(os.listdir(out))
    assert not left & set(stale) and ".last.pt.abcd_123.tmp" in left, left
    (out / ".last.pt.abcd_123.tmp").unlink()
    # stopped once every slide is scored (in the bootstrap): said as in the
    # slides (it was a bare "interrupted"), and --resume scores none again
    from streamcnn.app import evaluate as evaluate_mod
    real_interval = evaluate_mod.metric_interval

    def stop_in_bootstrap(*a, **kw):
        raise KeyboardInterrupt()
    started = _stop_in_slide(monkeypatch, 2, None)
    monkeypatch.setattr(evaluate_mod, "metric_interval", stop_in_bootstrap)
    res = cli_here(capsys, *ev, "--out", out, "--resume", check_rc=130)
    assert res.stderr.strip() == (f"streamcnn: interrupted after 4 of 4 slides, in the metric; "
                                  f"{partial} holds their rows; continue with --resume")
    assert len(started) == 1 and not (out / "metrics.json").exists()
    monkeypatch.setattr(evaluate_mod, "metric_interval", real_interval)
    started = _stop_in_slide(monkeypatch, 99, None)
    res = cli_here(capsys, *[a for a in ev if a != "--quiet"], "--out", out, "--resume")
    assert not started and res.stdout == whole.stdout.replace(
        str(tmp_path / "whole"), str(out))
    assert "4 of 4 slides kept from the earlier run" in res.stderr
    assert (out / "predictions.csv").read_bytes() == \
        (tmp_path / "whole" / "predictions.csv").read_bytes()
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert m1 == m2 and not partial.exists()
    # a finished run is started over without --resume; other settings are
    # refused with it, naming them
    _stop_in_slide(monkeypatch, 2, KeyboardInterrupt)
    cli_here(capsys, *ev, "--out", out, check_rc=130)
    assert len(_csv(partial)) == 1
    _bad(capsys, [*ev, "--out", out, "--resume", "--amp", "bf16"],
         "--resume: the run in", "amp: 'off' then, 'bf16' now", "another --out")
    st = os.stat(run / "last.pt")
    os.utime(run / "last.pt")                   # a checkpoint written since
    _bad(capsys, [*ev, "--out", out, "--resume"], "checkpoint_mtime_ns")
    os.utime(run / "last.pt", ns=(st.st_atime_ns, st.st_mtime_ns))
    started = _stop_in_slide(monkeypatch, 3, KeyboardInterrupt)
    cli_here(capsys, *ev, "--out", out, "--resume", check_rc=130)
    assert [r["path"] for r in _csv(partial)] == ["val_0.svs", "val_1.svs", "val_2.svs"]
    # the CSV changed: row 1's label, a row added naming a slide again: those
    # are scored, the other rows kept (the paths as the CSV names them)
    for i in range(4):
        (tmp_path / f"val_{i}.svs").symlink_to(slides / f"val_{i}.svs")
    lines = val.read_text().splitlines()
    p0, l0 = lines[1].rsplit(",", 1)
    more = tmp_path / "more.csv"
    more.write_text("\n".join([lines[0], f"{p0},{1 - int(l0)}"] + lines[2:] +
                              [f"{p0},{1 - int(l0)}"]) + "\n")
    started = _stop_in_slide(monkeypatch, 99, None)
    cli_here(capsys, "evaluate", run / "last.pt", "--csv", more, "--quiet", "--out", out,
             "--resume", "--bootstrap", "0")
    assert len(started) == 3                    # rows 1, 4 and 5
    want = [r["score"] for r in _csv(tmp_path / "whole" / "predictions.csv")]
    assert [r["score"] for r in _csv(out / "predictions.csv")] == want + want[:1]
    # a slide that fails to be read stops the run the same way, its rows kept
    d = _damaged_set(slides, tmp_path / "d", "val")
    line = _bad(capsys, ["evaluate", run / "last.pt", "--csv", d / "t.csv", "--quiet", "--out",
                         tmp_path / "ev2"], "cannot be read",
                f"stopped after 1 of 2 slides; {tmp_path / 'ev2' / 'predictions.partial.csv'}"
                " holds their rows; fix or remove that slide's row, then continue with "
                "--resume")
    assert line.startswith(f"streamcnn: slide {d / 'val_1.svs'} (of {d / 't.csv'})")


def test_evaluate_keeps_its_inputs_and_its_folder(slides, tmp_path, capsys):
    """evaluate never writes over what it reads (its --csv named
    predictions.csv in --out, the checkpoint named metrics.json), nor into
    a folder of predict's results or one another evaluate is writing into
    (its lock, beside the run folder's that train holds: evaluating a
    training run's best.pt into its folder works while it trains); train
    --overwrite removes evaluate's results from the run folder with the
    run they scored."""
    from streamcnn.app.common import lock_folder
    run = tmp_path / "run"
    cli_here(capsys, *_train(slides, run, "--epochs", "1", "--batch-size", "4"))
    ev = tmp_path / "ev"
    ev.mkdir()
    table = ev / "predictions.csv"
    text = (slides / "val.csv").read_text().replace("val_", str(slides / "val_"))
    table.write_text(text)
    _bad(capsys, ["evaluate", run / "last.pt", "--csv", table, "--out", ev, "--quiet"],
         f"--csv table {table} is where evaluate writes predictions.csv")
    shutil.copy(run / "last.pt", ev / "metrics.json")
    _bad(capsys, ["evaluate", ev / "metrics.json", "--csv", slides / "val.csv", "--out", ev,
                  "--quiet"], "checkpoint", "is where evaluate writes metrics.json")
    assert table.read_text() == text and sorted(os.listdir(ev)) == ["metrics.json",
                                                                    "predictions.csv"]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "predict.json").write_text("{}")
    _bad(capsys, ["evaluate", run / "last.pt", "--csv", slides / "val.csv", "--out",
                  tmp_path / "p", "--quiet"], "holds the results of streamcnn predict")
    # the run folder locked by a training run: evaluate into it works; a
    # second evaluate into the same folder is refused while one runs
    held = lock_folder(str(run))
    try:
        cli_here(capsys, "evaluate", run / "best.pt", "--csv", slides / "val.csv", "--quiet",
                 "--bootstrap", "0")
        assert (run / "metrics.json").exists() and (run / "evaluate.json").exists()
        other = lock_folder(str(run), "evaluate", file=".evaluate.lock")
        try:
            _bad(capsys, ["evaluate", run / "best.pt", "--csv", slides / "val.csv",
                          "--quiet"], f"output folder {run} is in use by another streamcnn "
                                      "evaluate")
        finally:
            os.close(other)
    finally:
        os.close(held)
    # a slide listed twice (here through a link): said, each row scored
    (tmp_path / "link.svs").symlink_to(slides / "val_0.svs")
    twice = tmp_path / "twice.csv"
    twice.write_text(f"path,label\n{slides / 'val_0.svs'},0\nlink.svs,0\n"
                     f"{slides / 'val_1.svs'},1\n")
    res = cli_here(capsys, "evaluate", run / "best.pt", "--csv", twice, "--quiet",
                   "--bootstrap", "0", "--out", tmp_path / "ev2")
    assert res.stderr == (f"streamcnn: warning: {twice}: slide {slides / 'val_0.svs'} is "
                          "listed 2 times: each row is scored, and the metric counts each\n")
    assert len(_csv(tmp_path / "ev2" / "predictions.csv")) == 3
    # train --overwrite never removes a file it reads: a --val table named
    # as the run's val_predictions.csv, a --train table named as evaluate's
    # predictions.csv (in the folder evaluate wrote into)
    shutil.copy(slides / "val.csv", run / "keep.csv")
    for name, flag in (("val_predictions.csv", "val"), ("predictions.csv", "train")):
        os.replace(run / "keep.csv", run / name)
        (run / name).write_text(text)
        tables = {flag: run / name}
        _bad(capsys, _train(slides, run, "--epochs", "1", "--batch-size", "4", "--overwrite",
                            **tables),
             f"--{flag} CSV {run / name} is where train" +
             (" writes " if flag == "val" else " --overwrite removes ") + name)
        assert (run / name).read_text() == text
        os.replace(run / name, run / "keep.csv")
    (run / "notes.txt").write_text("mine")
    # what a killed run left: its TensorBoard curves (drawn under the new
    # run's), atomic writes' temporary files (a model-sized one per crash)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1796680000.host.1.0").write_bytes(b"x")
    stale = [".last.pt.k2_x9abc.tmp", ".metrics.csv.0123abcd.tmp"]
    kept = [".predictions.csv.0123abcd.tmp",      # evaluate's (its own lock)
            ".notes.txt.0123abcd.tmp", ".last.pt.tmp", "last.pt.0123abcd.tmp"]
    for n in stale + kept:
        (run / n).write_bytes(b"x")
    cli_here(capsys, *_train(slides, run, "--epochs", "1", "--batch-size", "4",
                             "--overwrite"))
    left = set(os.listdir(run))
    assert not left & {"metrics.json", "evaluate.json", "predictions.csv"}, left
    assert "notes.txt" in left and "tensorboard" not in left
    assert not left & set(stale) and set(kept) <= left, left


def test_resume_says_which_table_changed(slides, tmp_path, capsys):
    """--resume with a table edited at the same path (rows added, removed,
    relabelled, another mpp cell) says so on stderr, which table and how,
    and goes on with the table as it is now (it went on silently); an
    unchanged table says nothing."""
    rows = [line.split(",") for line in (slides / "train.csv").read_text().split()[1:]]
    t, v = tmp_path / "t.csv", tmp_path / "v.csv"

    def write(path, rows, mpp=None):
        path.write_text("path,label,mpp\n" + "".join(
            f"{slides / p},{lab},{mpp or ''}\n" for p, lab in rows))

    write(t, rows)
    write(v, [("val_0.svs", "0"), ("val_1.svs", "1")])
    out = tmp_path / "run"
    cli_here(capsys, *_train(slides, out, "--epochs", "1", "--batch-size", "4", train=t, val=v))
    write(t, [(rows[0][0], str(1 - int(rows[0][1])))] + rows[1:3] + [rows[1]])
    write(v, [("val_0.svs", "0"), ("val_1.svs", "1")], mpp="0.5")
    res = cli_here(capsys, *_train(slides, out, "--epochs", "2", "--batch-size", "4",
                                   "--resume", train=t, val=v))
    said = [line for line in res.stderr.splitlines() if "changed since" in line]
    assert said == [
        f"streamcnn: warning: --resume: --train CSV {t} changed since {out / 'last.pt'} was "
        "written (rows: 1 added, 1 removed, 1 with another label or mpp); training goes on "
        "with the table as it is now",
        f"streamcnn: warning: --resume: --val CSV {v} changed since {out / 'last.pt'} was "
        "written (rows: 2 with another label or mpp); training goes on with the table as it "
        "is now; the metric of the epochs before (and best.pt's) is of the table as it was"]
    res = cli_here(capsys, *_train(slides, out, "--epochs", "3", "--batch-size", "4",
                                   "--resume", train=t, val=v))
    assert "changed since" not in res.stderr
    assert [r["epoch"] for r in _csv(out / "metrics.csv")] == ["1", "2", "3"]


def test_help_names_defaults_of_zero():
    """--help gives each option's default; those of 0 were left out (0 ==
    False), --patience's among them; off switches and unset ones say none."""
    import argparse
    from streamcnn.app.config import add_options
    p = argparse.ArgumentParser(formatter_class=lambda prog: argparse.HelpFormatter(
        prog, width=10_000))
    add_options(p)
    lines = {ln.split()[0]: ln for ln in p.format_help().splitlines()
             if ln.strip().startswith("--")}
    for flag in ("--patience", "--warmup", "--workers"):
        assert lines[flag].endswith("(default 0)"), lines[flag]
    assert lines["--epochs"].endswith("(default 10)")
    assert not [ln for ln in lines.values() if "(default None)" in ln or "(default False)" in ln]

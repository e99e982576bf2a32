"""``streamcnn train``: it learns an easy signal, ``--resume`` repeats an
uninterrupted run, ``torchrun`` (2 processes, gloo on the CPU) takes the
same optimizer step as one process with the same effective batch, and
``--tile-parallel 2`` (2 processes sharing each image) trains the weights of
one process. The single-process runs call ``streamcnn.cli.main`` in this
process (no interpreter start-up, torch / torchvision imports per run); the
spawned and torchrun runs are processes of their own."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app_slides import write_set
from streamcnn.app.checkpoint import load_checkpoint

STREAMCNN = Path(sys.executable).parent / "streamcnn"
SMALL = ["--image-size", "256", "--mpp", "1.0", "--model", "resnet18", "--stream-upto",
         "layer1", "--tile-size", "160", "--device", "cpu", "--quiet"]


def _run(args, timeout=900, env=None):
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                         env=None if env is None else {**os.environ, **env})
    assert res.returncode == 0, (res.returncode, res.stdout[-3000:], res.stderr[-3000:])
    return res


def _train_args(slides, out, *extra, train_csv="train.csv"):
    small = SMALL
    if "--memory-budget" in extra:              # the budget instead of SMALL's tile
        i = SMALL.index("--tile-size")
        small = SMALL[:i] + SMALL[i + 2:]
    return ["train", "--train", str(slides / train_csv), "--val", str(slides / "val.csv"),
            "--out", str(out), *small, *map(str, extra)]


def train(slides, out, *extra, train_csv="train.csv", env=None):
    assert STREAMCNN.exists(), f"{STREAMCNN} is missing: install the package (make build)"
    return _run([str(STREAMCNN), *_train_args(slides, out, *extra, train_csv=train_csv)],
                env=env)


def train_here(slides, out, *extra, train_csv="train.csv", threads=None):
    """``train`` in this process (``streamcnn.cli.main``, what the console
    script runs): the single-process runs, whose own process adds nothing
    under test. ``threads=1``: one intra-op thread, as ``OMP_NUM_THREADS=1``
    gives a process of its own (and torchrun each of its processes)."""
    from streamcnn.cli import main
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rc = main(_train_args(slides, out, *extra, train_csv=train_csv))
    finally:
        torch.set_num_threads(before)
    assert rc == 0, rc


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_weights(a, b, rtol=1e-5, atol=1e-6):
    sa, sb = load_checkpoint(str(a))["model"], load_checkpoint(str(b))["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


def test_learns_an_easy_signal(tmp_path):
    """Dark tumour discs in half of the slides: validation AUC >= 0.9 and a
    validation loss below chance (ln 2) after 2 epochs (12 training slides,
    SGD, batch 4)."""
    write_set(tmp_path, n_train=12, n_val=8, size=512, seed=1)
    out = tmp_path / "run"
    train_here(tmp_path, out, "--epochs", "2", "--batch-size", "4", "--optimizer", "sgd",
               "--lr", "0.01", "--clip-grad", "0", "--tile-size", "256")
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 2
    last = rows[-1]
    assert float(last["val_auc"]) >= 0.9, rows
    assert float(last["val_loss"]) < 0.6931, rows
    assert float(last["train_loss"]) < float(rows[0]["train_loss"]), rows


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    """2 epochs in one go == 1 epoch, then --resume to 2: the same weights and
    metrics rows (the step schedule, warm-up, momentum and augmentation all
    carried over)."""
    write_set(tmp_path, n_train=4, n_val=2, size=512, seed=5)
    opts = ["--batch-size", "2", "--optimizer", "sgd", "--lr", "0.01", "--schedule", "step",
            "--step-epochs", "1", "--gamma", "0.5", "--warmup", "1", "--augment"]
    train_here(tmp_path, tmp_path / "a", "--epochs", "2", *opts)
    train_here(tmp_path, tmp_path / "b", "--epochs", "1", *opts)
    assert len(_rows(tmp_path / "b" / "metrics.csv")) == 1
    train_here(tmp_path, tmp_path / "b", "--epochs", "2", "--resume")
    _same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    ra, rb = _rows(tmp_path / "a" / "metrics.csv"), _rows(tmp_path / "b" / "metrics.csv")
    assert [r["epoch"] for r in rb] == ["1", "2"]
    for x, y in zip(ra, rb):
        for k in ("train_loss", "val_loss", "val_auc"):
            assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-5, abs=1e-6), (k, x, y)
    ca, cb = load_checkpoint(str(tmp_path / "a" / "last.pt")), \
        load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert ca["epoch"] == cb["epoch"] == 2
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"] == 4
    assert ca["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        cb["optimizer"]["param_groups"][0]["lr"])


def test_resume_with_more_epochs_follows_the_new_cosine(tmp_path):
    """1 epoch of cosine (its last step ends the curve at 0), then --resume
    --epochs 2: the optimizer steps at the new curve's rates (the first was
    taken at the checkpoint's 0 and, one step an epoch, nothing moved)."""
    write_set(tmp_path, n_train=2, n_val=2, size=512, seed=6)
    opts = ["--batch-size", "2", "--optimizer", "sgd", "--lr", "0.01", "--schedule", "cosine"]
    train_here(tmp_path, tmp_path / "a", "--epochs", "1", *opts)
    first = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    assert first["optimizer"]["param_groups"][0]["lr"] == 0.0
    train_here(tmp_path, tmp_path / "a", "--epochs", "2", "--resume")
    last = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    moved = [k for k, v in first["model"].items()
             if v.is_floating_point() and not torch.equal(v, last["model"][k])]
    assert "fc.weight" in " ".join(moved), moved
    rows = _rows(tmp_path / "a" / "metrics.csv")
    assert rows[0]["val_loss"] != rows[1]["val_loss"], rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_equals_single_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo), 1 image per process per step ==
    one process accumulating 2 images: the weights after the optimizer step
    agree to float32 tolerance. DistributedDataParallel as it is: no
    find_unused_parameters, no manual backward."""
    write_set(tmp_path, n_train=2, n_val=2, size=512, seed=9)
    opts = ["--epochs", "1", "--batch-size", "2", "--optimizer", "sgd", "--lr", "0.1",
            "--momentum", "0", "--augment"]
    train_here(tmp_path, tmp_path / "single", *opts)
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "streamcnn", "train", "--train",
                str(tmp_path / "train.csv"), "--val", str(tmp_path / "val.csv"), "--out",
                str(tmp_path / "ddp"), *SMALL, *opts], timeout=600)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    single = load_checkpoint(str(tmp_path / "single" / "last.pt"))
    ddp = load_checkpoint(str(tmp_path / "ddp" / "last.pt"))
    assert ddp["model"].keys() == single["model"].keys()
    for k, v in single["model"].items():     # batch norms frozen: buffers equal too
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    # the step did something: the weights left their (seeded) initial values
    from streamcnn.app.checkpoint import model_from_config
    torch.manual_seed(single["config"]["seed"])
    start = model_from_config(single["config"]).state_dict()
    k = "head.fc.weight"
    assert (single["model"][k] - start[k]).abs().max() > 1e-4
    # metrics gathered over ranks: the same validation rows
    rs, rd = _rows(tmp_path / "single" / "metrics.csv"), _rows(tmp_path / "ddp" / "metrics.csv")
    for key in ("train_loss", "val_loss", "val_auc"):
        assert float(rd[0][key]) == pytest.approx(float(rs[0][key]), rel=1e-4, abs=1e-6)
    assert len(_rows(tmp_path / "ddp" / "val_predictions.csv")) == 2



# --tile-parallel: 2 epochs of one SGD step (momentum, clipping, augmentation)
TP_OPTS = ["--epochs", "2", "--batch-size", "2", "--optimizer", "sgd", "--lr", "0.01",
           "--augment"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}       # as torchrun sets it


@pytest.fixture(scope="module")
def tp_single(tmp_path_factory):
    """2 training slides and the run of one process (one thread)."""
    d = tmp_path_factory.mktemp("tp")
    write_set(d, n_train=2, n_val=2, size=512, seed=9)
    train_here(d, d / "single", *TP_OPTS, threads=1)
    return d


def _same_as_single(d, run, world):
    """The run's last.pt == the single process's (float32 tolerance, see
    below), its ranks' weights bit-identical, the same metrics rows."""
    from streamcnn.app.checkpoint import model_from_config
    from streamcnn.app.tile_parallel import weights_digest
    single = load_checkpoint(str(d / "single" / "last.pt"))
    tp = load_checkpoint(str(d / run / "last.pt"))
    assert tp["config"]["tile_parallel"] == 2 and tp["epoch"] == 2
    assert tp["model"].keys() == single["model"].keys()
    for k, v in single["model"].items():
        torch.testing.assert_close(tp["model"][k], v, rtol=1e-5, atol=1e-7, msg=k)
    digests = tp["rank_digests"]
    assert len(digests) == world and set(digests) == {weights_digest(tp["model"])}
    assert "rank_digests" not in single and "rank_rows" not in single
    # each rank of a group read only its band's rows of the 256-row images,
    # and the ranks' sums of the channels covered every row once
    (read0, sums0), (read1, sums1) = tp["rank_rows"]
    assert read0[0] == 0 and read1[1] == 256
    assert read0[1] < 256 and read1[0] > 0, tp["rank_rows"]
    assert sums0 == [0, sums1[0]] and sums1[1] == 256
    assert read1[0] <= sums1[0] <= read0[1]
    # the weights moved: the comparison is not of two initial models
    torch.manual_seed(single["config"]["seed"])
    start = model_from_config(single["config"]).state_dict()
    for k in ("head.fc.weight", "stem.module.conv1.weight"):
        assert (single["model"][k] - start[k]).abs().max() > 1e-4, k
    rs, rt = _rows(d / "single" / "metrics.csv"), _rows(d / run / "metrics.csv")
    assert len(rt) == 2
    for x, y in zip(rs, rt):
        for key in ("train_loss", "val_loss", "val_auc"):
            assert float(y[key]) == pytest.approx(float(x[key]), rel=1e-5, abs=1e-6), (key, x, y)
    assert sorted(p.name for p in (d / run).iterdir()) == sorted(
        p.name for p in (d / "single").iterdir())
    return tp


def test_tile_parallel_trains_the_weights_of_one_process(tp_single):
    """``--tile-parallel 2`` (the command spawns 2 gloo processes, each
    computing one row band of every image's stem) == the same run in one
    process. Both use one thread per process, so the head computes alike;
    what differs is only the order of float32 sums in the stem (bands, the
    all_reduce over the ranks): a few ulps of the weights (seen: 1.5e-8
    absolute, weights ~0.05), hence rtol 1e-5 / atol 1e-7. The ranks'
    weights are bit-identical (every rank's digest, kept in the
    checkpoint)."""
    d = tp_single
    res = train(d, d / "tp", *TP_OPTS, "--tile-parallel", "2", env=ONE_THREAD)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stdout.count("best epoch") == 1, res.stdout      # rank 0 alone reports
    _same_as_single(d, "tp", 2)


def test_tile_parallel_bf16_with_a_memory_budget(tp_single):
    """``--tile-parallel 2 --amp bf16 --memory-budget 300MB``: the bands run
    under autocast (bfloat16) with the tile the budget picks for one image,
    fixed on every rank; the run trains the weights of one process with the
    same options up to bfloat16 rounding: the bands' sums round differently
    (and the head, under autocast too, sees that), so each tensor's
    difference is held to a fraction of how far training moved it (seen:
    at most 0.13; a wrong row, band or jitter moves it as far as training)."""
    d = tp_single
    opts = TP_OPTS + ["--amp", "bf16", "--memory-budget", "300MB"]
    train_here(d, d / "single_bf16", *opts, threads=1)
    res = train(d, d / "tp_bf16", *opts, "--tile-parallel", "2", env=ONE_THREAD)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    single = load_checkpoint(str(d / "single_bf16" / "last.pt"))
    tp = load_checkpoint(str(d / "tp_bf16" / "last.pt"))
    assert tp["config"]["amp"] == "bf16" and tp["config"]["memory_budget"] == "300MB"
    assert len(set(tp["rank_digests"])) == 1 and len(tp["rank_rows"]) == 2
    from streamcnn.app.checkpoint import model_from_config
    torch.manual_seed(single["config"]["seed"])
    start = model_from_config(single["config"]).state_dict()
    checked = 0
    for k, v in single["model"].items():
        moved = float((v - start[k]).abs().max()) if v.is_floating_point() else 0.0
        diff = float((tp["model"][k] - v).abs().max()) if v.is_floating_point() else 0.0
        if moved > 1e-6:
            assert diff <= 0.3 * moved, (k, diff, moved)
            checked += 1
    assert checked > 40, checked


def test_tile_parallel_grid_under_torchrun(tp_single):
    """torchrun --nproc_per_node=4 --tile-parallel 2: a 2 x 2 grid (2
    tile-parallel groups, one image per group and step, gradients averaged
    over the 2 replicas) == one process accumulating the 2 images."""
    d = tp_single
    res = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                "--nproc_per_node=4", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "streamcnn", "train", "--train",
                str(d / "train.csv"), "--val", str(d / "val.csv"), "--out", str(d / "grid"),
                *SMALL, *TP_OPTS, "--tile-parallel", "2"], timeout=600)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stdout.count("best epoch") == 1, res.stdout
    _same_as_single(d, "grid", 4)

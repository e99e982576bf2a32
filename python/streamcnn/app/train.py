"""``streamcnn train``: train a slide classifier (or regressor) end to end,
streamed, with validation every epoch, checkpoints, plots and resume; data
parallel under ``torchrun``.

    streamcnn train --train train.csv --val val.csv --out runs/a [options]
    torchrun --nproc_per_node=2 -m streamcnn train ...
    streamcnn train ... --tile-parallel 2          # 2 processes share each image
    torchrun --nproc_per_node=4 -m streamcnn train ... --tile-parallel 2

Each optimizer step accumulates the gradients of ``--batch-size`` per-image
steps (split over the processes). The data order (a seeded permutation per
epoch, sharded like ``DistributedSampler``) and the augmentation are
functions of ``(seed, epoch, index)``, so a resumed run repeats an
uninterrupted one.

``--tile-parallel N``: N processes cooperate on each image, each computing
one row band of the stem output (``streamcnn.distributed.TileParallel``).
Without ``torchrun`` the command starts the N processes itself
(``torch.multiprocessing``, a local TCP rendezvous); under ``torchrun`` the
world is a 2-D grid: tile-parallel groups of N consecutive ranks, each
group one data-parallel replica (seeing its share of the images, the same
images in the same order with the same augmentation on every rank of the
group). Each rank reads only the rows of each image its band needs
(``tile_parallel.RowPlan``), jittered with the image's channel sums added up
over the group. At each optimizer step the accumulated gradients (the stem's
already summed over the tile-parallel group) are averaged over the
data-parallel group and broadcast from the first rank of each tile-parallel
group, so every rank takes the same step and the ranks never drift
(checked every epoch: a digest of every rank's weights).
"""

import argparse
import collections
import contextlib
import gc
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint as ckpt_io
from . import config as C
from . import tile_parallel as TP
from .common import (AMP_DTYPES, Dist, RunFolderBusy, Slides, UsageError, autocast,
                     check_inputs_kept, check_stop, class_weights, dist_from_env,
                     group_ended, init_distributed, lock_folder, loss_of, metric,
                     metric_name, peak_memory_mb, plot_roc, predict, read_slide_table,
                     remove_stale_temps, reset_peak_memory, resolve_device, save_figure,
                     stop_status, stopped_by, stops_deferred, to_device,
                     worker_exits_on_sigterm, workers_ignore_sigint, write_atomic, write_csv,
                     write_predictions)

RUN_FILES = ("config.yaml", "metrics.csv", "last.pt", "best.pt", "curves.png", "roc.png",
             "val_predictions.csv")


class Diverged(UsageError):
    """The loss is not finite: the options (learning rate, ...) make the
    training diverge (exit 2 with the epoch and image)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="TOML (.toml) or YAML file of options; flags override it")
    C.add_options(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run that --out holds (and the results "
                             "streamcnn evaluate wrote there)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# -- set-up -------------------------------------------------------------------------------
def _run_files(out: str) -> List[str]:
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]


def _evaluate_files(out: str) -> List[str]:
    """The results ``streamcnn evaluate`` wrote into the run folder (its
    default --out), which --overwrite removes with the run they scored."""
    from .evaluate import OUTPUTS, SETTINGS
    if not os.path.exists(os.path.join(out, SETTINGS)):
        return []
    return [f for f in OUTPUTS if os.path.exists(os.path.join(out, f))]


def _remove_event_files(folder: str) -> None:
    """The TensorBoard event files of the run --overwrite replaces (kept,
    TensorBoard drew the old run's curves under the new one's), and the
    folder where that empties it."""
    if not os.path.isdir(folder):
        return
    for n in os.listdir(folder):
        if n.startswith("events.out.tfevents."):
            os.unlink(os.path.join(folder, n))
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _check_out(out: str, resume: bool, overwrite: bool) -> str:
    """Refuse an ``--out`` the run may not write into; returns ``""``, or
    the line to say (rank 0, when it writes config.yaml) where a run starts
    from epoch 1 in a folder that is not empty, or that ``--resume`` named:

    * config.yaml alone (a run that stopped before its first epoch ended:
      nothing was trained, nothing to protect) starts again with this
      invocation's options, with or without ``--resume``;
    * ``--resume`` into a folder that does not exist or holds no run
      starts one (a requeued job may always give ``--resume``, as with
      ``predict`` and ``evaluate``)."""
    if resume and overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    up = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(up):       # the nearest existing folder above
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise UsageError(f"--out {out} cannot be created: {up} is a file, not a folder")
    held = _run_files(out) if os.path.isdir(out) else []
    if held == ["config.yaml"] and not overwrite:
        return (f"{out} holds a run that stopped before its first epoch ended (config.yaml "
                "alone, no checkpoint): starting it again from epoch 1 with these options")
    if resume:
        if "last.pt" in held:
            return ""
        if held:
            _refuse_busy(out)
            raise UsageError(f"--resume: no checkpoint {os.path.join(out, 'last.pt')} to "
                             f"continue from ({out} holds {', '.join(held)}); --overwrite "
                             "replaces them")
        return f"--resume: {out} holds no run yet: starting one from epoch 1"
    if held and not overwrite:
        _refuse_busy(out)
        raise UsageError(f"--out {out} holds another run ({', '.join(held)}); use --resume "
                         "to continue it or --overwrite to replace it")
    return ""


def _refuse_busy(out: str) -> None:
    """RunFolderBusy where another training holds ``out``'s lock: a folder
    refused for its files while a training writes them (its first epoch:
    no last.pt yet) is refused for that, the reason the user can act on.
    Only rank 0 looks (the only rank that ever takes the lock, and not
    yet: nothing of this job holds it)."""
    if os.environ.get("RANK", "0") == "0":
        fd = lock_folder(out)
        if fd is not None:
            os.close(fd)


def _check_inputs_kept(cfg, train_t, val_t, overwrite: bool) -> None:
    """The run never writes over (or, with --overwrite, removes) a file it
    reads: a table, a slide or the --weights file in the run folder under
    the name of one of the run's files (a --val table called
    val_predictions.csv there is refused, not overwritten at the first
    epoch)."""
    from .evaluate import OUTPUTS
    inputs = [("--train CSV", cfg["train"]), ("--val CSV", cfg["val"])]
    if cfg["weights"]:
        inputs.append(("--weights file", cfg["weights"]))
    inputs += [("slide", p) for p in list(train_t.paths) + list(val_t.paths)]
    try:
        check_inputs_kept([os.path.join(cfg["out"], f) for f in RUN_FILES], inputs, "train")
        if overwrite:
            check_inputs_kept([os.path.join(cfg["out"], f) for f in OUTPUTS], inputs,
                              "train --overwrite", verb="removes")
    except ValueError as e:
        raise UsageError(str(e).replace("streamcnn: ", "", 1)) from None


def _resolve(args) -> Dict[str, Any]:
    """The run's config, on resume the checkpoint (None where the run starts
    from epoch 1) and what to say of a start: ``{"cfg", "ckpt", "note"}``."""
    from_file, flags = C.explicit_options(args)
    given = {**from_file, **flags}
    if "stream_upto" in given and given["stream_upto"] is not None:
        given["stream_upto"] = str(given["stream_upto"])
    out = given.get("out")
    if not out:
        raise UsageError("train: --out is required")
    note = _check_out(out, args.resume, args.overwrite)
    if not args.resume or note:
        return {"cfg": C.resolve(given), "ckpt": None, "note": note}
    path = os.path.join(out, "last.pt")
    try:
        ckpt = ckpt_io.load_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    saved = ckpt["config"]
    diff = C.differences(saved, given)
    if diff:
        parts = [f"{k} {a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items()]
        raise UsageError(f"--resume: {path} was trained with another config: "
                         + "; ".join(parts))
    cfg = C.resolve({k: v for k, v in given.items() if k in C.RESUME_FREE}, base=saved)
    return {"cfg": cfg, "ckpt": ckpt, "note": ""}


def _build_model(cfg):
    from ..classifier import build_model
    torch.manual_seed(cfg["seed"])
    try:
        return build_model(cfg["model"], num_outputs=cfg["num_outputs"],
                           stream_upto=cfg["stream_upto"], head=cfg["head"],
                           weights=cfg["weights"], tile_size=cfg["tile_size"],
                           memory_budget=cfg["memory_budget"], mean=cfg["mean"],
                           std=cfg["std"])
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def _check_image_size(model, cfg) -> None:
    """An --image-size the network cannot take (a layer's input smaller
    than its window: Inception-v3 needs 75) is refused before the run
    folder is written."""
    from ..classifier import min_image_size
    need = min_image_size(model)
    if cfg["image_size"] < need:
        raise UsageError(f"--image-size {cfg['image_size']} is too small for --model "
                         f"{cfg['model']} (streamed to {cfg['stream_upto']}): it takes images "
                         f"of at least {need} x {need} pixels")


def _optimizer(cfg, params):
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                               weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def _schedule(cfg, opt, steps_per_epoch: int):
    """LambdaLR per optimizer step: linear warm-up, then constant, cosine to
    0 at the last step, or x gamma every step_epochs epochs."""
    total = max(1, cfg["epochs"] * steps_per_epoch)
    warm, kind = cfg["warmup"], cfg["schedule"]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "cosine":
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * t))
        if kind == "step":
            return cfg["gamma"] ** (step // (cfg["step_epochs"] * steps_per_epoch))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _freeze_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _rng_state() -> Dict[str, Any]:
    import numpy as np
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plot_curves(path: str, rows: List[Dict[str, Any]], mname: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(ep, [r[mname] for r in rows], "o-", c="C2")
    b.set(xlabel="epoch", ylabel=mname, title=mname.replace("val_", "validation "))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if len(ep) < 12:
            ax.set_xticks(ep)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _fmt(v: float) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:.6g}"


# -- the run ------------------------------------------------------------------------------
def run(args) -> int:
    dist = dist_from_env()
    r = _resolve(args)
    cfg, ckpt = r["cfg"], r["ckpt"]
    n = cfg["tile_parallel"]
    TP.check_options(cfg, dist)
    if n > 1 and not dist.enabled:
        del r, ckpt                              # each process reads its own
        return TP.spawn(args, n)
    device = resolve_device(cfg["device"], dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(dist, device, TP.backend(device, dist) if n > 1 else None)
    grid = TP.make_grid(dist, n, device) if n > 1 else None
    locks: List[int] = []   # the run folder's lock (lock_folder), released at the end
    try:
        return _train(cfg, ckpt, dist, device, quiet=args.quiet, overwrite=args.overwrite,
                      grid=grid, locks=locks, note=r["note"])
    finally:
        for fd in locks:
            os.close(fd)
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            # objects that still reference a group (cycles) freed now, while
            # the interpreter is whole, not in its finalization
            gc.collect()
            group_ended()


def _train(cfg, ckpt, dist: Dist, device, quiet: bool, overwrite: bool,
           grid: Optional[TP.Grid] = None, locks: Optional[List[int]] = None,
           note: str = "") -> int:
    """The training, from ``ckpt`` (None: from epoch 1, writing config.yaml;
    rank 0 says ``note`` then); ``locks`` gets the descriptor of the run
    folder's lock (rank 0), for the caller to close when it ends."""
    from tqdm import tqdm
    out, task = cfg["out"], cfg["task"]
    mname = metric_name(task, cfg["metric"])
    # replicas: the processes that see different images (the data-parallel
    # ranks; with --tile-parallel the tile-parallel groups)
    replicas = dist if grid is None else grid.dp
    if cfg["batch_size"] % replicas.world:
        what = "processes" if grid is None else "data-parallel groups"
        raise UsageError(f"--batch-size {cfg['batch_size']} must be a multiple of the "
                         f"{replicas.world} {what}")
    if cfg["amp"] == "fp16" and device.type == "cpu":
        pass                               # CPU autocast runs float16 too (slowly)
    writer_cls = None
    if cfg["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter as writer_cls
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package (pip install "
                             "tensorboard)") from None
    names = C.parse_classes(cfg["classes"])
    # (each slide read at --mpp must give an image: checked now, not when read)
    train_t = read_slide_table(cfg["train"], task, "--train CSV", slide_mpp=cfg["slide_mpp"],
                               num_classes=cfg["num_classes"], classes=names,
                               read_mpp=cfg["mpp"], image_size=cfg["image_size"])
    val_t = read_slide_table(cfg["val"], task, "--val CSV", slide_mpp=cfg["slide_mpp"],
                             num_classes=cfg["num_classes"], classes=names,
                             read_mpp=cfg["mpp"], image_size=cfg["image_size"])
    _check_inputs_kept(cfg, train_t, val_t, overwrite)
    _check_tables(train_t, val_t, dist.main)
    if ckpt is not None and dist.main:
        _tables_changed(ckpt.get("tables"), {"train": train_t, "val": val_t},
                        os.path.join(out, "last.pt"))
    weights = class_weights(cfg["class_weights"], train_t.labels, cfg["num_classes"]) \
        if task == "classification" else None
    model = _build_model(cfg)
    _check_image_size(model, cfg)
    if cfg["freeze_stem"]:
        # no gradient reaches the stem: it runs forward only (its autograd
        # node is not recorded) and the optimizer holds the head alone
        model.stem.requires_grad_(False)
    if ckpt is not None:
        try:
            ckpt_io.load_weights(model, ckpt["model"], os.path.join(out, "last.pt"),
                                 ckpt["config"])
        except ValueError as e:
            raise UsageError("--resume: " + str(e).replace("streamcnn: ", "", 1)) from None
    tp_net, my_rows = None, None
    if grid is not None:
        size = cfg["image_size"]
        if model.stem.memory_budget:
            # every rank streams the tile the budget picks for a training
            # step of one image (in the autocast dtype with --amp)
            model.stem.fix_tile(size, size, dtype=AMP_DTYPES[cfg["amp"]] or torch.float32,
                                device=device)
        # each rank reads only the rows of each image its band needs
        tp_net = TP.TileParallelNet(model, grid, size)
        my_rows = (tp_net.plan.read, tp_net.plan.sums)
    try:
        train_ds = Slides(train_t, cfg["image_size"], cfg["mpp"], cfg["crop"],
                          augment=cfg["augment"], seed=cfg["seed"], rows=my_rows,
                          slide_mpp=cfg["slide_mpp"])
        val_ds = Slides(val_t, cfg["image_size"], cfg["mpp"], cfg["crop"], rows=my_rows,
                        slide_mpp=cfg["slide_mpp"])
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    if model.stem.memory_budget:
        # a budget too small for the training images is refused now, not at
        # the first step with the run folder written
        try:
            model.stem.budget_tile(1, cfg["image_size"], cfg["image_size"],
                                   dtype=AMP_DTYPES[cfg["amp"]] or torch.float32,
                                   training=not cfg["freeze_stem"], device=device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    # every rank has checked everything before rank 0 writes anything, and
    # goes on from the same epoch: each decided from the run folder it sees
    # (a folder not on a file system every rank shares: last.pt on one node,
    # none on another)
    starts = dist.gather(int(ckpt["epoch"]) if ckpt is not None else 0)
    if len(set(starts)) > 1:
        other = next(i for i, e in enumerate(starts) if e != starts[0])
        raise UsageError(f"the ranks see different run folders {out}: rank 0 would start "
                         f"after epoch {starts[0]}, rank {other} after epoch "
                         f"{starts[other]} (the epoch of the last.pt each sees, 0 for none); "
                         "give an --out on a file system every rank shares")
    busy = fd = None
    if dist.main:
        # one training at a time in a run folder: a second one (started
        # twice, a requeued job while the first still runs) would write
        # its checkpoints and metrics over the first's
        try:
            os.makedirs(out, exist_ok=True)
            fd = lock_folder(out)
            if fd is not None and locks is not None:
                locks.append(fd)
        except RunFolderBusy as e:
            busy = e
    if not dist.all_true(busy is None):
        raise busy or RunFolderBusy(f"run folder {out} is in use by another training")
    if dist.main:
        if fd is not None:              # the folder is this run's alone
            remove_stale_temps(out, RUN_FILES.__contains__)
        if overwrite:
            for f in _run_files(out) + _evaluate_files(out):
                os.unlink(os.path.join(out, f))
            _remove_event_files(os.path.join(out, "tensorboard"))
        if ckpt is None:
            import yaml
            if note:
                print(f"streamcnn: {note}", file=sys.stderr)
            write_atomic(os.path.join(out, "config.yaml"),
                         yaml.safe_dump(cfg, sort_keys=False).encode())
    dist.barrier()

    model.to(device)
    net = model
    ddp = None
    buffers: List[torch.Tensor] = []
    if grid is not None:
        # the same initial (or resumed) weights on every rank, as DDP does
        for t in model.state_dict().values():
            c = t.to(grid.comm)
            torch.distributed.broadcast(c, src=0)
            t.copy_(c)
        net = tp_net
        if cfg["bn"] == "train":
            buffers = list(model.head.buffers())
    elif dist.enabled:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
        net = ddp
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(cfg, params)
    # every rank of a tile-parallel group: the same images, order and augmentation
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=replicas.world,
                                                  rank=replicas.rank, shuffle=True,
                                                  seed=cfg["seed"], drop_last=False)
    workers_ignore_sigint()
    loader = torch.utils.data.DataLoader(train_ds, batch_size=1, sampler=sampler,
                                         num_workers=cfg["workers"],
                                         worker_init_fn=worker_exits_on_sigterm)
    per_rank = cfg["batch_size"] // replicas.world
    n_local = len(sampler)
    steps_per_epoch = math.ceil(n_local / per_rank)
    sched = _schedule(cfg, opt, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16" else None

    rows: List[Dict[str, Any]] = []
    best: Optional[list] = None
    start = 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        # the next step's rate on this run's curve (the optimizer holds the
        # checkpoint's: with --epochs raised, cosine's old end, 0); the
        # same rate, bit for bit, when the curve is unchanged
        for g, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        rows = list(ckpt["metrics"])
        best = ckpt.get("best")
        start = int(ckpt["epoch"])
        if start >= cfg["epochs"]:
            if dist.main:
                done = (f"has finished epoch {start} of {cfg['epochs']}"
                        if start == cfg["epochs"] else
                        f"has trained {start} epochs, more than --epochs {cfg['epochs']}")
                print(f"streamcnn: {out}/last.pt {done}; nothing to do (raise --epochs to "
                      "train longer)")
            return 0
        stale = _stale(rows, mname, cfg["patience"])
        if stale:
            if dist.main:
                print(f"streamcnn: {out} stopped early at epoch {start}: {stale}; nothing "
                      "to do (raise --patience, or 0, to train on)")
            return 0
        if dist.main:        # the rows of the checkpoint (a later row was never finished)
            _write_metrics(out, rows, mname)
    show = dist.main and not quiet
    writer = writer_cls(os.path.join(out, "tensorboard")) if writer_cls and dist.main else None
    warned = False
    epoch = saved = start  # saved: the epoch last.pt holds
    try:
        for epoch in tqdm(range(start, cfg["epochs"]), desc="epochs", unit="epoch",
                          initial=start, total=cfg["epochs"], disable=not show,
                          dynamic_ncols=True):
            check_stop()
            t0 = time.perf_counter()
            reset_peak_memory(device)
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            model.train()
            if cfg["bn"] == "frozen":
                _freeze_bn(model)
            opt.zero_grad(set_to_none=True)
            loss_sum, count = 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="img", leave=False,
                       disable=not show, dynamic_ncols=True)
            t_step = time.perf_counter()
            for k, (img, label, _) in enumerate(bar):
                check_stop()                # a stop whose exception Python dropped
                first = (k // per_rank) * per_rank
                group = min(per_rank, n_local - first)
                final = k - first == group - 1
                img, label = to_device(img, device), label.to(device)
                sync = ddp.no_sync() if ddp is not None and not final else \
                    contextlib.nullcontext()
                with sync:
                    with autocast(device, cfg["amp"]):
                        y = net(img)
                    loss = loss_of(y, label, task, weights)
                    scaled = loss / group
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise Diverged(f"training diverged in epoch {epoch + 1}, image {k + 1} "
                                   f"(loss {value}); lower --lr, or use --warmup or "
                                   "--clip-grad")
                loss_sum += value
                count += 1
                if final:
                    if grid is not None:
                        TP.sync_step(params, buffers, grid)
                    if cfg["clip_grad"] > 0:
                        if scaler is not None:
                            scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad"])
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():
                        # fp16's GradScaler skips the optimizer's step where
                        # the gradients overflowed (its first steps): torch
                        # then warns that the schedule steps before the
                        # optimizer, which is meant (per step, skipped or not)
                        warnings.filterwarnings(
                            "ignore", message=r"Detected call of `lr_scheduler\.step\(\)`",
                            category=UserWarning)
                        sched.step()
                    if not all(bool(torch.isfinite(p).all()) for p in params):
                        raise Diverged(f"training diverged in epoch {epoch + 1}, image "
                                       f"{k + 1}: the weights are not finite after the "
                                       "optimizer step; lower --lr, or use --warmup or "
                                       "--clip-grad")
                    now = time.perf_counter()
                    bar.set_postfix(loss=f"{loss_sum / count:.4f}",
                                    s_step=f"{now - t_step:.2f}")
                    t_step = now
            bar.close()
            sums = replicas.gather((loss_sum, count))
            train_loss = sum(s for s, _ in sums) / max(1, sum(c for _, c in sums))
            # the replicas split the validation set; a tile-parallel group
            # scores each of its slides together
            indices, scores, val_loss = predict(net if grid is not None else model, val_ds,
                                                device, task, cfg["amp"], replicas,
                                                cfg["workers"], show,
                                                desc=f"validate {epoch + 1}")
            labels = [val_t.labels[i] for i in indices]
            value, why = metric(labels, scores, task, cfg["metric"])
            if why and dist.main and not warned:
                tqdm.write(f"streamcnn: warning: {why}; {mname} is written as nan, "
                           "training goes on", file=sys.stderr)
                warned = True
            peak = max(dist.gather(peak_memory_mb(device)))
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                   mname: value, "seconds": time.perf_counter() - t0,
                   "peak_memory_mb": peak}
            rows.append(row)
            key = _best_key(row, mname)
            improved = best is None or key > best
            if improved:
                best = key
            digests = None
            if grid is not None:
                digests = dist.gather(TP.weights_digest(model.state_dict()))
                if len(set(digests)) != 1:
                    raise RuntimeError(f"streamcnn: the ranks' weights differ after epoch "
                                       f"{epoch + 1} (digests {digests}): a tile-parallel "
                                       "step was not the same on every rank")
            if dist.main:
                with stops_deferred():  # all of the epoch's files, or none
                    payload = {"config": cfg, "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "scaler": scaler.state_dict() if scaler is not None else None,
                               "epoch": epoch + 1, "rng": _rng_state(), "metrics": rows,
                               "best": best, "tables": {"train": _table_rows(train_t),
                                                        "val": _table_rows(val_t)}}
                    if digests is not None:     # every rank's weights_digest (all equal)
                        payload["rank_digests"] = digests
                        # the image rows each rank of a group read (and summed)
                        payload["rank_rows"] = [[list(p.read), list(p.sums)]
                                                for p in tp_net.plans]
                    write_predictions(os.path.join(out, "val_predictions.csv"), val_t,
                                      indices, scores, names)
                    if task == "classification":
                        plot_roc(os.path.join(out, "roc.png"), labels, scores,
                                 f"validation, epoch {epoch + 1}")
                    _plot_curves(os.path.join(out, "curves.png"), rows, mname)
                    if improved:
                        ckpt_io.save_checkpoint(os.path.join(out, "best.pt"), payload)
                    ckpt_io.save_checkpoint(os.path.join(out, "last.pt"), payload)
                    saved = epoch + 1
                    _write_metrics(out, rows, mname)
                    if writer is not None:
                        for k in ("train_loss", "val_loss", mname):
                            writer.add_scalar(k, row[k], epoch + 1)
                        writer.flush()
                    if not quiet:
                        tqdm.write(f"epoch {epoch + 1}/{cfg['epochs']}: train_loss "
                                   f"{train_loss:.4f} val_loss {val_loss:.4f} {mname} "
                                   f"{_fmt(value)} ({row['seconds']:.1f} s, "
                                   f"{peak:.0f} MB)", file=sys.stderr)
            dist.barrier()
            # every rank has the same rows (the validation is gathered)
            stale = _stale(rows, mname, cfg["patience"])
            if stale and epoch + 1 < cfg["epochs"]:
                if dist.main:
                    tqdm.write(f"streamcnn: early stop after epoch {epoch + 1}: {stale}",
                               file=sys.stderr)
                break
    except (KeyboardInterrupt, RuntimeError) as e:  # Ctrl-C, or SIGTERM (Terminated)
        sig = stopped_by(e)
        if sig is None:
            raise
        word, code = stop_status(sig)
        if dist.main:
            done = saved
            held = (f"{out}/last.pt holds epoch {done}; continue with --resume" if done else
                    "no epoch finished, so there is no last.pt; the same command, with or "
                    "without --resume, starts the run again")
            # (at an epoch's end, after its checkpoint: that epoch is done)
            when = f"after epoch {done}" if done == epoch + 1 else f"during epoch {epoch + 1}"
            print(f"streamcnn: {word} {when}; {held}", file=sys.stderr)
        return code
    finally:
        if writer is not None:
            writer.close()
    if dist.main:
        b = rows[_best_index(rows, mname)]
        print(f"best epoch {b['epoch']}: {mname} {_fmt(b[mname])}, val_loss "
              f"{b['val_loss']:.4f} -> {os.path.join(out, 'best.pt')}")
        print(f"run folder {out}: metrics.csv, curves.png"
              + (", roc.png" if os.path.exists(os.path.join(out, "roc.png")) else "")
              + ", val_predictions.csv, last.pt, best.pt, config.yaml")
    return 0


def _check_tables(train_t, val_t, say: bool) -> None:
    """A slide listed twice with different labels is refused; slides in both
    tables are a warning (``say``: this rank prints it): the validation
    metric of seen slides is optimistic."""
    # (a slide listed twice with different labels: refused by read_slide_table)
    real = [{os.path.realpath(p) for p in t.paths} for t in (train_t, val_t)]
    both = sorted(real[0] & real[1])
    if both and say:
        more = f" and {len(both) - 1} more" if len(both) > 1 else ""
        print(f"streamcnn: warning: {both[0]}{more} in both {train_t.csv} and {val_t.csv}: "
              "the validation metric of slides trained on is optimistic", file=sys.stderr)


def _table_rows(t) -> List[List[Any]]:
    """A slide table's rows as the checkpoint keeps them: [path as the CSV
    names it, label, mpp cell], to tell a --resume that its table changed."""
    return [[n, lab, m] for n, lab, m in zip(t.names, t.labels, t.mpps)]


def _tables_changed(saved: Optional[Dict[str, list]], tables: Dict[str, Any],
                    ckpt: str) -> None:
    """--resume: say (stderr) which of the run's tables changed since
    ``ckpt`` was written: rows added, removed, or with another label or mpp
    cell (a fixed row may be meant; an edited file at the same path may
    not). The run goes on with the tables as they are now. A checkpoint
    of an earlier version keeps no rows: nothing is said."""
    if not isinstance(saved, dict):
        return
    for key, flag in (("train", "--train"), ("val", "--val")):
        if key not in saved:
            continue
        old = collections.Counter(tuple(r) for r in saved[key])
        new = collections.Counter(tuple(r) for r in _table_rows(tables[key]))
        if old == new:
            continue
        added, removed = new - old, old - new
        changed = {r[0] for r in added} & {r[0] for r in removed}
        n_add = sum(c for r, c in added.items() if r[0] not in changed)
        n_rem = sum(c for r, c in removed.items() if r[0] not in changed)
        parts = [f"{n} {w}" for n, w in ((n_add, "added"), (n_rem, "removed"),
                                        (len(changed), "with another label or mpp"))
                 if n]
        then = ("; the metric of the epochs before (and best.pt's) is of the table as it was"
                if key == "val" else "")
        print(f"streamcnn: warning: --resume: {flag} CSV {tables[key].csv} changed since "
              f"{ckpt} was written (rows: {', '.join(parts)}); training goes on with the "
              f"table as it is now{then}", file=sys.stderr)


def _best_key(row: Dict[str, Any], mname: str) -> list:
    """What ranks an epoch for best.pt: its metric, ties (an AUC of 1 on a
    small validation set, epoch after epoch) broken by the validation loss,
    lower being better; a nan metric ranks below any number (then the loss
    alone). A checkpoint's key of an earlier version (no loss after the
    metric) ranks below the same metric with one."""
    loss = -row["val_loss"] if math.isfinite(row["val_loss"]) else -math.inf
    return [1, row[mname], loss] if not math.isnan(row[mname]) else [0, loss]


def _best_index(rows: List[Dict[str, Any]], mname: str) -> int:
    """The row of best.pt: the first with the highest :func:`_best_key`, as
    the run saves it."""
    return max(range(len(rows)), key=lambda i: _best_key(rows[i], mname))


def _stale(rows: List[Dict[str, Any]], mname: str, patience: int) -> str:
    """Why to stop early ('' to go on): ``patience`` epochs since best.pt's."""
    if not patience or not rows:
        return ""
    b = _best_index(rows, mname)
    if len(rows) - 1 - b < patience:
        return ""
    return (f"{mname} has not improved for {len(rows) - 1 - b} epochs (--patience "
            f"{patience}; best epoch {rows[b]['epoch']})")


def _write_metrics(out: str, rows: List[Dict[str, Any]], mname: str) -> None:
    cols = ["epoch", "train_loss", "val_loss", mname, "seconds", "peak_memory_mb"]
    write_csv(os.path.join(out, "metrics.csv"), cols,
              [[r["epoch"]] + [_fmt(r[c]) if c != "seconds" and c != "peak_memory_mb"
                               else f"{r[c]:.3f}" if c == "seconds" else f"{r[c]:.1f}"
                               for c in cols[1:]] for r in rows])

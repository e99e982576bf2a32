"""``streamcnn train --tile-parallel N``: the processes, the 2-D process
grid and the optimizer step's synchronisation of a tile-parallel run (see
:mod:`streamcnn.app.train`).

Global rank ``d * N + t`` is rank ``t`` of tile-parallel group ``d`` (the
ranks that share each image: ``streamcnn.distributed.TileParallel`` over
them) and rank ``d`` of data-parallel group ``t`` (one rank of every
replica). Without ``torchrun`` :func:`spawn` starts the N processes of one
group; every collective waits at most :func:`dist_timeout`.
"""

import dataclasses
import datetime
import hashlib
import math
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from .common import (Dist, Terminated, UsageError, end_process, request_stop, stop_requested,
                     stop_status)

# what a stopped tile-parallel run says of its checkpoint when rank 0 could
# not say which epoch (the stop came outside the epochs' loop)
STOPPED = ("the run folder's last.pt, if an epoch finished, holds the last one: "
           "continue with --resume")
# seconds the ranks have to end after Ctrl-C / SIGTERM before they are
# killed (Slurm sends SIGKILL 30 s after its SIGTERM)
STOP_GRACE = 20.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def dist_timeout() -> datetime.timedelta:
    """The bound on every collective's wait in a tile-parallel run:
    ``STREAMCNN_DIST_TIMEOUT`` seconds (default 1800)."""
    text = os.environ.get("STREAMCNN_DIST_TIMEOUT", "1800")
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and s > 0):
        raise UsageError(f"STREAMCNN_DIST_TIMEOUT must be a positive number of seconds, "
                         f"got {text!r}")
    return datetime.timedelta(seconds=s)


def check_options(cfg, dist: Dist) -> None:
    """The options a tile-parallel run refuses (before any process starts)."""
    n = cfg["tile_parallel"]
    if n == 1:
        return
    if dist.enabled and dist.world % n:
        raise UsageError(f"--tile-parallel {n} must divide the {dist.world} processes of "
                         "torchrun (WORLD_SIZE): tile-parallel groups of N consecutive ranks")
    replicas = dist.world // n if dist.enabled else 1
    if cfg["batch_size"] % replicas:
        raise UsageError(f"--batch-size {cfg['batch_size']} must be a multiple of the "
                         f"{replicas} data-parallel groups ({dist.world} processes / "
                         f"--tile-parallel {n})")
    dist_timeout()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, args, n: int, port: int, errors, stop_sig) -> None:
    """A process started by :func:`_spawn`: rank ``rank`` of ``n``. A user
    error goes to the parent (which prints one line) and exits with 2; every
    end is :func:`~.common.end_process` (no interpreter finalization).
    SIGINT stops it as Ctrl-C does, or as SIGTERM does when the parent
    stopped for that (``stop_sig``, shared with it; the parent passes a
    stop on as SIGINT: torch's SIGTERM of the others after a rank fails
    still ends a rank at once); a second SIGINT (the terminal's Ctrl-C
    reaches every rank, and the parent passes it on) changes nothing.
    The rank starts with SIGINT and SIGTERM blocked (:func:`spawn`): a
    Ctrl-C while it imports torch waits for the handler below (it was a
    KeyboardInterrupt traceback)."""
    # the DataLoader workers forked, as under torchrun (a spawned process
    # inherits its parent's "spawn": each epoch's workers then imported
    # torch again, seconds each, and a Ctrl-C then was their traceback)
    import multiprocessing
    multiprocessing.set_start_method(None, force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))
    if "OMP_NUM_THREADS" not in os.environ:         # the CPU's cores shared out
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // n))
    from ..cli import _message, dropped_stops_quiet, library_warnings
    from .train import run
    def on_sigint(signum, frame):     # Ctrl-C, or stop_ranks
        if stop_requested() is not None:
            return                      # stopping already
        sig = signal.SIGTERM if stop_sig.value == signal.SIGTERM else signal.SIGINT
        request_stop(sig)               # (for check_stop)
        raise Terminated() if sig == signal.SIGTERM else KeyboardInterrupt()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # what came meanwhile
        if stop_sig.value:              # stopped while this rank started
            on_sigint(signal.SIGINT, None)
        with library_warnings(), dropped_stops_quiet():
            code = run(args)
    except UsageError as e:
        errors.put((rank, _message(e)))
        end_process(2)
    except (ValueError, FileNotFoundError) as e:
        if not str(e).startswith("streamcnn: "):
            raise
        errors.put((rank, _message(e)))
        end_process(2)
    except (KeyboardInterrupt, RuntimeError) as e:
        # the stop reached this rank outside the epochs' loop (which says
        # which epoch last.pt holds), or a collective failed because
        # another rank had already stopped
        if isinstance(e, RuntimeError) and stop_requested() is None:
            raise
        word, code = stop_status(stop_requested() or signal.SIGINT)
        if rank == 0:
            print(f"streamcnn: {word}; {STOPPED}", file=sys.stderr)
        end_process(code)
    end_process(int(code or 0))


def spawn(args, n: int) -> int:
    """Run the training in ``n`` local processes (``--tile-parallel n``
    without torchrun): the exit status of the first to fail, or 0. A user
    error on any rank ends all of them and prints that rank's one line."""
    import logging
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    # the signal that stopped this command; without a lock: it is read in
    # the ranks' SIGINT handler, and a lock a stop left held (a
    # KeyboardInterrupt between its acquire and release) hung every rank
    # in that handler, and their DataLoader workers with them
    stop_sig = ctx.Value("i", 0, lock=False)
    # the terminations of the other ranks after a failure are expected
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    # the ranks inherit SIGINT and SIGTERM blocked, until _spawned handles
    # them (a Ctrl-C reaches every process of the terminal's group: a rank
    # still importing torch printed a KeyboardInterrupt traceback); here a
    # stop that comes meanwhile (to another thread, or pending) is raised
    # once the ranks are there to be stopped
    came: List[int] = []
    held = {sig: signal.signal(sig, lambda signum, frame: came.append(signum))
            for sig in _STOP_SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        procs = mp.start_processes(_spawned, args=(args, n, _free_port(), errors, stop_sig),
                                   nprocs=n, join=False, start_method="spawn")
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        for sig, h in held.items():
            signal.signal(sig, h)
    try:
        for sig in came[:1]:
            signal.raise_signal(sig)    # the command's handler: KeyboardInterrupt / Terminated
        while not procs.join():
            pass
    except KeyboardInterrupt as e:
        return stop_ranks(procs.processes, isinstance(e, Terminated), stop_sig=stop_sig)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        if not errors.empty():
            print(f"streamcnn: {errors.get()[1]}", file=sys.stderr)
            return 2
        code = getattr(e, "exit_code", 1)
        if isinstance(e, mp.ProcessExitedException) and code > 0:
            return code                          # e.g. 130: it said why itself
        print(f"streamcnn: train: tile-parallel rank {e.error_index} failed: "
              f"{_failure(str(e))}", file=sys.stderr)
        return 1
    return 0


def _failure(report: str) -> str:
    """One line of a rank's failure (torch.multiprocessing's report holds
    its traceback): the exception's last line, and for a collective that
    timed out or lost its peer, what that means."""
    lines = [ln.strip() for ln in report.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else report.strip()
    if "Timed out" in report or "timed out" in report:
        last += (f" (another rank stopped answering for STREAMCNN_DIST_TIMEOUT = "
                 f"{dist_timeout().total_seconds():g} s)")
    elif "Connection closed by peer" in report or "Connection reset by peer" in report:
        last += " (another rank ended first)"
    return last


def stop_ranks(processes, terminated: bool, grace: float = STOP_GRACE,
               stop_sig=None) -> int:
    """After Ctrl-C, SIGINT or SIGTERM in the command that spawned the
    ranks (``processes``, in rank order): they end as on Ctrl-C -- each
    gets SIGINT (a terminal's Ctrl-C reached them already; a ``kill -INT``
    or SIGTERM of this process alone did not), ``stop_sig`` (shared with
    them) saying which signal stopped the command, and rank 0 says which
    epoch last.pt holds. A rank still running after ``grace`` seconds
    (inside a long operator call, or waiting in a collective for a rank
    that left) is killed, as is every rank on a second Ctrl-C; checkpoints
    are written atomically, so a kill leaves the last one whole. Returns
    143 (SIGTERM) or 130."""
    import time
    sig = signal.SIGTERM if terminated else signal.SIGINT
    if stop_sig is not None:
        stop_sig.value = sig
    for p in processes:
        if p.is_alive():
            os.kill(p.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    try:
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:            # a second Ctrl-C: at once
        pass
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    word, code = stop_status(sig)
    if processes and processes[0].exitcode != code:  # rank 0 did not say it
        print(f"streamcnn: {word}: the ranks were stopped; {STOPPED}", file=sys.stderr)
    return code


def backend(device: torch.device, dist: Dist) -> str:
    """NCCL when every local rank has a GPU of its own, else gloo (several
    ranks sharing one GPU: NCCL refuses a duplicate GPU)."""
    if device.type != "cuda":
        return "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    return "nccl" if local <= torch.cuda.device_count() else "gloo"


@dataclasses.dataclass
class Grid:
    """A tile-parallel run's 2-D process grid: global rank ``d * tp + t``
    is rank ``t`` of tile-parallel group ``d`` and rank ``d`` of
    data-parallel group ``t``."""
    tp: int                       # ranks per image
    tp_group: Any
    tp_root: int                  # global rank of this tile-parallel group's rank 0
    dp: Dist                      # this rank among the replicas (its data-parallel group)
    comm: torch.device            # where the collectives' tensors live


def make_grid(dist: Dist, n: int, device: torch.device) -> Grid:
    """The groups of :class:`Grid` (every rank creates every group, in
    the same order, as ``new_group`` asks)."""
    timeout = dist_timeout()
    tp_group = dp_group = None
    for d in range(dist.world // n):
        g = torch.distributed.new_group(list(range(d * n, (d + 1) * n)), timeout=timeout)
        if dist.rank // n == d:
            tp_group = g
    for t in range(n):
        g = torch.distributed.new_group(list(range(t, dist.world, n)), timeout=timeout)
        if dist.rank % n == t:
            dp_group = g
    backend = torch.distributed.get_backend()
    comm = device if backend == "nccl" else torch.device("cpu")
    return Grid(n, tp_group, dist.rank // n * n,
                Dist(dist.rank // n, dist.world // n, dist.local_rank, dp_group), comm)


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """What one rank of a tile-parallel group reads of each ``height x
    width`` image: rows ``read = [a, b)`` (its band's cone,
    ``TileParallel.rows_needed``, widened where needed so that the ranks'
    ``sums`` ranges are disjoint and cover every row) and the rows ``sums =
    [s0, s1)`` whose channel sums it adds to the group's total (the colour
    jitter's contrast needs the whole image's mean). ``a == b`` for a rank
    with an empty band: it reads nothing."""
    read: Tuple[int, int]
    sums: Tuple[int, int]
    height: int
    width: int


def row_plans(tp, height: int, width: int) -> List[RowPlan]:
    """Every rank's :class:`RowPlan` for ``tp`` (a ``TileParallel``), in
    rank order."""
    world = torch.distributed.get_world_size(tp.process_group)
    return plans_of([tp.rows_needed(height, width, r) for r in range(world)], height, width)


def plans_of(needed: List[Tuple[int, int]], height: int, width: int) -> List[RowPlan]:
    """The :class:`RowPlan` of each rank from the image rows ``[a, b)``
    each must read (``(0, 0)``: none): the sum ranges are consecutive,
    from row 0 to ``height``; a read is widened to hold its sum range (a
    gap between two ranks' reads, the rows below the last cone)."""
    busy = [r for r, (a, b) in enumerate(needed) if b > a]
    if not busy:
        raise ValueError("streamcnn: no rank reads any row")
    plans, start = [], 0
    for r, (a, b) in enumerate(needed):
        if b <= a:
            plans.append(RowPlan((0, 0), (0, 0), height, width))
            continue
        a = min(a, start)
        if r == busy[-1]:
            b = height
        plans.append(RowPlan((a, b), (min(start, b), b), height, width))
        start = max(start, b)
    return plans


class TileParallelNet(torch.nn.Module):
    """``head(TileParallel(stem)(x))``: the classifier with its stem's
    bands over the tile-parallel group (the modules are the classifier's).

    ``x`` is a whole image, or with ``image_size`` this rank's rows of it
    (``self.plan``, of ``self.plans`` of all ranks): the
    dict of ``SlideDataset.read_rows`` (batch 1: ``part``, ``sums``,
    ``draw``): the channel sums are added up over the group, the colour
    jitter is applied to the rows (``Augment.colour``, exactly as on the
    whole image) and they go to ``TileParallel`` as rows
    ``plan.read`` of a ``plan.height``-row image."""

    def __init__(self, model, grid: Grid, image_size: Optional[int] = None):
        super().__init__()
        from ..distributed import TileParallel
        self.tp = TileParallel(model.stem, grid.tp_group)
        self.head = model.head
        self.grid = grid
        # every rank's RowPlan for image_size x image_size images, and this one's
        self.plans = [] if image_size is None else row_plans(self.tp, image_size, image_size)
        self.plan = self.plans[torch.distributed.get_rank(grid.tp_group)] \
            if self.plans else None

    def forward(self, x) -> torch.Tensor:
        if not isinstance(x, dict):
            return self.head(self.tp(x))
        from ..data import Augment, AugmentDraw
        plan = self.plan
        if plan is None:
            raise ValueError("streamcnn: rows of an image need the TileParallelNet's "
                             "image_size (its RowPlan)")
        part, draw = x["part"], AugmentDraw.from_tensor(x["draw"][0])
        if part.shape[0] != 1:
            raise ValueError("streamcnn: tile-parallel rows come one image at a time")
        if (draw.brightness, draw.contrast, draw.saturation) != (1.0, 1.0, 1.0):
            # the same draw on every rank of the group (same seed and index)
            sums = x["sums"][0].to(self.grid.comm, torch.int64)
            torch.distributed.all_reduce(sums, group=self.grid.tp_group)
            part = Augment.colour(part[0], draw, sums.tolist(),
                                  plan.height * plan.width)[None]
        return self.head(self.tp(part, image_row0=plan.read[0], image_height=plan.height))


def sync_step(params: List[torch.Tensor], buffers: List[torch.Tensor], grid: Grid) -> None:
    """Before a tile-parallel optimizer step: the accumulated gradients
    averaged over the replicas (the data-parallel group; the stem's are
    already summed over the tile-parallel group by TileParallel), then
    broadcast from the tile-parallel group's first rank (the head's are
    computed on every rank of the group from the same output, equal only
    if every kernel is deterministic: the broadcast makes them equal);
    ``buffers`` (the head's batch-norm statistics with ``--bn train``)
    broadcast from rank 0, as DDP does."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads]).to(grid.comm)
        if grid.dp.world > 1:
            torch.distributed.all_reduce(flat, group=grid.dp.group)
            flat /= grid.dp.world
        torch.distributed.broadcast(flat, src=grid.tp_root, group=grid.tp_group)
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
    for b in buffers:
        t = b.detach().to(grid.comm)
        torch.distributed.broadcast(t, src=0)
        b.detach().copy_(t)


def weights_digest(state: Dict[str, torch.Tensor]) -> str:
    """A digest of a state_dict's names and bytes (equal iff bit-identical)."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                 .tobytes())
    return h.hexdigest()[:32]

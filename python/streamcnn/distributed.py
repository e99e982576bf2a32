"""Tile-parallel streaming: one image's stem over several ranks
(``torch.distributed``; NCCL on GPUs, gloo on CPU).

The stem output is split into row bands, one per rank of the process group,
balanced by the C core's work model (``streamcnn.band_info``: a band's
multiply-adds with halo caching, its first tile row computing its whole
cone). Each rank computes its band with the ``*_rows`` ops (see
``streamcnn.ops``), the bands are all-gathered so that every rank holds the
whole stem output, and the head and loss run on every rank. In the backward
each rank back-propagates its own band's slice of the output gradient and
the parameter gradients (and the image gradient, for a whole image) are
summed over the ranks with one ``all_reduce``. By linearity the result is
that of the whole-image pass, as for tiles in one process.

Collectives, in this order, on every rank of the group (also on a rank
whose band is empty): forward: ``all_gather`` of checksums (program, tile
size, halo caching, the image's size and dtype, gradient mask, the
parameters' shapes and values, fixed bands, a grid of a whole image's
pixels), ``all_gather`` of the bands (padded to the largest band);
backward: one ``all_reduce`` of
the flattened parameter gradients, one of the image gradient (only for a
whole image that requires grad). The group's timeout
(``init_process_group(timeout=...)``) bounds every wait.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ._library import band_info, tiling_info
from .module import StreamingModule

__all__ = ["TileParallel", "balanced_bands", "band_rows"]


def balanced_bands(program: Sequence[int], height: int, width: int, tile: Sequence[int],
                   n: int) -> List[Tuple[int, int]]:
    """Split the stem output rows of a height x width image into n
    contiguous bands, in order, minimising the largest band's work
    (``band_info``'s multiply-adds: a band's first tile row recomputes its
    cone, so work is not additive over rows). Bands may be empty
    (``lo == hi``) when n exceeds the output rows."""
    if n < 1:
        raise ValueError(f"streamcnn: need at least one band, got {n}")
    tile = (int(tile[0]), int(tile[-1]))
    out_h = tiling_info(program, height, width, tile)[0]
    memo: Dict[Tuple[int, int], float] = {}

    def cost(lo: int, hi: int) -> float:
        if (lo, hi) not in memo:
            memo[(lo, hi)] = band_info(program, height, width, tile, (lo, hi))[3]
        return memo[(lo, hi)]

    def greedy(limit: float) -> Optional[List[int]]:
        """Band ends, each band as long as its work stays <= limit; None
        when more than n bands would be needed."""
        ends, lo = [], 0
        while lo < out_h:
            if len(ends) == n:
                return None
            if cost(lo, lo + 1) > limit:
                return None
            a, b = lo + 1, out_h  # the largest end with cost <= limit
            while a < b:
                m = (a + b + 1) // 2
                if cost(lo, m) <= limit:
                    a = m
                else:
                    b = m - 1
            ends.append(a)
            lo = a
        return ends

    lo_t, hi_t = max(cost(r, r + 1) for r in {0, out_h // 2, out_h - 1}), cost(0, out_h)
    best = greedy(hi_t)
    for _ in range(40):  # bisection on the largest band's work
        if hi_t - lo_t <= 1e-6 * hi_t:
            break
        mid = (lo_t + hi_t) / 2
        ends = greedy(mid)
        if ends is None:
            lo_t = mid
        else:
            best, hi_t = ends, mid
    assert best is not None  # cost(0, out_h) always fits in one band
    bands, lo = [], 0
    for e in best:
        bands.append((lo, e))
        lo = e
    bands += [(out_h, out_h)] * (n - len(bands))
    return bands


def band_rows(program: Sequence[int], height: int, width: int, tile: Sequence[int],
              band: Tuple[int, int]) -> Tuple[int, int]:
    """The image rows ``[a, b)`` that stem output rows ``band = (lo, hi)``
    read (their cone, ``band_info``); ``(0, 0)`` for an empty band."""
    lo, hi = band
    if hi <= lo:
        return (0, 0)
    info = band_info(program, int(height), int(width), (int(tile[0]), int(tile[-1])),
                     (lo, hi))
    return (int(info[0]), int(info[1]))


def _checksum(parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


# the pixels of a whole image compared across the ranks: a grid of at most
# this many per channel and image (a sample, not every pixel: a gigapixel
# host image would take seconds to sum)
_PIXEL_SAMPLE = 512


@torch.no_grad()
def _values_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """Sums of each tensor's values and of their squares (float64, on its
    device; one copy to the host): equal tensors give equal bytes."""
    if not tensors:
        return b""
    sums = [torch.stack([t.double().sum(), t.double().square().sum()]).to(tensors[0].device)
            for t in tensors]
    return torch.cat(sums).cpu().numpy().tobytes()


@torch.no_grad()
def _pixels_digest(x: torch.Tensor) -> bytes:
    """:func:`_values_digest` of a strided grid of the image's pixels
    (at most ``_PIXEL_SAMPLE`` per side, a view: nothing else is read)."""
    sh = max(1, -(-x.shape[2] // _PIXEL_SAMPLE))
    sw = max(1, -(-x.shape[3] // _PIXEL_SAMPLE))
    return _values_digest([x[:, :, ::sh, ::sw]])


class _TileParallelFunction(torch.autograd.Function):
    """Forward: this rank's band, all-gathered into the whole stem output.
    Backward: the band's slice of the output gradient through the band's
    backward op, then the gradients summed over the group."""

    @staticmethod
    def forward(ctx, tp: "TileParallel", info: dict, x: torch.Tensor, *params: torch.Tensor):
        sm, group = tp.sm, tp.process_group
        lo, hi = info["band"]
        rows = [lo, hi, info["row0"], info["height"]]
        mask = info["mask"]
        n, c_out, out_h, out_w = info["out_shape"]
        p = [t.detach() for t in params]
        xd = x.detach()
        strips = None
        if hi > lo:
            if info["cached"] and any(mask):
                band, strips = torch.ops.streamcnn.forward_cached_rows(
                    xd, p, sm.program, sm.tile_size, rows)
            else:
                band = torch.ops.streamcnn.forward_rows(xd, p, sm.program, sm.tile_size, rows)
        else:
            band = None
        dtype, device = info["dtype"], info["device"]
        comm = info["comm_device"]
        max_rows = max(b - a for a, b in info["bands"])
        buf = torch.zeros((n, c_out, max_rows, out_w), dtype=dtype, device=comm)
        if band is not None:
            buf[:, :, :hi - lo] = band.to(comm)
        gathered = [torch.empty_like(buf) for _ in info["bands"]]
        dist.all_gather(gathered, buf, group=group)
        out = torch.cat([g[:, :, :b - a] for g, (a, b) in zip(gathered, info["bands"])], 2)
        ctx.info, ctx.tp = info, tp
        ctx.set_materialize_grads(False)
        if any(mask):
            ctx.save_for_backward(*(() if strips is None else (strips,)), xd, *p)
            ctx.has_strips = strips is not None
        return out.to(device)

    @staticmethod
    def backward(ctx, grad_out):
        info, tp = ctx.info, ctx.tp
        sm, group = tp.sm, tp.process_group
        mask = info["mask"]
        n_params = len(mask) - 1
        none = (None, None)
        if not any(mask):
            return none + (None,) * (1 + n_params)
        saved = list(ctx.saved_tensors)
        strips = saved.pop(0) if ctx.has_strips else None
        x, *params = saved
        lo, hi = info["band"]
        rows = [lo, hi, info["row0"], info["height"]]
        if grad_out is None:  # no gradient reached the output (on this rank)
            grad_out = torch.zeros(info["out_shape"], dtype=info["dtype"],
                                   device=info["device"])
        grads: List[Optional[torch.Tensor]]
        if hi > lo:
            g = grad_out[:, :, lo:hi].contiguous()
            if strips is not None:
                got = torch.ops.streamcnn.backward_cached_rows(
                    g, strips, x, params, sm.program, sm.tile_size, mask, rows)
            else:
                got = torch.ops.streamcnn.backward_rows(g, x, params, sm.program,
                                                        sm.tile_size, mask, rows)
            it = iter(got)
            grads = [next(it) if m else None for m in mask]
        else:  # an empty band contributes zeros (and still joins the sums)
            grads = [None] * (1 + n_params)
            if mask[0]:
                grads[0] = torch.zeros_like(x)
            for k, m in enumerate(mask[1:]):
                if m:
                    grads[1 + k] = torch.zeros_like(params[k])
        # one all_reduce for all parameter gradients (flattened, in the
        # dtype of the first), then the whole image's gradient
        comm = info["comm_device"]
        pg = [grads[1 + k] for k in range(n_params) if mask[1 + k]]
        if pg:
            flat = torch.cat([t.reshape(-1).to(comm, torch.float64 if t.dtype ==
                                               torch.float64 else torch.float32)
                              for t in pg])
            dist.all_reduce(flat, group=group)
            off = 0
            for k in range(n_params):
                if mask[1 + k]:
                    t = grads[1 + k]
                    grads[1 + k] = flat[off:off + t.numel()].view(t.shape).to(t.device, t.dtype)
                    off += t.numel()
        if mask[0] and info["whole_image"]:
            gi = grads[0].to(comm)
            dist.all_reduce(gi, group=group)
            grads[0] = gi.to(x.device)
        return none + tuple(grads)


class TileParallel(nn.Module):
    """Run a ``StreamingModule``'s stem on one image over the ranks of a
    process group, each rank computing one band of stem output rows.

    Args:
        sm: the streamed stem (with a ``tile_size``; a ``memory_budget``
            module after ``sm.fix_tile(height, width)``).
        process_group: the ranks cooperating on each image (default: the
            whole world). For data parallelism as well, build a 2-D grid:
            ranks ``r = d * T + t`` with tile-parallel groups
            ``{d * T + t : t}`` (``TileParallel(sm, tp_group)``) and
            data-parallel groups ``{d * T + t : d}``: each tile-parallel
            group works on its own image; after ``loss.backward()`` every
            rank of a tile-parallel group holds the same summed gradients,
            so average them over the data-parallel group (``all_reduce`` /
            ``world``, or DDP with ``process_group=dp_group`` around the
            whole model).
        bands: optional fixed bands instead of the balanced ones: one
            ``(lo, hi)`` of stem output rows per rank, in rank order,
            contiguous from row 0 to the last (empty bands allowed); checked
            against each image's output rows.

    ``tp(x)`` returns the whole stem output ``sm.stem(x)`` on every rank.
    ``x`` is either the whole image (the same on every rank; its gradient,
    when it requires grad, is the whole-image gradient on every rank) or
    only the rows this rank reads, ``tp(x_part, image_row0=a,
    image_height=H)`` with ``(a, b) = tp.rows_needed(H, W)`` (at least those
    rows; a uint8 image in host memory, each rank reading its part of the
    slide); a part's gradient is this rank's contribution only (the
    ranks' parts overlap; not summed). The head and the loss must run on
    every rank identically (the same output gradient on every rank); each
    rank's parameters must be equal (as DDP broadcasts them). Ranks that
    disagree on the image's shape or dtype, the program, the tile size,
    halo caching, which gradients are wanted, the parameters (shapes, and
    values: sums of each and of its squares), ``bands`` or a whole image's
    pixels (a grid of at most 512 x 512 of them) are refused before any
    band is computed, with a RuntimeError on every rank naming what
    differs.
    """

    def __init__(self, sm: StreamingModule, process_group=None,
                 bands: Optional[Sequence[Tuple[int, int]]] = None):
        super().__init__()
        if not isinstance(sm, StreamingModule):
            raise TypeError(f"streamcnn: TileParallel wraps a StreamingModule, got "
                            f"{type(sm).__name__}")
        if sm.memory_budget:
            raise ValueError("streamcnn: TileParallel needs a StreamingModule with a fixed "
                             "tile_size (memory_budget picks it per call): give tile_size, "
                             "or fix the budget's choice for the image size first "
                             "(sm.fix_tile(height, width))")
        self.sm = sm
        self.process_group = process_group
        self._bands: Dict[tuple, List[Tuple[int, int]]] = {}
        self.fixed_bands = None if bands is None else [(int(a), int(b)) for a, b in bands]

    def _group(self) -> Tuple[int, int]:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("streamcnn: TileParallel needs torch.distributed initialised "
                               "(dist.init_process_group)")
        return (dist.get_rank(self.process_group),
                dist.get_world_size(self.process_group))

    def bands(self, height: int, width: int) -> List[Tuple[int, int]]:
        """The stem output rows ``(lo, hi)`` of every rank, in rank order,
        for a height x width image (balanced by work; cached)."""
        world = self._group()[1]
        if self.fixed_bands is not None:
            out_h = tiling_info(self.sm.program, int(height), int(width),
                                self.sm.tile_size)[0]
            b = self.fixed_bands
            ok = (len(b) == world and b[0][0] == 0 and b[-1][1] == out_h and
                  all(lo <= hi for lo, hi in b) and
                  all(b[k][1] == b[k + 1][0] for k in range(world - 1)))
            if not ok:
                raise ValueError(f"streamcnn: bands {b} must be {world} contiguous (lo, hi) "
                                 f"row ranges covering the stem output's rows [0, {out_h})")
            return b
        key = (int(height), int(width), world, tuple(self.sm.tile_size))
        if key not in self._bands:
            self._bands[key] = balanced_bands(self.sm.program, int(height), int(width),
                                              self.sm.tile_size, world)
        return self._bands[key]

    def rows_needed(self, height: int, width: int,
                    rank: Optional[int] = None) -> Tuple[int, int]:
        """The image rows ``[a, b)`` rank (default: this one) reads for a
        height x width image; ``(0, 0)`` for an empty band."""
        r = self._group()[0] if rank is None else int(rank)
        return band_rows(self.sm.program, height, width, self.sm.tile_size,
                         self.bands(height, width)[r])

    def forward(self, x: torch.Tensor, image_row0: Optional[int] = None,
                image_height: Optional[int] = None) -> torch.Tensor:
        rank, world = self._group()
        sm = self.sm
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("streamcnn: expected an N x C x H x W image tensor")
        params = sm.stream_params()
        dev = sm._stem_device(x, params).type
        if torch.is_autocast_enabled(dev) and sm._autocast_casts:
            # as StreamingModule under autocast: the bands in the autocast
            # dtype, the casts differentiable back to float32 parameters
            x, params = sm._autocast_args(x, params, dev)
            with torch.autocast(dev, enabled=False):
                return self._forward(x, params, image_row0, image_height, rank, world)
        return self._forward(x, params, image_row0, image_height, rank, world)

    def _forward(self, x: torch.Tensor, params: List[torch.Tensor],
                 image_row0: Optional[int], image_height: Optional[int], rank: int,
                 world: int) -> torch.Tensor:
        sm = self.sm
        whole = image_row0 is None and image_height is None
        row0 = 0 if image_row0 is None else int(image_row0)
        height = x.shape[2] if image_height is None else int(image_height)
        width = x.shape[3]
        device = params[0].device if params else x.device
        backend = dist.get_backend(self.process_group)
        comm = device if backend == "nccl" else torch.device("cpu")
        # an input this rank refuses is refused on every rank (the others
        # would wait in the first collective for it)
        try:
            if whole:
                sm._check(x, params)  # dtype, device, eval mode, size errors
            from .ops import compute_dtype
            dtype = compute_dtype(x, params)
            lo, hi = self.bands(height, width)[rank]
            if not whole and hi > lo:
                a, b = self.rows_needed(height, width, rank)
                if row0 < 0 or row0 > a or row0 + x.shape[2] < b:
                    raise ValueError(
                        f"streamcnn: rank {rank} reads image rows [{a}, {b}) but was given "
                        f"rows [{row0}, {row0 + x.shape[2]}) (rows_needed says which)")
        except (ValueError, TypeError, RuntimeError):
            self._took_input(False, rank, world, comm)
            raise
        self._took_input(True, rank, world, comm)
        grad = torch.is_grad_enabled()
        mask = [bool(grad and x.requires_grad)] + [bool(grad and p.requires_grad)
                                                    for p in params]
        if x.dtype == torch.uint8:
            mask[0] = False
        cached = bool(sm.halo_cache)
        # every rank must run the same program with the same parameters on
        # the same image, cut into the same bands
        n_params = len(params)
        image = f"{x.shape[0]} x {x.shape[1]} x {height} x {width}" + \
            ("" if whole else f" (rows from {row0})")
        self._agree([
            ("the program", list(sm.program), f"{len(sm.program)} words"),
            ("the tile size", list(sm.tile_size), str(tuple(sm.tile_size))),
            ("halo caching", cached, str(cached)),
            ("the image's size", (x.shape[0], x.shape[1], height, width, whole), image),
            ("the image's dtype", (str(x.dtype), str(dtype)), f"{x.dtype} (computed in "
                                                               f"{dtype})"),
            ("which gradients are wanted", mask, f"the image's {mask[0]}, "
                                                 f"{sum(mask[1:])} of {n_params} parameters"),
            ("the parameters' shapes", [tuple(p.shape) for p in params], f"{n_params} tensors"),
            ("the parameters' values", _values_digest(params), "(compared by the sums of "
                                                              "each and of its squares)"),
            ("the bands", self.fixed_bands, str(self.fixed_bands or "balanced")),
            ("the image's pixels", _pixels_digest(x) if whole else "a part",
             "(compared on a grid of them)"),
        ], rank, world, comm)
        bands = self.bands(height, width)
        oh, ow = tiling_info(sm.program, height, width, sm.tile_size)[:2]
        c_out = self.sm.out_channels
        info = {"band": (lo, hi), "bands": bands, "row0": row0, "height": height,
                "mask": mask, "cached": cached, "dtype": dtype, "device": device,
                "comm_device": comm, "whole_image": whole,
                "out_shape": (x.shape[0], c_out, oh, ow)}
        return _TileParallelFunction.apply(self, info, x, *params)

    def _gather(self, values: Sequence[object], world: int, comm: torch.device) -> torch.Tensor:
        """Every rank's checksums of its ``values``, world x len(values),
        in one ``all_gather``."""
        mine = torch.tensor([_checksum(v) for v in values], dtype=torch.int64, device=comm)
        got = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(got, mine, group=self.process_group)
        return torch.stack(got).cpu()

    def _took_input(self, took: bool, rank: int, world: int, comm: torch.device) -> None:
        """Every rank says whether it took its input; where one did not
        (it raises its own error), the others raise naming it."""
        got = self._gather([took], world, comm)[:, 0]
        ranks = [r for r in range(world) if int(got[r]) != _checksum(True)]
        if ranks and took:
            raise RuntimeError(f"streamcnn: tile-parallel rank{'s' * (len(ranks) > 1)} "
                               f"{', '.join(map(str, ranks))} refused the input given "
                               f"to {'them' if len(ranks) > 1 else 'it'} (its error says "
                               f"why); this is rank {rank}, which stops too")

    def _agree(self, parts: List[Tuple[str, object, str]], rank: int, world: int,
               comm: torch.device) -> None:
        """All ranks hold equal values of ``parts`` ``(what, value,
        description)``: one ``all_gather`` of their checksums. RuntimeError
        on every rank otherwise, naming what differs, the ranks that differ
        from rank 0 and this rank's (description of the) values."""
        got = self._gather([v for _, v, _ in parts], world, comm)
        differs = (got != got[0]).any(0).tolist()
        if not any(differs):
            return
        ranks = [r for r in range(world) if (got[r] != got[0]).any()]
        which = [k for k, d in enumerate(differs) if d]
        if len(which) > 1:      # pixels of images of another size differ, of course
            which = [k for k in which if parts[k][0] != "the image's pixels"]
        raise RuntimeError(
            "streamcnn: tile-parallel ranks disagree on " +
            ", ".join(parts[k][0] for k in which) +
            f": ranks {ranks} differ from rank 0 (this is rank {rank}: " +
            "; ".join(f"{parts[k][0]} {parts[k][2]}" for k in which) + ")")

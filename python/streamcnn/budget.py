"""Tile size from a memory budget (``StreamingModule(memory_budget=...)``).

The C core's memory model (``sc_memory_info``) gives, for an image size, a
tile and the gradients a step computes, the bytes the largest tile's
forward and backward hold (simulated in the replay's order of allocations
and frees: kept values, gradients, padded copies, the convolution
library's transients, the parameter gradients, the image's gradient when
it has one) and the strips halo caching keeps from the forward to the
backward. The convolution library's transients depend on the device: on
CUDA a copy of a convolution's input and output (cuDNN's workspace is
left to the headroom); on the CPU also the im2col columns of ATen's own
convolution (float64, small float32 inputs) and oneDNN's copies of
few-channel values, blocked by 16 channels. The stem output and its
gradient are not part of the budget: they are the caller's, and their
size does not depend on the tile.

The chooser tries a grid of tile counts per axis, with and without halo
caching (the strips it keeps grow with the number of tiles, so small tiles
may only fit without), and takes the fitting tile with the least modelled
work of a training step (multiply-adds over the whole-image ones), with a
small charge per tile for the per-tile overhead. HEADROOM of the budget is
left for what the model does not see: allocator rounding and
fragmentation, convolution workspaces.

Measured on the CPU through the profiler's memory events (the bytes live in
PyTorch's allocator: what max_memory_allocated counts on a GPU), ResNet-18
and ResNet-34 stems' training steps peaked within -5% .. +13% of the model
with halo caching; without it the model is an upper bound (it does not see
the cone backward's piecewise recompute). tests/python/test_budget.py
checks both the budget and the model.
"""

import math
import re
from typing import Optional, Sequence, Tuple, Union

from ._library import memory_info, tiling_info, work_info

Budget = Union[int, float, str]

_UNITS = {"": 1, "b": 1,
          "k": 10**3, "kb": 10**3, "kib": 2**10,
          "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30,
          "t": 10**12, "tb": 10**12, "tib": 2**40}

# relative cost charged per tile (launches, small kernels, Python-free C
# loop overhead): 0.2% of a whole-image forward each
TILE_COST = 0.002
HEADROOM = 0.1
# the smallest budget taken (below it nothing fits: a number meant in GB)
MIN_BUDGET = 1024


def parse_bytes(budget: Budget) -> int:
    """Bytes of a budget given as a number or a string such as "6GB",
    "6 GiB", "512MB", "1.5e9" (kB/MB/GB/TB decimal, KiB/MiB/GiB/TiB
    binary)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"streamcnn: memory_budget must be a number of bytes or a string "
                        f"such as '6GB', got {budget!r}")
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"streamcnn: memory_budget {budget!r} is not a size such as "
                             "'6GB', '512MiB' or '2e9'")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        value = float(budget)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"streamcnn: memory_budget must be a positive size, got {budget!r}")
    if value < MIN_BUDGET:
        # (memory_budget=1.5 meant gigabytes: it was 1 byte)
        raise ValueError(f"streamcnn: memory_budget {budget!r} is {value:g} bytes, too small "
                         "for any tile: a number without a unit is bytes; give one, e.g. "
                         "'1.5GB' or '512MiB'")
    return int(value)


def _counts(n: int, most: int):
    """Tile counts along an axis of n output pixels to try: 1, 2, 3, 4,
    then growing by ~1.25x, up to `most`."""
    k, out = 1, []
    while k <= min(n, most):
        out.append(k)
        k = k + 1 if k < 4 else int(math.ceil(k * 1.25))
    return out


def _recompute(work: Sequence[float]) -> Tuple[float, float]:
    """Work of a forward streamed with halo caching and with whole cones,
    over the whole-image forward's: in multiply-adds, or in elements
    computed when the stem has no convolution or channel linear."""
    whole, cone, cached = (work[0], work[1], work[4]) if work[0] > 0 else \
        (work[2], work[3], work[5])
    return (cached / whole, cone / whole) if whole > 0 else (1.0, 1.0)


def tile_bytes(program: Sequence[int], h: int, w: int, tile: Tuple[int, int], cached: bool,
               batch: int, itemsize: int, training: bool = True,
               mask: Optional[Sequence[bool]] = None, cpu: bool = False) -> int:
    """Modelled peak bytes with this tile, stem output and gradient
    excluded: of a training step (the larger of the largest tile's forward
    and backward plus, when cached, the strips), or of a forward without
    gradient (training=False; the forward op always caches halos, dropping
    each once used). mask: the gradients the step computes ([image] + one
    per parameter, as the backward's output_mask); None: all. cpu: the
    convolutions run on the CPU (see memory_info)."""
    if not training:
        return int(memory_info(program, h, w, tile, True, None, itemsize, cpu)[1] * batch)
    bwd, fwd, strips = memory_info(program, h, w, tile, cached, mask, itemsize, cpu)
    return int((max(bwd, fwd) + strips) * batch)


def input_extent(receptive_field: int, stride: int, outputs: int) -> int:
    """Input pixels along an axis that give ``outputs`` output pixels, for
    a stem of that receptive field and total stride."""
    return (outputs - 1) * stride + receptive_field


def choose_tile(program: Sequence[int], h: int, w: int, batch: int, itemsize: int,
                budget: int, allow_cached: bool, receptive_field: Tuple[int, int],
                stride: Tuple[int, int], training: bool = True,
                mask: Optional[Sequence[bool]] = None,
                cpu: bool = False, reserve: int = 0) -> Tuple[Tuple[int, int], bool]:
    """The input tile (rows, cols) for an h x w image within budget bytes,
    and whether to cache halos (when allowed: it keeps strips, so with
    small tiles the cone recompute may be the only fit). Tiles are tried on
    a grid of tile counts per axis, down to output tiles about half the
    halo (the stem's receptive field over its stride) on a side; the fitting
    one with the least modelled training-step work wins. training=False
    (a forward without gradient): the forward's memory, and the fewest
    tiles. mask: the gradients of the step, cpu: where it runs (see
    tile_bytes). reserve: bytes the call holds besides the tiles (the
    parameters' autocast copies), taken off the budget. ValueError when
    none fits."""
    rf, s = receptive_field, stride
    oh, ow = tiling_info(program, h, w, tuple(rf))[:2]
    # smallest output tile edge considered: half the halo (smaller tiles
    # recompute several times over)
    least = [max(1, (rf[a] // s[a]) // 2) for a in range(2)]

    def extent(axis: int, t: int) -> int:
        return input_extent(rf[axis], s[axis], t)

    usable = budget * (1 - HEADROOM) - reserve
    best, best_cost = None, math.inf
    least_need: Tuple[float, Tuple[int, int]] = (math.inf, (0, 0))
    for nr in _counts(oh, max(1, oh // least[0])):
        for nc in _counts(ow, max(1, ow // least[1])):
            tile = (extent(0, -(-oh // nr)), extent(1, -(-ow // nc)))
            modes = (True, False) if allow_cached and training else (allow_cached,)
            for cached in modes:
                need = tile_bytes(program, h, w, tile, cached, batch, itemsize, training,
                                  mask, cpu) + reserve
                least_need = min(least_need, (need, tile))
                if need > usable:
                    continue
                fwd, cone = _recompute(work_info(program, h, w, tile))
                n_tiles = tiling_info(program, h, w, tile)[4:6]
                again = fwd if cached else cone  # the backward's recompute
                step = (fwd + again + 2 * again) / 3 if training else fwd
                cost = step + TILE_COST * n_tiles[0] * n_tiles[1]
                if cost < best_cost:
                    best, best_cost = (tile, cached), cost
    if best is None:
        need, tile = least_need
        raise ValueError(
            f"streamcnn: memory_budget of {budget} bytes is too small for a batch of {batch} "
            f"{h} x {w} images: the least any tile needs is about {int(need)} bytes (tile "
            f"{tile[0]} x {tile[1]}; smaller ones recompute their halo several times over), "
            f"so with {HEADROOM:.0%} headroom the budget must be at least "
            f"{math.ceil(need / (1 - HEADROOM))} bytes")
    return best

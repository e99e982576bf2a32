"""Synthetic whole-slide images: real pyramidal tiled TIFFs (and Aperio-style
.svs files) written by the C writer on libtiff, with tissue-like blobs on a
white background and, optionally, small dark "tumour" clusters that define a
label. Deterministic for a seed, so tests can regenerate the exact pixels."""

import ctypes
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._library import clib

_COMPRESSIONS = {"deflate": 1, "jpeg": 2}


def _tissue_mask(width: int, height: int, g: torch.Generator, fraction: float, *,
                 cell_px: int, centre: Tuple[float, float], sigma: float, base: float):
    """``(mask, cells)``: a boolean h x w tissue mask, low-frequency noise
    (``cells`` values along the shorter side, one per ``cell_px`` pixels)
    plus ``base`` under a Gaussian envelope of width ``sigma`` (in image
    fractions) around a random centre in ``centre[0] + centre[1] * U(0, 1)``,
    thresholded to cover ``fraction`` of the image. Draws from ``g``."""
    cells = max(2, min(width, height) // cell_px)
    low = torch.rand(1, 1, cells, max(2, round(cells * width / height)), generator=g)
    field = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    cy, cx = (centre[0] + centre[1] * torch.rand(2, generator=g)).tolist()
    yy = (torch.arange(height, dtype=torch.float32) / height - cy)[:, None]
    xx = (torch.arange(width, dtype=torch.float32) / width - cx)[None, :]
    if base:
        field = base + field
    field = field * torch.exp(-(yy ** 2 + xx ** 2) / (2 * sigma ** 2))
    cut = torch.quantile(field.flatten()[:: max(1, field.numel() // 65536)], 1 - fraction)
    return field > cut, cells


def tissue_image(width: int, height: int, *, tumour: bool = False, seed: int = 0,
                 tissue_fraction: float = 0.15, return_mask: bool = False):
    """uint8 ``height x width x 3``: pink, textured tissue blobs with purple
    nuclei on white, confined to a region around a random centre (so that
    there is a tissue box with white around it); with ``tumour``, a few
    clusters of large dark nuclei. With ``return_mask`` also the boolean
    tissue mask (h x w)."""
    g = torch.Generator().manual_seed(seed)
    tissue, _ = _tissue_mask(width, height, g, tissue_fraction, cell_px=128, centre=(0.3, 0.4),
                             sigma=0.15, base=0.0)
    # colours: eosin pink with texture, haematoxylin purple nuclei
    tex = torch.rand(height, width, generator=g) * 30
    img = torch.full((height, width, 3), 255.0)
    pink = torch.stack([230 - tex, 150 - tex, 200 - tex / 2], dim=-1)
    img[tissue] = pink[tissue]
    nuclei = (torch.rand(height, width, generator=g) < 0.004) & tissue
    nuclei = F.max_pool2d(nuclei[None, None].float(), 5, 1, 2)[0, 0] > 0
    img[nuclei & tissue] = torch.tensor([90.0, 40.0, 140.0])
    if tumour:
        ys, xs = torch.nonzero(tissue, as_tuple=True)
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        for _ in range(3):
            if ys.numel() == 0:
                break
            k = int(torch.randint(0, ys.numel(), (1,), generator=g))
            cy, cx = ys[k].item(), xs[k].item()
            r = max(8, min(width, height) // 40)
            for _ in range(25):
                dy, dx = (torch.randn(2, generator=g) * r).tolist()
                d2 = (yy - cy - dy) ** 2 + (xx - cx - dx) ** 2
                img[(d2 < (r / 4) ** 2) & tissue] = torch.tensor([60.0, 20.0, 100.0])
    img = img.round().to(torch.uint8)
    return (img, tissue) if return_mask else img


def downsample2(img: torch.Tensor) -> torch.Tensor:
    """Half-size level (h x w x 3 uint8): exact integer 2 x 2 means, rounded
    half up; an odd last row/column is averaged with itself."""
    h, w = img.shape[:2]
    x = img.to(torch.int32)
    if h % 2:
        x = torch.cat([x, x[-1:]], dim=0)
    if w % 2:
        x = torch.cat([x, x[:, -1:]], dim=1)
    s = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
    return ((s + 2) // 4).to(torch.uint8)


def pyramid(img: torch.Tensor, min_size: int = 512, max_levels: int = 8) -> List[torch.Tensor]:
    """Level 0 and successive halvings until the longest side is at most
    ``min_size`` (or ``max_levels`` levels, or the shortest side would drop
    under 16)."""
    levels = [img.contiguous()]
    while (max(levels[-1].shape[:2]) > min_size and min(levels[-1].shape[:2]) >= 32
           and len(levels) < max_levels):
        levels.append(downsample2(levels[-1]).contiguous())
    return levels


def aperio_description(width: int, height: int, tile: int, mpp: float,
                       app_mag: float = 20) -> str:
    """An ImageDescription OpenSlide's Aperio driver accepts."""
    return (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
            f"({tile}x{tile}) JPEG/RGB Q=90|AppMag = {app_mag:g}|MPP = {mpp:g}")


def write_slide(path: str, levels: Sequence[torch.Tensor], *, tile: int = 256,
                compression: str = "deflate", quality: int = 90,
                description: Optional[str] = None) -> None:
    """Write ``levels`` (h x w x 3 uint8, level 0 first) as a pyramidal tiled
    TIFF; ``compression`` "deflate" (lossless) or "jpeg"."""
    if compression not in _COMPRESSIONS:
        raise ValueError(f"streamcnn: compression must be one of {list(_COMPRESSIONS)}")
    levels = [lv.contiguous() for lv in levels]
    for lv in levels:
        if lv.dtype != torch.uint8 or lv.dim() != 3 or lv.shape[2] != 3:
            raise ValueError("streamcnn: levels must be uint8 h x w x 3")
    n = len(levels)
    ptrs = (ctypes.c_void_p * n)(*[lv.data_ptr() for lv in levels])
    widths = (ctypes.c_int64 * n)(*[lv.shape[1] for lv in levels])
    heights = (ctypes.c_int64 * n)(*[lv.shape[0] for lv in levels])
    err = ctypes.create_string_buffer(512)
    rc = clib().sc_tiff_write_pyramid(os.fspath(path).encode(), n, ptrs, widths, heights,
                                      tile, _COMPRESSIONS[compression], quality,
                                      description.encode() if description else None, err,
                                      len(err))
    if rc != 0:
        raise RuntimeError(err.value.decode(errors="replace"))


def make_slide(path: str, width: int, height: int, *, tumour: bool = False, seed: int = 0,
               mpp: Optional[float] = None, tile: int = 256, compression: str = "deflate",
               min_size: int = 512, tissue_fraction: float = 0.15) -> List[torch.Tensor]:
    """Generate a synthetic slide and write it to ``path``. With ``mpp`` the
    file is Aperio-style (ImageDescription with MPP and AppMag: OpenSlide
    reports openslide.mpp-x); otherwise a generic tiled TIFF. Returns the
    levels written (h x w x 3 uint8)."""
    levels = pyramid(tissue_image(width, height, tumour=tumour, seed=seed,
                                  tissue_fraction=tissue_fraction), min_size)
    desc = aperio_description(width, height, tile, mpp) if mpp is not None else None
    write_slide(path, levels, tile=tile, compression=compression, description=desc)
    return levels


def write_striped_tiff(path: str, img: torch.Tensor) -> None:
    """A plain striped RGB TIFF (not a slide), for tests."""
    img = img.contiguous()
    err = ctypes.create_string_buffer(512)
    rc = clib().sc_tiff_write_striped(os.fspath(path).encode(), img.data_ptr(), img.shape[1],
                                      img.shape[0], err, len(err))
    if rc != 0:
        raise RuntimeError(err.value.decode(errors="replace"))


# -- CAMELYON-like slides: tumour evidence only at high resolution ----------------------
#
# Physical scales are in microns and converted with the level-0 pixel size
# ``mpp``. A slide is normal tissue (eosin-pink stroma with round haematoxylin
# nuclei on white); a tumour slide adds a few clusters whose nuclei carry
# coarse chromatin: a grey texture at the scale of one pixel ("fine") and of
# two pixels ("coarse"). The texture is added with the *4 x 4 block sums of
# the normal tissue kept exactly*, so
#
#   * level 2 (4x downsampled, what a 4x coarser read sees) is bit-identical
#     to that of the same slide (same seed) without tumour;
#   * level 1 (2x) differs only by the coarse part, constant on 2 x 2 blocks;
#   * level 0 carries both parts.
#
# Resolution therefore decides what a model can see: nothing at 4x, the
# coarse part at 2x, everything at 1x.

NUCLEUS_UM = 6.0          # diameter of a normal nucleus
TUMOUR_NUCLEUS_UM = 9.0   # diameter of a tumour nucleus (the textured area)


def _discs(height: int, width: int, radius: float, cell: int, prob: float,
           g: torch.Generator) -> torch.Tensor:
    """Boolean height x width: discs of ``radius`` pixels, at most one centred
    in each ``cell`` x ``cell`` square (present with probability ``prob``, at
    a uniform position in it). ``radius <= cell``, so a pixel is only
    reached from its own and the 8 neighbouring cells; the work is nine
    broadcast comparisons on the (rows, cell, cols, cell) view, no gather."""
    ch, cw = -(-height // cell), -(-width // cell)
    # centres relative to their cell's corner, with a ring of absent cells around
    cy = F.pad(torch.rand(ch, cw, generator=g) * cell, (1, 1, 1, 1))
    cx = F.pad(torch.rand(ch, cw, generator=g) * cell, (1, 1, 1, 1))
    on = F.pad(torch.rand(ch, cw, generator=g) < prob, (1, 1, 1, 1))
    u = torch.arange(cell, dtype=torch.float32) + 0.5           # pixel centre in its cell
    out = torch.zeros(ch, cell, cw, cell, dtype=torch.bool)
    r2 = radius * radius
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sl = (slice(1 + dy, 1 + dy + ch), slice(1 + dx, 1 + dx + cw))
            ey = (u[None, :, None, None] - (cy[sl] + dy * cell)[:, None, :, None]) ** 2
            ex = (u[None, None, None, :] - (cx[sl] + dx * cell)[:, None, :, None]) ** 2
            out |= on[sl][:, None, :, None] & (ey + ex <= r2)
    return out.reshape(ch * cell, cw * cell)[:height, :width]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an (h, w) float tensor (edges replicated)."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    y = F.pad(x[None, None], (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    return F.conv2d(y, k.view(1, 1, -1, 1))[0, 0]


def _eroded(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Points whose (2r+1)^2 square neighbourhood lies in ``mask`` (inside
    the image): two 1-D window sums from cumulative sums, O(h w) for any r."""
    k = 2 * r + 1
    h, w = mask.shape
    out = torch.zeros(h, w, dtype=torch.bool)
    if h < k or w < k:
        return out
    c = F.pad(mask.to(torch.int32).cumsum(1), (1, 0))
    rows = c[:, k:] - c[:, :-k]                                  # h x (w - k + 1)
    c = F.pad(rows.cumsum(0), (0, 0, 1, 0))
    box = c[k:] - c[:-k]                                         # (h-k+1) x (w-k+1)
    out[r:h - r, r:w - r] = box == k * k
    return out


def _block_sum(x: torch.Tensor, b: int) -> torch.Tensor:
    """Sums over b x b blocks of an (h, w) tensor with h, w multiples of b."""
    h, w = x.shape
    return x.reshape(h // b, b, w // b, b).sum(dim=(1, 3))


def _up(x: torch.Tensor, b: int) -> torch.Tensor:
    return x.repeat_interleave(b, 0).repeat_interleave(b, 1)


def _fix_first(q: torch.Tensor, b: int) -> torch.Tensor:
    """Integer (h, w) ``q``: subtract each b x b block's sum from the block's
    top-left element, so that every block sums to exactly zero."""
    q = q.clone()
    q[0::b, 0::b] -= _block_sum(q, b)
    return q


def _texture(mask: torch.Tensor, headroom: torch.Tensor, fine: float, coarse: float,
             g: torch.Generator) -> torch.Tensor:
    """Integer grey perturbation (h, w), h and w multiples of 4, nonzero only
    on 4 x 4 blocks that touch ``mask``: ``coarse`` (constant on 2 x 2
    blocks) plus ``fine`` (per pixel), both of zero sum over every 4 x 4
    block, and the fine part of zero sum over every 2 x 2 block. Each
    block's amplitude is scaled down to its ``headroom`` (per 4 x 4 block:
    how far the darkest/brightest channel is from 0/255), so adding it to
    the image never clips."""
    h, w = mask.shape
    m = mask.float()
    s1 = torch.randint(0, 2, (h, w), generator=g).float() * 2 - 1
    s2 = torch.randint(0, 2, (h // 2, w // 2), generator=g).float() * 2 - 1
    f = fine * s1 * m
    d1 = f - _up(_block_sum(f, 2) / 4, 2)          # per pixel, zero 2 x 2 sums
    c = coarse * s2 * (_block_sum(m, 2) / 4)       # per 2 x 2 block
    d2 = c - _up(_block_sum(c, 2) / 4, 2)          # zero 4 x 4 sums
    # keep |d1| + |d2| under the headroom (with 3 grey levels for the rounding below)
    peak = F.max_pool2d((d1.abs() + _up(d2.abs(), 2))[None, None], 4)[0, 0]
    scale = ((headroom - 3).clamp(min=0) / peak.clamp(min=1e-6)).clamp(max=1)
    d1 = d1 * _up(scale, 4)
    d2 = d2 * _up(scale, 2)
    q1 = _fix_first(d1.round().long(), 2)
    q2 = _fix_first(d2.round().long(), 2)
    return q1 + _up(q2, 2)


def camelyon_image(width: int, height: int, *, tumour: bool = False, seed: int = 0,
                   mpp: float = 0.5, tissue_fraction: float = 0.35, clusters: int = 3,
                   cluster_um: float = 60.0, fine: float = 40.0, coarse: float = 6.0):
    """A CAMELYON-like slide image at ``mpp`` microns per pixel (level 0).

    Returns ``(img, tissue, boxes)``: uint8 ``height x width x 3``, the
    boolean tissue mask (h x w) and, for a ``tumour`` slide, one dict per
    cluster ``{"x", "y", "radius", "box"}`` in level-0 pixels (centre,
    radius, and ``[x0, y0, x1, y1]`` half-open: the 4 x 4 blocks the disc
    touches, clipped to the image -- every changed pixel lies in a box);
    ``[]`` for a normal slide.

    Normal tissue: pink stroma with mild per-pixel texture and round,
    soft-edged nuclei of ``NUCLEUS_UM`` microns, inside a blob covering ``tissue_fraction`` of
    the slide. Tumour: ``clusters`` discs of ``cluster_um`` microns, centred
    on tissue, filled with nuclei of ``TUMOUR_NUCLEUS_UM`` microns that carry
    a grey chromatin texture of amplitude ``fine`` (1-pixel scale) and
    ``coarse`` (2-pixel scale). The texture keeps the 4 x 4 block sums of
    the normal image, so the slide's 4x downsampled level is identical to
    that of the same ``seed`` without tumour (see the module notes). The
    normal part depends only on ``seed``, not on ``tumour``."""
    if width < 16 or height < 16:
        raise ValueError(f"streamcnn: slide size {width} x {height} must be at least 16 x 16")
    if not mpp > 0:
        raise ValueError(f"streamcnn: mpp must be positive, got {mpp!r}")
    if not 0 < tissue_fraction < 1:
        raise ValueError(f"streamcnn: tissue_fraction must be in (0, 1), got {tissue_fraction!r}")
    if clusters < 0 or not cluster_um > 0 or fine < 0 or coarse < 0:
        raise ValueError("streamcnn: clusters must be >= 0, cluster_um > 0, fine and coarse "
                         f">= 0 (got {clusters}, {cluster_um}, {fine}, {coarse})")
    g = torch.Generator().manual_seed(seed)
    tissue, cells = _tissue_mask(width, height, g, tissue_fraction, cell_px=160,
                                 centre=(0.4, 0.2), sigma=0.22, base=0.5)
    # stroma: eosin pink, a smooth shade plus mild per-pixel texture
    shade = F.interpolate(torch.rand(1, 1, cells * 4, cells * 4, generator=g),
                          size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    tex = (torch.randn(height, width, generator=g) * 3 + shade * 25)[..., None]
    stroma = torch.tensor([225.0, 145.0, 195.0]) - tex * torch.tensor([1.0, 1.0, 0.5])
    # normal nuclei: round haematoxylin discs covering about 5 % of the tissue,
    # with soft edges (a blur of about a micron): smooth at the pixel scale
    rn = NUCLEUS_UM / 2 / mpp
    cell = max(2, int(math.ceil(rn)), round(math.sqrt(math.pi * rn * rn / 0.05)))
    nuclei = _blur(_discs(height, width, rn, cell, 1.0, g).float(), 1.0 / mpp)[..., None]
    purple = torch.tensor([95.0, 50.0, 145.0])
    img = torch.where(tissue[..., None], stroma + nuclei * (purple - stroma),
                      torch.tensor(255.0))
    img = img.round_().clamp_(0, 255).to(torch.uint8)
    boxes: List[dict] = []
    if not tumour or clusters == 0:
        return img, tissue, boxes
    # tumour: its own generator, so the normal part above does not depend on it
    gt = torch.Generator().manual_seed(seed * 7919 + 104729)
    radius = cluster_um / 2 / mpp
    inner = _eroded(tissue, int(radius))
    ys, xs = torch.nonzero(inner if inner.any() else tissue, as_tuple=True)
    if ys.numel() == 0:
        return img, tissue, boxes
    h4, w4 = height // 4 * 4, width // 4 * 4
    yy, xx = torch.meshgrid(torch.arange(h4, dtype=torch.float32),
                            torch.arange(w4, dtype=torch.float32), indexing="ij")
    region = torch.zeros(h4, w4, dtype=torch.bool)
    for _ in range(clusters):
        k = int(torch.randint(0, ys.numel(), (1,), generator=gt))
        y0, x0 = int(ys[k]), int(xs[k])
        region |= (yy - y0) ** 2 + (xx - x0) ** 2 <= radius ** 2
        r = int(math.ceil(radius))
        # the texture changes whole 4 x 4 blocks: the box is the blocks the disc touches
        boxes.append({"x": x0, "y": y0, "radius": float(radius),
                      "box": [max(0, (x0 - r) // 4 * 4), max(0, (y0 - r) // 4 * 4),
                              min(w4, ((x0 + r) // 4 + 1) * 4),
                              min(h4, ((y0 + r) // 4 + 1) * 4)]})
    rt = TUMOUR_NUCLEUS_UM / 2 / mpp
    cell = max(2, int(math.ceil(rt)), round(math.sqrt(math.pi * rt * rt / 0.9)))
    tnuclei = _discs(h4, w4, rt, cell, 1.0, gt) & region & tissue[:h4, :w4]
    base = img[:h4, :w4].to(torch.int16)
    room = torch.minimum(base, 255 - base)
    room = torch.minimum(torch.minimum(room[..., 0], room[..., 1]), room[..., 2]).float()
    headroom = -F.max_pool2d(-room[None, None], 4)[0, 0]
    d = _texture(tnuclei, headroom, fine, coarse, gt)
    img[:h4, :w4] = (base + d.to(torch.int16)[..., None]).to(torch.uint8)
    return img, tissue, boxes


def make_camelyon_slide(path: str, width: int, height: Optional[int] = None, *,
                        tumour: bool = False, seed: int = 0, mpp: float = 0.5,
                        tile: int = 256, quality: int = 90, min_size: int = 256,
                        **options) -> List[dict]:
    """Generate :func:`camelyon_image` and write it to ``path`` as an
    Aperio-style pyramidal TIFF (``.svs``: JPEG tiles, MPP and AppMag in the
    ImageDescription, so OpenSlide reports ``openslide.mpp-x``); levels are
    exact 2 x 2 halvings down to ``min_size`` and at least to 4x. Returns the tumour clusters
    (see :func:`camelyon_image`). ``options`` go to :func:`camelyon_image`."""
    height = width if height is None else height
    img, _, boxes = camelyon_image(width, height, tumour=tumour, seed=seed, mpp=mpp, **options)
    levels = pyramid(img, min(min_size, max(width, height) // 4))   # always the 2x and 4x levels
    desc = aperio_description(width, height, tile, mpp, app_mag=round(10 / mpp))
    write_slide(path, levels, tile=tile, compression="jpeg", quality=quality, description=desc)
    return boxes

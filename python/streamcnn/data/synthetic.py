"""Synthetic whole-slide images: real pyramidal tiled TIFFs (and Aperio-style
.svs files) written by the C writer on libtiff, with tissue-like blobs on a
white background and, optionally, small dark "tumour" clusters that define a
label. Deterministic for a seed, so tests can regenerate the exact pixels."""

import ctypes
import math
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .._library import clib

_COMPRESSIONS = {"deflate": 1, "jpeg": 2}


def tissue_image(width: int, height: int, *, tumour: bool = False, seed: int = 0,
                 tissue_fraction: float = 0.15, return_mask: bool = False):
    """uint8 ``height x width x 3``: pink, textured tissue blobs with purple
    nuclei on white, confined to a region around a random centre (so that
    there is a tissue box with white around it); with ``tumour``, a few
    clusters of large dark nuclei. With ``return_mask`` also the boolean
    tissue mask (h x w)."""
    g = torch.Generator().manual_seed(seed)
    # tissue: low-frequency noise under a Gaussian envelope, thresholded
    cells = max(2, min(width, height) // 128)
    low = torch.rand(1, 1, cells, max(2, round(cells * width / height)), generator=g)
    field = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)).tolist()
    yy = (torch.arange(height, dtype=torch.float32) / height - cy)[:, None]
    xx = (torch.arange(width, dtype=torch.float32) / width - cx)[None, :]
    field = field * torch.exp(-(yy ** 2 + xx ** 2) / (2 * 0.15 ** 2))
    cut = torch.quantile(field.flatten()[:: max(1, field.numel() // 65536)],
                         1 - tissue_fraction)
    tissue = field > cut
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

"""``streamcnn predict``: slide-level scores and heatmaps of a trained model.

    streamcnn predict run/best.pt a.svs b.svs --out maps/ [--full-slide] [--heatmap both]

Per slide: a row of ``DIR/predictions.csv``; ``DIR/<slide>_saliency.png``
and ``DIR/<slide>_cam.png`` (the map over the slide's thumbnail, with a
colour bar; for a max-pool head the locations that won the max are
marked); ``DIR/<slide>_cam.tif``, the class map as a tiled pyramidal TIFF
over the whole slide at the analysis mpp (mpp in its metadata; opens with
OpenSlide / ``streamcnn.Slide`` and in slide viewers), written in rows of
tiles from the feature-resolution map.

The analysed region is the training view (``--image-size``, default the
checkpoint's: the pixels the run's training data read, by its ``crop``:
``data.crop_window`` / ``read_window``, as ``SlideDataset``) or, with
``--full-slide``, the whole tissue box at the analysis mpp, whatever its
size. The region is read as uint8 and the stem streams over it; the
image gradient of the saliency is computed in bands (``streamcnn.heatmaps``), so the memory is the uint8 region, the
stem output (and, for the saliency, its gradient and the head's
activations) and one band.

Errors that concern one slide (unreadable, an mpp it cannot provide) are
reported and the other slides still processed; the exit code is then 2.
A slide without tissue gets a score (of its training view) and empty
maps, with a warning. Without ``--resume`` a run replaces the folder's
earlier one (the files it wrote for the slides its tables name).

While it runs, ``DIR/predictions.partial.csv`` holds the rows of the
slides done so far (rewritten whole after each); at the end it becomes
``DIR/predictions.csv``. A run stopped (Ctrl-C, SIGTERM, a crash) keeps
it, and the same command with ``--resume`` takes the rows of the slides
that worked (whose files are all there) and analyses the rest; the
settings that change the outputs (``DIR/predict.json``) must be
the same.
"""

import argparse
import csv
import ctypes
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch

from .. import heatmaps as hm
from ..data.dataset import crop_window, read_window, tissue_geometry
from ..slide import Slide
from .checkpoint import load_model
from .common import (UsageError, atomic_file, check_inputs_kept, check_settings, check_stop,
                     checkpoint_identity, lock_folder, read_scale_problem, read_table,
                     remove_stale_temps, repeated_slides, resolve_device, save_figure,
                     stop_requested, stop_status, stopped_by, upsampling_problem, write_atomic,
                     write_csv)
from .config import parse_classes

HEATMAPS = ("saliency", "cam", "both", "none")
# glibc serves allocations from this size up by mmap, returned to the system
# when freed (see _return_freed_memory)
MMAP_THRESHOLD = 1 << 20
OUTPUTS = ("_saliency.png", "_cam.png", "_cam.tif", "_features.pt")
PARTIAL = "predictions.partial.csv"
# the PNGs' thumbnail: its longest side at most (the figure holds as many
# pixels: at 4096 about 4.6k x 4.4k, drawn in 3.0 GB by matplotlib; the
# class map at full resolution is the _cam.tif)
MAX_PNG_SIZE = 4096
SETTINGS = "predict.json"
FEATURES = ("stem", "body")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.intermixed = True              # SLIDEs after options, and before them
    p.add_argument("checkpoint", help="a checkpoint written by streamcnn train")
    p.add_argument("slides", nargs="*", default=[], metavar="SLIDE",
                   help="whole-slide images (or plain images)")
    p.add_argument("--csv", metavar="CSV",
                   help="also the slides of a table: a 'path' column (relative to the CSV), "
                        "an optional 'mpp' column (microns per level-0 pixel of each); other "
                        "columns ignored")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created): predictions.csv and the maps")
    region = p.add_mutually_exclusive_group()
    region.add_argument("--image-size", type=int, metavar="PX",
                        help="analyse PX x PX pixels centred on the tissue (default: the "
                             "checkpoint's training image size)")
    region.add_argument("--full-slide", action="store_true",
                        help="analyse the whole tissue box at the analysis mpp")
    p.add_argument("--mpp", type=float, metavar="UM",
                   help="analysis resolution in microns per pixel (default: the "
                        "checkpoint's)")
    p.add_argument("--slide-mpp", type=float, metavar="UM",
                   help="microns per level-0 pixel of slides whose file carries none (PNG, "
                        "JPEG, ...; default: the checkpoint's --slide-mpp)")
    p.add_argument("--heatmap", choices=HEATMAPS, default=None,
                   help="maps to draw (default: both for a classifier, saliency for a "
                        "regression model)")
    p.add_argument("--target", default=None, metavar="CLASS",
                   help="class whose maps are drawn: its index, or its name from the run's "
                        "--classes (default: the predicted class)")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")
    p.add_argument("--tile-size", type=int, default=None, metavar="PX",
                   help="the stem's input tile (default: the checkpoint's tiling)")
    p.add_argument("--features", choices=FEATURES, default=None,
                   help="also save each slide's feature map: the streamed stem's output "
                        "(stem) or the head's last feature map before the global pool "
                        "(body), with the pooled embedding and the map's coordinates, as "
                        "NAME_features.pt")
    p.add_argument("--png-size", type=int, default=1024, metavar="PX",
                   help="longest side of the PNG overlays' thumbnail, and about the "
                        f"figure's (default 1024, at most {MAX_PNG_SIZE})")
    p.add_argument("--resume", action="store_true",
                   help="continue a run into --out that stopped: keep the rows of the "
                        "slides that worked (their files all there) and analyse the rest "
                        "(the same checkpoint and settings; without an earlier run, start)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _slides(args) -> List[Tuple[str, Optional[float]]]:
    """``(path, mpp or None)`` of the command line's slides, then the
    ``--csv`` table's."""
    items = [(p, None) for p in args.slides]
    if args.csv:
        from ..data.dataset import _row_mpp, row_path
        try:
            base, rows = read_table(args.csv, "--csv", ("path",))
        except UsageError as e:  # this command's errors are ValueError / FileNotFoundError
            missing = not os.path.exists(args.csv)
            raise (FileNotFoundError if missing else ValueError)(f"streamcnn: {e}") from None
        for line, row in rows:
            where = f"--csv {args.csv} line {line}"
            items.append((row_path(base, row, where), _row_mpp(row.get("mpp", ""), where)))
    if not items:
        raise ValueError("streamcnn: no slides: give SLIDE ... or --csv TABLE")
    return items


def _check_args(args) -> None:
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"streamcnn: --image-size must be positive, got {args.image_size}")
    for flag, v in (("--mpp", args.mpp), ("--slide-mpp", args.slide_mpp)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"streamcnn: {flag} must be positive, got {v}")
    if args.tile_size is not None and args.tile_size < 1:
        raise ValueError(f"streamcnn: --tile-size must be positive, got {args.tile_size}")
    if not 16 <= args.png_size <= MAX_PNG_SIZE:
        raise ValueError(f"streamcnn: --png-size must be in 16 .. {MAX_PNG_SIZE}, got "
                         f"{args.png_size}")


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (no-op elsewhere).
    By default glibc raises it to the largest block freed so far (up to 32
    MiB), after which the stem's tile buffers of a few MiB come from the
    heap and, once freed, stay resident: at 4096^2 about 0.25 GB of the
    peak was such freed memory (bench/RESULTS.md, predict memory). A fixed
    threshold keeps blocks of 1 MiB and more out of the heap."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(-3, MMAP_THRESHOLD)        # M_MMAP_THRESHOLD (malloc.h)


def _check_out_dir(path: str) -> None:
    """Create ``path`` and make sure files can be written there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"streamcnn: output directory {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".streamcnn-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"streamcnn: output directory {path} is not writable: "
                         f"{e.strerror or e}") from None


# ---------------------------------------------------------------------------
# progress


class _Bars:
    """tqdm bars over slides and over the operator's tiles (a thread-local
    C callback, as streamcnn.progress), both off with quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def slides(self, items):
        if self.quiet:
            return items
        from tqdm import tqdm
        return tqdm(items, desc="slides", unit="slide", file=sys.stderr)

    def write(self, msg: str) -> None:
        if self.quiet:
            print(msg, file=sys.stderr)
        else:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)

    @contextmanager
    def tiles(self, desc: str):
        if self.quiet:
            yield None
            return
        from tqdm import tqdm
        from .. import progress as prog
        from .._library import clib
        bar = tqdm(total=0, desc=desc, unit="tile", leave=False, file=sys.stderr)
        state = {"key": None}

        def update(user, phase, done, total):
            try:
                key = (phase, total)
                if state["key"] != key or done < bar.n:
                    state["key"] = key
                    bar.reset(total=total)
                    bar.set_description(f"{desc} {('forward', 'backward')[phase] if phase in (0, 1) else phase}")
                bar.update(done - bar.n)
            except Exception:  # noqa: BLE001 - display never breaks the call
                pass

        fn = prog._PROGRESS_FN(update)
        lib = clib()
        lib.sc_set_progress(fn, None)
        try:
            yield bar
        finally:
            lib.sc_set_progress(None, None)
            bar.close()


# ---------------------------------------------------------------------------
# one slide


def _slide_name(path: str, taken: Dict[str, int]) -> str:
    """The name of ``path``'s rows and files: its file name without the
    extension, or, where a slide before it took that name, the first of
    NAME_2, NAME_3, ... no slide took (``a/x.svs``, ``b/x.svs``,
    ``x_2.svs``: x, x_2, x_2_2; the second one's maps wrote over the
    third's). ``taken``: the names given so far (and, per name, the last
    suffix tried)."""
    base = os.path.splitext(os.path.basename(path))[0] or "slide"
    name, n = base, taken.get(base, 1)
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    if name != base:
        taken[base] = n
    taken.setdefault(name, 1)
    return name


def _open(path: str, default_mpp: Optional[float] = None,
          mpp: Optional[float] = None) -> Slide:
    try:
        return Slide(path, mpp=mpp, default_mpp=default_mpp)
    except FileNotFoundError:
        raise FileNotFoundError(f"streamcnn: slide {path} does not exist") from None
    except (ValueError, RuntimeError) as e:
        msg = str(e)
        raise ValueError(msg if path in msg else f"streamcnn: cannot read slide {path}: "
                         f"{msg}") from None


def _downsample(s: Slide, mpp: Optional[float], cell: Optional[float] = None
                ) -> Tuple[float, Optional[float]]:
    """(downsample w.r.t. level 0, analysis mpp) for the requested mpp (the
    slide's own from its table row's ``cell``, when given)."""
    if mpp is None:
        return 1.0, (s.mpp[0] if s.mpp else None)
    if s.mpp is None:
        raise ValueError(f"streamcnn: slide {s.path} has no microns-per-pixel metadata "
                         f"(openslide.mpp-x), so it cannot be read at {mpp:g} um/px: give "
                         "its resolution with --slide-mpp")
    why = upsampling_problem(s, mpp, f"use --mpp {s.mpp[0]:g} or coarser", cell)
    if why:
        raise ValueError(f"streamcnn: {why}")
    return s.downsample_for_mpp(mpp), mpp      # (refuses pixels that are not square)


def _read_region(s: Slide, ds: float, full: bool, size: int, crop: str):
    """(uint8 3 x h x w image, level-0 origin (x, y) of its pixel (0, 0),
    blank). Pixel (i, j) of the image is at level-0 (x + j ds, y + i ds).
    ``full``: the tissue box at ``ds``; else (and for a blank slide) the
    training view, ``size x size`` as the training data's ``crop`` reads it
    (``data.crop_window``: the same pixels, background where the window
    has no slide)."""
    if full:
        box = s.tissue_box()
        if box is not None:
            bx, by, bw, bh = box
            w, h = max(1, round(bw / ds)), max(1, round(bh / ds))
            return s.read_scaled((bx, by), ds, (w, h)), (bx, by), False
    tissue = tissue_geometry(s)
    win = crop_window(s, ds, (size, size), crop, lambda: tissue)
    (x, y, _, _), (r0, c0), _, _ = win
    origin = tuple(int(v) if float(v).is_integer() else v
                   for v in (x - c0 * ds, y - r0 * ds))
    return read_window(s, win, (size, size)), origin, full or tissue[0] is None


def _save_figure(fig, path: str, dpi: int = 100) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    save_figure(fig, path, dpi, tight=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _overlay_png(path: str, thumb: torch.Tensor, m: Optional[torch.Tensor], m_extent,
                 box, title: str, label: str, vmin: float, vmax: float, cmap: str,
                 points=None) -> None:
    """The slide thumbnail (uint8 3 x th x tw) with the map m drawn over
    m_extent = (x0, x1, y1, y0) in thumbnail pixels, a colour bar and the
    analysed box (x0, x1, y1, y0); points: (x, y, size) in thumbnail pixels
    (max-pool winners). The thumbnail is drawn 8 inches along its longest
    side at max(100, longest side / 8) dpi (about its own pixels), the
    colour bar along its side (under it, for a thumbnail at least twice as
    wide as high), and the PNG cropped to what is drawn: a thin slide gives
    a thin figure, not one mostly white."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    th, tw = thumb.shape[1:]
    w, h = 8.0 * tw / max(th, tw), 8.0 * th / max(th, tw)      # inches
    under = tw >= 2 * th
    # the image and the colour bar placed in inches; the margins hold the
    # title, ticks and labels (the crop at saving drops what is left over)
    mx, my = 1.5, 1.0
    fw, fh = w + 2 * mx, h + 2 * my
    fig = Figure(figsize=(fw, fh))
    ax = fig.add_axes((mx / fw, my / fh, w / fw, h / fh))
    ax.imshow(thumb.permute(1, 2, 0).numpy(), interpolation="bilinear", aspect="auto")
    if m is not None:
        im = ax.imshow(m.numpy(), extent=m_extent, cmap=cmap, alpha=0.55, vmin=vmin,
                       vmax=vmax, interpolation="bilinear", aspect="auto")
        if under:
            cax = fig.add_axes((mx / fw, (my - 0.3) / fh, w / fw, 0.12 / fh))
        else:
            cax = fig.add_axes(((mx + w + 0.12) / fw, my / fh, 0.15 / fw, h / fh))
        fig.colorbar(im, cax=cax, label=label, orientation="horizontal" if under else "vertical")
        if points is not None and len(points[0]):
            ax.scatter(points[0], points[1], s=points[2], facecolors="none",
                       edgecolors="cyan", linewidths=0.8, label="max-pool winners")
            # outside the image: above its right end, or under its left one
            ax.legend(loc="lower right" if under else "upper left",
                      bbox_to_anchor=(1, 1) if under else (0, 0), borderaxespad=0.2,
                      fontsize=7, frameon=False)
    x0, x1, y1, y0 = box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black",
                           linewidth=0.8, linestyle="--"))
    ax.set_xlim(0, tw)
    ax.set_ylim(th, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left" if under else "center")
    _save_figure(fig, path, max(100, math.ceil(max(th, tw) / 8.0)))


def _visible(lo: float, hi: float, n: int) -> Tuple[int, int]:
    """The thumbnail pixels [a, b) of 0 .. n that the span [lo, hi) of
    thumbnail coordinates covers (a == b: none)."""
    a, b = max(0, math.floor(lo)), min(n, math.ceil(hi))
    return a, max(a, b)


def _cam_tiff(path: str, s: Slide, m: Optional[torch.Tensor], cone: hm.Cone, ds: float,
              origin: Tuple[int, int], shape: Tuple[int, int], mpp: Optional[float],
              vmin: float, vmax: float, cmap: str, rows: Optional[int] = None
              ) -> Tuple[int, int]:
    """The class map over the whole slide at the analysis resolution
    (level-0 pixel (X, Y) is map pixel (X / ds, Y / ds)): colour-mapped
    inside the analysed region, white outside (everywhere for a blank
    slide), written in bands of ``rows`` rows (default: about 2^21 pixels,
    at most 512 rows); each band's values are upsampled from the feature
    map for that band alone (float64 transients of a few band sizes).
    Returns its size."""
    from ..tiff import PyramidWriter
    w0, h0 = s.dimensions
    width, height = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    if rows is None:
        rows = max(8, min(512, (1 << 21) // width))
    lut = hm.colormap_lut(cmap)
    h, w = shape
    # the analysed image's pixel (i, j) is map pixel (oy + i, ox + j)
    oy, ox = origin[1] / ds, origin[0] / ds
    c0, c1 = max(0, math.floor(ox)), min(width, math.ceil(ox + w))
    with PyramidWriter(path, width, height, mpp=mpp) as wr:
        for y0 in range(0, height, rows):
            n = min(rows, height - y0)
            band = torch.full((n, width, 3), 255, dtype=torch.uint8)
            r0, r1 = max(y0, math.floor(oy)), min(y0 + n, math.ceil(oy + h))
            if m is not None and r1 > r0 and c1 > c0:
                vals = hm.upsample_map(m, cone, (r1 - r0, c1 - c0),
                                       origin=(r0 - oy, c0 - ox))
                band[r0 - y0:r1 - y0, c0:c1] = hm.colorize(
                    hm.normalize(vals, vmin=vmin, vmax=vmax), lut=lut)
            wr.write(band)
    return width, height



def _save_features(file: str, f: torch.Tensor, body: torch.Tensor, stem, head, layer: str, *,
                   path: str, config: Dict, mpp: Optional[float], ds: float, origin) -> str:
    """Write ``--features``: the feature map of the stem's output (stem) or
    of the head's body (body), C x h x w float32, its global pool (the
    vector the linear layer reads), and where each location is: location
    ``(i, j)``'s receptive field is centred on analysis pixel
    ``(i * stride[0] + center[0], j * stride[1] + center[1])``, i.e. level-0
    ``origin + ds * (that + 0.5)`` (x from j, y from i). Returns the file's
    name. ``body``: ``head.body(f)``."""
    with torch.no_grad():
        emb = head.pool(body)[0].float().cpu()
        fmap = (f if layer == "stem" else body)[0].float().cpu()
    cone = hm.stem_cone(stem) if layer == "stem" else hm.map_cone(stem, head)
    with atomic_file(file) as out:
        torch.save({"features": fmap, "embedding": emb, "layer": layer,
                    "stride": cone.stride, "center": cone.center,
                    "receptive_field": cone.receptive_field, "mpp": mpp, "downsample": ds,
                    "origin": tuple(origin), "slide": path, "model": config.get("model"),
                    "stream_upto": config.get("stream_upto")}, out)
    return os.path.basename(file)


def _predict_slide(path: str, name: str, model, config, args, want_sal: bool,
                   want_cam: bool, bars: _Bars, slide_mpp_of_row: Optional[float] = None,
                   min_size: int = 1) -> Dict:
    task = config.get("task", "classification")
    stem, head = model.stem, model.head
    dev = next(model.parameters()).device
    row = {"slide": name, "path": path, "status": "ok", "message": ""}
    slide_mpp = args.slide_mpp if args.slide_mpp is not None else config.get("slide_mpp")
    with _open(path, slide_mpp, slide_mpp_of_row) as s:
        flag = "--mpp" if args.mpp is not None else "the run's --mpp"
        ds, mpp = _downsample(s, args.mpp if args.mpp is not None else config.get("mpp"),
                              slide_mpp_of_row)
        if mpp is not None:
            why = read_scale_problem(s, mpp, cell=slide_mpp_of_row, flag=flag)
            if why:
                raise ValueError(f"streamcnn: {why}")
        size = args.image_size or int(config.get("image_size") or 0)
        if not args.full_slide and size < 1:
            raise ValueError("streamcnn: the checkpoint has no image_size; give --image-size "
                             "or --full-slide")
        img, origin, blank = _read_region(s, ds, args.full_slide,
                                          size or int(config.get("image_size") or 1024),
                                          config.get("crop") or "tissue")
        if blank:
            msg = (f"streamcnn: warning: slide {path} has no tissue (blank); its score is of "
                   f"its centre and its maps are empty")
            bars.write(msg)
            row["status"], row["message"] = "blank", "no tissue: empty maps"
        h, w = img.shape[1:]
        if h < min_size or w < min_size:
            at = f" at {mpp:g} um/px" if mpp else ""
            raise ValueError(f"streamcnn: {path}: the slide{at} is {w} x {h} pixels, smaller "
                             f"than the {min_size} x {min_size} the model takes")
        # on a CUDA device the uint8 region stays in host memory: the stem
        # streams it tile by tile (and the saliency band by band)
        x = img.unsqueeze(0) if dev.type == "cuda" else img.unsqueeze(0).to(dev)
        del img
        with bars.tiles(f"{name}"):
            with torch.no_grad():
                f = stem(x)
            if not (want_sal and not blank):
                del x       # the head and the pictures need no image
                x = None
            body = None
            if args.features:     # the head's body once, for the maps and the file
                with torch.no_grad():
                    body = head.body(f)
                feature_file = _save_features(
                    os.path.join(args.out, f"{name}_features.pt"), f, body, stem, head,
                    args.features, path=path, config=config, mpp=mpp, ds=ds, origin=origin)
            if task != "regression":
                m, winners, logits, t = hm.class_maps(head, f, args.target, body=body)
            else:
                with torch.no_grad():
                    logits = head.fc(head.pool(head.body(f) if body is None else body))
                m = winners = t = None
            del body
            if t is None:
                t = hm._targets(logits, args.target)
            sal = None
            if want_sal and not blank:
                thumb_px = args.png_size
                pool = max(1, math.ceil(max(h, w) / thumb_px))
                sal = hm.saliency(stem, head, x, args.target if args.target is not None
                                  else int(t[0]), pool=pool, features=f)
        del f, x
        logits = logits.float().cpu()[0]
        k = int(t[0])
        row.update(target=k, mpp=f"{mpp:g}" if mpp else "", downsample=f"{ds:g}",
                   x=origin[0], y=origin[1], width=round(w * ds), height=round(h * ds),
                   region=f"{w}x{h}")
        if args.features:
            row["features"] = feature_file
        if task == "regression":
            row["prediction"] = f"{float(logits[0]):.6g}"
            row["score"] = row["prediction"]
        else:
            p = torch.softmax(logits.double(), 0)
            row["prediction"] = int(logits.argmax())
            names = parse_classes(config.get("classes"))
            if names is not None:
                row["prediction_name"] = names[row["prediction"]]
                row["target_name"] = names[k]
            row["score"] = f"{float(p[k]):.6g}"
            for j in range(p.numel()):
                row[f"prob_{j}"] = f"{float(p[j]):.6g}"
        # pictures: over the slide thumbnail
        thumb = s.thumbnail(args.png_size)
        tds = max(s.dimensions) / max(thumb.shape[1:])
        ex0, ey0 = origin[0] / tds, origin[1] / tds
        extent = (ex0, ex0 + w * ds / tds, ey0 + h * ds / tds, ey0)
        scale = tds / ds           # image pixels per thumbnail pixel
        # the maps are drawn over the thumbnail: only the part of the region
        # on the slide is computed (a region far larger than a small slide
        # would otherwise be upsampled whole, at the thumbnail's scale)
        vx0, vx1 = _visible(extent[0], extent[1], thumb.shape[2])
        vy0, vy1 = _visible(extent[3], extent[2], thumb.shape[1])
        visible = (vx0, vx1, vy1, vy0)
        out = args.out
        title = f"{name}: target {k}, score {row['score']}" + (" (no tissue)" if blank else "")
        if want_cam:
            cone = hm.map_cone(stem, head)
            vmin, vmax = hm.percentiles(m, 1, 99) if not blank else (0.0, 1.0)
            if not vmax > vmin:
                vmin, vmax = vmin - 1e-6, vmin + 1e-6
            small = None
            if not blank and vx1 > vx0 and vy1 > vy0:
                small = hm.upsample_map(m[0], cone, (vy1 - vy0, vx1 - vx0), scale=scale,
                                        origin=((vy0 - ey0) * scale, (vx0 - ex0) * scale))
            pts = None
            if winners is not None and not blank:
                wv = winners[0]
                idx = torch.nonzero(wv > 0)
                if idx.numel():
                    cy = idx[:, 0].double() * cone.stride[0] + cone.center[0]
                    cx = idx[:, 1].double() * cone.stride[1] + cone.center[1]
                    v = wv[idx[:, 0], idx[:, 1]].double()
                    pts = (((cx + 0.5) / scale + ex0).numpy(), ((cy + 0.5) / scale + ey0).numpy(),
                           (10 + 90 * v / v.max()).numpy())
            _overlay_png(os.path.join(out, f"{name}_cam.png"), thumb, small, visible, extent,
                         title, f"class {k} score (logit units)", vmin, vmax, "jet", pts)
            _cam_tiff(os.path.join(out, f"{name}_cam.tif"), s, None if blank else m[0], cone,
                      ds, origin, (h, w), mpp, vmin, vmax, "jet")
        if want_sal:
            disp = None
            if sal is not None:
                disp = hm.normalize(hm.smooth(sal[0], 1.0), 1, 99)
            _overlay_png(os.path.join(out, f"{name}_saliency.png"), thumb, disp, extent, extent,
                         title, "saliency |d score / d pixel| (1-99 percentile)", 0.0, 1.0,
                         "inferno")
    return row


# ---------------------------------------------------------------------------
# the command


def _write_csv(path: str, rows: List[Dict]) -> None:
    """``rows`` under the union of their keys, in the order first seen."""
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    write_csv(path, keys, [[r.get(k, "") for k in keys] for r in rows])


def _target(text: str, task: str, config: Dict, outputs: int) -> int:
    """``--target``: a class index, or a name of the run's ``--classes``
    (of a regression model's one output: 0)."""
    names = parse_classes(config.get("classes")) or []
    if text in names:
        return names.index(text)
    try:
        k = int(text)
    except ValueError:
        known = f"the run's --classes: {', '.join(names)}" if names else \
            "the run named no --classes"
        raise ValueError(f"streamcnn: --target {text!r} is neither a class index nor a "
                         f"class name ({known})") from None
    if not 0 <= k < outputs:
        raise ValueError(f"streamcnn: --target {k} is out of range for {outputs} "
                         f"{'classes' if task != 'regression' else 'output'}")
    return k


def run(args) -> int:
    """Run ``streamcnn predict``; 0 when every slide worked, 2 when some
    failed or were blank (each reported on stderr and in predictions.csv;
    a blank slide still gets its score and empty maps). Errors that
    stop everything (checkpoint, arguments, output folder) raise ValueError
    / FileNotFoundError with a ``streamcnn:`` message."""
    _check_args(args)
    items = _slides(args)
    _return_freed_memory()
    try:
        device = resolve_device(args.device)
    except UsageError as e:             # (this command's errors are ValueError)
        raise ValueError(f"streamcnn: {e}") from None
    model, config = load_model(args.checkpoint, device)
    task = config.get("task", "classification")
    heat = args.heatmap or ("both" if task != "regression" else "saliency")
    if task == "regression" and heat in ("cam", "both"):
        raise ValueError(f"streamcnn: checkpoint {args.checkpoint} is a regression model "
                         f"(task: regression): it has no class map; use --heatmap saliency")
    if args.target is not None:
        args.target = _target(args.target, task, config, model.head.fc.out_features)
    if args.tile_size is not None:
        rf = max(model.stem.receptive_field)
        if args.tile_size < rf:
            raise ValueError(f"streamcnn: --tile-size {args.tile_size} is smaller than the "
                             f"stem's receptive field ({rf})")
        model.stem.memory_budget = 0
        model.stem.tile_size = [args.tile_size, args.tile_size]
    from ..classifier import min_image_size
    min_size = min_image_size(model)
    if args.image_size and args.image_size < min_size:
        raise ValueError(f"streamcnn: --image-size {args.image_size} is smaller than the "
                         f"{min_size} x {min_size} pixels the model takes")
    settings = _settings(args, config, heat)
    from .evaluate import SETTINGS as EVALUATE_SETTINGS
    if os.path.exists(os.path.join(args.out, EVALUATE_SETTINGS)):
        raise ValueError(f"streamcnn: --out {args.out} holds the results of streamcnn "
                         f"evaluate ({EVALUATE_SETTINGS}, predictions.csv): give predict "
                         "another --out")
    # what a run without --resume removes of the earlier one (read once)
    earlier = [] if args.resume else _earlier_run(args.out)
    _check_inputs_kept(args, items, earlier)
    twice = repeated_slides([p for p, _ in items])
    if twice:
        print(f"streamcnn: warning: {twice}: it is analysed once per listing",
              file=sys.stderr)
    _check_out_dir(args.out)            # after every check: a refused run writes nothing
    lock = lock_folder(args.out, "predict")
    if lock is not None:
        remove_stale_temps(args.out, lambda name: name.endswith(OUTPUTS) or name in
                           ("predictions.csv", PARTIAL, SETTINGS))
    try:
        return _predict_all(args, items, model, config, heat, settings, min_size, earlier)
    finally:
        if lock is not None:
            os.close(lock)


def _predict_all(args, items, model, config, heat: str, settings: Dict, min_size: int,
                 earlier: List[str]) -> int:
    """The slides of ``items`` into ``args.out`` (its lock held); ``earlier``:
    the files of the earlier run to remove first (none with --resume)."""
    for p in model.parameters():
        p.requires_grad_(False)
    want_sal, want_cam = heat in ("saliency", "both"), heat in ("cam", "both")
    wanted = [sfx for sfx, want in (("_saliency.png", want_sal), ("_cam.png", want_cam),
                                    ("_cam.tif", want_cam), ("_features.pt", args.features))
              if want]
    if args.resume:
        done = _resumable(args.out, settings, wanted)
    else:
        done = {}
        for f in earlier:
            _unlink(f)
    write_atomic(os.path.join(args.out, SETTINGS),
                 json.dumps(settings, indent=1, sort_keys=True).encode())
    partial = os.path.join(args.out, PARTIAL)
    bars = _Bars(args.quiet)
    rows, failed, taken, kept = [], 0, {}, 0
    name = None
    try:
        for path, row_mpp in bars.slides(items):
            check_stop()                    # a stop whose exception Python dropped
            name = _slide_name(path, taken)
            if (path, name) in done:        # --resume: this slide worked before
                rows.append(done[path, name])
                kept += 1
                name = None
                continue
            try:
                rows.append(_predict_slide(path, name, model, config, args, want_sal,
                                           want_cam, bars, row_mpp, min_size))
            except (ValueError, FileNotFoundError, RuntimeError, OSError, MemoryError) as e:
                if stop_requested() is not None:
                    raise                   # what a stop became inside torch's code
                failed += 1
                msg = str(e) if str(e).startswith("streamcnn: ") else f"streamcnn: {path}: {e}"
                _unlink_outputs(args.out, name)  # no partial set of maps for a failed slide
                bars.write(msg)
                rows.append({"slide": name, "path": path, "status": "error",
                             "message": msg[len("streamcnn: "):]})   # (the table's, not stderr's)
            name = None
            _write_csv(partial, rows)
    except (KeyboardInterrupt, RuntimeError, OSError, ValueError, MemoryError) as e:
        sig = stopped_by(e)                 # Ctrl-C, or SIGTERM (Terminated)
        if sig is None:
            raise
        if name is not None:
            _unlink_outputs(args.out, name)  # the slide it was in the middle of
        if rows:
            _write_csv(partial, rows)       # (if it stopped while writing it)
        word, code = stop_status(sig)
        held = (f"{partial} holds their rows; continue with --resume" if rows else
                "no slide was done")
        print(f"streamcnn: {word} after {len(rows)} of {len(items)} slides; {held}",
              file=sys.stderr)
        return code
    final = os.path.join(args.out, "predictions.csv")
    _write_csv(final, rows)
    _unlink(partial)
    if not args.quiet:
        again = f" ({kept} kept from the earlier run)" if kept else ""
        bars.write(f"streamcnn predict: {len(rows) - failed} of {len(rows)} slides{again} -> "
                   f"{final}")
    blank = sum(r.get("status") == "blank" for r in rows)
    return 2 if failed or blank else 0


def _earlier_run(out: str) -> List[str]:
    """What a run without --resume removes of the earlier one in ``out``:
    its tables and the files of every slide they name (what predict wrote:
    ``<slide>_cam.png`` ...), so that no map of the earlier run is left
    beside the new ones as if it were current. A folder without
    predict.json is not a predict folder: nothing."""
    if not os.path.exists(os.path.join(out, SETTINGS)):
        return []
    files = []
    for table in (PARTIAL, "predictions.csv"):
        path = os.path.join(out, table)
        try:
            with open(path, newline="") as f:
                names = {r.get("slide") for r in csv.DictReader(f)}
        except (OSError, UnicodeDecodeError, csv.Error):
            continue                    # none, or not ours: left as it is
        files += [os.path.join(out, name + sfx) for name in sorted(n for n in names if n)
                  if os.path.basename(name) == name for sfx in OUTPUTS]
        files.append(path)
    return files


def _check_inputs_kept(args, items: List[Tuple[str, Optional[float]]],
                       earlier: List[str]) -> None:
    """Refuse a run that would write or remove a file it reads: a slide
    named like an output (``X_cam.png`` in --out), the --csv table, the
    checkpoint (before anything is written); ``earlier``: the earlier run's
    files it removes."""
    taken: Dict[str, int] = {}
    names = [_slide_name(path, taken) for path, _ in items]
    outputs = [os.path.join(args.out, f) for f in ("predictions.csv", PARTIAL, SETTINGS)]
    outputs += [os.path.join(args.out, n + sfx) for n in names for sfx in OUTPUTS] + earlier
    inputs = [("slide", p) for p, _ in items] + [("checkpoint", args.checkpoint)]
    if args.csv:
        inputs.append(("--csv table", args.csv))
    check_inputs_kept(outputs, inputs, "predict")


def _unlink_outputs(out: str, name: str) -> None:
    for suffix in OUTPUTS:
        _unlink(os.path.join(out, name + suffix))


def _settings(args, config: Dict, heat: str) -> Dict:
    """What makes a slide's outputs what they are, beside the slide: the
    checkpoint (its file: path, size, modification time) and the options
    (the tile size and the device only change the speed). --resume needs
    them equal."""
    return {**checkpoint_identity(args.checkpoint),
            "image_size": None if args.full_slide else
            (args.image_size or int(config.get("image_size") or 0)),
            "full_slide": bool(args.full_slide),
            "mpp": args.mpp if args.mpp is not None else config.get("mpp"),
            "slide_mpp": args.slide_mpp if args.slide_mpp is not None
            else config.get("slide_mpp"),
            "heatmap": heat, "target": args.target, "features": args.features,
            "png_size": args.png_size}


def _resumable(out: str, settings: Dict, wanted: List[str]) -> Dict[Tuple[str, str], Dict]:
    """--resume: the rows of an earlier run into ``out`` of the slides that
    worked (status ok or blank) and whose ``wanted`` files are all there,
    by (path, name); {} when there was no earlier run. Other settings than
    the earlier run's are refused (ValueError naming them)."""
    if not check_settings(os.path.join(out, SETTINGS), settings, out, "predict"):
        return {}
    # the stopped run's rows, or those of a run that ended (more slides now)
    tables = [os.path.join(out, f) for f in (PARTIAL, "predictions.csv")]
    table = next((t for t in tables if os.path.exists(t)), None)
    if table is None:
        return {}
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"streamcnn: --resume: cannot read {table}: {e}") from None
    done = {}
    for r in rows:
        path, name = r.get("path"), r.get("slide")
        if r.get("status") not in ("ok", "blank") or not path or not name:
            continue
        if all(os.path.exists(os.path.join(out, name + sfx)) for sfx in wanted):
            done[path, name] = r
    return done

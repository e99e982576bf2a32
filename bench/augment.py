#!/usr/bin/env python
"""The training augmentation of one image (``streamcnn.data.Augment``:
flips, quarter turns, colour jitter on uint8), side by side with the way it
was computed before 2026-12-06 (each flip and ``torch.rot90`` a copy, the
channel sums of the turned view, the jitter into ``empty_like`` of the view,
then ``.contiguous()``), for every quarter turn; both results are checked
equal bit for bit before timing.

With ``--slide PATH`` the item's read (``SlideDataset.read``: the slide
region at ``--mpp``, resampled) is timed too, and the table adds what one
``SlideDataset`` item costs with each augmentation (read + augmentation).

    python bench/augment.py [--size 8192] [--reps 3] [--threads 2]
        [--slide PATH --mpp 0.375]
"""

import argparse
import platform
import statistics
import time

import torch


def _reference(img, d, colour):
    """The augmentation as computed before 2026-12-06 (same result)."""
    from streamcnn.data.dataset import channel_sums
    if d.flip_w:
        img = img.flip(2)
    if d.flip_h:
        img = img.flip(1)
    if d.quarter_turns:
        img = torch.rot90(img, d.quarter_turns, dims=(1, 2))
    sums = channel_sums(img).tolist()
    return colour(img, d, sums, img.shape[1] * img.shape[2]).contiguous()


def _old_colour(img, d, sums, pixels):
    """Augment.colour into ``empty_like(img)`` (a turned view's strides)."""
    from streamcnn.data.dataset import _row_bands
    b, c, s = d.brightness, d.contrast, d.saturation
    if (b, c, s) == (1.0, 1.0, 1.0):
        return img
    m = [float(int(v)) / pixels for v in sums]
    mean = b * ((1 - s) * (0.299 * m[0] + 0.587 * m[1] + 0.114 * m[2])
                + s * (m[0] + m[1] + m[2]) / 3)
    out = torch.empty_like(img)
    for rows in _row_bands(img):
        x = img[:, rows].float() * b
        grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        x = grey + s * (x - grey)
        x = mean + c * (x - mean)
        out[:, rows] = x.round_().clamp_(0, 255)
    return out


def _median(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--slide", default=None, help="a slide to time the item's read from")
    ap.add_argument("--mpp", type=float, default=None, help="with --slide: µm/px read at")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from streamcnn.data import Augment, AugmentDraw, SlideDataset

    read_s = None
    if args.slide:
        ds = SlideDataset([(args.slide, 0)], args.size, mpp=args.mpp, crop="center")
        ds.slide(0)
        ds.window(0)
        img = ds.read(0)
        read_s = _median(lambda: ds.read(0), args.reps)
    else:
        img = torch.randint(0, 256, (3, args.size, args.size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    print(f"# Augment of a 3 x {args.size} x {args.size} uint8 image"
          f"{' read from ' + args.slide if args.slide else ' (random pixels)'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; median of {args.reps}")
    cols = ["turns, flips", "before s", "now s", "before / now", "equal"]
    if read_s is not None:
        cols += ["read s", "item before s", "item now s", "item before / now"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for k, fw, fh in [(0, False, False), (1, True, False), (2, False, True), (3, True, True)]:
        d = AugmentDraw(fw, fh, k, 1.06, 0.93, 1.08)
        aug = Augment()
        aug.draw = lambda h, w, g=None, d=d: d          # this draw, every call
        ref = _reference(img, d, _old_colour)
        now = aug(img)
        equal = torch.equal(ref, now)
        if not equal:
            raise SystemExit(f"streamcnn bench: results differ for {d}")
        before = _median(lambda: _reference(img, d, _old_colour), args.reps)
        after = _median(lambda: aug(img), args.reps)
        row = [f"{k}, {'w' if fw else '-'}{'h' if fh else '-'}", f"{before:.2f}",
               f"{after:.2f}", f"{before / after:.2f}x", str(equal)]
        if read_s is not None:
            row += [f"{read_s:.2f}", f"{read_s + before:.2f}", f"{read_s + after:.2f}",
                    f"{(read_s + before) / (read_s + after):.2f}x"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

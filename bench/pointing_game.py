"""Pointing game of the class-activation map on synthetic tumour slides (CPU).

    nice python bench/pointing_game.py [--train 4] [--eval 10] [--steps 150]

Trains a small CNN (three 3x3 convolutions, stride 4, 16 channels; global
max-pool + linear head) on CAMELYON-like synthetic slides
(`streamcnn.data.synthetic.camelyon_image`, 384 x 384 at 0.5 um/px,
30-um tumour clusters whose evidence is a 1-2 pixel chromatin texture):
bags of 96 x 96 pixels, positive ones drawn around a tumour slide's
cluster centres, negative ones at random tissue positions of normal
slides (flips as augmentation), plain PyTorch on the stem module. Then,
on held-out tumour slides, the CAM of the tumour class through the
*streamed* stem (`streamcnn.heatmaps.cam`): a hit when the receptive-field
centre of the CAM's top location, grown to one output stride, overlaps a
true cluster's box (the generator returns them). Prints the hit rate and
the chance rate (the fraction of tissue locations that would hit).
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

SIZE, CROP = 384, 96


def _slide(seed: int, tumour: bool):
    from streamcnn.data import synthetic
    img, tissue, boxes = synthetic.camelyon_image(SIZE, SIZE, tumour=tumour, seed=seed,
                                                  mpp=0.5, cluster_um=30)
    return img.permute(2, 0, 1).contiguous(), tissue, boxes


def _crop(img, cy, cx):
    y = int(min(max(0, cy - CROP // 2), SIZE - CROP))
    x = int(min(max(0, cx - CROP // 2), SIZE - CROP))
    return img[:, y:y + CROP, x:x + CROP]


def _batch(tumour, normal, n, g):
    xs, ys = [], []
    for i in range(n):
        if i % 2:
            img, _, boxes = tumour[int(torch.randint(0, len(tumour), (1,), generator=g))]
            b = boxes[int(torch.randint(0, len(boxes), (1,), generator=g))]
            j = (torch.rand(2, generator=g) - 0.5) * b["radius"]
            xs.append(_crop(img, b["y"] + j[0], b["x"] + j[1]))
            ys.append(1)
        else:
            img, tissue, _ = normal[int(torch.randint(0, len(normal), (1,), generator=g))]
            yy, xx = torch.nonzero(tissue, as_tuple=True)
            k = int(torch.randint(0, yy.numel(), (1,), generator=g))
            xs.append(_crop(img, yy[k], xx[k]))
            ys.append(0)
    x = torch.stack(xs)
    if torch.rand(1, generator=g) < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=g) < 0.5:
        x = x.flip(2)
    return x, torch.tensor(ys)


def train(n_train: int = 4, steps: int = 150, batch: int = 16, seed: int = 0):
    """(streamed stem, head) trained on n_train tumour + n_train normal slides."""
    import streamcnn
    from streamcnn.classifier import GlobalPool, Head
    torch.manual_seed(seed)
    tumour = [_slide(s, True) for s in range(n_train)]
    normal = [_slide(100 + s, False) for s in range(n_train)]
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    head = Head(nn.Identity(), GlobalPool("max"), nn.Linear(16, 2))
    opt = torch.optim.Adam(list(stem.parameters()) + list(head.parameters()), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    loss = None
    for _ in range(steps):
        x, y = _batch(tumour, normal, batch, g)
        opt.zero_grad()
        loss = F.cross_entropy(head(stem((x.float() - 128) / 64)), y)
        loss.backward()
        opt.step()
    sm = streamcnn.StreamingModule(stem, tile_size=128, mean=[128.0] * 3, std=[64.0] * 3)
    return sm, head, float(loss.detach())


def pointing_game(sm, head, seeds):
    """(hits, n, chance rate, per-slide rows) on tumour slides of the seeds."""
    from streamcnn import heatmaps as hm
    hits, chance, rows = 0, [], []
    for seed in seeds:
        img, tissue, boxes = _slide(seed, True)
        r = hm.cam(sm, head, img, target=1, upsample=False)
        m, cone = r.features[0], r.cone
        half = cone.stride[0] / 2

        def overlaps(cy, cx):
            return any(cx + half > b["box"][0] and cx - half < b["box"][2] and
                       cy + half > b["box"][1] and cy - half < b["box"][3] for b in boxes)
        k = int(m.flatten().argmax())
        i, j = divmod(k, m.shape[1])
        cy, cx = i * cone.stride[0] + cone.center[0], j * cone.stride[1] + cone.center[1]
        hit = overlaps(cy, cx)
        hits += hit
        tl = [(a, b) for a in (p * cone.stride[0] + cone.center[0] for p in range(m.shape[0]))
              for b in (q * cone.stride[1] + cone.center[1] for q in range(m.shape[1]))
              if tissue[min(SIZE - 1, max(0, int(a))), min(SIZE - 1, max(0, int(b)))]]
        chance.append(sum(overlaps(a, b) for a, b in tl) / max(1, len(tl)))
        rows.append((seed, hit, (cy, cx), float(r.logits.softmax(1)[0, 1])))
    return hits, len(seeds), sum(chance) / max(1, len(chance)), rows


def figure(sm, head, seed: int, path: str) -> None:
    """A small PNG: a held-out tumour slide with its true clusters (boxes),
    and the CAM of the tumour class over it with the max-pool winners."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from streamcnn import heatmaps as hm
    img, _, boxes = _slide(seed, True)
    r = hm.cam(sm, head, img, target=1)
    fig = Figure(figsize=(7.2, 3.4))
    FigureCanvasAgg(fig)
    rgb = img.permute(1, 2, 0).numpy()
    for k, title in enumerate(("synthetic slide, true clusters", "CAM (tumour) + max winners")):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(rgb)
        if k:
            im = ax.imshow(r.cam[0].numpy(), cmap="jet", alpha=0.5)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="class score")
            w = r.winners[0]
            idx = torch.nonzero(w > 0)
            c = r.cone
            ax.scatter((idx[:, 1] * c.stride[1] + c.center[1]).numpy(),
                       (idx[:, 0] * c.stride[0] + c.center[0]).numpy(),
                       s=(8 + 60 * w[w > 0] / w.max()).numpy(), facecolors="none",
                       edgecolors="white", linewidths=0.8)
        for b in boxes:
            x0, y0, x1, y1 = b["box"]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="lime", linewidth=1.0))
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=4, help="tumour (and normal) training slides")
    ap.add_argument("--eval", type=int, default=10, help="held-out tumour slides")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", default=None, help="write a PNG of the first held-out slide")
    a = ap.parse_args()
    t0 = time.perf_counter()
    sm, head, loss = train(a.train, a.steps, seed=a.seed)
    t1 = time.perf_counter()
    hits, n, chance, rows = pointing_game(sm, head, range(200, 200 + a.eval))
    print("| slide seed | hit | CAM top (y, x) | p(tumour) |")
    print("|---|---|---|---|")
    for seed, hit, (cy, cx), p in rows:
        print(f"| {seed} | {'yes' if hit else 'no'} | ({cy:.0f}, {cx:.0f}) | {p:.3f} |")
    print(f"hit rate {hits}/{n} = {hits / n:.2f}, chance {chance:.2f}; final training loss "
          f"{loss:.4f}; train {t1 - t0:.0f} s, maps {time.perf_counter() - t1:.0f} s")
    if a.figure:
        figure(sm, head, 200, a.figure)


if __name__ == "__main__":
    main()

"""Small synthetic slide sets for the application's tests, made fast: a pink
tissue disc with texture on white, label-1 slides with a few dark purple
"tumour" discs in the tissue; Aperio .svs (JPEG tiles, a pyramid, mpp 0.5)
written by the C writer, and ``path,label`` CSVs relative to the folder."""

import math
import os
from typing import Sequence

import torch

from streamcnn.data import synthetic


def slide_image(size: int, tumour: bool, seed: int, clusters: int = 4) -> torch.Tensor:
    """uint8 size x size x 3."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(size, dtype=torch.float32)[:, None]
    xx = torch.arange(size, dtype=torch.float32)[None, :]
    cy, cx = ((0.4 + 0.2 * torch.rand(2, generator=g)) * size).tolist()
    r = 0.3 * size
    tissue = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img = torch.full((size, size, 3), 255, dtype=torch.int16)
    tex = torch.randint(0, 30, (size, size), generator=g, dtype=torch.int16)
    pink = torch.stack([230 - tex, 150 - tex, 200 - tex // 2], dim=-1)
    img[tissue] = pink[tissue]
    if tumour:
        for _ in range(clusters):
            a, d = (torch.rand(2, generator=g) * torch.tensor([2 * math.pi, 0.7 * r])).tolist()
            y0, x0 = cy + d * math.sin(a), cx + d * math.cos(a)
            disc = (yy - y0) ** 2 + (xx - x0) ** 2 < (size / 40) ** 2
            img[disc & tissue] = torch.tensor([70, 25, 110], dtype=torch.int16)
    return img.clamp(0, 255).to(torch.uint8)


def write_set(folder, n_train: int = 8, n_val: int = 4, size: int = 512, seed: int = 0,
              val_labels: Sequence[int] = ()) -> None:
    """``folder/train.csv`` and ``folder/val.csv`` with alternating labels
    (``val_labels`` to choose the validation labels)."""
    os.makedirs(folder, exist_ok=True)
    for split, n, off in (("train", n_train, 0), ("val", n_val, 10_000)):
        labels = list(val_labels) if split == "val" and val_labels else [i % 2 for i in range(n)]
        rows = []
        for i, lab in enumerate(labels):
            name = f"{split}_{i}.svs"
            levels = synthetic.pyramid(slide_image(size, bool(lab), seed * 100_000 + off + i),
                                       min_size=128)
            synthetic.write_slide(os.path.join(folder, name), levels, tile=128,
                                  compression="jpeg",
                                  description=synthetic.aperio_description(size, size, 128, 0.5))
            rows.append(f"{name},{lab}")
        with open(os.path.join(folder, f"{split}.csv"), "w") as f:
            f.write("path,label\n" + "\n".join(rows) + "\n")

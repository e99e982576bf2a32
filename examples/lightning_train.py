#!/usr/bin/env python
"""A streamed slide classifier inside a plain PyTorch Lightning module.

The model is ``streamcnn.classifier.build_model`` (a torchvision backbone
whose stem runs tile by tile as a ``StreamingModule``, then a global max
pool and a linear layer); the LightningModule around it is ordinary:
automatic optimisation (``training_step`` returns the loss, Lightning calls
backward and the optimizer), no manual backward, and under DDP no
``find_unused_parameters``: the streamed stem's parameters receive their
gradients through autograd like any other layer's, every step.

    python examples/lightning_train.py DATA_DIR [--image-size 256] [--mpp 0.5]
        [--epochs 2] [--devices 1] [--strategy auto|ddp] [--fast-dev-run N]

``DATA_DIR`` holds ``train.csv`` and ``val.csv`` (``path,label``), e.g. from
``streamcnn synth DATA_DIR``; if it has none, a small synthetic set is made
there first. ``--strategy ddp --devices 2`` trains data-parallel on two CPU
processes (gloo) with ``DDPStrategy(find_unused_parameters=False)``.
"""

import argparse
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy

from streamcnn.classifier import build_model
from streamcnn.data import SlideDataset


class StreamingClassifier(L.LightningModule):
    """Cross-entropy on a ``build_model`` classifier; validation AUC
    (scikit-learn) at the end of each validation epoch."""

    def __init__(self, arch: str = "resnet18", stream_upto: str = "layer1",
                 tile_size: int = 256, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(arch, num_outputs=2, stream_upto=stream_upto,
                                 head="max", tile_size=tile_size)
        self._scores, self._labels = [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)                    # uint8 N x 3 x H x W -> N x 2

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss                             # automatic optimisation

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), batch_size=x.shape[0], sync_dist=True)
        self._scores.append(torch.softmax(logits, 1)[:, 1].detach())
        self._labels.append(y)

    def on_validation_epoch_end(self):
        scores = self.all_gather(torch.cat(self._scores)).flatten()
        labels = self.all_gather(torch.cat(self._labels)).flatten()
        self._scores, self._labels = [], []
        if labels.unique().numel() == 2:
            from sklearn.metrics import roc_auc_score
            self.log("val_auc", float(roc_auc_score(labels.cpu(), scores.cpu())),
                     prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def loaders(data_dir: str, image_size: int, mpp: float, workers: int = 0):
    """uint8 ``3 x S x S`` images and labels of ``train.csv`` / ``val.csv``:
    the tissue at ``mpp`` microns per pixel (the model normalises)."""
    read = dict(size=image_size, mpp=mpp, crop="tissue")
    train = SlideDataset(os.path.join(data_dir, "train.csv"), augment=True, seed=0, **read)
    val = SlideDataset(os.path.join(data_dir, "val.csv"), **read)
    dl = dict(batch_size=1, num_workers=workers)
    return (torch.utils.data.DataLoader(train, shuffle=True, **dl),
            torch.utils.data.DataLoader(val, **dl))


def ensure_data(data_dir: str, size: int) -> None:
    """A small synthetic set in ``data_dir`` unless it has ``train.csv``."""
    if os.path.exists(os.path.join(data_dir, "train.csv")):
        return
    from streamcnn.app import synth
    p = argparse.ArgumentParser()
    synth.add_arguments(p)
    synth.run(p.parse_args([data_dir, "--slides", "8", "--size", str(size), "--tumour-size",
                            "30", "--quiet"]))


def make_trainer(args) -> L.Trainer:
    strategy = (DDPStrategy(find_unused_parameters=False, process_group_backend="gloo")
                if args.strategy == "ddp" else "auto")
    return L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy,
                     max_epochs=args.epochs, fast_dev_run=args.fast_dev_run or False,
                     logger=False, enable_checkpointing=False, log_every_n_steps=1,
                     enable_progress_bar=not args.quiet, enable_model_summary=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stream-upto", default="layer1")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", choices=("auto", "ddp"), default="auto")
    p.add_argument("--fast-dev-run", type=int, default=0, metavar="N",
                   help="run N training and N validation steps only")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    ensure_data(args.data_dir, max(256, args.image_size))
    train, val = loaders(args.data_dir, args.image_size, args.mpp, args.workers)
    module = StreamingClassifier(args.arch, args.stream_upto, args.tile_size, args.lr)
    trainer = make_trainer(args)
    trainer.fit(module, train, val)
    if trainer.is_global_zero:
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        print(f"done: {trainer.global_step} steps, {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

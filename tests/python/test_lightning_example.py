"""examples/lightning_train.py: a StreamingModule (build_model) inside a plain
LightningModule with automatic optimisation trains for two steps; the
streamed stem learns, every parameter gets a gradient on every step (so
DDP needs no find_unused_parameters), and two-process DDP on CPU runs."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning", reason="lightning is a test requirement "
                        "(requirements-dev.txt); not installed here")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_train.py"


def _example():
    spec = importlib.util.spec_from_file_location("lightning_train", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from streamcnn.app import synth
    out = tmp_path_factory.mktemp("lightning") / "set"
    p = argparse.ArgumentParser()
    synth.add_arguments(p)
    synth.run(p.parse_args([str(out), "--slides", "6", "--size", "256", "--tumour-size", "30",
                            "--quiet"]))
    return out


class GradCheck(L.pytorch.Callback):
    """Names of the parameters without a gradient after each backward."""

    def __init__(self):
        self.missing = []
        self.steps = 0

    def on_after_backward(self, trainer, module):
        self.steps += 1
        self.missing += [n for n, p in module.named_parameters()
                         if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


def test_fast_dev_run_trains_the_streamed_stem(data):
    ex = _example()
    L.seed_everything(0, verbose=False)
    train, val = ex.loaders(str(data), 256, 0.5)
    module = ex.StreamingClassifier("resnet18", "layer1", tile_size=128)
    assert module.model.stem.tile_size == [128, 128]          # streamed, 4 tiles per image
    assert module.automatic_optimization
    before = {n: p.detach().clone() for n, p in module.model.stem.named_parameters()}
    check = GradCheck()
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[check])
    trainer.fit(module, train, val)
    assert trainer.global_step == 2 and check.steps == 2
    assert check.missing == []            # nothing unused: DDP's default is enough
    after = dict(module.model.stem.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert "module.conv1.weight" in changed or any("conv1" in n for n in changed)
    assert len(changed) == len(before), sorted(set(before) - set(changed))


def test_two_process_ddp_without_find_unused_parameters(data, tmp_path):
    """Lightning's DDPStrategy(find_unused_parameters=False) on two CPU
    processes (gloo): two steps per rank (4 training slides), so the
    reducer's check for parameters without a gradient runs; no error."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(EXAMPLE), str(data), "--strategy", "ddp",
                        "--devices", "2", "--fast-dev-run", "2", "--tile-size", "128",
                        "--quiet"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 2 steps" in r.stdout
    assert "find_unused_parameters" not in r.stderr

"""The console's progress lines: a training loss summed over each batch (the speedrun recipe's) is
shown per sample, beside a validation loss that is a mean; a mean loss as it is."""

from __future__ import annotations

import json
import re

import pytest
import torch

from minitrain.commands.cli import main

SUMMED = "class_names=CIFAR10_CLASSES, loss_fn=nn.CrossEntropyLoss(reduction='sum'))"


def run(recipe, run_dir, capsys, *args):
    """The recipe through `minitrain run`, its console lines (plain: not a terminal) and its log."""
    assert main(["run", str(recipe), "--set", "epochs=1", "--run-dir", str(run_dir), *args]) == 0
    out = capsys.readouterr().out
    shown = [float(x) for x in re.findall(r"^  epoch 1 step \d+/5 loss ([0-9.]+) ", out, re.M)]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    logged = [(e["loss"], e["batch_size"]) for e in events if e["event"] == "BatchEnd"]
    metrics = next(e["metrics"] for e in events if e["event"] == "EpochEnd")
    return out, shown, logged, metrics


def test_a_summed_loss_is_shown_per_sample(recipe, tmp_path, capsys):
    """The issue: `loss 2266.7` on the console for a loss summed over batches of 1024."""
    summed = recipe.with_name("summed_recipe.py")
    summed.write_text(recipe.read_text().replace("class_names=CIFAR10_CLASSES)", SUMMED))
    out, shown, logged, metrics = run(summed, tmp_path / "run", capsys, "--set", "lr=0.0125")  # (0.2 / 16)
    assert "loss: the recipe's loss is summed over each batch; shown per sample" in out
    assert len(shown) == 5 and shown == pytest.approx([loss / n for loss, n in logged], abs=1e-4)
    assert logged[0][0] > 16  # what the optimizer got: the sums (16 × 2.3 at first)
    epoch = re.search(r"^epoch 1/1: train_loss ([0-9.]+), val_loss ([0-9.]+)", out, re.M)
    assert float(epoch.group(1)) == pytest.approx(metrics["train_loss"] / 16, abs=1e-4)
    assert float(epoch.group(1)) < 3 and float(epoch.group(2)) < 3  # on one scale
    done = re.search(r"^done: 1 epochs, 5 steps; train_loss=([0-9.]+)", out, re.M)  # the last line too
    assert float(done.group(1)) == pytest.approx(metrics["train_loss"] / 16, rel=1e-3)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["loss_reduction"] == "sum"  # for its readers


def test_a_mean_loss_is_shown_as_it_is(recipe, tmp_path, capsys):
    out, shown, logged, metrics = run(recipe, tmp_path / "run", capsys)
    assert "summed" not in out
    assert shown == pytest.approx([loss for loss, _ in logged], abs=1e-4)
    epoch = re.search(r"^epoch 1/1: train_loss ([0-9.]+)", out, re.M)
    assert float(epoch.group(1)) == pytest.approx(metrics["train_loss"], abs=1e-4)


def test_on_accelerators_the_previous_loss_is_divided_by_its_own_batch_size(monkeypatch):
    """On a device the loss shown is the one asked for at the previous refresh: it is divided by
    that batch's size, not the current one's (an epoch's last batch may be smaller)."""
    import minitrain_plugins.console as console

    class Copy:  # stands in for the background device-to-host copy: it holds the tensor's length
        def __init__(self, tensor):
            self.value = tensor.shape[0]

        def ready(self):
            return True

        def get(self):
            return torch.tensor(float(self.value))

    monkeypatch.setattr(console, "HostCopy", Copy)
    plugin = console.Console(console.Console.Config())
    assert plugin._read("loss", torch.empty(64, device="meta"), 16) == "-"  # nothing asked for before
    assert plugin._read("loss", torch.empty(30, device="meta"), 10) == "4.0000"  # 64 / 16
    assert plugin._read("loss", torch.empty(5, device="meta")) == "3.0000"  # 30 / 10

"""Validation metrics are the recipe's: a regression recipe with a DataLoader of its own trains,
validates and reports its own torchmetrics through every plugin that reads metrics; a classifier
keeps accuracy and the confusion matrix by default; val_loss is the recipe's loss."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minitrain import Trainer
from minitrain.commands.cli import main
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import checkpointing
from minitrain.engine.errors import MinitrainError
from minitrain.engine.metrics import Validation, collection

FIRST_PARTY_PLUGINS = {"console", "jsonl", "csv", "checkpoint", "early_stopping", "viz", "tensorboard"}

REGRESSION = '''
"""Predict each image's mean brightness: a regression with a DataLoader and metrics of its own."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanAbsoluteError, R2Score

import minitrain


class Config(minitrain.RecipeConfig):
    epochs: int = 4
    batch_size: int = 16
    lr: float = 0.005
    device: str = "cpu"


def data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 1, 1, generator=generator) + 0.1 * torch.rand(n, 3, 8, 8, generator=generator)
    return TensorDataset(images, images.mean((1, 2, 3)).unsqueeze(1) * 10)


def build(config, device):
    train = DataLoader(data(96, 0), batch_size=config.batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(config.seed))
    val = DataLoader(data(40, 1), batch_size=32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=val,
                                loss_fn=nn.functional.mse_loss,
                                metrics={"mae": MeanAbsoluteError(), "r2": R2Score()})
'''


@pytest.fixture
def regression(write_recipe):
    return write_recipe(REGRESSION, "regression.py")


def test_a_regression_recipe_runs_end_to_end_with_its_own_metrics(regression, tmp_path):
    run = tmp_path / "run"
    trainer = prepare(
        RunRequest(
            regression,
            [],
            ["checkpoint:monitor=val_r2", "early_stopping:monitor=val_mae,patience=5", "csv", "viz", "tensorboard"],
            ["console"],
            run,
        )
    )
    assert trainer.metric_names()[-3:] == ["val_loss", "val_mae", "val_r2"]
    metrics = trainer.fit()
    assert {"val_loss", "val_mae", "val_r2"} <= set(metrics) and "val_acc" not in metrics
    assert metrics["val_r2"] > 0.5  # it learned the brightness

    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["event"] == "ValidationEnd"]
    assert len(ends) == 4 and all(e["confusion"] is None for e in ends)  # not a classifier: no matrix
    with open(run / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [float(r["val_mae"]) for r in rows] == [e["metrics"]["val_mae"] for e in ends]
    best = checkpointing.load(run / "checkpoints" / "best.pt")["header"]
    assert best["monitor"] == "val_r2" and best["metric"] == max(
        e["metrics"]["val_r2"] for e in ends
    )  # higher is better
    plots = {p.name for p in (run / "plots").iterdir()}
    assert plots == {"loss.png", "metrics.png", "lr.png"}  # no accuracy, confusion or image grid
    assert len(list((run / "tensorboard").iterdir())) == 1


def test_val_loss_is_the_recipe_loss_averaged_over_samples(regression, tmp_path):
    trainer = prepare(RunRequest(regression, ["epochs=1"], [], ["console"], tmp_path / "run"))
    trainer.fit()
    model = trainer.module.eval()
    with torch.no_grad():
        squared = [F.mse_loss(model(x), y, reduction="sum") for x, y in trainer.val_loader]
    assert trainer.state.metrics["val_loss"] == pytest.approx(float(sum(squared)) / 40, rel=1e-6)


def test_a_summed_loss_is_averaged_per_sample_too():
    validation = Validation(None, nn.MSELoss(reduction="sum"), classifier=False)
    validation.update(torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1))
    validation.update(torch.tensor([[2.0]]), torch.zeros(1, 1))
    assert validation.results() == ({"val_loss": pytest.approx((1 + 9 + 4) / 3)}, None)


def test_a_classifier_gets_accuracy_and_the_confusion_matrix_by_default():
    validation = Validation(None, F.cross_entropy, classifier=True, classes=3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    validation.update(logits, torch.tensor([0, 1, 1, 0]))
    metrics, confusion = validation.results()
    assert metrics["val_acc"] == 0.75 and confusion == [[2, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert validation.names() == ["val_loss", "val_acc"] and validation.mode("val_acc") == "max"


def test_vector_metrics_become_one_metric_per_element():
    from torchmetrics.classification import MulticlassAccuracy

    validation = Validation(collection({"acc": MulticlassAccuracy(2, average=None)}), F.cross_entropy, True)
    validation.update(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]]), torch.tensor([0, 1, 1]))
    metrics, confusion = validation.results()
    assert (metrics["val_acc_0"], metrics["val_acc_1"]) == (1.0, 0.5) and confusion is None


def test_metrics_of_the_wrong_kind_are_refused():
    with pytest.raises(MinitrainError, match="metrics must be a torchmetrics Metric"):
        collection(["accuracy"])


def test_a_monitor_the_regression_never_reports_is_refused_naming_what_it_does(regression, tmp_path, capsys):
    assert (
        main(["run", str(regression), "--plugin", "checkpoint:monitor=val_acc", "--run-dir", str(tmp_path / "r")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        "minitrain: error: checkpoint: monitor 'val_acc' is not a metric this run reports (it reports "
        "train_loss, lr, epoch_time, samples_per_s, val_loss, val_mae, val_r2)"
    )
    assert not (tmp_path / "r").exists()


def test_a_trainer_built_by_hand_validates_a_classifier(fake_cifar):
    from minitrain.kit.data import cifar10_loaders

    train, test = cifar10_loaders(fake_cifar, 16, crop=0, flip="none")
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), train, test, epochs=1, plugins=[])
    metrics = trainer.fit()
    assert metrics["val_acc"] * 32 == round(metrics["val_acc"] * 32)  # a fraction of the 32 test images


@pytest.mark.parametrize("which", ["classifier", "regression"])
def test_under_torchrun_every_rank_reports_the_whole_validation_set(which, recipe, regression, tmp_path):
    """Two processes validate a shard each; the figures every plugin sees are those of the whole
    validation set, as one process computes them: accuracy and confusion counts exactly, the
    recipe's own metrics (MAE, R2) and val_loss up to the order of the sums. The learning rate is
    too small to move a float32 weight, so both runs validate the same model."""
    import os
    import subprocess
    import sys

    from minitrain.engine import distributed

    path = recipe if which == "classifier" else regression
    args = ["run", str(path), "--set", "epochs=1", "--set", "lr=1e-30", "--no-plugin", "console"]
    assert main([*args, "--run-dir", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_ENV} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "minitrain", *args, "--nproc", "2", "--run-dir", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    def validation(run):
        return next(
            json.loads(line)
            for line in (tmp_path / run / "events.jsonl").read_text().splitlines()
            if '"ValidationEnd"' in line
        )

    one, two = validation("one"), validation("two")
    assert one["metrics"].keys() == two["metrics"].keys()
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == (value if name == "val_acc" else pytest.approx(value, rel=1e-5)), name
    assert two["confusion"] == one["confusion"]
    if which == "classifier":
        assert sum(map(sum, two["confusion"])) == 32  # every test image, counted once over the two ranks

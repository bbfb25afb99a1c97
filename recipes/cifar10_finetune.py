"""Fine-tuning: pre-train on five CIFAR-10 classes, then fine-tune on all ten from little data,
and compare with training from scratch for the same number of steps.

The network is the quick recipe's (``minitrain.kit.nets.ConvNet``: frozen patch whitening, three
conv blocks, a linear ``head``); ``classes`` keeps the first N classes of the training and test
sets, ``train_size`` the first N training images of those. The pre-trained head has five
outputs and the new one ten, so ``--init-skip-mismatched`` starts the head afresh.

    python recipes/cifar10_finetune.py     # the three runs below and the comparison

is the same as::

    minitrain run recipes/cifar10_finetune.py --set classes=5 --set epochs=4 --plugin checkpoint \\
        --run-dir runs/finetune/pretrain
    minitrain run recipes/cifar10_finetune.py --set train_size=5000 --run-dir runs/finetune/finetune \\
        --init-from runs/finetune/pretrain/checkpoints/last.pt --init-skip-mismatched
    minitrain run recipes/cifar10_finetune.py --set train_size=5000 --run-dir runs/finetune/scratch

Add ``--set freeze=whiten,blocks.0`` to the fine-tuning run to keep the first layers as
pre-trained.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

import minitrain
from minitrain.kit.data import CIFAR10_CLASSES, ImageLoader, load_cifar10
from minitrain.kit.nets import ConvNet
from minitrain.kit.schedules import triangular


class Config(minitrain.RecipeConfig):
    epochs: int = 2
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    widths: tuple[int, int, int] = (32, 64, 128)
    classes: int = Field(10, ge=2, le=10, description="train and evaluate on the first N classes")
    train_size: int | None = Field(None, ge=1, description="train on the first N images of those classes")

    @field_validator("widths", mode="before")
    @classmethod
    def _widths_from_text(cls, value):  # `--set widths=8,16,16`
        return value.strip("[]() ").split(",") if isinstance(value, str) else value


PLUGINS = ["amp:dtype=bf16"]


def build_model(config: Config) -> ConvNet:
    """The network alone: what ``minitrain export`` rebuilds before loading a checkpoint."""
    return ConvNet(config.widths, classes=config.classes)


def build(config: Config, device: torch.device) -> minitrain.Components:
    images, labels = _first_classes(*load_cifar10(config.data_dir, train=True), config.classes)
    images, labels = images[: config.train_size], labels[: config.train_size]
    train = ImageLoader(
        images, labels, config.batch_size, device=device, shuffle=True, crop=4, flip="random", seed=config.seed
    )
    test = ImageLoader(
        *_first_classes(*load_cifar10(config.data_dir, train=False), config.classes), 1000, device=device
    )
    model = build_model(config)
    model.whiten.init_from(train.normalize(train.images[:5000]))
    optimizer = torch.optim.SGD(
        model.trainable_parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    return minitrain.Components(
        model=model,
        optimizer=optimizer,
        train_loader=train,
        val_loader=test,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        eval_loss_fn=F.cross_entropy,
        make_scheduler=lambda steps: triangular(optimizer, total_steps=steps.total, warmup=0.2),
        scheduler_interval="step",
        class_names=CIFAR10_CLASSES[: config.classes],
    )


def _first_classes(images: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = labels < classes
    return images[keep], labels[keep]


def compare(
    root: str | Path | None = None,
    pretrain_epochs: int = 4,
    epochs: int = 2,
    train_size: int = 5000,
    overrides: list[str] = (),
) -> dict[str, float]:
    """Pre-train, fine-tune and train from scratch (the commands in this file's docstring);
    print and return both final accuracies and the gain."""
    from minitrain.commands.start import RunRequest, prepare

    root = Path(root or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}")  # new each time: run dirs hold one run
    recipe = Path(__file__)
    prepare(
        RunRequest(
            recipe, [*overrides, "classes=5", f"epochs={pretrain_epochs}"], ["checkpoint"], run_dir=root / "pretrain"
        )
    ).fit()
    task = [*overrides, f"train_size={train_size}", f"epochs={epochs}"]
    tuned = prepare(
        RunRequest(
            recipe,
            task,
            run_dir=root / "finetune",
            init_from=root / "pretrain" / "checkpoints" / "last.pt",
            init_skip_mismatched=True,
        )
    ).fit()
    scratch = prepare(RunRequest(recipe, task, run_dir=root / "scratch")).fit()
    result = {"finetune": tuned["val_acc"], "scratch": scratch["val_acc"]}
    result["gain"] = result["finetune"] - result["scratch"]
    print(
        f"10-class test accuracy after {epochs} epochs on {train_size} images: fine-tuned {result['finetune']:.4f}, "
        f"from scratch {result['scratch']:.4f}, gain {result['gain']:+.4f}"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="pre-train on 5 classes, fine-tune on 10, compare with scratch")
    parser.add_argument("--root", help="a new folder for the three run directories (default runs/finetune-<time>)")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of fine-tuning, and of training from scratch")
    parser.add_argument("--train-size", type=int, default=5000, help="training images of the 10-class task")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for all three runs (e.g. widths=16,32,64); repeatable",
    )
    args = parser.parse_args()
    try:
        compare(args.root, args.pretrain_epochs, args.epochs, args.train_size, args.overrides)
    except minitrain.MinitrainError as exc:
        sys.exit(f"error: {exc}")

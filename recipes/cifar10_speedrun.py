"""CIFAR-10 to 94% in a few seconds on one GPU: the recipe of the fastest known training scripts
(the airbench94 family, Jordan 2024, arXiv 2404.00498), run through minitrain's loop, events and
plugins.

The data set lives on the device, normalised once, in bf16 and channels-last, and the model
computes in bf16 (the ``amp`` plugin, mode pure: BatchNorm stays fp32); each batch is translated by
up to 2 pixels (reflect padding) and flipped, the flips alternating
between epochs. The net (``minitrain.kit.nets.ConvNet``, ~2M parameters) starts with a frozen 2×2
patch-whitening conv built from the training images, whose bias trains for the first
``whiten_bias_epochs`` only. Nesterov SGD at batch 1024 on a summed, label-smoothed loss, with
a 64× larger learning rate for BatchNorm biases (with the same decay per step), under a
triangular schedule; lookahead averaging of the weights every 5 steps; test-time augmentation
with flips and 1-pixel translations, evaluated once, after the last epoch. ``lr`` and
``weight_decay`` are in airbench's units: normalised per 1024 samples and by the momentum's
effective step count (see :func:`make_optimizer`). Epochs are whole: 10 (480 steps) where the
reference scripts stop at 9.9.

What is not model or optimizer is a reusable piece: the resident loader (``minitrain.kit.data``),
the whitening layer (``minitrain.kit.nets``), bf16 (``amp``), ``lookahead``, ``tta`` and the
evaluation schedule (``validation``) are plugins; only the whitening-bias switch is this file's
own plugin. ``torch.compile`` is the ``compile`` plugin.

    minitrain run recipes/cifar10_speedrun.py
    minitrain run recipes/cifar10_speedrun.py --plugin compile --set muon=true   # muon: untuned
    python benchmarks/speedrun.py --data-dir DIR     # timed, against a bare loop, on a GPU

On a CPU it runs too (slowly); ``data_dtype=auto`` then keeps the inputs fp32.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import minitrain
from minitrain.kit.data import CIFAR10_CLASSES, ImageLoader, load_cifar10
from minitrain.kit.muon import Muon
from minitrain.kit.nets import ConvNet
from minitrain.kit.schedules import triangular

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Config(minitrain.RecipeConfig):
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 11.5
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0  # BatchNorm biases: lr × this (torch's weight_decay ÷ this)
    label_smoothing: float = 0.2
    whiten_bias_epochs: int = 3
    translate: int = 2  # pixels, reflect-padded
    widths: tuple[int, int, int] = (64, 256, 256)
    bn_momentum: float = 0.4  # torch convention: weight of the new batch's statistics
    logit_scale: float = 1 / 9
    eval_batch_size: int = 2000
    data_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on cuda, else fp32
    muon: bool = False  # Muon for the conv filters instead of SGD
    muon_lr: float = 0.24
    muon_momentum: float = 0.6


class SpeedrunHooks:
    """This recipe's own plugin: the whitening bias trainable in the first ``whiten_bias_epochs``
    only. It reads the run's config from the trainer, so one instance serves every run."""

    name = "speedrun"
    role = "critical"  # it changes training: a failure must stop the run

    @minitrain.hookimpl
    def on_epoch_start(self, event, trainer) -> None:
        trainer.module.whiten.bias.requires_grad_(event.epoch <= trainer.config["whiten_bias_epochs"])


PLUGINS = [
    "amp:dtype=bf16,mode=pure",
    "lookahead:every=5,decay=0.95,ramp=3",
    "tta:flip=true,translate=1",
    "validation:every=0",
    SpeedrunHooks(),
]


def build(config: Config, device: torch.device) -> minitrain.Components:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    train, test = make_loaders(
        config, device, load_cifar10(config.data_dir, train=True), load_cifar10(config.data_dir, train=False)
    )
    return make_training(config, device, make_model(config, device), train, test)


def make_loaders(config: Config, device: torch.device, train_data, test_data) -> tuple[ImageLoader, ImageLoader]:
    """Device-resident loaders over ``(uint8 images, labels)`` pairs, normalised once."""
    dtype = DTYPES.get(config.data_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    common = dict(device=device, resident=True, normalize_once=True, dtype=dtype, channels_last=True)
    train = ImageLoader(
        *train_data,
        config.batch_size,
        shuffle=True,
        drop_last=True,
        crop=config.translate,
        pad_mode="reflect",
        flip="alternate",
        seed=config.seed,
        **common,
    )
    test = ImageLoader(*test_data, config.eval_batch_size, **common)
    return train, test


def build_model(config: Config) -> ConvNet:
    """The net before it has seen data (the whitening comes in :func:`make_training`); also what
    ``minitrain export`` rebuilds."""
    return ConvNet(config.widths, bn_momentum=config.bn_momentum, logit_scale=config.logit_scale)


def make_model(config: Config, device: torch.device) -> ConvNet:
    return build_model(config).to(device, memory_format=torch.channels_last)


def make_training(
    config: Config, device: torch.device, model: ConvNet, train: ImageLoader, test: ImageLoader
) -> minitrain.Components:
    """Whitening from the training images, optimizer and schedule: the start of a run."""
    model.whiten.init_from(train.normalize(train.images[:5000]))
    optimizer = make_optimizer(config, model, device)
    return minitrain.Components(
        model=model,
        optimizer=optimizer,
        train_loader=train,
        val_loader=test,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing, reduction="sum"),
        eval_loss_fn=F.cross_entropy,
        make_scheduler=lambda steps: triangular(optimizer, steps.total, warmup=0.2, start=0.2, end=0.07),
        scheduler_interval="step",
        class_names=CIFAR10_CLASSES,
    )


def make_optimizer(config: Config, model: ConvNet, device: torch.device) -> torch.optim.Optimizer:
    """Nesterov SGD (or Muon for the filters). With a summed loss the gradient grows with the
    batch, and momentum multiplies each step by 1/(1-momentum): lr is divided by both (per 1024
    samples). Weight decay is a fraction per step, the same for every group; torch multiplies it
    by each group's lr, so it is handed over divided by that lr."""
    kilostep_scale = 1024 * (1 + 1 / (1 - config.momentum))
    lr = config.lr / kilostep_scale
    wd = config.weight_decay * config.batch_size / kilostep_scale
    bias_lr = lr * config.bias_scaler
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in model.trainable_parameters() if all(p is not b for b in bn_biases)]
    biases = dict(params=bn_biases, lr=bias_lr, weight_decay=wd / bias_lr)
    if not config.muon:
        return torch.optim.SGD(
            [biases, dict(params=others, lr=lr, weight_decay=wd / lr)],
            momentum=config.momentum,
            nesterov=True,
            fused=device.type == "cuda",
        )
    filters = [p for p in others if p.ndim == 4]
    rest = [p for p in others if p.ndim != 4]
    return Muon(
        [
            dict(
                params=filters,
                lr=config.muon_lr,
                momentum=config.muon_momentum,
                weight_decay=0.0,
                orthogonalize=True,
                normalize=True,
            ),
            biases,
            dict(params=rest, lr=lr, weight_decay=wd / lr),
        ],
        lr=lr,
        momentum=config.momentum,
    )

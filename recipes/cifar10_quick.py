"""The default recipe: a small, fast CIFAR-10 network that reaches >80% test accuracy on a
2-core CPU in under ten minutes (see README for measured figures).

The ingredients are those of the fast CIFAR-10 scripts, at a width a CPU can afford: a frozen
2×2 patch-whitening first layer, three conv-pool-BN-GELU blocks, scaled-down logits, label
smoothing, Nesterov SGD with a triangular learning-rate schedule, random crops and flips,
channels-last bf16 compute (the ``amp`` plugin) and flip test-time augmentation.

    minitrain run recipes/cifar10_quick.py --set epochs=4 --set widths=[32,64,128]
    minitrain sweep recipes/cifar10_quick.py --trials 12 --workers 2 --set epochs=2   # searches SPACE
"""

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

import minitrain
from minitrain.kit.data import CIFAR10_CLASSES, cifar10_loaders
from minitrain.kit.nets import ConvNet
from minitrain.kit.schedules import triangular


class Config(minitrain.RecipeConfig):
    epochs: int = 8
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    widths: tuple[int, int, int] = (32, 64, 128)
    warmup: float = Field(0.2, gt=0, le=1, description="fraction of steps spent warming up the learning rate")
    channels_last: bool = True

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, widths):
        if min(widths) < 1:
            raise ValueError("every width must be at least 1")
        return widths


PLUGINS = ["amp:dtype=bf16", "tta"]

# What `minitrain sweep recipes/cifar10_quick.py --trials N` searches unless --space says otherwise.
SPACE = {"lr": "float:0.05:0.8:log", "weight_decay": "float:5e-5:5e-3:log"}


def build_model(config: Config) -> ConvNet:
    """The network alone, before it has seen data: what ``minitrain export`` rebuilds."""
    model = ConvNet(config.widths)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def build(config: Config, device: torch.device) -> minitrain.Components:
    train, test = cifar10_loaders(
        config.data_dir,
        config.batch_size,
        device=device,
        seed=config.seed,
        crop=4,
        flip="random",
        eval_batch_size=1000,
        channels_last=config.channels_last,
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
        # sized by the trainer from the steps the run makes (limits, max_steps, accumulate counted)
        make_scheduler=lambda steps: triangular(optimizer, total_steps=steps.total, warmup=config.warmup),
        scheduler_interval="step",
        class_names=CIFAR10_CLASSES,
    )

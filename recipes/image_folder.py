"""Train a classifier on your own images: a folder with one sub-folder of images per class
(torchvision's ImageFolder layout), or train/ and val/ (and test/) folders each in that layout.

    minitrain run recipes/image_folder.py --set data_dir=PATH
    minitrain run recipes/image_folder.py --set data_dir=PATH --set arch=resnet18 --set image_size=160

Without a val/ folder, ``val_fraction`` of each class is held out (chosen by ``seed`` and the
file names); the run directory's ``split.csv`` records which file went where. Class names are
the folder names. What the recipe decides from the data (``classes``, ``image_size``, ``crop``)
it writes into the run's config, so a resume and ``minitrain export`` build the same model.

Models: ``arch=convnet`` is the CIFAR-10 quick recipe's network (minitrain.kit.nets.ConvNet),
any other name a torchvision classifier, untrained, or with ``pretrained=true`` from its weights
in the local torch hub cache (never downloaded). docs/your-images.md has every field and what
happens to each kind of bad file.
"""

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import minitrain
from minitrain.engine.errors import MinitrainError
from minitrain.kit import architectures
from minitrain.kit.folder import scan
from minitrain.kit.folder_loader import Augment, FolderLoader
from minitrain.kit.nets import ConvNet
from minitrain.kit.schedules import triangular

SMALL = 64
"""Images whose median short side is at most this are 'small' (CIFAR-like): trained at their own
size with padded random crops; larger ones are 'photos': 224 pixels, random resized crops."""
WHITEN_SAMPLE = 1000
"""Training images the ConvNet's whitening layer is fitted to."""


class Config(minitrain.RecipeConfig):
    data_dir: Path | None = Field(None, description="the images: CLASS/IMAGE, or train/CLASS/IMAGE and val/...")  # type: ignore[assignment]
    epochs: int = 8
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    warmup: float = Field(0.2, gt=0, le=1, description="fraction of steps spent warming up the learning rate")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of each class held out where there is no val/")
    classes: list[str] | None = Field(None, description="class folders to train on, in label order; unset: all, sorted")
    image_size: int | None = Field(None, ge=8, description="side of the square the model sees; unset: from the data")
    resize: Literal["stretch", "crop"] = Field(
        "stretch", description="fit an image to the size: stretch it, or scale its short side and cut the centre"
    )
    crop: Literal["auto", "pad", "resized", "none"] = Field(
        "auto", description="training crop: pad (translate by `pad` pixels), resized (random resized crop), none"
    )
    pad: int = Field(4, ge=0)
    scale: tuple[float, float] = Field((0.25, 1.0), description="area range of a random resized crop")
    flip: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    arch: str = Field("convnet", description="convnet, or a torchvision classifier's name (resnet18, ...)")
    widths: tuple[int, int, int] = (32, 64, 128)
    pretrained: bool = Field(False, description="torchvision's weights from the local torch hub cache")
    num_workers: int | None = Field(None, ge=0, description="decoding processes per loader; unset: half the CPUs")
    eval_batch_size: int = Field(500, ge=1)
    channels_last: bool = True

    changeable_on_resume = minitrain.RecipeConfig.changeable_on_resume | {"num_workers", "eval_batch_size"}


PLUGINS = ["amp:dtype=bf16", "tta"]
SPACE = {"lr": "float:0.05:0.8:log", "weight_decay": "float:5e-5:5e-3:log"}


def build_model(config: Config) -> nn.Module:
    """The network alone (``minitrain export``): for the classes the run recorded."""
    if config.classes is None:
        raise MinitrainError("build_model needs config.classes, which build() records")
    if config.arch == "convnet":
        model: nn.Module = ConvNet(config.widths, classes=len(config.classes))
    else:
        model = architectures.build(config.arch, len(config.classes))
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def build(config: Config, device: torch.device) -> minitrain.Components:
    if config.data_dir is None:
        raise MinitrainError("image_folder needs the folder of images: --set data_dir=PATH")
    if config.pretrained and config.arch == "convnet":
        raise MinitrainError("pretrained=true needs a torchvision arch (arch=resnet18, ...); convnet has no weights")
    weights = architectures.cached_weights(config.arch) if config.pretrained else None
    folder = scan(config.data_dir, config.val_fraction, config.seed, config.classes)
    sides = sorted(item.side for item in folder.splits["train"])
    small = sides[len(sides) // 2] <= SMALL
    config.classes = folder.classes  # what the data decided, recorded in config.json
    config.image_size = config.image_size or (sides[len(sides) // 2] if small else 224)
    if config.crop == "auto":
        config.crop = "pad" if small else "resized"
    common = dict(
        size=config.image_size,
        resize=config.resize,
        seed=config.seed,
        device=device,
        num_workers=config.num_workers,
        mean=config.mean,
        std=config.std,
        channels_last=config.channels_last,
    )
    augment = Augment(config.crop, config.pad, config.scale, config.flip)
    train = FolderLoader(folder, "train", config.batch_size, augment=augment, **common)
    val = FolderLoader(folder, "val", config.eval_batch_size, **common) if folder.splits["val"] else None
    model = build_model(config)
    if isinstance(model, ConvNet):
        model.whiten.init_from(train.normalize(train.sample(WHITEN_SAMPLE, config.seed)))
    elif weights is not None:
        new = architectures.load_pretrained(model, weights)
        print(f"pretrained: {config.arch}'s weights loaded, but for {', '.join(new) or 'none'} (new)")
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    return minitrain.Components(
        model=model,
        optimizer=optimizer,
        train_loader=train,
        val_loader=val,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        eval_loss_fn=F.cross_entropy,
        make_scheduler=lambda steps: triangular(optimizer, total_steps=steps.total, warmup=config.warmup),
        scheduler_interval="step",
        class_names=folder.classes,
        files={"split.csv": folder.record()},
        head=architectures.head_name(model),  # made anew by --init-from a run with other classes
    )

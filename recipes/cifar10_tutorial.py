"""The textbook CIFAR-10 tutorial network, done correctly: two conv+pool stages, three fully
connected layers, cross-entropy, Adam at lr 1e-3; inputs normalised with the data set's own
mean and std, shuffled every epoch, and evaluated on the test set after every epoch.

    minitrain run recipes/cifar10_tutorial.py --set epochs=5
"""

import torch
from torch import nn

import minitrain
from minitrain.kit.data import CIFAR10_CLASSES, cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    augment: bool = False  # the tutorial trains on the images as they are


class TutorialNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(config: Config) -> TutorialNet:
    """The network alone: what ``minitrain export`` rebuilds."""
    return TutorialNet()


def build(config: Config, device: torch.device) -> minitrain.Components:
    train, test = cifar10_loaders(
        config.data_dir,
        config.batch_size,
        device=device,
        seed=config.seed,
        crop=4 if config.augment else 0,
        flip="random" if config.augment else "none",
        eval_batch_size=500,
    )
    model = build_model(config)
    return minitrain.Components(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=config.lr),
        train_loader=train,
        val_loader=test,
        class_names=CIFAR10_CLASSES,
    )

"""Helpers for testing recipes and plugins offline: a tiny CIFAR-10 in the real on-disk format,
and a way to run ``minitrain`` in a child process that a test can kill."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np

from minitrain.engine.hookspecs import hookimpl
from minitrain.kit.data import CIFAR10_CLASSES, CIFAR10_FOLDER


def make_fake_cifar10(root: str | Path, train_per_batch: int = 20, test_size: int = 40, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` with five training batches, a test batch and
    ``batches.meta`` in torchvision's pickled layout. Each class has its own colour and stripe
    pattern plus noise, so a small model can learn it in a few steps. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(30, 226, size=(10, 3))

    def batch(n: int, label: str) -> dict:
        labels = rng.integers(0, 10, size=n)
        images = np.empty((n, 3, 32, 32), dtype=np.int16)
        stripes = np.arange(32)
        for i, y in enumerate(labels):
            pattern = ((stripes // (y + 2)) % 2 * 40)[None, :, None]
            images[i] = colours[y][:, None, None] + pattern + rng.integers(-25, 26, size=(3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {
            "batch_label": label,
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"fake_{label}_{i}.png" for i in range(n)],
        }

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(train_per_batch, f"training batch {i} of 5")))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test_size, "testing batch 1 of 1")))
    meta = {"num_cases_per_batch": train_per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return Path(root)


def cli_in_child(argv: list[str], log: str | Path) -> None:
    """``minitrain ARGV`` as the body of a child process (``multiprocessing.Process(target=...)``),
    its output appended to ``log``, exiting with the command's status. Crash tests run it from a
    forkserver that has torch and minitrain imported already, so a child starts in milliseconds
    rather than the seconds a fresh interpreter needs, and is a real process a SIGKILL ends."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from minitrain.commands.cli import main

    sys.exit(main(list(argv)))


class EpochLog:
    """A plugin that keeps every epoch's metrics, for tests that compare runs."""

    name = "epoch_log"

    def __init__(self):
        self.metrics: list[dict[str, float]] = []

    @hookimpl
    def on_epoch_end(self, event) -> None:
        self.metrics.append(event.metrics)


class Interrupt:
    """A plugin that presses Ctrl-C as the batch after ``step`` optimizer steps starts: a run
    stopped mid-epoch, to resume."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def on_batch_start(self, event) -> None:
        if event.global_step == self.step:
            raise KeyboardInterrupt

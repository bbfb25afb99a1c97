"""The image-folder recipe against the CIFAR-10 quick recipe, on the same images.

Writes CIFAR-10 (read from its pickled batches by ``minitrain.kit.data.load_cifar10``) as 60,000
PNG files in the folder layout, ``train/CLASS/`` and ``val/CLASS/`` (the test set), then trains
``recipes/image_folder.py`` with its default network, the quick recipe's, and
``recipes/cifar10_quick.py`` for the same number of epochs, one after the other, and prints each
one's accuracy, wall time, seconds per epoch and the share of each epoch spent waiting for data,
with the machine's load average before each run (the CPU may be shared).

    python benchmarks/image_folder.py --epochs 8 [--folder DIR] [--runs DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_folder(data_dir: Path, folder: Path) -> None:
    """CIFAR-10 as PNG files, once: a folder that holds 60,000 already is kept."""
    from PIL import Image

    from minitrain.kit.data import CIFAR10_CLASSES, load_cifar10

    if len(list(folder.glob("*/*/*.png"))) == 60000:
        return
    for split, train in (("train", True), ("val", False)):
        images, labels = load_cifar10(data_dir, train=train)
        for name in CIFAR10_CLASSES:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            path = folder / split / CIFAR10_CLASSES[label] / f"{i:05d}.png"
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def train(recipe: str, run_dir: Path, epochs: int, *settings: str) -> dict:
    """One run through the CLI: its wall time, last val_acc, per-epoch lines."""
    command = [str(Path(sys.executable).with_name("minitrain")), "run", str(ROOT / "recipes" / recipe)]
    command += ["--set", f"epochs={epochs}", "--run-dir", str(run_dir), "--move-aside", *settings]
    load = os.getloadavg()
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    with open(run_dir / "metrics.csv") as file:
        last = list(csv.DictReader(file))[-1]
    epochs_shown = re.findall(r"^epoch \d+/\d+: .*\(([0-9.]+)s, .*?(?:, (\d+)% waiting for data)?\)$", out, re.M)
    return {
        "recipe": recipe,
        "val_acc": float(last["val_acc"]),
        "wall_s": wall,
        "epoch_s": [float(seconds) for seconds, _ in epochs_shown],
        "waiting": [int(share or 0) for _, share in epochs_shown],
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--data-dir", default=os.environ.get("MINITRAIN_DATA", "~/.cache/minitrain/cifar10"))
    parser.add_argument("--folder", type=Path, default=Path("~/.cache/minitrain/cifar10-png").expanduser())
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-image-folder"))
    args = parser.parse_args()
    started = time.perf_counter()
    write_folder(Path(args.data_dir).expanduser(), args.folder)
    print(f"folder: {args.folder} ({time.perf_counter() - started:.0f}s to check or write)", flush=True)
    results = [
        train("image_folder.py", args.runs / "folder", args.epochs, "--set", f"data_dir={args.folder}"),
        train("cifar10_quick.py", args.runs / "quick", args.epochs, "--set", f"data_dir={args.data_dir}"),
    ]
    for r in results:
        per_epoch = ", ".join(f"{s:.0f}s/{w}%" for s, w in zip(r["epoch_s"], r["waiting"]))
        print(
            f"{r['recipe']:18} val_acc {r['val_acc']:.4f}  wall {r['wall_s']:.0f}s  "
            f"load before {r['load'][0]:.2f}  epochs (time/waiting for data): {per_epoch}"
        )
    gap = results[0]["val_acc"] - results[1]["val_acc"]
    print(f"accuracy gap: {gap * 100:+.2f} points; wall time ratio {results[0]['wall_s'] / results[1]['wall_s']:.2f}")


if __name__ == "__main__":
    main()

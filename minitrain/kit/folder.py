"""A folder of images, one sub-folder per class (torchvision's ImageFolder layout), read into
lists of files and labels: ``DATA/CLASS/.../IMAGE``, or ``DATA/train/CLASS/...`` with ``val/``
(and ``test/``) beside it in the same layout. Without ``val/`` a stratified, seeded share of
each class is held out for validation (:func:`draw_split`).

What is wrong with the folder as a whole is refused before training, in one line: a ``data_dir``
that does not exist, no class folders, a single class, an empty class folder, a class folder
whose name is not text (bytes that are not UTF-8, control characters). Files are checked by
their header, not decoded (fast enough for 60,000 files): those whose extension is not an image
format's, and those that do not open as an image or are too large to decode safely, are skipped
and named in one warning each kind. Damage found only when decoding (a truncated JPEG) is
skipped by the loader (:mod:`minitrain.kit.folder_loader`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from minitrain.engine import distributed
from minitrain.engine.errors import MinitrainError
from minitrain.kit.images import image_suffixes, probe

SPLITS = ("train", "val", "test")
SHOWN = 5
"""How many files a warning names before it says how many more."""


@dataclass(frozen=True)
class Item:
    path: str  # relative to the data folder, with '/' separators
    label: int
    fast: bool  # torchvision decodes it (minitrain.kit.images.Probe)
    side: int  # its shorter side, in pixels


@dataclass
class Folder:
    root: Path
    classes: list[str]
    splits: dict[str, list[Item]]  # "train", "val" (possibly empty), "test" where there is one
    drawn: bool  # val was drawn from train (no val/ folder)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)

    def record(self) -> str:
        """Every file and what became of it, as CSV (``split,class,path``; ``skipped`` rows name
        the reason in place of the class): the run directory keeps it as ``split.csv``."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["split", "class", "path"])
        for split, items in self.splits.items():
            writer.writerows([split, self.classes[item.label], item.path] for item in items)
        writer.writerows(["skipped", why, path] for path, why in self.skipped)
        return out.getvalue()


def scan(data_dir: str | Path, val_fraction: float = 0.1, seed: int = 0, classes: list[str] | None = None) -> Folder:
    """The folder at ``data_dir``, its files checked and split; ``classes`` picks class folders
    and their order (default: every one, sorted by name, as torchvision's ImageFolder does)."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise MinitrainError(f"data_dir {root} does not exist: give a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise MinitrainError(f"data_dir {root} is a file: give a folder with one sub-folder of images per class")
    found = _visible_folders(root)
    split_layout = "train" in found and set(found) <= set(SPLITS)
    roots = {name: root / name for name in SPLITS if name in found} if split_layout else {"train": root}
    names = _class_names(roots["train"], root, classes)
    known = _visible_folders(roots["train"])
    suffixes = image_suffixes()
    splits: dict[str, list[Item]] = {}
    others: list[str] = []
    skipped: list[tuple[str, str]] = []
    for split, folder in roots.items():
        if split != "train":
            strays = [name for name in _visible_folders(folder) if name not in known]
            if strays:
                raise MinitrainError(
                    f"{folder}: class folder(s) {', '.join(map(repr, strays))} are not among the classes of "
                    f"{roots['train']} ({', '.join(known)})"
                )
        splits[split] = []
        for label, name in enumerate(names):
            items = _images(root, folder / name, label, suffixes, others, skipped)
            if not items and split == "train":
                raise MinitrainError(
                    f"class folder {folder / name} holds no readable images: add some, or remove the folder"
                )
            splits[split] += items
    _warn(others, "whose extension is not of an image format Pillow decodes", root)
    _warn([f"{path} ({why})" for path, why in skipped], "that are not readable images", root)

    skipped = [(path, "not an image file name") for path in others] + skipped
    drawn = "val" not in splits
    if drawn:
        splits["train"], splits["val"] = draw_split(splits["train"], val_fraction, seed)
    return Folder(root, names, {s: splits[s] for s in SPLITS if s in splits}, drawn, skipped)


def draw_split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """``(train, val)``: of each class, ``round(fraction × n)`` images (at least one where
    ``fraction`` > 0 and the class has two) go to val. Which ones depends only on ``seed`` and
    the file's path, so the same folder splits the same way on every machine and every start,
    and an image added later does not move the others (but for the one at the class's border)."""
    train: list[Item] = []
    val: list[Item] = []
    for label in sorted({item.label for item in items}):
        ranked = sorted((item for item in items if item.label == label), key=lambda item: _rank(seed, item.path))
        n = len(ranked)
        take = min(n - 1, max(1 if fraction > 0 else 0, round(fraction * n)))
        val += ranked[:take]
        train += ranked[take:]
    return sorted(train, key=_order), sorted(val, key=_order)


def _order(item: Item) -> tuple[int, str]:
    return item.label, item.path


def _rank(seed: int, path: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{path}".encode("utf-8", "surrogateescape"), digest_size=8).digest()


def _visible_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def _class_names(folder: Path, root: Path, chosen: list[str] | None) -> list[str]:
    names = _visible_folders(folder)
    if not names:
        loose = [entry.name for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith(".")]
        hint = f" ({len(loose)} file(s) lie in it directly)" if loose else ""
        raise MinitrainError(
            f"no class folders in {folder}{hint}: expected one sub-folder of images per class "
            f"({root}/CLASS/IMAGE.jpg), or train/ and val/ folders each in that layout"
        )
    for name in names:
        _check_name(folder / name, name)
    if chosen is not None:
        missing = [name for name in chosen if name not in names]
        if missing:
            raise MinitrainError(f"classes: {', '.join(map(repr, missing))} not found in {folder} ({', '.join(names)})")
        if len(set(chosen)) != len(chosen):
            raise MinitrainError(f"classes: a class is named twice in {chosen}")
        names = list(chosen)
    if len(names) < 2:
        raise MinitrainError(
            f"only one class folder ({names[0]}) in {folder}: a classifier needs two classes at least, "
            "one sub-folder of images each"
        )
    return names


def _check_name(folder: Path, name: str) -> None:
    """A class name travels into run.json, plots, exported models and predictions: it must be
    text. Characters that other systems forbid in file names (``:``, ``?``, ``*``, ...) are fine:
    minitrain never makes a file name of a class."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise MinitrainError(
            f"class folder {os.fsencode(folder)!r}: its name is not valid UTF-8 text; rename it"
        ) from None
    if any(unicodedata.category(char) == "Cc" for char in name):
        raise MinitrainError(f"class folder {str(folder)!r}: its name holds control characters; rename it")


def _images(
    root: Path, folder: Path, label: int, suffixes: frozenset[str], others: list[str], skipped: list[tuple[str, str]]
) -> list[Item]:
    items = []
    for directory, dirs, files in os.walk(folder):  # symbolic links to folders are not followed
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(directory, name)
            relative = path.relative_to(root).as_posix()
            if path.suffix.lower() not in suffixes:
                others.append(relative)
                continue
            try:
                found = probe(path)
                items.append(Item(relative, label, found.fast, min(found.size)))
            except MinitrainError as exc:
                skipped.append((relative, str(exc).replace(f"cannot read image {path}: ", "")))
    return items


def _warn(paths: list[str], what: str, root: Path) -> None:
    if paths and distributed.is_main():
        listed = ", ".join(paths[:SHOWN]) + (f", and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")
        warnings.warn(
            f"{root}: skipped {len(paths)} file(s) {what} (the run's split.csv lists them): {listed}", stacklevel=3
        )

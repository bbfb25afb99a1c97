"""``recipes/image_folder.py`` and the kit below it, on folders of real PNG and JPEG files that
the tests write with Pillow: the layouts and the split, every kind of bad input (converted,
skipped with a warning naming the file, or refused in one line), exact resume, class names
through run.json, export and predict."""

from __future__ import annotations

import csv
import gc
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minitrain.commands.cli import main
from minitrain.commands.export import load
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.errors import MinitrainError
from minitrain.kit.folder import scan
from minitrain.kit.folder_loader import Augment, FolderLoader
from minitrain.kit.images import decode, probe
from minitrain.testing import Interrupt

FIRST_PARTY_PLUGINS = {"checkpoint", "tta", "amp", "viz"}
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "image_folder.py"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def picture(colour, size=(16, 16), seed=0) -> np.ndarray:
    """A noisy image of one colour: easy to tell apart, not identical to another."""
    noise = np.random.default_rng(seed).integers(-25, 26, (size[1], size[0], 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def make_folder(root: Path, per_class=10, size=(16, 16), classes=COLOURS) -> Path:
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            fmt = "png" if i % 2 else "jpg"
            Image.fromarray(picture(colour, size, i)).save(root / name / f"{i:02d}.{fmt}")
    return root


def run_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(RECIPE),
        "--set",
        f"data_dir={data}",
        "--set",
        "device=cpu",
        "--set",
        "widths=[8,8,8]",
        "--set",
        "batch_size=8",
        "--set",
        "eval_batch_size=16",
        "--set",
        "epochs=2",
        "--set",
        "num_workers=1",
        "--run-dir",
        str(run_dir),
        "--no-plugin",
        "console",
        *extra,
    ]


# --- the layouts and the split ---------------------------------------------------------------------


def test_a_flat_folder_is_split_stratified_and_the_same_way_every_time(tmp_path):
    data = make_folder(tmp_path / "data", per_class=20)
    folder = scan(data, val_fraction=0.25, seed=3)
    assert folder.classes == ["blue", "green", "red"] and folder.drawn
    val = folder.splits["val"]
    assert [sum(item.label == k for item in val) for k in range(3)] == [5, 5, 5]  # stratified
    assert not {item.path for item in val} & {item.path for item in folder.splits["train"]}
    assert scan(data, val_fraction=0.25, seed=3).splits == folder.splits
    assert scan(data, val_fraction=0.25, seed=4).splits["val"] != val  # the seed decides
    (data / "red" / "zz.png").write_bytes((data / "red" / "01.png").read_bytes())  # an image added later
    again = scan(data, val_fraction=0.25, seed=3)
    assert len({item.path for item in val} - {item.path for item in again.splits["val"]}) <= 1
    rows = list(csv.reader(folder.record().splitlines()))
    assert rows[0] == ["split", "class", "path"] and ["val", "red", val[-1].path] in rows


def test_train_val_and_test_folders_are_used_as_they_are(tmp_path):
    make_folder(tmp_path / "data" / "train", per_class=4)
    make_folder(tmp_path / "data" / "val", per_class=2)
    make_folder(tmp_path / "data" / "test", per_class=1, classes={"red": COLOURS["red"]})
    folder = scan(tmp_path / "data")
    assert not folder.drawn and folder.classes == ["blue", "green", "red"]
    assert [len(folder.splits[s]) for s in ("train", "val", "test")] == [12, 6, 1]
    assert folder.splits["test"][0].label == 2  # labels follow train/'s classes


# --- bad input: refused before training, in one line -----------------------------------------------


def refused(data: Path, capsys, tmp_path) -> str:
    assert main(run_args(data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("minitrain: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
    return lines[0]


def test_a_data_dir_that_does_not_exist_is_refused(tmp_path, capsys):
    assert "does not exist" in refused(tmp_path / "nowhere", capsys, tmp_path)


def test_a_single_class_is_refused(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes={"red": COLOURS["red"]})
    assert "only one class folder (red)" in refused(data, capsys, tmp_path)


def test_an_empty_class_folder_is_refused(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (data / "purple").mkdir()
    (data / "purple" / "notes.txt").write_text("to do")
    assert f"class folder {data / 'purple'} holds no readable images" in refused(data, capsys, tmp_path)


def test_images_without_class_folders_are_refused(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    Image.fromarray(picture((0, 0, 0))).save(tmp_path / "data" / "a.png")
    line = refused(tmp_path / "data", capsys, tmp_path)
    assert "no class folders" in line and "1 file(s) lie in it directly" in line


@pytest.mark.parametrize("name", [b"caf\xe9", b"tab\tname"])
def test_a_class_name_that_is_not_text_is_refused(tmp_path, name):
    data = make_folder(tmp_path / "data")
    os.rename(data / "red", os.path.join(os.fsencode(data), name))
    with pytest.raises(MinitrainError, match="UTF-8|control characters"):
        scan(data)


# --- bad input: skipped, named in a warning --------------------------------------------------------


def test_files_that_are_not_images_are_skipped_and_named(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data")
    (data / "red" / "notes.txt").write_text("not an image")
    (data / "red" / "fake.jpg").write_text("not a JPEG either")
    (data / "red" / "empty.png").write_bytes(b"")
    Image.fromarray(picture((0, 0, 0), (80, 80))).save(data / "green" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # Pillow's guard, made small enough to test
    with pytest.warns(UserWarning) as caught:
        folder = scan(data)
    text = "\n".join(str(w.message) for w in caught)
    assert "skipped 1 file(s) whose extension is not of an image format" in text and "red/notes.txt" in text
    assert "skipped 3 file(s) that are not readable images" in text
    assert "red/fake.jpg (cannot identify image file" in text and "red/empty.png" in text
    assert "green/huge.png (too large to decode safely (6,400 pixels" in text
    assert len(folder.splits["train"]) + len(folder.splits["val"]) == 30
    assert {row[2] for row in csv.reader(folder.record().splitlines()) if row[0] == "skipped"} == {
        "red/notes.txt",
        "red/fake.jpg",
        "red/empty.png",
        "green/huge.png",
    }


def test_a_truncated_jpeg_is_left_out_of_its_batch_with_a_warning(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4)
    Image.fromarray(picture(COLOURS["red"], (64, 64))).save(data / "red" / "00.jpg")
    whole = (data / "red" / "00.jpg").read_bytes()
    (data / "red" / "00.jpg").write_bytes(whole[: len(whole) * 3 // 4])  # the header reads; the pixels do not
    folder = scan(data, val_fraction=0)
    loader = FolderLoader(folder, "train", 12, size=16, augment=Augment(), num_workers=0)
    with pytest.warns(UserWarning, match=r"red/00\.jpg: .*truncated.*; left out \(1 image"):
        batches = list(loader)
    assert sum(len(labels) for _, labels in batches) == 11 and loader.skipped


# --- bad input: converted --------------------------------------------------------------------------


def test_every_mode_is_converted_to_rgb_as_it_should_look(tmp_path):
    grey = np.full((8, 8), 100, np.uint8)
    files = {
        "grey.png": Image.fromarray(grey, "L"),
        "rgba.png": Image.fromarray(np.dstack([np.full((8, 8, 3), 0, np.uint8), np.full((8, 8), 0, np.uint8)])),
        "palette.gif": Image.fromarray(np.full((8, 8, 3), (200, 10, 10), np.uint8)).convert(
            "P", palette=Image.Palette.ADAPTIVE
        ),
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),  # pure red in ink
        "deep.png": Image.fromarray(grey.astype(np.uint16) * 257),  # 16 bits: 100 * 257
    }
    for name, image in files.items():
        image.save(tmp_path / name, quality=95) if name.endswith(".jpg") else image.save(tmp_path / name)
    seen = {name: decode(tmp_path / name, probe(tmp_path / name).fast) for name in files}
    assert all(pixels.shape == (3, 8, 8) and pixels.dtype == torch.uint8 for pixels in seen.values())
    assert seen["grey.png"].eq(100).all() and seen["deep.png"].eq(100).all()  # scaled, not clipped
    assert seen["rgba.png"].eq(255).all()  # transparent: laid on white
    assert tuple(seen["palette.gif"][:, 0, 0]) == (200, 10, 10)
    red = seen["cmyk.jpg"][:, 4, 4].tolist()
    assert red[0] > 200 and max(red[1:]) < 60


def test_exif_rotation_is_applied(tmp_path):
    tall = np.zeros((12, 6, 3), np.uint8)
    tall[:2] = 255  # white on top
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(tall).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    assert not probe(tmp_path / "turned.jpg").fast  # torchvision's path would not turn it
    pixels = decode(tmp_path / "turned.jpg", False)
    assert pixels.shape == (3, 6, 12)  # turned: wide now
    assert pixels[:, :, -2:].float().mean() > 200  # the white edge is on the right


# --- training: the recipe and every plugin -------------------------------------------------------


def start(data, run_dir, resume=None, names=()):
    overrides = ["device=cpu", f"data_dir={data}", "widths=[8,8,8]", "batch_size=8", "epochs=2", "num_workers=1"]
    return prepare(RunRequest(RECIPE, overrides, ["checkpoint:every_steps=2"], ["console"], run_dir, resume=resume))


@pytest.mark.filterwarnings("ignore:--resume. this run leaves out the plugin")
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    data = make_folder(tmp_path / "data", per_class=12)
    straight = start(data, tmp_path / "straight")
    straight.fit()
    interrupted = start(data, tmp_path / "run")
    interrupted.pm.register(Interrupt(5))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    del interrupted  # its persistent workers, forked while it held the run directory's lock, end with it
    gc.collect()
    resumed = start(data, tmp_path / "run", resume="auto")
    assert resumed.state.global_step == 5  # mid-epoch: 3 batches of 4 per epoch
    resumed.fit()
    for key, value in straight.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    assert (tmp_path / "run" / "split.csv").read_text() == (tmp_path / "straight" / "split.csv").read_text()


def test_class_names_travel_through_the_run_export_and_predict(tmp_path, capsys):
    classes = {"ca:t?": COLOURS["red"], "dog <2>": COLOURS["green"], "émeu": COLOURS["blue"]}
    data = make_folder(tmp_path / "data", per_class=12, size=(20, 14), classes=classes)
    run_dir = tmp_path / "run"
    assert main(run_args(data, run_dir, "--plugin", "viz", "--set", "lr=0.05")) == 0
    names = sorted(classes)
    run = json.loads((run_dir / "run.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert run["class_names"] == names and config["classes"] == names
    assert config["image_size"] == 14 and config["crop"] == "pad"  # decided from the data, and recorded
    assert run["inputs"]["size"] == [14, 14]
    assert (run_dir / "plots" / "misclassified.png").is_file() or (run_dir / "plots" / "confusion.png").is_file()
    assert main(["export", str(run_dir)]) == 0
    model_file = run_dir / "model-last.pt2"
    assert load(model_file)[1]["class_names"] == names
    capsys.readouterr()
    assert main(["predict", str(model_file), str(data / "émeu" / "01.png"), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {entry["class"] for entry in top} == set(names)


def test_init_from_a_cifar10_run_loads_the_body_and_makes_the_head_anew(tmp_path, fake_cifar, capsys):
    quick = Path(__file__).resolve().parents[1] / "recipes" / "cifar10_quick.py"
    cifar_run = tmp_path / "cifar"
    settings = ["--set", f"data_dir={fake_cifar}", "--set", "widths=[8,8,8]", "--set", "epochs=1"]
    assert main(["run", str(quick), *settings, "--run-dir", str(cifar_run), "--no-plugin", "console"]) == 0
    data = make_folder(tmp_path / "images", per_class=6)
    args = run_args(data, tmp_path / "run", "--init-from", str(cifar_run / "checkpoints" / "last.pt"))
    capsys.readouterr()
    assert main(args) == 0
    warned = capsys.readouterr().err
    assert re.search(
        r"loaded \d+ tensor\(s\).* 1 tensor\(s\): head\.weight \(10, 8\) in the checkpoint, \(3, 8\)", warned
    )
    # anything else that does not fit is still refused: another width is not a head
    other = run_args(
        data, tmp_path / "wider", "--set", "widths=[8,8,16]", "--init-from", str(cifar_run / "checkpoints" / "last.pt")
    )
    capsys.readouterr()
    assert main(other) == 2
    assert "do not fit the model" in capsys.readouterr().err


def test_photo_sized_images_get_random_resized_crops_at_224(tmp_path):
    data = make_folder(tmp_path / "data", per_class=3, size=(300, 240))
    folder = scan(data, val_fraction=0)
    assert min(item.side for item in folder.splits["train"]) == 240
    loader = FolderLoader(folder, "train", 4, size=64, augment=Augment("resized"), num_workers=0, resize="crop")
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4,)


def test_pretrained_weights_absent_from_the_cache_say_where_they_go(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = make_folder(tmp_path / "data", per_class=2)
    args = run_args(data, tmp_path / "run", "--set", "arch=resnet18", "--set", "pretrained=true")
    assert main(args) == 2
    err = capsys.readouterr().err
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "resnet18's weights are not in torch's hub cache; download https://" in err and str(expected) in err


def test_pretrained_weights_in_the_cache_are_loaded_but_the_head(tmp_path, monkeypatch, capsys):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18()  # 1000 classes, standing in for ImageNet's weights
    torch.save(reference.state_dict(), cached)
    data = make_folder(tmp_path / "data", per_class=4)
    overrides = ["device=cpu", f"data_dir={data}", "arch=resnet18", "pretrained=true", "batch_size=4", "num_workers=0"]
    trainer = prepare(RunRequest(RECIPE, [*overrides, "image_size=32"], [], ["console"], tmp_path / "run"))
    assert "loaded, but for fc.weight, fc.bias (new)" in capsys.readouterr().out
    assert torch.equal(trainer.module.conv1.weight, reference.conv1.weight)
    assert trainer.module.fc.out_features == 3


SLOW_RECIPE = '''
import time
import torch
import minitrain


class Config(minitrain.RecipeConfig):
    delay: float = 0.0


class Slow:
    """Four batches, each ``delay`` seconds in coming: a loader that cannot keep up."""

    def __init__(self, delay):
        self.delay = delay

    def __len__(self):
        return 4

    def __iter__(self):
        for _ in range(4):
            time.sleep(self.delay)
            yield torch.randn(8, 4), torch.randint(0, 2, (8,))


def build(config, device):
    model = torch.nn.Linear(4, 2)
    return minitrain.Components(model, torch.optim.SGD(model.parameters(), lr=0.1), Slow(config.delay))
'''


@pytest.mark.parametrize("delay, low, high", [(0.2, 80, 100), (0.0, 0, 50)])
def test_the_console_says_how_long_training_waited_for_data(tmp_path, capsys, delay, low, high):
    recipe = tmp_path / "slow.py"
    recipe.write_text(SLOW_RECIPE)
    assert (
        main(["run", str(recipe), "--set", f"delay={delay}", "--set", "epochs=1", "--run-dir", str(tmp_path / "r")])
        == 0
    )
    share = re.search(r"^epoch 1/1: .*, (\d+)% waiting for data\)$", capsys.readouterr().out, re.M)
    assert share and low <= int(share.group(1)) <= high


def test_two_processes_each_train_a_shard_of_the_folder(tmp_path):
    import subprocess
    import sys

    data = make_folder(tmp_path / "data", per_class=16)  # 36 training images after the split
    args = run_args(data, tmp_path / "two", "--set", "epochs=1", "--set", "val_fraction=0.25", "--nproc", "2")
    result = subprocess.run([sys.executable, "-m", "minitrain", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    start = json.loads((tmp_path / "two" / "events.jsonl").read_text().splitlines()[0])
    assert start["event"] == "FitStart" and start["steps_per_epoch"] == 36 // 2 // 8  # 18 images a rank: 2, not 4
    assert (tmp_path / "two" / "checkpoints" / "last.pt").is_file()

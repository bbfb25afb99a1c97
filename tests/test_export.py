"""``minitrain export`` and ``minitrain predict``: a trained tiny model exported in both formats
predicts exactly what the in-memory model predicts, from image files of any size, with no
recipe code; bad files give one clear line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from minitrain.commands import predict as predict_command
from minitrain.commands.cli import main
from minitrain.commands.export import export, load
from minitrain.commands.predict import normalize, predict, read
from minitrain.commands.start import RunRequest, prepare
from minitrain.kit.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar10

FIRST_PARTY_PLUGINS = {"checkpoint", "tta"}


@pytest.fixture
def trained(recipe, tmp_path):
    trainer = prepare(RunRequest(recipe, ["epochs=2"], ["checkpoint"], ["console"], tmp_path / "run"))
    trainer.fit()
    return trainer, tmp_path / "run"


@pytest.fixture
def images(tmp_path, fake_cifar):
    """A test image as a 32×32 PNG, and images of other sizes and modes (PNG, JPEG, grey, RGBA)."""
    pictures, _ = load_cifar10(fake_cifar, train=False)
    rng = np.random.default_rng(0)
    paths = [
        tmp_path / "test0.png",
        tmp_path / "big.png",
        tmp_path / "small.jpg",
        tmp_path / "grey.png",
        tmp_path / "alpha.png",
    ]
    Image.fromarray(pictures[0].permute(1, 2, 0).numpy()).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(paths[1])
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(paths[2], quality=90)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L").save(paths[3])
    Image.fromarray(rng.integers(0, 256, (33, 31, 4), dtype=np.uint8), mode="RGBA").save(paths[4])
    return paths, pictures[:1]


@pytest.mark.parametrize("fmt", ["exported-program", "torchscript"])
def test_exported_model_predicts_like_the_trained_one(trained, images, fmt, capsys):
    trainer, run_dir = trained
    paths, first = images
    assert main(["export", str(run_dir), "--format", fmt]) == 0
    out = run_dir / ("model-last.pt2" if fmt == "exported-program" else "model-last.torchscript.pt")
    assert f"wrote {out}" in capsys.readouterr().out

    model, metadata = load(out)
    assert metadata["class_names"] == CIFAR10_CLASSES and metadata["input_size"] == [32, 32]
    assert metadata["mean"] == list(CIFAR10_MEAN) and metadata["std"] == list(CIFAR10_STD)
    assert metadata["format"] == fmt and metadata["global_step"] == trainer.state.global_step

    batch = normalize([read(path, metadata) for path in paths], metadata)
    torch.testing.assert_close(batch[:1], trainer.val_loader.normalize(first))  # same pixels as in training
    with torch.no_grad():
        expected = torch.softmax(trainer.module.eval()(batch), dim=1)
    results = predict(out, paths, top_k=3)
    for result, probabilities in zip(results, expected):
        top = probabilities.topk(3)
        assert [t["index"] for t in result["top"]] == top.indices.tolist()
        assert [t["probability"] for t in result["top"]] == pytest.approx(top.values.tolist(), rel=1e-5, abs=1e-7)
        assert [t["class"] for t in result["top"]] == [CIFAR10_CLASSES[i] for i in top.indices.tolist()]


def test_predict_command_prints_top_k_and_json(trained, images, capsys):
    _, run_dir = trained
    paths, _ = images
    out = export(run_dir / "checkpoints" / "last.pt", out=run_dir / "exported" / "m.pt2")
    assert main(["predict", str(out), str(paths[0]), str(paths[1]), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{r['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
        for r in predict(out, paths[:2], top_k=2)
    ]  # each image's two most probable classes
    assert main(["predict", str(out), str(paths[2]), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"] == str(paths[2]) and len(result["top"]) == 5  # the default top-k
    assert [result] == predict(out, paths[2:3], top_k=5)


def test_clear_errors_for_bad_files(trained, images, tmp_path, capsys):
    _, run_dir = trained
    paths, _ = images
    out = export(run_dir, "torchscript")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    cases = [
        (["predict", "missing.pt2", str(paths[0])], "model file not found: missing.pt2"),
        (["predict", str(not_image), str(paths[0])], "is not a model file that `minitrain export` writes"),
        (["predict", str(run_dir / "checkpoints" / "last.pt"), str(paths[0])], "is not a model file"),
        (["predict", str(out), str(not_image)], f"cannot read image {not_image}"),
        (["predict", str(out), "nowhere.jpg"], "image not found: nowhere.jpg"),
        (["export", str(tmp_path / "nothing")], "not found"),
        (["export", str(not_image)], "is not inside a run directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    (run_dir / "checkpoints" / "last.pt").rename(run_dir / "checkpoints" / "kept.pt")
    assert main(["export", str(run_dir)]) == 2
    assert "has no checkpoints/last.pt" in capsys.readouterr().err


# --- test-time augmentation, recipes of every kind, images of every kind ----------------------------


def test_export_with_tta_scores_what_the_run_reported(recipe, tmp_path, fake_cifar, capsys):
    run = tmp_path / "run"
    trainer = prepare(RunRequest(recipe, ["epochs=2"], ["checkpoint", "tta:translate=1"], ["console"], run))
    metrics = trainer.fit()
    assert main(["export", str(run)]) == 0
    assert "this file does not, so it scores below the run's val_acc (--tta includes it)" in capsys.readouterr().err
    assert main(["export", str(run), "--tta"]) == 0
    model, metadata = load(run / "model-last-tta.pt2")
    assert metadata["test_time_augmentation"] == {"flip": True, "translate": 1}
    images, labels = load_cifar10(fake_cifar, train=False)
    with torch.no_grad():
        predicted = model(trainer.val_loader.normalize(images)).argmax(1)
    assert (predicted == labels).float().mean().item() == pytest.approx(metrics["val_acc"])


def test_export_without_tta_in_the_run_refuses_tta(trained, capsys):
    _, run_dir = trained
    assert main(["export", str(run_dir), "--tta"]) == 2
    assert "validated without test-time augmentation" in capsys.readouterr().err


OWN_LOADER = '''
"""Ten-class images from a DataLoader of its own; it states what its model expects."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import minitrain


class Config(minitrain.RecipeConfig):
    epochs: int = 1
    batch_size: int = 8
    device: str = "cpu"


def build_model(config):
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 10))


def build(config, device):
    raise AssertionError("export builds the model alone")


def build_for_training(config, device):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 2, 6, 6, generator=generator), torch.arange(32) % 10
    model = build_model(config)
    return minitrain.Components(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=DataLoader(TensorDataset(images, labels), batch_size=config.batch_size),
        inputs={"size": [6, 6], "mean": [0.5, 0.5], "std": [0.25, 0.25]})
'''


def test_export_of_a_recipe_with_its_own_loader_from_another_directory(write_recipe, tmp_path, monkeypatch):
    path = write_recipe(OWN_LOADER, "own_loader.py")
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_loader_for_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "build", module.build_for_training)
    from minitrain.kit import recipe as recipes

    real_load = recipes.load_recipe
    monkeypatch.setattr("minitrain.commands.start.load_recipe", lambda p: module if p == path else real_load(p))
    prepare(RunRequest(path, [], ["checkpoint"], ["console"], tmp_path / "run")).fit()
    monkeypatch.undo()  # export loads the recipe file as it is: its build() would fail

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = export(tmp_path / "run")  # run.json records the recipe's absolute path
    model, metadata = load(out)
    assert (metadata["input_size"], metadata["mean"], metadata["std"]) == ([6, 6], [0.5, 0.5], [0.25, 0.25])
    assert metadata["class_names"] == [str(i) for i in range(10)] and model(torch.zeros(3, 2, 6, 6)).shape == (3, 10)


def test_export_does_not_need_the_data_set_when_the_recipe_builds_its_model_alone(recipe, tmp_path, fake_cifar):
    source = recipe.read_text().replace(
        "def build(config",
        """def build_model(config):
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))


def build(config""",
    )
    path = tmp_path / "with_model.py"
    path.write_text(source)
    prepare(RunRequest(path, [], ["checkpoint"], ["console"], tmp_path / "run")).fit()
    import shutil

    shutil.rmtree(fake_cifar)
    assert load(export(tmp_path / "run"))[1]["input_size"] == [32, 32]


@pytest.fixture
def exported(trained):
    _, run_dir = trained
    return export(run_dir)


def _top(path, exported, resize="stretch"):
    """The model's probability of each class for one image, in class order."""
    (result,) = predict(exported, [path], top_k=10, resize=resize)
    return [p for _, p in sorted((t["index"], t["probability"]) for t in result["top"])]


def test_predict_names_an_image_too_large_to_decode_and_classifies_the_others(exported, images, tmp_path, capsys):
    """A 20000×20000 PNG (a few kB: a decompression bomb) is named on its own line, the other
    images are classified, and the exit code says that one failed; no traceback."""
    paths, _ = images
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    assert main(["predict", str(exported), str(paths[0]), str(bomb), str(paths[1])]) == 2
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == [str(paths[0]), str(paths[1])]
    assert err == (
        f"minitrain: error: cannot read image {bomb}: too large to decode safely (400,000,000 pixels, over "
        f"the limit of {Image.MAX_IMAGE_PIXELS:,} that guards against decompression bombs)\n"
    )


def test_predict_turns_images_upright_by_their_exif_orientation(exported, tmp_path, fake_cifar):
    pictures, _ = load_cifar10(fake_cifar, train=False)
    upright = Image.fromarray(pictures[3].permute(1, 2, 0).numpy())
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the pixels are stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png", exif=exif)
    assert _top(tmp_path / "turned.png", exported) == _top(tmp_path / "upright.png", exported)


def test_predict_converts_every_image_mode(exported, tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 16-bit: same picture
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert _top(tmp_path / "grey16.png", exported) == pytest.approx(_top(tmp_path / "grey8.png", exported))

    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.dstack([rgb, np.full((32, 32), 255, np.uint8)])
    rgba[:16, :, 3] = 0  # the top half transparent: laid on white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    on_white = rgb.copy()
    on_white[:16] = 255
    Image.fromarray(on_white).save(tmp_path / "on_white.png")
    assert _top(tmp_path / "rgba.png", exported) == _top(tmp_path / "on_white.png", exported)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    for name in ("cmyk.jpg", "palette.png"):
        assert sum(_top(tmp_path / name, exported)) == pytest.approx(1)


def test_predict_can_keep_proportions_and_cut_the_centre(exported, tmp_path, fake_cifar):
    pictures, _ = load_cifar10(fake_cifar, train=False)
    square = pictures[5].permute(1, 2, 0).numpy()
    wide = np.concatenate([np.zeros((32, 16, 3), np.uint8), square, np.zeros((32, 16, 3), np.uint8)], axis=1)
    Image.fromarray(square).save(tmp_path / "square.png")
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert _top(tmp_path / "wide.png", exported, "crop") == pytest.approx(_top(tmp_path / "square.png", exported))
    assert _top(tmp_path / "wide.png", exported) != pytest.approx(_top(tmp_path / "square.png", exported))


def test_an_unreadable_image_is_reported_while_the_others_are_classified(exported, images, tmp_path, capsys):
    paths, _ = images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    assert main(["predict", str(exported), str(paths[0]), str(broken), str(paths[1])]) == 2
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == [str(paths[0]), str(paths[1])]
    assert err.startswith(f"minitrain: error: cannot read image {broken}") and err.count("\n") == 1


# --- folders ----------------------------------------------------------------------------------------


def test_predict_classifies_the_images_in_folders_at_any_depth_sorted_by_path(
    exported, images, tmp_path, capsys, monkeypatch
):
    """A folder stands for the images under it, at any depth, sorted by path, mixed with files named
    one by one. Images are chosen by extension (any case); other files are named in one warning,
    hidden ones left out; a file with an image's extension that does not decode is reported as
    any unreadable image is. Read in batches: here of 2, so the folder spans several."""
    paths, _ = images
    folder = tmp_path / "photos"
    (folder / "b" / "deeper").mkdir(parents=True)
    (folder / ".cache").mkdir()
    shutil.copy(paths[0], folder / "b" / "deeper" / "z.png")
    shutil.copy(paths[2], folder / "b" / "A.JPG")
    shutil.copy(paths[3], folder / "a.png")
    shutil.copy(paths[4], folder / ".hidden.png")
    shutil.copy(paths[1], folder / ".cache" / "x.png")
    (folder / "notes.txt").write_text("labels")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    in_order = [
        folder / "a.png",
        folder / "b" / "A.JPG",
        folder / "b" / "broken.png",
        folder / "b" / "deeper" / "z.png",
    ]
    monkeypatch.setattr(predict_command, "BATCH", 2)

    assert main(["predict", str(exported), str(paths[1]), str(folder), "--top-k", "1", "--json"]) == 2
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["image"] for r in records] == [str(paths[1]), *map(str, in_order)]  # one record per image
    assert records[3]["error"].startswith(f"cannot read image {in_order[2]}") and "top" not in records[3]
    for record in records[:3] + records[4:]:  # as each image alone scores
        (alone,) = predict(exported, [record["image"]], top_k=1)
        assert record["top"][0]["index"] == alone["top"][0]["index"]
        assert record["top"][0]["probability"] == pytest.approx(alone["top"][0]["probability"], rel=1e-5)
    assert err.splitlines() == [
        f"minitrain: warning: predict: skipped 1 file(s) in {folder} whose extension is not of an image "
        "format Pillow decodes: notes.txt",
        f"minitrain: error: {records[3]['error']}",
    ]

    assert main(["predict", str(exported), str(folder / "b"), str(paths[1])]) == 2  # the lines people read
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(in_order[1]), str(in_order[3]), str(paths[1])]
    assert err.count("\n") == 1 and f"cannot read image {in_order[2]}" in err
    (folder / "b" / "broken.png").unlink()
    assert main(["predict", str(exported), str(folder / "b")]) == 0
    assert capsys.readouterr().err == ""


def test_a_folder_without_images_is_one_error_line(exported, images, tmp_path, capsys):
    paths, _ = images
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main(["predict", str(exported), str(paths[0]), str(empty)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1  # nothing classified: bad input, found before any work
    assert err.startswith(f"minitrain: error: no images in folder {empty} (looked at any depth for names ending ")
    assert ".jpg" in err and ".png" in err
    (empty / "sub" / "labels.csv").write_text("a,b\n")
    assert main(["predict", str(exported), str(empty)]) == 2
    assert capsys.readouterr().err.rstrip("\n").endswith("; it holds 1 other file(s): sub/labels.csv")

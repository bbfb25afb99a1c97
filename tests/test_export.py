"""``minitrain export`` and ``minitrain predict``: a trained tiny model exported in both formats
predicts exactly what the in-memory model predicts, from image files of any size, with no
recipe code; bad files give one clear line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minitrain.cli import main
from minitrain.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from minitrain.export import export, load
from minitrain.predict import predict, preprocess
from minitrain.run import prepare

FIRST_PARTY_PLUGINS = {"checkpoint"}


@pytest.fixture
def trained(recipe, tmp_path):
    trainer = prepare(recipe, ["epochs=2"], ["checkpoint"], ["console"], tmp_path / "run")
    trainer.fit()
    return trainer, tmp_path / "run"


@pytest.fixture
def images(tmp_path, fake_cifar):
    """A test image as a 32×32 PNG, and images of other sizes and modes (PNG, JPEG, grey, RGBA)."""
    pictures, _ = load_cifar10(fake_cifar, train=False)
    rng = np.random.default_rng(0)
    paths = [tmp_path / "test0.png", tmp_path / "big.png", tmp_path / "small.jpg", tmp_path / "grey.png",
             tmp_path / "alpha.png"]
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
    assert metadata["format"] == fmt and metadata["global_step"] == trainer.global_step

    batch = preprocess(paths, metadata)
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
    assert lines == [f"{r['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
                     for r in predict(out, paths[:2], top_k=2)]  # each image's two most probable classes
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

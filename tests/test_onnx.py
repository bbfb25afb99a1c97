"""``minitrain export --format onnx``: the file passes ``onnx.checker``, carries its metadata in
``metadata_props``, and ONNX Runtime alone (no minitrain code, no torch) runs it on held-out
images to the same logits as the PyTorch model, within LOGIT_TOLERANCE; ``predict`` reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minitrain.commands.cli import main
from minitrain.commands.predict import predict
from minitrain.commands.start import RunRequest, prepare
from minitrain.kit.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar10

onnx = pytest.importorskip("onnx", reason="the serve extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the serve extra is not installed")

FIRST_PARTY_PLUGINS = {"checkpoint", "tta"}
LOGIT_TOLERANCE = 1e-4
"""Largest difference between a logit from ONNX Runtime and from PyTorch (float32 both ways;
seen: about 1e-6, the order in which the two runtimes add)."""


def run_with_onnxruntime_alone(path, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """Logits for uint8 N×C×H×W ``images``, as a user of the file without minitrain computes them."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    mean = np.array(meta["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    batch = ((images.astype(np.float32) / meta["pixel_scale"] - mean) / std).astype(np.float32)
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: batch})[0], meta


def test_onnx_file_runs_in_onnxruntime_like_the_pytorch_model(recipe, tmp_path, fake_cifar, capsys):
    run = tmp_path / "run"
    trainer = prepare(RunRequest(recipe, ["epochs=2"], ["checkpoint"], ["console"], run))
    trainer.fit()
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = run / "model-last.onnx"
    assert f"wrote {out}" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)

    images, labels = load_cifar10(fake_cifar, train=False)  # held out: the test split
    logits, meta = run_with_onnxruntime_alone(out, images.numpy())
    assert meta["class_names"] == CIFAR10_CLASSES and meta["input_size"] == [32, 32]
    assert meta["mean"] == list(CIFAR10_MEAN) and meta["std"] == list(CIFAR10_STD) and meta["pixel_scale"] == 255
    with torch.no_grad():
        expected = trainer.module.eval()(trainer.val_loader.normalize(images)).numpy()
    assert logits.shape == (len(labels), 10)
    assert np.abs(logits - expected).max() <= LOGIT_TOLERANCE
    assert (logits.argmax(1) == expected.argmax(1)).all()
    one, _ = run_with_onnxruntime_alone(out, images.numpy()[:1])  # the batch dimension is free
    np.testing.assert_allclose(one, expected[:1], atol=LOGIT_TOLERANCE)

    picture = tmp_path / "test0.png"  # `predict` runs the .onnx through ONNX Runtime, as the .pt2 through torch
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(picture)
    assert main(["export", str(run)]) == 0
    through_onnx, through_torch = predict(out, [picture]), predict(run / "model-last.pt2", [picture])
    assert [t["class"] for t in through_onnx[0]["top"]] == [t["class"] for t in through_torch[0]["top"]]
    assert [t["probability"] for t in through_onnx[0]["top"]] == pytest.approx(
        [t["probability"] for t in through_torch[0]["top"]], abs=1e-5
    )


def test_onnx_with_tta_scores_what_the_run_reported(recipe, tmp_path, fake_cifar):
    run = tmp_path / "run"
    trainer = prepare(RunRequest(recipe, ["epochs=2"], ["checkpoint", "tta:translate=1"], ["console"], run))
    metrics = trainer.fit()
    assert main(["export", str(run), "--format", "onnx", "--tta"]) == 0
    images, labels = load_cifar10(fake_cifar, train=False)
    logits, meta = run_with_onnxruntime_alone(run / "model-last-tta.onnx", images.numpy())
    assert meta["test_time_augmentation"] == {"flip": True, "translate": 1}
    assert (logits.argmax(1) == labels.numpy()).mean() == pytest.approx(metrics["val_acc"])


def test_bad_onnx_files_are_one_line(recipe, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    assert main(["predict", str(garbage), str(picture)]) == 2
    err = capsys.readouterr().err
    assert f"{garbage}: unreadable ONNX file" in err and err.count("\n") == 1

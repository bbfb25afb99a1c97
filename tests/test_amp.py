"""The amp plugin on CPU: bf16 autocast tracks fp32, fp16 uses a grad scaler (or falls back with
one warning), pure mode keeps BatchNorm in fp32, and the scaler's state survives a checkpoint."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from minitrain.commands.start import RunRequest, prepare
from minitrain.testing import EpochLog
from minitrain_plugins import amp

RECIPE = """
from pathlib import Path
from typing import Literal

import torch
from torch import nn

import minitrain
from minitrain.kit.data import cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = 3
    batch_size: int = 16
    lr: float = 0.01
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    data_dir: Path = Path({data_dir!r})


def build(config, device):
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed,
                                  crop=0, flip="none")
    model = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test)
"""


FIRST_PARTY_PLUGINS = {"amp"}


@pytest.fixture
def bn_recipe(write_recipe, fake_cifar):
    return write_recipe(RECIPE.format(data_dir=str(fake_cifar)), "bn_recipe.py")


def train(recipe, *plugins: str, epochs: int = 3):
    """Fit ``recipe`` with ``plugins``; returns the trainer, each epoch's metrics and the amp
    warnings raised."""
    trainer = prepare(RunRequest(recipe, [f"epochs={epochs}"], list(plugins), ["console", "jsonl"]))
    log = EpochLog()
    trainer.pm.register(log)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    return trainer, log.metrics, [str(w.message) for w in caught if str(w.message).startswith("amp:")]


def plugin(trainer) -> amp.MixedPrecision:
    return trainer.pm.get_plugin("amp")


def assert_tracks(metrics, reference, loss_rtol):
    for got, want in zip(metrics, reference, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=loss_rtol)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=loss_rtol, abs=0.02)
        assert abs(got["val_acc"] - want["val_acc"]) <= 0.07


def assert_same(metrics, reference):
    """Trained in fp32 after all: the same numbers as the fp32 run, to the bit, but the timings."""
    untimed = [{k: v for k, v in m.items() if k not in ("epoch_time", "samples_per_s")} for m in (*metrics, *reference)]
    assert untimed[: len(metrics)] == untimed[len(metrics) :]


@pytest.fixture
def fp32_metrics(bn_recipe):
    return train(bn_recipe)[1]


def test_bf16_autocast_tracks_fp32(bn_recipe, fp32_metrics):
    trainer, metrics, warned = train(bn_recipe, "amp")
    assert warned == []
    assert plugin(trainer).dtype is torch.bfloat16 and plugin(trainer).scaler is None
    assert next(trainer.module.parameters()).dtype is torch.float32  # autocast leaves the weights alone
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert_tracks(metrics, fp32_metrics, loss_rtol=0.05)


def test_fp16_uses_a_grad_scaler_or_falls_back_once(bn_recipe, fp32_metrics):
    trainer, metrics, warned = train(bn_recipe, "amp:dtype=fp16")
    mp = plugin(trainer)
    if mp.scaler is None:  # this PyTorch cannot do fp16 autocast on the CPU
        assert len(warned) == 1 and mp.dtype is None
        assert_same(metrics, fp32_metrics)
    else:
        assert warned == [] and mp.dtype is torch.float16
        assert 0 < mp.scaler.get_scale() <= 2.0**16
        assert_tracks(metrics, fp32_metrics, loss_rtol=0.2)  # a step skipped on overflow shifts it a bit


def test_unsupported_device_falls_back_to_fp32_with_one_warning(bn_recipe, fp32_metrics, monkeypatch):
    monkeypatch.setattr(amp, "unsupported", lambda device, dtype, mode: "no half precision here")
    trainer, metrics, warned = train(bn_recipe, "amp:dtype=fp16")
    assert warned == ["amp: fp16 autocast is not available on cpu (no half precision here); training in fp32"]
    assert plugin(trainer).dtype is None and plugin(trainer).scaler is None
    assert_same(metrics, fp32_metrics)


def test_pure_mode_converts_the_model_but_keeps_batchnorm_fp32(bn_recipe, fp32_metrics):
    trainer, metrics, warned = train(bn_recipe, "amp:mode=pure")
    assert warned == []
    conv, bn, linear = trainer.module[1], trainer.module[2], trainer.module[5]
    assert conv.weight.dtype is torch.bfloat16 and linear.weight.dtype is torch.bfloat16
    assert bn.weight.dtype is torch.float32 and bn.running_mean.dtype is torch.float32
    assert trainer.optimizer.param_groups[0]["params"][0] is conv.weight  # optimizer still updates them
    assert trainer.module(torch.zeros(2, 3, 32, 32)).dtype is torch.float32  # logits back in fp32
    assert_tracks(metrics, fp32_metrics, loss_rtol=0.05)


def test_scaler_state_round_trips_through_a_checkpoint(bn_recipe):
    trainer, _, _ = train(bn_recipe, "amp:dtype=fp16", epochs=1)
    if plugin(trainer).scaler is None:
        pytest.skip("fp16 autocast is not available on this CPU")
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["plugins"]["amp"]["scaler"]["scale"] == plugin(trainer).scaler.get_scale()

    assert state["plugins"]["amp"]["scaler"]["_growth_tracker"] == 5  # one epoch's steps, none overflowed

    resumed = prepare(RunRequest(bn_recipe, ["epochs=2"], ["amp:dtype=fp16"], ["console", "jsonl"], "run2"))
    resumed.load_state_dict(state)  # before set-up, as on resume: the plugin holds it until then
    resumed.hook.setup(trainer=resumed)
    assert plugin(resumed).scaler.state_dict() == state["plugins"]["amp"]["scaler"]
    resumed.fit()  # set-up again is a no-op: the scaler carries on
    assert plugin(resumed).state_dict()["scaler"] != state["plugins"]["amp"]["scaler"]


def test_auto_picks_bf16_on_bf16_hardware_only_and_says_which_and_why(bn_recipe, fp32_metrics, capsys):
    trainer, metrics, warned = train(bn_recipe, "amp:dtype=auto")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("amp: dtype=auto")]
    assert warned == [] and len(said) == 1
    if "amx_bf16" in amp.cpu_flags():  # AMX: bf16 pays
        assert said[0].startswith("amp: dtype=auto chose bf16 autocast: the CPU has AMX bf16")
        assert plugin(trainer).dtype is torch.bfloat16 and trainer.shared.compute_dtype is torch.bfloat16
    else:  # avx512_bf16 alone or nothing: fp32, the same numbers as without the plugin
        assert said[0].startswith("amp: dtype=auto chose fp32: the CPU has ")
        assert plugin(trainer).dtype is None and trainer.shared.compute_dtype is None
        assert_same(metrics, fp32_metrics)

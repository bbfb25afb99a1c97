"""The CIFAR-10 speedrun on the CPU: the recipe and its plugins (lookahead, validation schedule,
deferred JSONL), the normalise-once loader, Muon, and the benchmark that times the recipe
against a bare loop — at toy sizes, on generated data."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import minitrain.engine.registry
from minitrain import hookimpl
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import events as ev
from minitrain.kit.data import ImageLoader, load_cifar10
from minitrain.kit.muon import Muon, orthogonalize
from minitrain.kit.recipe import load_recipe, make_config
from minitrain.testing import EpochLog
from minitrain_plugins import console
from minitrain_plugins.jsonl import JsonlLog
from minitrain_plugins.lookahead import Lookahead

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "cifar10_speedrun.py"
BENCHMARK = ROOT / "benchmarks" / "speedrun.py"
FIRST_PARTY_PLUGINS = {"console", "jsonl", "amp", "tta", "lookahead", "validation"}
TINY = ["widths=[8,16,16]", "batch_size=16", "eval_batch_size=16", "device=cpu"]


def speedrun(fake_cifar, *overrides: str, epochs: int = 2):
    trainer = prepare(
        RunRequest(RECIPE, [f"data_dir={fake_cifar}", f"epochs={epochs}", *TINY, *overrides], [], ["console"], "run")
    )
    log = EpochLog()
    trainer.pm.register(log)
    return trainer, log


def test_recipe_trains_through_the_framework(fake_cifar):
    trainer, log = speedrun(fake_cifar, "whiten_bias_epochs=1", epochs=3)
    metrics = trainer.fit()
    model = trainer.module
    assert trainer.state.global_step == 15  # 80 images, batches of 16
    assert model.blocks[0][0].weight.dtype is torch.bfloat16  # amp: pure bf16, channels-last
    assert model.blocks[0][2].weight.dtype is torch.float32
    assert model.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.whiten.bias.requires_grad  # trained in epoch 1 only
    assert ["val_acc" in m for m in log.metrics] == [False, False, True]  # evaluated once, at the end
    assert metrics == log.metrics[-1] and "val_acc" in metrics
    losses = [m["train_loss"] for m in log.metrics]
    assert losses[2] < losses[1] < losses[0], losses  # it learns
    lookahead = trainer.pm.get_plugin("lookahead")
    assert all(torch.equal(a, t) for a, t in zip(lookahead.average, lookahead.tracked))  # ends on the average
    lines = [json.loads(line) for line in (Path("run") / "events.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "FitStart" and lines[-1]["event"] == "FitEnd"


def test_recipe_option_muon(fake_cifar):
    trainer, _ = speedrun(fake_cifar, "muon=true", epochs=1)
    before = trainer.module.blocks[1][0].weight.detach().clone()
    trainer.fit()
    assert isinstance(trainer.optimizer, Muon)
    filters = trainer.optimizer.param_groups[0]
    assert filters["orthogonalize"] and all(p.ndim == 4 for p in filters["params"])
    assert not torch.equal(before, trainer.module.blocks[1][0].weight)


def test_lookahead_pulls_the_model_toward_its_average_and_keeps_it():
    model = nn.Linear(3, 2)
    plugin = Lookahead(Lookahead.Config(every=2, decay=0.5, ramp=1.0))
    plugin.start(model, total_steps=4)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    plugin.after_step(1)  # not an update step
    assert torch.equal(plugin.average[0], start)
    plugin.after_step(2)  # decay 0.5**2 * (2/4) = 0.125: the average moves 7/8 of the way
    assert torch.allclose(model.weight, start + 0.875)
    assert torch.equal(plugin.average[0], model.weight)

    saved = plugin.state_dict()
    restored = Lookahead(Lookahead.Config(every=2, decay=0.5, ramp=1.0))
    restored.load_state_dict(saved)
    fresh = nn.Linear(3, 2)
    restored.start(fresh, total_steps=4)
    assert torch.equal(restored.average[0], plugin.average[0])
    with torch.no_grad():
        fresh.weight.zero_()
    restored.after_step(4)  # last step: update, then the model keeps the average
    assert torch.equal(fresh.weight, restored.average[0])


def test_lookahead_state_travels_in_the_trainer_state(fake_cifar):
    trainer, _ = speedrun(fake_cifar, epochs=1)
    trainer.fit()
    state = trainer.state_dict()["plugins"]["lookahead"]
    assert len(state["average"]) == len(trainer.pm.get_plugin("lookahead").tracked)


def test_validation_schedule_every_two_epochs(recipe):
    trainer = prepare(RunRequest(recipe, ["epochs=5"], ["validation:every=2"], ["console", "jsonl"], "run"))
    log = EpochLog()
    trainer.pm.register(log)
    trainer.fit()
    assert ["val_acc" in m for m in log.metrics] == [False, True, False, True, True]
    assert trainer.val_loader is not None  # given back


def test_jsonl_on_accelerators_writes_groups_later_in_order(tmp_path):
    plugin = JsonlLog(JsonlLog.Config(flush_every=2))
    start = ev.FitStart(
        epochs=1, start_epoch=1, global_step=0, steps_per_epoch=3, device="cuda", run_dir=str(tmp_path), config={}
    )
    plugin.on_fit_start(start, SimpleNamespace(device=torch.device("meta")))  # any non-CPU device
    path = tmp_path / "events.jsonl"
    sent, written = [start], []
    plugin.on_event(start)
    for step in range(3):
        sent.append(ev.BatchStart(epoch=1, batch_idx=step, global_step=step, batch_size=4))
        sent.append(
            ev.BatchEnd(epoch=1, batch_idx=step, global_step=step + 1, batch_size=4, loss=torch.tensor(float(step)))
        )
        for event in sent[-2:]:
            plugin.on_event(event)
        written.append(len(path.read_text().splitlines()))
    sent.append(ev.EpochEnd(epoch=1, global_step=3, metrics={}))
    plugin.on_event(sent[-1])
    written.append(len(path.read_text().splitlines()))
    sent.append(ev.FitEnd(epochs_completed=1, global_step=3, metrics={}))
    plugin.on_event(sent[-1])
    # groups of 2 steps; the third step's lines wait for the epoch's end, the next event that is not a per-step one
    assert written == [1, 5, 5, 8] and plugin.file is None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == [type(e).__name__ for e in sent]
    assert [line["loss"] for line in lines if line["event"] == "BatchEnd"] == [0.0, 1.0, 2.0]


def test_console_on_accelerators_shows_the_previous_loss_without_waiting(monkeypatch):
    class Copy:  # stands in for the background device-to-host copy
        def __init__(self, tensor):
            self.value, self.landed = tensor.shape[0], False

        def ready(self):
            return self.landed

        def get(self):
            return torch.tensor(float(self.value))

    monkeypatch.setattr(console, "HostCopy", Copy)
    plugin = console.Console(console.Console.Config())
    assert plugin._read("loss", torch.tensor(2.5)) == "2.5000"  # on the CPU: read at once
    assert plugin._read("loss", torch.empty(3, device="meta")) == "-"  # nothing asked for before
    assert plugin._read("loss", torch.empty(4, device="meta")) == "-"  # asked for, not landed yet
    assert plugin._read("grad_norm", torch.empty(7, device="meta")) == "-"  # each value its own copy
    plugin.pending["loss"].landed = True
    assert plugin._read("loss", torch.empty(5, device="meta")) == "4.0000"


def test_normalize_once_gives_the_same_batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (40,), generator=gen)
    options = dict(shuffle=True, crop=2, pad_mode="reflect", flip="alternate", seed=3, channels_last=True)
    once = ImageLoader(images, labels, 16, normalize_once=True, **options)
    each = ImageLoader(images, labels, 16, **options)
    assert once.images.is_floating_point()
    for epoch in range(2):
        once.set_position(epoch)
        each.set_position(epoch)
        for (a, y), (b, z) in zip(once, each):
            assert torch.equal(y, z) and torch.allclose(a, b, atol=1e-6)
            assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(once.normalize(once.images[:4]), once.images[:4])


def test_orthogonalize_keeps_the_shape_and_flattens_the_spectrum():
    matrix = torch.randn(16, 48) * torch.logspace(-2, 1, 48)  # badly conditioned
    result = orthogonalize(matrix, steps=5)
    assert result.shape == matrix.shape and result.dtype == matrix.dtype
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert orthogonalize(matrix.T, steps=5).shape == (48, 16)


def test_muon_without_orthogonalisation_is_nesterov_sgd():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    muon = Muon(a.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, opt in ((a, muon), (b, sgd)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_muon_step_keeps_shapes_and_decreases_a_loss():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, bias=False)
    target = torch.randn(8, 3, 3, 3)
    optimizer = Muon([dict(params=[conv.weight], orthogonalize=True)], lr=0.5, momentum=0.6)
    losses = []
    for _ in range(20):
        loss = (conv.weight - target).square().sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert conv.weight.shape == (8, 3, 3, 3)
    assert losses[-1] < 0.1 * losses[0]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("speedrun_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_loop_trains_exactly_like_the_framework(fake_cifar, tmp_path):
    bench = _load_benchmark()
    recipe = load_recipe(RECIPE)
    config = make_config(recipe, [f"data_dir={fake_cifar}", "epochs=2", *TINY])
    framework_plugins, bare_plugins = bench.plugin_factories(recipe, [], minitrain.engine.registry.discover())
    assert {name for name, _ in framework_plugins()} >= {"console", "jsonl", "amp", "lookahead", "tta"}
    data = [load_cifar10(fake_cifar, train=t) for t in (True, False)]
    timer = bench.Timer(torch.device("cpu"))
    device = torch.device("cpu")
    framework = bench.framework_run(recipe, config, device, data, framework_plugins(), timer, tmp_path / "f")
    bare = bench.bare_run(recipe, config, device, data, bare_plugins(), timer)
    assert framework.acc == bare.acc and framework.seconds > 0 and bare.seconds > 0
    for (name, p), q in zip(framework.model.state_dict().items(), bare.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_sync_check_records_what_happens_in_its_window(recipe, monkeypatch):
    bench = _load_benchmark()
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    class Noisy:
        @hookimpl
        def on_batch_start(self, event):
            warnings.warn(f"sync at {event.global_step}", stacklevel=1)

    check = bench.SyncCheck(first=1, steps=2)
    trainer = prepare(RunRequest(recipe, ["epochs=2"], [], ["console", "jsonl"], "run"))
    trainer.pm.register(Noisy(), name="noisy")
    trainer.pm.register(check, name="sync_check")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    assert modes == ["warn", "default"] and check.done
    assert [str(w.message) for w in check.caught] == ["sync at 1", "sync at 2"]
    assert trainer.state.global_step == 3 and trainer.state.stop_reason == "sync check done"


def test_benchmark_cpu_mode_end_to_end(fake_cifar, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--device",
            "cpu",
            "--data-dir",
            str(fake_cifar),
            "--epochs",
            "1",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--set",
            "widths=[8,16,16]",
            "--set",
            "batch_size=16",
            "--set",
            "eval_batch_size=16",
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tail = result.stdout.strip().splitlines()[-4:]
    assert tail[1].startswith("minitrain Trainer") and tail[2].startswith("bare loop")
    assert tail[3].startswith("framework / bare median time:")
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert len(runs["framework"]) == len(runs["bare"]) == 1
    assert (tmp_path / "work" / "console.log").read_text().startswith("training 1 epochs")

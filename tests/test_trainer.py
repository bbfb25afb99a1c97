"""The Trainer end to end on generated CIFAR-10: run directory, event order, metrics, learning,
stop requests, pipeline overrides and wrappers, exact resume, failures, and no per-step syncs."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minitrain
from minitrain.commands import cli
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import events as ev
from minitrain.kit.data import cifar10_loaders

STEPS = 5  # 80 fake training images in batches of 16


def _event_names(run_dir: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _expected_order(epochs: int, steps: int = STEPS) -> list[str]:
    names = ["FitStart"]
    for _ in range(epochs):
        names += ["EpochStart"] + ["BatchStart", "BatchEnd"] * steps
        names += ["ValidationStart", "ValidationEnd", "EpochEnd"]
    return names + ["FitEnd"]


def _model(dropout: float = 0.0) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Dropout(dropout), torch.nn.Linear(48, 10)
    )


def _trainer(data_dir, plugins=(), epochs=1, dropout=0.0, augment=False, seed=0, **kwargs) -> minitrain.Trainer:
    torch.manual_seed(seed)
    train, test = cifar10_loaders(
        data_dir, 16, device="cpu", seed=seed, crop=2 if augment else 0, flip="random" if augment else "none"
    )
    model = _model(dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    return minitrain.Trainer(model, optimizer, train, test, epochs=epochs, device="cpu", plugins=plugins, **kwargs)


# --- whole runs ----------------------------------------------------------------------------------


def test_one_epoch_through_prepare(recipe, tmp_path):
    run_dir = tmp_path / "run"
    trainer = prepare(RunRequest(recipe, run_dir=run_dir, disabled=["console"]))
    assert trainer.epochs == 1 and trainer.device == torch.device("cpu")
    metrics = trainer.fit()

    assert set(metrics) == {"train_loss", "lr", "epoch_time", "samples_per_s", "val_loss", "val_acc"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["lr"] == 0.2 and metrics["samples_per_s"] == pytest.approx(STEPS * 16 / metrics["epoch_time"])
    assert (trainer.state.epoch, trainer.state.batch_idx, trainer.state.global_step) == (1, 0, STEPS)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == 1 and config["batch_size"] == 16 and config["lr"] == 0.2
    assert config["device"] == "cpu" and config["augment"] is False
    run = json.loads((run_dir / "run.json").read_text())
    assert run["recipe"] == str(recipe) and set(run["plugins"]) == {"jsonl"}
    assert run["plugins"]["jsonl"]["filename"] == "events.jsonl"

    lines = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == _expected_order(1)
    fit_start, fit_end = lines[0], lines[-1]
    assert fit_start["config"] == config and fit_start["steps_per_epoch"] == STEPS
    assert fit_start["run_dir"] == str(run_dir) and fit_start["device"] == "cpu"
    assert fit_end["stop_reason"] is None and fit_end["epochs_completed"] == 1
    assert fit_end["metrics"] == lines[-2]["metrics"] == metrics | {}
    batch_ends = [line for line in lines if line["event"] == "BatchEnd"]
    assert [b["batch_idx"] for b in batch_ends] == list(range(STEPS))
    assert [b["global_step"] for b in batch_ends] == list(range(1, STEPS + 1))
    assert all(isinstance(b["loss"], float) and b["batch_size"] == 16 for b in batch_ends)
    assert sum(b["loss"] for b in batch_ends) / STEPS == pytest.approx(metrics["train_loss"], rel=1e-5)
    val_end = next(line for line in lines if line["event"] == "ValidationEnd")
    assert sum(map(sum, val_end["confusion"])) == 32 and len(val_end["confusion"]) == 10
    assert val_end["metrics"]["val_acc"] == pytest.approx(sum(val_end["confusion"][i][i] for i in range(10)) / 32)
    assert {key: metrics[key] for key in val_end["metrics"]} == val_end["metrics"]  # the epoch reports them
    # every line replays into its event class
    assert all(type(ev.Event.from_json(json.dumps(line))).__name__ == line["event"] for line in lines)


def test_two_epochs_through_cli(recipe, tmp_path, capsys):
    run_dir = tmp_path / "cli-run"
    code = cli.main(["run", str(recipe), "--run-dir", str(run_dir), "--set", "epochs=2", "--set", "lr=0.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"done: 2 epochs, {2 * STEPS} steps" in out and str(run_dir) in out
    assert "training 2 epochs on cpu" in out and "epoch 2/2:" in out  # the console plugin is on by default
    assert "Traceback" not in err
    assert _event_names(run_dir) == _expected_order(2)
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.1
    epoch_ends = [
        json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if '"EpochEnd"' in line
    ]
    assert [e["epoch"] for e in epoch_ends] == [1, 2] and [e["global_step"] for e in epoch_ends] == [5, 10]


def test_cli_run_with_jsonl_options_and_no_console(recipe, tmp_path, capsys):
    run_dir = tmp_path / "r"
    code = cli.main(
        [
            "run",
            str(recipe),
            "--run-dir",
            str(run_dir),
            "--no-plugin",
            "console",
            "--plugin",
            "jsonl:filename=log.jsonl",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "training" not in out  # console is off
    assert not (run_dir / "events.jsonl").exists() and (run_dir / "log.jsonl").is_file()


def test_model_learns_the_fake_data(fake_cifar):
    losses = []

    class Track:
        @minitrain.hookimpl
        def on_epoch_end(self, event):
            losses.append(event.metrics)

    metrics = _trainer(fake_cifar, [Track()], epochs=4).fit()
    train = [m["train_loss"] for m in losses]
    assert train[-1] < train[0] * 0.5, train
    assert train[1] < train[0], train
    assert metrics["val_acc"] > 0.5 and metrics["val_loss"] < losses[0]["val_loss"]


def test_epoch_scheduler_steps_after_the_epoch(fake_cifar):
    lrs = []

    class Track:
        @minitrain.hookimpl
        def on_epoch_end(self, event):
            lrs.append(event.metrics["lr"])

    trainer = _trainer(fake_cifar, [Track()], epochs=3)
    trainer.scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
    trainer.fit()
    assert lrs == pytest.approx([0.2, 0.1, 0.05])  # the lr each epoch trained with


def test_step_scheduler_steps_every_batch(fake_cifar):
    trainer = _trainer(fake_cifar, epochs=2, scheduler_interval="step")
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1 / (1 + step))
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 / (1 + 2 * STEPS))


def test_bad_scheduler_interval(fake_cifar):
    with pytest.raises(minitrain.MinitrainError, match="scheduler_interval"):
        _trainer(fake_cifar, scheduler_interval="batch")


def test_plain_iterable_loader_without_validation():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    model = torch.nn.Linear(3, 2)
    seen = []

    class Track:
        @minitrain.hookimpl
        def on_event(self, event):
            seen.append(type(event).__name__)

    trainer = minitrain.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        iter_forever(batches),
        epochs=2,
        device="cpu",
        plugins=[Track()],
    )
    metrics = trainer.fit()
    assert "val_loss" not in metrics and trainer.state.global_step == 6
    assert seen == [n for n in _expected_order(2, steps=3) if not n.startswith("Validation")]


class iter_forever:
    """A re-iterable list without len(): the loop must not need one."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


# --- plugins steering the loop -------------------------------------------------------------------


def test_request_stop_mid_epoch(fake_cifar, collect_events):
    class StopAtThree:
        @minitrain.hookimpl
        def on_batch_end(self, event, trainer):
            if event.global_step == 3:
                trainer.request_stop("enough at step 3")

    recorder = collect_events()
    trainer = _trainer(fake_cifar, [StopAtThree(), recorder], epochs=3)
    trainer.fit()
    fit_end = recorder.events[-1]
    assert isinstance(fit_end, ev.FitEnd)
    assert fit_end.stop_reason == "enough at step 3"
    assert fit_end.global_step == 3 and fit_end.epochs_completed == 0
    assert recorder.names().count("BatchEnd") == 3 and "EpochEnd" not in recorder.names()
    assert (trainer.state.epoch, trainer.state.batch_idx) == (0, 3)  # resumable from here


def test_request_stop_at_epoch_end(fake_cifar, collect_events):
    class StopAfterFirst:
        @minitrain.hookimpl
        def on_epoch_end(self, event, trainer):
            trainer.request_stop(f"stopped after epoch {event.epoch}")

    recorder = collect_events()
    _trainer(fake_cifar, [StopAfterFirst(), recorder], epochs=5).fit()
    assert recorder.names().count("EpochEnd") == 1
    assert recorder.events[-1].stop_reason == "stopped after epoch 1"
    assert recorder.events[-1].epochs_completed == 1


def test_train_step_override_wins_over_default(fake_cifar, collect_events):
    returned = []

    class CustomLoss:
        @minitrain.hookimpl
        def train_step(self, trainer, batch):
            inputs, targets = batch
            loss = trainer.model(inputs).pow(2).mean()  # a different objective
            returned.append(loss)
            return loss

    default_calls = []
    recorder = collect_events()
    trainer = _trainer(fake_cifar, [CustomLoss(), recorder])
    trainer.loss_fn = lambda logits, targets: (
        default_calls.append(1) or torch.nn.functional.cross_entropy(logits, targets)
    )
    trainer.fit()
    assert default_calls == []  # the default train_step never ran
    losses = [e.loss for e in recorder.events if isinstance(e, ev.BatchEnd)]
    assert len(losses) == len(returned) == STEPS
    assert all(torch.equal(loss, r.detach()) for loss, r in zip(losses, returned))


def test_train_step_wrapper_sees_and_can_change_the_result(fake_cifar, collect_events):
    class Doubler:
        def __init__(self):
            self.seen = []

        @minitrain.hookimpl(wrapper=True)
        def train_step(self, trainer, batch):
            loss = yield
            self.seen.append(loss)
            return loss * 2

    doubler, recorder = Doubler(), collect_events()
    _trainer(fake_cifar, [doubler, recorder]).fit()
    assert len(doubler.seen) == STEPS
    assert all(loss.requires_grad and loss.dim() == 0 for loss in doubler.seen)  # the default's result
    losses = [e.loss for e in recorder.events if isinstance(e, ev.BatchEnd)]
    assert all(torch.allclose(loss, 2 * s.detach()) for loss, s in zip(losses, doubler.seen))


def test_optimizer_step_override_can_skip_updates(fake_cifar):
    class Frozen:
        @minitrain.hookimpl
        def optimizer_step(self, trainer):
            trainer.optimizer.zero_grad(set_to_none=True)
            return True  # handled: the default does not step

    trainer = _trainer(fake_cifar, [Frozen()])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert all(torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert trainer.state.global_step == STEPS


def test_setup_hook_can_replace_the_model(fake_cifar):
    class Wrap:
        @minitrain.hookimpl
        def setup(self, trainer):
            trainer.model = torch.nn.Sequential(trainer.module)  # e.g. what DDP or compile would do

    trainer = _trainer(fake_cifar, [Wrap()])
    trainer.fit()
    assert trainer.model is not trainer.module and trainer.model[0] is trainer.module
    assert set(trainer.state_dict()["model"]) == set(trainer.module.state_dict())  # unwrapped weights


def test_exception_in_train_step_is_announced_and_reraised(fake_cifar, tmp_path, collect_events):
    from minitrain_plugins.jsonl import JsonlLog

    class Exploding:
        @minitrain.hookimpl
        def train_step(self, trainer, batch):
            if trainer.state.global_step == 2:
                raise RuntimeError("kaboom at step 2")

    recorder = collect_events()
    trainer = _trainer(fake_cifar, [Exploding(), recorder, JsonlLog(JsonlLog.Config())], run_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="kaboom at step 2"):
        trainer.fit()
    last = recorder.events[-1]
    assert isinstance(last, ev.ExceptionRaised)
    assert last.error_type == "RuntimeError" and last.message == "kaboom at step 2"
    assert last.global_step == 2 and last.epoch == 1
    assert "Traceback" in last.traceback and "kaboom" in last.traceback
    assert "FitEnd" not in recorder.names()
    # the JSONL log got it too, as its last line
    names = _event_names(tmp_path)
    assert names[-1] == "ExceptionRaised" and names.count("BatchEnd") == 2


def test_keyboard_interrupt_is_announced_and_reraised(fake_cifar, collect_events):
    class CtrlC:
        @minitrain.hookimpl
        def on_batch_start(self, event):
            if event.global_step == 1:
                raise KeyboardInterrupt

    recorder = collect_events()
    with pytest.raises(KeyboardInterrupt):
        _trainer(fake_cifar, [CtrlC(), recorder]).fit()
    assert isinstance(recorder.events[-1], ev.Interrupted)
    assert recorder.events[-1].global_step == 1


# --- state ---------------------------------------------------------------------------------------


def _roundtrip(state):
    """Through bytes, as a checkpoint would: must load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_restores_progress_and_rng(fake_cifar):
    trainer = _trainer(fake_cifar, epochs=2)
    trainer.fit()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    np.random.normal()  # leaves a cached gauss in the legacy state
    state = _roundtrip(trainer.state_dict())
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))

    other = _trainer(fake_cifar, epochs=2, seed=123)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    other.load_state_dict(state)
    assert (other.state.epoch, other.state.batch_idx, other.state.global_step) == (2, 0, 2 * STEPS)
    assert other.state.metrics == trainer.state.metrics
    assert (random.random(), np.random.rand(3).tolist()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    for a, b in zip(trainer.module.state_dict().values(), other.module.state_dict().values()):
        assert torch.equal(a, b)
    assert other.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()


def test_stateful_plugin_state_travels_with_the_trainer(fake_cifar):
    class Counter:
        name = "counter"

        def __init__(self):
            self.batches = 0

        @minitrain.hookimpl
        def on_batch_end(self):
            self.batches += 1

        def state_dict(self):
            return {"batches": self.batches}

        def load_state_dict(self, state):
            self.batches = state["batches"]

    trainer = _trainer(fake_cifar, [Counter()])
    trainer.fit()
    state = _roundtrip(trainer.state_dict())
    assert state["plugins"] == {"counter": {"batches": STEPS}}
    fresh = Counter()
    _trainer(fake_cifar, [fresh]).load_state_dict(state)
    assert fresh.batches == STEPS


def test_exact_resume_mid_epoch_matches_uninterrupted_run(fake_cifar, collect_events):
    """Stop inside epoch 1, save, rebuild everything from scratch, load, continue: the weights,
    the losses and the metrics equal those of a run that was never interrupted (shuffling,
    random crops/flips and dropout included)."""
    straight_rec = collect_events()
    straight = _trainer(fake_cifar, [straight_rec], epochs=3, dropout=0.3, augment=True)
    torch.manual_seed(42)
    straight.fit()

    class StopAt:
        @minitrain.hookimpl
        def on_batch_end(self, event, trainer):
            if event.global_step == STEPS + 2:
                trainer.request_stop("preempted")

    first_rec = collect_events()
    first = _trainer(fake_cifar, [StopAt(), first_rec], epochs=3, dropout=0.3, augment=True)
    torch.manual_seed(42)
    first.fit()
    assert (first.state.epoch, first.state.batch_idx, first.state.global_step) == (1, 2, STEPS + 2)
    state = _roundtrip(first.state_dict())

    torch.manual_seed(999)  # whatever happens between the two processes
    second_rec = collect_events()
    second = _trainer(fake_cifar, [second_rec], epochs=3, dropout=0.3, augment=True, seed=0)
    second.load_state_dict(state)
    second.fit()

    for a, b in zip(straight.module.state_dict().values(), second.module.state_dict().values()):
        assert torch.equal(a, b)
    assert second.state.metrics["train_loss"] == straight.state.metrics["train_loss"]
    assert second.state.metrics["val_loss"] == straight.state.metrics["val_loss"]

    def losses(rec):
        return [(e.global_step, float(e.loss)) for e in rec.events if isinstance(e, ev.BatchEnd)]

    assert losses(first_rec) + losses(second_rec) == losses(straight_rec)
    resumed_start = second_rec.events[0]
    assert isinstance(resumed_start, ev.FitStart) and resumed_start.start_epoch == 2
    assert resumed_start.global_step == STEPS + 2
    # epoch 1's mean train loss covers the batches before and after the interruption
    epoch1 = [e for e in straight_rec.events if isinstance(e, ev.EpochEnd)][1].metrics["train_loss"]
    assert [e for e in second_rec.events if isinstance(e, ev.EpochEnd)][0].metrics["train_loss"] == epoch1


def test_resume_with_a_plain_loader_fast_forwards():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(4)]
    seen = []

    class Spy:
        @minitrain.hookimpl
        def train_step(self, batch):
            seen.append(batch)

    model = torch.nn.Linear(3, 2)
    trainer = minitrain.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), batches, epochs=1, device="cpu", plugins=[Spy()]
    )
    trainer.state.batch_idx = 3
    trainer.fit()
    assert len(seen) == 1 and seen[0] is batches[3]
    assert trainer.state.global_step == 1


# --- no host-device sync -------------------------------------------------------------------------


def test_emitting_batch_end_keeps_the_tensor(fake_cifar):
    """A CUDA-free proxy for "emitting never syncs": the loss a plugin receives is the very tensor
    the loop produced, not a number read from it."""
    received = []

    class Keep:
        @minitrain.hookimpl
        def on_batch_end(self, event):
            received.append(event.loss)

    trainer = _trainer(fake_cifar, [Keep()])
    loss = torch.tensor(0.5)
    event = ev.BatchEnd(epoch=1, batch_idx=0, global_step=1, batch_size=4, loss=loss)
    trainer.emit(event)
    assert received[0] is loss
    received.clear()
    trainer.fit()
    assert len(received) == STEPS
    assert all(isinstance(loss, torch.Tensor) and not loss.requires_grad for loss in received)


SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")


def test_loop_reads_device_values_once_per_epoch(fake_cifar, monkeypatch):
    """With no plugin reading them, the core reads tensors back only at epoch end: the train
    loss once, then validation's loss and metrics (accuracy, confusion matrix) together. Not per step."""
    minitrain_dir = str(Path(minitrain.__file__).parent)
    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(minitrain_dir):
                reads.append((name, Path(caller.f_code.co_filename).name, caller.f_code.co_name))
            return original(self, *args, **kwargs)

        return wrapper

    trainer = _trainer(fake_cifar, epochs=3)  # SGD: no optimizer-internal .item() either
    with monkeypatch.context() as patch:
        for name in SYNCING:
            patch.setattr(torch.Tensor, name, spy(name))
        trainer.fit()
    per_epoch = [("item", "trainer.py", "_train_epoch"), ("tolist", "metrics.py", "results")]
    assert sorted(reads) == sorted(per_epoch * 3), reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_device_sync_between_epoch_boundaries_on_cuda(fake_cifar, collect_events):
    """On a GPU, with the data resident on the device, every step of an epoch (loading, augmenting,
    train_step, backward, optimizer_step, emitting BatchStart/BatchEnd) runs under CUDA's
    sync-debug 'error' mode: any host-device synchronisation raises."""
    train, test = cifar10_loaders(fake_cifar, 16, device="cuda", resident=True, crop=2, flip="random")
    model = _model(0.1)
    recorder = collect_events()

    class SyncGuard:
        @minitrain.hookimpl
        def on_epoch_start(self):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

        @minitrain.hookimpl
        def on_batch_end(self, event):
            if event.batch_idx == STEPS - 1:
                torch.cuda.set_sync_debug_mode("default")

    trainer = minitrain.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        train,
        test,
        epochs=2,
        device="cuda",
        plugins=[SyncGuard(), recorder],
    )
    try:
        trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert recorder.names().count("BatchEnd") == 2 * STEPS
    assert all(e.loss.is_cuda for e in recorder.events if isinstance(e, ev.BatchEnd))

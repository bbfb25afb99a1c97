"""Faults injected into running training: plugins that raise (observers are disabled, critical
plugins stop the run cleanly), SIGINT/SIGTERM (stop at a step boundary, checkpoint, resume
exactly; a second signal aborts at once), and NaN/inf losses (stop without saving them, or skip)."""

from __future__ import annotations

import math
import signal
import threading
import warnings

import pytest
import torch

import minitrain
import minitrain.engine.registry
from minitrain.commands import cli
from minitrain.engine import checkpointing
from minitrain.engine import events as ev
from minitrain.engine.errors import MinitrainError, NonFiniteError, TrainingInterrupted
from minitrain.engine.registry import ObserverFailed, PluginInfo, instantiate, role_of
from minitrain.kit.data import cifar10_loaders
from minitrain_plugins.checkpoint import Checkpoint
from minitrain_plugins.jsonl import JsonlLog

STEPS = 5  # 80 fake training images in batches of 16


def make_trainer(data_dir, plugins=(), epochs=2, run_dir=None, **kwargs) -> minitrain.Trainer:
    torch.manual_seed(0)
    train, test = cifar10_loaders(data_dir, 16, device="cpu", seed=0, crop=2, flip="random")
    model = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    return minitrain.Trainer(
        model,
        optimizer,
        train,
        test,
        epochs=epochs,
        device="cpu",
        plugins=plugins,
        run_dir=None if run_dir is None else str(run_dir),
        **kwargs,
    )


def checkpoint(**options) -> Checkpoint:
    return Checkpoint(Checkpoint.Config(**options))


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


class Failing:
    """Raises from one notification hook at one step. Runs first (tryfirst), so that the other
    plugins' implementations of the same call come after it."""

    name = "failing"

    def __init__(self, step=3, role=None):
        self.step, self.calls = step, 0
        if role:
            self.role = role

    @minitrain.hookimpl(tryfirst=True)
    def on_batch_end(self, event):
        self.calls += 1
        if event.global_step == self.step:
            raise ValueError(f"lost the connection at step {self.step}")


class Recorder:
    name = "recorder"

    def __init__(self):
        self.events = []

    @minitrain.hookimpl
    def on_batch_end(self, event):
        self.events.append(event)

    @minitrain.hookimpl
    def on_event(self, event):
        if not isinstance(event, ev.BatchEnd):
            self.events.append(event)

    def names(self):
        return [type(e).__name__ for e in self.events]


# --- roles ---------------------------------------------------------------------------------------


def test_default_roles_follow_the_hooks_implemented():
    class Watches:
        @minitrain.hookimpl
        def on_epoch_end(self, event):
            pass

    class Steers:
        @minitrain.hookimpl(wrapper=True)
        def train_step(self):
            return (yield)

    class Declares(Watches):
        role = "critical"

    assert [role_of(p()) for p in (Watches, Steers, Declares)] == ["observer", "critical", "critical"]


def test_first_party_roles(real_discover):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = real_discover()
    expected = {
        "checkpoint": "critical",
        "amp": "critical",
        "tta": "critical",
        "early_stopping": "critical",
        "lookahead": "critical",
        "console": "observer",
        "jsonl": "observer",
        "csv": "observer",
        "tensorboard": "observer",
        "viz": "observer",
    }
    assert {name: role_of(found[name].target) for name in expected if found[name].error is None} == expected


def test_role_option_is_taken_out_before_the_plugin_config():
    plugin = instantiate(PluginInfo("jsonl", target=JsonlLog), {"role": "critical", "flush_every": "3"})
    assert plugin.role == "critical" and plugin.config.flush_every == 3
    assert role_of(instantiate(PluginInfo("jsonl", target=JsonlLog), {})) == "observer"

    class NoConfig:
        pass

    assert instantiate(PluginInfo("bare", target=NoConfig), {"role": "critical"}).role == "critical"
    with pytest.raises(MinitrainError, match=r"plugin 'jsonl': role must be 'critical' or 'observer' \(got 'boss'\)"):
        instantiate(PluginInfo("jsonl", target=JsonlLog), {"role": "boss"})


# --- an observer that raises ---------------------------------------------------------------------


def test_a_failing_observer_is_disabled_and_training_goes_on(fake_cifar, tmp_path):
    failing, recorder = Failing(step=3), Recorder()
    trainer = make_trainer(fake_cifar, [failing, recorder, JsonlLog(JsonlLog.Config())], run_dir=tmp_path)
    with pytest.warns(ObserverFailed) as caught:
        trainer.fit()
    assert len(caught) == 1  # one warning, naming plugin, hook and error, and where the traceback is
    message = str(caught[0].message)
    for part in (
        "'failing'",
        "on_batch_end",
        "ValueError: lost the connection at step 3",
        "disabled for the rest of the run",
        str(tmp_path / "errors.log"),
    ):
        assert part in message
    log = (tmp_path / "errors.log").read_text()
    assert "Traceback" in log and "lost the connection at step 3" in log and "'failing'" in log

    assert failing.calls == 3 and "failing" not in dict(trainer.pm.list_name_plugin())
    steps = [e.global_step for e in recorder.events if isinstance(e, ev.BatchEnd)]
    assert steps == list(range(1, 2 * STEPS + 1))  # step 3 included: the event it failed on
    assert recorder.names()[-1] == "FitEnd" and trainer.state.global_step == 2 * STEPS
    logged = (tmp_path / "events.jsonl").read_text().splitlines()
    assert sum('"BatchEnd"' in line for line in logged) == 2 * STEPS and '"FitEnd"' in logged[-1]


@pytest.mark.filterwarnings("always::minitrain.engine.registry.ObserverFailed")  # printed by the CLI, not raised
def test_observer_failing_through_the_cli(install_dist, recipe, tmp_path, capsys):
    install_dist(
        "flaky_logger",
        """
        import minitrain

        class FlakyLogger:
            @minitrain.hookimpl
            def on_epoch_end(self, event):
                raise ConnectionError("metrics server unreachable")
    """,
        {"flaky": "flaky_logger:FlakyLogger"},
    )
    run = tmp_path / "run"
    assert cli.main(["run", str(recipe), "--plugin", "flaky", "--set", "epochs=2", "--run-dir", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "done: 2 epochs" in out
    assert err.count("minitrain: warning:") == 1 and "Traceback" not in err
    assert "'flaky' failed in on_epoch_end (ConnectionError: metrics server unreachable)" in err
    assert "ConnectionError" in (run / "errors.log").read_text()


def test_an_observer_made_critical_stops_the_run(install_dist, recipe, tmp_path, capsys):
    install_dist(
        "flaky_logger2",
        """
        import minitrain

        class FlakyLogger:
            @minitrain.hookimpl
            def on_epoch_end(self, event):
                raise ConnectionError("metrics server unreachable")
    """,
        {"flaky2": "flaky_logger2:FlakyLogger"},
    )
    assert cli.main(["run", str(recipe), "--plugin", "flaky2:role=critical", "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "minitrain: error: training failed in epoch 1, step 5: ConnectionError: metrics server unreachable "
        f"(traceback in {tmp_path / 'r' / 'errors.log'}); --debug shows the traceback"
    )
    assert "ConnectionError: metrics server unreachable" in (tmp_path / "r" / "errors.log").read_text()


# --- a critical plugin that raises ---------------------------------------------------------------


class BrokenOnBatchStart:
    """A critical plugin failing between two batches (as the batch after ``step`` begins)."""

    role = "critical"

    def __init__(self, step):
        self.step = step

    @minitrain.hookimpl
    def on_batch_start(self, event):
        if event.global_step == self.step:
            raise RuntimeError("disk quota exceeded")


class BrokenOnFailure:
    """Critical, and fails again while the run is stopping."""

    role = "critical"

    @minitrain.hookimpl(tryfirst=True)
    def on_exception_raised(self):
        raise OSError("cannot flush")


def test_a_failing_critical_plugin_stops_the_run_cleanly(fake_cifar, tmp_path):
    recorder = Recorder()
    trainer = make_trainer(
        fake_cifar,
        [BrokenOnBatchStart(7), BrokenOnFailure(), recorder, checkpoint(), JsonlLog(JsonlLog.Config())],
        run_dir=tmp_path,
    )
    with (
        pytest.warns(
            UserWarning,
            match="'brokenonfailure' failed in on_exception_raised while the run was "
            "stopping \\(OSError: cannot flush\\)",
        ),
        pytest.raises(RuntimeError, match="disk quota exceeded"),
    ):
        trainer.fit()
    # every plugin saw the failure, even though one of them failed again on it
    assert isinstance(recorder.events[-1], ev.ExceptionRaised) and recorder.events[-1].global_step == 7
    assert '"ExceptionRaised"' in (tmp_path / "events.jsonl").read_text().splitlines()[-1]
    # a final checkpoint, of the state between steps 7 and 8
    assert checkpointing.load(tmp_path / "checkpoints" / "last.pt")["header"]["global_step"] == 7
    log = (tmp_path / "errors.log").read_text()
    assert "disk quota exceeded" in log and "cannot flush" in log


# --- signals -------------------------------------------------------------------------------------


class SendSignal:
    """Sends itself a signal ``times`` times when ``step`` steps are done, or inside the next
    step's forward pass."""

    def __init__(self, step, signum, times=1, inside_step=False):
        self.step, self.signum, self.times, self.inside_step = step, signum, times, inside_step

    def _send(self, global_step):
        if global_step == self.step:
            for _ in range(self.times):
                signal.raise_signal(self.signum)

    @minitrain.hookimpl
    def on_batch_end(self, event):
        if not self.inside_step:
            self._send(event.global_step)

    @minitrain.hookimpl(wrapper=True)
    def train_step(self, trainer):
        loss = yield
        if self.inside_step:
            self._send(trainer.state.global_step)
        return loss


@pytest.mark.parametrize("signum, name, code", [(signal.SIGINT, "SIGINT", 130), (signal.SIGTERM, "SIGTERM", 143)])
def test_a_signal_stops_at_the_step_boundary_saves_and_resumes_exactly(fake_cifar, tmp_path, signum, name, code):
    straight = make_trainer(fake_cifar)
    straight.fit()

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    recorder = Recorder()
    trainer = make_trainer(fake_cifar, [SendSignal(3, signum), recorder, checkpoint(every=0)], run_dir=tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert (info.value.signal, info.value.graceful, info.value.exit_code) == (name, True, code)
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back
    assert trainer.state.global_step == 3 and recorder.names()[-1] == "Interrupted"
    assert recorder.events[-1].signal == name and recorder.events[-1].global_step == 3
    assert checkpointing.load(tmp_path / "checkpoints" / "last.pt")["header"]["global_step"] == 3

    resumed = make_trainer(fake_cifar, [checkpoint(every=0)], run_dir=tmp_path)
    assert checkpointing.resume(resumed, "auto") is not None and resumed.state.global_step == 3
    resumed.fit()
    for key, value in weights(straight).items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key


def test_a_second_signal_aborts_at_once(fake_cifar, tmp_path):
    recorder = Recorder()
    trainer = make_trainer(
        fake_cifar,
        [SendSignal(2, signal.SIGINT, times=2, inside_step=True), recorder, checkpoint(every=0)],
        run_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="inside a batch"), pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.graceful is False and isinstance(info.value, KeyboardInterrupt)
    assert trainer.state.global_step == 2 and recorder.names()[-1] == "Interrupted"
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # never a half-applied step


def test_fit_outside_the_main_thread_leaves_signals_alone(fake_cifar):
    errors = []
    thread = threading.Thread(target=lambda: _collect_errors(errors, make_trainer(fake_cifar, epochs=1).fit))
    thread.start()
    thread.join()
    assert errors == []


def _collect_errors(errors, function):
    try:
        function()
    except Exception as exc:  # signal.signal raises ValueError outside the main thread
        errors.append(exc)


# --- non-finite losses ---------------------------------------------------------------------------


class PoisonLoss:
    """Turns the loss of chosen steps (1-based) into NaN, as an overflow would."""

    role = "critical"

    def __init__(self, *steps):
        self.steps = set(steps)

    @minitrain.hookimpl(wrapper=True)
    def train_step(self, trainer):
        loss = yield
        return loss * math.nan if trainer.state.global_step + 1 in self.steps else loss


def test_a_nan_loss_stops_the_run_at_the_epoch_end_read(fake_cifar, tmp_path):
    trainer = make_trainer(fake_cifar, [PoisonLoss(7)], epochs=3, run_dir=tmp_path)
    with pytest.raises(NonFiniteError, match=r"non-finite training loss \(nan\) in epoch 2, steps 6-10; stopped"):
        trainer.fit()
    assert trainer.state.epoch == 1  # epoch 2 never ended: no EpochEnd, nothing saved from it


def test_a_checkpoint_never_holds_a_nan_state(fake_cifar, tmp_path):
    recorder = Recorder()
    trainer = make_trainer(fake_cifar, [PoisonLoss(7), recorder, checkpoint(every_steps=2)], epochs=3, run_dir=tmp_path)
    with (
        pytest.warns(UserWarning, match="not saving a state with non-finite values; last.pt holds step 6"),
        pytest.raises(NonFiniteError, match=r"epoch 2, steps 7-8"),
    ):
        trainer.fit()
    assert trainer.state.global_step == 8  # found at the save after step 8, stopped right there
    assert isinstance(recorder.events[-1], ev.ExceptionRaised) and recorder.events[-1].error_type == "NonFiniteError"
    saved = checkpointing.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["header"]["global_step"] == 6 and all_finite(saved["trainer"]["model"])
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        assert all_finite(checkpointing.load(path)["trainer"]["model"]), path


class PoisonWeights:
    """A finite loss whose step still leaves infinite weights (an overflowing gradient)."""

    role = "critical"

    @minitrain.hookimpl(tryfirst=True)
    def on_batch_end(self, event, trainer):
        if event.global_step == 4:
            with torch.no_grad():
                trainer.module[2].bias[3] = math.inf


def test_non_finite_weights_are_not_saved_either(fake_cifar, tmp_path):
    trainer = make_trainer(fake_cifar, [PoisonWeights(), checkpoint(every_steps=1)], run_dir=tmp_path)
    with (
        pytest.warns(UserWarning, match="last.pt holds step 3"),
        pytest.raises(NonFiniteError, match=r"non-finite weights after step 4 \(2.bias\)"),
    ):
        trainer.fit()
    assert checkpointing.load(tmp_path / "checkpoints" / "last.pt")["header"]["global_step"] == 3


def test_skip_policy_skips_exactly_the_non_finite_steps(fake_cifar):
    class Updates:
        def __init__(self):
            self.steps = []

        @minitrain.hookimpl(wrapper=True)
        def optimizer_step(self, trainer):
            self.steps.append(trainer.state.global_step + 1)
            return (yield)

    updates = Updates()
    trainer = make_trainer(fake_cifar, [PoisonLoss(3, 7), updates], nonfinite_loss="skip")
    with pytest.warns(UserWarning, match=r"epoch \d: skipped 1 step\(s\) with a non-finite loss") as caught:
        metrics = trainer.fit()
    assert len(caught) == 2  # one per epoch
    assert updates.steps == [s for s in range(1, 2 * STEPS + 1) if s not in (3, 7)]
    assert trainer.state.global_step == 2 * STEPS and metrics["skipped_steps"] == 1.0
    assert math.isfinite(metrics["train_loss"]) and all_finite(trainer.module.state_dict())


def test_nonfinite_policy_is_validated(fake_cifar, recipe, capsys):
    with pytest.raises(MinitrainError, match="nonfinite_loss must be 'stop' or 'skip'"):
        make_trainer(fake_cifar, nonfinite_loss="ignore")
    assert cli.main(["run", str(recipe), "--set", "nonfinite_loss=ignore"]) == 2
    assert "nonfinite_loss" in capsys.readouterr().err


NAN_RECIPE = """
import math

import torch
import torch.nn.functional as F
from torch import nn

import minitrain
from minitrain.kit.data import cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = 2
    batch_size: int = 16
    device: str = "cpu"


def build(config, device):
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device)
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))
    calls = []

    def loss_fn(logits, targets):  # the fourth batch's loss overflows
        calls.append(1)
        return F.cross_entropy(logits, targets) * (math.inf if len(calls) == 4 else 1.0)

    return minitrain.Components(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                train_loader=train, val_loader=test, loss_fn=loss_fn)
"""


def test_nonfinite_through_the_cli(write_recipe, fake_cifar, tmp_path, capsys):
    path = write_recipe(NAN_RECIPE, "nan_recipe.py")
    args = ["run", str(path), "--set", f"data_dir={fake_cifar}", "--no-plugin", "console"]
    assert cli.main(args + ["--run-dir", str(tmp_path / "a")]) == 1  # a run that failed, not bad input
    err = capsys.readouterr().err
    assert "minitrain: error: non-finite training loss (nan) in epoch 1, steps 1-5" in err
    assert cli.main(args + ["--run-dir", str(tmp_path / "b"), "--set", "nonfinite_loss=skip"]) == 0
    assert "skipped 1 step(s)" in capsys.readouterr().err


def test_cli_interrupted_without_a_checkpoint_says_so(recipe, tmp_path, capsys):
    path = tmp_path / "ctrl_c_recipe.py"
    path.write_text(
        recipe.read_text()
        + """
import signal


class CtrlC:
    @minitrain.hookimpl
    def on_batch_end(self, event):
        if event.global_step == 2:
            signal.raise_signal(signal.SIGINT)


PLUGINS = [CtrlC()]
"""
    )
    assert cli.main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "minitrain: stopped by SIGINT at step 2; no checkpoint was written" in err

"""The early_stopping plugin: stops after ``patience`` epochs without improvement, says why, and
keeps counting across a resume."""

from __future__ import annotations

import math

import pytest

from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.errors import MinitrainError
from minitrain_plugins._metric import improves, resolve_monitor

FIRST_PARTY_PLUGINS = {"console", "jsonl", "csv", "checkpoint", "early_stopping"}
NEVER_BETTER = "min_delta=1e9"  # after the first epoch nothing counts as an improvement


@pytest.fixture
def start(recipe, tmp_path):
    def make(plugins, epochs, resume=None):
        return prepare(RunRequest(recipe, [f"epochs={epochs}"], plugins, ["console"], tmp_path / "run", resume=resume))

    return make


def test_stops_after_patience_epochs_without_improvement(start):
    trainer = start([f"early_stopping:monitor=train_loss,patience=2,{NEVER_BETTER}"], epochs=10)
    trainer.fit()
    assert trainer.state.epoch == 3  # epoch 1 sets the best; 2 and 3 do not beat it
    assert trainer.state.stop_reason.startswith("train_loss did not improve for 2 epochs (best ")


def test_a_run_shorter_than_its_patience_finishes(start):
    trainer = start([f"early_stopping:monitor=train_loss,patience=3,{NEVER_BETTER}"], epochs=3)
    trainer.fit()
    assert trainer.state.epoch == 3 and trainer.state.stop_reason is None


def test_the_count_survives_a_resume(start):
    spec = f"early_stopping:monitor=train_loss,patience=3,{NEVER_BETTER}"
    start([spec, "checkpoint"], epochs=2).fit()  # best at epoch 1, one bad epoch so far
    trainer = start([spec, "checkpoint"], epochs=10, resume="auto")
    trainer.fit()
    assert trainer.state.epoch == 4  # a fresh count would have run to epoch 6


def test_a_run_it_stopped_stays_stopped_when_resumed(start):
    spec = f"early_stopping:monitor=train_loss,patience=2,{NEVER_BETTER}"
    stopped = start([spec, "checkpoint"], epochs=10)
    stopped.fit()
    assert stopped.state.epoch == 3
    resumed = start([spec, "checkpoint"], epochs=10, resume="auto")
    resumed.fit()
    assert resumed.state.epoch == 3 and resumed.state.stop_reason == stopped.state.stop_reason  # no epoch more


def test_a_larger_patience_lets_a_stopped_run_go_on(start):
    start([f"early_stopping:monitor=train_loss,patience=2,{NEVER_BETTER}", "checkpoint"], epochs=10).fit()
    resumed = start(
        [f"early_stopping:monitor=train_loss,patience=3,{NEVER_BETTER}", "checkpoint"], epochs=10, resume="auto"
    )
    resumed.fit()
    assert resumed.state.epoch == 4  # two bad epochs counted before, one more now


def test_a_missing_monitor_is_refused_before_the_run_starts(start, tmp_path):
    with pytest.raises(
        MinitrainError,
        match="early_stopping: monitor 'val_f1' is not a metric this run reports "
        r"\(it reports train_loss, lr, epoch_time, samples_per_s, val_loss, val_acc\)",
    ):
        start(["early_stopping:monitor=val_f1"], epochs=1)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_options_are_validated(start):
    with pytest.raises(MinitrainError, match="plugin 'early_stopping': patience: .*greater than or equal to 1"):
        start(["early_stopping:patience=0"], epochs=1)


def test_direction_and_delta(start):
    trainer = start([], epochs=1)
    assert resolve_monitor("p", "val_acc", "auto", trainer) == ("val_acc", "max")
    assert resolve_monitor("p", None, "auto", trainer) == ("val_loss", "min")  # the default, with validation
    assert resolve_monitor("p", "val_acc", "min", trainer) == ("val_acc", "min")
    trainer.val_loader = None
    assert resolve_monitor("p", None, "auto", trainer) == ("train_loss", "min")  # without validation
    assert improves(0.5, None, "min") and not improves(math.nan, None, "min")
    assert improves(0.4, 0.5, "min", 0.05) and not improves(0.46, 0.5, "min", 0.05)
    assert improves(0.6, 0.5, "max") and not improves(0.5, 0.5, "max")

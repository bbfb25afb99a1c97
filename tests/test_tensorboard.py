"""The tensorboard plugin writes real TensorBoard event files: batch loss every ``log_every``
steps and every epoch metric, read back here with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.events import FitStart
from minitrain_plugins.tensorboard import TensorBoard

FIRST_PARTY_PLUGINS = {"tensorboard"}


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_are_written_and_match_the_event_log(recipe, tmp_path):
    trainer = prepare(
        RunRequest(recipe, ["epochs=2"], ["tensorboard:log_every=2,subdir=tb"], ["console"], tmp_path / "run")
    )
    trainer.fit()  # 5 steps per epoch

    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    scalars = read_scalars(tmp_path / "run" / "tb")

    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    losses = {e["global_step"]: e["loss"] for e in events if e["event"] == "BatchEnd"}
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([losses[s] for s in (2, 4, 6, 8, 10)])
    epochs = [e for e in events if e["event"] == "EpochEnd"]
    assert set(scalars) == {"train/loss", *(f"epoch/{name}" for name in epochs[0]["metrics"])}  # every epoch metric
    for name in epochs[0]["metrics"]:
        assert scalars[f"epoch/{name}"] == [(e["global_step"], pytest.approx(e["metrics"][name])) for e in epochs]


def test_nothing_is_written_without_a_run_dir():
    plugin = TensorBoard(TensorBoard.Config())
    plugin.on_fit_start(FitStart(epochs=1, start_epoch=1, global_step=0, steps_per_epoch=1, device="cpu", run_dir=None))
    assert plugin.writer is None

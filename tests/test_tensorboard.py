"""The tensorboard plugin writes real TensorBoard event files: batch loss every ``log_every``
steps and every epoch metric, read back here with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minitrain.commands.cli import main
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.events import FitStart
from minitrain_plugins.tensorboard import TensorBoard

FIRST_PARTY_PLUGINS = {"tensorboard", "checkpoint"}


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
    plugin.on_fit_start(
        FitStart(epochs=1, start_epoch=1, global_step=0, steps_per_epoch=1, device="cpu", run_dir=None), None
    )
    assert plugin.writer is None


def test_a_replay_into_the_runs_own_tensorboard_folder_is_refused_and_elsewhere_matches_the_live_run(
    recipe, tmp_path, capsys
):
    """A run logged live, then resumed: its folder holds two event files. Replaying into it would
    log every point again, so the replay refuses in one line naming ``subdir``, before writing
    anything; replayed into that other folder, the run reads back as it was logged live (both
    starts of the resumed run included), and a second replay there is refused too."""
    run_dir = tmp_path / "run"
    for epochs, resume in ((1, None), (2, "auto")):
        prepare(
            RunRequest(
                recipe,
                [f"epochs={epochs}"],
                ["tensorboard:log_every=2", "checkpoint"],
                ["console"],
                run_dir,
                resume=resume,
            )
        ).fit()
    live_files = sorted((run_dir / "tensorboard").iterdir())
    live = read_scalars(run_dir / "tensorboard")
    assert live["train/loss"] == sorted(set(live["train/loss"])) and len(live["epoch/val_acc"]) == 2  # once each

    assert main(["replay", str(run_dir), "--plugin", "tensorboard:log_every=2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"minitrain: error: tensorboard: {run_dir / 'tensorboard'} already holds TensorBoard event files (the run "
        "wrote them live, or an earlier replay did), and a replay there would show every point twice; replay into "
        "another folder under the run directory: --plugin tensorboard:subdir=tensorboard-replay\n"
    )
    assert sorted((run_dir / "tensorboard").iterdir()) == live_files and read_scalars(run_dir / "tensorboard") == live

    assert main(["replay", str(run_dir), "--plugin", "tensorboard:log_every=2,subdir=tensorboard-replay"]) == 0
    assert "replayed" in capsys.readouterr().out
    assert len(list((run_dir / "tensorboard-replay").glob("events.out.tfevents.*"))) == 2  # one per start, as live
    replayed = read_scalars(run_dir / "tensorboard-replay")
    assert replayed.keys() == live.keys()
    for tag, points in live.items():
        assert [step for step, _ in replayed[tag]] == [step for step, _ in points], tag
        assert [value for _, value in replayed[tag]] == pytest.approx([value for _, value in points]), tag

    assert main(["replay", str(run_dir), "--plugin", "tensorboard:subdir=tensorboard-replay"]) == 2
    assert "subdir=tensorboard-replay-replay" in capsys.readouterr().err
    assert read_scalars(run_dir / "tensorboard-replay") == replayed

"""Reading run directories (minitrain.commands.runs) and ``minitrain runs``: each status from the event log,
resumed runs read as their last start, the settings that differ, sorting and --json."""

from __future__ import annotations

import json
import os
import time

from minitrain.commands.cli import main
from minitrain.engine import events as ev
from minitrain.engine.lock import RunDirLock
from minitrain.records.rundir import differing, find_runs, read_run, wall_time

FIRST_PARTY_PLUGINS = {"checkpoint", "early_stopping"}

PLUGIN_CODE = '''
import signal


class Stop:
    """Asks the run to stop after epoch 1."""
    @minitrain.hookimpl
    def on_epoch_end(self, event, trainer):
        trainer.request_stop("enough for a test")


class Boom:
    """Fails the run at the end of epoch 2."""
    role = "critical"

    @minitrain.hookimpl
    def on_epoch_end(self, event):
        if event.epoch == 2:
            raise RuntimeError("disk on fire")


class CtrlC:
    """Ctrl-C at step 7."""
    @minitrain.hookimpl
    def on_batch_end(self, event):
        if event.global_step == 7:
            signal.raise_signal(signal.SIGINT)


PLUGINS = [{plugin}()]
'''


def run(recipe, run_dir, *args, plugin=None, code=0):
    if plugin is not None:  # a copy of the tiny recipe with one of the plugins above
        path = recipe.with_name(f"{plugin.lower()}_recipe.py")
        path.write_text(recipe.read_text() + PLUGIN_CODE.replace("{plugin}", plugin))
        recipe = path
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--no-plugin", "console", *args]) == code
    return run_dir


def test_each_way_a_run_ends_is_its_status(recipe, tmp_path):
    runs = tmp_path / "runs"
    finished = read_run(run(recipe, runs / "finished", "--set", "epochs=2"))
    assert (finished.status, finished.epochs_done, finished.epochs, finished.global_step) == ("finished", 2, 2, 10)
    assert finished.recipe == "tiny_recipe" and finished.starts == 1 and finished.device == "cpu"
    assert finished.best("val_acc") == max(v for _, v in finished.values("val_acc"))
    assert finished.last("train_loss") == finished.final_metrics["train_loss"]
    assert 0 <= finished.duration < 60

    stopped = read_run(run(recipe, runs / "stopped", "--set", "epochs=3", plugin="Stop"))
    assert (stopped.status, stopped.stop_reason, stopped.epochs_done) == ("stopped", "enough for a test", 1)

    failed = read_run(run(recipe, runs / "failed", "--set", "epochs=3", plugin="Boom", code=1))
    assert failed.status == "failed" and failed.error == "RuntimeError: disk on fire"

    interrupted = read_run(run(recipe, runs / "interrupted", "--set", "epochs=3", plugin="CtrlC", code=130))
    assert (interrupted.status, interrupted.signal, interrupted.global_step) == ("interrupted", "SIGINT", 7)

    running = runs / "running"  # the process was killed outright: no final event
    running.mkdir()
    for name in ("run.json", "config.json"):
        (running / name).write_bytes((runs / "finished" / name).read_bytes())
    lines = (runs / "finished" / "events.jsonl").read_text().splitlines(keepends=True)
    (running / "events.jsonl").write_text("".join(lines[: len(lines) // 2]) + '{"event":"BatchEnd","ep')
    alive = read_run(running)
    assert alive.status == "running" and alive.epochs_done == 1 and alive.quiet_for < 60
    hours_ago = time.time() - 3 * 3600
    os.utime(running / "events.jsonl", (hours_ago, hours_ago))
    assert read_run(running).quiet_for > 2 * 3600

    assert sorted(p.name for p in find_runs(runs)) == ["failed", "finished", "interrupted", "running", "stopped"]


def test_a_resumed_run_reads_as_its_last_start(recipe, tmp_path):
    run_dir = tmp_path / "resumed"
    run(recipe, run_dir, "--set", "epochs=2", "--plugin", "checkpoint")
    first = read_run(run_dir)
    run(recipe, run_dir, "--set", "epochs=4", "--plugin", "checkpoint", "--resume", "auto")
    resumed = read_run(run_dir, steps=True)
    assert (resumed.status, resumed.starts, resumed.epochs_done, resumed.epochs) == ("finished", 2, 4, 4)
    assert [s for s, _ in resumed.steps] == list(range(1, 21))
    assert resumed.duration >= sum(m["epoch_time"] for m in first.epoch_metrics.values())


def write_log(run_dir, events, history=1, **recorded):
    """A run directory whose log holds ``events`` (generated, in the real format); ``recorded``:
    more of run.json."""
    run_dir.mkdir()
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "recipe": "/somewhere/made_up.py",
                "plugins": {"jsonl": {}},
                "event_log": "events.jsonl",
                "history": [{"started": "2024-05-01T12:00:00+0000"}] * history,
            }
            | recorded
        )
    )
    (run_dir / "events.jsonl").write_text("".join(e.to_json() + "\n" for e in events))
    return run_dir


def epoch(number, step, loss, steps_per_epoch=5):
    out = [
        ev.BatchEnd(
            epoch=number, batch_idx=s - (number - 1) * steps_per_epoch - 1, global_step=s, batch_size=4, loss=loss
        )
        for s in range(step - steps_per_epoch + 1, step + 1)
    ]
    return out + [ev.EpochEnd(epoch=number, global_step=step, metrics={"train_loss": loss, "epoch_time": 2.0})]


def start(epochs, start_epoch, step):
    return ev.FitStart(
        epochs=epochs,
        start_epoch=start_epoch,
        global_step=step,
        steps_per_epoch=5,
        device="cpu",
        run_dir=None,
        config={"lr": 0.1},
    )


def test_a_resume_from_an_older_checkpoint_replaces_what_it_redoes(tmp_path):
    run_dir = write_log(
        tmp_path / "run",
        [
            start(4, 1, 0),
            *epoch(1, 5, 1.0),
            *epoch(2, 10, 0.9),
            *epoch(3, 15, 0.8),
            ev.Interrupted(epoch=4, global_step=17, signal="SIGTERM"),
            start(4, 2, 5),
            *epoch(2, 10, 0.5),
            *epoch(3, 15, 0.4),
            *epoch(4, 20, 0.3),
            ev.FitEnd(epochs_completed=4, global_step=20, metrics={"train_loss": 0.3}),
        ],
        history=2,
    )
    redone = read_run(run_dir, steps=True)
    assert (redone.status, redone.starts, redone.epochs_done, redone.global_step) == ("finished", 2, 4, 20)
    assert redone.values("train_loss") == [(1, 1.0), (2, 0.5), (3, 0.4), (4, 0.3)]
    assert [s for s, _ in redone.steps] == list(range(1, 21))
    assert [loss for s, loss in redone.steps if s in (5, 6, 20)] == [1.0, 0.5, 0.3]
    assert redone.recipe == "made_up"
    # the last start's wall time (from run.json to the log's last write) and the first's epochs
    assert redone.duration > 3 * 2.0


def test_a_finished_run_resumed_and_then_killed_is_not_finished(tmp_path):
    """The last start decides: a run that finished, was resumed from an older checkpoint and was
    killed in the epoch it redid reads as killed (nobody holds its lock) or running (somebody
    does), with the epochs of the first start that the resume redid dropped."""
    run_dir = write_log(
        tmp_path / "run",
        [
            start(3, 1, 0),
            *epoch(1, 5, 1.0),
            *epoch(2, 10, 0.9),
            *epoch(3, 15, 0.8),
            ev.FitEnd(epochs_completed=3, global_step=15, metrics={"train_loss": 0.8}),
            start(4, 2, 5),
            *epoch(2, 10, 0.5),
            *epoch(3, 15, 0.4)[:2],
        ],
        history=2,
    )
    lock = RunDirLock(run_dir)
    lock.acquire()
    assert read_run(run_dir).status == "running"
    lock.release()  # as the kernel does for a process killed outright
    killed = read_run(run_dir, steps=True)
    assert (killed.status, killed.starts, killed.epochs_done, killed.epochs, killed.global_step) == (
        "killed",
        2,
        2,
        4,
        10,
    )
    assert killed.values("train_loss") == [(1, 1.0), (2, 0.5)] and killed.final_metrics["train_loss"] == 0.5
    assert [s for s, _ in killed.steps] == list(range(1, 13))


def test_differing_settings_leave_out_what_all_runs_share(recipe, tmp_path):
    a = read_run(run(recipe, tmp_path / "a", "--set", "epochs=1", "--no-plugin", "checkpoint"))
    b = read_run(run(recipe, tmp_path / "b", "--set", "epochs=1", "--set", "lr=0.05", "--plugin", "checkpoint"))
    c = read_run(run(recipe, tmp_path / "c", "--set", "epochs=1", "--set", "lr=0.05", "--plugin", "checkpoint:every=2"))
    assert differing([a, b]) == {
        "lr": ["0.2", "0.05"],
        "plugins": ["jsonl", "checkpoint,jsonl"],
    }  # (tests hide csv, ddp)
    assert differing([b, c]) == {"plugin.checkpoint.every": ["1", "2"]}  # options of a plugin both runs have
    assert differing([a, a]) == {}


def test_runs_command_lists_sorts_and_prints_json(recipe, tmp_path, capsys):
    root = tmp_path / "runs"
    for name, lr in (("low", "0.02"), ("high", "0.2")):
        run(recipe, root / name, "--set", "epochs=2", "--set", f"lr={lr}")
    capsys.readouterr()

    assert main(["runs", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["run", "recipe", "status", "epochs", "best", "val_acc"]
    assert [line.split()[0] for line in lines[1:]] == ["low", "high"]  # in the order they started
    assert all("finished" in line and "2/2" in line and "tiny_recipe" in line for line in lines[1:])
    assert "lr=0.02" in lines[1] and "lr=0.2" in lines[2] and "epochs=" not in lines[1]

    assert main(["runs", str(root), "--sort", "train_loss", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == sorted(["low", "high"], key=lambda n: read_run(root / n).best("train_loss"))
    assert listed[0]["metric"] == "train_loss" and listed[0]["best"] <= listed[1]["best"]
    assert {r["differs"]["lr"] for r in listed} == {"0.02", "0.2"}
    assert all(r["status"] == "finished" and r["epochs_done"] == 2 for r in listed)

    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 0
    assert "no run directories" in capsys.readouterr().out
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_runs_defaults_to_the_runs_folder(recipe, tmp_path, capsys):
    assert main(["run", str(recipe), "--no-plugin", "console"]) == 0  # into runs/<recipe>-<time>/
    capsys.readouterr()
    assert main(["runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("tiny_recipe-") and "finished" in out[1]


def test_lines_that_are_not_events_are_counted_not_fatal(tmp_path):
    run_dir = write_log(tmp_path / "run", [start(2, 1, 0), *epoch(1, 5, 1.0)])
    with open(run_dir / "events.jsonl", "a") as log:
        log.write('{"event":"EpochEnd","epoch":"two"}\n[1, 2]\nnot json\n{"event":"BatchEnd","glob')
    run = read_run(run_dir, steps=True)
    assert (run.status, run.epochs_done, len(run.steps), run.bad_lines) == ("running", 1, 5, 3)


def test_wall_time_is_the_last_start_s_clock_and_earlier_starts_training():
    """The one definition of a run's duration, for runs, compare and the viz report."""
    assert wall_time([30.0, 40.0], last_start=1000.0, end=1100.0) == 130.0  # 30 s trained before, 100 s now
    assert wall_time([30.0, 40.0], last_start=None, end=1100.0) == 70.0  # no start time: training time
    assert wall_time([30.0, 40.0], last_start=1000.0, end=900.0) == 70.0  # a clock that went back
    assert wall_time([], last_start=1000.0, end=1100.0) is None  # no start in the log


def test_a_summed_loss_reads_per_sample(tmp_path):
    """A run that recorded its loss as summed over each batch (run.json's loss_reduction) reads,
    for runs and compare, per sample: each step's sum over its batch size, an epoch's over the
    recipe's batch size."""
    first = start(1, 1, 0).model_copy(update={"config": {"lr": 0.1, "batch_size": 4}})
    events = [first, *epoch(1, 5, 8.0)]  # batches of 4, summed: 2.0 a sample
    summed = read_run(write_log(tmp_path / "summed", events, loss_reduction="sum"), steps=True)
    assert summed.loss_reduction == "sum" and summed.steps == [(s, 2.0) for s in range(1, 6)]
    assert summed.values("train_loss") == [(1, 2.0)] and summed.to_json()["loss_reduction"] == "sum"
    mean = read_run(write_log(tmp_path / "mean", events), steps=True)
    assert mean.steps == [(s, 8.0) for s in range(1, 6)] and mean.values("train_loss") == [(1, 8.0)]

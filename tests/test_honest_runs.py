"""A run does what its user asked and records only what it did: one run per directory, a resume
that applies or refuses each changed setting (and says where it starts), no trace of a start that
failed, and one line with a distinct exit code for a run that fails or trains nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from minitrain import Trainer, hookimpl
from minitrain.commands import cli
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import checkpointing, lock
from minitrain.engine.errors import MinitrainError
from minitrain.engine.lock import LOCK_FILE

FIRST_PARTY_PLUGINS = {"console", "jsonl", "csv", "checkpoint", "viz", "early_stopping"}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the run under ``folder`` with its bytes and modification time (the run
    directory's lock file is not the run's: a start that moves the run aside holds it first)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def error_line(capsys, *argv, code: int = 2) -> str:
    assert cli.main([str(a) for a in argv]) == code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("minitrain: warning:")]
    assert len(lines) == 1 and lines[0].startswith("minitrain: error: ") and "Traceback" not in err + out, err
    return lines[0].removeprefix("minitrain: error: ")


@pytest.fixture
def trained(recipe, tmp_path, capsys):
    """A finished two-epoch run with checkpoints, trained at lr 0.1."""
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "--set",
                "epochs=2",
                "--set",
                "lr=0.1",
                "--plugin",
                "checkpoint",
                "--plugin",
                "csv",
                "--no-plugin",
                "console",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    return run


# --- one run per directory ------------------------------------------------------------------------


def test_a_fresh_run_refuses_a_used_directory_and_changes_nothing_there(recipe, trained, capsys):
    before = snapshot(trained)
    line = error_line(capsys, "run", recipe, "--run-dir", trained)
    assert line.startswith(f"run directory {trained} is not empty (") and "a run directory holds one run" in line
    assert "--resume auto" in line and "another --run-dir" in line and "--move-aside" in line
    assert snapshot(trained) == before


def test_move_aside_keeps_the_earlier_run_whole_and_starts_afresh(recipe, trained, capsys):
    before = snapshot(trained)
    assert cli.main(["run", str(recipe), "--move-aside", "--no-plugin", "console", "--run-dir", str(trained)]) == 0
    assert "moved the earlier run in" in capsys.readouterr().err
    (aside,) = trained.parent.glob("run.aside-*")
    assert snapshot(aside) == before  # moved, not deleted or changed
    history = json.loads((trained / "run.json").read_text())["history"]
    assert len(history) == 1 and history[0]["resumed_from"] is None
    assert checkpointing.load(trained / "checkpoints" / "last.pt")["header"]["global_step"] == 5  # its own: the
    # new run trained the recipe's 1 epoch of 5 steps, the earlier one 10 steps


def test_move_aside_refuses_a_directory_that_holds_no_run(recipe, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    line = error_line(capsys, "run", recipe, "--move-aside", "--run-dir", folder)
    assert (
        line == f"--move-aside: {folder} holds files that are not a minitrain run (notes.txt); choose another --run-dir"
    )
    assert (folder / "notes.txt").read_text() == "my notes"


def test_runs_started_in_the_same_second_get_their_own_directories(recipe):
    first = prepare(RunRequest(recipe, [], [], ["console"]))
    second = prepare(RunRequest(recipe, [], [], ["console"]))
    assert first.run_dir != second.run_dir and Path(second.run_dir).parent == Path("runs")


# --- a start that fails leaves nothing --------------------------------------------------------------

BAD_STARTS = {
    "build() raises": (["--set", "batch_size=0"], "batch_size"),
    "bad plugin option": (["--plugin", "checkpoint:every=-1"], "every"),
    "monitor never reported": (["--plugin", "checkpoint:monitor=val_f1"], "monitor 'val_f1'"),
    "init-from mismatch": (["--init-from", "OTHER"], "do not fit the model"),
}


@pytest.mark.parametrize("case", BAD_STARTS, ids=list(BAD_STARTS))
def test_a_start_that_fails_leaves_no_run_directory(recipe, tmp_path, capsys, case, write_recipe):
    args, expected = BAD_STARTS[case]
    if "OTHER" in args:
        other = write_recipe(
            recipe.read_text().replace(
                "nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10)", "nn.AvgPool2d(4), nn.Flatten(), nn.Linear(192, 10)"
            ),
            "other.py",
        )
        assert (
            cli.main(
                [
                    "run",
                    str(other),
                    "--plugin",
                    "checkpoint",
                    "--no-plugin",
                    "console",
                    "--run-dir",
                    str(tmp_path / "other"),
                ]
            )
            == 0
        )
        args = ["--init-from", str(tmp_path / "other" / "checkpoints" / "last.pt")]
    assert expected in error_line(capsys, "run", recipe, *args, "--run-dir", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_build_must_return_parts_the_loop_can_use(write_recipe, tmp_path, capsys):
    path = write_recipe(
        """
import torch, minitrain

class Config(minitrain.RecipeConfig):
    device: str = "cpu"

def build(config, device):
    model = torch.nn.Linear(2, 2)
    return minitrain.Components(model=model.state_dict(), optimizer="sgd", train_loader=7, scheduler=object())
""",
        "wrong_parts.py",
    )
    line = error_line(capsys, "run", path, "--run-dir", tmp_path / "run")
    assert line == (
        f"recipe {path}: build() returned model is a OrderedDict, not a torch.nn.Module; optimizer is a "
        "str, not a torch.optim.Optimizer; train_loader is a int, which cannot be iterated; scheduler is "
        "a object, which has no step()"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, field", [("lr=inf", "lr"), ("lr=nan", "lr"), ("lr=-1", "lr"), ("epochs=0", "epochs")]
)
def test_numbers_that_cannot_train_are_refused(recipe, tmp_path, capsys, override, field):
    line = error_line(capsys, "run", recipe, "--set", override, "--run-dir", tmp_path / "run")
    assert line.startswith(f"--set: {field}: ")
    assert not (tmp_path / "run").exists()


# --- resume: applied, refused, announced, recorded ------------------------------------------------


def test_resume_refuses_a_change_the_checkpoint_cannot_take_and_changes_no_file(recipe, trained, capsys):
    before = snapshot(trained)
    line = error_line(
        capsys,
        "run",
        recipe,
        "--set",
        "lr=0.5",
        "--set",
        "batch_size=8",
        "--set",
        "epochs=3",
        "--run-dir",
        trained,
        "--resume",
        "auto",
    )
    assert line.startswith(f"--resume {trained / 'checkpoints'}/")
    assert ": cannot change batch_size (16 in the checkpoint, 8 now), lr (0.1 in the checkpoint, 0.5 now): " in line
    assert "epochs" not in line.split(": cannot change")[1].split(":")[0]  # epochs may change
    assert snapshot(trained) == before


def test_resume_takes_the_checkpoint_config_and_applies_a_longer_run(recipe, trained, capsys):
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "--set",
                "epochs=3",
                "--plugin",
                "console",  # the run had none: added
                "--run-dir",
                str(trained),
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    last = trained / "checkpoints" / "last.pt"
    assert f"resuming from {last}: epoch 3, step 10" in out
    assert "changed on resume: epochs 2 -> 3" in out and "training 3 epochs on cpu from epoch 3" in out
    config = json.loads((trained / "config.json").read_text())
    assert (config["epochs"], config["lr"]) == (3, 0.1)  # lr from the checkpoint, not the recipe's 0.2
    history = json.loads((trained / "run.json").read_text())["history"]
    assert [h["resumed_from"] for h in history] == [None, str(last)]
    assert (history[1]["epoch"], history[1]["global_step"], history[1]["changed"]) == (2, 10, {"epochs": [2, 3]})
    starts = [json.loads(line) for line in (trained / "events.jsonl").read_text().splitlines() if '"FitStart"' in line]
    assert starts[-1]["resumed_from"] == str(last) and starts[-1]["changed"] == {"epochs": [2, 3]}
    assert [row.split(",")[0] for row in (trained / "metrics.csv").read_text().splitlines()] == ["epoch", "1", "2", "3"]


def test_resuming_a_finished_run_succeeds_without_training_or_writing(recipe, trained, capsys):
    """A requeue, a retry or a restart of a run that has finished: exit 0, one line, no file touched."""
    before = snapshot(trained)
    for resume in ("auto", trained / "checkpoints" / "last.pt"):
        assert cli.main(["run", str(recipe), "--run-dir", str(trained), "--resume", str(resume)]) == 0
        out, err = capsys.readouterr()
        where = trained if resume == "auto" else resume
        assert out == (
            f"minitrain: run already complete: 2 of 2 epochs ({where}); raise epochs to train more (--set epochs=N)\n"
        )
        assert "error" not in err
        assert snapshot(trained) == before


def test_a_resume_goes_on_with_the_runs_plugins_and_their_options(recipe, tmp_path, capsys):
    """Nothing repeated on the command line: the plugins the run had, with their options, come
    back (here a checkpoint every 2 steps, a renamed metrics file, no console); console is not
    brought back by being on by default."""
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "--set",
                "epochs=1",
                "--plugin",
                "checkpoint:every_steps=2",
                "--plugin",
                "csv:filename=m.csv",
                "--no-plugin",
                "console",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["run", str(recipe), "--set", "epochs=2", "--run-dir", str(run), "--resume", "auto"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("done: 2 epochs") and len(out.splitlines()) == 1  # the command's last line; no console
    record = json.loads((run / "run.json").read_text())
    assert set(record["plugins"]) == {"checkpoint", "csv", "jsonl"}
    assert record["plugins"]["checkpoint"]["every_steps"] == 2 and record["plugins"]["csv"]["filename"] == "m.csv"
    assert "plugins_changed" not in record["history"][1]
    assert [row.split(",")[0] for row in (run / "m.csv").read_text().splitlines()] == ["epoch", "1", "2"]
    saves = [
        e["global_step"]
        for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())
        if e["event"] == "CheckpointSaved" and e["kind"] == "last"
    ]
    assert saves == [2, 4, 5, 6, 8, 10, 10]  # every 2 steps and at each epoch end (a new position), in both starts


def test_on_resume_observers_may_change_and_training_plugins_may_not(recipe, trained, capsys):
    before = snapshot(trained)
    for argv, refused in (
        (["--plugin", "early_stopping"], "cannot add plugin early_stopping"),
        (["--no-plugin", "checkpoint", "--plugin", "early_stopping:patience=1"], "cannot add plugin early_stopping"),
    ):
        line = error_line(capsys, "run", recipe, "--set", "epochs=3", *argv, "--run-dir", trained, "--resume", "auto")
        assert line.startswith(f"--resume: {refused}: it changes training") and "start a new run" in line
        assert snapshot(trained) == before
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "--set",
                "epochs=3",
                "--no-plugin",
                "csv",
                "--plugin",
                "jsonl:flush_every=7",
                "--plugin",
                "viz",
                "--run-dir",
                str(trained),
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    record = json.loads((trained / "run.json").read_text())
    assert set(record["plugins"]) == {"checkpoint", "jsonl", "viz"}
    changed = record["history"][-1]["plugins_changed"]
    assert changed["csv"] == [{"filename": "metrics.csv"}, None] and changed["viz"][0] is None
    assert (changed["jsonl"][0]["flush_every"], changed["jsonl"][1]["flush_every"]) == (100, 7)
    assert (trained / "report.html").is_file()
    assert [row.split(",")[0] for row in (trained / "metrics.csv").read_text().splitlines()] == ["epoch", "1", "2"]


def test_resume_auto_refuses_a_run_without_checkpoints_and_changes_nothing(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        cli.main(["run", str(recipe), "--no-plugin", "checkpoint", "--no-plugin", "console", "--run-dir", str(run)])
        == 0
    )
    capsys.readouterr()
    before = snapshot(run)
    line = error_line(capsys, "run", recipe, "--set", "epochs=2", "--run-dir", run, "--resume", "auto")
    assert line == (
        f"--resume auto: {run} holds a run with no checkpoint to resume from (it ran with --no-plugin "
        "checkpoint): nothing in it was changed. Start a new run with another --run-dir, or --move-aside "
        f"to move {run} aside and start afresh there"
    )
    assert snapshot(run) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    line = error_line(capsys, "run", recipe, "--run-dir", mine, "--resume", "auto")
    assert line.startswith(f"--resume auto: {mine} holds files that are not a minitrain run (notes.txt)")


def test_a_run_that_ended_before_its_first_checkpoint_starts_again_with_its_config(recipe, tmp_path, capsys):
    """A requeue of a run whose first start died in its first epoch: the same run from step 0,
    with the config and plugins it recorded (lr 0.1, not the recipe's 0.2), its history kept."""
    run = tmp_path / "run"
    prepare(
        RunRequest(recipe, ["lr=0.1"], ["csv"], ["console"], run)
    )  # run files written, no step trained: as if killed
    with pytest.warns(UserWarning, match="no checkpoint in .*ended before its first save.*again from step 0"):
        again = prepare(RunRequest(recipe, [], [], [], run, resume="auto"))
    assert (again.state.global_step, again.resumed_from, again.config["lr"]) == (0, None, 0.1)
    assert {name for name, _ in again.pm.list_name_plugin()} == {"core", "checkpoint", "csv", "jsonl"}
    again.fit()
    history = json.loads((run / "run.json").read_text())["history"]
    assert [(h["resumed_from"], h.get("global_step")) for h in history] == [(None, None), (None, 0)]
    assert checkpointing.load(run / "checkpoints" / "last.pt")["header"]["config"]["lr"] == 0.1


def test_two_starts_into_one_run_directory_the_second_is_refused(recipe, tmp_path, capsys):
    """The run directory's lock: a second start (fresh or resuming) is refused in one line naming
    the process that holds it, and nothing of the first run changes; once the first run ends,
    the lock is free (and a process killed holding it frees it too: the kernel's flock)."""
    run = tmp_path / "run"
    first = prepare(RunRequest(recipe, ["epochs=2"], [], ["console"], run))
    for extra in ([], ["--resume", "auto"]):
        line = error_line(capsys, "run", recipe, "--run-dir", run, *extra)
        if not extra:  # a fresh start sees a used directory first; the lock decides only when both start at once
            assert line.startswith(f"run directory {run} is not empty")
            continue
        assert line.startswith(f"run directory {run} is in use by process {os.getpid()} on ")
        assert "a run directory holds one run at a time" in line
    assert lock.in_use(run)
    first.fit()
    assert not lock.in_use(run)
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "--set",
                "epochs=3",
                "--no-plugin",
                "console",
                "--run-dir",
                str(run),
                "--resume",
                "auto",
            ]
        )
        == 0
    )


def test_two_fresh_starts_at_once_one_wins_and_the_other_is_refused(recipe, tmp_path):
    """Two processes told to start a new run in the same new directory at the same moment."""
    import subprocess
    import sys

    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "minitrain",
        "run",
        str(recipe),
        "--set",
        "epochs=30",
        "--no-plugin",
        "console",
        "--run-dir",
        str(run),
    ]
    starts = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in starts]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert f"minitrain: error: run directory {run} is " in refused  # in use by the other, or not empty any more
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "FitStart" for e in events) == 1  # one run's log, not two mixed


def test_fit_again_on_a_finished_trainer_says_so(recipe):
    trainer = prepare(RunRequest(recipe, [], [], ["console"]))
    trainer.fit()
    with pytest.raises(MinitrainError, match="nothing to train: 1 of 1 epochs are done"):
        trainer.fit()
    trainer.epochs = 2
    assert trainer.fit() is trainer.state.metrics and trainer.state.epoch == 2


# --- failures while training ----------------------------------------------------------------------


def test_an_error_in_the_recipe_code_is_one_line_with_the_traceback_in_errors_log(
    write_recipe, recipe, tmp_path, capsys
):
    path = write_recipe(
        recipe.read_text().replace(
            "    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))", "    model = Failing()"
        )
        + """

class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.calls = nn.Linear(3 * 32 * 32, 10), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise ValueError("bad pixel")
        return self.linear(x.flatten(1))
""",
        "failing.py",
    )
    run = tmp_path / "run"
    line = error_line(capsys, "run", path, "--no-plugin", "console", "--run-dir", run, code=1)
    assert line == (
        f"training failed in epoch 1, step 3: ValueError: bad pixel (traceback in {run / 'errors.log'}); "
        "--debug shows the traceback"
    )
    assert 'raise ValueError("bad pixel")' in (run / "errors.log").read_text()
    with pytest.raises(ValueError, match="bad pixel"):  # --debug after the subcommand too
        cli.main(["run", str(path), "--debug", "--no-plugin", "console", "--run-dir", str(tmp_path / "again")])


EMPTY = """
import torch, minitrain
from torch import nn

class Config(minitrain.RecipeConfig):
    device: str = "cpu"
    epochs: int = 1

class Nothing:
    def __iter__(self):
        return iter(())

def build(config, device):
    model = nn.Linear(2, 2)
    loader = {loader}
    return minitrain.Components(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_loader=loader)
"""


def test_an_empty_training_loader_is_refused_before_work(write_recipe, tmp_path, capsys):
    path = write_recipe(EMPTY.format(loader="torch.utils.data.DataLoader([], batch_size=4)"), "empty.py")
    assert error_line(capsys, "run", path, "--run-dir", tmp_path / "run") == (
        "the training loader has no batches (is the data set smaller than one batch with drop_last?)"
    )
    assert not (tmp_path / "run").exists()


def test_a_loader_that_yields_nothing_fails_the_run(write_recipe, tmp_path, capsys):
    path = write_recipe(EMPTY.format(loader="Nothing()"), "nothing.py")
    line = error_line(capsys, "run", path, "--no-plugin", "console", "--run-dir", tmp_path / "run", code=1)
    assert line.startswith("epoch 1: the training loader yielded no batches")


def test_a_run_whose_every_step_was_skipped_trained_nothing(write_recipe, recipe, tmp_path, capsys):
    path = write_recipe(
        recipe.read_text().replace(
            "optimizer=optimizer,", "optimizer=optimizer, loss_fn=lambda out, y: out.sum() * float('nan'),"
        ),
        "nan.py",
    )
    line = error_line(
        capsys,
        "run",
        path,
        "--set",
        "nonfinite_loss=skip",
        "--no-plugin",
        "console",
        "--run-dir",
        tmp_path / "run",
        code=1,
    )
    assert line.startswith("no step trained: all 5 steps had a non-finite loss and were skipped")


# --- smaller promises -----------------------------------------------------------------------------


def test_run_files_get_normal_permissions(recipe, tmp_path):
    old = os.umask(0o022)
    try:
        prepare(RunRequest(recipe, [], ["checkpoint"], ["console"], tmp_path / "run")).fit()
    finally:
        os.umask(old)
    for name in ("config.json", "run.json", "checkpoints/last.pt"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


def test_version_and_debug_anywhere(capsys):
    from minitrain import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"minitrain {__version__}"
    with pytest.raises(MinitrainError, match="recipe not found"):
        cli.main(["run", "nowhere.py", "--debug"])


def test_plugins_json_gives_options_as_json_values(capsys):
    assert cli.main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    options = rows["checkpoint"]["options"]
    assert options["every"] == {
        "default": 1,
        "required": False,
        "description": "save at the end of every N-th epoch (0: never)",
    }
    assert options["save_last"]["default"] is True and options["monitor"]["default"] is None


def test_a_trainer_built_by_hand_shows_progress(fake_cifar, capsys):
    from torch import nn

    from minitrain.kit.data import cifar10_loaders

    train, _ = cifar10_loaders(fake_cifar, 16, crop=0, flip="none")
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), train, epochs=1).fit()
    out = capsys.readouterr().out
    assert "training 1 epochs on cpu" in out and "epoch 1/1: train_loss" in out


def test_nproc_checks_its_input_before_starting_any_process(recipe, tmp_path, capsys):
    line = error_line(capsys, "run", recipe, "--nproc", "2", "--set", "lr=oops", "--run-dir", tmp_path / "run")
    assert line.startswith("--set: lr: ") and not (tmp_path / "run").exists()
    assert not checkpointing.checkpoint_dirs(tmp_path / "run", [])[0].exists()


class FailsAtEpochEnd:
    role = "critical"

    @hookimpl
    def on_epoch_end(self, event):
        if event.epoch == 2:
            raise RuntimeError("disk full")


def test_a_failure_in_an_epoch_end_hook_names_that_epoch(recipe, tmp_path, capsys, monkeypatch):
    import minitrain.commands.start

    real = minitrain.commands.start.build_trainer

    def with_failing_plugin(*args, **kwargs):
        trainer, parts = real(*args, **kwargs)
        trainer.pm.register(FailsAtEpochEnd(), "fails")
        return trainer, parts

    monkeypatch.setattr(minitrain.commands.start, "build_trainer", with_failing_plugin)
    line = error_line(
        capsys, "run", recipe, "--set", "epochs=3", "--no-plugin", "console", "--run-dir", tmp_path / "run", code=1
    )
    assert line.startswith("training failed in epoch 2, step 10: RuntimeError: disk full")


def test_a_process_forked_while_the_lock_is_held_does_not_keep_it(tmp_path):
    """DataLoader workers are forked from the run: once the run lets go of its directory (or
    dies), the directory is free, though a worker still lives."""
    import multiprocessing

    held = lock.RunDirLock(tmp_path / "run")
    held.acquire()
    ready = multiprocessing.get_context("fork").Event()
    done = multiprocessing.get_context("fork").Event()
    child = multiprocessing.get_context("fork").Process(target=_wait_for, args=(ready, done))
    child.start()
    try:
        assert ready.wait(30)
        held.release()
        assert lock.in_use(tmp_path / "run") is False
        again = lock.RunDirLock(tmp_path / "run")
        again.acquire(wait=0)
        again.release()
    finally:
        done.set()
        child.join(30)


def _wait_for(ready, done) -> None:
    ready.set()
    done.wait(30)

"""``minitrain sweep``: bad input refused before any trial, a sweep of several workers, pruning,
failing trials, a sweep killed outright or stopped with Ctrl-C and run again, and a study in a
real PostgreSQL server. Trials are real ``minitrain run`` processes on the tiny recipe's
generated CIFAR-10, so each sweep takes seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minitrain.commands import cli

optuna = pytest.importorskip("optuna", reason="minitrain sweep needs Optuna: pip install -e '.[sweep]'")

FIRST_PARTY_PLUGINS = {"prune", "viz", "checkpoint", "early_stopping"}
SWEEPS = Path("runs") / "sweeps"


def sweep(capsys, *argv: object) -> tuple[int, str, str]:
    code = cli.main(["sweep", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def study(name: str, storage: str | None = None):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = storage or JournalStorage(JournalFileBackend(str(SWEEPS / name / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def states(name: str, storage: str | None = None) -> dict[int, str]:
    return {t.number: t.state.name for t in study(name, storage).get_trials(deepcopy=False)}


def plugin_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["plugins"]["prune"]


# --- search spaces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--space", "widht=int:1:4"], "the recipe's Config has no field 'widht'"),
        (["--space", "lr=float:0:1"], "refuses lr=0.0: lr: must be greater than 0"),
        (["--space", "epochs=float:1:3"], "refuses epochs=1"),
        (["--space", "augment=choice:yes,maybe"], "refuses augment=maybe"),
        (["--space", "lr=float:0.1:1", "--set", "lr=0.2"], "lr is also fixed by --set lr=0.2"),
        (["--space", "lr=float:0.1:1", "--sampler", "grid"], "has no grid"),
        (["--space", "lr=choice:0.1,0.2", "--sampler", "grid", "--trials", "3"], "more than the grid's 2 points"),
        (["--space", "lr=float:0.1:1", "--pruner", "median:patience=3"], "MedianPruner has no option 'patience'"),
        (["--space", "lr=float:0.1:1", "--sampler", "bayes"], "unknown sampler 'bayes'"),
        (["--space", "lr=float:0.1:1", "--plugin", "prune:study=x,trial=1"], "leave it out of --plugin"),
        (["--space", "lr=float:0.1:1", "--plugin", "checkpoint:bogus=1"], "plugin 'checkpoint': bogus: unknown key"),
        (["--space", "lr=float:0.1:1", "--study", "a/b"], "--study 'a/b'"),
        (["--space", "lr=float:0.1:1", "--workers", "0"], "--workers must be at least 1"),
        ([], "nothing to search"),
    ],
)
def test_bad_sweeps_are_refused_before_any_trial(capsys, recipe, argv, message):
    trials = [] if "--trials" in argv else ["--trials", "2"]
    code, out, err = sweep(capsys, recipe, *trials, *argv)
    lines = [line for line in err.splitlines() if not line.startswith("minitrain: warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("minitrain: error: "), (out, err)
    assert message in lines[0]
    assert not SWEEPS.exists()  # nothing written


def test_trials_are_required(capsys, recipe):
    code, _, err = sweep(capsys, recipe, "--space", "lr=float:0.1:1")
    assert code == 2 and "the following arguments are required: --trials" in err


def test_without_optuna_a_sweep_says_how_to_install_it(capsys, recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    code, _, err = sweep(capsys, recipe, "--space", "lr=float:0.1:1", "--trials", 2)
    assert code == 2 and "minitrain sweep needs Optuna: pip install 'minitrain[sweep]'" in err


def test_show_and_best_options_and_missing_study(capsys):
    code, _, err = sweep(capsys, "show", "nope")
    assert code == 2 and "no sweep 'nope'" in err
    code, _, err = sweep(capsys, "best", "nope", "--trials", "3")
    assert code == 2 and "unrecognized arguments: --trials 3" in err


# --- sweeps ------------------------------------------------------------------------------------------

RENDEZVOUS = '''

import time


class Rendezvous:
    """Each trial waits at its start (at most 2 minutes) until two trials have begun, so that
    two surely run at once however slowly the second worker starts."""

    @minitrain.hookimpl
    def on_fit_start(self, trainer):
        folder, deadline = Path(trainer.run_dir).parent, time.monotonic() + 120
        while len(list(folder.glob("trial-*/events.jsonl"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)


PLUGINS = [Rendezvous()]
'''


def test_four_trials_on_two_workers(capsys, recipe):
    recipe = recipe.with_name("rendezvous.py")
    recipe.write_text(recipe.with_name("tiny_recipe.py").read_text() + RENDEZVOUS)
    args = [
        recipe,
        "--space",
        "lr=float:0.02:0.5:log",
        "--trials",
        4,
        "--workers",
        2,
        "--study",
        "four",
        "--set",
        "epochs=2",
        "--sampler",
        "random:seed=1",
    ]
    code, out, err = sweep(capsys, *args)
    assert code == 0, (out, err)
    trials = study("four").get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    first_end = min(t.datetime_complete for t in trials)
    assert sum(t.datetime_start < first_end for t in trials) == 2  # two ran at once
    for t in trials:  # each an ordinary run in its own directory, with its values and its place in the study
        run_dir = SWEEPS / "four" / f"trial-{t.number:04d}"
        assert plugin_record(run_dir) == {"study": "four", "trial": t.number, "monitor": "val_acc", "direction": "max"}
        assert json.loads((run_dir / "config.json").read_text())["lr"] == pytest.approx(t.params["lr"], rel=1e-12)
        metrics = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        fit_end = next(e for e in metrics if e["event"] == "FitEnd")
        assert t.value == fit_end["metrics"]["val_acc"] and t.user_attrs["epochs"] == 2
        assert (SWEEPS / "four" / "logs" / f"trial-{t.number:04d}.log").is_file()
    assert sorted(p.name for p in (SWEEPS / "four").glob("trial-*")) == [f"trial-{n:04d}" for n in range(4)]

    code, out, _ = sweep(capsys, *args)  # the same command again: the study has its trials
    assert code == 0 and "already has 4 of 4 trials" in out and len(states("four")) == 4
    code, _, err = sweep(capsys, *args[:-4], "--set", "epochs=3", "--sampler", "random:seed=1")
    assert code == 2 and "searches something else: fixed (['epochs=2'] in the study, ['epochs=3'] now)" in err

    code, out, _ = sweep(capsys, "show", "four", "--json")
    shown = json.loads(out)
    best = max(trials, key=lambda t: t.value)
    assert shown["best"] == best.number and [r["number"] for r in shown["trials"]][0] == best.number
    values = [r["value"] for r in shown["trials"]]
    assert values == sorted(values, reverse=True)
    assert shown["command"][:3] == ["minitrain", "run", str(recipe)] and "epochs=2" in shown["command"]
    page = (SWEEPS / "four" / "sweep.html").read_text()
    for number in range(4):
        assert f'href="trial-{number:04d}/report.html"' in page  # drawn from each trial's event log
        assert (SWEEPS / "four" / f"trial-{number:04d}" / "report.html").is_file()
    for plot in ("history.png", "intermediate.png", "importances.png", "slice.png"):
        assert f'src="{plot}"' in page and (SWEEPS / "four" / plot).stat().st_size > 1000

    code, out, err = sweep(capsys, "best", "four")
    assert code == 0 and f"trial {best.number}" in err
    assert out.strip() == f"minitrain run {recipe} --set epochs=2 --set lr={best.params['lr']!r}"


def test_pruning_stops_a_hopeless_trial(capsys, recipe):
    """lr=1e3 against lr=0.05: the median pruner stops it after its first validation, through the
    trainer's stop request, and the study records it pruned. The trials' order is fixed by
    queueing them in the study (Optuna's enqueue_trial) before the sweep starts."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = "prune.journal"
    queued = optuna.create_study(
        study_name="prune", direction="minimize", storage=JournalStorage(JournalFileBackend(journal))
    )
    for lr in (0.05, 1000, 0.05, 1000):
        queued.enqueue_trial({"lr": lr})
    code, out, err = sweep(
        capsys,
        recipe,
        "--space",
        "lr=choice:0.05,1000",
        "--trials",
        4,
        "--study",
        "prune",
        "--storage",
        journal,
        "--monitor",
        "val_loss",
        "--set",
        "epochs=3",
        "--pruner",
        "median:n_startup_trials=1",
    )
    assert code == 0, (out, err)
    trials = study("prune", JournalStorage(JournalFileBackend(journal))).get_trials(deepcopy=False)
    assert [(t.params["lr"], t.state.name) for t in trials] == [
        (0.05, "COMPLETE"),
        (1000, "PRUNED"),
        (0.05, "COMPLETE"),
        (1000, "PRUNED"),
    ]
    for t in trials:
        events = [
            json.loads(line)
            for line in (SWEEPS / "prune" / f"trial-{t.number:04d}" / "events.jsonl").read_text().splitlines()
        ]
        fit_end = events[-1]
        assert fit_end["event"] == "FitEnd"
        if t.state.name == "PRUNED":
            assert fit_end["epochs_completed"] == 1
            assert fit_end["stop_reason"].startswith("pruned by the sweep's median")
            assert t.value > 100 and t.user_attrs["epochs"] == 1  # the value it was pruned at
        else:
            assert fit_end["epochs_completed"] == 3 and fit_end["stop_reason"] is None
    assert "trial 1 pruned after epoch 1" in out


FAILING_RECIPE = """
from pathlib import Path
from typing import Literal

import torch
from torch import nn

import minitrain
from minitrain.kit.data import CIFAR10_CLASSES, cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.2
    device: str = "cpu"
    data_dir: Path = Path({data_dir!r})
    failure: Literal["none", "nan", "raise"] = "none"


class Net(nn.Module):
    def __init__(self, failure):
        super().__init__()
        self.failure, self.layers = failure, nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))

    def forward(self, x):
        if self.failure == "raise" and self.training:
            raise RuntimeError("the model broke")
        return self.layers(x) * (float("nan") if self.failure == "nan" else 1.0)


def build(config, device):
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed)
    model = Net(config.failure)
    return minitrain.Components(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=config.lr),
                                train_loader=train, val_loader=test, class_names=CIFAR10_CLASSES)
"""


def test_a_trial_is_not_pruned_after_its_last_epoch(capsys, recipe):
    """Stopping a trial that has trained all its epochs saves nothing: its last value is reported,
    but not judged, and the trial is complete, however bad."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend("last.journal"))
    queued = optuna.create_study(study_name="last", direction="minimize", storage=storage)
    for lr in (0.05, 1000):
        queued.enqueue_trial({"lr": lr})
    code, out, err = sweep(
        capsys,
        recipe,
        "--space",
        "lr=choice:0.05,1000",
        "--trials",
        2,
        "--study",
        "last",
        "--storage",
        "last.journal",
        "--monitor",
        "val_loss",
        "--set",
        "epochs=1",
        "--pruner",
        "median:n_startup_trials=1",
    )
    assert code == 0, (out, err)
    trials = study("last", storage).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"] and trials[1].value > 100
    assert all(t.intermediate_values == {1: t.value} for t in trials)


def test_failing_trials_are_recorded_and_the_sweep_goes_on(capsys, write_recipe, fake_cifar):
    recipe = write_recipe(FAILING_RECIPE.format(data_dir=str(fake_cifar)), "failing.py")
    code, out, err = sweep(
        capsys,
        recipe,
        "--space",
        "failure=choice:none,nan,raise",
        "--trials",
        3,
        "--sampler",
        "grid",
        "--study",
        "fails",
        "--pruner",
        "none",
    )
    assert code == 0, (out, err)
    trials = {t.params["failure"]: t for t in study("fails").get_trials(deepcopy=False)}
    assert trials["none"].state.name == "COMPLETE"
    assert trials["nan"].state.name == trials["raise"].state.name == "FAIL"
    assert trials["nan"].user_attrs["error"].startswith("non-finite training loss (nan) in epoch 1")
    assert (
        trials["raise"]
        .user_attrs["error"]
        .startswith("training failed in epoch 1, step 1: RuntimeError: the model broke")
    )
    for t in trials.values():
        assert "\n" not in t.user_attrs.get("error", "")
    assert f"trial {trials['raise'].number} failed: training failed" in out
    code, out, _ = sweep(capsys, "show", "fails")
    assert code == 0 and "RuntimeError: the model broke" in out and "non-finite training loss" in out


def test_a_trial_that_cannot_start_stops_the_sweep(capsys, recipe):
    """A monitor the recipe does not report is found by the first trial's run (exit code 2); every
    trial would fail alike, so the sweep stops with that trial's error, and the trial does not
    count: the corrected command takes the study over."""
    args = [recipe, "--space", "lr=float:0.05:0.5", "--trials", 2, "--study", "nomonitor", "--set", "epochs=1"]
    code, out, err = sweep(capsys, *args, "--monitor", "val_f1", "--direction", "max")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("minitrain: error: trial 0 could not start")
    assert "monitor 'val_f1' is not a metric this run reports" in err
    code, out, err = sweep(capsys, *args)
    assert code == 0, (out, err)
    assert sorted(states("nomonitor").values()) == ["COMPLETE", "COMPLETE", "FAIL"]


def test_early_stopping_and_checkpoints_work_inside_trials(capsys, recipe):
    """On the tiny data val_loss rises after epoch 2 at lr=0.2: early stopping ends the trial,
    which is complete (not pruned) with its last value, and the checkpoint plugin saved as usual."""
    code, out, err = sweep(
        capsys,
        recipe,
        "--space",
        "lr=choice:0.2,0.21",
        "--trials",
        1,
        "--study",
        "es",
        "--set",
        "epochs=8",
        "--pruner",
        "none",
        "--monitor",
        "val_loss",
        "--plugin",
        "early_stopping:patience=1",
        "--plugin",
        "checkpoint",
    )
    assert code == 0, (out, err)
    (trial,) = study("es").get_trials(deepcopy=False)
    run_dir = SWEEPS / "es" / "trial-0000"
    assert trial.state.name == "COMPLETE" and trial.user_attrs["epochs"] < 8
    assert trial.user_attrs["stop_reason"].startswith("val_loss did not improve")
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    assert json.loads((run_dir / "run.json").read_text())["plugins"]["early_stopping"]["patience"] == 1


def test_workers_share_the_cores_and_take_gpus_in_turn(monkeypatch):
    import torch

    from minitrain.commands.sweep import _gpus, _threads
    from minitrain.commands.sweep.runner import Sweep

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [_threads(k) for k in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads(2) == 3  # the user's choice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _gpus("auto") == ["0", "1"] and _gpus("cpu") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _gpus("cuda") == ["4", "6"]
    sweep_ = Sweep.__new__(Sweep)  # only its environment for a worker
    sweep_.plan = type("Plan", (), {"threads": 3, "gpus": ["4", "6"]})()
    assert [sweep_._environment(i)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["4", "6", "4"]


def test_prune_plugin_refuses_a_run_outside_a_sweep(capsys, recipe):
    code = cli.main(["run", str(recipe), "--plugin", "prune:study=s,trial=0"])
    _, err = capsys.readouterr()
    assert code == 2 and "prune: this plugin reports to the study of a `minitrain sweep`" in err
    assert not Path("runs").exists() or not any(Path("runs").iterdir())


# --- kills, Ctrl-C, and a sweep run again --------------------------------------------------------


def test_which_running_trials_are_lost():
    """On this host a trial is lost when its sweep's process has ended (or its pid now names
    another process); elsewhere, when its sweep has not said it is alive for STALE_AFTER_S."""
    import datetime
    import socket
    from types import SimpleNamespace

    from minitrain.commands.sweep import study as studies

    def trial(**attrs):
        return SimpleNamespace(user_attrs=attrs, datetime_start=datetime.datetime.now())

    me = studies.owner()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    now = time.time()
    assert not studies.is_lost(trial(**me))
    assert studies.is_lost(trial(**{**me, "pid": ended.pid}))
    assert studies.is_lost(trial(**{**me, "pid_start": "another boot:1"}))
    elsewhere = {"host": socket.gethostname() + "-other", "pid": 1, "pid_start": None}
    assert not studies.is_lost(trial(**elsewhere, alive=now - 60))
    assert studies.is_lost(trial(**elsewhere, alive=now - studies.STALE_AFTER_S - 1))
    assert not studies.is_lost(trial())  # just asked for; its owner not written yet
    orphan = SimpleNamespace(
        user_attrs={}, datetime_start=datetime.datetime.now() - datetime.timedelta(seconds=studies.ORPHAN_AFTER_S + 1)
    )
    assert studies.is_lost(orphan)  # its sweep was killed between Optuna's ask and writing the owner
    half = SimpleNamespace(user_attrs={"host": socket.gethostname()}, datetime_start=orphan.datetime_start)
    assert studies.is_lost(half)  # ... or while writing it, one attribute at a time


def test_a_trial_orphaned_between_ask_and_its_owner_is_recovered_by_the_next_sweep(capsys, recipe):
    """A sweep killed right after Optuna's ``ask()``: its trial is RUNNING with no owner. The same
    command again does not count it as running for long: within seconds it is failed, its values
    queued again, and the study gets all its trials."""
    args = [
        recipe,
        "--space",
        "lr=float:0.02:0.5:log",
        "--study",
        "orphan",
        "--set",
        "epochs=1",
        "--sampler",
        "random:seed=1",
    ]
    code, out, err = sweep(capsys, *args, "--trials", 1)
    assert code == 0, (out, err)
    orphan = study("orphan").ask()  # as the killed sweep left it
    code, out, err = sweep(capsys, *args, "--trials", 2)  # without the orphan taken for lost: 1 trial short
    assert code == 0, (out, err)
    trials = study("orphan").get_trials(deepcopy=False)
    assert trials[orphan.number].state.name == "FAIL" and "error" not in trials[orphan.number].user_attrs
    assert f"trial {orphan.number} was running when its sweep stopped" in out
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    """The sweep in a process group of its own, as a shell would start it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "minitrain", "sweep", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _wait_for(condition, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the sweep ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _trial_states(name: str) -> list[str]:
    if not (SWEEPS / name / "study.journal").is_file():
        return []  # not yet: loading it here would create the sweep's folder first
    try:
        return [t.state.name for t in study(name).get_trials(deepcopy=False)]
    except (KeyError, FileNotFoundError, ValueError):
        return []


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.glob("trial-*/**/*")
        if p.is_file()
    }


def test_sigkill_then_the_same_command_continues_the_study(capsys, recipe, tmp_path):
    args = [
        str(recipe),
        "--space",
        "lr=float:0.02:0.5:log",
        "--trials",
        "4",
        "--workers",
        "2",
        "--study",
        "killed",
        "--set",
        "epochs=60",
        "--pruner",
        "none",
    ]
    first = _launch(args, tmp_path / "first.log")
    _wait_for(lambda: (s := _trial_states("killed")).count("COMPLETE") >= 1 and "RUNNING" in s, first)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep, its process server and its trials, at once
    first.wait()
    before = _trial_states("killed")
    cut_short = [n for n, s in enumerate(before) if s == "RUNNING"]
    files = _files(SWEEPS / "killed")

    code, output, err = sweep(capsys, *args)  # the same command (here, in this process: it starts faster)
    assert code == 0, (output, err)
    trials = study("killed").get_trials(deepcopy=False)
    assert sum(t.state.name == "COMPLETE" for t in trials) == 4  # exactly N
    for number in cut_short:  # marked failed, its values run again by a new trial
        assert trials[number].state.name == "FAIL"
        assert f"trial {number} was running when its sweep stopped" in output
        retry = next(t for t in trials if t.user_attrs.get("retry_of") == number)
        assert retry.state.name == "COMPLETE"
        assert retry.params == trials[number].params or not trials[number].params  # (none: killed as it was asked for)
    assert all(_files(SWEEPS / "killed").get(path) == stat for path, stat in files.items())  # nothing overwritten
    for t in trials:
        run_dir = SWEEPS / "killed" / f"trial-{t.number:04d}"
        if run_dir.exists():
            assert plugin_record(run_dir)["trial"] == t.number
    assert {p.name for p in (SWEEPS / "killed").glob("trial-*")} >= {
        f"trial-{t.number:04d}" for t in trials if t.state.name == "COMPLETE"
    }


def test_ctrl_c_stops_cleanly_and_prints_the_command_that_continues(capsys, recipe, tmp_path):
    args = [
        str(recipe),
        "--space",
        "lr=float:0.02:0.5:log",
        "--trials",
        "3",
        "--workers",
        "2",
        "--set",
        "epochs=60",
        "--pruner",
        "none",
        "--plugin",
        "checkpoint",
    ]
    log = tmp_path / "sweep.log"
    process = _launch(args, log)
    _wait_for(lambda: len(list(SWEEPS.glob("*/trial-000[01]/events.jsonl"))) == 2, process)  # both training
    name = next(SWEEPS.iterdir()).name
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert process.wait(60) == 130
    output = log.read_text()
    continue_line = next(line for line in output.splitlines() if "Continue with: " in line)
    command = continue_line.split("Continue with: ", 1)[1]
    assert command.startswith(f"minitrain sweep run {recipe}") and f"--study {name}" in command
    trials = study(name).get_trials(deepcopy=False)
    stopped = [t for t in trials if t.user_attrs.get("interrupted") == "SIGINT"]
    assert stopped and all(t.state.name == "FAIL" for t in stopped)
    for t in stopped:  # stopped at a step boundary, with a checkpoint and the reason in its log
        fit_events = (SWEEPS / name / f"trial-{t.number:04d}" / "events.jsonl").read_text()
        assert '"Interrupted"' in fit_events
    assert sum(t.state.name == "WAITING" for t in trials) == len(stopped)

    code, out, err = sweep(capsys, *command.split()[2:])
    assert code == 0, (out, err)
    assert sum(t.state.name == "COMPLETE" for t in study(name).get_trials(deepcopy=False)) == 3


def test_import_minitrain_does_not_import_optuna():
    code = (
        "import sys, minitrain, minitrain.commands.cli, minitrain_plugins.prune\n"
        "minitrain.commands.cli.parser()\n"
        "assert 'optuna' not in sys.modules, 'optuna imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --- a study in PostgreSQL, shared by two "machines" ------------------------------------------------


def _postgres_binaries() -> Path | None:
    """Debian's postgresql package puts the server under /usr/lib/postgresql/VERSION/bin."""
    import shutil

    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: [int(x) for x in p.parts[-3].split(".") if x.isdigit()],
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this test's own on 127.0.0.1, a free port and a temporary data
    folder (as the ``postgres`` user when the tests run as root: the server refuses root)."""
    import pwd
    import shutil
    import socket
    import tempfile

    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install 'psycopg[binary]'")
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server (Debian: apt-get install postgresql; .ci/run installs it)")
    user = None
    root = Path(tempfile.mkdtemp(prefix="minitrain-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run the server as")
        os.chown(root, account.pw_uid, account.pw_gid)
        user = "postgres"

    def run(*command):
        return subprocess.run([str(c) for c in command], user=user, capture_output=True, text=True, timeout=300)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    made = run(binaries / "initdb", "-D", root / "data", "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
    if made.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {made.stderr.strip()[-300:]}")
    started = run(
        binaries / "pg_ctl",
        "-D",
        root / "data",
        "-l",
        root / "server.log",
        "-w",
        "-t",
        "60",
        "-o",
        f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off",
        "start",
    )
    if started.returncode:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {(started.stderr + log).strip()[-300:]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(binaries / "pg_ctl", "-D", root / "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_machines_share_a_study_in_postgresql(postgres, recipe, tmp_path):
    optuna.storages.RDBStorage(postgres)  # the tables, once, before the two sweeps race to create the study
    args = [
        str(recipe),
        "--space",
        "lr=float:0.02:0.5:log",
        "--trials",
        "6",
        "--study",
        "shared",
        "--storage",
        postgres,
        "--set",
        "epochs=20",
        "--pruner",
        "none",
    ]
    machines = [tmp_path / "a", tmp_path / "b"]
    processes = []
    for folder in machines:
        folder.mkdir()
        os.chdir(folder)  # each "machine" has its own working directory, and so its own runs/
        processes.append(_launch(args, folder / "sweep.log"))
    for folder, process in zip(machines, processes):
        assert process.wait(240) == 0, (folder / "sweep.log").read_text()
    trials = optuna.load_study(study_name="shared", storage=postgres).get_trials(deepcopy=False)
    complete = {t.number for t in trials if t.state.name == "COMPLETE"}
    assert len(complete) == 6  # --trials counts for the study, whichever machine ran them
    ran = [{int(p.name.split("-")[1]) for p in (folder / SWEEPS / "shared").glob("trial-*")} for folder in machines]
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == complete
    sweep_file = json.loads((machines[0] / SWEEPS / "shared" / "sweep.json").read_text())
    assert sweep_file["storage"] == postgres  # no password in it to hide


def test_run_is_the_sweep_command_named_or_implied(capsys, recipe):
    named = sweep(capsys, "run", recipe, "--trials", 2)
    implied = sweep(capsys, recipe, "--trials", 2)
    assert named[0] == implied[0] == 2 and "nothing to search" in named[2]
    assert named[2] == implied[2]

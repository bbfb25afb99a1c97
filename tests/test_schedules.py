"""Schedules sized from the steps a run really makes (``Components(make_scheduler=...)``, given the
run's ``Steps``): limits, ``max_steps`` and gradient accumulation counted, the recipes in
``recipes/`` sized that way, and a schedule that keeps its size on resume: a ``--set`` that would
re-size it mid-run is refused in one line (docs/runs-and-resume.md)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import minitrain
from minitrain import hookimpl
from minitrain.commands import cli
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.lock import LOCK_FILE
from minitrain.engine.registry import register_plugin
from minitrain.engine.state import Steps, StopKind

FIRST_PARTY_PLUGINS = {"checkpoint", "accumulate", "amp", "tta", "lookahead", "validation"}
ROOT = Path(__file__).parent.parent

SCHEDULED = """
from pathlib import Path
from typing import Literal

import torch
from torch import nn

import minitrain
from minitrain.kit.data import cifar10_loaders
from minitrain.kit.schedules import triangular


class Config(minitrain.RecipeConfig):
    epochs: int = 2
    batch_size: int = 16
    lr: float = 0.2
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    data_dir: Path = Path({data_dir!r})
    legacy: bool = False  # the schedule sized in build() from epochs, as recipes did before make_scheduler


def build(config, device):
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed, crop=0,
                                  flip="none")
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    if config.legacy:
        return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test,
                                    scheduler=triangular(optimizer, config.epochs * len(train)),
                                    scheduler_interval="step")
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test,
                                make_scheduler=lambda steps: triangular(optimizer, steps.total),
                                scheduler_interval="step")
"""
STEPS = 5  # batches per epoch of the fake data set in batches of 16


@pytest.fixture
def scheduled(write_recipe, fake_cifar):
    return write_recipe(SCHEDULED.format(data_dir=str(fake_cifar)), "scheduled.py")


class Rates:
    """The factor of the first group's lr that each step trains with, and where it ended."""

    def __init__(self):
        self.factors: list[float] = []

    @hookimpl
    def on_batch_start(self, trainer):
        self.factors.append(factor(trainer))


def factor(trainer) -> float:
    group = trainer.optimizer.param_groups[0]
    return group["lr"] / group["initial_lr"]


def fit(recipe, overrides=(), plugins=(), run_dir="run", resume=None, extra=()):
    trainer = prepare(RunRequest(recipe, list(overrides), list(plugins), ["console"], run_dir, resume=resume))
    for plugin in extra:
        register_plugin(trainer.pm, plugin)
    trainer.fit()
    return trainer


# --- sized from the steps the run makes -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, plugins, steps",
    [
        ([], [], Steps(per_epoch=5, total=10, epochs=2)),
        (["limit_train_batches=3"], [], Steps(3, 6, 2)),
        (["limit_train_batches=0.5"], [], Steps(2, 4, 2)),
        (["limit_train_batches=1.0"], [], Steps(5, 10, 2)),
        (["max_steps=7"], [], Steps(5, 7, 2)),
        (["max_steps=3"], [], Steps(5, 3, 1)),
        ([], ["accumulate:steps=2"], Steps(3, 6, 2)),  # 2+2+1 batches an epoch: its last batch steps
        (["max_steps=8"], ["accumulate:steps=2"], Steps(3, 4, 2)),  # the cut window of batch 8 never steps
    ],
    ids=[
        "all",
        "3-batches",
        "half",
        "fraction-1.0",
        "max_steps-mid-epoch-2",
        "max_steps-epoch-1",
        "accumulate",
        "accumulate-max_steps",
    ],
)
def test_the_schedule_spans_the_steps_the_run_makes(scheduled, overrides, plugins, steps):
    rates = Rates()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(scheduled, overrides, plugins, extra=[rates])
    assert trainer.schedule_steps == steps
    assert trainer.scheduler.last_epoch == steps.total  # stepped exactly as often as it was sized for
    assert max(rates.factors) == pytest.approx(1.0)  # the warm-up reached the peak...
    assert factor(trainer) == 0.0  # ...and the decay its end, at the run's last step
    assert not [w for w in caught if "advances once per optimizer step" in str(w.message)]  # accumulate: sized


@pytest.mark.parametrize(
    "recipe, overrides, end",
    [
        ("cifar10_quick.py", ["widths=[8,8,8]", "batch_size=8"], 0.0),
        ("cifar10_finetune.py", ["widths=8,8,8", "batch_size=8"], 0.0),
        ("cifar10_speedrun.py", ["widths=[8,16,16]", "batch_size=16", "eval_batch_size=16"], 0.07),
    ],
)
def test_each_recipe_sizes_its_schedule_from_the_run(fake_cifar, recipe, overrides, end):
    """With a limit the warm-up used to stop half-way: peak lr 0.1 of the quick recipe's 0.2."""
    rates = Rates()
    trainer = fit(
        ROOT / "recipes" / recipe,
        [f"data_dir={fake_cifar}", "device=cpu", "epochs=2", "limit_train_batches=2", *overrides],
        extra=[rates],
    )
    assert trainer.schedule_steps == Steps(2, 4, 2)
    assert max(rates.factors) == pytest.approx(1.0)
    assert factor(trainer) == pytest.approx(end)


def test_a_make_scheduler_that_fails_is_one_line(capsys, write_recipe, fake_cifar):
    path = write_recipe(
        SCHEDULED.format(data_dir=str(fake_cifar)).replace("triangular(optimizer, steps.total)", "1 / 0"), "fails.py"
    )
    assert cli.main(["run", str(path), "--no-plugin", "console"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "minitrain: error: make_scheduler(Steps(per_epoch=5, total=10, epochs=2)) failed: ZeroDivisionError: "
        "division by zero"
    )


def test_a_recipe_gives_a_scheduler_or_make_scheduler_not_both(capsys, write_recipe, fake_cifar):
    path = write_recipe(
        SCHEDULED.format(data_dir=str(fake_cifar)).replace(
            "make_scheduler=lambda steps:", "scheduler=triangular(optimizer, 10), make_scheduler=lambda steps:"
        ),
        "both.py",
    )
    assert cli.main(["run", str(path), "--no-plugin", "console"]) == 2
    assert capsys.readouterr().err.strip().endswith("both scheduler and make_scheduler are set; give one")


class PauseAt:
    """Stops the run after a given step, as max_time or SIGTERM would: resumable."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def on_batch_end(self, event, trainer):
        if event.global_step == self.step:
            trainer.request_stop("paused", StopKind.MAX_TIME)


# --- resume -------------------------------------------------------------------------------------------------


def cli_run(capsys, recipe, run_dir, *argv) -> tuple[int, str, str]:
    code = cli.main(["run", str(recipe), "--no-plugin", "console", "--run-dir", str(run_dir), *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "change, total",
    [("epochs=3", 15), ("limit_train_batches=3", 6), ("max_steps=4", 4)],
)
def test_a_resume_that_would_resize_the_schedule_is_refused_in_one_line(capsys, scheduled, tmp_path, change, total):
    run_dir = tmp_path / "run"
    fit(scheduled, [], [], run_dir, extra=[PauseAt(3)])
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    code, out, err = cli_run(capsys, scheduled, run_dir, "--resume", "auto", "--set", change)
    key, value = change.split("=")
    old = {"epochs": "2", "limit_train_batches": "None", "max_steps": "None"}[key]
    last = run_dir / "checkpoints" / "last.pt"
    assert code == 2 and err.splitlines()[-1] == (
        f"minitrain: error: --resume {last}: cannot change {key} ({old} in the checkpoint, {value} now): the "
        f"learning-rate schedule was sized for 10 optimizer steps and would be re-sized to {total} mid-run, so the "
        f"lr would jump here. Resume without changing it, or train on in a new run from its weights: --init-from "
        f"{last} --run-dir NEW_DIR"
    )
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE} == files


def test_a_change_that_leaves_the_schedule_alone_is_applied(capsys, scheduled, tmp_path):
    """``max_steps`` already ended the run at step 7: more epochs add no step, the schedule keeps its size."""
    run_dir = tmp_path / "run"
    assert cli_run(capsys, scheduled, run_dir, "--set", "max_steps=7", "--set", "max_time=3600")[0] == 0
    code, out, err = cli_run(capsys, scheduled, run_dir, "--resume", "auto", "--set", "max_time=7200")
    assert code == 0 and "run already complete: max_steps=7 reached" in out


def test_a_complete_run_says_how_to_train_on(capsys, scheduled, tmp_path):
    run_dir = tmp_path / "run"
    assert cli_run(capsys, scheduled, run_dir)[0] == 0
    code, out, _ = cli_run(capsys, scheduled, run_dir, "--resume", "auto")
    last = run_dir / "checkpoints" / "last.pt"
    assert code == 0 and out.strip() == (
        f"minitrain: run already complete: 2 of 2 epochs ({run_dir}); its learning-rate schedule has ended; to "
        f"train on, start a new run from its weights: --init-from {last} --run-dir NEW_DIR"
    )
    code, out, _ = cli_run(capsys, scheduled, tmp_path / "more", "--init-from", last, "--set", "epochs=1")
    assert code == 0 and out.startswith(f"done: 1 epochs, {STEPS} steps")  # what the hint says works


def test_max_steps_that_ended_the_schedule_does_not_suggest_raising_it(capsys, scheduled, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = cli_run(capsys, scheduled, run_dir, "--set", "max_steps=7")
    assert code == 0 and out.startswith("done: 1 epochs, 7 steps; train_loss=")
    assert err.splitlines()[-1] == (
        "minitrain: stopped at step 7: max_steps=7 reached; its learning-rate schedule has ended; to train on, "
        f"start a new run from its weights: --init-from {run_dir / 'checkpoints' / 'last.pt'} --run-dir NEW_DIR"
    )


def test_a_paused_run_resumes_on_the_same_schedule(scheduled, tmp_path):
    straight, paused, resumed = Rates(), Rates(), Rates()
    fit(scheduled, ["epochs=3"], ["checkpoint"], tmp_path / "straight", extra=[straight])
    fit(scheduled, ["epochs=3"], ["checkpoint"], tmp_path / "paused", extra=[paused, PauseAt(7)])
    trainer = fit(scheduled, ["max_time=3600"], [], tmp_path / "paused", resume="auto", extra=[resumed])
    assert trainer.schedule_steps == Steps(5, 15, 3)
    assert paused.factors + resumed.factors == straight.factors  # no jump at step 7


def test_a_trainer_resumed_by_hand_keeps_the_size_its_schedule_started_with(fake_cifar):
    from minitrain.kit.data import cifar10_loaders
    from minitrain.kit.schedules import triangular

    def trainer(epochs: int) -> minitrain.Trainer:
        train, _ = cifar10_loaders(fake_cifar, 16, crop=0, flip="none")
        model = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(48, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return minitrain.Trainer(
            model,
            optimizer,
            train,
            epochs=epochs,
            device="cpu",
            plugins=[],
            make_scheduler=lambda steps: triangular(optimizer, steps.total),
            scheduler_interval="step",
        )

    first = trainer(epochs=1)
    first.fit()
    longer = trainer(epochs=2)
    with pytest.warns(UserWarning, match="keeps the size it had when the run started, 5 optimizer steps"):
        longer.load_state_dict(first.state_dict())
    assert longer.schedule_steps == Steps(5, 5, 1)
    assert longer.scheduler.last_epoch == 5 and factor(longer) == 0.0  # where the first one ended, not re-sized


def test_a_schedule_that_build_sized_from_epochs_is_refused_too(capsys, scheduled, tmp_path):
    run_dir = tmp_path / "run"
    fit(scheduled, ["legacy=true"], [], run_dir, extra=[PauseAt(3)])
    code, out, err = cli_run(capsys, scheduled, run_dir, "--resume", "auto", "--set", "epochs=3")
    last = run_dir / "checkpoints" / "last.pt"
    assert code == 2 and err.splitlines()[-1] == (
        f"minitrain: error: --resume {last}: cannot change epochs (2 in the checkpoint, 3 now): the learning-rate "
        "schedule that build() made depends on it: the lr would jump from 0.175 to 0.2 here. Resume without "
        f"changing it, or train on in a new run from its weights: --init-from {last} --run-dir NEW_DIR"
    )


def test_a_schedule_that_does_not_depend_on_the_change_goes_on(capsys, scheduled, tmp_path):
    source = scheduled.read_text().replace(
        "scheduler=triangular(optimizer, config.epochs * len(train))",
        "scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)",
    )
    scheduled.write_text(source)
    run_dir = tmp_path / "run"
    assert cli_run(capsys, scheduled, run_dir, "--set", "legacy=true")[0] == 0
    code, out, err = cli_run(capsys, scheduled, run_dir, "--resume", "auto", "--set", "epochs=3")
    assert code == 0 and out.startswith(f"done: 3 epochs, {3 * STEPS} steps") and "warning" not in err
    history = json.loads((run_dir / "run.json").read_text())["history"]
    assert history[-1]["changed"] == {"epochs": [2, 3]}

"""The run limits as a person gives them: ``limit_*_batches`` read as Lightning reads them (an int
is a number of batches, a float a fraction: ``1`` is one batch, ``1.0`` all of them) through
``--set``, ``--config``, ``config.json`` and a resume; a plain line for a bad value; and the
run's last line when ``max_time`` stops it before an epoch ends."""

from __future__ import annotations

import json
import re

import pytest

from minitrain import hookimpl
from minitrain.commands import cli
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.registry import register_plugin

FIRST_PARTY_PLUGINS = {"checkpoint"}
STEPS = 5  # batches per epoch of the `recipe` fixture


def run(capsys, recipe, *argv) -> tuple[int, str, str]:
    code = cli.main(["run", str(recipe), "--no-plugin", "console", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "given, stored, steps",
    [("1.0", 1.0, STEPS), ("1", 1, 1), ("0.4", 0.4, 2), ("3", 3, 3), ("1e-1", 0.1, 1)],
)
def test_a_float_is_a_fraction_and_an_int_a_number_of_batches(capsys, recipe, tmp_path, given, stored, steps):
    code, out, _ = run(capsys, recipe, "--set", f"limit_train_batches={given}", "--run-dir", tmp_path / "run")
    assert code == 0
    assert out.startswith(f"done: 1 epochs, {steps} steps; ")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["limit_train_batches"]
    assert saved == stored and type(saved) is type(stored)  # 1.0 stays a float in config.json


def test_one_point_zero_survives_a_resume_and_one_to_one_point_zero_is_a_change(capsys, recipe, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, recipe, "--set", "limit_train_batches=1.0", "--run-dir", run_dir)[0] == 0
    code, out, _ = run(capsys, recipe, "--run-dir", run_dir, "--resume", "auto", "--set", "epochs=2")
    assert code == 0 and out.startswith(f"done: 2 epochs, {2 * STEPS} steps; ")  # all batches again, not one
    assert json.loads((run_dir / "config.json").read_text())["limit_train_batches"] == 1.0
    code, out, _ = run(
        capsys, recipe, "--run-dir", run_dir, "--resume", "auto", "--set", "epochs=3", "--set", "limit_train_batches=1"
    )
    assert code == 0 and out.startswith(f"done: 3 epochs, {2 * STEPS + 1} steps; ")
    history = json.loads((run_dir / "run.json").read_text())["history"]
    changed = history[-1]["changed"]["limit_train_batches"]  # recorded, though 1 == 1.0 in Python
    assert changed == [1.0, 1] and [type(value) for value in changed] == [float, int]


def test_a_toml_float_is_a_fraction_too(recipe, tmp_path):
    file = tmp_path / "settings.toml"
    file.write_text("limit_train_batches = 1.0\nlimit_val_batches = 1\n")
    trainer = prepare(RunRequest(recipe, config_file=file, run_dir=tmp_path / "run", disabled=["console"]))
    assert trainer.limits.train_batches == 1.0 and isinstance(trainer.limits.train_batches, float)
    assert trainer.steps_per_epoch == STEPS


class CountEval:
    def __init__(self):
        self.batches = 0

    @hookimpl(wrapper=True)
    def eval_step(self, batch):
        self.batches += 1
        return (yield)


@pytest.mark.parametrize("given, batches", [("1.0", 4), ("1", 1), ("0.5", 2)])
def test_limit_val_batches_reads_the_same_way(recipe, tmp_path, given, batches):
    source = recipe.read_text().replace(
        "config.batch_size, device=device,", "config.batch_size, eval_batch_size=8, device=device,"
    )
    assert "eval_batch_size=8" in source
    recipe.write_text(source)
    trainer = prepare(
        RunRequest(
            recipe,
            ["limit_train_batches=1", f"limit_val_batches={given}"],
            run_dir=tmp_path / "run",
            disabled=["console"],
        )
    )
    counted = CountEval()
    register_plugin(trainer.pm, counted)
    trainer.fit()
    assert counted.batches == batches  # 32 test images in batches of 8: 4 in all


@pytest.mark.parametrize("value", ["1.5", "0", "2.0", "-1", "all", "nan"])
def test_a_bad_limit_is_one_plain_line(capsys, recipe, value):
    code, out, err = run(capsys, recipe, "--set", f"limit_train_batches={value}")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        "minitrain: error: --set: limit_train_batches: expected a number of batches (an int >= 1) or a "
        f"fraction of them (a float in (0, 1]) (got {value!r})"
    )
    assert "constrained" not in err and "pydantic" not in err


def test_a_float_above_one_is_refused_from_a_file_too(recipe, tmp_path, capsys):
    file = tmp_path / "settings.toml"
    file.write_text("limit_val_batches = 2.0\n")  # a float above 1: neither reading fits
    code, _, err = run(capsys, recipe, "--config", file)
    assert code == 2 and err.splitlines()[-1] == (
        f"minitrain: error: --config {file}: limit_val_batches: expected a number of batches (an int >= 1) or a "
        "fraction of them (a float in (0, 1]) (got 2.0)"
    )


# --- the run's last line ---------------------------------------------------------------------------

WAIT_FOR_TIMER = '''
import time

from minitrain import hookimpl


class WaitForTimer:
    """At step 3, wait until max_time's timer asks the run to stop: it then stops after step 3, always."""

    @hookimpl
    def on_batch_end(self, event, trainer):
        deadline = time.monotonic() + 30
        while event.global_step == 3 and trainer.state.stop is None and time.monotonic() < deadline:
            time.sleep(0.01)
'''


def test_a_run_stopped_by_max_time_before_an_epoch_ends_says_so_in_a_clean_line(capsys, recipe, tmp_path):
    (tmp_path / "wait_for_timer.py").write_text(WAIT_FOR_TIMER)
    run_dir = tmp_path / "run"
    code, out, err = run(
        capsys,
        recipe,
        "--set",
        "max_time=1.5",
        "--set",
        "epochs=5",
        "--plugin",
        "wait_for_timer.WaitForTimer",
        "--run-dir",
        run_dir,
    )
    assert code == 0
    assert out.splitlines()[-1] == f"done: 0 epochs, 3 steps; run dir: {run_dir}"  # no metrics yet, no stray ';'
    assert re.search(
        r"minitrain: stopped at step 3: max_time=0:00:02 reached; resume with: minitrain run .*"
        r"--resume auto$",
        err.strip(),
    )


def test_the_last_line_of_a_run_with_metrics(capsys, recipe, tmp_path):
    code, out, _ = run(capsys, recipe, "--run-dir", tmp_path / "run")
    assert code == 0
    assert re.fullmatch(
        rf"done: 1 epochs, {STEPS} steps; train_loss=\S+, lr=0\.2, epoch_time=\S+, samples_per_s=\S+, "
        rf"val_loss=\S+, val_acc=\S+; run dir: {re.escape(str(tmp_path / 'run'))}",
        out.splitlines()[-1],
    )

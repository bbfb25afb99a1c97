"""The commands that answer at once (help, version, the catalogues, runs, config) import nothing
that only training, plotting, tracking or search needs: torchmetrics alone takes seconds (it pulls
in torchvision, scipy and torch._dynamo). Each is run in a fresh interpreter, since this one has
imported everything long ago."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torchmetrics", "matplotlib", "mlflow", "optuna", "torchvision", "torch._dynamo")

PROBE = """
import contextlib, io, json, sys
from minitrain.commands import cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = cli.main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY or m in HEAVY)}))
"""


def imported_by(argv: list[str], cwd) -> dict:
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["plugins"], ["events"]])
def test_quick_commands_import_nothing_heavy(argv, tmp_path):
    result = imported_by(argv, tmp_path)
    assert result["code"] == 0 and result["heavy"] == []


def test_runs_imports_nothing_heavy(recipe, tmp_path):
    from minitrain.commands import cli

    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "runs" / "a"), "--no-plugin", "console"]) == 0
    result = imported_by(["runs", str(tmp_path / "runs")], tmp_path)
    assert result["code"] == 0 and result["heavy"] == []


def test_config_imports_only_what_the_recipe_does(recipe, tmp_path):
    result = imported_by(["config", str(recipe)], tmp_path)
    assert result["code"] == 0 and result["heavy"] == []


def test_the_probe_sees_a_heavy_import(recipe, tmp_path):
    """A run builds validation metrics with torchmetrics: the probe must see it, or it proves nothing."""
    result = imported_by(["run", str(recipe), "--run-dir", str(tmp_path / "r"), "--set", "limit_train_batches=1",
                          "--no-plugin", "console"], tmp_path)  # fmt: skip
    assert result["code"] == 0 and "torchmetrics" in result["heavy"]

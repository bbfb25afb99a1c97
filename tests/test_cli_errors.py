"""User errors: exit code 2, one stderr line ``minitrain: error: ...`` naming the culprit, no
traceback. (Warnings, if any, are separate ``minitrain: warning:`` lines.)"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import minitrain.engine.registry
from minitrain.commands import cli
from minitrain.engine import checkpointing
from minitrain.engine.registry import DISABLE_AUTOLOAD_ENV
from minitrain.engine.state import RunState
from minitrain.kit.data import CIFAR10_FOLDER


def run_cli(capsys, *argv) -> str:
    """Run the CLI, check the error contract, return the one error line."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if not line.startswith("minitrain: warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("minitrain: error: ")
    return lines[0]


def test_unknown_recipe_path(capsys, tmp_path):
    line = run_cli(capsys, "run", tmp_path / "nope.py")
    assert "recipe not found" in line and "nope.py" in line


def test_recipe_with_syntax_error(capsys, write_recipe):
    path = write_recipe("import minitrain\n\nclass Config(minitrain.RecipeConfig)\n    pass\n", "broken.py")
    line = run_cli(capsys, "run", path)
    assert str(path) in line and "syntax error at line 3" in line


def test_recipe_that_fails_to_import(capsys, write_recipe):
    path = write_recipe("import no_such_module_for_minitrain_tests\n", "badimport.py")
    line = run_cli(capsys, "run", path)
    assert str(path) in line and "no_such_module_for_minitrain_tests" in line


def test_recipe_without_config(capsys, write_recipe):
    path = write_recipe("def build(config, device):\n    pass\n", "noconfig.py")
    line = run_cli(capsys, "run", path)
    assert str(path) in line and "Config" in line


def test_recipe_with_config_of_wrong_type(capsys, write_recipe):
    path = write_recipe("class Config:\n    pass\n\ndef build(config, device):\n    pass\n", "plainconfig.py")
    line = run_cli(capsys, "run", path)
    assert str(path) in line and "minitrain.RecipeConfig" in line


def test_recipe_without_build(capsys, write_recipe):
    path = write_recipe("import minitrain\n\nclass Config(minitrain.RecipeConfig):\n    pass\n", "nobuild.py")
    line = run_cli(capsys, "run", path)
    assert str(path) in line and "build" in line


RAISING_BUILD = """
import minitrain

class Config(minitrain.RecipeConfig):
    device: str = "cpu"

def build(config, device):
    raise {error}
"""


@pytest.mark.parametrize(
    "error, expected",
    [
        ('ValueError("the model is too big")', "ValueError: the model is too big"),
        ('RuntimeError("first line\\nsecond line")', "first line"),
        ("__import__('pydantic').TypeAdapter(int).validate_python('x')", "ValidationError"),
    ],
    ids=["one-line", "multi-line", "pydantic"],
)
def test_recipe_whose_build_raises(capsys, write_recipe, tmp_path, error, expected):
    path = write_recipe(RAISING_BUILD.format(error=error), "raising.py")
    line = run_cli(capsys, "run", path, "--run-dir", tmp_path / "run")
    assert str(path) in line and "build() failed" in line and expected in line


def test_recipe_whose_build_returns_the_wrong_thing(capsys, write_recipe, tmp_path):
    path = write_recipe(RAISING_BUILD.replace("raise {error}", "return 42"), "wrongreturn.py")
    line = run_cli(capsys, "run", path, "--run-dir", tmp_path / "run")
    assert "minitrain.Components" in line and "int" in line


def test_unknown_set_key(capsys, recipe):
    line = run_cli(capsys, "run", recipe, "--set", "learning_rate=0.1")
    assert "learning_rate" in line and "unknown key" in line


def test_unknown_set_key_names_the_closest_field(capsys, recipe):
    line = run_cli(capsys, "run", recipe, "--set", "epoch=2")
    assert line == (
        "minitrain: error: --set: epoch: unknown key; did you mean epochs? "
        f"(minitrain config {recipe.name} lists the fields)"
    )


QUICK_RECIPE = pathlib.Path(__file__).resolve().parent.parent / "recipes" / "cifar10_quick.py"


@pytest.mark.parametrize(
    "override, message",
    [
        ("widths=[32,64]", "widths: expected 3 values, got 2"),
        ("widths=[32,64,128,256]", "widths: expected 3 values, got 4"),
        ("limit_train_batches=abc", "limit_train_batches: expected "),
    ],
)
def test_bad_value_says_what_was_expected_in_plain_words(capsys, override, message):
    line = run_cli(capsys, "config", QUICK_RECIPE, "--set", override)
    assert line.startswith(f"minitrain: error: --set: {message}")
    assert not any(leak in line for leak in ("Field required", "Input should", "constrained-", ".int", ".float")), line


@pytest.mark.parametrize(
    "override, key",
    [
        ("lr=fast", "lr"),
        ("epochs=1.5", "epochs"),
        ("augment=sometimes", "augment"),
        # the recipe redeclares these to change defaults: the
        # base class's bounds must still hold
        ("epochs=0", "epochs"),
        ("batch_size=-1", "batch_size"),
        ("lr=0", "lr"),
    ],
)
def test_bad_set_value(capsys, recipe, override, key):
    line = run_cli(capsys, "run", recipe, "--set", override)
    assert line.startswith(f"minitrain: error: --set: {key}:")
    assert repr(override.split("=")[1]) in line  # what was given


@pytest.mark.parametrize("override", ["lr", "=3", "  =x"])
def test_malformed_set(capsys, recipe, override):
    line = run_cli(capsys, "run", recipe, "--set", override)
    assert "--set" in line and repr(override) in line and "KEY=VALUE" in line


def test_set_nested_under_a_value(capsys, recipe):
    line = run_cli(capsys, "run", recipe, "--set", "lr=1", "--set", "lr.x=2")
    assert "--set" in line and "lr" in line


def test_unknown_plugin(capsys, recipe):
    line = run_cli(capsys, "run", recipe, "--plugin", "no_such_plugin")
    assert "unknown plugin 'no_such_plugin'" in line and "jsonl" in line  # and what is known


@pytest.mark.parametrize(
    "spec, key",
    [
        ("jsonl:flush_every=often", "flush_every"),
        ("jsonl:flush_every=0", "flush_every"),
        ("jsonl:colour=red", "colour"),
        ("console:refresh_every", "refresh_every"),
    ],
)
def test_bad_plugin_option(capsys, recipe, spec, key):
    line = run_cli(capsys, "run", recipe, "--plugin", spec)
    assert spec.split(":")[0] in line and key in line


def test_no_plugin_of_unknown_name(capsys, recipe):
    line = run_cli(capsys, "run", recipe, "--no-plugin", "consol")
    assert "--no-plugin" in line and "'consol'" in line and "console" in line


def test_run_dir_under_a_file_names_the_file(capsys, recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = run_cli(capsys, "run", recipe, "--run-dir", blocker / "run")
    assert line == f"minitrain: error: --run-dir {blocker / 'run'}: {blocker} is a file, not a folder"


def test_output_under_a_file_names_the_file(capsys, recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = run_cli(capsys, "lr-find", recipe, "--out", blocker / "deeper" / "lr.png")
    assert line.endswith(f": {blocker} is a file, not a folder")


def test_bad_plugin_hook_through_cli(capsys, recipe, install_dist):
    install_dist(
        "typo_cli_plugin",
        """
        import minitrain

        class Typo:
            @minitrain.hookimpl
            def on_epoch_end(self, evnt):
                pass
    """,
        {"typo": "typo_cli_plugin:Typo"},
    )
    line = run_cli(capsys, "run", recipe, "--plugin", "typo")
    assert "'typo'" in line and "on_epoch_end" in line and "evnt" in line


def test_missing_data_dir(capsys, recipe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = run_cli(capsys, "run", recipe, "--set", f"data_dir={empty}", "--run-dir", tmp_path / "run")
    assert str(empty / CIFAR10_FOLDER) in line  # where the files are expected
    assert "data_batch_1" in line and "CIFAR-10 not found" in line


def test_partial_data_dir_names_the_missing_files(capsys, recipe, fake_cifar, tmp_path):
    (fake_cifar / CIFAR10_FOLDER / "data_batch_3").unlink()
    line = run_cli(capsys, "run", recipe, "--run-dir", tmp_path / "run")
    assert "data_batch_3" in line and "data_batch_1" not in line


def test_truncated_data_file(capsys, recipe, fake_cifar, tmp_path):
    target = fake_cifar / CIFAR10_FOLDER / "data_batch_2"
    target.write_bytes(target.read_bytes()[:500])
    line = run_cli(capsys, "run", recipe, "--run-dir", tmp_path / "run")
    assert str(target) in line and "not a readable CIFAR-10 batch" in line


@pytest.mark.parametrize(
    "content, hint",
    [
        ({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, "shape"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}, "labels"),
        ({"data": np.zeros((4, 3072), np.float32), "labels": [0, 1, 2, 3]}, "uint8"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 42]}, "0..9"),
        ({"labels": [0]}, "not a readable"),
        ([1, 2, 3], "not a readable"),
    ],
    ids=["wrong-shape", "label-count", "dtype", "label-range", "no-data", "not-a-dict"],
)
def test_malformed_data_file(capsys, recipe, fake_cifar, tmp_path, content, hint):
    target = fake_cifar / CIFAR10_FOLDER / "test_batch"
    target.write_bytes(pickle.dumps(content))
    line = run_cli(capsys, "run", recipe, "--run-dir", tmp_path / "run")
    assert str(target) in line and hint in line


def test_debug_shows_the_traceback(recipe):
    from minitrain.engine.errors import MinitrainError

    with pytest.raises(MinitrainError, match="learning_rate"):
        cli.main(["--debug", "run", str(recipe), "--set", "learning_rate=1"])


def test_plugins_order_with_bad_option(capsys):
    line = run_cli(capsys, "plugins", "--order", "--plugin", "jsonl:nope=1")
    assert "'jsonl'" in line and "nope" in line


def test_misspelled_hook_of_a_third_party_plugin(capsys, recipe, install_dist):
    install_dist(
        "misspelled_cli_plugin",
        """
        import minitrain

        class Typo:
            @minitrain.hookimpl
            def on_epoch_ned(self, event):
                pass
    """,
        {"typo": "misspelled_cli_plugin:Typo"},
    )
    line = run_cli(capsys, "run", recipe, "--plugin", "typo")
    assert "plugin 'typo' implements unknown hook 'on_epoch_ned'" in line and "on_epoch_end" in line


def test_a_plugin_that_fails_to_import_is_skipped_and_the_run_goes_on(
    capsys, recipe, install_dist, real_discover, monkeypatch, tmp_path
):
    monkeypatch.setattr(minitrain.engine.registry, "discover", real_discover)  # as installed: third party included
    install_dist(
        "half_installed",
        "raise ImportError('libfoo.so: cannot open shared object file')\n",
        {"half": "half_installed:Plugin"},
    )
    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "done: 1 epochs" in out
    assert (
        "minitrain: warning: skipping plugin 'half': failed to import half_installed:Plugin: ImportError: libfoo.so"
        in err
        and "Traceback" not in err
    )


def test_disable_plugin_autoload_flag(capsys, install_dist, recipe, tmp_path):
    install_dist("autoloaded_plugin", "import minitrain\nLOADED = True\n", {"autoloaded": "autoloaded_plugin"})
    assert cli.main(["--disable-plugin-autoload", "plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert "autoloaded_plugin" not in sys.modules and DISABLE_AUTOLOAD_ENV in rows["autoloaded"]["error"]
    assert DISABLE_AUTOLOAD_ENV not in os.environ  # only for that command
    # named explicitly, it still loads
    assert (
        cli.main(
            [
                "--disable-plugin-autoload",
                "run",
                str(recipe),
                "--plugin",
                "autoloaded",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert "autoloaded_plugin" in sys.modules


def test_bad_role_option(capsys, recipe):
    line = run_cli(capsys, "run", recipe, "--plugin", "jsonl:role=boss")
    assert "plugin 'jsonl': role must be 'critical' or 'observer' (got 'boss')" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_run_dir(capsys, recipe, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    line = run_cli(capsys, "run", recipe, "--run-dir", locked / "run")
    assert str(locked / "run") in line and "not writable" in line


def _save_checkpoint(path, model_state):
    trainer = SimpleNamespace(state=RunState(batch_idx=5, global_step=5), config={}, recorded_plugins=None)
    checkpointing.save(path, checkpointing.header(trainer), {"model": model_state})


def test_checkpoint_of_a_different_model_lists_each_tensor(capsys, recipe, tmp_path):
    path = tmp_path / "other.pt"
    _save_checkpoint(path, {"2.weight": torch.zeros(10, 12), "2.bias": torch.zeros(10), "3.weight": torch.zeros(5)})
    line = run_cli(capsys, "run", recipe, "--run-dir", tmp_path / "run", "--resume", path)
    assert f"checkpoint {path} is for a different model: 2 tensor(s) do not fit: " in line
    assert "2.weight (10, 12) in the checkpoint, (10, 48) in the model; 3.weight (5) not in the model" in line


@pytest.mark.parametrize(
    "content", [b"", b"definitely not a checkpoint", b"PK\x03\x04truncated zip"], ids=["empty", "text", "truncated"]
)
def test_file_that_is_not_a_checkpoint(capsys, recipe, tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    line = run_cli(capsys, "run", recipe, "--run-dir", tmp_path / "run", "--resume", path)
    assert f"checkpoint {path} is unreadable" in line


def test_checkpoint_carrying_code_is_refused(capsys, recipe, tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    _save_checkpoint(path, {"2.weight": Payload(marker)})
    line = run_cli(capsys, "run", recipe, "--run-dir", tmp_path / "run", "--resume", path)
    assert "holds objects that safe loading refuses" in line and not marker.exists()


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_data_file_carrying_code_is_refused(capsys, recipe, fake_cifar, tmp_path):
    marker, target = tmp_path / "pwned", fake_cifar / CIFAR10_FOLDER / "data_batch_1"
    target.write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}))
    line = run_cli(capsys, "run", recipe, "--run-dir", tmp_path / "run")
    assert str(target) in line and "refusing to load pathlib" in line and not marker.exists()


def test_event_log_is_read_as_json_only(capsys, tmp_path):
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    payload = pickle.dumps(Payload(marker), protocol=0).decode("latin1")
    (run / "events.jsonl").write_text(
        json.dumps({"event": "FitEnd", "epochs_completed": 1, "global_step": 5, "metrics": {}})
        + "\n"
        + payload.replace("\n", " ")
        + "\n"
    )
    line = run_cli(capsys, "replay", run, "--plugin", "jsonl:filename=copy.jsonl")
    assert f"{run / 'events.jsonl'}:2" in line and not marker.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run"], "minitrain run: the following arguments are required: recipe"),
        (["run", "r.py", "--nproc", "x"], "argument --nproc: invalid int value: 'x'"),
        (["nosuch"], "argument command: invalid choice: 'nosuch'"),
    ],
    ids=["missing", "wrong-type", "unknown-command"],
)
def test_usage_errors_are_one_line_too(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minitrain: error: ") and message in err and err.count("\n") == 1


def test_a_directory_given_for_a_file_says_so(capsys, recipe, tmp_path):
    assert "is a directory; give a recipe file" in run_cli(capsys, "run", tmp_path)
    assert f"--resume {tmp_path} is a directory" in run_cli(capsys, "run", recipe, "--resume", tmp_path)

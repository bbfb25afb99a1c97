"""``--config FILE.toml`` and ``minitrain config RECIPE``: a file's values are taken over the recipe's
defaults and under ``--set``; what a run would use is printed as TOML that names each value's
source and is itself a valid ``--config`` file; a bad file is one line naming it; the config a run
used is the one in its config.json."""

import json
import tomllib

import pytest

from minitrain.commands import cli


def call(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_config_prints_each_value_with_its_source_and_default(capsys, recipe, tmp_path):
    file = tmp_path / "my.toml"
    file.write_text("epochs = 3\nlr = 0.05\nbatch_size = 8\n")
    code, out, err = call(capsys, "config", recipe, "--config", file, "--set", "lr=0.1")
    assert code == 0, err
    lines = {line.split("=")[0].strip().lstrip("# "): line for line in out.splitlines() if "=" in line}
    assert lines["epochs"].endswith(f"# --config {file}; default 1")
    assert lines["lr"].startswith("lr = 0.1 ") and lines["lr"].endswith("# --set; default 0.2")
    assert lines["seed"].endswith("# default")
    assert lines["max_steps"].startswith("# max_steps = (unset)")  # None: left as a comment
    printed = tomllib.loads(out)  # the output is TOML that a --config reads back
    assert printed["epochs"] == 3 and printed["lr"] == 0.1 and printed["batch_size"] == 8 and "max_steps" not in printed


def test_printed_config_read_back_gives_the_same_config(capsys, recipe, tmp_path):
    code, first, _ = call(capsys, "config", recipe, "--set", "epochs=2", "--set", "augment=true")
    assert code == 0
    (tmp_path / "saved.toml").write_text(first)
    code, again, _ = call(capsys, "config", recipe, "--config", tmp_path / "saved.toml")
    assert code == 0
    assert tomllib.loads(again) == tomllib.loads(first)


def test_a_run_uses_the_file_under_its_set_and_records_it_in_config_json(capsys, recipe, tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("epochs = 2\nlr = 0.05\nlimit_train_batches = 2\n")
    run_dir = tmp_path / "runs" / "a"
    code, out, err = call(
        capsys, "run", recipe, "--config", file, "--set", "lr=0.1", "--run-dir", run_dir, "--no-plugin", "console"
    )
    assert code == 0, (out, err)
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["limit_train_batches"]) == (2, 0.1, 2)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "EpochEnd" for e in events) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("epocs = 2\n", "--config {file}: epocs: unknown key"),
        ("epochs = 0\n", "--config {file}: epochs: must be at least 1"),
        ("epochs = \n", "--config {file}: not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(capsys, recipe, tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    for command in (["config", recipe], ["run", recipe, "--run-dir", tmp_path / "never"]):
        code, out, err = call(capsys, *command, "--config", file, "--set", "lr=0.1")
        assert code == 2 and err.count("\n") == 1 and err.startswith("minitrain: error: "), (out, err)
        assert message.format(file=file) in err
    assert not (tmp_path / "never").exists()


def test_a_bad_set_over_a_good_file_blames_both(capsys, recipe, tmp_path):
    file = tmp_path / "good.toml"
    file.write_text("epochs = 2\n")
    code, _, err = call(capsys, "config", recipe, "--config", file, "--set", "lr=-1")
    assert code == 2 and "--config and --set: lr:" in err


@pytest.mark.parametrize("name", ["missing.toml", "."])
def test_a_file_that_cannot_be_read_is_one_line(capsys, recipe, tmp_path, name):
    code, _, err = call(capsys, "config", recipe, "--config", tmp_path / name)
    assert code == 2 and err.startswith(f"minitrain: error: --config {tmp_path / name}: ")

"""The mlflow plugin, checked by reading everything back through MLflow's own client from a real
SQLite store: parameters, tags, per-step and per-epoch metrics, artifacts, status for each way a
run ends, resume into the same MLflow run, replay of a run recorded without it, and a tracking
server that is down or too slow (the plugin is disabled with a warning, training goes on)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minitrain.commands.cli import main
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.registry import ObserverFailed
from minitrain.engine.surface import Shared

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (pip install -e '.[tracking]')")
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import ViewType  # noqa: E402

FIRST_PARTY_PLUGINS = {"mlflow", "viz", "checkpoint", "csv", "clip"}
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # MLflow's own, with SQLAlchemy 2.1
HTTP_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")

FAILING = """

class Boom:
    role = "critical"

    @minitrain.hookimpl
    def on_epoch_end(self, event):
        if event.epoch == 2:
            raise RuntimeError("disk on fire")


class CtrlC:
    @minitrain.hookimpl
    def on_batch_end(self, event):
        if event.global_step == 7:
            import signal
            signal.raise_signal(signal.SIGINT)


PLUGINS = [{plugin}()]
"""


@pytest.fixture(scope="session")
def template_store(tmp_path_factory):
    """An empty MLflow SQLite store, made once: creating its tables takes seconds."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in HTTP_VARIABLES:  # set, then removed: restored to absent after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def store(template_store, tmp_path, monkeypatch):
    """A fresh store for this test, named by MLFLOW_TRACKING_URI; artifacts go to ./mlruns."""
    path = tmp_path / "store.db"
    shutil.copy(template_store, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def fit(recipe, run_dir, overrides=("epochs=3",), plugins=("mlflow:log_every=2",), resume=None):
    trainer = prepare(RunRequest(recipe, list(overrides), list(plugins), ["console"], run_dir, resume=resume))
    try:
        trainer.fit()
    finally:
        plugin = trainer.pm.get_plugin("mlflow")
        if plugin is not None:
            assert plugin.wait(60)
    return trainer


def only_run(client):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def log_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def history(client, run, key):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def test_a_run_reads_back_through_mlflow(recipe, tmp_path, store):
    run_dir = tmp_path / "run"
    trainer = fit(recipe, run_dir, plugins=["mlflow:log_every=2", "viz", "checkpoint"])
    run = only_run(store)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert store.get_experiment(run.info.experiment_id).name == "tiny_recipe"

    params = run.data.params
    assert params["lr"] == "0.2" and params["batch_size"] == "16" and params["epochs"] == "3"
    assert params["freeze"] == "[]" and params["augment"] == "false"
    assert params["plugin.checkpoint.every"] == "1" and params["plugin.mlflow.log_every"] == "2"
    assert params["plugin.viz.max_images"] == "32"
    tags = run.data.tags
    assert tags["minitrain.recipe"] == str(recipe.resolve()) and tags["minitrain.run_dir"] == str(run_dir.absolute())
    assert tags["minitrain.version"] == "0.1.0" and tags["torch.version"] == torch.__version__
    assert tags["minitrain.plugins"] == "checkpoint, csv, jsonl, mlflow, viz"

    events = log_lines(run_dir)
    losses = [(e["global_step"], e["loss"]) for e in events if e["event"] == "BatchEnd"]
    assert history(store, run, "train_loss_step") == [(s, v) for s, v in losses if s % 2 == 0]
    ends = [e for e in events if e["event"] == "EpochEnd"]
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        assert history(store, run, key) == [(e["global_step"], e["metrics"][key]) for e in ends]
    assert history(store, run, "epoch") == [(5, 1.0), (10, 2.0), (15, 3.0)]
    assert run.data.metrics["val_acc"] == trainer.state.metrics["val_acc"]

    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.csv", "events.jsonl", "config.json", "run.json", "plots"} <= artifacts
    assert "checkpoints" not in artifacts  # only when asked
    assert {a.path for a in store.list_artifacts(run.info.run_id, "plots")} >= {"plots/loss.png", "plots/accuracy.png"}
    copy = store.download_artifacts(run.info.run_id, "events.jsonl", str(tmp_path))
    assert open(copy).read() == (run_dir / "events.jsonl").read_text()  # the whole log, its last line included
    assert events[-1]["event"] == "FitEnd"


def test_the_default_store_is_sqlite_in_the_working_directory(recipe, tmp_path, template_store):
    shutil.copy(template_store, tmp_path / "mlflow.db")  # (tests run in tmp_path)
    fit(recipe, tmp_path / "run", overrides=["epochs=1"])
    run = only_run(MlflowClient("sqlite:///mlflow.db"))
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(str(tmp_path / "mlruns"))


def test_the_recipe_commit_is_a_tag(recipe, tmp_path, store):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", recipe.name], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "recipe"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    fit(recipe, tmp_path / "run", overrides=["epochs=1"])
    assert only_run(store).data.tags["mlflow.source.git.commit"] == head


def test_resume_continues_the_same_mlflow_run(recipe, tmp_path, store):
    run_dir = tmp_path / "run"
    fit(recipe, run_dir, overrides=["epochs=1"], plugins=["mlflow:log_every=1", "checkpoint"])
    first = only_run(store)
    fit(recipe, run_dir, overrides=["epochs=2"], plugins=["mlflow:log_every=1", "checkpoint"], resume="auto")
    run = only_run(store)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in history(store, run, "train_loss_step")] == list(range(1, 11))
    assert [s for s, _ in history(store, run, "val_acc")] == [5, 10]
    assert run.data.params["epochs"] == "1"  # MLflow parameters do not change; the change is a tag
    assert run.data.tags["minitrain.changed.epochs"] == "1 -> 2 at step 5"
    assert run.data.tags["minitrain.resumed_from"].endswith("last.pt")

    # the checkpoint names the MLflow run by its id, and by a tag for when it was written before
    # MLflow had given the run an id (the run is created in the background): either one finds it
    saved = {"run_id": run.info.run_id, "run_key": run.data.tags["minitrain.run_key"]}
    for epochs, kept in ((3, "run_id"), (4, "run_key")):
        trainer = prepare(
            RunRequest(recipe, [f"epochs={epochs}"], ["mlflow", "checkpoint"], ["console"], run_dir, resume="auto")
        )
        plugin = trainer.pm.get_plugin("mlflow")
        plugin.resume = {key: value if key == kept else "" for key, value in saved.items()}
        trainer.fit()
        assert plugin.wait(60)
        assert only_run(store).info.run_id == run.info.run_id


@pytest.mark.parametrize(
    "plugin, status, tag",
    [("Boom", "FAILED", ("error", "RuntimeError: disk on fire")), ("CtrlC", "KILLED", ("interrupted_by", "SIGINT"))],
)
def test_a_run_that_fails_or_is_interrupted_says_so(recipe, tmp_path, store, plugin, status, tag):
    path = recipe.with_name(f"{plugin.lower()}.py")
    path.write_text(recipe.read_text() + FAILING.replace("{plugin}", plugin))
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        fit(path, tmp_path / "run", plugins=["mlflow", "viz"])
    run = only_run(store)
    assert run.info.status == status and run.data.tags[tag[0]] == tag[1]
    assert {"report.html", "events.jsonl"} <= {a.path for a in store.list_artifacts(run.info.run_id)}


def test_a_stopped_run_is_finished_with_its_reason(recipe, tmp_path, store):
    path = recipe.with_name("stopping.py")
    path.write_text(
        recipe.read_text()
        + """

class Stop:
    @minitrain.hookimpl
    def on_epoch_end(self, event, trainer):
        trainer.request_stop("enough")


PLUGINS = [Stop()]
"""
    )
    fit(path, tmp_path / "run")
    run = only_run(store)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "enough"


def test_step_metrics_plugins_publish_are_logged_with_the_loss(recipe, tmp_path, store):
    fit(recipe, tmp_path / "run", plugins=["mlflow:log_every=2", "clip:max_norm=0.5"])
    run = only_run(store)
    norms = history(store, run, "grad_norm")
    assert [s for s, _ in norms] == [s for s, _ in history(store, run, "train_loss_step")] == list(range(2, 16, 2))
    assert all(v > 0 for _, v in norms)


def test_the_best_checkpoint_only_when_asked(recipe, tmp_path, store):
    fit(recipe, tmp_path / "run", plugins=["mlflow:log_best_checkpoint=true", "checkpoint"])
    run = only_run(store)
    assert [a.path for a in store.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]


def test_a_long_value_is_cut_with_a_warning(recipe, tmp_path, store):
    path = recipe.with_name("wordy.py")
    path.write_text(
        recipe.read_text().replace(
            "    augment: bool = False\n", "    augment: bool = False\n    notes: str = 'n' * 7000\n"
        )
    )
    with pytest.warns(UserWarning, match="parameter value.* cut to 6000 characters: notes"):
        fit(path, tmp_path / "run", overrides=["epochs=1"])
    notes = only_run(store).data.params["notes"]
    assert len(notes) == 6000 and notes.endswith("n...")


def test_replay_logs_a_run_recorded_without_it(recipe, tmp_path, store, capsys):
    run_dir = tmp_path / "run"
    fit(recipe, run_dir, plugins=[])
    assert store.search_runs(["0"]) == []
    assert main(["replay", str(run_dir), "--plugin", "mlflow:log_every=1"]) == 0
    run = only_run(store)  # logged whole by the time the replay returns, the event log included
    assert "events.jsonl" in {a.path for a in store.list_artifacts(run.info.run_id)}
    events = log_lines(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert history(store, run, "train_loss_step") == [
        (e["global_step"], e["loss"]) for e in events if e["event"] == "BatchEnd"
    ]
    started = json.loads((run_dir / "run.json").read_text())["history"][0]["started"]
    from minitrain.records.rundir import parse_time

    assert run.info.start_time == int(parse_time(started) * 1000)  # the run's time, not the replay's

    logged = tmp_path / "logged"  # a run that had the plugin on: a replay says it logs it again
    fit(recipe, logged, overrides=["epochs=1"])
    main(["replay", str(logged), "--plugin", "mlflow"])
    assert "logs it again, as a new MLflow run" in capsys.readouterr().err


def smoke(recipe, *options):
    return main(["run", str(recipe), "--smoke", "--no-plugin", "console", "--plugin", "mlflow:log_every=1", *options])


def test_a_smoke_test_leaves_no_mlflow_run_behind(recipe, tmp_path, store, capfd):
    """``--smoke`` keeps nothing: the plugin logs into a store of the run's own, in the run
    directory, which is removed; the store MLflow is pointed at gets no run and no experiment."""
    experiments = [e.name for e in store.search_experiments(view_type=ViewType.ALL)]
    assert smoke(recipe) == 0
    out, err = capfd.readouterr()
    line = next(line for line in out.splitlines() if line.startswith("  plugin mlflow: "))
    scratch = line.split("logs to a store of the smoke run's own, ")[1].split(", not to ")[0]
    assert line.endswith(f", not to {os.environ['MLFLOW_TRACKING_URI']}") and "on_fit_end" in line
    assert f"removed its run directory {Path(scratch).parent} " in out and not Path(scratch).parent.exists()
    assert (
        store.search_runs(
            [e.experiment_id for e in store.search_experiments(view_type=ViewType.ALL)], run_view_type=ViewType.ALL
        )
        == []
    )
    assert [e.name for e in store.search_experiments(view_type=ViewType.ALL)] == experiments  # none added
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert " INFO " not in err  # the smoke run's new store was created quietly


def test_a_smoke_test_kept_with_run_dir_has_its_mlflow_run_in_it(recipe, tmp_path, capsys):
    """With ``--run-dir`` the smoke run is kept, and its MLflow run with it, in the run directory:
    logged whole, as a real run is; the default store, ./mlflow.db, is never made."""
    assert smoke(recipe, "--run-dir", str(tmp_path / "kept")) == 0
    assert f"logs to a store of the smoke run's own, {tmp_path / 'kept' / 'mlflow'}, not to sqlite:///mlflow.db" in (
        capsys.readouterr().out
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    kept = MlflowClient(f"sqlite:///{tmp_path / 'kept' / 'mlflow' / 'mlflow.db'}")
    run = only_run(kept)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith((tmp_path / "kept" / "mlflow").as_uri())
    assert [s for s, _ in history(kept, run, "train_loss_step")] == [1, 2]  # two batches
    copy = kept.download_artifacts(run.info.run_id, "events.jsonl", str(tmp_path))
    assert open(copy).read() == (tmp_path / "kept" / "events.jsonl").read_text()  # its last line included


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("always::minitrain.engine.registry.ObserverFailed")  # printed by the CLI, not raised
def test_an_unreachable_server_disables_the_plugin_and_training_goes_on(recipe, tmp_path, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    code = main(
        [
            "run",
            str(recipe),
            "--set",
            "epochs=2",
            "--run-dir",
            str(tmp_path / "run"),
            "--no-plugin",
            "console",
            "--plugin",
            f"mlflow:tracking_uri={uri},http_retries=0",
        ]
    )
    assert code == 0
    assert log_lines(tmp_path / "run")[-1]["event"] == "FitEnd"
    out, err = capsys.readouterr()
    assert "done: 2 epochs" in out
    warning = next(line for line in err.splitlines() if "plugin 'mlflow'" in line)
    assert "MLflow failed" in warning and str(uri) in warning and "training goes on" in warning


def test_a_server_too_slow_to_answer_does_not_hold_training_back(recipe, tmp_path):
    server = socket.socket()  # accepts connections and never answers
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        with contextlib.suppress(OSError):  # (until the test closes the socket)
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    with pytest.warns(ObserverFailed, match="plugin 'mlflow' failed"):
        trainer = prepare(
            RunRequest(
                recipe,
                ["epochs=2"],
                [f"mlflow:tracking_uri={uri},http_timeout=900,finish_timeout=1"],
                ["console"],
                tmp_path / "run",
            )
        )
        trainer.fit()
    assert time.monotonic() - started < 300  # not the 900 s a request may take (2 s here; room for a slow machine)
    assert trainer.state.epoch == 2 and trainer.pm.get_plugin("mlflow") is None  # disabled
    server.close()
    for connection in held:
        connection.close()


def test_holding_the_losses_reads_no_tensor(monkeypatch):
    """On the steps it logs, on_batch_end keeps the loss tensor; nothing is read from it until
    the group goes to the host (every 100 logged losses, or at the epoch's end)."""
    from minitrain.engine.events import BatchEnd
    from minitrain_plugins.mlflow_log import HOLD, MlflowLog

    plugin = MlflowLog(MlflowLog.Config(log_every=10))
    losses = [torch.tensor(float(i)) for i in range(1, 10 * HOLD)]
    for name in ("item", "tolist", "cpu", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("a per-step read of the loss"))
    for step, loss in enumerate(losses, 1):
        plugin.on_batch_end(
            BatchEnd.trusted(epoch=1, batch_idx=step - 1, global_step=step, batch_size=4, loss=loss),
            SimpleNamespace(shared=Shared()),
        )
    monkeypatch.undo()
    assert [step for step, _, _, _ in plugin.held] == list(range(10, 10 * HOLD, 10))
    assert all(loss is losses[step - 1] for step, loss, _, _ in plugin.held)


def test_held_losses_go_in_groups_or_after_flush_secs():
    from minitrain.engine.events import BatchEnd
    from minitrain_plugins.mlflow_log import HOLD, MlflowLog

    def steps(plugin, first, last):
        for step in range(first, last + 1):
            plugin.on_batch_end(
                BatchEnd.trusted(epoch=1, batch_idx=step - 1, global_step=step, batch_size=4, loss=torch.tensor(1.0)),
                SimpleNamespace(shared=Shared()),
            )

    plugin = MlflowLog(MlflowLog.Config(log_every=1))
    plugin.worker = SimpleNamespace(failure=None, notes=[], tasks=[])
    plugin.worker.submit = plugin.worker.tasks.append
    steps(plugin, 1, HOLD - 1)
    assert not plugin.worker.tasks and len(plugin.held) == HOLD - 1
    steps(plugin, HOLD, HOLD)
    assert len(plugin.worker.tasks) == 1 and not plugin.held  # a full group
    steps(plugin, HOLD + 1, HOLD + 1)
    assert len(plugin.worker.tasks) == 1 and len(plugin.held) == 1
    plugin.send_by = 0  # as if flush_secs had passed since then
    steps(plugin, HOLD + 2, HOLD + 2)
    assert len(plugin.worker.tasks) == 2 and plugin.held == []  # sent at the next logged step


def test_without_mlflow_installed_the_plugin_says_how_to_get_it(recipe, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--plugin", "mlflow"]) == 2
    err = capsys.readouterr().err
    assert "plugin 'mlflow' needs MLflow" in err and "minitrain[tracking]" in err
    assert not (tmp_path / "run").exists()

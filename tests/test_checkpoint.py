"""The checkpoint plugin and ``--resume``: exact resume (bit for bit, mid-epoch included), atomic
writes, safe and clear loading, top-k bookkeeping, and the plugin's own CheckpointSaved event."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from types import SimpleNamespace

import pytest
import torch

from minitrain import hookimpl
from minitrain.commands.cli import main
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import checkpointing
from minitrain.engine.errors import MinitrainError
from minitrain.engine.events import Event
from minitrain.engine.registry import check_hooks, register_plugin
from minitrain.engine.state import RunState
from minitrain.testing import EpochLog
from minitrain_plugins.checkpoint import CheckpointSaved

FIRST_PARTY_PLUGINS = {"console", "jsonl", "csv", "checkpoint", "early_stopping"}

# Shuffling, random crops and flips, dropout, momentum and a schedule: resuming exactly needs the
# data order, the augmentation and dropout generators, and optimizer and scheduler state.
RANDOM_RECIPE = """
import torch
from torch import nn

import minitrain
from minitrain.kit.data import cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = 3
    batch_size: int = 16
    lr: float = 0.01


def build(config, device):
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed,
                                  crop=4, flip="random")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Dropout(0.3), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.95 ** step)  # reads its step count
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test,
                                scheduler=scheduler, scheduler_interval="step")
"""


@pytest.fixture
def start(tmp_path, fake_cifar):
    """``start(run_dir, plugins, epochs=3, resume=None, extra=(), disabled=())`` -> a prepared Trainer."""
    recipe = tmp_path / "random_recipe.py"
    recipe.write_text(RANDOM_RECIPE)

    def make(run_dir, plugins=(), epochs=3, resume=None, extra=(), disabled=()):
        trainer = prepare(
            RunRequest(
                recipe,
                ["device=cpu", f"data_dir={fake_cifar}", f"epochs={epochs}"],
                list(plugins),
                ["console", *disabled],
                run_dir,
                resume=resume,
            )
        )
        for plugin in extra:
            register_plugin(trainer.pm, plugin)
        check_hooks(trainer.pm)
        return trainer

    return make


class Interrupt:
    """Ctrl-C at a chosen point: as the batch after ``step`` optimizer steps starts, or inside it
    (in its forward pass, after dropout has drawn from the random generator)."""

    def __init__(self, step, inside_batch=False):
        self.step, self.inside_batch = step, inside_batch

    @hookimpl
    def on_batch_start(self, event):
        if event.global_step == self.step and not self.inside_batch:
            raise KeyboardInterrupt

    @hookimpl(wrapper=True)
    def train_step(self, trainer):
        loss = yield
        if trainer.state.global_step == self.step and self.inside_batch:
            raise KeyboardInterrupt
        return loss


class Saved:
    """Another plugin hooking the checkpoint plugin's event; keeps a copy of one chosen file."""

    def __init__(self, keep_step=None, keep_as=None):
        self.events, self.keep_step, self.keep_as = [], keep_step, keep_as

    @hookimpl
    def on_checkpoint_saved(self, event, trainer):
        assert pathlib.Path(event.path).is_file()  # announced once complete on disk
        self.events.append(event)
        if event.global_step == self.keep_step and event.kind == "last":
            shutil.copy(event.path, self.keep_as)


class Steps:
    def __init__(self):
        self.run = []

    @hookimpl
    def on_batch_start(self, event):
        self.run.append((event.epoch, event.batch_idx))


def weights(trainer):
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


def untimed(metrics):
    """An epoch's metrics but its timings, which differ from run to run: the rest are equal to the bit."""
    return {key: value for key, value in metrics.items() if key not in ("epoch_time", "samples_per_s")}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def events(run_dir, name):
    lines = (pathlib.Path(run_dir) / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


# --- exact resume --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:checkpoint. this run starts at step")  # later files set aside
@pytest.mark.filterwarnings("ignore:--resume. this run leaves out the plugin")  # the test's Interrupt
def test_resume_mid_epoch_is_bit_identical_to_an_uninterrupted_run(tmp_path, start):
    straight_log = EpochLog()
    straight = start(tmp_path / "straight", extra=[straight_log])
    straight.fit()
    expected = weights(straight)
    assert straight.state.global_step == 15  # 3 epochs x 5 batches

    run = tmp_path / "run"
    mid = tmp_path / "mid.pt"
    interrupted = start(run, ["checkpoint:every_steps=3"], extra=[Saved(keep_step=6, keep_as=mid), Interrupt(8)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    head = checkpointing.load(mid)["header"]
    assert (head["epoch"], head["batch_idx"], head["global_step"]) == (1, 1, 6)  # mid-epoch
    last = checkpointing.load(run / "checkpoints" / "last.pt")["header"]
    assert last["global_step"] == 8  # saved on the interrupt, between two batches

    for resume, steps_done in (("auto", 8), (mid, 6)):  # as a new process would: a fresh prepare()
        steps, log = Steps(), EpochLog()
        resumed = start(run, ["checkpoint:every_steps=3"], resume=resume, extra=[steps, log])
        assert resumed.state.global_step == steps_done
        resumed.fit()
        assert resumed.state.global_step == 15
        epoch, batch = divmod(steps_done, 5)
        assert len(steps.run) == 15 - steps_done and steps.run[0] == (epoch + 1, batch)  # no batch replayed
        assert_bitwise_equal(weights(resumed), expected)
        # epochs 2 (resumed in its middle: its loss sum comes from the checkpoint) and 3
        assert list(map(untimed, log.metrics)) == list(map(untimed, straight_log.metrics[1:]))


def test_a_run_stopped_inside_a_batch_keeps_the_last_whole_state(tmp_path, start):
    trainer = start(tmp_path / "run", ["checkpoint:every_steps=2"], extra=[Interrupt(3, inside_batch=True)])
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="inside a batch.*last.pt holds step 2"):
        trainer.fit()
    assert checkpointing.load(tmp_path / "run" / "checkpoints" / "last.pt")["header"]["global_step"] == 2


def test_resume_auto_into_a_new_directory_says_so_and_starts_a_new_run(tmp_path, start):
    with pytest.warns(UserWarning, match="new holds no run yet; starting a new one there"):
        trainer = start(tmp_path / "new", ["checkpoint"], resume="auto")
    assert (trainer.state.epoch, trainer.state.global_step) == (0, 0)
    assert json.loads((tmp_path / "new" / "run.json").read_text())["history"][0]["resumed_from"] is None


def test_resume_auto_skips_an_unreadable_newer_file(tmp_path, start):
    run = tmp_path / "run"
    start(run, ["checkpoint"], epochs=1).fit()
    (run / "checkpoints" / "zz-copy.pt").write_bytes(b"cut short")
    with pytest.warns(UserWarning, match="skipping checkpoint .*zz-copy.pt is unreadable"):
        trainer = start(run, ["checkpoint"], resume="auto")
    assert trainer.state.global_step == 5


def test_resume_arguments_are_checked_before_building(tmp_path, start):
    with pytest.raises(MinitrainError, match="checkpoint not found: .*nope.pt"):
        start(tmp_path / "run", resume=tmp_path / "nope.pt")
    with pytest.raises(MinitrainError, match="--resume auto needs --run-dir"):
        start(None, resume="auto")


def test_cli_resume(tmp_path, fake_cifar, capsys):
    recipe = tmp_path / "random_recipe.py"
    recipe.write_text(RANDOM_RECIPE)
    run = str(tmp_path / "run")
    args = [
        "run",
        str(recipe),
        "--set",
        "device=cpu",
        "--set",
        f"data_dir={fake_cifar}",
        "--no-plugin",
        "console",
        "--plugin",
        "checkpoint",
        "--run-dir",
        run,
    ]
    assert main(args + ["--set", "epochs=1"]) == 0
    assert main(args + ["--set", "epochs=2", "--resume", "auto"]) == 0
    assert "done: 2 epochs, 10 steps" in capsys.readouterr().out
    assert [e["start_epoch"] for e in events(run, "FitStart")] == [1, 2]
    assert main(args + ["--resume", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"minitrain: error: checkpoint not found: {tmp_path / 'missing.pt'}"


# --- writing and reading files -------------------------------------------------------------------


def _fake_trainer():
    return SimpleNamespace(state=RunState(epoch=2, global_step=10), config={}, recorded_plugins=None)


def _write(path, trainer=None, **header):
    checkpointing.save(path, checkpointing.header(trainer or _fake_trainer(), **header), {"w": torch.ones(3)})


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_a_failed_write_raises_and_leaves_the_previous_files(tmp_path, start, monkeypatch, failing):
    run = tmp_path / "run"
    start(run, ["checkpoint"], epochs=1).fit()
    folder = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["best.pt", "last.pt"]

    def disk_full_save(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    real_replace = os.replace

    def disk_full_replace(src, dst):
        if pathlib.Path(dst).parent == folder:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    if failing == "torch.save":
        monkeypatch.setattr(torch, "save", disk_full_save)
    else:
        monkeypatch.setattr(os, "replace", disk_full_replace)

    trainer = start(run, ["checkpoint"], epochs=2, resume="auto")
    with (
        pytest.raises(MinitrainError, match=r"could not write checkpoint .*\.pt \(OSError: .*No space left") as err,
        pytest.warns(UserWarning, match="checkpoint: could not write"),
    ):  # the save on failure, too
        trainer.fit()
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp file left either
    assert checkpointing.load(folder / "last.pt")["header"]["global_step"] == 5


@pytest.mark.parametrize("name", ["config.json", "run.json"])
def test_a_failed_run_file_write_raises_and_leaves_the_previous_file(tmp_path, start, monkeypatch, name):
    """The run's own files go through the same atomic writer as checkpoints and metrics.csv."""
    run = tmp_path / "run"
    start(run, ["checkpoint"], epochs=1).fit()
    before = (run / name).read_bytes()
    real_replace = os.replace

    def disk_full_replace(src, dst):
        if pathlib.Path(dst) == run / name:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full_replace)

    with pytest.raises(MinitrainError, match=rf"could not write run file .*{name} \(OSError: .*No space left"):
        start(run, ["checkpoint:every=2"], epochs=2, resume="auto")  # a new config.json and run.json, both
    assert (run / name).read_bytes() == before
    assert not list(run.glob(".*.tmp"))
    monkeypatch.setattr(os, "replace", real_replace)
    start(run, ["checkpoint:every=2"], epochs=2, resume="auto")
    assert (run / name).read_bytes() != before  # what the failed write would have changed


def test_permission_denied_raises_and_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    _write(path)
    before = path.read_bytes()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("minitrain.engine.files.tempfile.mkstemp", denied)
    with pytest.raises(MinitrainError, match=f"cannot write checkpoint {path}: Permission denied"):
        _write(path, SimpleNamespace(state=RunState(epoch=3, global_step=15), config={}, recorded_plugins=None))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_save_killed_before_its_rename_leaves_the_previous_file(tmp_path):
    """What a SIGKILL between writing and renaming leaves (tests/test_crash.py does it for real):
    the previous file, still loadable, and a temporary file that the next run removes."""
    path = tmp_path / "last.pt"
    _write(path)
    (tmp_path / ".last.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 the first half of a newer checkpoint")
    assert checkpointing.newest([tmp_path])[0] == path
    assert checkpointing.remove_temporaries(tmp_path) == [tmp_path / ".last.pt.k1ll3d.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_an_unreadable_checkpoint_is_one_clear_error_naming_the_file(tmp_path, damage):
    good, path = tmp_path / "good.pt", tmp_path / "last.pt"
    _write(good)
    content = {"truncated": good.read_bytes()[: good.stat().st_size // 2], "garbage": b"not a checkpoint", "empty": b""}
    if damage == "foreign":
        torch.save({"weights": torch.ones(2)}, path)
    else:
        path.write_bytes(content[damage])
    with pytest.raises(MinitrainError) as err:
        checkpointing.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert checkpointing.load(good)["header"]["global_step"] == 10


def test_loading_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"header": checkpointing.header(_fake_trainer()), "trainer": Payload()}, path)
    with pytest.raises(MinitrainError, match=f"checkpoint {path} holds objects that safe loading refuses"):
        checkpointing.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is hostile: unsafe loading runs it
    assert marker.exists()


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "FORMAT_VERSION", 99)
    _write(tmp_path / "new.pt")
    monkeypatch.setattr(checkpointing, "FORMAT_VERSION", 1)
    with pytest.raises(MinitrainError, match="has format 99, newer than"):
        checkpointing.load(tmp_path / "new.pt")


# --- what is kept --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["min", "max"])
def test_top_k_keeps_exactly_the_k_best_across_a_resume(tmp_path, start, mode):
    run = tmp_path / "run"
    spec = f"checkpoint:top_k=2,monitor=val_loss,mode={mode}"
    start(run, [spec], epochs=3).fit()
    start(run, [spec], epochs=5, resume="auto").fit()  # the ranking continues from the checkpoint

    losses = {e["epoch"]: e["metrics"]["val_loss"] for e in events(run, "EpochEnd")}
    assert sorted(losses) == [1, 2, 3, 4, 5]
    ranked = sorted(losses, key=losses.get, reverse=mode == "max")
    folder = run / "checkpoints"
    ranked_files = sorted(p.name for p in folder.glob("epoch=*.pt"))
    assert [int(name.split("-")[0].split("=")[1]) for name in ranked_files] == sorted(ranked[:2])
    for name in ranked_files:
        head = checkpointing.load(folder / name)["header"]
        assert f"val_loss={head['metric']:.4f}.pt" in name and head["kind"] == "topk"
    best = checkpointing.load(folder / "best.pt")["header"]
    assert (best["epoch"], best["metric"]) == (ranked[0], losses[ranked[0]])
    assert sorted(p.name for p in folder.iterdir()) == sorted(["best.pt", "last.pt", *ranked_files])


def test_resuming_from_an_earlier_checkpoint_sets_the_later_files_aside(tmp_path, start):
    run, spec = tmp_path / "run", "checkpoint:top_k=3,monitor=val_loss"
    start(run, [spec], epochs=1).fit()
    folder = run / "checkpoints"
    shutil.copy(folder / "last.pt", tmp_path / "after-epoch-1.pt")
    start(run, [spec], epochs=3, resume="auto").fit()
    later = sorted(p.name for p in folder.glob("*.pt") if checkpointing.load(p)["header"]["epoch"] > 1)
    assert later  # epochs 2 and 3 wrote last.pt and at least one ranked file

    with pytest.warns(UserWarning, match=r"starts at step 5 and redoes later steps; moved their \d checkpoint"):
        trainer = start(run, [spec], epochs=3, resume=tmp_path / "after-epoch-1.pt", extra=[StopAtStart()])
        trainer.fit()  # stopped before its first step: only last.pt of step 5 is saved again
    aside = folder / "set-aside-after-step-5"
    assert sorted(p.name for p in aside.iterdir()) == later  # moved, not deleted
    assert all(checkpointing.load(p)["header"]["global_step"] <= 5 for p in folder.glob("*.pt"))
    assert checkpointing.newest([folder])[1]["header"]["global_step"] == 5  # --resume auto: not the abandoned run


class StopAtStart:
    @hookimpl
    def on_fit_start(self, trainer):
        trainer.request_stop("stopped by the test")


@pytest.mark.filterwarnings("ignore:--resume auto. skipping checkpoint")  # the two cut-short files
def test_a_resume_that_finds_no_readable_checkpoint_is_refused_and_changes_nothing(tmp_path, start):
    run = tmp_path / "run"
    start(run, ["checkpoint"], epochs=1).fit()
    for name in ("best.pt", "last.pt"):  # copies cut short: not a state to go on from, nor to throw away
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refused = r"no checkpoint in .*checkpoints can be read .*--resume PATH.*--move-aside"
    with pytest.raises(MinitrainError, match=refused):
        start(run, ["checkpoint"], epochs=2, resume="auto")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_defaults_keep_last_and_best_only(tmp_path, start):
    run = tmp_path / "run"
    start(run, ["checkpoint"], epochs=2).fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_a_missing_monitor_is_refused_before_anything_is_written(tmp_path, start):
    with pytest.raises(
        MinitrainError,
        match=r"checkpoint: monitor 'f1' is not a metric this run reports \(it "
        r"reports train_loss, lr, epoch_time, samples_per_s, val_loss, val_acc\)",
    ):
        start(tmp_path / "run", ["checkpoint:monitor=f1"], epochs=1)
    assert not (tmp_path / "run").exists()


def test_every_steps_needs_last(tmp_path, start):
    with pytest.raises(MinitrainError, match="every_steps saves last.pt"):
        start(tmp_path / "run", ["checkpoint:every_steps=2,save_last=false"])


# --- the plugin-defined event ---------------------------------------------------------------------


def test_checkpoint_saved_reaches_other_plugins_and_the_event_log(tmp_path, start):
    run = tmp_path / "run"
    saved = Saved()
    start(run, ["checkpoint:top_k=2"], epochs=2, extra=[saved]).fit()

    kinds = [e.kind for e in saved.events]
    assert kinds[:3] == ["topk", "best", "last"]  # epoch 1: first of its kind, so best too
    assert kinds.count("last") == 2 and kinds.count("topk") == 2
    assert all(e.monitor == "val_loss" and e.metric is not None for e in saved.events)
    logged = [
        Event.from_json(line) for line in (run / "events.jsonl").read_text().splitlines() if '"CheckpointSaved"' in line
    ]
    assert logged == saved.events and all(isinstance(e, CheckpointSaved) for e in logged)


def test_hooking_checkpoint_saved_optionally_works_without_the_plugin(tmp_path, start):
    class Uploader:
        @hookimpl(optionalhook=True)
        def on_checkpoint_saved(self, event):
            raise AssertionError("never called: nothing saves")

    start(tmp_path / "run", epochs=1, extra=[Uploader()], disabled=["checkpoint"]).fit()

"""DDP through torchrun, on the CPU with gloo: 2 ranks × batch B train like 1 rank × 2B (within the
README's 3·10⁻⁷), the writing plugins write one set of files, a resume on every rank goes on bit
for bit; and the pieces (sharded loader, rank-0-only registration, the ddp plugin, ``--nproc``) on
their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import minitrain.engine.registry
from minitrain import hookimpl, hookspec
from minitrain.commands.cli import main
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import checkpointing, distributed
from minitrain.engine.registry import make_plugin_manager, register_plugin
from minitrain.kit.data import ImageLoader

WRITERS = {"console", "jsonl", "csv", "tensorboard", "viz", "checkpoint"}
FIRST_PARTY_PLUGINS = WRITERS | {"ddp"}
EPOCHS, STEPS = 3, 5  # 80 training images at 16 per step
AGREE = 3e-7  # the README's figure: 2 ranks x 8 and 1 rank x 16 differ by at most this much (absolute)

# No BatchNorm (its statistics are per rank), no dropout, no augmentation: with the data in the
# same order, 2 ranks × 8 images must take the same steps as 1 rank × 16. StepLosses is a test
# probe: it all-reduces every step's loss, which no real plugin should do.
RECIPE = """
import json
from pathlib import Path

import torch
from torch import nn

import minitrain
from minitrain.engine import distributed
from minitrain.kit.data import CIFAR10_CLASSES, cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = {epochs}
    batch_size: int = 16
    lr: float = 0.05
    device: str = "cpu"
    data_dir: Path = Path({data_dir!r})


class StepLosses:
    name = "step_losses"

    def __init__(self):
        self.losses = []

    @minitrain.hookimpl
    def on_batch_end(self, event):
        self.losses.append(distributed.sum_over_ranks(event.loss).item() / distributed.world_size())

    @minitrain.hookimpl
    def on_fit_end(self, trainer):
        if distributed.is_main():
            Path(trainer.run_dir, "step_losses.json").write_text(json.dumps(self.losses))


PLUGINS = [StepLosses()]


def build(config, device):
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed,
                                  crop=0, flip="none")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.97 ** step)
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test,
                                scheduler=scheduler, scheduler_interval="step", class_names=CIFAR10_CLASSES)
"""


def _torchrun(args: list[str], cwd: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_ENV}
    done = subprocess.run(
        [sys.executable, *launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )  # a guard against a hang, with room for a slow machine
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One rank × batch 16, in this process, and two ranks × batch 8 through ``minitrain run
    --nproc 2`` with every writing plugin on; then a 2-rank ``--resume auto`` (started by
    torchrun itself) from the second run's checkpoint after epoch 1."""
    from minitrain.testing import make_fake_cifar10

    root = tmp_path_factory.mktemp("ddp")
    data = make_fake_cifar10(root / "data", train_per_batch=16, test_size=31)  # uneven validation shards
    recipe = root / "recipe.py"
    recipe.write_text(RECIPE.format(epochs=EPOCHS, data_dir=str(data)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = prepare(RunRequest(recipe, [], ["checkpoint"], ["console"], root / "one"))
    single.fit()

    plugins = ["--plugin", "csv", "--plugin", "tensorboard", "--plugin", "viz", "--plugin", "checkpoint:top_k=3"]
    two = _torchrun(
        ["run", str(recipe), "--nproc", "2", "--set", "batch_size=8", "--run-dir", "two", *plugins],
        root,
        ["-m", "minitrain"],
    )
    resumed = root / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    first_epoch = next((root / "two" / "checkpoints").glob("epoch=1-*.pt"))
    shutil.copy(first_epoch, resumed / "last.pt")
    _torchrun(
        [
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "minitrain",
            "run",
            str(recipe),
            "--set",
            "batch_size=8",
            "--run-dir",
            "resumed",
            "--resume",
            "auto",
            "--plugin",
            "checkpoint",
            "--no-plugin",
            "console",
        ],
        root,
        ["-m", "torch.distributed.run"],
    )
    return root, two


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpointing.load(run_dir / "checkpoints" / "last.pt")["trainer"]["model"]


def _csv(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_two_ranks_at_batch_b_train_like_one_rank_at_2b(runs):
    root, _ = runs
    one = json.loads((root / "one" / "step_losses.json").read_text())
    two = json.loads((root / "two" / "step_losses.json").read_text())
    assert len(one) == len(two) == EPOCHS * STEPS
    assert two == pytest.approx(one, rel=0, abs=AGREE)  # measured: 2.4e-7, one float32 step at 2.3
    events = [json.loads(line) for line in (root / "one" / "events.jsonl").read_text().splitlines()]
    single = [e["metrics"] for e in events if e["event"] == "EpochEnd"]
    rows = _csv(root / "two")
    assert len(rows) == len(single) == EPOCHS
    for epoch, row in enumerate(rows):  # the all-reduced epoch figures
        for key in ("train_loss", "val_loss", "val_acc"):
            assert float(row[key]) == pytest.approx(single[epoch][key], rel=0, abs=AGREE), (epoch, key)
    ref = _weights(root / "one")
    for name, tensor in _weights(root / "two").items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=AGREE)  # measured: 1.75e-7


def test_writing_plugins_write_one_set_of_files(runs):
    root, done = runs
    run = root / "two"
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events.count("FitStart") == 1 and events.count("FitEnd") == 1
    assert events.count("BatchEnd") == EPOCHS * STEPS and events.count("ValidationEnd") == EPOCHS
    assert [row["epoch"] for row in _csv(run)] == ["1", "2", "3"]
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert (run / "report.html").is_file() and len(list((run / "plots").glob("*.png"))) == 5
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.pt", "best.pt"}
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert done.stdout.count("training 3 epochs") == 1 and done.stdout.count("done:") == 1
    assert {p.name for p in root.iterdir()} - {"__pycache__"} == {"data", "one", "recipe.py", "resumed", "two"}
    saved = json.loads((run / "run.json").read_text())
    assert saved["world_size"] == 2 and saved["plugins"]["ddp"] == {
        "find_unused_parameters": False,
        "static_graph": False,
        "bucket_cap_mb": 25.0,
    }


def test_resume_auto_under_ddp_continues_exactly(runs):
    root, _ = runs  # resumed from the 2-rank run's checkpoint after epoch 1: goes on as it did, bit for bit
    ref = _weights(root / "two")
    resumed = _weights(root / "resumed")
    assert resumed.keys() == ref.keys()
    for name, tensor in resumed.items():
        assert torch.equal(tensor, ref[name]), name
    losses = json.loads((root / "resumed" / "step_losses.json").read_text())
    two = json.loads((root / "two" / "step_losses.json").read_text())
    assert losses == two[STEPS:]  # epochs 2 and 3 only


STOPPER = '''

class StopOnRankZero:
    """Asks for a stop on rank 0 alone, mid-epoch, as a plugin that writes or prints might."""
    main_process_only = True

    @minitrain.hookimpl
    def on_batch_end(self, event, trainer):
        if event.global_step == 2:
            trainer.request_stop("asked on rank 0 only")


PLUGINS.append(StopOnRankZero())
'''


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_epoch_end(runs, tmp_path):
    root, _ = runs
    recipe = tmp_path / "stopper.py"
    recipe.write_text(RECIPE.format(epochs=EPOCHS, data_dir=str(root / "data")) + STOPPER)
    _torchrun(
        ["run", str(recipe), "--nproc", "2", "--set", "batch_size=8", "--run-dir", "stopped"],
        tmp_path,
        ["-m", "minitrain"],
    )  # a rank left behind would wait at its next collective: a timeout here
    events = [json.loads(line) for line in (tmp_path / "stopped" / "events.jsonl").read_text().splitlines()]
    end = events[-1]
    assert end["event"] == "FitEnd" and end["stop_reason"] == "asked on rank 0 only"
    assert end["epochs_completed"] == 1 and end["global_step"] == STEPS  # the epoch ran to its end
    assert len(json.loads((tmp_path / "stopped" / "step_losses.json").read_text())) == STEPS


SLOW_SAVES = '''

import time
from minitrain.engine import checkpointing

_save = checkpointing.save


def _slow_save(*args, **kwargs):  # rank 0 writes slowly: a rank that does not wait for it runs ahead
    time.sleep(0.5)
    _save(*args, **kwargs)


checkpointing.save = _slow_save


class SeesTheLastSave:
    """On rank 1, at the start of each step: the checkpoint of the step before is on disk."""

    def __init__(self):
        self.checked, self.behind = 0, []

    @minitrain.hookimpl
    def on_batch_start(self, event, trainer):
        if distributed.rank() == 1 and event.global_step:
            head = checkpointing.read_header(Path(trainer.run_dir) / "checkpoints" / "last.pt")
            self.checked += 1
            if head is None or head["global_step"] != event.global_step:
                self.behind.append([event.global_step, head and head["global_step"]])

    @minitrain.hookimpl
    def on_fit_end(self, trainer):
        if distributed.rank() == 1:
            Path(trainer.run_dir, "rank1.json").write_text(json.dumps([self.checked, self.behind]))


PLUGINS.append(SeesTheLastSave())
'''


def test_no_rank_runs_ahead_of_the_checkpoint_rank_0_writes(runs, tmp_path):
    """The checkpoint plugin's barrier: with rank 0 half a second slow in every save, rank 1 still
    starts no step before the file of the step before is complete on disk (what a restart by
    torchrun would resume from). Without the barrier it would be a save behind, every step."""
    root, _ = runs
    recipe = tmp_path / "slow_saves.py"
    recipe.write_text(RECIPE.format(epochs=1, data_dir=str(root / "data")) + SLOW_SAVES)
    _torchrun(
        [
            "run",
            str(recipe),
            "--nproc",
            "2",
            "--set",
            "batch_size=8",
            "--plugin",
            "checkpoint:every_steps=1",
            "--no-plugin",
            "console",
            "--run-dir",
            "slow",
        ],
        tmp_path,
        ["-m", "minitrain"],
    )
    checked, behind = json.loads((tmp_path / "slow" / "rank1.json").read_text())
    assert checked == STEPS - 1 and behind == []


# --- the pieces, in one process ------------------------------------------------------------------


def _loaders(n: int, batch: int, world: int, shuffle: bool, **options) -> list[ImageLoader]:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    labels = torch.arange(n)
    return [
        ImageLoader(images, labels, batch, shuffle=shuffle, seed=3, rank=r, world_size=world, **options)
        for r in range(world)
    ]


def test_sharded_batches_together_are_the_single_process_batches():
    (single,) = _loaders(48, 16, 1, True)
    shards = _loaders(48, 8, 2, True)
    assert len(single) == len(shards[0]) == len(shards[1]) == 3
    for epoch in (0, 1):
        for loader in (single, *shards):
            loader.set_position(epoch)
        for whole, *parts in zip(single, *shards):
            together = torch.cat([labels for _, labels in parts])
            assert sorted(together.tolist()) == sorted(whole[1].tolist())
            assert not set(parts[0][1].tolist()) & set(parts[1][1].tolist())


def test_training_shards_are_even_and_evaluation_shards_exact():
    train = _loaders(81, 8, 2, True)
    assert [loader.shard_size for loader in train] == [40, 40] and len(train[0]) == len(train[1]) == 5
    evaluation = _loaders(81, 8, 2, False)
    seen = [label for loader in evaluation for _, labels in loader for label in labels.tolist()]
    assert sorted(seen) == list(range(81))  # every image once, though the shards differ by one
    with pytest.raises(minitrain.MinitrainError, match="3 images cannot be shared among 4 ranks"):
        _loaders(3, 1, 4, False)


def test_augmentation_differs_between_ranks():
    image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shards = [
        ImageLoader(
            image.expand(32, 3, 8, 8),
            torch.zeros(32, dtype=torch.int64),
            16,
            shuffle=True,
            crop=2,
            flip="random",
            rank=r,
            world_size=2,
        )
        for r in range(2)
    ]
    first = [next(iter(loader))[0] for loader in shards]  # one image 16 times per rank: only augmentation differs
    assert not torch.equal(first[0], first[1])


class Specs:
    @hookspec
    def on_thing(self, trainer) -> None:
        """A custom hook."""


class Writer:
    main_process_only = True
    hookspecs = Specs

    @hookimpl
    def on_thing(self):
        pass


def test_main_process_only_plugins_are_left_out_on_other_ranks(monkeypatch):
    pm = make_plugin_manager()
    register_plugin(pm, Writer(), "writer")
    assert pm.get_plugin("writer") is not None
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    pm = make_plugin_manager()
    register_plugin(pm, Writer(), "writer")
    assert pm.get_plugin("writer") is None
    assert pm.hook.on_thing.spec is not None  # others may still implement its hook
    info = minitrain.engine.registry.discover()
    assert all(getattr(info[name].target, "main_process_only", False) for name in WRITERS - {"checkpoint"})
    for name in ("ddp", "checkpoint"):  # checkpoint: every rank hands over its part, rank 0 writes
        assert not getattr(info[name].target, "main_process_only", False), name


def test_ddp_plugin_leaves_a_single_process_alone(recipe):
    trainer = prepare(RunRequest(recipe, [], [], ["console"], "run"))
    trainer.fit()
    assert trainer.model is trainer.module


def test_nproc_refused_inside_torchrun(recipe, monkeypatch, capsys):
    for name, value in zip(distributed.LAUNCH_ENV, ("0", "2", "0")):
        monkeypatch.setenv(name, value)
    assert main(["run", str(recipe), "--nproc", "2"]) == 2
    assert "already started by torchrun" in capsys.readouterr().err


def test_a_plain_dataloader_is_sharded_by_rank(monkeypatch):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    data = TensorDataset(torch.arange(10))
    seen = {"train": [], "val": []}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        train = distributed.shard(DataLoader(data, batch_size=2, shuffle=True), train=True, seed=3)
        val = distributed.shard(DataLoader(data, batch_size=4), train=False)
        assert isinstance(train.sampler, DistributedSampler) and train.batch_size == 2
        seen["train"].append([int(x) for (batch,) in train for x in batch])
        seen["val"].append([int(x) for (batch,) in val for x in batch])
    assert sorted(seen["train"][0] + seen["train"][1]) == list(range(10))  # a shuffled split, all of it
    assert seen["val"] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]  # each sample validated once, in order
    custom = DataLoader(data, sampler=[0, 1, 2])
    monkeypatch.setattr(distributed, "rank", lambda: 0)  # rank 0 says it
    with pytest.warns(UserWarning, match="a sampler of its own gives every one of the 2 ranks the whole data set"):
        assert distributed.shard(custom, train=True) is custom
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    plain = DataLoader(data)
    assert distributed.shard(plain, train=True) is plain


ALLREDUCES = '''

class AllReduces:
    """Counts DDP's gradient all-reduces, through a communication hook that does the same work."""

    name = "allreduces"

    def __init__(self):
        self.calls = 0

    @minitrain.hookimpl
    def on_fit_start(self, trainer):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted(state, bucket):
            self.calls += 1
            return allreduce_hook(None, bucket)
        if distributed.world_size() > 1:  # a DistributedDataParallel model
            trainer.model.register_comm_hook(None, counted)

    @minitrain.hookimpl
    def on_fit_end(self, trainer):
        if distributed.is_main():
            Path(trainer.run_dir, "allreduces.json").write_text(json.dumps(self.calls))


PLUGINS = [StepLosses(), AllReduces()]
'''


def test_accumulation_under_ddp_all_reduces_once_per_optimizer_step(runs, tmp_path):
    root, _ = runs
    recipe = tmp_path / "counted.py"
    recipe.write_text(RECIPE.format(epochs=1, data_dir=str(root / "data")) + ALLREDUCES)
    _torchrun(
        [
            "run",
            str(recipe),
            "--nproc",
            "2",
            "--set",
            "batch_size=8",
            "--plugin",
            "accumulate:steps=2",
            "--plugin",
            "checkpoint",
            "--run-dir",
            "accumulated",
        ],
        tmp_path,
        ["-m", "minitrain"],
    )
    assert json.loads((tmp_path / "accumulated" / "allreduces.json").read_text()) == 3  # 5 batches: 2 + 2 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = prepare(
            RunRequest(recipe, ["batch_size=32"], [], ["console"], tmp_path / "single")
        )  # 32 + 32 + 16 images
    single.fit()
    for name, tensor in _weights(tmp_path / "accumulated").items():
        torch.testing.assert_close(tensor, single.module.state_dict()[name], rtol=0, atol=3e-7)

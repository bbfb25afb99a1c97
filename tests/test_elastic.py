"""Elastic runs on the CPU with gloo: ``minitrain run --nproc 2 --max-restarts R`` survives an
exception on one rank and workers killed with SIGKILL at random steps, because torchrun restarts
the group and every rank resumes from the newest checkpoint by itself. The final weights,
optimizer, schedule, progress and each rank's random state equal bit for bit those of the same
2-process run never interrupted, and so does every epoch's training loss, the epochs resumed in
their middle included. A run whose restarts are spent ends in one line. Two torchrun launches
acting as two nodes (c10d rendezvous on 127.0.0.1) end where one launch of two processes does,
across a restart of both nodes' workers. Then the pieces, in one process.

Each failed attempt costs a new pair of processes (seconds of imports each on a 2-core machine),
so one run takes all the failures: ``MINITRAIN_ELASTIC_KILLS`` (default 5) kills, aimed by
``MINITRAIN_ELASTIC_SEED``, for longer trials.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from minitrain.engine import checkpointing, distributed
from minitrain.testing import make_fake_cifar10

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker processes in /proc")

FIRST_PARTY_PLUGINS = {"checkpoint", "csv", "ddp", "tensorboard", "viz"}
KILLS = int(os.environ.get("MINITRAIN_ELASTIC_KILLS", "5"))
EPOCHS, STEPS = 3 + max(0, KILLS - 5) // 2, 10  # 160 training images, 2 ranks x 8 per step; room for the kills
TOTAL = EPOCHS * STEPS
SEED = int(os.environ.get("MINITRAIN_ELASTIC_SEED", "0"))
TIMINGS = {"epoch_time", "samples_per_s"}  # epoch metrics that legitimately differ between runs
PLUGINS = ["--plugin", "checkpoint:every_steps=1", "--plugin", "csv"]  # a save at every step: kills land anywhere

# Every source of state a rank must get back as it was: dropout whose draws differ per rank (the
# global generator is seeded by rank), augmentation drawn per rank, momentum, a per-step schedule.
RECIPE = '''
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

import minitrain
from minitrain.engine import distributed
from minitrain.kit.data import CIFAR10_CLASSES, cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = {epochs}
    batch_size: int = 8
    lr: float = 0.05
    device: str = "cpu"
    data_dir: Path = Path({data_dir!r})


class Fail:
    """Raises on rank R at step S of attempt A (MINITRAIN_TEST_FAIL=R:S:A; A is torchrun's restart
    count), or with A "*" at the first step from S on of every attempt."""
    role = "critical"

    def __init__(self):
        self.rank, self.step, self.attempt = (os.environ.get("MINITRAIN_TEST_FAIL") or "-1:-1:-1").split(":")

    @minitrain.hookimpl
    def on_batch_end(self, event):
        if distributed.rank() == int(self.rank) and (
                event.global_step >= int(self.step) if self.attempt == "*"
                else event.global_step == int(self.step) and self.attempt == str(distributed.restart_count())):
            raise RuntimeError(f"planned failure on rank {{self.rank}} at step {{self.step}}")


class KillAtEnd:
    """SIGKILLs rank R of attempt A (MINITRAIN_TEST_KILL_AT_END=R:A) once the run has trained every
    epoch and saved its last checkpoint, before it exits."""

    @minitrain.hookimpl
    def on_fit_end(self):
        rank, attempt = (os.environ.get("MINITRAIN_TEST_KILL_AT_END") or "-1:-1").split(":")
        if distributed.rank() == int(rank) and distributed.restart_count() == int(attempt):
            os.kill(os.getpid(), signal.SIGKILL)


class Hold:
    """Holds every rank of attempt A once step S is saved, while the file MINITRAIN_TEST_HOLD
    exists and says "A:S": the test then kills a rank a moment after it lets go, however slow the
    machine is (a run that ran on could finish before a busy test saw the step)."""

    @minitrain.hookimpl(trylast=True)  # after the checkpoint plugin's save
    def on_batch_end(self, event):
        path = Path(os.environ.get("MINITRAIN_TEST_HOLD") or "/nonexistent")
        try:
            attempt, step = path.read_text().split(":")
        except (OSError, ValueError):
            return
        if int(attempt) == distributed.restart_count() and int(step) == event.global_step:
            while path.exists():
                time.sleep(0.005)


PLUGINS = [Fail(), KillAtEnd(), Hold()]


def build(config, device):
    torch.set_num_threads(1)
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed,
                                  crop=2, flip="random")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Dropout(0.2), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.97 ** step)
    torch.manual_seed(config.seed + 1000 * distributed.rank())  # dropout draws differ per rank
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test,
                                scheduler=scheduler, scheduler_interval="step", class_names=CIFAR10_CLASSES)
'''


@dataclass
class Reference:
    root: Path
    recipe: Path
    state: dict  # the final trainer state of the uninterrupted 2-process run
    epoch_metrics: dict[int, dict]
    table: list[dict]


@dataclass
class Tally:
    kills: list[tuple[int, int]] = field(default_factory=list)  # (rank, the step after whose save it was aimed)
    resumed_at: list[int] = field(default_factory=list)  # the step each restart resumed from
    inside: list[int] = field(default_factory=list)  # epochs a restart resumed in the middle of


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_ENV and not k.startswith("MINITRAIN_TEST")
    }
    return env | {"OMP_NUM_THREADS": "1"} | extra  # every process computes alike


def _launch(root: Path, recipe: Path, run_dir: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return _start(
        [sys.executable, "-m", "minitrain", "run", str(recipe), "--nproc", "2", *PLUGINS, "--run-dir", run_dir, *extra],
        root,
        root / f"{run_dir}.log",
        env or _env(),
    )


def _start(argv: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A child in a session of its own (so that a failed test can kill it with its workers),
    writing to ``log``, which the test can read while it runs."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return process.wait(timeout)
    finally:
        _end(process)


def _end(process: subprocess.Popen) -> None:
    """Kill what is left of a launcher and its workers (a test that failed half-way)."""
    if process.poll() is None:
        for pid, _ in _workers(process.pid).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("elastic")
    data = make_fake_cifar10(root / "data", train_per_batch=32, test_size=31)
    recipe = root / "recipe.py"
    recipe.write_text(RECIPE.format(epochs=EPOCHS, data_dir=str(data)))
    process = _launch(root, recipe, "reference")
    assert _finish(process) == 0, (root / "reference.log").read_text()
    run = root / "reference"
    metrics = {e["epoch"]: e["metrics"] for e in _events(run) if e["event"] == "EpochEnd"}
    assert len(metrics) == EPOCHS
    return Reference(root, recipe, _state(run), metrics, _table(run))


# --- what the runs leave -------------------------------------------------------------------------


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _state(run: Path) -> dict:
    return checkpointing.load(run / "checkpoints" / "last.pt")["trainer"]


def _table(run: Path) -> list[dict]:
    import csv

    with open(run / "metrics.csv", newline="") as file:
        return [_untimed(row) for row in csv.DictReader(file)]


def _untimed(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in TIMINGS}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _check_same_run(run: Path, ref: Reference) -> list[dict]:
    """The run ended where the uninterrupted one did, bit for bit: weights, optimizer, schedule,
    progress and every rank's random generators; every epoch end logged by any of its attempts
    and every row of its metrics table equal the reference's in all but the timings. Returns its
    FitStart events."""
    state, expected = _state(run), ref.state
    for key in ("model", "optimizer", "scheduler", "rng", "ranks"):
        assert _equal(state[key], expected[key]), key
    for key in ("epoch", "batch_idx", "global_step", "loss_sum"):
        assert _equal(state["progress"][key], expected["progress"][key]), key
    events = _events(run)
    for end in (e for e in events if e["event"] == "EpochEnd"):  # the training loss too, to the last bit
        assert _untimed(end["metrics"]) == _untimed(ref.epoch_metrics[end["epoch"]]), end
    # (the log may lack an epoch's end: a failure during the save that ends the epoch comes
    # before its line is written; metrics.csv writes its row before that save)
    assert _table(run) == ref.table
    assert events[-1]["event"] == "FitEnd" and events[-1]["global_step"] == TOTAL
    assert _untimed(events[-1]["metrics"]) == _untimed(ref.epoch_metrics[EPOCHS])
    assert not list((run / "checkpoints").glob(".*.tmp"))  # saves cut short were cleared
    return [e for e in events if e["event"] == "FitStart"]


def _resumed_inside(starts: list[dict]) -> list[int]:
    """The epochs some attempt resumed in the middle of (after some of their steps): their
    train_loss adds up partial sums of two attempts or more, restored on each rank."""
    return sorted({s["start_epoch"] for s in starts if s["global_step"] > (s["start_epoch"] - 1) * STEPS})


# --- the processes ---------------------------------------------------------------------------------


def _workers(launcher: int) -> dict[int, tuple[int, int]]:
    """The launcher's worker processes: rank -> (pid, restart count)."""
    found = {}
    for children in Path(f"/proc/{launcher}/task").glob("*/children"):
        try:
            pids = children.read_text().split()
        except OSError:
            continue
        for pid in map(int, pids):
            try:
                env = dict(
                    item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
                )
            except OSError:
                continue
            if "RANK" in env:
                found[int(env["RANK"])] = (pid, int(env.get(distributed.RESTART_ENV, "0")))
    return found


def _newest_step(run: Path) -> int | None:
    head = checkpointing.read_header(run / "checkpoints" / "last.pt")
    return head["global_step"] if head else None


def _wait(condition, process: subprocess.Popen, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --- the trials ------------------------------------------------------------------------------------

FAILURE = (1, 5)  # the first attempt's rank 1 raises at step 5: the restart resumes from step 4, in epoch 1


def test_a_rank_that_raises_or_is_killed_is_restarted_and_the_run_ends_bit_for_bit(reference):
    """One run, ``1 + KILLS`` failures: rank 1 raises at step 5 of the first attempt (the restart
    resumes inside epoch 1, so that epoch's train_loss is made of two attempts' partial sums, on
    each rank its own); then each later attempt loses a random rank to SIGKILL as soon as the run
    has saved a random step ahead. Each restart resumes from the newest checkpoint on disk by
    itself, and the run ends as the uninterrupted one did, to the last bit."""
    ref, rng, tally = reference, random.Random(SEED), Tally()
    run = ref.root / "trials"
    hold = ref.root / "hold"
    restarts = 1 + KILLS
    process = _launch(
        ref.root,
        ref.recipe,
        "trials",
        "--max-restarts",
        str(restarts),
        env=_env(MINITRAIN_TEST_FAIL=f"{FAILURE[0]}:{FAILURE[1]}:0", MINITRAIN_TEST_HOLD=str(hold)),
    )
    try:
        for attempt in range(restarts):
            if attempt:  # a kill
                workers = {}
                step = _newest_step(run) or 0
                target = max(step + 1, min(step + rng.randint(1, 4), TOTAL - 2 * (restarts - attempt)))  # room left
                hold.write_text(f"{attempt}:{target}")  # the ranks wait there for the kill to be aimed

                def reached() -> bool:
                    nonlocal workers
                    workers = _workers(process.pid)
                    return (
                        (_newest_step(run) or 0) >= target
                        and len(workers) == 2
                        and all(restart == attempt for _, restart in workers.values())
                    )

                assert _wait(reached, process), (ref.root / "trials.log").read_text()[-3000:]
                hold.unlink()
                time.sleep(rng.uniform(0, 0.05))  # somewhere in the next step: computing, saving or waiting
                rank = rng.randrange(2)
                os.kill(workers[rank][0], signal.SIGKILL)
                tally.kills.append((rank, target))
            # the launcher stops the other worker before it starts the next attempt: what is on
            # disk once that attempt's workers exist is what it must resume from
            assert _wait(lambda: any(r == attempt + 1 for _, r in _workers(process.pid).values()), process), (
                ref.root / "trials.log"
            ).read_text()[-3000:]
            tally.resumed_at.append(_newest_step(run) or 0)
        code = _finish(process)
    finally:
        _end(process)
    log = (ref.root / "trials.log").read_text()
    assert code == 0, log[-3000:]
    assert f"RuntimeError: planned failure on rank {FAILURE[0]} at step {FAILURE[1]}" in log
    assert tally.resumed_at[0] == FAILURE[1] - 1
    starts = _check_same_run(run, ref)  # every epoch's train_loss included, to the last bit
    assert [s["restart"] for s in starts] == list(range(restarts + 1))
    assert [s["global_step"] for s in starts[1:]] == tally.resumed_at
    assert [s["resumed_from"] for s in starts[1:]] == [str(Path("trials") / "checkpoints" / "last.pt")] * restarts
    history = json.loads((run / "run.json").read_text())["history"]
    assert [h["restart"] for h in history] == list(range(restarts + 1))
    for start in starts[1:]:
        assert (
            f"restart {start['restart']} of {restarts}: resuming from trials/checkpoints/last.pt: "
            f"epoch {start['start_epoch']}, step {start['global_step']}"
        ) in log
    tally.inside = _resumed_inside(starts)
    assert 1 in tally.inside  # resumed at step 4: its metrics.csv row (and EpochEnd, if logged) compared above
    print(
        f"exception on rank {FAILURE[0]} at step {FAILURE[1]}; kills (rank, step): {tally.kills}; "
        f"resumed at steps {tally.resumed_at}; epochs resumed in their middle: {tally.inside}"
    )


def test_a_rank_killed_after_the_last_checkpoint_restarts_into_a_complete_run(reference):
    """Rank 1 dies after the run's last checkpoint, before it exits: torchrun restarts the group,
    which finds the run complete, trains nothing, rewrites nothing, and the launch succeeds."""
    ref = reference
    run = ref.root / "killed-at-end"
    process = _launch(
        ref.root, ref.recipe, "killed-at-end", "--max-restarts", "1", env=_env(MINITRAIN_TEST_KILL_AT_END="1:0")
    )
    assert _finish(process) == 0, (ref.root / "killed-at-end.log").read_text()[-3000:]
    log = (ref.root / "killed-at-end.log").read_text()
    assert log.count(f"minitrain: run already complete: {EPOCHS} of {EPOCHS} epochs (killed-at-end)") == 1  # rank 0
    assert [e["restart"] for e in _events(run) if e["event"] == "FitStart"] == [0]  # the restart trained nothing
    history = json.loads((run / "run.json").read_text())["history"]
    assert [h["restart"] for h in history] == [0]  # and wrote nothing
    state = _state(run)
    for key in ("model", "optimizer", "scheduler", "rng", "ranks"):
        assert _equal(state[key], ref.state[key]), key


def test_when_the_restarts_are_spent_one_line_says_so(reference):
    """A rank that fails in every attempt (from step 3 on): the first try and one restart, then
    one line with the count, the last checkpoint and the command that resumes. One process is
    enough to show it, and starts twice as fast; alone, it saves last.pt as it fails between two
    steps (step 3, which the restart resumes from and fails after)."""
    ref = reference
    process = _start(
        [
            sys.executable,
            "-m",
            "minitrain",
            "run",
            str(ref.recipe),
            "--nproc",
            "1",
            *PLUGINS,
            "--max-restarts",
            "1",
            "--run-dir",
            "spent",
        ],
        ref.root,
        ref.root / "spent.log",
        _env(MINITRAIN_TEST_FAIL="0:3:*"),
    )
    assert _finish(process) == 1
    lines = (ref.root / "spent.log").read_text().splitlines()
    assert sum("RuntimeError: planned failure on rank 0" in line for line in lines) == 2, lines  # try, restart
    assert "restart 1 of 1: resuming from spent/checkpoints/last.pt: epoch 1, step 3" in lines
    assert re.fullmatch(
        r"minitrain: error: rank 0 of 1 failed \(exit code 1; its output is above\) and 1 restart "
        r"happened \(--max-restarts 1\); the last checkpoint is spent/checkpoints/last\.pt \(step 4\); "
        r"resume with: minitrain run .* --nproc=1 --max-restarts=1 --run-dir spent --resume auto",
        lines[-1],
    ), lines[-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_launches_as_two_nodes_train_as_one_launch_of_two_processes(reference):
    """``torchrun --nnodes=2 --nproc_per_node=1`` twice, with c10d rendezvous on 127.0.0.1 and one
    run directory, as two machines sharing a filesystem would. The worker of one "node" is killed
    once: both nodes' agents restart their workers (counting the restart differently), which
    resume together; the weights end as one ``--nproc 2`` launch's."""
    ref, port = reference, _free_port()
    env = _env(**{distributed.SHARED_STORE_ENV: "1"})
    nodes = []
    for node in range(2):
        nodes.append(
            _start(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    "--nproc_per_node=1",
                    "--max-restarts=1",
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-id=elastic-test",
                    "--local-addr=127.0.0.1",
                    "-m",
                    "minitrain",
                    "run",
                    str(ref.recipe),
                    *PLUGINS,
                    "--run-dir",
                    "nodes",
                ],
                ref.root,
                ref.root / f"node{node}.log",
                env,
            )
        )
    run = ref.root / "nodes"
    try:

        def second_node_worker() -> int | None:
            workers = {
                rank: pid
                for launcher in nodes
                for rank, (pid, restart) in _workers(launcher.pid).items()
                if restart == 0
            }
            return workers.get(1) if len(workers) == 2 else None

        assert _wait(lambda: (_newest_step(run) or 0) >= 7 and second_node_worker(), nodes[0])
        first = {pid for launcher in nodes for pid, _ in _workers(launcher.pid).values()}
        os.kill(second_node_worker(), signal.SIGKILL)
        counts = {}  # node -> its agent's restart count, as its new worker sees it

        def restarted() -> bool:
            for n, launcher in enumerate(nodes):
                for pid, restart in _workers(launcher.pid).values():
                    if pid not in first:
                        counts[n] = restart
            return len(counts) == 2

        assert _wait(restarted, nodes[0])
        codes = [_finish(node) for node in nodes]
    finally:
        for node in nodes:
            _end(node)
    logs = "".join((ref.root / f"node{n}.log").read_text() for n in range(2))
    assert codes == [0, 0], logs[-4000:]
    starts = _check_same_run(run, ref)
    assert [s["restart"] for s in starts] == [0, 1] and starts[1]["global_step"] >= 7
    print(f"restart counts of the two nodes' agents: {counts}")  # they may differ; the run takes the largest
    assert json.loads((run / "run.json").read_text())["world_size"] == 2


# --- the pieces, in one process ------------------------------------------------------------------


def _restarted(monkeypatch, count: int, budget: int = 3) -> None:
    """Make this process look like torchrun's ``count``-th restart (the process group itself is
    not needed for what plan and prepare decide)."""
    monkeypatch.setattr(distributed, "restart_count", lambda: count)
    monkeypatch.setenv(distributed.MAX_RESTARTS_ENV, str(budget))


def test_a_restart_goes_on_from_the_newest_checkpoint_in_its_run_directory(recipe, tmp_path, monkeypatch, capsys):
    from minitrain.commands.start import RunRequest, prepare

    plugins = ["checkpoint:every_steps=3", "tensorboard", "viz:max_images=0"]
    first = prepare(RunRequest(recipe, ["epochs=2"], plugins, [], tmp_path / "run"))
    first.epochs = 1  # as if it had failed after epoch 1 (5 steps)
    first.fit()
    _restarted(monkeypatch, 2)
    again = prepare(RunRequest(recipe, ["epochs=2"], plugins, [], tmp_path / "run"))  # no --resume
    assert again.restart == 2 and again.resumed_from == str(tmp_path / "run" / "checkpoints" / "last.pt")
    assert again.state.global_step == 5 and again.config_changes == {}
    again.fit()
    out = capsys.readouterr().out
    assert f"restart 2 of 3: resuming from {again.resumed_from}: epoch 2, step 5" in out
    starts = [e for e in _events(tmp_path / "run") if e["event"] == "FitStart"]
    assert [(s["restart"], s["global_step"]) for s in starts] == [(0, 0), (2, 5)]
    history = json.loads((tmp_path / "run" / "run.json").read_text())["history"]
    assert [(h["restart"], h["resumed_from"]) for h in history] == [(0, None), (2, again.resumed_from)]
    said = f"restart 2: resumed from {again.resumed_from} at step 5"
    assert f"{said} (epoch 2)" in (tmp_path / "run" / "report.html").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    assert [t.tensor_proto.string_val[0].decode() for t in board.Tensors("resumes/text_summary")] == [said]


def test_a_restart_before_any_checkpoint_starts_afresh_in_the_same_directory(recipe, tmp_path, monkeypatch, capsys):
    from minitrain.commands.start import RunRequest, prepare

    prepare(
        RunRequest(recipe, [], ["checkpoint"], [], tmp_path / "run", move_aside=True)
    )  # run files written, no checkpoint
    _restarted(monkeypatch, 1)
    with pytest.warns(UserWarning, match="no checkpoint in .* starting it again from step 0"):
        trainer = prepare(
            RunRequest(recipe, [], ["checkpoint"], [], tmp_path / "run", move_aside=True)
        )  # not moved aside again
    assert trainer.restart == 1 and trainer.resumed_from is None
    assert not list(tmp_path.glob("run.aside-*"))
    trainer.fit()
    assert "restart 1 of 3: no checkpoint was written before; starting afresh" in capsys.readouterr().out
    history = json.loads((tmp_path / "run" / "run.json").read_text())["history"]
    assert [h["restart"] for h in history] == [0, 1]


def test_a_restart_of_a_run_resumed_from_a_file_prefers_its_own_newer_checkpoints(recipe, tmp_path, monkeypatch):
    from minitrain.commands.start import RunRequest, prepare

    prepare(RunRequest(recipe, ["epochs=2"], ["checkpoint"], [], tmp_path / "old")).fit()
    given = tmp_path / "old" / "checkpoints" / "last.pt"
    fresh = prepare(RunRequest(recipe, ["epochs=3"], ["checkpoint"], [], tmp_path / "new", resume=given))
    fresh.run_lock.release()  # (in one process: as if its process had died and torchrun restarted it)
    _restarted(monkeypatch, 1)
    before = prepare(RunRequest(recipe, ["epochs=3"], ["checkpoint"], [], tmp_path / "new", resume=given))
    assert before.resumed_from == str(given)  # no checkpoint of its own yet: the file it was given
    before.run_lock.release()
    fresh.fit()
    after = prepare(RunRequest(recipe, ["epochs=4"], ["checkpoint"], [], tmp_path / "new", resume=given))
    assert after.resumed_from == str(tmp_path / "new" / "checkpoints" / "last.pt") and after.state.global_step == 15


def test_a_checkpoint_restores_each_rank_its_own_loss_sum_and_generators(recipe, monkeypatch):
    """``state_dict(gather=True)`` under 2 ranks (the collective faked): rank 1 gets back its own
    partial loss sum and random state, not rank 0's; with another number of ranks, rank 0's."""
    from minitrain.commands.start import RunRequest, prepare
    from minitrain.engine.device import get_rng_state

    trainer = prepare(RunRequest(recipe, [], [], ["console"]))
    torch.manual_seed(1)
    rank1 = {"loss_sum": torch.tensor(7.5), "rng": get_rng_state()}
    torch.manual_seed(0)
    trainer.state.loss_sum = torch.tensor(2.25)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "gather", lambda value: [value, rank1])
    state = trainer.state_dict(gather=True)
    assert [entry["loss_sum"].item() for entry in state["ranks"]] == [2.25, 7.5]
    assert "ranks" not in trainer.state_dict()  # no collective unless asked for
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    trainer.load_state_dict(state)
    assert trainer.state.loss_sum.item() == 7.5 and torch.equal(torch.get_rng_state(), rank1["rng"]["torch"])
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    trainer.load_state_dict(state)
    assert trainer.state.loss_sum.item() == 2.25 and not torch.equal(torch.get_rng_state(), rank1["rng"]["torch"])


def test_a_checkpoint_of_another_number_of_processes_resumes_with_a_warning(recipe, tmp_path, monkeypatch):
    from minitrain.commands.start import RunRequest, prepare

    prepare(RunRequest(recipe, [], ["checkpoint"], ["console"], tmp_path / "run")).fit()
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint = checkpointing.load(path)
    assert checkpoint["header"]["world_size"] == 1
    trainer = prepare(RunRequest(recipe, ["epochs=2"], ["checkpoint"], ["console"], tmp_path / "two"))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.warns(UserWarning, match=r"written by 1 process and this run has 2 processes: .* not those the run"):
        checkpointing.restore(trainer, path, checkpoint)


def test_max_restarts_is_checked_before_anything_starts(recipe, tmp_path, monkeypatch, capsys):
    from minitrain.commands.cli import main

    assert main(["run", str(recipe), "--max-restarts", "2"]) == 2
    assert "--max-restarts goes with --nproc" in capsys.readouterr().err
    assert main(["run", str(recipe), "--nproc", "2", "--max-restarts", "-1"]) == 2
    assert "--max-restarts must be 0 or more" in capsys.readouterr().err
    for name, value in zip(distributed.LAUNCH_ENV, ("0", "2", "0")):  # as a bare torchrun would start it
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(distributed.MAX_RESTARTS_ENV, "3")
    assert main(["run", str(recipe)]) == 2  # no --run-dir: a restart would not find the run
    assert "give --run-dir" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"set {distributed.SHARED_STORE_ENV}=1 where torchrun starts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

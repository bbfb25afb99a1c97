"""Per-step cost of the framework over a bare PyTorch loop doing identical work.

Task (fixed by the project's brief): MLP 256->64->ReLU->10, batch 64, SGD, a DataLoader over a
TensorDataset of random data, 2000 steps, one thread. Bare loop and framework run in one process,
interleaved block by block: every 50 framework steps, the framework's loader first runs 50 steps
of the bare loop on a second copy of the same work. On a shared machine, whose speed moves whole
runs by tens of µs/step, two runs compared one after the other mostly measure that drift; blocks
50 steps apart see the same machine. The figure is the median over rounds of
(framework time - bare time) / steps.

    python benchmarks/overhead.py                    # core alone, the defaults, with viz, mlflow, throughput
    python benchmarks/overhead.py --rounds 9 --set "console,jsonl,checkpoint"
    python benchmarks/overhead.py --save-cost recipes/cifar10_quick.py   # what a checkpoint costs a real recipe

The default plugins' checkpoint saves once per epoch, and an epoch here is all 2000 steps: its
cost per step is spread thin. ``--save-cost RECIPE`` measures one save of that recipe's state
instead (what the plugin does at each epoch end: the finiteness check, the state, the atomic
write), on its real data, with the recipe's own model and optimizer.

The mlflow plugin logs to a throw-away SQLite store in a temporary folder (the benchmark works
there), never to the user's MLFLOW_TRACKING_URI. MLflow's import and the store's opening happen
once, in the warm-up round; each measured run then starts its own MLflow run.

The throughput plugin counts the model's FLOPs at every fit start (one forward and backward, in
the whole-fit column) and measures this CPU's peak once (a few seconds, in the warm-up round,
then read from its cache in ~/.cache/minitrain or $MINITRAIN_CACHE).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from minitrain import MinitrainError, Trainer, hookimpl
from minitrain.engine.registry import discover, make_plugin_manager, parse_plugin_spec, register_plugin, resolve

STEPS, BATCH, BLOCK = 2000, 64, 50
DEFAULTS = ["console", "jsonl", "csv", "checkpoint:monitor=train_loss"]
SETS = {
    "core alone": [],
    "defaults (console, jsonl, csv, checkpoint)": DEFAULTS,
    "defaults and viz": [*DEFAULTS, "viz"],
    "defaults and mlflow": [*DEFAULTS, "mlflow"],
    "defaults and throughput (every 50 steps)": [*DEFAULTS, "throughput:every_steps=50"],
}


def make_work(data: TensorDataset):
    """A fresh model, optimizer and loader over the one shared data set (runs that each made
    their own 130 MB of data differed by tens of µs/step with where it landed in memory)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, optimizer, DataLoader(data, batch_size=BATCH, shuffle=True)


def handed_out(loader: DataLoader, at_block=None):
    """``loader``'s batches through a generator, the same one for both loops so that neither pays
    for plumbing the other does not. ``at_block(ending)`` runs before every BLOCK-th batch, and
    once more (``ending=True``) after the last."""
    for index, batch in enumerate(loader):
        if index % BLOCK == 0 and at_block is not None:
            at_block(False)
        yield batch
    if at_block is not None:
        at_block(True)


def bare_steps(model, optimizer, batches, count: int) -> float:
    """The bare loop, for ``count`` steps; returns the seconds they took."""
    start = time.perf_counter()
    for _, (x, y) in zip(range(count), batches):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


class Interleaved:
    """The framework's loader. Before every block of BLOCK batches it hands out, it runs BLOCK
    steps of the bare loop on its own copy of the work, and it times both: each block of
    framework steps (and the fetching of as many batches) against the bare block just before it."""

    def __init__(self, loader: DataLoader, data: TensorDataset):
        self.loader = loader
        self.bare = make_work(data)
        self.blocks: list[tuple[float, float]] = []  # (bare, framework) seconds, block by block

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        model, optimizer, loader = self.bare
        bare_batches, last = handed_out(loader), {}

        def at_block(ending: bool) -> None:
            if last:
                self.blocks.append((last["bare"], time.perf_counter() - last["started"]))
            if not ending:
                last["bare"] = bare_steps(model, optimizer, bare_batches, BLOCK)
                last["started"] = time.perf_counter()

        return handed_out(self.loader, at_block)

    def over_bare(self) -> tuple[float, float]:
        """µs/step over the bare loop: (whole loop, median block)."""
        bare, framework = map(sum, zip(*self.blocks))
        return ((framework - bare) / STEPS * 1e6, statistics.median((f - b) / BLOCK * 1e6 for b, f in self.blocks))


def plugin_manager(specs: list[str], available):
    """Exactly the plugins in ``specs``: the ones on by default are off unless listed."""
    pm = make_plugin_manager()
    requests = [parse_plugin_spec(s) for s in specs]
    disabled = {name for name, info in available.items() if info.enabled_by_default} - {r.name for r in requests}
    for name, plugin in resolve(requests, disabled, available=available):
        register_plugin(pm, plugin, name)
    return pm


def framework(data: TensorDataset, specs: list[str], available) -> tuple[float, float, float, float]:
    """µs/step: the bare loop's, then over it: the whole loop, its median block, and the whole
    fit (which adds set-up and the work done once at the end: plots, final files)."""
    model, optimizer, loader = make_work(data)
    loader = Interleaved(loader, data)
    pm = plugin_manager(specs, available)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, optimizer, loader, epochs=1, device="cpu", run_dir=run_dir, plugin_manager=pm)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.fit()
        fit = time.perf_counter() - start
    bare = sum(b for b, _ in loader.blocks)
    return bare / STEPS * 1e6, *loader.over_bare(), (fit - 2 * bare) / STEPS * 1e6


class NoOpStep:
    """Replaces forward/backward/step with nothing, leaving the framework's own per-step work."""

    loss = torch.tensor(1.0)

    @hookimpl
    def train_step(self) -> torch.Tensor:
        return self.loss

    @hookimpl
    def backward(self) -> bool:
        return True

    @hookimpl
    def optimizer_step(self) -> bool:
        return True


def framework_alone(specs: list[str], available, steps: int = 20000) -> float:
    """µs/step of the loop, events and plugins around a step that does nothing, over a list of
    ready batches: the framework's own cost, without the noise of the real work around it."""
    batches = [(torch.zeros(BATCH, 256), torch.zeros(BATCH, dtype=torch.long))] * steps
    model = nn.Linear(256, 10)  # never called in the loop; throughput counts its FLOPs once, at fit start
    pm = plugin_manager(specs, available)
    with tempfile.TemporaryDirectory() as run_dir:
        register_plugin(pm, NoOpStep(), "noop")
        trainer = Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            batches,
            epochs=1,
            device="cpu",
            run_dir=run_dir,
            plugin_manager=pm,
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return trainer.fit()["epoch_time"] / steps * 1e6


def save_cost(recipe: str, saves: int = 20) -> None:
    """Milliseconds for one checkpoint of ``recipe``'s state (as the checkpoint plugin writes
    ``last.pt`` at each epoch end), median and range over ``saves``, and the file's size."""
    from minitrain.commands.start import RunRequest, prepare
    from minitrain.engine import checkpointing

    with tempfile.TemporaryDirectory() as folder:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = prepare(RunRequest(recipe, [], [], ["console", "jsonl", "csv"], os.path.join(folder, "run")))
        trainer.model.to(trainer.device)
        path = os.path.join(folder, "last.pt")
        times = []
        for _ in range(saves):
            start = time.perf_counter()
            trainer.check_finite(weights=True)
            checkpointing.save(path, checkpointing.header(trainer), trainer.state_dict())
            times.append((time.perf_counter() - start) * 1e3)
        size = os.path.getsize(path)
    print(
        f"{recipe}: one checkpoint save {statistics.median(times):.1f} ms (min {min(times):.1f}, max "
        f"{max(times):.1f}, {saves} saves), {size / 1e6:.2f} MB; the default plugin saves last.pt at each "
        "epoch end, and best.pt too when the monitored metric improved"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help="comma-separated plugin specs to measure (default: the four sets above)",
    )
    parser.add_argument("--save-cost", metavar="RECIPE", help="time one checkpoint of this recipe's state instead")
    args = parser.parse_args()
    if args.save_cost:
        return save_cost(args.save_cost)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    available = discover()
    sets = {s or "core alone": [p for p in s.split(",") if p] for s in args.sets} if args.sets else SETS
    workdir = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # the mlflow plugin's store and artifacts
    os.chdir(workdir.name)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir.name}/mlflow.db"
    runnable = {}
    for name, specs in sets.items():
        missing = [s for s in specs if getattr(available.get(parse_plugin_spec(s).name), "target", None) is None]
        if missing:
            print(f"skipping {name!r}: not installed: {', '.join(missing)}")
            continue
        try:
            plugin_manager(specs, available)
        except MinitrainError as exc:  # e.g. mlflow without MLflow installed
            print(f"skipping {name!r}: {exc}")
            continue
        runnable[name] = specs
    sets = runnable
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(STEPS * BATCH, 256), torch.randint(0, 10, (STEPS * BATCH,)))
    [framework(data, specs, available) for specs in sets.values()]  # warm-up
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in sets}
    for round_ in range(args.rounds):
        for name, specs in sets.items():
            results[name].append(framework(data, specs, available))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    bare = statistics.median(r[0] for rs in results.values() for r in rs)
    print(
        f"bare loop: {bare:.1f} µs/step; {STEPS} steps, in blocks of {BLOCK} interleaved with the framework's; "
        f"{args.rounds} rounds"
    )
    print(
        f"{'µs/step over the bare loop':<44} {'per step':>9} {'min':>7} {'max':>7} {'median block':>13} "
        f"{'whole fit':>10}"
    )
    for name in sets:
        _, loops, blocks, fits = zip(*results[name])
        print(
            f"{name:<44} {statistics.median(loops):>9.1f} {min(loops):>7.1f} {max(loops):>7.1f} "
            f"{statistics.median(blocks):>13.1f} {statistics.median(fits):>10.1f}"
        )
    print(
        "medians over rounds. per step: the whole training loop; median block: its typical block of "
        f"{BLOCK} steps;\nwhole fit: also set-up and the work done once at the end (plots, final files)"
    )
    print(
        "\nframework alone (a no-op step, 20000 steps, median of 5): "
        + ", ".join(
            f"{name} {statistics.median(framework_alone(specs, available) for _ in range(5)):.1f} µs/step"
            for name, specs in sets.items()
        )
    )


if __name__ == "__main__":
    main()

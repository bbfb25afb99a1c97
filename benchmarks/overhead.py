"""Per-step cost of the framework over a bare PyTorch loop doing identical work.

Task (fixed by the project's brief): MLP 256->64->ReLU->10, batch 64, SGD, a DataLoader over a
TensorDataset of random data, 2000 steps, one thread. The bare loop and each framework set-up run
in the same process, interleaved, for several rounds; the figure is the median over rounds of
(framework time - bare time) / steps.

    python benchmarks/overhead.py                    # core alone, standard plugins, all plugins
    python benchmarks/overhead.py --rounds 9 --set "console,jsonl,checkpoint"
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from minitrain import Trainer, hookimpl
from minitrain.plugins import discover, make_plugin_manager, parse_plugin_spec, register_plugin, resolve

STEPS, BATCH = 2000, 64
SETS = {
    "core alone": [],
    "standard (console, jsonl)": ["console", "jsonl"],
    "console, jsonl, checkpoint, viz": ["console", "jsonl", "checkpoint:every=1,monitor=train_loss", "viz"],
}


def make_work(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(STEPS * BATCH, 256), torch.randint(0, 10, (STEPS * BATCH,)))
    return model, optimizer, DataLoader(data, batch_size=BATCH, shuffle=True)


def bare() -> float:
    model, optimizer, loader = make_work()
    start = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def plugin_manager(specs: list[str], available):
    """Exactly the plugins in ``specs``: the ones on by default are off unless listed."""
    pm = make_plugin_manager()
    requests = [parse_plugin_spec(s) for s in specs]
    disabled = {name for name, info in available.items() if info.enabled_by_default} - {r.name for r in requests}
    for name, plugin in resolve(requests, disabled, available=available):
        register_plugin(pm, plugin, name)
    return pm


def framework(specs: list[str], available) -> tuple[float, float]:
    """(whole fit, training loop alone): the first includes one-off work such as plots at fit end."""
    model, optimizer, loader = make_work()
    pm = plugin_manager(specs, available)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, optimizer, loader, epochs=1, device="cpu", run_dir=run_dir, plugin_manager=pm)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            metrics = trainer.fit()
        return time.perf_counter() - start, metrics["epoch_time"]


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
    model = nn.Linear(1, 1)
    pm = plugin_manager(specs, available)
    with tempfile.TemporaryDirectory() as run_dir:
        register_plugin(pm, NoOpStep(), "noop")
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, epochs=1,
                          device="cpu", run_dir=run_dir, plugin_manager=pm)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return trainer.fit()["epoch_time"] / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="comma-separated plugin specs to measure (default: the three standard sets)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    available = discover()
    sets = {s or "core alone": [p for p in s.split(",") if p] for s in args.sets} if args.sets else SETS
    runnable = {}
    for name, specs in sets.items():
        missing = [s for s in specs if getattr(available.get(parse_plugin_spec(s).name), "target", None) is None]
        if missing:
            print(f"skipping {name!r}: not installed: {', '.join(missing)}")
        else:
            runnable[name] = specs
    sets = runnable
    bare(), [framework(specs, available) for specs in sets.values()]  # warm-up
    per_step: dict[str, list[float]] = {name: [] for name in sets}
    whole_fit: dict[str, list[float]] = {name: [] for name in sets}
    bare_times = []
    for _ in range(args.rounds):
        for name, specs in sets.items():
            b = bare()
            fit_time, loop_time = framework(specs, available)
            bare_times.append(b)
            per_step[name].append((loop_time - b) / STEPS * 1e6)
            whole_fit[name].append((fit_time - b) / STEPS * 1e6)
    print(f"bare loop: {statistics.median(bare_times) / STEPS * 1e6:.1f} µs/step (median of {len(bare_times)}), "
          f"{STEPS} steps, {args.rounds} rounds")
    print(f"{'plugins':<34} {'per step':>9} {'min':>7} {'max':>7} {'whole fit':>10}   (µs/step over bare, medians)")
    for name in sets:
        values = per_step[name]
        print(f"{name:<34} {statistics.median(values):>9.1f} {min(values):>7.1f} {max(values):>7.1f} "
              f"{statistics.median(whole_fit[name]):>10.1f}")
    print("per step: the training loop alone; whole fit: also set-up and fit-end work (plots, final files)")
    print("\nframework alone (a no-op step, 20000 steps, median of 5): " + ", ".join(
        f"{name} {statistics.median(framework_alone(specs, available) for _ in range(5)):.1f} µs/step"
        for name, specs in sets.items()))


if __name__ == "__main__":
    main()

"""CIFAR-10 speedrun: recipes/cifar10_speedrun.py through minitrain's Trainer (events on, the
console and jsonl plugins on) against the identical training in a bare loop, in one process.

The bare loop uses the same loaders, model, optimizer, schedule and kernels — bf16 conversion,
lookahead and test-time augmentation through the very functions the plugins call — in a plain
Python loop with no events and no plugins. Each timed run spans what the reference scripts time:
from the start of training (the whitening computed from the data included) to the end of the
final test-time-augmented evaluation; loading the data set onto the device, building the
(data-independent) model and warm-up (compilation included) are outside the timer. On a GPU the
timer is a pair of CUDA events.
Framework and bare runs alternate (run i uses seed i for both, so their accuracies should agree
closely), and the last lines printed are the summary table.

    python benchmarks/speedrun.py --data-dir DIR --runs 10 --sync-debug
    python benchmarks/speedrun.py --data-dir DIR --plugin compile --set muon=true
    python benchmarks/speedrun.py --device cpu --data-dir DIR --epochs 1 --runs 1 --warmup 0 \\
        --set widths=[8,16,16] --set batch_size=16 --set eval_batch_size=16     # smoke test

Needs only torch, pydantic, pluggy, numpy and tqdm besides minitrain itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from minitrain import Trainer, hookimpl
from minitrain.engine.device import resolve_device, seed_everything
from minitrain.engine.registry import (
    PluginRequest,
    discover,
    make_plugin_manager,
    parse_plugin_spec,
    register_plugin,
    resolve,
)
from minitrain.engine.state import Steps
from minitrain.kit.data import load_cifar10
from minitrain.kit.recipe import load_recipe, make_config
from minitrain_plugins.amp import DTYPES, to_half, unsupported
from minitrain_plugins.compile import compile_in_place
from minitrain_plugins.tta import augmented_logits

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cifar10_speedrun.py"
STANDARD = {"console", "jsonl"}


class Run(NamedTuple):
    acc: float
    seconds: float
    model: torch.nn.Module  # the trained model, for checks that both loops trained alike


class Timer:
    """Seconds from ``start`` to ``stop``: CUDA events on a GPU (the queue drained first, so the
    span includes any time the GPU waits for the host), the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t0
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3


class SyncCheck:
    """Puts CUDA's sync debug mode on for ``steps`` training steps from step ``first`` (inside an
    epoch: the loop reads its metrics once per epoch, by design), records every synchronising
    call, then stops the run."""

    name = "sync_check"

    def __init__(self, first: int, steps: int):
        self.first, self.steps = first, steps
        self.caught: list[warnings.WarningMessage] = []
        self.done = False

    @hookimpl(tryfirst=True)
    def on_batch_start(self, event) -> None:
        if event.global_step == self.first:
            torch.cuda.set_sync_debug_mode("warn")  # first: it warns that the mode is a prototype
            self.recorder = warnings.catch_warnings(record=True)
            self.caught = self.recorder.__enter__()
            warnings.simplefilter("always")

    @hookimpl(trylast=True)
    def on_batch_end(self, event, trainer) -> None:
        if event.global_step == self.first + self.steps:
            torch.cuda.set_sync_debug_mode("default")
            self.recorder.__exit__(None, None, None)
            self.done = True
            trainer.request_stop("sync check done")


def framework_run(recipe, config, device, data, plugins, timer, run_dir, extra=()) -> Run:
    """One run through the Trainer with ``plugins``, (name, object) pairs, and ``extra`` objects."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train, test = recipe.make_loaders(config, device, *data)
    seed_everything(config.seed)
    model = recipe.make_model(config, device)
    timer.start()
    parts = recipe.make_training(config, device, model, train, test)
    pm = make_plugin_manager()
    for name, plugin in [*plugins, *((p.name, p) for p in extra)]:
        register_plugin(pm, plugin, name)
    trainer = Trainer(
        parts.model,
        parts.optimizer,
        parts.train_loader,
        parts.val_loader,
        epochs=config.epochs,
        loss_fn=parts.loss_fn,
        make_scheduler=parts.make_scheduler,
        scheduler_interval=parts.scheduler_interval,
        device=device,
        run_dir=str(run_dir),
        config=config.model_dump(mode="json"),
        class_names=parts.class_names,
        plugin_manager=pm,
    )
    metrics = trainer.fit()
    return Run(metrics.get("val_acc", float("nan")), timer.stop(), parts.model)


def bare_run(recipe, config, device, data, plugins, timer) -> Run:
    """The same training by hand: no Trainer, no events, no hooks."""
    amp, lookahead, tta, compiler = (plugins.get(name) for name in ("amp", "lookahead", "tta", "compile"))
    dtype, mode = (DTYPES[amp.config.dtype], amp.config.mode) if amp else (None, "none")
    if dtype is not None and unsupported(device, dtype, mode):
        dtype = None  # the plugin falls back to fp32 here too
    autocast = torch.autocast(
        device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None and mode == "autocast"
    )
    train, test = recipe.make_loaders(config, device, *data)
    seed_everything(config.seed)
    model = recipe.make_model(config, device)
    timer.start()
    parts = recipe.make_training(config, device, model, train, test)
    optimizer, loss_fn = parts.optimizer, parts.loss_fn
    scheduler = parts.make_scheduler(Steps(len(train), config.epochs * len(train), config.epochs))
    if dtype is not None and mode == "pure":
        to_half(model, dtype)
    if compiler:
        compile_in_place(model, compiler.config)
    net = model
    if lookahead:
        lookahead.start(model, config.epochs * len(train))
    step = 0
    for epoch in range(config.epochs):
        model.whiten.bias.requires_grad_(epoch < config.whiten_bias_epochs)
        net.train()
        train.set_position(epoch)
        for inputs, targets in train:
            with autocast:
                loss = loss_fn(net(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if lookahead:
                lookahead.after_step(step)
    net.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad(), autocast:
        for inputs, targets in test:
            logits = augmented_logits(net, inputs, tta.config.flip, tta.config.translate) if tta else net(inputs)
            correct += (logits.argmax(1) == targets).sum()
    accuracy = correct.item() / len(test.labels)
    return Run(accuracy, timer.stop(), model)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each kind")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each kind first (compilation, cuDNN)")
    parser.add_argument("--epochs", type=int, help="shorthand for --set epochs=N")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe config override, as for `minitrain run`",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="SPEC",
        help="add or configure a plugin (amp, lookahead and tta settings reach the bare loop too)",
    )
    parser.add_argument("--no-bare", action="store_true", help="framework runs only")
    parser.add_argument(
        "--sync-debug", action="store_true", help="check a few framework steps for host-device syncs (CUDA)"
    )
    parser.add_argument("--sync-steps", type=int, default=5)
    parser.add_argument("--log", help="console output of the framework runs (default: in the work folder)")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--work-dir", help="run folders go here (default: a new temporary folder)")
    return parser.parse_args(argv)


def plugin_factories(recipe, specs: list[str], available):
    """Two functions that make fresh plugin objects for one run: the recipe's plugins, ``specs``
    and the standard ones (console, jsonl; no other default plugin) for the framework; the same
    without the standard ones for the bare loop, which reads only their settings."""
    requests = [parse_plugin_spec(p) if isinstance(p, str) else p for p in recipe.PLUGINS]
    requests += [parse_plugin_spec(s) for s in specs]
    named = {r.name for r in requests if isinstance(r, PluginRequest)}
    off = {n for n, info in available.items() if info.enabled_by_default} - STANDARD - named
    return (lambda: resolve(requests, off, available)), (lambda: dict(resolve(requests, off | STANDARD, available)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    recipe = load_recipe(RECIPE)
    overrides = [f"data_dir={args.data_dir}", f"device={device.type}", *args.overrides]
    config = make_config(recipe, overrides + ([f"epochs={args.epochs}"] if args.epochs else []))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    framework_plugins, bare_plugins = plugin_factories(recipe, args.plugin, discover())

    started = time.perf_counter()
    data = [tuple(t.to(device) for t in load_cifar10(config.data_dir, train=train)) for train in (True, False)]
    print(
        f"data on {device}: {len(data[0][1])} train / {len(data[1][1])} test images "
        f"({time.perf_counter() - started:.1f}s)",
        flush=True,
    )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="speedrun-"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log or work / "console.log")
    timer = Timer(device)
    results: dict[str, list[dict]] = {"framework": [], "bare": []}
    runs = 0

    with open(log_path, "w") as log:

        def framework(seed: int, extra=()) -> Run:
            nonlocal runs
            runs += 1
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                return framework_run(
                    recipe,
                    config.model_copy(update={"seed": seed}),
                    device,
                    data,
                    framework_plugins(),
                    timer,
                    work / f"run-{runs}",
                    extra,
                )

        def bare(seed: int) -> Run:
            return bare_run(recipe, config.model_copy(update={"seed": seed}), device, data, bare_plugins(), timer)

        kinds = {"framework": framework} if args.no_bare else {"framework": framework, "bare": bare}
        for i in range(args.warmup):
            for name, run in kinds.items():
                acc, seconds, _ = run(10_000 + i)
                print(f"warm-up {name}: acc {100 * acc:.2f}%, {seconds:.3f}s", flush=True)
        for i in range(args.runs):  # alternate which kind goes first, so drift hits both alike
            for name, run in kinds.items() if i % 2 == 0 else reversed(kinds.items()):
                acc, seconds, _ = run(i)
                results[name].append({"seed": i, "acc": acc, "seconds": seconds})
            print(
                f"run {i}: "
                + ", ".join(f"{n} {100 * r[-1]['acc']:.2f}% {r[-1]['seconds']:.3f}s" for n, r in results.items() if r),
                flush=True,
            )
        sync_line = sync_check(framework, device, args.sync_steps) if args.sync_debug else None

    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "config": config.model_dump(mode="json"),
                    "runs": results,
                },
                indent=2,
            )
        )
    print(f"\nconsole output of the framework runs: {log_path}")
    print_table(results, device, sync_line)
    return 0


def print_table(results: dict[str, list[dict]], device: torch.device, sync_line: str | None) -> None:
    print(f"CIFAR-10 speedrun on {device_name(device)}, torch {torch.__version__}")
    print(f"{'':<18} {'runs':>4} {'acc mean':>9} {'std':>6} {'min':>6} {'median s':>9} {'min s':>7}")
    medians = {}
    for name, rows in results.items():
        if not rows:
            continue
        accs, times = [r["acc"] for r in rows], [r["seconds"] for r in rows]
        medians[name] = statistics.median(times)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        label = "minitrain Trainer" if name == "framework" else "bare loop"
        print(
            f"{label:<18} {len(rows):>4} {100 * statistics.mean(accs):>8.2f}% {100 * std:>6.2f} "
            f"{100 * min(accs):>6.2f} {medians[name]:>9.3f} {min(times):>7.3f}"
        )
    if len(medians) == 2:
        print(f"framework / bare median time: {medians['framework'] / medians['bare']:.3f}")
    if sync_line:
        print(sync_line)


def sync_check(framework, device: torch.device, steps: int) -> str:
    """One framework run with :class:`SyncCheck` over steps 3..2+``steps``; a line saying what it found."""
    if device.type != "cuda":
        return "sync check: skipped (needs CUDA)"
    check = SyncCheck(first=2, steps=steps)
    framework(20_000, extra=[check])
    if not check.done:
        return "sync check: the run ended before the checked steps"
    if not check.caught:
        return f"sync check: no host-device sync in {steps} framework steps (steps 3-{2 + steps})"
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in check.caught})
    return (
        f"sync check: {len(check.caught)} synchronising calls in {steps} steps, at {', '.join(where)}; "
        f"first: {str(check.caught[0].message).splitlines()[0][:200]}"
    )


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())

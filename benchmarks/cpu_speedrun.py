"""Accuracy and wall time of whole ``minitrain run`` commands, as a user runs them: each run is a
fresh process (imports, data loading, training, the final evaluation), timed from start to exit,
its test accuracy read from the run's metrics.csv. Before and after the runs it measures the
machine's speed with the bare loop of benchmarks/overhead.py (µs/step), since a shared machine's
speed drifts from hour to hour.

    python benchmarks/cpu_speedrun.py --runs 3                             # the speedrun recipe, seeds 0..2
    python benchmarks/cpu_speedrun.py --runs 1 --variant epochs=6 --variant "epochs=8;tta_translate=0"
    python benchmarks/cpu_speedrun.py --recipe recipes/cifar10_quick.py --runs 1

Each ``--variant`` is a configuration (its ``--set`` values, separated by ``;``); every other
argument goes to ``minitrain run`` as it is (``--plugin compile``, ``--set device=cpu``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bare_loop_us_per_step() -> float:
    """The bare PyTorch loop's time per step on the overhead benchmark's task (one thread)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import overhead
    import torch
    from torch.utils.data import TensorDataset

    torch.set_num_threads(1)
    data = TensorDataset(
        torch.randn(overhead.STEPS * overhead.BATCH, 256), torch.randint(0, 10, (overhead.STEPS * overhead.BATCH,))
    )
    model, optimizer, loader = overhead.make_work(data)
    return overhead.bare_steps(model, optimizer, iter(loader), overhead.STEPS) / overhead.STEPS * 1e6


def one_run(recipe: str, args: list[str], run_dir: Path) -> tuple[float, float]:
    """(test accuracy, wall seconds) of one ``minitrain run`` in a child process."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "minitrain", "run", recipe, "--run-dir", str(run_dir), "--plugin", "csv", *args],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(run_dir / "metrics.csv", newline="") as file:
        last = list(csv.DictReader(file))[-1]
    return float(last["val_acc"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "cifar10_speedrun.py"))
    parser.add_argument("--runs", type=int, default=3, help="runs (seeds 0, 1, ...) per configuration")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[;KEY=VALUE]",
        help="a configuration to run, as --set values separated by ';' (repeatable)",
    )
    parser.add_argument("--work-dir", help="where the run directories go (default: a temporary folder)")
    args, passed = parser.parse_known_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cpu-speedrun-"))
    print(f"bare loop before: {bare_loop_us_per_step():.0f} µs/step", flush=True)
    rows = []
    for variant in args.variant or [""]:
        sets = [f"--set={item}" for item in variant.split(";") if item]
        results = []
        for seed in range(args.runs):
            run_dir = work / f"{len(rows)}-{seed}"
            accuracy, seconds = one_run(args.recipe, [*passed, *sets, f"--set=seed={seed}"], run_dir)
            results.append((accuracy, seconds))
            print(
                f"{variant or 'defaults'} seed {seed}: {100 * accuracy:.2f}% in {seconds:.0f}s ({run_dir})", flush=True
            )
        rows.append((variant or "defaults", results))
    print(f"bare loop after: {bare_loop_us_per_step():.0f} µs/step")
    print("\n| configuration | runs | mean accuracy | each run (accuracy, wall time) |\n|---|---|---|---|")
    for name, results in rows:
        each = ", ".join(f"{100 * a:.2f}% {s / 60:.1f} min" for a, s in results)
        print(f"| {name} | {len(results)} | {100 * statistics.mean(a for a, _ in results):.2f}% | {each} |")


if __name__ == "__main__":
    main()

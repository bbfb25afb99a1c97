"""The sweep benchmark of issue 13: the quick recipe on real CIFAR-10 at a small budget.

    python benchmarks/sweep.py                       # 12 trials x 2 epochs, 2 workers
    python benchmarks/sweep.py --trials 4 --epochs 1 # a shorter look

Three commands, one after another, each timed from start to exit:

1. the recipe's defaults at the same budget: ``minitrain run recipes/cifar10_quick.py --set epochs=2``;
2. a sweep of the recipe's SPACE (learning rate and weight decay) without pruning
   (``--pruner none``);
3. the same sweep with the median pruner (Optuna's defaults: the first 5 trials are never pruned).

Both sweeps use TPE with the same seed, so they start from the same random points. The last lines
are a Markdown table: wall time, trials pruned, the best trial's validation accuracy (the
recipe validates on CIFAR-10's test set, with flip TTA) and its values. Everything lands in
``runs/bench-sweep-<time>/`` (and the sweeps in ``runs/sweeps/``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPE = "recipes/cifar10_quick.py"


def timed(command: list[str], log: Path) -> float:
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code:
        sys.exit(f"failed with exit code {code}; see {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed, the same for both sweeps")
    args = parser.parse_args()
    out = Path("runs") / f"bench-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    minitrain = [sys.executable, "-m", "minitrain"]
    rows = []

    seconds = timed(
        [*minitrain, "run", RECIPE, "--set", f"epochs={args.epochs}", "--run-dir", str(out / "defaults")],
        out / "defaults.log",
    )
    final = json.loads((out / "defaults" / "events.jsonl").read_text().splitlines()[-1])
    config = json.loads((out / "defaults" / "config.json").read_text())
    rows.append(["recipe defaults (one run)", seconds, "-", final["metrics"]["val_acc"], config])

    for pruner in ("none", "median"):
        study = f"{out.name}-{pruner}"
        seconds = timed(
            [
                *minitrain,
                "sweep",
                RECIPE,
                "--trials",
                str(args.trials),
                "--workers",
                str(args.workers),
                "--set",
                f"epochs={args.epochs}",
                "--sampler",
                f"tpe:seed={args.seed}",
                "--pruner",
                pruner,
                "--study",
                study,
            ],
            out / f"sweep-{pruner}.log",
        )
        shown = subprocess.run(
            [*minitrain, "sweep", "show", study, "--json"], capture_output=True, text=True, check=True
        )
        (out / f"sweep-{pruner}.json").write_text(shown.stdout)
        trials = json.loads(shown.stdout)["trials"]
        best = trials[0]
        values = ", ".join(f"{k}={v:.3g}" for k, v in best["params"].items())
        epochs = sum(t["epochs"] or 0 for t in trials)
        rows.append(
            (
                f"sweep, pruner {pruner} ({args.trials} trials, {epochs} epochs trained)",
                seconds,
                str(sum(t["state"] == "PRUNED" for t in trials)),
                best["value"],
                f"trial {best['number']}: {values}",
            )
        )

    keys = list(best["params"])
    rows[0][4] = ", ".join(f"{k}={config[k]:.3g}" for k in keys)  # the defaults of what the sweeps searched
    print(f"\n{args.trials} trials x {args.epochs} epochs, {args.workers} workers; results in {out}\n")
    print("| run | wall time | trials pruned | best val_acc | values |")
    print("|---|---|---|---|---|")
    for name, seconds, pruned, acc, values in rows:
        print(f"| {name} | {seconds / 60:.1f} min | {pruned} | {100 * acc:.2f}% | {values} |")


if __name__ == "__main__":
    main()

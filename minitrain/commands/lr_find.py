"""``minitrain lr-find RECIPE``: the learning-rate range test. The recipe is built as for a run (its
plugins too: mixed precision, compile) and trained for up to ``steps`` batches while the learning
rate grows exponentially from ``min_lr`` to ``max_lr``; the test stops early once the loss has
clearly diverged. The suggestion is the rate where the smoothed loss falls fastest, in the units
of the recipe's ``lr`` (every parameter group is scaled alike, so a recipe that derives group
rates from ``lr`` keeps their ratios). The recipe's schedule is not stepped; nothing is saved but
the plot, and no run directory is touched.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from minitrain.commands import options
from minitrain.commands.start import RunRequest, build_trainer, plan
from minitrain.engine.errors import MinitrainError
from minitrain.engine.files import check_writable
from minitrain.engine.registry import changes_training


@dataclass
class Result:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float | None
    plot: Path | None = None

    @property
    def diverged(self) -> bool:
        """Whether the loss clearly rose before the end of the range (else the range may be short)."""
        return self.losses[-1] > 1.5 * min(self.losses)


def add_parser(command) -> None:
    """Register ``minitrain lr-find``."""
    parser = command("lr-find", help="the learning-rate range test: suggests an lr for the recipe")
    options.add_config(parser)
    options.add_plugins(parser)
    parser.add_argument("--min-lr", type=float, default=1e-6, help="first learning rate (default 1e-6)")
    parser.add_argument("--max-lr", type=float, default=10.0, help="last learning rate (default 10)")
    parser.add_argument("--steps", type=int, default=100, help="batches to try (default 100)")
    parser.add_argument("--out", metavar="FILE.png", help="the plot (default runs/lr-find/<recipe>-<time>.png)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = lr_find(
        args.recipe,
        args.overrides,
        args.plugins,
        args.disabled,
        args.min_lr,
        args.max_lr,
        args.steps,
        args.out,
        args.config_file,
    )
    print(
        f"tried {len(result.lrs)} learning rates from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}; plot: {result.plot}"
    )
    if result.suggestion is None:
        print("no suggestion: the loss did not fall over the range (try a lower --min-lr or more --steps)")
        return 0
    command = [
        "minitrain",
        "run",
        args.recipe,
        *(f"--set={o}" for o in args.overrides),
        f"--set=lr={result.suggestion:.3g}",
        *(f"--plugin={p}" for p in args.plugins),
    ]
    print(f"suggested lr: {result.suggestion:.3g} (where the loss falls fastest); to use it:\n  {shlex.join(command)}")
    if not result.diverged:
        print(
            f"note: the loss was still falling at --max-lr {args.max_lr:g}; a larger --max-lr or more --steps "
            "may move the suggestion"
        )
    return 0


def lr_find(
    recipe_path: str | Path,
    overrides: Sequence[str] = (),
    plugin_specs: Sequence[str] = (),
    disabled: Sequence[str] = (),
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    steps: int = 100,
    out: str | Path | None = None,
    config_file: str | Path | None = None,
) -> Result:
    """The range test of a recipe, with the run's plugins that change training (mixed precision,
    compile, ...) and none that log or save: nothing is written but the plot."""

    if not 0 < min_lr < max_lr:
        raise MinitrainError(f"lr-find: need 0 < --min-lr < --max-lr (got {min_lr:g} and {max_lr:g})")
    if steps < 10:
        raise MinitrainError(f"lr-find: --steps must be at least 10, not {steps}")
    recipe_path = Path(recipe_path)
    out = Path(out or Path("runs") / "lr-find" / f"{recipe_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}.png")
    check_writable(out.parent, "plot folder")
    planned = plan(
        RunRequest(recipe_path, list(overrides), list(plugin_specs), list(disabled), config_file=config_file)
    )  # its run directory is never made
    planned.plugins = [(name, plugin) for name, plugin in planned.plugins if changes_training(plugin)]
    trainer, _ = build_trainer(planned, run_dir=None)
    lrs, losses = _sweep(trainer, planned.config.lr, min_lr, max_lr, steps)
    suggestion = steepest(lrs, losses)
    result = Result(lrs, losses, suggestion)
    result.plot = _plot(result, out)
    return result


def _sweep(trainer, lr: float, min_lr: float, max_lr: float, steps: int) -> tuple[list[float], list[float]]:
    """Train on successive batches at exponentially growing rates; the smoothed losses."""
    optimizer = trainer.optimizer
    bases = [group.get("initial_lr", group["lr"]) / lr for group in optimizer.param_groups]  # per unit of lr
    trainer.scheduler = None  # the schedule would fight the sweep
    trainer.calls.setup(trainer)
    trainer.model.train()
    lrs, smoothed, average, best = [], [], 0.0, math.inf
    batches = itertools.chain.from_iterable(itertools.repeat(trainer.train_loader))  # more epochs if needed
    for step, batch in zip(range(steps), batches):
        rate = min_lr * (max_lr / min_lr) ** (step / (steps - 1))
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * rate
        loss = trainer.calls.train_step(trainer, batch)
        trainer.calls.backward(trainer, loss)
        trainer.calls.optimizer_step(trainer)
        value = float(loss.detach())  # a host sync per step: this is a test, not training
        if not math.isfinite(value):
            break
        average = 0.98 * average + 0.02 * value
        smooth = average / (1 - 0.98 ** (step + 1))  # bias-corrected exponential average
        lrs.append(rate)
        smoothed.append(smooth)
        best = min(best, smooth)
        if step > 10 and smooth > 4 * best:
            break  # diverged
    return lrs, smoothed


def steepest(lrs: list[float], losses: list[float]) -> float | None:
    """The rate where the loss falls fastest per decade of learning rate, leaving out the first
    tenth of the sweep (noisy) and the part after the lowest loss (diverging)."""
    end = losses.index(min(losses)) + 1
    start = max(1, len(losses) // 10)
    if end - start < 3:
        return None
    slopes = [
        (losses[i + 1] - losses[i - 1]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i - 1]))
        for i in range(start, end - 1)
    ]
    return lrs[start + slopes.index(min(slopes))]


def _plot(result: Result, path: Path) -> Path:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses)
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested lr {result.suggestion:.2g}")
        ax.legend()
    ax.set(
        xscale="log",
        xlabel="learning rate (recipe's lr)",
        ylabel="training loss (smoothed)",
        title="Learning-rate range test",
    )
    ax.grid(alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

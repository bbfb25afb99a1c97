"""``minitrain lr-find RECIPE``: the learning-rate range test. The recipe is built as for a run (its
plugins too: mixed precision, compile) and trained for up to ``steps`` batches while the learning
rate grows exponentially from ``min_lr`` to ``max_lr``; the test stops early once the loss has
clearly diverged. The rates are in the units of the recipe's ``lr`` (every parameter group is
scaled alike, so a recipe that derives group rates from ``lr`` keeps their ratios). The recipe's
schedule is not stepped; nothing is saved but the plot, and no run directory is touched.

The advice follows the curve (:func:`advise`): a fall counts only where it stands out of the
loss's own batch-to-batch noise, and the command says how far it stands out. Where the loss fell,
the suggestion is the rate where it falls fastest, with whether it rose again further on or was
still falling at the end; where it never fell, there is no suggestion, and it says whether the
loss stayed flat or only rose. A loss the recipe sums over each batch is shown per sample.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minitrain.commands import options
from minitrain.engine.errors import MinitrainError
from minitrain.engine.files import check_writable
from minitrain.engine.registry import changes_training
from minitrain.records.losses import SUM, loss_reduction

SURE = 4.0
"""A change of the loss counts when it is at least this many times its noise (and 1% of the loss):
a flat noisy curve's lowest point lies about 2-3 times the noise below its start."""
CLEAR = 10.0
"""A fall this many times its noise, or more, is clear; between SURE and CLEAR the advice is rough."""


@dataclass
class Advice:
    """What the range test's curve says. Levels are means of the raw losses (the first and last
    tenth of the sweep) or points of the smoothed curve; ``noise`` is the standard deviation of a
    loss from one batch to the next, estimated robustly (:func:`noise`)."""

    verdict: str  # "fell", "flat", "rose", or "short" (too few steps to tell)
    start: float  # the loss at the start of the range
    end: float  # the loss at its end
    lowest: float  # the lowest point of the smoothed curve
    lowest_lr: float
    noise: float
    sureness: float  # how many times its noise the fall (verdict fell) or the rise (verdict rose) is
    suggestion: float | None = None  # where the loss falls fastest, if it fell
    rose_from: float | None = None  # the rate from which the loss rose clearly above its lowest (or its start)
    still_falling: bool = False  # it fell, and was at about its lowest at the end of the range
    steps: int = 0  # the losses it was told

    def lines(self, recipe_lr: float | None = None) -> list[str]:
        """The advice in words, each line a finding (the suggestion's own line is the caller's)."""
        ours = f" (the recipe's lr: {recipe_lr:g})" if recipe_lr else ""
        if self.verdict == "short":
            return [f"no suggestion: only {self.steps} steps before the loss was not finite; try a lower --max-lr"]
        if self.verdict == "flat":
            return [
                f"no suggestion: the loss did not fall over the range: {self.start:.3g} at the start, {self.end:.3g} "
                f"at the end, {self.lowest:.3g} at its lowest, all within its noise (±{self.noise:.2g} a batch)",
                f"  no rate in the range trained faster than another{ours}; try more --steps, or a wider range",
            ]
        if self.verdict == "rose":
            return [
                f"no suggestion: the loss never fell below its start ({self.start:.3g}) by more than its noise "
                f"(±{self.noise:.2g} a batch); it only rose, to {self.end:.3g} at the end"
                + (f", from lr {self.rose_from:.2g} on" if self.rose_from else ""),
                (
                    f"  below lr {self.rose_from:.2g} the loss stayed within its noise in {self.steps} steps, "
                    "and from there on the rate was too high"
                    if self.rose_from
                    else "  every rate of the range was too high"
                )
                + f"{ours}; try more --steps, a lower --min-lr, or a range around the recipe's lr",
            ]
        how = (
            "clearly more than noise"
            if self.sureness >= CLEAR
            else "more than noise, but not by much: treat the suggestion as rough (more --steps average more batches)"
        )
        out = [
            f"the loss fell from {self.start:.3g} to {self.lowest:.3g} (at lr {self.lowest_lr:.2g}): by "
            f"{self.start - self.lowest:.2g}, {self.sureness:.0f} times its noise; {how}"
        ]
        if self.rose_from is not None:
            out.append(f"beyond lr {self.rose_from:.2g} the loss rose again, to {self.end:.3g} at the end of the range")
        elif self.still_falling:
            out.append(
                "note: the loss was still falling at the end of the range; a larger --max-lr may move the suggestion"
            )
        else:
            out.append(f"beyond lr {self.lowest_lr:.2g} it fell no further ({self.end:.3g} at the end of the range)")
        return out


@dataclass
class Result:
    lrs: list[float]
    losses: list[float]  # each step's, per sample where the recipe sums over the batch
    advice: Advice
    smoothed: list[float]
    recipe_lr: float | None = None
    per_sample: bool = False
    plot: Path | None = None

    @property
    def suggestion(self) -> float | None:
        return self.advice.suggestion


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
    if result.per_sample:
        print("the recipe's loss is summed over each batch; its values here are per sample")
    lines = result.advice.lines(result.recipe_lr)
    print(lines[0])
    if result.suggestion is None:
        print("\n".join(lines[1:]))
        return 0
    command = [
        "minitrain",
        "run",
        args.recipe,
        *(f"--set={o}" for o in args.overrides),
        f"--set=lr={result.suggestion:.3g}",
        *(f"--plugin={p}" for p in args.plugins),
    ]
    ours = f"; the recipe's lr: {result.recipe_lr:g}" if result.recipe_lr else ""
    print(f"suggested lr: {result.suggestion:.3g} (where the loss falls fastest{ours}); to use it:")
    print(f"  {shlex.join(command)}")
    if lines[1:]:
        print("\n".join(lines[1:]))
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
    from minitrain.commands.start import RunRequest, build_trainer, plan  # the trainer's imports: not for --help

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
    if not lrs:
        raise MinitrainError(f"lr-find: the loss was not finite at the first step, at lr {min_lr:g}")
    advice = advise(lrs, losses)
    result = Result(lrs, losses, advice, smoothed(losses), planned.config.lr, loss_reduction(trainer.loss_fn) == SUM)
    result.plot = _plot(result, out)
    return result


def _sweep(trainer, lr: float, min_lr: float, max_lr: float, steps: int) -> tuple[list[float], list[float]]:
    """Train on successive batches at exponentially growing rates; the rates and each step's loss
    (per sample, for a loss summed over the batch)."""
    from minitrain.engine.device import batch_size  # (torch: not imported for --help)

    summed = loss_reduction(trainer.loss_fn) == SUM
    optimizer = trainer.optimizer
    bases = [group.get("initial_lr", group["lr"]) / lr for group in optimizer.param_groups]  # per unit of lr
    trainer.scheduler = None  # the schedule would fight the sweep
    trainer.calls.setup(trainer)
    trainer.model.train()
    lrs, losses, average, best = [], [], 0.0, math.inf
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
        if summed:
            value /= batch_size(batch)
        average = 0.98 * average + 0.02 * value
        smooth = average / (1 - 0.98 ** (step + 1))  # bias-corrected exponential average
        lrs.append(rate)
        losses.append(value)
        best = min(best, smooth)
        if step > 10 and smooth > 4 * best:
            break  # diverged
    return lrs, losses


def smoothed(losses: list[float]) -> list[float]:
    """Each loss averaged with its neighbours, ``window(n)`` of them centred on it (fewer at the
    ends): no lag, so the lowest point stays at its rate."""
    half = window(len(losses)) // 2
    return [
        sum(losses[max(0, i - half) : i + half + 1]) / len(losses[max(0, i - half) : i + half + 1])
        for i in range(len(losses))
    ]


def window(n: int) -> int:
    """The smoothing window for ``n`` steps: about a tenth of them, odd, at least 3."""
    return 2 * max(2, n // 20) + 1


def noise(losses: list[float]) -> float:
    """The loss's standard deviation from one batch to the next: from second differences
    (``l[i-1] - 2 l[i] + l[i+1]``, which a falling or rising trend leaves at about zero) and their
    median absolute deviation (which a spike barely moves), scaled to a batch's own noise."""
    second = [a - 2 * b + c for a, b, c in zip(losses, losses[1:], losses[2:])]
    if not second:
        return 0.0
    middle = statistics.median(second)
    return 1.4826 * statistics.median(abs(d - middle) for d in second) / math.sqrt(6)


def advise(lrs: list[float], losses: list[float]) -> Advice:
    """What the curve of raw per-step ``losses`` at rates ``lrs`` says (see :class:`Advice`).

    The start's level is the mean of the first tenth of the losses (5 at least), the end's of the last,
    and the smoothed curve's points are the levels between. A level differs from another when the
    difference is ``SURE`` times its noise (from each level's own noise, measured around it: a
    batch's loss is noisier at high rates than at low ones) and 1% of the loss. The loss fell
    where some point is that far below the start, and the lowest such point is the one reported
    (a lower one in a chaotic stretch at high rates, within its noise, may be chance). Without a fall, the
    loss rose where the end is that far above the start, and else it was flat."""
    n = len(losses)
    if n < 5:
        return Advice("short", losses[0], losses[-1], min(losses), lrs[losses.index(min(losses))], 0.0, 0.0, steps=n)
    curve, w, m = smoothed(losses), window(n), max(5, n // 10)
    half, span = w // 2, max(w + m, 12)  # span: the losses each noise is measured over
    start, end = sum(losses[:m]) / m, sum(losses[-m:]) / m
    floor = 1e-9 * max(abs(start), 1e-12)  # (a curve without noise: any change counts)
    at_start = max(noise(losses[: max(span, n // 3)]), floor)  # the calm start: a third of the sweep
    local = [max(noise(losses[max(0, i - span + 1) : i + half + 1]), at_start) for i in range(n)]
    at_end = max(noise(losses[-span:]), at_start)
    scale = 0.01 * abs(start)

    def below_start(i: int) -> float:  # how many times its noise point i lies below the start
        return (start - curve[i]) / math.sqrt(at_start**2 / m + local[i] ** 2 / w)

    inner = range(half, n - half) if n > w else range(n)  # points whose window is whole
    fallen = [i for i in inner if below_start(i) >= SURE and start - curve[i] >= scale]
    low = min(fallen, key=lambda i: curve[i]) if fallen else max(inner, key=below_start)
    lowest, sureness = curve[low], below_start(low)
    if fallen:
        rose = next(
            (
                i
                for i in range(low + 1, n - half)
                if curve[i] - lowest >= max(SURE * math.sqrt((local[low] ** 2 + local[i] ** 2) / w), scale)
            ),
            None,
        )
        after = rose is not None and end - lowest >= SURE * math.sqrt(local[low] ** 2 / w + at_end**2 / m)
        suggestion = steepest(lrs[: low + 1], curve[: low + 1]) or next(
            lrs[i] for i in range(n) if curve[i] <= start - (start - lowest) / 2
        )
        return Advice(
            "fell",
            start,
            end,
            lowest,
            lrs[low],
            at_start,
            sureness,
            suggestion,
            rose_from=lrs[rose] if after and rose is not None else None,
            still_falling=not after and low >= n - half - m and end - lowest <= (start - lowest) / 4,
            steps=n,
        )
    rise = (end - start) / math.sqrt((at_start**2 + at_end**2) / m)
    if rise >= SURE and end - start >= scale:
        rose = next(
            (
                i
                for i in range(n)
                if curve[i] - start >= max(SURE * math.sqrt(at_start**2 / m + local[i] ** 2 / w), scale)
            ),
            None,
        )
        rose_from = None if rose is None else lrs[rose]
        return Advice("rose", start, end, lowest, lrs[low], at_start, rise, rose_from=rose_from, steps=n)
    return Advice("flat", start, end, lowest, lrs[low], at_start, max(sureness, 0.0), steps=n)


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
    """Each step's loss faint, the smoothed curve over it, the band of the start's level within
    which a change is noise, and the suggestion; the title says what the advice says."""
    from matplotlib.figure import Figure

    advice = result.advice
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="C0", alpha=0.25, linewidth=0.8)
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=1.8, label="training loss (smoothed)")
    band = SURE * advice.noise * math.sqrt(1 / max(5, len(result.losses) // 10) + 1 / window(len(result.losses)))
    ax.axhspan(advice.start - band, advice.start + band, color="0.5", alpha=0.15, label="within the noise of the start")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested lr {result.suggestion:.2g}")
    verdict = {
        "fell": f"the loss fell ({advice.sureness:.0f}× its noise)",
        "flat": "the loss did not fall",
        "rose": "the loss only rose",
        "short": "too few steps",
    }[advice.verdict]
    # the smoothed curve's range, a divergence cut off at half the loss or three falls above the
    # start: neither a raw spike nor the blow-up at the top of the range flattens the part that matters
    low = min(result.smoothed)
    high = min(max(result.smoothed), advice.start + max(3 * (advice.start - low), 0.5 * abs(advice.start)))
    margin = 0.1 * (high - low) + band or 0.1 * abs(high) or 1.0
    ax.set_ylim(low - margin, high + margin)
    ax.legend(fontsize=8)
    ax.set(
        xscale="log",
        xlabel="learning rate (recipe's lr)",
        ylabel="training loss per sample" if result.per_sample else "training loss",
        title=f"Learning-rate range test: {verdict}",
    )
    ax.grid(alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

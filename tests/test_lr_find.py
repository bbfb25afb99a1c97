"""``minitrain lr-find``'s advice follows its own curve: on made curves (flat, only rising, falling
then rising, still falling at the end, a fall lost in the noise) the advice function says what
the curve did and how far out of the noise it is; and one tiny run end to end."""

from __future__ import annotations

import math
import random

import pytest

import minitrain.commands.lr_find as lr_find
from minitrain.commands.cli import main
from minitrain.commands.lr_find import CLEAR, SURE, advise

LRS = [10 ** (-6 + 7 * i / 99) for i in range(100)]  # 1e-6 .. 10, as the command's default range


def curve(shape, noise=0.08, seed=0):
    """A made sweep: ``shape(lr)`` plus Gaussian noise of ``noise`` per batch."""
    rng = random.Random(seed)
    return [shape(lr) + rng.gauss(0, noise) for lr in LRS]


def falls(lr, centre=-2.0, depth=1.5):
    """A sigmoid fall of ``depth`` in log10(lr), fastest at 10**centre."""
    return 2.3 - depth / (1 + math.exp(-4 * (math.log10(lr) - centre)))


def test_a_flat_curve_gets_no_suggestion_and_says_it_did_not_fall():
    """The issue's flat Adam curve: noise only. The old advice picked its steepest wiggle (0.009)."""
    advice = advise(LRS, curve(lambda lr: 2.3))
    assert advice.verdict == "flat" and advice.suggestion is None and advice.sureness < SURE
    assert 0.05 < advice.noise < 0.12  # the batch-to-batch noise made: 0.08
    text = "\n".join(advice.lines(1e-3))
    assert "the loss did not fall over the range" in text and "(the recipe's lr: 0.001)" in text
    assert "still falling" not in text


def test_a_curve_that_only_rose_says_so_and_never_that_it_was_still_falling():
    """The issue's curve: flat at 2.30, then rising to about 3.40 from lr 1 on. The old advice said
    "the loss was still falling at --max-lr 10" (its test: the end below 1.5 times the lowest)."""
    advice = advise(LRS, curve(lambda lr: 2.3 + max(0.0, 1.1 * math.log10(lr) + 0.1)))
    assert advice.verdict == "rose" and advice.suggestion is None and advice.sureness >= CLEAR
    assert 0.5 < advice.rose_from < 2 and advice.end == pytest.approx(3.3, abs=0.15)
    text = "\n".join(advice.lines())
    assert "it only rose" in text and "still falling" not in text


def test_a_fall_then_a_rise_suggests_the_steepest_fall_and_says_where_it_rose():
    shape = lambda lr: falls(lr) + max(0.0, 3 * (math.log10(lr) + 0.5))  # noqa: E731 (rises from lr 0.3)
    advice = advise(LRS, curve(shape))
    assert advice.verdict == "fell" and advice.sureness >= CLEAR
    assert advice.suggestion == pytest.approx(1e-2, rel=0.5)  # the sigmoid's steepest point
    assert advice.lowest == pytest.approx(0.85, abs=0.15) and 0.03 < advice.lowest_lr < 0.4
    assert advice.rose_from is not None and 0.2 < advice.rose_from < 1 and not advice.still_falling
    lines = advice.lines()
    assert lines[0].startswith(f"the loss fell from {advice.start:.3g} to {advice.lowest:.3g} (at lr")
    assert "clearly more than noise" in lines[0]
    assert lines[1].startswith(f"beyond lr {advice.rose_from:.2g} the loss rose again")


def test_a_curve_still_falling_at_the_end_says_so():
    advice = advise(LRS, curve(lambda lr: falls(lr, centre=0.5, depth=1.0)))
    assert advice.verdict == "fell" and advice.still_falling and advice.rose_from is None
    assert advice.lowest_lr > 3
    assert "still falling at the end of the range" in advice.lines()[-1]


def test_how_sure_the_advice_is_follows_the_fall_against_the_noise():
    """The same fall in more noise: clear, then rough, then not a fall at all."""
    shape = lambda lr: falls(lr, depth=0.3)  # noqa: E731
    clear, rough, lost = (advise(LRS, curve(shape, noise)) for noise in (0.01, 0.08, 0.3))
    assert clear.verdict == rough.verdict == "fell" and lost.verdict == "flat"
    assert clear.sureness > CLEAR > rough.sureness >= SURE > lost.sureness
    assert "treat the suggestion as rough" in rough.lines()[0] and "rough" not in clear.lines()[0]
    assert lost.suggestion is None


def test_the_command_prints_the_advice_of_its_own_curve(recipe, monkeypatch, tmp_path, capsys):
    """The CLI on the issue's curve (made, in place of training): no suggestion, "only rose"."""
    losses = curve(lambda lr: 2.3 + max(0.0, 1.1 * math.log10(lr) + 0.1))
    monkeypatch.setattr(lr_find, "_sweep", lambda *args: (LRS, losses))
    assert main(["lr-find", str(recipe), "--out", str(tmp_path / "lr.png")]) == 0
    out = capsys.readouterr().out
    assert "no suggestion: the loss never fell below its start (2." in out and "it only rose, to 3." in out
    assert "suggested lr" not in out and "still falling" not in out
    assert (tmp_path / "lr.png").stat().st_size > 10_000


def test_a_tiny_range_test_end_to_end(recipe, tmp_path, capsys):
    """Trained for real on the tiny recipe: the printed advice is that of the plotted curve."""
    out = tmp_path / "lr.png"
    args = ["lr-find", str(recipe), "--steps", "30", "--min-lr", "1e-4", "--max-lr", "10", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = lr_find.lr_find(recipe, steps=30, min_lr=1e-4, max_lr=10, out=tmp_path / "again.png")
    assert result.advice == advise(result.lrs, result.losses)  # (the sweep is seeded: the same curve)
    assert result.advice.verdict == "fell"  # the tiny recipe learns its coloured stripes in a few steps
    assert result.advice.lines(result.recipe_lr)[0] in printed
    assert f"suggested lr: {result.suggestion:.3g} " in printed and out.stat().st_size > 10_000


def test_a_summed_loss_is_tested_per_sample(recipe, tmp_path, capsys):
    summed = recipe.with_name("summed_recipe.py")
    summed.write_text(
        recipe.read_text().replace(
            "class_names=CIFAR10_CLASSES)", "class_names=CIFAR10_CLASSES, loss_fn=nn.CrossEntropyLoss(reduction='sum'))"
        )
    )
    result = lr_find.lr_find(summed, steps=12, min_lr=1e-5, max_lr=1e-3, out=tmp_path / "lr.png")
    assert result.per_sample and result.losses[0] == pytest.approx(math.log(10), rel=0.3)  # not 16 times it
    assert main(["lr-find", str(summed), "--steps", "12", "--max-lr", "1e-3", "--out", str(tmp_path / "b.png")]) == 0
    assert "the recipe's loss is summed over each batch; its values here are per sample" in capsys.readouterr().out

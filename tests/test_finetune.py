"""Fine-tuning: ``--init-from`` takes a checkpoint's weights and nothing else, names every misfit
(with shapes) or skips them on request; ``freeze`` patterns stop training of matching layers;
the fine-tuning recipe's comparison runs end to end."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minitrain.commands.cli import main
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import checkpointing
from minitrain.engine.errors import MinitrainError
from minitrain.engine.state import RunState
from minitrain.kit.recipe import load_recipe

FINETUNE_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "cifar10_finetune.py"
TINY = ["data_dir={data}", "device=cpu", "widths=4,8,8", "batch_size=16", "epochs=1"]

FIRST_PARTY_PLUGINS = {"checkpoint", "amp"}


@pytest.fixture
def tiny(fake_cifar):
    return [item.format(data=fake_cifar) for item in TINY]


@pytest.fixture
def pretrained(tiny, tmp_path):
    """A 5-class model trained for an epoch, and its checkpoint."""
    trainer = prepare(RunRequest(FINETUNE_RECIPE, [*tiny, "classes=5"], ["checkpoint"], ["console"], tmp_path / "pre"))
    trainer.fit()
    return trainer, tmp_path / "pre" / "checkpoints" / "last.pt"


def test_a_mismatched_head_is_listed_with_shapes(tiny, pretrained, capsys):
    _, checkpoint = pretrained
    with pytest.raises(MinitrainError) as info:
        prepare(RunRequest(FINETUNE_RECIPE, tiny, [], ["console"], "new", init_from=checkpoint))
    message = str(info.value)
    assert "1 tensor(s) do not fit" in message and "--init-skip-mismatched" in message
    assert "head.weight (5, 8) in the checkpoint, (10, 8) in the model" in message
    assert (
        main(
            [
                "run",
                str(FINETUNE_RECIPE),
                *sum((["--set", s] for s in tiny), []),
                "--run-dir",
                "cli",
                "--init-from",
                str(checkpoint),
            ]
        )
        == 2
    )
    assert "head.weight (5, 8) in the checkpoint" in capsys.readouterr().err


def test_many_misfits_are_counted_and_the_first_few_named(tiny, pretrained, capsys):
    _, checkpoint = pretrained
    wider = [*(s for s in tiny if not s.startswith("widths=")), "widths=8,8,8"]
    args = ["run", str(FINETUNE_RECIPE), *sum((["--set", s] for s in wider), []), "--init-from", str(checkpoint)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert err.startswith("minitrain: error: ") and err.count("\n") == 1 and "Traceback" not in out + err, err
    found = re.search(r"(\d+) tensor\(s\) do not fit the model: (.*); and (\d+) more, which --debug lists \(", err)
    assert found, err
    total, shown, more = int(found[1]), found[2].split("; "), int(found[3])
    assert len(shown) == 3 and total == 3 + more and more > 0
    assert shown[0] == "blocks.0.0.weight (4, 24, 3, 3) in the checkpoint, (8, 24, 3, 3) in the model"
    with pytest.raises(MinitrainError) as info:  # --debug: the traceback, and the full list in its note
        main([*args, "--debug"])
    listed = info.value.__notes__[0].splitlines()[1:]
    assert len(listed) == total and listed[:3] == [f"  {misfit}" for misfit in shown]
    assert "  head.weight (5, 8) in the checkpoint, (10, 8) in the model" in listed


def test_a_checkpoint_that_fits_no_parameter_is_refused_even_when_skipping(tiny, tmp_path, capsys):
    other = tmp_path / "other.pt"
    trainer = SimpleNamespace(state=RunState(batch_idx=5, global_step=5), config={}, recorded_plugins=None)
    state = {
        "2.weight": torch.zeros(10, 12),
        "2.bias": torch.zeros(10),
        "blocks.0.2.num_batches_tracked": torch.tensor(3),
    }
    checkpointing.save(other, checkpointing.header(trainer), {"model": state})  # a buffer fits, no weight does
    args = ["run", str(FINETUNE_RECIPE), *sum((["--set", s] for s in tiny), []), "--init-from", str(other)]
    for skip in ([], ["--init-skip-mismatched"]):
        assert main([*args, *skip]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("minitrain: error: ") and err.count("\n") == 1 and "Traceback" not in out + err, err
        assert f"--init-from {other}: probably the wrong checkpoint: none of the model's " in err
        assert "parameters fits it; " in err and "which --debug lists" in err and "--init-skip-mismatched" not in err


def test_init_from_takes_weights_only(tiny, pretrained):
    before, checkpoint = pretrained
    with pytest.warns(UserWarning, match=r"recipe's initialisation for 1 tensor\(s\): head.weight \(5, 8\)"):
        trainer = prepare(
            RunRequest(FINETUNE_RECIPE, tiny, [], ["console"], "new", init_from=checkpoint, init_skip_mismatched=True)
        )
    old, new = before.module.state_dict(), trainer.module.state_dict()
    assert all(torch.equal(new[name], old[name]) for name in old if name != "head.weight")
    assert new["head.weight"].shape == (10, 8)
    assert (trainer.state.epoch, trainer.state.global_step) == (0, 0) and not trainer.optimizer.state  # fresh progress
    assert trainer.scheduler.last_epoch == 0 < before.scheduler.last_epoch  # fresh schedule
    trainer.fit()
    assert (trainer.state.epoch, trainer.state.global_step) == (
        1,
        len(trainer.train_loader),
    )  # its own epoch, from step 0


def test_freeze_patterns_keep_layers_as_loaded(tiny, pretrained):
    _, checkpoint = pretrained
    trainer = prepare(
        RunRequest(
            FINETUNE_RECIPE,
            [*tiny, "classes=5", "freeze=whiten,blocks.0"],
            [],
            ["console"],
            "frozen",
            init_from=checkpoint,
        )
    )
    loaded = {name: p.detach().clone() for name, p in trainer.module.named_parameters()}
    trainer.fit()
    for name, parameter in trainer.module.named_parameters():
        if name.startswith(("whiten.", "blocks.0.")):
            assert not parameter.requires_grad and torch.equal(parameter, loaded[name]), name
        elif parameter.requires_grad:
            assert not torch.equal(parameter, loaded[name]), name


def test_freeze_pattern_matching_nothing_is_an_error(tiny, capsys):
    assert main(["run", str(FINETUNE_RECIPE), *sum((["--set", s] for s in tiny), []), "--set", "freeze=blocks.9"]) == 2
    assert "freeze: 'blocks.9' match(es) no parameter" in capsys.readouterr().err


def test_init_from_refuses_a_missing_or_foreign_file(tiny, tmp_path, capsys):
    args = ["run", str(FINETUNE_RECIPE), *sum((["--set", s] for s in tiny), [])]
    assert main([*args, "--init-from", "nowhere.pt"]) == 2
    assert "--init-from: checkpoint not found: nowhere.pt" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert main([*args, "--init-from", str(tmp_path / "foreign.pt")]) == 2
    assert "not a minitrain checkpoint" in capsys.readouterr().err


def test_the_recipe_compares_fine_tuning_with_scratch(fake_cifar, tmp_path, capsys):
    recipe = load_recipe(FINETUNE_RECIPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = recipe.compare(
            tmp_path / "demo",
            pretrain_epochs=1,
            epochs=1,
            train_size=48,
            overrides=[f"data_dir={fake_cifar}", "device=cpu", "widths=4,8,8", "batch_size=16"],
        )
    assert set(result) == {"finetune", "scratch", "gain"}
    assert result["gain"] == pytest.approx(result["finetune"] - result["scratch"])
    assert "fine-tuned" in capsys.readouterr().out
    head = checkpointing.load(tmp_path / "demo" / "pretrain" / "checkpoints" / "last.pt")["trainer"]["model"][
        "head.weight"
    ]
    assert head.shape[0] == 5

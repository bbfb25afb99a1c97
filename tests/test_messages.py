"""The words of one-line errors: an unknown config key names the closest field, a validation error
says what was expected without pydantic's internals (union branch labels, tuple positions), and
a path under a file says which part is the file."""

from __future__ import annotations

import os
import re

import pytest

from minitrain.engine.errors import MinitrainError
from minitrain.engine.files import check_writable, writable_problem
from minitrain.kit.recipe import load_recipe, make_config

KINDS_RECIPE = """
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

import minitrain


def _at_most_5(value):
    if value > 5:
        raise ValueError("must be at most 5")
    return value


class Optim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    momentum: float = 0.9
    nesterov: bool = True


class Config(minitrain.RecipeConfig):
    widths: tuple[int, int, int] = (32, 64, 128)
    sizes: list[int] = [1, 2]
    optim: Optim = Optim()
    share: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)] | None = None
    workers: int | Literal["auto"] = "auto"
    depth: Annotated[int, AfterValidator(_at_most_5)] | str = 1


def build(config, device):
    raise AssertionError("not built in these tests")
"""

# What pydantic shows of its own machinery; none of it may reach a message.
INTERNALS = re.compile(
    r"constrained-|function-(after|before|wrap|plain)|literal\[|lax-or-strict|\.(int|float|str)\b|"
    r"Input should|Field required|<class |\.\d+:"
)


@pytest.fixture
def kinds(write_recipe):
    return load_recipe(write_recipe(KINDS_RECIPE, "kinds.py"))


def error_of(recipe, *overrides, **kwargs) -> str:
    with pytest.raises(MinitrainError) as info:
        make_config(recipe, overrides, **kwargs)
    message = str(info.value)
    assert "\n" not in message and not INTERNALS.search(message), message
    return message


HINT = "(minitrain config kinds.py lists the fields)"


@pytest.mark.parametrize(
    "override, message",
    [
        ("epoch=2", f"--set: epoch: unknown key; did you mean epochs? {HINT}"),
        ("Batch_Size=8", f"--set: Batch_Size: unknown key; did you mean batch_size? {HINT}"),
        ("optim.momentm=0.5", f"--set: optim.momentm: unknown key; did you mean optim.momentum? {HINT}"),
        ("zzzz=1", f"--set: zzzz: unknown key {HINT}"),
    ],
)
def test_an_unknown_key_names_the_closest_field(kinds, override, message):
    assert error_of(kinds, override) == message


def test_an_unknown_key_in_a_config_file_names_the_closest_field_too(kinds):
    file = {"epoch": 2, "optim": {"nesterof": False}}
    assert error_of(kinds, file=file, file_name="my.toml") == (
        "--config my.toml: optim.nesterof: unknown key; did you mean optim.nesterov?; "
        f"epoch: unknown key; did you mean epochs? {HINT}"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("widths=[32,64]", "widths: expected 3 values, got 2"),
        ("widths=[32]", "widths: expected 3 values, got 1"),
        ("widths=[32,64,128,256]", "widths: expected 3 values, got 4"),
        ("widths=5", "widths: expected a list of 3 values, written [A,B,C] (got '5')"),
        ('widths=[32,"a",8]', "widths[1]: expected an integer (got 'a')"),
        ("sizes=7", "sizes: expected a list, written [A,B,...] (got '7')"),
        ("optim=3", "optim: expected a table of keys and values (got '3')"),
        ("data_dir=[1]", "data_dir: expected a path (got [1])"),
        ("device=gpu", "device: expected 'auto', 'cpu', 'cuda' or 'mps' (got 'gpu')"),
        ("max_steps=0", "max_steps: expected a value greater than or equal to 1 (got '0')"),
        ("max_steps=many", "max_steps: expected an integer (got 'many')"),
        ("optim.nesterov=maybe", "optim.nesterov: expected true or false (got 'maybe')"),
    ],
)
def test_a_bad_value_says_what_was_expected(kinds, override, message):
    assert error_of(kinds, override) == f"--set: {message}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("share=0", "share: expected an integer >= 1 or a number > 0 (got '0')"),
        ("share=abc", "share: expected an integer or a number (got 'abc')"),
        ("share=2.5", "share: expected an integer or a number <= 1 (got '2.5')"),
        ("workers=many", "workers: expected an integer or 'auto' (got 'many')"),
        ("depth=[1]", "depth: expected an integer or text (got [1])"),
    ],
)
def test_a_union_is_one_reason_for_the_field(kinds, override, message):
    assert error_of(kinds, override) == f"--set: {message}"


def test_a_union_branch_that_raises_speaks_once_in_its_own_words(kinds):
    assert error_of(kinds, file={"depth": 7}, file_name="f.toml") == "--config f.toml: depth: must be at most 5 (got 7)"


def test_several_problems_stay_on_one_line(kinds):
    assert error_of(kinds, "epoch=2", "widths=[1]", "share=0") == (
        "--set: widths: expected 3 values, got 1; share: expected an integer >= 1 or a number > 0 (got '0'); "
        f"epoch: unknown key; did you mean epochs? {HINT}"
    )


def test_a_path_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for path in (blocker / "run", blocker / "deeper" / "run"):
        assert writable_problem(path, "--run-dir") == f"--run-dir {path}: {blocker} is a file, not a folder"
        with pytest.raises(MinitrainError, match=re.escape(f"{blocker} is a file, not a folder")):
            check_writable(path, "--out folder")
    assert writable_problem(tmp_path / "new" / "run") is None
    assert writable_problem(blocker) == f"folder {blocker}: {blocker} is a file, not a folder"


def test_a_link_that_leads_nowhere_is_named(tmp_path):
    link = tmp_path / "link"
    os.symlink(tmp_path / "gone", link)
    assert writable_problem(link / "run", "--run-dir") == (
        f"--run-dir {link / 'run'}: {link} is a link to {tmp_path / 'gone'}, which does not exist"
    )


SHADOWING_RECIPE = """
from pydantic import field_validator

import minitrain


class Config(minitrain.RecipeConfig):
    widths: list[int] = [8]

    @field_validator("widths")
    @classmethod
    def _positive(cls, widths):
        return widths


def build(config, device):
    raise AssertionError("never built")
"""


def test_a_recipe_validator_may_not_replace_a_check_of_recipe_config(write_recipe, capsys):
    from minitrain.commands import cli

    recipe = write_recipe(SHADOWING_RECIPE)
    code = cli.main(["config", str(recipe), "--set", "lr=-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "_positive" in err and "check of lr" in err


def test_the_quick_recipe_refuses_a_negative_lr():
    recipe = load_recipe(os.path.join(os.path.dirname(__file__), "..", "recipes", "cifar10_quick.py"))
    with pytest.raises(MinitrainError, match=r"lr: must be greater than 0"):
        make_config(recipe, ["lr=-1"])

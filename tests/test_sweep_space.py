"""Search spaces for ``minitrain sweep``: each SPEC form, its errors (one line each), and a
recipe's SPACE merged with ``--space`` key by key. No Optuna needed."""

from __future__ import annotations

import pytest

from minitrain.commands.sweep import space as spaces
from minitrain.engine.errors import MinitrainError
from minitrain.kit.recipe import load_recipe


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("float:1e-4:1", dict(kind="float", low=1e-4, high=1.0, log=False)),
        ("float:0.001:0.5:log", dict(kind="float", low=0.001, high=0.5, log=True)),
        ("int:1:8", dict(kind="int", low=1, high=8, log=False)),
        ("int:16:256:log", dict(kind="int", low=16, high=256, log=True)),
    ],
)
def test_ranges_parse(spec, expected):
    dim = spaces.parse_spec("x", spec)
    assert {key: getattr(dim, key) for key in expected} == expected


def test_choices_parse_to_values_and_set_text():
    dim = spaces.parse_spec("x", "choice:0.1, 3,true,adam")
    assert [value for value, _ in dim.choices] == [0.1, 3, True, "adam"]
    assert dim.override(3) == "x=3" and dim.override("adam") == "x=adam" and dim.override(True) == "x=true"
    lists = spaces.parse_spec("widths", "choice:[[32,64,128],[48,96,192]]")
    assert [text for _, text in lists.choices] == ["[32, 64, 128]", "[48, 96, 192]"]  # --set widths=[32, 64, 128]
    assert spaces.parse_spec("lr", "float:0.1:1").override(0.25) == "lr=0.25"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("uniform:0:1", "unknown kind 'uniform'"),
        ("float:1", "expected float:LOW:HIGH"),
        ("float:a:1", "float bounds must be numbers"),
        ("float:1:0.5", "LOW (1) must be below HIGH (0.5)"),
        ("float:0:1:log", "a log scale needs LOW above 0"),
        ("float:0:inf", "bounds must be finite"),
        ("float:0:1:exp", "expected float:LOW:HIGH"),
        ("int:1.5:4", "int bounds must be whole numbers"),
        ("int:3:3", "must be below HIGH"),
        ("choice:adam", "at least two values"),
        ("choice:a,,b", "empty choice"),
        ("choice:a,b,a", "listed twice"),
        ("choice:[1,2", "not a valid JSON list"),
    ],
)
def test_spec_errors_are_one_clear_line(spec, message):
    with pytest.raises(MinitrainError, match="^--space x=") as caught:
        spaces.parse_spec("x", spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


SPACE_RECIPE_TAIL = """
SPACE = {"lr": "float:0.01:1:log", "batch_size": "choice:8,16"}
"""


def test_recipe_space_merged_key_by_key_and_fixed_keys_leave_it(recipe):
    recipe.write_text(recipe.read_text() + SPACE_RECIPE_TAIL)
    module = load_recipe(recipe)
    space = spaces.build_space(module, ["lr=float:0.05:0.5", "epochs=int:1:3"], {})
    assert [(d.key, d.spec) for d in space] == [
        ("lr", "float:0.05:0.5"),
        ("batch_size", "choice:8,16"),
        ("epochs", "int:1:3"),
    ]
    assert [d.key for d in spaces.build_space(module, [], {"lr": "0.1"})] == ["batch_size"]


def test_the_recipes_spaces_fit_their_configs():
    from pathlib import Path

    recipes = Path(__file__).parent.parent / "recipes"
    checked = 0
    for path in sorted(recipes.glob("*.py")):
        module = load_recipe(path)
        if getattr(module, "SPACE", None):
            spaces.check_space(spaces.build_space(module, [], {}), module, [])
            checked += 1
    assert checked >= 1  # cifar10_quick declares one

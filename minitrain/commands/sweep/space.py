"""Search spaces: ``KEY=SPEC`` on the command line, or a recipe's ``SPACE = {KEY: SPEC}``.

``SPEC`` is one of ``float:LOW:HIGH``, ``float:LOW:HIGH:log``, ``int:LOW:HIGH``,
``int:LOW:HIGH:log`` and ``choice:A,B,C`` (``choice:[[32,64],[48,96]]``, a JSON list, for values
that hold commas). Every key is a field of the recipe's ``Config``, and its bounds and choices are
validated by that ``Config`` before any trial runs, so a sampled value can only be one the recipe
accepts. Nothing here imports Optuna: a dimension only tells a trial what to suggest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

from minitrain.engine.errors import MinitrainError

KINDS = ("float", "int", "choice")
GRID_LIMIT = 10_000  # points a grid may have: beyond, a grid search is not what anyone meant


@dataclass(frozen=True)
class Dimension:
    """One searched config field: ``kind`` float/int with bounds, or choice with its values."""

    key: str
    spec: str  # as written, for messages and the study's record
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[tuple[Any, str], ...] = ()  # (value Optuna stores, text for --set)

    def suggest(self, trial: Any) -> Any:
        """The value of this dimension for an Optuna trial (``optuna.trial.Trial``)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.key, [value for value, _ in self.choices])

    def grid(self) -> list[Any]:
        """Every value, for a grid search (choices and integer ranges only)."""
        if self.kind == "choice":
            return [value for value, _ in self.choices]
        if self.kind == "int":
            return list(range(cast(int, self.low), cast(int, self.high) + 1))  # parse_spec: int bounds
        raise MinitrainError(
            f"--sampler grid: {self.key}={self.spec} is a continuous range, which has no grid; "
            f"give its values (choice:...) or use --sampler tpe or random"
        )

    def override(self, value: Any) -> str:
        """``KEY=VALUE`` for ``minitrain run --set``."""
        if self.kind == "choice":
            text = next((t for v, t in self.choices if v == value and type(v) is type(value)), None)
            return f"{self.key}={text if text is not None else value}"
        return f"{self.key}={int(value) if self.kind == 'int' else repr(float(value))}"

    def probes(self) -> list[str]:
        """Values the recipe's Config must accept: both bounds and one between them that is not a
        whole number (so that a float range on an integer field is caught), or every choice."""
        if self.kind == "choice":
            return [text for _, text in self.choices]
        if self.kind == "int":
            return [str(self.low), str(self.high)]
        assert self.low is not None and self.high is not None  # a float dimension has bounds
        inside = math.sqrt(self.low * self.high) if self.log else self.low + 0.37 * (self.high - self.low)
        if float(inside).is_integer():
            inside = math.nextafter(inside, self.high)
        return [repr(float(self.low)), repr(float(self.high)), repr(float(inside))]


def parse_spec(key: str, spec: str, where: str = "--space") -> Dimension:
    """``float:1e-4:1:log`` -> Dimension, or one MinitrainError line naming what is wrong."""

    def fail(reason: str) -> MinitrainError:
        return MinitrainError(f"{where} {key}={spec}: {reason}")

    if not isinstance(spec, str):
        raise fail("SPEC must be a string such as float:LOW:HIGH, int:LOW:HIGH or choice:A,B")
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise fail(f"unknown kind {kind!r}; SPEC is float:LOW:HIGH[:log], int:LOW:HIGH[:log] or choice:A,B,...")
    if kind == "choice":
        return Dimension(key, spec, kind, choices=_choices(rest, fail))
    parts = rest.split(":")
    if len(parts) == 3 and parts[2] == "log":
        parts, log = parts[:2], True
    elif len(parts) == 2:
        log = False
    else:
        raise fail(f"expected {kind}:LOW:HIGH or {kind}:LOW:HIGH:log")
    low: float  # an int for kind int
    high: float
    if kind == "int":
        try:
            low, high = (int(p) for p in parts)
        except ValueError:
            raise fail("int bounds must be whole numbers") from None
    else:
        try:
            low, high = (float(p) for p in parts)
        except ValueError:
            raise fail("float bounds must be numbers") from None
        if not all(math.isfinite(b) for b in (low, high)):
            raise fail("bounds must be finite")
    if not low < high:
        raise fail(f"LOW ({parts[0]}) must be below HIGH ({parts[1]}); a fixed value goes in --set")
    if log and low <= 0:
        raise fail(f"a log scale needs LOW above 0 (got {parts[0]})")
    return Dimension(key, spec, kind, low, high, log)


def _choices(text: str, fail) -> tuple[tuple[Any, str], ...]:
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise fail(f"choice:[...] is not a valid JSON list: {exc.msg}") from None
        if not isinstance(items, list):
            raise fail("choice:[...] must be a JSON list")
        pairs = [(_categorical(item), json.dumps(item) if not isinstance(item, str) else item) for item in items]
    else:
        texts = [item.strip() for item in text.split(",")]
        if any(not t for t in texts):
            raise fail("empty choice (choice:A,B,C)")
        pairs = [(_categorical(_scalar(t)), t) for t in texts]
    if len(pairs) < 2:
        raise fail("a choice needs at least two values; a fixed value goes in --set")
    values = [json.dumps(v) for v, _ in pairs]
    if len(set(values)) != len(values):
        raise fail("the same value is listed twice")
    return tuple(pairs)


def _scalar(text: str) -> Any:
    """A number, true/false or a string, as JSON reads it; anything else stays text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (int, float, bool, str)) else text


def _categorical(value: Any) -> Any:
    """What Optuna can store as a choice: a scalar, or a list/dict as its JSON text."""
    return value if value is None or isinstance(value, (int, float, bool, str)) else json.dumps(value)


def build_space(recipe: ModuleType, given: Iterable[str], fixed: Mapping[str, str]) -> list[Dimension]:
    """The recipe's ``SPACE`` with ``--space KEY=SPEC`` items replacing its entries key by key.
    A key that ``--set`` fixes leaves the recipe's space; naming it in ``--space`` too is an error."""
    declared = getattr(recipe, "SPACE", None) or {}
    if not isinstance(declared, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in declared.items()
    ):
        raise MinitrainError(
            f"recipe {recipe.__file__}: SPACE must be a dict of KEY: SPEC strings, e.g. {{'lr': 'float:1e-3:1:log'}}"
        )
    space = {key: parse_spec(key, spec, "the recipe's SPACE:") for key, spec in declared.items() if key not in fixed}
    for item in given:
        key, sep, spec = item.partition("=")
        key = key.strip()
        if not sep or not key or not spec.strip():
            raise MinitrainError(f"--space {item!r}: expected KEY=SPEC, e.g. lr=float:1e-3:1:log")
        if key in fixed:
            raise MinitrainError(
                f"--space {item}: {key} is also fixed by --set {key}={fixed[key]}; search it or fix it"
            )
        space[key] = parse_spec(key, spec.strip())
    if not space:
        raise MinitrainError(
            "nothing to search: give --space KEY=SPEC (e.g. --space lr=float:1e-3:1:log), "
            "or declare SPACE = {...} in the recipe"
        )
    return list(space.values())


def check_space(space: list[Dimension], recipe: ModuleType, fixed: list[str]) -> None:
    """Refuse, before any trial, a key the recipe's Config does not have and a bound or choice it
    would refuse (with the other ``--set`` values, as a trial would have them)."""
    from minitrain.kit.recipe import make_config

    fields = recipe.Config.model_fields
    for dim in space:
        top = dim.key.split(".")[0]
        if top not in fields:
            raise MinitrainError(
                f"--space {dim.key}={dim.spec}: the recipe's Config has no field {top!r} "
                f"(its fields: {', '.join(fields)})"
            )
        for text in dim.probes():
            try:
                make_config(recipe, [*fixed, f"{dim.key}={text}"])
            except MinitrainError as exc:
                reason = str(exc).removeprefix("--set: ")
                raise MinitrainError(
                    f"--space {dim.key}={dim.spec}: the recipe's Config refuses {dim.key}={text}: {reason}"
                ) from None


def grid_space(space: list[Dimension]) -> dict[str, list[Any]]:
    grid = {dim.key: dim.grid() for dim in space}
    points = math.prod(len(values) for values in grid.values())
    if points > GRID_LIMIT:
        raise MinitrainError(
            f"--sampler grid: the space has {points} points (more than {GRID_LIMIT}); use --sampler tpe or random"
        )
    return grid

"""The exceptions a run ends with on purpose, and how any error becomes one line. MinitrainError is
what the CLI turns into a single error line (exit code 2, no traceback); TrainingInterrupted,
into a line saying how to resume."""

from __future__ import annotations

import difflib
import re
import signal
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

ERROR_LOG = "errors.log"
"""In the run directory: the full traceback of every plugin failure and of the error ending a run."""


class MinitrainError(Exception):
    """A problem with the user's input: a recipe, an option, a plugin, a data set or a file."""


class NonFiniteError(MinitrainError):
    """Training produced a NaN or infinite loss or weights, and the policy is to stop."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended ``Trainer.fit``. A KeyboardInterrupt, so that code that does not
    expect it stops as on a plain Ctrl-C (``except Exception`` does not swallow it).

    ``graceful``: the run stopped at a step boundary, so a checkpoint written on the way out
    resumes exactly; otherwise a second signal cut it short wherever it was."""

    def __init__(self, signal_name: str, graceful: bool):
        self.signal, self.graceful = signal_name, graceful
        self.exit_code = 128 + signal.Signals[signal_name].value  # the shell's convention: 130, 143
        super().__init__(f"stopped by {signal_name}" if graceful else f"stopped at once by a second {signal_name}")


class NothingTrained(MinitrainError):
    """A run ended without a single step that updated the weights (an empty training loader,
    every step skipped for a non-finite loss)."""


class RunComplete(Exception):
    """A resume found its run complete: every epoch (or ``max_steps``) done. Not an error: a
    restart, a requeue or a retry of a finished run succeeds without training; the message is
    the one line that says so."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as ``Type: message`` on one line, cut at ``limit`` characters."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_validation_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """Every problem as ``key: reason (got value)``, joined with ``; `` on one line, each saying in
    words what was expected. Pydantic's internals stay out: the branches of a union
    (``x.constrained-int``, ``x.function-after[...]``) become one reason for ``x``, and the positions
    a fixed-length tuple lacks (``widths.2: Field required``) a count of values. ``model``, the model
    validated, lets an unknown key name the closest field and a tuple say how many values it takes."""
    groups: dict[tuple[tuple[str | int, ...], str], list[Any]] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        cut = next((i for i, part in enumerate(loc) if i and isinstance(part, str) and _UNION_TAG.fullmatch(part)), 0)
        if cut:
            groups.setdefault((loc[:cut], "union"), []).append(err)
        elif err["type"] == "missing" and loc and isinstance(loc[-1], int):  # a tuple position left empty
            groups.setdefault((loc[:-1], "count"), []).append(err)
        else:
            groups.setdefault((loc, str(len(groups))), []).append(err)
    parts = []
    for (loc, kind), errs in groups.items():
        key = _key(loc)
        if kind == "union":
            branch = [err for err in errs if len(err["loc"]) == len(loc) + 1] or errs  # the union's own input
            reason, got = _union_reason(errs, len(loc)), _got(branch)
        elif kind == "count":
            given = errs[0]["input"]
            expected = _tuple_length(model, loc) or max(err["loc"][-1] for err in errs) + 1
            reason, got = f"expected {expected} values, got {len(given) if hasattr(given, '__len__') else '?'}", ""
        else:
            reason = _reason(errs[0], model, loc)
            got = "" if errs[0]["type"] in ("too_long", "too_short") else _got(errs)
        parts.append(" ".join(f"{key}: {reason}{got}".split()))
    return "; ".join(parts)


# The label pydantic gives a branch of a union in an error's location: `constrained-int`,
# `function-after[check(), int]`, `literal['auto']`, `list[int]`, `lax-or-strict[...]` (a Path).
_UNION_TAG = re.compile(
    r"(constrained-)?(int|float|str|bool|bytes|decimal|none|date|datetime|time|timedelta|uuid|url|any|callable)"
    r"|[a-z][a-z-]*\[.*\]"
)
_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "path_type": "a path",
    "list_type": "a list, written [A,B,...]",
    "tuple_type": "a list, written [A,B,...]",
    "set_type": "a list, written [A,B,...]",
    "frozen_set_type": "a list, written [A,B,...]",
    "dict_type": "a table of keys and values",
    "model_type": "a table of keys and values",
    "model_attributes_type": "a table of keys and values",
}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _key(loc: tuple[str | int, ...]) -> str:
    """``("freeze", 0)`` -> ``freeze[0]``; ``("optim", "lr")`` -> ``optim.lr``."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key or "(config)"


def _got(errs: list[Any]) -> str:
    if errs[0]["type"] in ("extra_forbidden", "missing"):
        return ""
    text = repr(errs[0]["input"])
    return f" (got {text if len(text) <= 80 else text[:77] + '...'})"


def _reason(err: Any, model: type[BaseModel] | None, loc: tuple[str | int, ...]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        closest = _closest(model, loc)
        return "unknown key" + (f"; did you mean {closest}?" if closest else "")
    if kind == "missing":
        return "a value is required"
    if kind in ("too_long", "too_short"):
        fixed = _tuple_length(model, loc)
        size = ctx.get("max_length" if kind == "too_long" else "min_length")
        bound = f"{fixed}" if fixed else f"at most {size}" if kind == "too_long" else f"at least {size}"
        return f"expected {bound} values, got {ctx.get('actual_length', '?')}"
    if kind in ("tuple_type", "list_type") and (fixed := _tuple_length(model, loc)):
        example = ",".join("ABCDEFGH"[:fixed]) if fixed <= 8 else "A,B,..."
        return f"expected a list of {fixed} values, written [{example}]"
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}"
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message.split(", unable to ")[0]
    if message.startswith("Input should be "):
        expected = message.removeprefix("Input should be ")
        return "expected " + ("a value " if expected.startswith(("greater", "less", "a multiple")) else "") + expected
    return message


def _union_reason(errs: list[Any], depth: int) -> str:
    """One reason for a value that fits none of a union's branches: a custom validator's own
    message if one got to speak, else what each branch takes (``an integer >= 1 or a number > 0``)."""
    for err in errs:
        if err["type"] in ("value_error", "assertion_error"):
            return _reason(err, None, ())
    words: list[str] = []
    for err in errs:
        tag, ctx = str(err["loc"][depth]), err.get("ctx") or {}
        bound = next((f"{_BOUNDS[name]} {_number(ctx[name])}" for name in _BOUNDS if name in ctx), "")
        if len(err["loc"]) > depth + 1 or err["type"] not in _TYPE_WORDS and not bound:
            phrase = str(ctx["expected"]) if "expected" in ctx else _tag_words(tag) or "another kind of value"
        elif bound:
            phrase = f"{_tag_words(tag) or 'a value'} {bound}"
        else:
            phrase = _TYPE_WORDS[err["type"]]
        if phrase not in words:
            words.append(phrase)
    return "expected " + " or ".join(words)


def _number(value: Any) -> str:
    """``0.0`` -> ``0``, ``1e-3`` -> ``0.001``: a bound as a person writes it."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _tag_words(tag: str) -> str:
    """What a union branch's label says it takes, in words; empty if it does not say plainly."""
    name = tag.removeprefix("constrained-")
    if name.startswith("function-") and "," in name:  # function-after[check(), int]
        return _tag_words(name.rsplit(",", 1)[1].strip().removesuffix("]"))
    name = name.split("[")[0]
    words = {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false", "decimal": "a number"}
    words |= {"list": "a list", "tuple": "a list", "set": "a list", "frozenset": "a list", "dict": "a table"}
    return words.get(name, "a path" if "path" in tag else "")


def _model_at(model: type[BaseModel] | None, path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The (nested) model that holds the keys at ``path`` under ``model``, if any."""
    for part in path:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in get_args(annotation) if (found := _model_in(arg))), None)  # X | None, Annotated


def _closest(model: type[BaseModel] | None, loc: tuple[str | int, ...]) -> str:
    """The field name closest to the unknown key at ``loc``, dotted as given, or empty."""
    holder = _model_at(model, loc[:-1])
    if holder is None or not isinstance(loc[-1], str):
        return ""
    names = {name.lower(): name for name in holder.model_fields}
    found = difflib.get_close_matches(loc[-1].lower(), list(names), n=1, cutoff=0.6)
    return _key((*loc[:-1], names[found[0]])) if found else ""


def _tuple_length(model: type[BaseModel] | None, loc: tuple[str | int, ...]) -> int:
    """How many values the fixed-length tuple field at ``loc`` takes; 0 if it is not one."""
    holder = _model_at(model, loc[:-1]) if loc else None
    field = holder.model_fields.get(loc[-1]) if holder is not None and isinstance(loc[-1], str) else None
    annotation = field.annotation if field is not None else None
    candidates = [annotation, *get_args(annotation)] if get_origin(annotation) is not tuple else [annotation]
    for candidate in candidates:
        args = get_args(candidate)
        if get_origin(candidate) is tuple and args and Ellipsis not in args:
            return len(args)
    return 0

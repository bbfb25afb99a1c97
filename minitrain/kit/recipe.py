"""Recipes: plain Python files with a ``Config`` (a :class:`RecipeConfig`) and
``build(config, device) -> Components``; optionally ``PLUGINS``, a list of plugin specs
(``"checkpoint:every=2"``) or plugin objects enabled whenever the recipe runs.

A recipe is code and runs with the user's rights, like any script they execute.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from minitrain.engine.errors import MinitrainError, describe_validation_error
from minitrain.engine.state import Steps
from minitrain.kit.data import default_data_dir

BATCH_LIMIT = "expected a number of batches (an int >= 1) or a fraction of them (a float in (0, 1])"


class RecipeConfig(BaseModel):
    """Fields every recipe has; a recipe subclasses it to add its own and change defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an lr of inf or nan cannot train

    changeable_on_resume: ClassVar[frozenset[str]] = frozenset(
        {
            "epochs",
            "device",
            "data_dir",
            "nonfinite_loss",
            "max_steps",
            "max_time",
            "limit_train_batches",
            "limit_val_batches",
        }
    )
    """Fields a resumed run may change (``--resume auto --set epochs=12``): the change is applied and
    recorded. Any other field fixes what the checkpoint holds (model shape, batch size, seed, data,
    optimizer settings) and a change is refused. A recipe adds its own fields that can change
    (``changeable_on_resume = RecipeConfig.changeable_on_resume | {"eval_batch_size"}``)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data_dir: Path = Field(default_factory=default_data_dir)
    freeze: list[str] = Field(
        default_factory=list,
        description="glob patterns of parameters (or their "
        "modules) not to train, e.g. whiten,blocks.0 (see minitrain.kit.finetune)",
    )
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop", description="on a NaN/inf training loss: stop the run, or skip the step (a host sync per step)"
    )
    max_steps: int | None = Field(None, ge=1, description="stop once global_step (batches trained) reaches this")
    max_time: float | None = Field(
        None,
        gt=0,
        description="stop at the first step boundary after this many "
        "seconds of training (also [D:]HH:MM:SS); resumable, as after SIGTERM",
    )
    # int | float, not a union of constrained types: pydantic's smart union read "1.0" as the int 1
    # (one batch, not all of them). `_batch_limit` decides the type and the range.
    limit_train_batches: int | float | None = Field(
        None, description="train on this many batches per epoch (an int), or this fraction of them (a float: 1.0 = all)"
    )
    limit_val_batches: int | float | None = Field(
        None, description="validate on this many batches (an int), or this fraction of them (a float: 1.0 = all)"
    )

    # A recipe that changes a default (`epochs: int = 5`) redeclares the field and so drops the
    # constraints above; these validators are inherited whatever the subclass declares.
    # A validator of the same name in a subclass would replace one of them without a word (a
    # recipe's `_positive` for its widths once let `lr=-1` through): refused when the class is made.
    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        own = RecipeConfig.__pydantic_decorators__.field_validators
        hidden = sorted(name for name in own if name in vars(cls) and cls is not RecipeConfig)
        if hidden:
            raise TypeError(
                f"{cls.__name__} defines {', '.join(hidden)}, which would replace RecipeConfig's check of "
                f"{', '.join(f for name in hidden for f in own[name].info.fields)}; name it otherwise"
            )

    @field_validator("epochs", "batch_size")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if isinstance(value, (int, float)) and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("freeze", mode="before")
    @classmethod
    def _patterns_from_text(cls, value):  # `--set freeze=whiten,blocks.0` or a JSON list
        if isinstance(value, str):
            return (
                json.loads(value)
                if value.lstrip().startswith("[")
                else [part.strip() for part in value.split(",") if part.strip()]
            )
        return value

    @field_validator("max_time", mode="before")
    @classmethod
    def _seconds(cls, value):  # `--set max_time=01:30:00`, `2:00:00:00` (days) or seconds
        if isinstance(value, str) and ":" in value:
            try:
                parts = [float(part) for part in value.split(":")]
            except ValueError:
                raise ValueError("expected seconds or [D:]HH:MM:SS") from None
            if len(parts) > 4:
                raise ValueError("expected seconds or [D:]HH:MM:SS")
            return sum(part * unit for part, unit in zip(reversed(parts), (1, 60, 3600, 86400)))
        return value

    @field_validator("limit_train_batches", "limit_val_batches", mode="before")
    @classmethod
    def _batch_limit(cls, value):
        """Keep ``1`` (one batch) and ``1.0`` (every batch) apart, as PyTorch Lightning does: text
        with a point or an exponent is a fraction, other text a number of batches."""
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip()
            try:
                value = float(text) if any(c in text for c in ".eE") else int(text)
            except ValueError:
                value = None
        if isinstance(value, bool) or not (
            (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1)
        ):
            raise ValueError(BATCH_LIMIT)
        return value

    @field_validator("lr")
    @classmethod
    def _positive(cls, value: float) -> float:
        if isinstance(value, (int, float)) and not value > 0:
            raise ValueError("must be greater than 0")
        return value


@dataclass
class Components:
    """What a recipe's ``build`` returns: everything the Trainer needs.

    ``metrics``: the validation metrics (torchmetrics: a ``Metric``, a ``MetricCollection`` or a
    dict of them; default for a classifier: accuracy and confusion matrix, see
    :mod:`minitrain.engine.metrics`). ``eval_loss_fn``: the loss ``val_loss`` reports, if not
    ``loss_fn``. ``inputs``: what an exported model expects, ``{"size": [H, W], "mean": [...],
    "std": [...]}``, for a recipe whose loader does not say (``ImageLoader`` does).

    ``make_scheduler``: instead of ``scheduler``, a function of the run's
    :class:`~minitrain.engine.state.Steps` returning it. The trainer calls it once the loaders,
    run limits and plugins are known, so a schedule spans the steps the run really makes, and it
    keeps that size when the run is resumed.

    ``files``: text files for the run directory, by name (the image-folder recipe's
    ``split.csv``: which file went to training and which to validation), written with run.json
    at every start.

    ``head``: the module that maps features to classes (``"fc"``, ``"head"``). ``--init-from`` a
    run trained for other classes makes its tensors anew, and says so, instead of refusing them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: Iterable
    val_loader: Iterable | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    scheduler: Any = None
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    class_names: list[str] | None = None
    metrics: Any = None
    eval_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    inputs: dict[str, Any] | None = None
    make_scheduler: Callable[[Steps], Any] | None = None
    files: dict[str, str] | None = None
    head: str | None = None

    def check(self, recipe: str | Path) -> None:
        """Refuse, with one line, parts that the loop could only fail on later."""
        problems = []
        if not isinstance(self.model, torch.nn.Module):
            problems.append(f"model is a {type(self.model).__name__}, not a torch.nn.Module")
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            problems.append(f"optimizer is a {type(self.optimizer).__name__}, not a torch.optim.Optimizer")
        for name in ("train_loader", "val_loader"):
            loader = getattr(self, name)
            if not (loader is None and name == "val_loader") and not isinstance(loader, Iterable):
                problems.append(f"{name} is a {type(loader).__name__}, which cannot be iterated")
        if not callable(self.loss_fn) or (self.eval_loss_fn is not None and not callable(self.eval_loss_fn)):
            problems.append("loss_fn and eval_loss_fn must be callable")
        if self.scheduler is not None and not callable(getattr(self.scheduler, "step", None)):
            problems.append(f"scheduler is a {type(self.scheduler).__name__}, which has no step()")
        if self.make_scheduler is not None and not callable(self.make_scheduler):
            problems.append(f"make_scheduler is a {type(self.make_scheduler).__name__}, which cannot be called")
        if self.make_scheduler is not None and self.scheduler is not None:
            problems.append("both scheduler and make_scheduler are set; give one")
        if self.scheduler_interval not in ("epoch", "step"):
            problems.append(f"scheduler_interval must be 'epoch' or 'step', not {self.scheduler_interval!r}")
        if self.class_names is not None and not (
            isinstance(self.class_names, (list, tuple)) and all(isinstance(n, str) for n in self.class_names)
        ):
            problems.append("class_names must be a list of strings")
        if self.files is not None and not all(
            isinstance(name, str) and "/" not in name and isinstance(text, str) for name, text in self.files.items()
        ):
            problems.append("files must map plain file names to text")
        if self.head is not None and self.head not in dict(self.model.named_modules()):
            problems.append(f"head {self.head!r} is not a module of the model")
        if problems:
            raise MinitrainError(f"recipe {recipe}: build() returned {'; '.join(problems)}")


def load_recipe(path: str | Path) -> ModuleType:
    path = Path(path)
    if path.is_dir():
        raise MinitrainError(f"recipe {path} is a directory; give a recipe file, e.g. recipes/cifar10_quick.py")
    if not path.is_file():
        raise MinitrainError(f"recipe not found: {path}")
    name = f"minitrain_recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MinitrainError(f"recipe {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic and pickle look classes up by module
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # as for `python recipe.py`: modules beside the recipe import
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise MinitrainError(f"recipe {path}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except MinitrainError:
        raise
    except Exception as exc:
        raise MinitrainError(f"recipe {path}: failed to load: {type(exc).__name__}: {exc}") from None
    config = getattr(module, "Config", None)
    if not (isinstance(config, type) and issubclass(config, RecipeConfig)):
        raise MinitrainError(f"recipe {path}: needs a `Config` class derived from minitrain.RecipeConfig")
    if not callable(getattr(module, "build", None)):
        raise MinitrainError(f"recipe {path}: needs a `build(config, device)` function")
    return module


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "lr=0.1"]`` -> ``{"a": {"b": "1"}, "lr": "0.1"}`` (values stay strings)."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MinitrainError(f"--set {item!r}: expected KEY=VALUE")
        *parents, leaf = key.strip().split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MinitrainError(f"--set {item!r}: {part!r} was already set to a value")
        node[leaf] = value
    return nested


def _structured(values: dict[str, Any]) -> dict[str, Any]:
    """Parse list and dict values (``widths=[32,64,128]``) as JSON; leave the rest as strings
    for pydantic's lax mode, which reads numbers, booleans and paths from text."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out[key] = _structured(value)
        elif value.lstrip()[:1] in ("[", "{"):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise MinitrainError(f"--set {key}: not valid JSON: {exc.msg} (got {value!r})") from None
        else:
            out[key] = value
    return out


def make_config(
    recipe: ModuleType,
    overrides: Iterable[str] = (),
    base: dict[str, Any] | None = None,
    file: dict[str, Any] | None = None,
    file_name: str = "",
) -> RecipeConfig:
    """The recipe's defaults, or ``base`` (a resumed run's config), with the values of a
    ``--config`` ``file`` over them and ``--set`` overrides over both, validated like any input.
    An error names the file where the file alone is wrong, so a typo there is not blamed on --set."""
    values = _merged(_merged(base or {}, file or {}), _structured(parse_overrides(overrides)))
    try:
        return recipe.Config.model_validate(values)
    except ValidationError as exc:
        error = exc
        given = "--set"
        if file:
            try:
                recipe.Config.model_validate(_merged(base or {}, file))
                given = "--config and --set"
            except ValidationError as file_error:
                error, given = file_error, f"--config {file_name}".strip()
        where = given if base is None else f"the resumed run's config with {given}"
        hint = ""
        if any(err["type"] == "extra_forbidden" for err in error.errors()):  # a typo: say where the names are
            import shlex

            path = Path(getattr(recipe, "__file__", None) or "RECIPE")
            shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
            hint = f" (minitrain config {shlex.quote(str(shown))} lists the fields)"
        raise MinitrainError(f"{where}: {describe_validation_error(error, recipe.Config)}{hint}") from None


def as_overrides(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Config values as ``--set`` would give them: ``KEY=VALUE``, dotted keys for nested tables,
    lists and numbers as JSON."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}")
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A ``--config`` file's values: TOML, its top-level keys the recipe's fields (a table for a
    nested one), read with the standard library."""
    import tomllib

    path = Path(path)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise MinitrainError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise MinitrainError(f"--config {path}: a directory; give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise MinitrainError(f"--config {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise MinitrainError(f"--config {path}: {exc.strerror or exc}") from None


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged

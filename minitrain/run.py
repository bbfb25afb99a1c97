"""``minitrain run``: recipe + overrides + plugins -> a run directory and a fitted Trainer."""
from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from minitrain import checkpointing, distributed, finetune
from minitrain.device import resolve_device, seed_everything
from minitrain.errors import MinitrainError
from minitrain.files import write_atomic
from minitrain.plugins import PluginRequest, make_plugin_manager, parse_plugin_spec, register_plugin, resolve
from minitrain.recipe import Components, load_recipe, make_config
from minitrain.trainer import Trainer


def prepare(recipe_path: str | Path, overrides: list[str] = (), plugin_specs: list[str] = (),
            disabled: list[str] = (), run_dir: str | Path | None = None,
            resume: str | Path | None = None, init_from: str | Path | None = None,
            init_skip_mismatched: bool = False) -> Trainer:
    """Everything ``run`` does short of training: useful for tests and for driving a run by hand.

    ``resume`` (a checkpoint file, or ``"auto"`` for the newest in ``run_dir``) restores the
    trainer once recipe and plugins are in place; see :func:`minitrain.checkpointing.resume`.
    ``init_from`` starts the model from a checkpoint's weights (see :mod:`minitrain.finetune`);
    a resume, applied after it, wins. Under torchrun every rank calls this; rank 0 alone creates
    the run directory and writes to it."""
    if resume is not None:
        checkpointing.check_resume(resume, run_dir)  # before the recipe spends time building
    if init_from is not None and not Path(init_from).is_file():
        raise MinitrainError(f"--init-from: checkpoint not found: {init_from}")
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    config = make_config(recipe, overrides)
    requests: list[PluginRequest | object] = [
        parse_plugin_spec(p) if isinstance(p, str) else p for p in getattr(recipe, "PLUGINS", [])
    ]
    requests += [parse_plugin_spec(p) for p in plugin_specs]
    plugins = resolve(requests, set(disabled))

    device = distributed.init(resolve_device(config.device))
    run_dir = run_dir or Path("runs") / f"{recipe_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(distributed.from_main(str(run_dir)))  # one name, even if ranks' clocks differ
    if distributed.is_main():
        make_run_dir(run_dir)
    seed_everything(config.seed)
    try:
        parts = recipe.build(config, device)
    except MinitrainError:
        raise
    except Exception as exc:
        raise MinitrainError(f"recipe {recipe_path}: build() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(parts, Components):
        raise MinitrainError(f"recipe {recipe_path}: build() must return minitrain.Components, "
                             f"not {type(parts).__name__}")
    if init_from is not None:
        skipped = finetune.init_from(parts.model, init_from, init_skip_mismatched)
        if skipped and distributed.is_main():
            warnings.warn(f"--init-from: kept the recipe's initialisation for {'; '.join(skipped)}", stacklevel=2)
    finetune.freeze(parts.model, config.freeze)

    pm = make_plugin_manager()
    for name, plugin in plugins:
        register_plugin(pm, plugin, name)
    config_json = config.model_dump(mode="json")
    if distributed.is_main():
        _write_json(run_dir / "config.json", config_json)
        _write_json(run_dir / "run.json", {
            "recipe": str(recipe_path), "plugins": {name: _plugin_config(p) for name, p in plugins},
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "world_size": distributed.world_size(), "class_names": parts.class_names,
            "inputs": _inputs(parts.train_loader), "init_from": init_from and str(init_from),
        })
    trainer = Trainer(
        parts.model, parts.optimizer, parts.train_loader, parts.val_loader, epochs=config.epochs,
        loss_fn=parts.loss_fn, scheduler=parts.scheduler, scheduler_interval=parts.scheduler_interval,
        device=device, run_dir=str(run_dir), config=config_json, class_names=parts.class_names,
        plugin_manager=pm, nonfinite_loss=config.nonfinite_loss,
    )
    if resume is not None:
        checkpointing.resume(trainer, resume)
    return trainer


def make_run_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MinitrainError(f"run directory {path} is not writable: {exc.strerror or exc}") from None
    return path


def _inputs(loader: Any) -> dict[str, Any] | None:
    """What a model trained here expects, for ``minitrain export``: image size and the mean and
    std the loader normalises with, where the loader says (as :class:`ImageLoader` does)."""
    if not all(hasattr(loader, key) for key in ("input_size", "mean", "std")):
        return None
    return {"size": list(loader.input_size), "mean": list(loader.mean), "std": list(loader.std)}


def _plugin_config(plugin: Any) -> dict[str, Any]:
    config = getattr(plugin, "config", None)
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else {}


def _write_json(path: Path, data: Any) -> None:
    text = (json.dumps(data, indent=2) + "\n").encode()
    write_atomic(path, lambda file: file.write(text), what="run file")

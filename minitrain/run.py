"""``minitrain run``: recipe + overrides + plugins -> a run directory and a fitted Trainer."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from minitrain import checkpointing
from minitrain.device import resolve_device, seed_everything
from minitrain.errors import MinitrainError
from minitrain.plugins import PluginRequest, make_plugin_manager, parse_plugin_spec, register_plugin, resolve
from minitrain.recipe import Components, load_recipe, make_config
from minitrain.trainer import Trainer


def prepare(recipe_path: str | Path, overrides: list[str] = (), plugin_specs: list[str] = (),
            disabled: list[str] = (), run_dir: str | Path | None = None,
            resume: str | Path | None = None) -> Trainer:
    """Everything ``run`` does short of training: useful for tests and for driving a run by hand.

    ``resume`` (a checkpoint file, or ``"auto"`` for the newest in ``run_dir``) restores the
    trainer once recipe and plugins are in place; see :func:`minitrain.checkpointing.resume`."""
    if resume is not None:
        checkpointing.check_resume(resume, run_dir)  # before the recipe spends time building
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    config = make_config(recipe, overrides)
    requests: list[PluginRequest | object] = [
        parse_plugin_spec(p) if isinstance(p, str) else p for p in getattr(recipe, "PLUGINS", [])
    ]
    requests += [parse_plugin_spec(p) for p in plugin_specs]
    plugins = resolve(requests, set(disabled))

    run_dir = make_run_dir(run_dir or Path("runs") / f"{recipe_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    try:
        parts = recipe.build(config, device)
    except MinitrainError:
        raise
    except Exception as exc:
        raise MinitrainError(f"recipe {recipe_path}: build() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(parts, Components):
        raise MinitrainError(f"recipe {recipe_path}: build() must return minitrain.Components, "
                             f"not {type(parts).__name__}")

    pm = make_plugin_manager()
    for name, plugin in plugins:
        register_plugin(pm, plugin, name)
    config_json = config.model_dump(mode="json")
    _write_json(run_dir / "config.json", config_json)
    _write_json(run_dir / "run.json", {
        "recipe": str(recipe_path), "plugins": {name: _plugin_config(p) for name, p in plugins},
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
    })
    trainer = Trainer(
        parts.model, parts.optimizer, parts.train_loader, parts.val_loader, epochs=config.epochs,
        loss_fn=parts.loss_fn, scheduler=parts.scheduler, scheduler_interval=parts.scheduler_interval,
        device=device, run_dir=str(run_dir), config=config_json, class_names=parts.class_names,
        plugin_manager=pm,
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


def _plugin_config(plugin: Any) -> dict[str, Any]:
    config = getattr(plugin, "config", None)
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else {}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")

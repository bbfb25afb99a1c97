"""minitrain: a small training loop that emits typed events to pluggy hooks.

The package's face: what recipes, plugins and scripts import by name. The code lives in layers
(``minitrain.engine``, ``minitrain.kit``, ``minitrain.records``, ``minitrain.commands``). Names
are imported when first used, so that a plugin or a command that needs ``hookimpl`` does not pay
for the Trainer's imports (torchmetrics among them: seconds)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from minitrain.engine import __version__

if TYPE_CHECKING:
    from minitrain.engine import events
    from minitrain.engine.errors import MinitrainError
    from minitrain.engine.hookspecs import hookimpl, hookspec
    from minitrain.engine.state import Steps
    from minitrain.engine.surface import PluginConfig
    from minitrain.engine.trainer import Trainer
    from minitrain.kit.recipe import Components, RecipeConfig

_WHERE = {
    "events": "minitrain.engine.events",
    "MinitrainError": "minitrain.engine.errors",
    "hookimpl": "minitrain.engine.hookspecs",
    "hookspec": "minitrain.engine.hookspecs",
    "PluginConfig": "minitrain.engine.surface",
    "Steps": "minitrain.engine.state",
    "Trainer": "minitrain.engine.trainer",
    "Components": "minitrain.kit.recipe",
    "RecipeConfig": "minitrain.kit.recipe",
}

__all__ = ["Components", "MinitrainError", "PluginConfig", "RecipeConfig", "Steps", "Trainer", "__version__",
           "events", "hookimpl", "hookspec"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'minitrain' has no attribute {name!r}")
    module = importlib.import_module(_WHERE[name])
    value = module if name == "events" else getattr(module, name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

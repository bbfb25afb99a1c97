"""minitrain: a small training loop that emits typed events to pluggy hooks.

The package's face: what recipes, plugins and scripts import by name. The code lives in layers
(``minitrain.engine``, ``minitrain.kit``, ``minitrain.records``, ``minitrain.commands``)."""

from minitrain.engine import __version__, events
from minitrain.engine.errors import MinitrainError
from minitrain.engine.hookspecs import hookimpl, hookspec
from minitrain.engine.surface import PluginConfig
from minitrain.engine.trainer import Trainer
from minitrain.kit.recipe import Components, RecipeConfig

__all__ = [
    "Components",
    "MinitrainError",
    "PluginConfig",
    "RecipeConfig",
    "Trainer",
    "__version__",
    "events",
    "hookimpl",
    "hookspec",
]

"""minitrain: a small training loop that emits typed events to pluggy hooks."""
from minitrain import events
from minitrain.errors import MinitrainError
from minitrain.hookspecs import hookimpl, hookspec
from minitrain.plugins import PluginConfig
from minitrain.recipe import Components, RecipeConfig
from minitrain.trainer import Trainer

__all__ = ["Components", "MinitrainError", "PluginConfig", "RecipeConfig", "Trainer", "events", "hookimpl", "hookspec"]
__version__ = "0.1.0"

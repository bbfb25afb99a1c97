"""Fine-tuning: a new run that starts from another run's weights, with some layers frozen.

``minitrain run RECIPE --init-from CHECKPOINT`` copies the checkpoint's model weights into the
recipe's freshly built model, and nothing else: optimizer, schedule, progress, random state and
plugin state start anew, as the new task needs (``--resume`` is the way to continue a run). A
tensor that the new model lacks or shapes differently (a classifier head for another number of
classes) is an error naming the first few by name and shape (``--debug`` lists every one),
unless it lies in the recipe's ``head`` (``Components.head``), which is then made anew, or the run
asks to skip those (``--init-skip-mismatched``): they then keep the recipe's initialisation. A
checkpoint that fits none of the model's parameters is refused either way.

Freezing is a recipe config field every recipe has, ``freeze``: glob patterns matched against
parameter names and their enclosing modules (``--set freeze=whiten,blocks.0``).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from minitrain.engine import checkpointing
from minitrain.engine.errors import MinitrainError


def init_from(
    model: torch.nn.Module, path: str | Path, skip_mismatched: bool = False, head: str | None = None
) -> list[str]:
    """Load the weights of checkpoint ``path`` into ``model``. Returns what was skipped (empty
    when everything fitted); raises, naming the first few misfits (``--debug`` shows every one, in
    the error's notes), unless ``skip_mismatched`` or they all lie in module ``head``. A checkpoint
    none of whose tensors fits a parameter of the model is refused even then: skipping everything
    would train from scratch."""
    saved = checkpointing.load(path)["trainer"]["model"]
    own = model.state_dict()
    misfits = checkpointing.misfits(own, saved)
    in_head = [misfit for misfit in misfits if head is not None and misfit.startswith(f"{head}.")]
    parameters = [name for name, _ in model.named_parameters()]
    if misfits and parameters and not any(_fits(own, name, saved[name]) for name in parameters if name in saved):
        raise _misfit_error(
            f"--init-from {path}: probably the wrong checkpoint: none of the model's {len(parameters)} parameters "
            f"fits it; {len(misfits)} tensor(s) do not fit: {{shown}}",
            misfits,
        )
    elsewhere = [misfit for misfit in misfits if misfit not in in_head]
    if elsewhere and not skip_mismatched:
        raise _misfit_error(
            f"--init-from {path}: {len(elsewhere)} tensor(s) do not fit the model: {{shown}} "
            "(--init-skip-mismatched starts them from the recipe's initialisation instead)",
            elsewhere,
        )
    load_matching(model, saved)
    return misfits


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load the tensors of ``state`` whose name and shape fit ``model``; returns the names of the
    model's tensors left as they were (a head for other classes, say)."""
    own = model.state_dict()
    fitting = {name: tensor for name, tensor in state.items() if _fits(own, name, tensor)}
    model.load_state_dict(fitting, strict=False)
    return [name for name in own if name not in fitting]


def _fits(own: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> bool:
    return name in own and tensor.shape == own[name].shape


SHOWN_MISFITS = 3
"""How many misfits an ``--init-from`` error names; ``--debug`` shows all of them."""


def summary(misfits: list[str], shown: int = SHOWN_MISFITS) -> str:
    """The first ``shown`` misfits and how many more: for one line (an error, a warning)."""
    text = "; ".join(misfits[:shown])
    return text + (f"; and {len(misfits) - shown} more, which --debug lists" if len(misfits) > shown else "")


def _misfit_error(template: str, misfits: list[str]) -> MinitrainError:
    """The one line ``template``, its ``{shown}`` the :func:`summary` of the misfits; the full
    list is the error's note, which ``--debug`` (the traceback) shows, one tensor a line."""
    error = MinitrainError(template.replace("{shown}", summary(misfits)))
    error.add_note("every tensor that does not fit:\n" + "\n".join(f"  {misfit}" for misfit in misfits))
    return error


def freeze(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Turn off gradients for every parameter whose name, or the name of a module enclosing it,
    matches one of the glob ``patterns``; returns the frozen names. A pattern that matches
    nothing is an error (a typo would otherwise train everything). The optimizer, built before,
    simply finds no gradient for them; BatchNorm statistics of frozen layers still update."""
    patterns = list(patterns)
    names = [name for name, _ in model.named_parameters()]
    matches = {pattern: [n for n in names if _matches(n, pattern)] for pattern in patterns}
    unmatched = [pattern for pattern, found in matches.items() if not found]
    if unmatched:
        raise MinitrainError(
            f"freeze: {', '.join(map(repr, unmatched))} match(es) no parameter "
            f"(names look like {', '.join(names[:4])}, ...)"
        )
    frozen = {name for found in matches.values() for name in found}
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return sorted(frozen)


def _matches(name: str, pattern: str) -> bool:
    """``blocks.0`` matches ``blocks.0.conv.weight``: the name or one of its dotted prefixes."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))

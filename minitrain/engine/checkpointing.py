"""Checkpoint files: what one holds, how it is written so that a crash never leaves a broken file
where a good one was, how it is read back safely, and how ``--resume`` finds one.

*When* to save is the ``checkpoint`` plugin's business; this module is the file format, shared by
that plugin and by ``minitrain run --resume`` (the core never imports a plugin by name).

A checkpoint is ``{"header": {...}, "trainer": Trainer.state_dict()}``, written with
``torch.save`` and read with ``torch.load(weights_only=True)``: tensors and plain containers
only, so opening a file someone sent you cannot run their code. The same holds for what a
plugin's ``state_dict()`` returns: numbers, strings, tensors, lists, tuples and dicts of them.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minitrain.engine import __version__, distributed
from minitrain.engine.errors import MinitrainError, one_line
from minitrain.engine.files import write_atomic

if TYPE_CHECKING:
    from minitrain.engine.trainer import Trainer

FORMAT = "minitrain-checkpoint"
FORMAT_VERSION = 1
DEFAULT_DIR = "checkpoints"
"""The checkpoint folder inside a run directory, unless a plugin says otherwise (see
:func:`checkpoint_dirs`)."""


def header(trainer: Trainer, **extra: Any) -> dict[str, Any]:
    """What a file says about itself: format, versions, the exact position it resumes at
    (``epoch`` full epochs done plus ``batch_idx`` batches of the next), the recipe config the
    run was using and its plugins with their options (a resume starts from both), and its
    number of processes, plus ``extra``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "minitrain_version": __version__,
        "torch_version": str(torch.__version__),
        "epoch": trainer.state.epoch,
        "batch_idx": trainer.state.batch_idx,
        "global_step": trainer.state.global_step,
        "config": trainer.config,
        "plugins": trainer.recorded_plugins,
        "world_size": distributed.world_size(),
        **extra,
    }


def save(path: str | Path, header: dict[str, Any], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (:func:`minitrain.engine.files.write_atomic`): readers see the old
    file or the new one, never half of one; a failure leaves ``path`` as it was and raises
    MinitrainError."""
    write_atomic(path, lambda file: torch.save({"header": header, "trainer": state}, file), what="checkpoint")


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete what saves that never finished left behind: the temporary file of a process killed
    between writing and renaming. Nothing reads these (``--resume auto`` looks at ``*.pt``), but
    they would pile up. Returns the files removed."""
    removed = []
    for tmp in Path(folder).glob(".*.pt.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU. Anything that is not a complete minitrain checkpoint (a
    truncated copy, another program's file, a pickle carrying code) is one MinitrainError that
    names the file."""
    path = Path(path)
    if not path.is_file():
        raise MinitrainError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = _refused(exc)
        if refused:
            raise MinitrainError(
                f"checkpoint {path} holds objects that safe loading refuses ({refused}); "
                "only tensors and plain data are loaded"
            ) from None
        raise MinitrainError(
            f"checkpoint {path} is unreadable: truncated, corrupt or not a checkpoint ({one_line(exc)})"
        ) from None
    head = checkpoint.get("header") if isinstance(checkpoint, dict) else None
    if not isinstance(head, dict) or head.get("format") != FORMAT or "trainer" not in checkpoint:
        raise MinitrainError(f"{path} is not a minitrain checkpoint (no minitrain header)")
    if head.get("format_version", 0) > FORMAT_VERSION:
        raise MinitrainError(
            f"checkpoint {path} has format {head['format_version']}, newer than this "
            f"minitrain ({__version__}) reads ({FORMAT_VERSION}); upgrade minitrain"
        )
    return checkpoint


def read_header(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's header alone, or None when the file is not a readable minitrain checkpoint.
    Memory-mapped: the tensors are not read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    head = checkpoint.get("header") if isinstance(checkpoint, dict) else None
    return head if isinstance(head, dict) and head.get("format") == FORMAT else None


def checkpoint_dirs(run_dir: str | Path | None, plugins: list[Any]) -> list[Path]:
    """Where a run keeps checkpoints: each plugin's ``checkpoint_dir(run_dir)``, or
    ``<run_dir>/checkpoints`` when no plugin declares one."""
    if run_dir is None:
        raise MinitrainError("--resume auto needs a run directory to look in (--run-dir)")
    dirs = [
        Path(plugin.checkpoint_dir(run_dir)) for plugin in plugins if callable(getattr(plugin, "checkpoint_dir", None))
    ]
    return dirs or [Path(run_dir) / DEFAULT_DIR]


def newest(folders: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The most recently written checkpoint in ``folders`` that loads, with its contents; an
    unreadable newer file is skipped with a warning (a copy cut short by a full disk, say)."""
    files = sorted(
        (p for folder in folders for p in folder.glob("*.pt") if p.is_file()),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    for path in files:
        try:
            return path, load(path)
        except MinitrainError as exc:
            warnings.warn(f"--resume auto: skipping {exc}", stacklevel=2)
    return None


def check_resume(spec: str | Path, run_dir: str | Path | None) -> None:
    """Refuse a ``--resume`` that cannot work before any time goes into building the recipe."""
    if str(spec) == "auto":
        if run_dir is None:
            raise MinitrainError("--resume auto needs --run-dir: the directory of the run to continue")
    elif Path(spec).is_dir():
        raise MinitrainError(
            f"--resume {spec} is a directory; give a checkpoint file, or --run-dir {spec} "
            "--resume auto for the newest in a run directory"
        )
    elif not Path(spec).is_file():
        raise MinitrainError(f"checkpoint not found: {spec}")


def find(spec: str | Path, folders: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``spec`` names, loaded: a file, or ``"auto"`` for the newest readable one in
    ``folders`` (None when there is none). Under torchrun rank 0 picks the file and every rank
    loads that one."""
    if str(spec) != "auto":
        return Path(spec), load(spec)
    found = newest(folders) if distributed.is_main() else None
    chosen = distributed.from_main(found and str(found[0]))
    if chosen is None:
        return None
    return found or (Path(chosen), load(chosen))


def any_files(folders: list[Path]) -> bool:
    """Whether ``folders`` hold a checkpoint file at all, readable or not."""
    return any(path.is_file() for folder in folders for path in folder.glob("*.pt"))


def restore(trainer: Trainer, path: Path, checkpoint: dict[str, Any]) -> None:
    """Put ``trainer`` where ``checkpoint`` (read from ``path``) left its run."""
    saved = checkpoint["trainer"].get("model") if isinstance(checkpoint["trainer"], dict) else None
    wrong = misfits(trainer.module.state_dict(), saved) if isinstance(saved, dict) else []
    if wrong:
        raise MinitrainError(
            f"checkpoint {path} is for a different model: {len(wrong)} tensor(s) do not fit: " + "; ".join(wrong)
        )
    try:
        trainer.load_state_dict(checkpoint["trainer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise MinitrainError(f"checkpoint {path} does not fit this recipe ({one_line(exc)})") from None
    trainer.resumed_from = str(path)
    written, now = checkpoint["header"].get("world_size"), distributed.world_size()
    if written is not None and written != now and distributed.is_main():
        warnings.warn(
            f"--resume: {path} was written by {_processes(written)} and this run has {_processes(now)}: "
            "each process's share of the data and the batches differ, so the steps from here are not "
            "those the run would have taken (an epoch resumed mid-way reports an estimated train_loss)",
            stacklevel=2,
        )


def _processes(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


def resume(trainer: Trainer, spec: str | Path) -> Path | None:
    """Restore ``trainer`` from ``spec``: a checkpoint file, or ``"auto"`` for the newest readable
    one in the run's checkpoint folder. Returns the file used, or None when ``auto`` found none.
    ``minitrain run`` does more (the run's config comes from the checkpoint, see
    :mod:`minitrain.commands.start`); this is the part a trainer built by hand needs."""
    found = find(spec, checkpoint_dirs(trainer.run_dir, [p for _, p in trainer.pm.list_name_plugin()]))
    if found is None:
        return None
    restore(trainer, *found)
    return found[0]


def misfits(model: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Each tensor of the ``model`` state that the ``saved`` one shapes differently or lacks, and
    each saved tensor the model lacks, named with its shape (torch's own message is a paragraph
    and stops at the first kind of problem)."""
    found = [
        f"{name} {_shape(saved[name])} in the checkpoint, {_shape(value)} in the model"
        for name, value in model.items()
        if name in saved and _shape(saved[name]) != _shape(value)
    ]
    found += [f"{name} {_shape(value)} not in the checkpoint" for name, value in model.items() if name not in saved]
    found += [f"{name} {_shape(value)} not in the model" for name, value in saved.items() if name not in model]
    return found


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "(" + ", ".join(map(str, value.shape)) + ")"
    return type(value).__name__


def _refused(exc: Exception) -> str | None:
    """What ``weights_only`` refused to unpickle, if that is why loading failed. torch says it in a
    paragraph of advice; the one line naming the object is enough."""
    if isinstance(exc, pickle.UnpicklingError):
        for line in str(exc).splitlines():
            if "WeightsUnpickler error:" in line:
                return line.split("WeightsUnpickler error:", 1)[1].split(". ")[0].strip()
    return None

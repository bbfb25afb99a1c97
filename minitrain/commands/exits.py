"""How a command ends: its exit code, and the one line that says why.

| code | meaning |
|---|---|
| 0 | done (a finished run resumed again included: nothing to train is no error) |
| 1 | a run failed while training (:class:`RunFailed`; the traceback is in the run's errors.log) |
| 2 | bad input, found before any work (:class:`~minitrain.engine.errors.MinitrainError`) |
| 130 / 143 | stopped by Ctrl-C / SIGTERM |

``--debug`` shows the traceback instead of the line.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from minitrain.engine.errors import ERROR_LOG, MinitrainError, RunComplete, one_line

if TYPE_CHECKING:
    from minitrain.engine.trainer import Trainer

BAD_INPUT, FAILED, INTERRUPTED = 2, 1, 130


class RunFailed(Exception):
    """Training started and then failed; the message is the one line to print."""


def call(command: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run ``command(args)``; its exit code, every error and warning said in one line each."""
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return command(args) or 0
    except RunComplete as exc:  # a finished run resumed again (a requeue, a restart): nothing to do
        from minitrain.engine import distributed

        if distributed.is_main():
            print(f"minitrain: {exc}")
        distributed.leave()
        return 0
    except (MinitrainError, RunFailed) as exc:
        if getattr(args, "debug", False):
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line
        print(f"minitrain: error: {message}", file=sys.stderr)
        return FAILED if isinstance(exc, RunFailed) else BAD_INPUT
    except KeyboardInterrupt:
        if not os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun the launcher says it, once
            print("minitrain: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `minitrain runs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    finally:
        warnings.showwarning = shown


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"minitrain: warning: {message}", file=sys.stderr)


def failure(trainer: Trainer, exc: Exception) -> str:
    """One line for a run that failed while training: its own message for minitrain's errors
    (a non-finite loss), else where it happened and what was raised."""
    log = trainer.run_dir / ERROR_LOG if trainer.run_dir else None
    where = f" (traceback in {log})" if log and log.exists() else ""
    if isinstance(exc, MinitrainError):
        return f"{exc}{where}"
    state = trainer.state
    return (
        f"training failed in epoch {trainer.epoch_number}, step {state.global_step + state.in_step}: "
        f"{one_line(exc)}{where}; --debug shows the traceback"
    )

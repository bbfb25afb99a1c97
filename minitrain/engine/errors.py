"""The exceptions a run ends with on purpose, and how any error becomes one line. MinitrainError is
what the CLI turns into a single error line (exit code 2, no traceback); TrainingInterrupted,
into a line saying how to resume."""

from __future__ import annotations

import signal

from pydantic import ValidationError


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


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``key: reason (got value)``."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(config)"
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err['input']!r})"
        parts.append(f"{key}: {reason}{got}")
    return "; ".join(parts)

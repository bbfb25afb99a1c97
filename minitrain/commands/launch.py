"""``minitrain run --nproc N``: one run on N processes of this machine, through torchrun's own
launcher, in this process (``torchrun --standalone --nproc_per_node=N -m minitrain ARGV`` with
``--nproc`` removed)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from minitrain.commands.exits import RunFailed
from minitrain.commands.start import NO_CHECKPOINT, Plan, RunRequest, plan, resume_command
from minitrain.engine import checkpointing, distributed, lock
from minitrain.engine.errors import MinitrainError


def run(request: RunRequest, args: argparse.Namespace) -> int:
    """Run this command on N processes through torchrun's own launcher, in this process
    (``torchrun --standalone --nproc_per_node=N -m minitrain ARGV`` with ``--nproc`` removed),
    after checking here what can be checked (recipe, config, plugins, run directory, the checkpoint
    to resume), so that bad input is one line rather than one per process. On Ctrl-C the launcher
    stops the workers and this process says how to resume from the newest checkpoint, as a
    single-process run does. ``--max-restarts R`` is torchrun's: when a worker fails, the launcher
    restarts the group, and the restarted workers resume from the newest checkpoint by themselves
    (:func:`minitrain.commands.start.plan`); once R restarts are spent, one line says so, where the last
    checkpoint is and how to resume."""
    from torch.distributed import run as torchrun  # imports the launcher's loggers
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if args.nproc < 1:
        raise MinitrainError(f"--nproc must be at least 1, not {args.nproc}")
    if (args.max_restarts or 0) < 0:
        raise MinitrainError(f"--max-restarts must be 0 or more, not {args.max_restarts}")
    if distributed.launched():
        raise MinitrainError("--nproc: this process was already started by torchrun; drop --nproc")
    planned = plan(request)
    if lock.in_use(planned.run_dir):  # before N processes start, to be refused one by one
        raise MinitrainError(lock.busy(planned.run_dir))
    rest = _without(args.argv, "--nproc", "--max-restarts")
    if args.run_dir is None:  # the name chosen here, so that the resume hint can name it
        rest += ["--run-dir", str(planned.run_dir)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))  # cores shared out
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.distributed.elastic")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # its warnings narrate the shutdown that this process reports in one line
        logger.setLevel(logging.ERROR)
    restarts = args.max_restarts or 0
    shared = os.environ.get(distributed.SHARED_STORE_ENV)
    if (
        restarts and shared is None
    ):  # else a restarted group finds the last one's addresses (minitrain.engine.distributed)
        os.environ[distributed.SHARED_STORE_ENV] = "1"
    try:
        torchrun.run(
            torchrun.parse_args(
                [
                    "--standalone",
                    f"--nproc_per_node={args.nproc}",
                    f"--max-restarts={restarts}",
                    "-m",
                    "minitrain",
                    *rest,
                ]
            )
        )
    except SignalException as exc:
        print(f"minitrain: stopped by {exc.sigval.name}; {_resume_hint(args, planned)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:  # the launcher gives up only once every restart is spent
        rank, failure = exc.get_first_failure()
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        spent = f" and {restarts} restart{'s' if restarts != 1 else ''} happened (--max-restarts {restarts})"
        raise RunFailed(
            f"rank {rank} of {args.nproc} failed ({how}; its output is above){spent if restarts else ''}; "
            f"{_resume_hint(args, planned, last=True)}"
        ) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if restarts and shared is None:
            os.environ.pop(distributed.SHARED_STORE_ENV, None)
    return 0


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` less each of ``options`` (``--opt V`` or ``--opt=V``) and its value."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            rest.append(arg)
    return rest


def _resume_hint(args: argparse.Namespace, planned: Plan, last: bool = False) -> str:
    folders = checkpointing.checkpoint_dirs(planned.run_dir, [p for _, p in planned.plugins])
    found = checkpointing.newest(folders)
    if found is None:
        return NO_CHECKPOINT
    step = found[1]["header"]["global_step"]
    where = f"the last checkpoint is {found[0]} (step {step})" if last else f"the newest checkpoint is of step {step}"
    return f"{where}; resume with: {shlex.join(resume_command(args, planned.run_dir))}"

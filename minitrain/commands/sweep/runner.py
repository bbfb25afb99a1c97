"""Running a sweep: K workers, each starting trials one after another until the study has its N.

Each trial is an ordinary ``minitrain run`` in a child process of its own, in its own run
directory (``runs/sweeps/NAME/trial-0007/``), with the sampled values as ``--set`` overrides and
the ``prune`` plugin added; its console output goes to ``runs/sweeps/NAME/logs/trial-0007.log``.
Children are forked from a server process that has imported torch and minitrain once
(multiprocessing's forkserver), so a trial starts in a fraction of a second instead of the
seconds a fresh interpreter spends importing torch, yet runs in a process of its own that can
crash, or be killed, without taking the sweep with it.

Only this process talks to Optuna: a worker thread asks the study for a trial, starts the child,
answers its ``prune`` plugin after every validation (``trial.report``, ``trial.should_prune``)
and tells the study the outcome when the child exits.

A Python script that starts a sweep itself (``minitrain.commands.cli.main(["sweep", ...])``) guards its
body with ``if __name__ == "__main__":``, as multiprocessing requires of any program that starts
processes this way: each child imports the main module.
"""

from __future__ import annotations

import importlib.metadata
import math
import multiprocessing
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from minitrain.commands.sweep.space import Dimension
from minitrain.commands.sweep.study import (
    HEARTBEAT_S,
    counts,
    fail_lost_trials,
    optuna,
    orphan_wait,
    owner,
    taken,
    trial_dir_name,
)
from minitrain.engine.errors import MinitrainError, one_line
from minitrain_plugins import prune

INTERRUPTED_CODES = {130: "SIGINT", 143: "SIGTERM", -signal.SIGINT: "SIGINT", -signal.SIGTERM: "SIGTERM"}
KILLED_GRACE_S = 1.0
"""A trial killed outright (SIGKILL) is recorded as failed only this long after: where the kill
was aimed at the whole sweep (its process group), it reaches this process meanwhile and nothing
is recorded, so that the next sweep takes the trial for lost and runs its values again."""


@dataclass
class SweepPlan:
    """A sweep as asked for and checked (minitrain.commands.sweep.prepare)."""

    name: str
    folder: Path
    storage_url: str | None
    recipe_path: str
    recipe: ModuleType
    space: list[Dimension]
    fixed: list[str]
    plugins: list[str]
    disabled: list[str]
    monitor: str
    direction: str
    trials: int
    workers: int
    sampler_name: str
    pruner_name: str
    study: Any = None
    command: list[str] = field(default_factory=list)  # the command that continues the sweep
    gpus: list[str] = field(default_factory=list)
    threads: int = 1


@dataclass
class TrialRun:
    trial: Any  # optuna.trial.Trial
    params: dict[str, Any]
    overrides: list[str]
    run_dir: Path
    log: Path


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server preloading torch, minitrain and the first-party plugins
    (third-party ones are left to each run, which may be told not to load them)."""
    ctx = multiprocessing.get_context("forkserver")
    first_party = {
        ep.module
        for ep in importlib.metadata.entry_points(group="minitrain")
        if ep.dist is not None and ep.dist.name == "minitrain"
    }
    ctx.set_forkserver_preload(
        ["torch", "torch._dynamo", "minitrain.commands.start", "minitrain.commands.cli", *sorted(first_party)]
    )
    return ctx


def warm_up() -> threading.Thread:
    """Start the forkserver (importing torch takes seconds) in the background, while the sweep
    checks its input and opens the study; ``Sweep.run`` waits for it before the first trial, so
    that no trial's time includes it."""
    ctx = _forkserver()

    def start() -> None:
        process = ctx.Process(target=os.getpid, name="minitrain-sweep-warm-up")
        process.start()
        process.join()

    thread = threading.Thread(target=start, name="sweep-warm-up", daemon=True)
    thread.start()
    return thread


def _trial_main(argv: list[str], env: dict[str, str], cwd: str, log: str, conn, threads: int) -> None:
    """The body of a trial's process: ``minitrain run ...`` in the sweep's directory and environment,
    with its output in ``log`` and ``conn`` (its end of the channel) named in the environment."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.environ[prune.CHANNEL_ENV] = str(conn.fileno())
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import torch

    torch.set_num_threads(threads)  # OMP_NUM_THREADS was read when the server imported torch
    from minitrain.commands import run

    code = run.run_command(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class Sweep:
    def __init__(self, plan: SweepPlan, warming: threading.Thread | None = None):
        self.plan = plan
        self.study = plan.study
        self.lock = threading.Lock()  # asking for trials and talking to the study
        self.print_lock = threading.Lock()
        self.stopping: str | None = None  # the signal that stops the sweep
        self.bad_input: str | None = None  # a trial that could not start: every other would fail alike
        self.processes: dict[int, multiprocessing.context.ForkServerProcess] = {}
        self.started = 0
        self.ctx = _forkserver()
        self.warming = warming
        self.state = optuna().trial.TrialState

    # --- the sweep ------------------------------------------------------------------------

    def run(self) -> int:
        plan = self.plan
        threads = [
            threading.Thread(target=self._worker, args=(i,), name=f"sweep-worker-{i}", daemon=True)
            for i in range(plan.workers)
        ]
        self.running_workers = len(threads)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            if self.warming is not None:
                self.warming.join()
            for thread in threads:
                thread.start()
            self._wait(threads)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self.bad_input:
            raise MinitrainError(self.bad_input)
        if self.stopping:
            return self._stopped()
        return self._summary()

    def _wait(self, threads: list[threading.Thread]) -> None:
        """Wait for the workers. Ctrl-C reaches the trials too (they share the terminal's process
        group) and each stops at its next step boundary: start no new trial, let them stop, and
        record them. A second Ctrl-C kills the trials still running."""
        interrupts = 0
        while True:
            try:
                # Polled, not Thread.join(): a join that Ctrl-C interrupts may take a thread that
                # is still running for ended (CPython 3.11), and the sweep would exit under it.
                while self.running_workers:
                    time.sleep(0.1)
                for thread in threads:
                    thread.join()
                return
            except KeyboardInterrupt:
                interrupts += 1
                self.stopping = self.stopping or "SIGINT"
                running = [p for p in list(self.processes.values()) if p.is_alive()]
                if interrupts == 1:
                    self._say(
                        f"stopping: no new trials; {len(running)} running trial(s) stop at their next step "
                        "(Ctrl-C again kills them)"
                    )
                else:
                    for process in running:
                        process.kill()

    def _on_sigterm(self, signum, frame) -> None:
        """SIGTERM is meant for this process alone: pass it on to the trials, which stop at
        their next step boundary, and start no new one."""
        self.stopping = "SIGTERM"
        for process in list(self.processes.values()):
            if process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGTERM)

    def _stopped(self) -> int:
        self._say(
            f"minitrain: sweep {self.plan.name} stopped by {self.stopping}; trials cut short will run again "
            f"in new directories. Continue with: {shlex.join(self.plan.command)}",
            err=True,
        )
        return 130 if self.stopping == "SIGINT" else 143

    def _summary(self) -> int:
        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if counts(t)]
        tally = {state: sum(1 for t in done if t.state.name == state) for state in ("COMPLETE", "PRUNED", "FAIL")}
        self._say(
            f"done: study {self.plan.name} has {len(done)} trials ({tally['COMPLETE']} complete, "
            f"{tally['PRUNED']} pruned, {tally['FAIL']} failed); this command ran {self.started}"
        )
        complete = [t for t in done if t.state == self.state.COMPLETE]
        if not complete:
            self._say(
                f"minitrain: error: no trial of study {self.plan.name} completed; see the trials' errors with: "
                f"minitrain sweep show {self.plan.name}",
                err=True,
            )
            return 1
        best = self.study.best_trial
        self._say(f"best: trial {best.number}, {self.plan.monitor} {best.value:.4g} with {_short(best.params)}")
        self._say(
            f"  reproduce it: minitrain sweep best {self.plan.name}; all trials: minitrain sweep show {self.plan.name}"
        )
        return 0

    def _say(self, text: str, err: bool = False) -> None:
        with self.print_lock:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)

    # --- one worker -------------------------------------------------------------------------

    def _worker(self, index: int) -> None:
        try:
            env = self._environment(index)
            while True:
                run = self._next_trial()
                if run is None:
                    return
                if run is not False:
                    self._run(run, env)
        finally:
            with self.lock:
                self.running_workers -= 1

    def _environment(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self.plan.threads))
        env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
        if self.plan.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.plan.gpus[index % len(self.plan.gpus)]
        return env

    def _next_trial(self) -> TrialRun | None | Literal[False]:
        """The next trial to run, None when the study has enough (or the sweep stops), or False
        for a trial that was recorded failed without running (its values were refused)."""
        from minitrain.kit.recipe import make_config

        plan, study = self.plan, self.study
        while True:
            with self.lock:
                if self.stopping or self.bad_input:
                    return None
                for number in fail_lost_trials(study):
                    self._say(
                        f"trial {number} was running when its sweep stopped: marked failed, its values queued again"
                    )
                if taken(study) < plan.trials:
                    break
                wait = orphan_wait(study)  # a trial whose sweep was killed as it asked for it may yet be lost
                if not wait:
                    return None
            time.sleep(wait)
        with self.lock:
            trial = study.ask()
            if taken(study, before=trial.number) >= plan.trials:  # another process asked first
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=self.state.FAIL)
                return None
            params = {dim.key: dim.suggest(trial) for dim in plan.space}
            overrides = [dim.override(params[dim.key]) for dim in plan.space]
            name = trial_dir_name(trial.number)
            for key, value in {**owner(), "run_dir": name, "overrides": overrides}.items():
                trial.set_user_attr(key, value)
            try:
                make_config(plan.recipe, [*plan.fixed, *overrides])
            except MinitrainError as exc:  # a combination of values the recipe refuses
                error = str(exc).removeprefix("--set: ")
                trial.set_user_attr("error", error)
                study.tell(trial, state=self.state.FAIL)
                self._say(f"trial {trial.number} failed: its values are refused: {error}")
                return False
            self.started += 1
            return TrialRun(trial, params, overrides, plan.folder / name, plan.folder / "logs" / f"{name}.log")

    def _argv(self, run: TrialRun) -> list[str]:
        plan = self.plan
        pruning = (
            f"{prune.NAME}:study={plan.name},trial={run.trial.number},monitor={plan.monitor},direction={plan.direction}"
        )
        return [
            "run",
            plan.recipe_path,
            *(f"--set={o}" for o in [*plan.fixed, *run.overrides]),
            *(f"--plugin={p}" for p in plan.plugins),
            f"--plugin={pruning}",
            *(f"--no-plugin={d}" for d in plan.disabled),
            "--run-dir",
            str(run.run_dir),
        ]

    def _run(self, run: TrialRun, env: dict[str, str]) -> None:
        number = run.trial.number
        run.log.parent.mkdir(parents=True, exist_ok=True)
        self._say(f"trial {number} started: {_short(run.params)} ({run.run_dir})")
        ours, theirs = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_trial_main,
            name=f"minitrain-trial-{number}",
            args=(self._argv(run), env, os.getcwd(), str(run.log), theirs, self.plan.threads),
        )
        started = time.monotonic()
        with self.lock:
            if self.stopping:  # asked for before Ctrl-C, not yet started: it runs again later
                self._interrupted(run.trial, run.params, self.stopping)
                return
            process.start()
            self.processes[number] = process
        theirs.close()
        pruned, end = self._follow(run.trial, ours, process)
        process.join()
        ours.close()
        if process.exitcode is not None and process.exitcode < 0 and process.exitcode not in INTERRUPTED_CODES:
            time.sleep(KILLED_GRACE_S)
        with self.lock:
            self.processes.pop(number, None)
            self._record(run, process.exitcode, pruned, end, time.monotonic() - started)

    def _follow(self, trial, conn, process) -> tuple[bool, dict[str, Any] | None]:
        """Answer the trial's reports until it exits; say it is alive now and then."""
        pruned, end, beat = False, None, time.monotonic()
        while True:
            try:
                if conn.poll(1.0):
                    message = prune.receive(conn)
                    if message.get("kind") == "report":
                        with self.lock:
                            trial.report(float(message["value"]), step=int(message["epoch"]))
                            rejected = not message.get("final") and bool(trial.should_prune())
                        pruned = pruned or rejected
                        prune.send(conn, {"prune": rejected, "pruner": self.plan.pruner_name})
                    elif message.get("kind") == "end":
                        end = message
                elif not process.is_alive():
                    return pruned, end
            except (EOFError, OSError):
                return pruned, end
            if time.monotonic() - beat > HEARTBEAT_S:
                beat = time.monotonic()
                with self.lock:
                    trial.set_user_attr("alive", time.time())

    def _record(self, run: TrialRun, code: int | None, pruned: bool, end: dict | None, seconds: float) -> None:
        """Tell the study how the trial ended, and say so."""
        trial, number, monitor = run.trial, run.trial.number, self.plan.monitor
        took = _duration(seconds)
        signalled = INTERRUPTED_CODES.get(code) if code is not None else None
        interrupted = signalled or (self.stopping if code != 0 else None)
        try:
            if end is not None:
                trial.set_user_attr("epochs", end.get("epochs"))
                if end.get("stop_reason"):
                    trial.set_user_attr("stop_reason", end["stop_reason"])
            if code == 0 and end is not None:
                value = end.get("value")
                if pruned:
                    self.study.tell(trial, state=self.state.PRUNED)
                    self._say(
                        f"trial {number} pruned after epoch {end.get('epochs')}: {monitor} {_number(value)} ({took})"
                    )
                    return
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.study.tell(trial, float(value))
                    epochs = end.get("epochs")
                    self._say(
                        f"trial {number} complete: {monitor} {value:.4g} after {epochs} "
                        f"epoch{'' if epochs == 1 else 's'} ({took})"
                    )
                    return
                self._fail(trial, f"the run reported no finite {monitor} (got {value})", run.log)
            elif interrupted:
                self._interrupted(trial, run.params, interrupted)
            elif code == 0:
                self._fail(trial, "the run ended without the prune plugin's final report", run.log)
            else:
                self._fail(trial, _error_line(run.log, code), run.log, bad_input=code == 2)
        except (RuntimeError, ValueError) as exc:  # the study no longer takes it (marked lost meanwhile)
            self._say(
                f"trial {number}: its result could not be recorded ({one_line(exc)}); "
                f"its run directory {run.run_dir} is kept"
            )

    def _fail(self, trial, error: str, log: Path, bad_input: bool = False) -> None:
        """Record a failed trial. One whose input was refused before training (exit code 2) while
        no trial of the study has run yet stops the sweep: what refused it (a monitor the recipe
        does not report, missing data) would refuse every other. It does not count, so that the
        corrected command can take the study over."""
        trial.set_user_attr("error", error)
        first = bad_input and not any(counts(t) for t in self.study.get_trials(deepcopy=False))
        if first:
            trial.set_user_attr("bad_input", True)
        self.study.tell(trial, state=self.state.FAIL)
        if first and self.bad_input is None:
            self.bad_input = f"trial {trial.number} could not start, and the others would not either: {error}"
        self._say(f"trial {trial.number} failed: {error} (log: {log})")

    def _interrupted(self, trial, params: dict[str, Any], signal_name: str) -> None:
        trial.set_user_attr("interrupted", signal_name)
        self.study.tell(trial, state=self.state.FAIL)
        self.study.enqueue_trial(dict(params), user_attrs={"retry_of": trial.number})
        self._say(f"trial {trial.number} stopped by {signal_name}: marked failed, its values queued again")


def _error_line(log: Path, code: int | None) -> str:
    """What the trial's ``minitrain run`` said when it failed: its ``minitrain: error:`` line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line.removeprefix("minitrain: error: ") for line in lines if line.startswith("minitrain: error: ")]
    if errors:
        return errors[-1]
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}" + (f": {lines[-1]}" if lines else "")


def _short(params: dict[str, Any]) -> str:
    """``lr=0.04127, widths=[32, 64]``: values as a person reads them (the run gets them exactly)."""
    return ", ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)

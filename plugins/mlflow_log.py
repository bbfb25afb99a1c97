"""MLflow tracking: a run's config, metrics, files and outcome in an MLflow tracking store.

    minitrain run recipes/cifar10_quick.py --plugin mlflow
    mlflow ui --backend-store-uri sqlite:///mlflow.db      # then http://127.0.0.1:5000

Where: option ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own SQLite store
``sqlite:///mlflow.db`` in the working directory, with artifacts under ``./mlruns``: offline,
nothing to start. The experiment is the recipe's name, the MLflow run is named after the run
directory. Logged:

* parameters: the recipe config and every plugin's options (``plugin.<name>.<option>``),
  flattened with dots; a value longer than MLflow takes is cut, with a warning;
* tags: recipe, run directory, minitrain and torch versions, plugins, the recipe's git commit
  (``mlflow.source.git.commit``) when it is in a git checkout;
* metrics: the training loss every ``log_every`` steps (``train_loss_step``) with the per-step
  values plugins publish in ``trainer.shared.step_metrics`` (``grad_norm`` with ``clip``), and each
  epoch's metrics (``train_loss``, ``val_loss``, ``val_acc``, ``lr``, ...), all against the global
  step;
* at the end: ``plots/``, ``report.html``, ``metrics.csv``, the event log, ``config.json``,
  ``run.json`` and ``errors.log`` where the run has them, and the ``checkpoint`` plugin's
  ``best.pt`` with ``log_best_checkpoint=true``; the status FINISHED (``FitEnd``, a stop request
  included, with its reason as the tag ``stop_reason``), FAILED (``ExceptionRaised``) or KILLED
  (``Interrupted``).

``--resume`` continues the same MLflow run: its id travels in the checkpoints (this plugin's
``state_dict``). ``minitrain replay RUN --plugin mlflow`` logs a run recorded without it.
``minitrain run --smoke`` leaves no MLflow run behind: through :meth:`MlflowLog.smoke_test`, the
plugin logs as ever, but into a store of its own in the run directory, which goes with it.

MLflow's own log lines below WARNING (``INFO mlflow.store.db.utils: Creating initial MLflow
database tables...``) are kept off the console, unless ``MLFLOW_LOGGING_LEVEL`` asks for them.

The training loop never waits for MLflow. Every call to it (the import included, which takes
seconds) is made by one background thread, fed through a queue. At every step ``on_batch_end``
returns after one modulo, except every ``log_every``-th, where it keeps the loss *tensor*: the
held losses go to the host together, once per group or epoch, without making the host wait for
the device (``HostCopy``), and reach MLflow in ``log_batch`` calls: every 100 logged losses,
``flush_secs`` seconds after the first of them, or at the epoch's end. A failure in that thread (a
server that is down or too slow: HTTP requests are bounded by ``http_timeout`` and
``http_retries``) makes the plugin fail at its next hook, so the run disables it with one warning
and trains on. At the end of the run the loop waits at most ``finish_timeout`` seconds for the
last metrics and files. The work in the background is not free: with the SQLite store, a logged
value costs 0.15-0.2 ms of CPU (``log_batch`` of 100: 16-20 ms, measured on the 2-core machine),
which a training step pays where it holds Python's GIL; hence ``log_every`` defaults to 50, as
``tensorboard``'s does (benchmarks/overhead.py). The event log is uploaded last, from the
background thread, as soon as its final line is on disk: this plugin has no per-step
``on_event`` hook to come after the ``jsonl`` plugin's, and so costs nothing at the steps it does
not log. Under torchrun it runs on rank 0 only.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import logging
import os
import queue
import re
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from minitrain import PluginConfig, __version__, hookimpl
from minitrain.engine.device import HostCopy
from minitrain.engine.errors import MinitrainError, one_line
from minitrain.engine.events import Event, ExceptionRaised, FitEnd, Interrupted
from minitrain.engine.files import read_json
from minitrain.records.rundir import flatten, parse_time

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STEP_METRIC = "train_loss_step"
STATUS: dict[type[Event], str] = {FitEnd: "FINISHED", ExceptionRaised: "FAILED", Interrupted: "KILLED"}
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a parameter's value since 2.x (characters)
TAG_VALUE_LIMIT = 8000
KEY_LIMIT = 250
HOLD = 100  # logged losses held before they go to the host and to MLflow as one batch
LOG_WAIT = 10.0  # seconds the background thread waits for the event log's final line
RUN_KEY_TAG = "minitrain.run_key"


class MlflowFailed(RuntimeError):
    """MLflow could not take what the plugin sent (the cause is chained)."""


class MlflowLog:
    enabled_by_default = False
    role = "observer"  # a tracker that fails must not stop training
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        tracking_uri: str | None = Field(
            None,
            description="where to log (default: $MLFLOW_TRACKING_URI, else "
            "sqlite:///mlflow.db in the working directory)",
        )
        experiment: str | None = Field(None, description="MLflow experiment (default: the recipe's name)")
        run_name: str | None = Field(None, description="MLflow run name (default: the run directory's name)")
        log_every: int = Field(
            50,
            ge=1,
            description="steps between logged training losses (each costs MLflow's "
            "SQLite store 0.15-0.2 ms of CPU, in the background)",
        )
        flush_secs: float = Field(
            30.0,
            gt=0,
            description="longest time a logged loss is held before it is "
            "sent (they go in groups of 100, and at each epoch's end)",
        )
        log_best_checkpoint: bool = Field(False, description="upload the checkpoint plugin's best.pt at the end")
        http_timeout: int = Field(
            10,
            ge=1,
            description="seconds an HTTP request to a tracking server may take "
            "(unless MLFLOW_HTTP_REQUEST_TIMEOUT is set)",
        )
        http_retries: int = Field(
            2, ge=0, description="retries of a failed HTTP request (unless MLFLOW_HTTP_REQUEST_MAX_RETRIES is set)"
        )
        finish_timeout: float = Field(
            120.0,
            gt=0,
            description="longest wait, at the end of the run, for MLflow to take the last metrics and files",
        )

    def __init__(self, config: Config):
        if importlib.util.find_spec("mlflow") is None:
            raise MinitrainError(
                "plugin 'mlflow' needs MLflow, which is not installed: "
                "pip install 'minitrain[tracking]' (or pip install mlflow)"
            )
        self.config = config
        self.every = config.log_every
        self.held: list[tuple[int, Any, int, dict | None]] = []  # (step, loss, time in ms, step metrics)
        self.send_by = 0.0  # when the held losses go, however few
        self.worker: _Worker | None = None
        self.run_id: str | None = None  # set by the worker once the MLflow run exists
        self.run_key = uuid.uuid4().hex  # a tag naming the run before MLflow has given it an id
        self.resume: dict[str, str] = {}  # what a checkpoint said about the MLflow run
        self.best_checkpoint: str | None = None
        self.run_dir: Path | None = None
        self.segments = 0  # fits seen (a replayed resumed run has several)
        self.replaying = False
        self.scratch: Path | None = None  # a smoke test's own store, in its run directory

    # --- the run's start ----------------------------------------------------------------------

    def smoke_test(self, run_dir: Path) -> str:
        """Called by ``minitrain run --smoke`` before its run: log into a store of this run's own,
        ``RUN_DIR/mlflow/`` (SQLite, its artifacts beside it), so that the smoke test, which keeps
        nothing, leaves no MLflow run, experiment or ``mlflow.db`` behind. Every call the plugin makes
        is still made. Returns the line for the smoke test's report."""
        self.scratch = Path(run_dir).absolute() / "mlflow"
        self.scratch.mkdir(parents=True, exist_ok=True)
        usual = self.config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        return f"logs to a store of the smoke run's own, {self.scratch}, not to {_without_password(usual)}"

    @hookimpl
    def on_fit_start(self, event, trainer) -> None:
        self.replaying = trainer.replaying
        self.segments += 1
        self.held = []
        run_dir = Path(event.run_dir).absolute() if event.run_dir else None
        self.run_dir = run_dir
        info = read_json(run_dir / "run.json") if run_dir else {}
        recipe = info.get("recipe")
        name = Path(recipe).stem if recipe else "minitrain"
        plugins = trainer.plugin_options()
        params = flatten(event.config)
        for plugin, options in sorted(plugins.items()):
            params.update(flatten(options, f"plugin.{plugin}"))
        params, cut = _fit(params, PARAM_VALUE_LIMIT)
        if cut:
            warnings.warn(
                f"mlflow: parameter value(s) longer than MLflow takes were cut to {PARAM_VALUE_LIMIT} "
                f"characters: {', '.join(cut)}",
                stacklevel=2,
            )
        tags = {
            "minitrain.recipe": recipe or "",
            "minitrain.run_dir": str(run_dir or ""),
            "minitrain.version": __version__,
            "torch.version": str(torch.__version__),
            "minitrain.plugins": ", ".join(sorted(plugins)),
            "minitrain.device": event.device,
            RUN_KEY_TAG: self.resume.get("run_key") or self.run_key,
        }
        if event.resumed_from:
            tags["minitrain.resumed_from"] = event.resumed_from
        for key, (old, new) in event.changed.items():  # parameters cannot change in MLflow: tags say it
            tags[f"minitrain.changed.{key}"] = f"{_text(old)} -> {_text(new)} at step {event.global_step}"
        tags = _fit(tags, TAG_VALUE_LIMIT)[0]
        start_time = None
        if self.replaying and self.segments == 1 and "mlflow" in (info.get("plugins") or {}):
            warnings.warn(
                "mlflow: this run had the mlflow plugin on when it trained; the replay logs it "
                "again, as a new MLflow run",
                stacklevel=2,
            )
        if self.replaying:  # the run's own start, from run.json, not the time of the replay
            history = info.get("history") or []
            if len(history) >= self.segments:
                start_time = _ms(parse_time(history[self.segments - 1].get("started")))
        git_dir = Path(recipe).parent if recipe else Path.cwd()
        if self.scratch is not None:
            uri = f"sqlite:///{self.scratch / 'mlflow.db'}"
        else:
            uri = self.config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        start = functools.partial(
            self._start,
            uri=uri,
            experiment=self.config.experiment or name,
            run_name=self.config.run_name or (run_dir.name if run_dir else None),
            params=params,
            tags=tags,
            git_dir=git_dir,
            start_time=start_time,
        )
        if self.worker is None:
            for variable, value in (
                ("MLFLOW_HTTP_REQUEST_TIMEOUT", self.config.http_timeout),
                ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", self.config.http_retries),
            ):
                os.environ.setdefault(variable, str(value))  # read by MLflow at each request
            self.worker = _Worker()
        self.worker.submit(start)

    def _start(
        self,
        uri: str,
        experiment: str,
        run_name: str | None,
        params: dict[str, str],
        tags: dict[str, str],
        git_dir: Path,
        start_time: int | None,
    ) -> None:
        """In the worker: open the store, find the run a checkpoint names or create one, log the
        parameters and tags."""
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        _quiet_mlflow_logging()
        worker = self.worker
        assert worker is not None  # this runs in it
        if worker.client is None or worker.uri != uri:
            worker.client, worker.uri = MlflowClient(tracking_uri=uri), uri
        client = worker.client
        run = None
        wanted = self.run_id or self.resume.get("run_id")
        if wanted:
            try:
                run = client.get_run(wanted)
            except MlflowException as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            experiment_id = exp.experiment_id
        else:  # a smoke test's artifacts stay in its store's folder, not ./mlruns
            artifacts = (self.scratch / "artifacts").as_uri() if self.scratch is not None else None
            experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
        if run is None and self.resume.get("run_key"):  # checkpointed before MLflow had given an id
            found = client.search_runs(
                [experiment_id], f"tags.`{RUN_KEY_TAG}` = '{self.resume['run_key']}'", max_results=1
            )
            run = found[0] if found else None
        if run is None and (self.resume.get("run_id") or self.resume.get("run_key")):
            named = self.resume.get("run_id") or f"tagged {RUN_KEY_TAG}={self.resume['run_key']}"
            worker.notes.append(
                f"mlflow: the MLflow run this checkpoint was logging to ({named}) is not in {uri}; logging to a new run"
            )
        if run is None:
            commit = _git_commit(git_dir)
            if commit:
                tags = {**tags, "mlflow.source.git.commit": commit}
            run = client.create_run(experiment_id, start_time=start_time, tags=tags, run_name=run_name)
            new_params = params
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            if run.data.tags.get(RUN_KEY_TAG):  # the run keeps the tag it was created with
                self.run_key = run.data.tags[RUN_KEY_TAG]
                tags = {key: value for key, value in tags.items() if key != RUN_KEY_TAG}
            logged = run.data.params
            new_params = {key: value for key, value in params.items() if key not in logged}
            tags = {
                **{
                    f"minitrain.changed.{key}": f"{logged[key]} -> {value}"  # (plugin options, say)
                    for key, value in params.items()
                    if key in logged and logged[key] != value
                },
                **tags,
            }
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in new_params.items()],
            tags=[RunTag(k, v) for k, v in _fit(tags, TAG_VALUE_LIMIT)[0].items()],
        )
        self.run_id = run.info.run_id

    # --- while it trains ----------------------------------------------------------------------

    @hookimpl
    def on_batch_end(self, event, trainer) -> None:
        if event.global_step % self.every:  # all steps but one in `log_every` end here
            return
        held, now = self.held, time.time()
        if not held:
            self.send_by = now + self.config.flush_secs
        published = trainer.shared.step_metrics  # grad_norm with `clip`, ...: device scalars
        held.append((event.global_step, event.loss, int(now * 1000), dict(published) if published else None))
        if len(held) >= HOLD or now >= self.send_by:
            self._hand_over()

    def _hand_over(self) -> None:
        """Send the held losses (and the step metrics plugins published with them) to the host in
        one copy that nobody waits for here, and to MLflow from the worker."""
        self._check()
        held, self.held = self.held, []
        if not held:
            return
        assert self.worker is not None  # losses are held only after on_fit_start started it
        names = [(STEP_METRIC, step, stamp) for step, _, stamp, _ in held]
        values = [loss for _, loss, _, _ in held]
        for step, _, stamp, published in held:
            for name, value in (published or {}).items():
                names.append((name, step, stamp))
                values.append(value)
        if len(values) > len(held):  # scalars of any dtype and shape (1,) or ()
            values = [value.detach().reshape(()).float() for value in values]
        copy = HostCopy(torch.stack(values).reshape(-1).float())
        self.worker.submit(
            lambda: self._log_metrics(
                [(name, value, step, stamp) for (name, step, stamp), value in zip(names, copy.get().tolist())]
            )
        )

    def _log_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        client, run_id = self._open_run()
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v, step, stamp in metrics])

    @hookimpl
    def on_epoch_end(self, event) -> None:
        self._hand_over()
        stamp = int(time.time() * 1000)
        metrics = [(key, float(value), event.global_step, stamp) for key, value in event.metrics.items()]
        metrics.append(("epoch", float(event.epoch), event.global_step, stamp))
        assert self.worker is not None  # started by on_fit_start
        self.worker.submit(lambda: self._log_metrics(metrics))

    @hookimpl(optionalhook=True)  # declared by the checkpoint plugin, which may be off
    def on_checkpoint_saved(self, event) -> None:
        if event.kind == "best":
            self.best_checkpoint = event.path

    def _check(self) -> None:
        """Say what the worker noted, and fail here, on the training thread, if it failed: the
        run then disables this plugin with one warning."""
        worker = self.worker
        if worker is None:
            return
        while worker.notes:
            warnings.warn(worker.notes.pop(0), stacklevel=3)
        if worker.failure is not None:
            raise MlflowFailed(f"MLflow failed: {one_line(worker.failure)}") from worker.failure

    # --- the end ------------------------------------------------------------------------------

    @hookimpl(trylast=True)  # after viz has drawn its plots and report
    def on_fit_end(self, event) -> None:
        self._finish(event, tags={"stop_reason": event.stop_reason} if event.stop_reason else {})

    @hookimpl(trylast=True)
    def on_exception_raised(self, event) -> None:
        self._finish(event, tags={"error": f"{event.error_type}: {event.message}"})

    @hookimpl(trylast=True)
    def on_interrupted(self, event) -> None:
        self._finish(event, tags={"interrupted_by": event.signal})

    def _finish(self, event, tags: dict[str, str]) -> None:
        """Hand over the last losses, then wait (at most ``finish_timeout``) for the worker to log
        them, the final tags and files and the status; the event log follows from the worker."""
        if self.worker is None:
            return
        self._hand_over()
        status, run_dir = STATUS[type(event)], self.run_dir
        files = []
        if run_dir is not None:
            info = read_json(run_dir / "run.json")
            csv_name = (info.get("plugins") or {}).get("csv", {}).get("filename", "metrics.csv")
            files = [
                (run_dir / name, "") for name in ("report.html", csv_name, "config.json", "run.json", "errors.log")
            ]
            files.append((run_dir / "plots", "plots"))
            if self.config.log_best_checkpoint and self.best_checkpoint:
                files.append((Path(self.best_checkpoint), "checkpoints"))
        end_time = _ms(_mtime(run_dir, self.replaying)) if self.replaying else None
        self.worker.submit(lambda: self._end(files, _fit(tags, TAG_VALUE_LIMIT)[0], status, end_time))
        if not self.worker.wait(self.config.finish_timeout):
            self.worker.abandon()
            raise MlflowFailed(
                f"MLflow did not take the run's last metrics and files within "
                f"{self.config.finish_timeout:g} s (finish_timeout); MLflow run {self.run_id} may be "
                "incomplete and left RUNNING"
            )
        self._check()
        if run_dir is not None:
            log = run_dir / (read_json(run_dir / "run.json").get("event_log") or "events.jsonl")
            final = (type(event).__name__, event.global_step)
            self.worker.submit(lambda: self._upload_log(log, None if self.replaying else final))
            if self.replaying:  # the log is whole already: `minitrain replay` returns with the run logged
                self.wait()
            else:
                _join_at_exit(self.worker)

    def _end(self, files: list[tuple[Path, str]], tags: dict[str, str], status: str, end_time: int | None) -> None:
        client, run_id = self._open_run()
        from mlflow.entities import RunTag

        if tags:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for path, folder in files:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), folder)
            elif path.is_file():
                client.log_artifact(run_id, str(path), folder or None)
        client.set_terminated(run_id, status, end_time)

    def _upload_log(self, path: Path, final: tuple[str, int] | None) -> None:
        """The event log, once it ends with ``final`` (its last event and step): the ``jsonl``
        plugin writes that line right after the hooks that ended the run."""
        deadline = time.monotonic() + LOG_WAIT
        while final is not None and path.is_file() and _last_event(path) != final and time.monotonic() < deadline:
            time.sleep(0.01)
        if path.is_file():
            client, run_id = self._open_run()
            client.log_artifact(run_id, str(path))

    def _open_run(self) -> tuple[MlflowClient, str]:
        """In the worker, after ``_start`` (a task runs only if every earlier one succeeded): the
        MLflow client and the run's id."""
        assert self.worker is not None and self.worker.client is not None and self.run_id is not None
        return self.worker.client, self.run_id

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for everything handed to the background thread, the event log's upload included
        (for scripts and tests that read the MLflow run right after ``fit``). False on timeout."""
        return self.worker is None or self.worker.wait(self.config.finish_timeout if timeout is None else timeout)

    # --- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The MLflow run to continue on resume: its id, and the tag that finds it if the id was
        not known yet when the checkpoint was written (the run is created in the background)."""
        return {
            "run_id": self.run_id or self.resume.get("run_id") or "",
            "run_key": self.resume.get("run_key") or self.run_key,
        }

    def load_state_dict(self, state: dict) -> None:
        self.resume = {"run_id": state.get("run_id") or "", "run_key": state.get("run_key") or ""}


class _Worker:
    """One daemon thread that runs the tasks it is given, in order. After a task fails it runs no
    more (the plugin reports the failure on the training thread)."""

    def __init__(self):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: BaseException | None = None
        self.notes: list[str] = []  # warnings to give on the training thread
        self.client: MlflowClient | None = None  # opened by the first task (MlflowLog._start)
        self.uri: str | None = None
        self.abandoned = False
        self.thread = threading.Thread(target=self._run, name="minitrain-mlflow", daemon=True)
        self.thread.start()

    def submit(self, task: Callable[[], None]) -> None:
        self.tasks.put(task)

    def wait(self, timeout: float) -> bool:
        """Whether every task submitted so far was done (or dropped after a failure) in time."""
        done = threading.Event()
        self.tasks.put(done)
        return done.wait(timeout)

    def abandon(self) -> None:
        self.abandoned = True

    def _run(self) -> None:
        while True:
            task = self.tasks.get()
            if isinstance(task, threading.Event):
                task.set()
            elif self.failure is None and not self.abandoned:
                try:
                    task()
                except BaseException as exc:  # reported by the plugin on the training thread
                    self.failure = exc


_waiting: list[_Worker] = []


def _quiet_mlflow_logging() -> None:
    """Keep MLflow's log lines below WARNING (``INFO mlflow.store.db.utils: Creating initial
    MLflow database tables...``: MLflow's import gives its logger a handler on stderr, at INFO) off
    minitrain's console, unless ``MLFLOW_LOGGING_LEVEL`` names a level (MLflow's own setting,
    which then holds). Its warnings and errors still show."""
    logger = logging.getLogger("mlflow")
    wanted = os.environ.get("MLFLOW_LOGGING_LEVEL", "").strip().upper()
    if wanted in logging.getLevelNamesMapping():
        logger.setLevel(wanted)
    elif logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)


def _join_at_exit(worker: _Worker) -> None:
    """At interpreter exit, give the worker's last uploads (the event log) a bounded wait."""
    if not _waiting:
        atexit.register(lambda: [w.wait(LOG_WAIT + 5) for w in _waiting if not w.abandoned])
    if worker not in _waiting:
        _waiting.append(worker)


def _last_event(path: Path) -> tuple[str, int] | None:
    """The type and global step of a log's last complete line."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 65536))
            tail = file.read()
        if not tail.endswith(b"\n"):
            return None
        last = json.loads(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
        return last.get("event"), last.get("global_step")
    except (OSError, ValueError):
        return None


def _fit(values: dict[str, str], limit: int) -> tuple[dict[str, str], list[str]]:
    """Keys MLflow accepts (letters, digits, ``_-. /``; at most 250 characters) and values cut to
    ``limit`` characters, with any password in a URL (``https://user:secret@host``) left out;
    also the keys whose values were cut."""
    fitted, cut = {}, []
    for key, value in values.items():
        key = re.sub(r"[^\w\-. /]", "_", key)[:KEY_LIMIT]
        value = _without_password(value)
        if len(value) > limit:
            value = value[: limit - 3] + "..."
            cut.append(key)
        fitted[key] = value
    return fitted, cut


def _without_password(value: str) -> str:
    """``value`` with any password in a URL (``https://user:secret@host``) left out."""
    return re.sub(r"(\w+://[^/@:\s]*):[^/@\s]*@", r"\1:***@", value)


def _git_commit(folder: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _mtime(run_dir: Path | None, replaying: bool) -> float | None:
    """When a replayed run ended: its event log's last write."""
    if run_dir is None or not replaying:
        return None
    log = run_dir / (read_json(run_dir / "run.json").get("event_log") or "events.jsonl")
    try:
        return log.stat().st_mtime
    except OSError:
        return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)

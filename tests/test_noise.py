"""Third-party noise stays off minitrain's console, read at the file descriptors (capfd), where
C++ code writes: PyTorch's profiler library (Kineto) logs ``USDT: ... profiler_start`` and, on a
machine without a GPU, ``ERROR: ... gpuGetDeviceCount failed``; MLflow logs INFO lines
(``INFO mlflow.store.db.utils: Creating initial MLflow database tables...``). minitrain's own
output, and anything else written meanwhile, stays."""

from __future__ import annotations

import os

import pytest

from minitrain.commands.cli import main
from minitrain_plugins.profile import KINETO_LINE, Profile, kineto_noise

FIRST_PARTY_PLUGINS = {"profile", "mlflow"}
MLFLOW_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_LOGGING_LEVEL",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
)

# Lines as Kineto wrote them on the CPU machine, from torch 2.14
START = "USDT:2026-12-03 01:58:17 10833:10833 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
STOP = "USDT:2026-12-03 01:58:18 10833:10833 SyncActivityProfilerHandler.cpp:46] profiler_stop\n"
NO_GPU = "ERROR:2026-12-03 01:58:18 10833:10833 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n"


def run(recipe, tmp_path, *options: str) -> int:
    return main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--no-plugin", "console", *options])


def test_a_profiled_run_on_the_cpu_prints_none_of_kinetos_lines(recipe, tmp_path, capfd):
    assert run(recipe, tmp_path, "--set", "epochs=2", "--plugin", "profile:wait=1,warmup=1,active=2,top=10") == 0
    out, err = capfd.readouterr()
    assert "profile of 2 steps (after 2), top 10 operators by self cpu time total" in out  # its own output stays
    assert "aten::" in out and "done: 2 epochs" in out
    assert not [line for line in err.splitlines() if KINETO_LINE.match(line)], err  # no USDT markers, ...
    assert "gpuGetDeviceCount" not in err and "profiler_start" not in err
    assert (tmp_path / "run" / "profile" / "trace.json").is_file()


def test_what_else_is_written_while_the_profiler_runs_goes_through(capfd):
    """The filter itself: lines written to descriptor 2 (as Kineto does) while it holds standard
    error come out after it, in order, less Kineto's noise."""
    plugin = Profile(Profile.Config())
    with plugin._quiet():
        os.write(2, START.encode())
        os.write(2, b"a line from C++\n")
        os.write(2, (STOP + NO_GPU).encode())
        os.write(2, b"another, cut short")
    assert capfd.readouterr().err == "a line from C++\nanother, cut short"


def test_kineto_noise_is_its_markers_and_on_the_cpu_the_missing_gpu():
    assert all(KINETO_LINE.match(line) for line in (START, STOP, NO_GPU))
    assert kineto_noise(START, cuda=False) and kineto_noise(STOP, cuda=True)
    assert kineto_noise(NO_GPU, cuda=False) and not kineto_noise(NO_GPU, cuda=True)  # on a GPU run, it is news
    cupti = "ERROR:2026-12-03 01:58:18 10833:10833 CuptiActivityApi.cpp:341] CUPTI_ERROR_INSUFFICIENT_PRIVILEGES\n"
    assert not kineto_noise(cupti, cuda=True) and not kineto_noise(cupti, cuda=False)  # Kineto's real errors stay
    assert not kineto_noise("minitrain: warning: USDT:2026-12-03 01:58:17 1:1 x.cpp:1] profiler_start\n", cuda=False)


@pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # MLflow's own, with SQLAlchemy 2.1
def test_mlflow_prints_no_info_lines_unless_its_own_setting_asks(recipe, tmp_path, capfd, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is not installed (pip install -e '.[tracking]')")
    for name in MLFLOW_VARIABLES:  # set, then removed: restored to absent after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")  # MLflow's setting: its INFO lines are there to see
    assert (
        run(
            recipe, tmp_path, "--run-dir", str(tmp_path / "asked"), "--plugin", "mlflow:tracking_uri=sqlite:///asked.db"
        )
        == 0
    )
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables" in capfd.readouterr().err

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL")  # a new store again: the same lines would be written
    assert run(recipe, tmp_path, "--plugin", "mlflow:tracking_uri=sqlite:///quiet.db") == 0
    out, err = capfd.readouterr()
    assert "done: 1 epochs" in out  # minitrain's own output stays
    assert " INFO " not in out + err and "mlflow" not in err, err
    assert (tmp_path / "quiet.db").is_file()

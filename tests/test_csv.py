"""The csv plugin: one row per epoch in metrics.csv, one header, across resumes and new metrics."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.errors import MinitrainError
from minitrain.engine.events import EpochEnd, FitStart
from minitrain_plugins.csv_log import CsvLog

FIRST_PARTY_PLUGINS = {"console", "jsonl", "csv", "checkpoint", "early_stopping"}


@pytest.fixture
def run(recipe, tmp_path):
    """``run(epochs, resume=None)``: train the tiny recipe in one run dir with checkpoints on."""

    def train(epochs, resume=None):
        prepare(
            RunRequest(recipe, [f"epochs={epochs}"], ["checkpoint"], ["console"], tmp_path / "run", resume=resume)
        ).fit()

    return train


def read(path):
    with open(path, newline="") as file:
        lines = file.read().splitlines()
    return lines[0].split(","), list(csv.DictReader(lines))


def test_one_row_per_epoch_and_one_header_across_a_resume(run, tmp_path):
    run(2)
    run(4, resume="auto")
    header, rows = read(tmp_path / "run" / "metrics.csv")
    ends = [
        json.loads(line)
        for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
        if '"EpochEnd"' in line
    ]
    assert header == ["epoch", "global_step", *ends[0]["metrics"]]
    assert [(r["epoch"], r["global_step"]) for r in rows] == [("1", "5"), ("2", "10"), ("3", "15"), ("4", "20")]
    assert [{key: float(row[key]) for key in header[2:]} for row in rows] == [e["metrics"] for e in ends]


@pytest.mark.filterwarnings("ignore:checkpoint. this run starts at step")  # later files set aside
def test_resuming_from_an_earlier_checkpoint_replaces_the_epochs_it_redoes(run, tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    run(1)
    shutil.copy(folder / "last.pt", tmp_path / "after-epoch-1.pt")
    run(3, resume="auto")
    run(3, resume=tmp_path / "after-epoch-1.pt")
    header, rows = read(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_a_metric_that_appears_later_widens_the_table(tmp_path):
    log = CsvLog(CsvLog.Config())
    log.on_fit_start(
        FitStart(epochs=2, start_epoch=1, global_step=0, steps_per_epoch=3, device="cpu", run_dir=str(tmp_path))
    )
    log.on_epoch_end(EpochEnd(epoch=1, global_step=3, metrics={"train_loss": 1.5}))
    log.on_epoch_end(EpochEnd(epoch=2, global_step=6, metrics={"train_loss": 1.25, "val_acc": 0.5}))
    header, rows = read(tmp_path / "metrics.csv")
    assert header == ["epoch", "global_step", "train_loss", "val_acc"]
    assert [list(r.values()) for r in rows] == [["1", "3", "1.5", ""], ["2", "6", "1.25", "0.5"]]
    assert not list(tmp_path.glob(".*.tmp"))


def test_without_a_run_dir_it_writes_nothing(tmp_path):
    log = CsvLog(CsvLog.Config())
    log.on_fit_start(FitStart(epochs=1, start_epoch=1, global_step=0, steps_per_epoch=3, device="cpu", run_dir=None))
    log.on_epoch_end(EpochEnd(epoch=1, global_step=3, metrics={"train_loss": 1.5}))
    assert not list(tmp_path.iterdir())


def test_a_rewrite_that_fails_leaves_the_old_table(tmp_path, monkeypatch):
    log = CsvLog(CsvLog.Config())
    log.on_fit_start(
        FitStart(epochs=2, start_epoch=1, global_step=0, steps_per_epoch=3, device="cpu", run_dir=str(tmp_path))
    )
    log.on_epoch_end(EpochEnd(epoch=1, global_step=3, metrics={"train_loss": 1.5}))
    before = (tmp_path / "metrics.csv").read_bytes()

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("minitrain.engine.files.os.replace", disk_full)
    with pytest.raises(MinitrainError, match=r"could not write metrics table .*metrics\.csv \(OSError: .*No space"):
        log.on_epoch_end(EpochEnd(epoch=2, global_step=6, metrics={"train_loss": 1.25, "val_acc": 0.5}))
    assert (tmp_path / "metrics.csv").read_bytes() == before  # widening rewrites the file: it stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # and no temporary file is left

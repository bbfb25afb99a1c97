"""The viz plugin's PNGs and report.html, and rebuilding them (or anything else) from a run's
events.jsonl with ``minitrain report`` / ``minitrain replay``."""
from __future__ import annotations

import io
import json
import re
import warnings

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from minitrain import hookimpl
from minitrain.cli import main
from minitrain.run import prepare

CURVES = ["loss.png", "accuracy.png", "lr.png", "confusion.png"]


FIRST_PARTY_PLUGINS = {"viz", "tensorboard", "checkpoint"}


def fit(recipe, run_dir, plugins=("viz",), epochs=2):
    trainer = prepare(recipe, [f"epochs={epochs}"], list(plugins), ["console"], run_dir)
    trainer.fit()
    return trainer


def assert_picture(path, min_size=(300, 300)):
    """A real image, larger than ``min_size`` (width, height), with something drawn on it."""
    pixels = imread(path)
    assert pixels.shape[1] >= min_size[0] and pixels.shape[0] >= min_size[1]
    assert np.asarray(pixels[..., :3]).std() > 0.02


def linked_images(run_dir) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', (run_dir / "report.html").read_text())


def test_fit_writes_plots_and_a_report(recipe, tmp_path):
    run = tmp_path / "run"
    trainer = fit(recipe, run)
    assert trainer.metrics["val_acc"] < 1  # there are mistakes to show

    plots = run / "plots"
    for name in CURVES:
        assert_picture(plots / name)
    assert_picture(plots / "misclassified.png", min_size=(600, 150))
    assert linked_images(run) == [f"plots/{name}" for name in CURVES + ["misclassified.png"]]
    report = (run / "report.html").read_text()
    assert "<th>val_acc</th>" in report and f"{trainer.metrics['val_acc']:.4g}" in report
    assert "<th>batch_size</th><td>16</td>" in report  # the run's config

    buffer = io.BytesIO()  # the curves so far travel in checkpoints, so a resumed run plots them all
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    resumed = prepare(recipe, ["epochs=3"], ["viz"], ["console"], tmp_path / "resumed")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.pm.get_plugin("viz").epochs == trainer.pm.get_plugin("viz").epochs
    assert sorted(resumed.pm.get_plugin("viz").epochs) == [1, 2]


def test_report_rebuilds_everything_but_the_image_grid_from_the_event_log(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    fit(recipe, run, plugins=())  # viz off: the event log is all there is
    assert not (run / "plots").exists()

    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    for name in CURVES:
        assert_picture(run / "plots" / name)
    assert linked_images(run) == [f"plots/{name}" for name in CURVES]


def test_report_keeps_an_existing_image_grid(recipe, tmp_path):
    run = tmp_path / "run"
    fit(recipe, run)
    grid = (run / "plots" / "misclassified.png").read_bytes()
    for name in CURVES:
        (run / "plots" / name).unlink()
    (run / "report.html").unlink()

    assert main(["report", str(run)]) == 0
    assert (run / "plots" / "misclassified.png").read_bytes() == grid
    assert linked_images(run) == [f"plots/{name}" for name in CURVES + ["misclassified.png"]]


def test_every_epoch_draws_after_each_epoch(recipe, tmp_path):
    seen = []

    class Look:
        @hookimpl
        def on_epoch_end(self, event, trainer):
            seen.append({p.name: p.read_bytes() for p in (tmp_path / "run" / "plots").glob("*.png")})

    trainer = prepare(recipe, ["epochs=2"], ["viz:every_epoch=true"], ["console"], tmp_path / "run")
    trainer.pm.register(Look())
    trainer.fit()
    # drawn before other plugins look; the image grid comes from the last epoch's validation
    assert [sorted(drawn) for drawn in seen] == [sorted(CURVES), sorted([*CURVES, "misclassified.png"])]
    assert [name for name in CURVES if seen[0][name] == seen[1][name]] == []  # each one drawn again, with epoch 2


def test_replay_feeds_the_log_to_any_plugin(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    fit(recipe, run, plugins=())
    lines = (run / "events.jsonl").read_text().splitlines()
    with (run / "events.jsonl").open("a") as log:  # a custom event whose declaring plugin is gone
        log.write('{"event": "SomethingCustom", "value": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["replay", str(run), "--plugin", "tensorboard:log_every=1"]) == 0
    out, err = capsys.readouterr()
    assert f"replayed {len(lines)} events" in out
    assert "warning: replay skipped events of unknown types: 'SomethingCustom'" in err

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [json.loads(line)["loss"] for line in lines if '"BatchEnd"' in line]
    assert [s.value for s in acc.Scalars("train/loss")] == pytest.approx(losses)
    assert len(acc.Scalars("epoch/val_acc")) == 2


def test_replay_errors_are_one_line(recipe, tmp_path, capsys):
    assert main(["replay", str(tmp_path), "--plugin", "tensorboard"]) == 2
    assert "events.jsonl not found" in capsys.readouterr().err

    run = tmp_path / "run"
    fit(recipe, run, plugins=(), epochs=1)
    assert main(["replay", str(run), "--plugin", "nosuch"]) == 2
    assert "unknown plugin 'nosuch'" in capsys.readouterr().err
    assert main(["replay", str(run), "--plugin", "viz:every_epoch=perhaps"]) == 2
    assert "every_epoch" in capsys.readouterr().err

    with (run / "events.jsonl").open("a") as log:
        log.write('{"event": "EpochEnd", "epoch": -1}\n')
    assert main(["replay", str(run), "--plugin", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minitrain: error: ") and "events.jsonl:" in err and "epoch" in err
    assert len(err.splitlines()) == 1


def test_report_reads_the_log_run_json_names_and_skips_a_cut_short_last_line(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = prepare(recipe, ["epochs=2"], ["jsonl:filename=log.jsonl"], ["console"], run)
    trainer.fit()
    assert json.loads((run / "run.json").read_text())["event_log"] == "log.jsonl"
    with (run / "log.jsonl").open("a") as log:
        log.write('{"event": "BatchStart", "epoch": 3, "batch_')  # killed while writing its last line
    assert main(["report", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"wrote {run / 'report.html'}" in out and "the last line is cut short" in err
    assert linked_images(run) == [f"plots/{name}" for name in CURVES]


def test_replay_refuses_a_plugin_that_acts_on_training(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    fit(recipe, run, plugins=(), epochs=1)
    assert main(["replay", str(run), "--plugin", "checkpoint"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("minitrain: error: replay: plugin 'checkpoint' acts on training itself (it is critical), and a "
                   "replay has no model or optimizer; replay feeds recorded events to plugins that watch")
    assert not (run / "checkpoints").exists()


def test_replay_through_jsonl_writes_a_copy_but_never_into_the_log_it_reads(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    fit(recipe, run, plugins=(), epochs=1)
    log = (run / "events.jsonl").read_text()
    assert main(["replay", str(run), "--plugin", "jsonl"]) == 2
    assert "would append to" in capsys.readouterr().err and (run / "events.jsonl").read_text() == log
    assert main(["replay", str(run), "--plugin", "jsonl:filename=copy.jsonl"]) == 0
    assert (run / "copy.jsonl").read_text() == log

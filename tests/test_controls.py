"""The training controls: accumulate, clip, ema, compile and profile plugins, the run limits every
recipe has (max_steps, max_time, limit_*_batches), and the commands around a run (--smoke,
summary, lr-find)."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from minitrain import hookimpl
from minitrain.commands import cli
from minitrain.commands.export import export, load
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import checkpointing
from minitrain.engine.registry import register_plugin
from minitrain.testing import Interrupt

FIRST_PARTY_PLUGINS = {
    "console",
    "jsonl",
    "csv",
    "checkpoint",
    "amp",
    "accumulate",
    "clip",
    "ema",
    "compile",
    "profile",
}

# No BatchNorm and no shuffling: K batches of b are exactly one batch of K·b, split in K.
PLAIN = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import minitrain


class Config(minitrain.RecipeConfig):
    epochs: int = 2
    batch_size: int = 4
    lr: float = 0.05
    device: str = "cpu"
    schedule: bool = False


def build(config, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 4, 4, generator=generator)
    labels = torch.arange(48) % 10
    train = DataLoader(TensorDataset(images, labels), batch_size=config.batch_size)
    val = DataLoader(TensorDataset(images[:16], labels[:16]), batch_size=8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step)
                 if config.schedule else None)
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=val,
                                scheduler=scheduler, scheduler_interval="step",
                                inputs={"size": [4, 4], "mean": [0.0] * 3, "std": [1.0] * 3})
"""


@pytest.fixture
def plain(write_recipe):
    return write_recipe(PLAIN, "plain.py")


def train(recipe, overrides=(), plugins=(), run_dir=None, resume=None, extra=()):
    trainer = prepare(RunRequest(recipe, list(overrides), list(plugins), ["console"], run_dir, resume=resume))
    for plugin in extra:
        register_plugin(trainer.pm, plugin)
    trainer.fit()
    return trainer


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


# --- accumulate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["schedule=true"]], ids=["constant-lr", "per-step-schedule"])
def test_k_accumulated_batches_train_like_one_batch_k_times_larger(plain, extra):
    with pytest.warns(UserWarning, match="advances once per optimizer step") if extra else warnings.catch_warnings():
        small = train(plain, ["batch_size=4", *extra], ["accumulate:steps=3"])
    large = train(plain, ["batch_size=12", *extra])
    assert small.state.global_step == 24 and large.state.global_step == 8  # batches; both took 8 optimizer steps
    for name, tensor in weights(small).items():
        torch.testing.assert_close(tensor, weights(large)[name], rtol=1e-5, atol=1e-6)
    assert small.optimizer.param_groups[0]["lr"] == pytest.approx(large.optimizer.param_groups[0]["lr"])


def test_accumulation_with_the_fp16_grad_scaler(plain):
    small = train(plain, ["batch_size=4"], ["accumulate:steps=3", "amp:dtype=fp16"])
    large = train(plain, ["batch_size=12"], ["amp:dtype=fp16"])
    assert (
        small.shared.grad_scaler is not None
        and small.shared.grad_scaler.get_scale() == large.shared.grad_scaler.get_scale()
    )
    for name, tensor in weights(small).items():
        torch.testing.assert_close(tensor, weights(large)[name], rtol=1e-3, atol=1e-4)  # fp16 forward


def test_a_window_shorter_than_k_ends_each_epoch(plain):
    grads = Grads()
    small = train(plain, ["batch_size=4"], ["accumulate:steps=5"], extra=[grads])  # 12 batches: 5 + 5 + 2
    large = train(plain, ["batch_size=20"])  # 48 images: 20 + 20 + 8
    assert len(grads.seen) == 6  # three optimizer steps per epoch
    for name, tensor in weights(small).items():
        torch.testing.assert_close(tensor, weights(large)[name], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:--resume. this run leaves out the plugin")
@pytest.mark.parametrize("stop", [4, 6], ids=["inside-a-window", "at-a-boundary"])
def test_resume_inside_or_at_the_end_of_a_window_is_bit_exact(plain, tmp_path, stop):
    plugins = ["accumulate:steps=3", "checkpoint:every_steps=1"]
    straight = train(plain, [], plugins, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(plain, [], plugins, tmp_path / "run", extra=[Interrupt(stop)])
    head = checkpointing.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert head["header"]["global_step"] == stop
    assert head["trainer"]["plugins"]["accumulate"]["window"] == stop % 3  # the window's gradients travel
    resumed = train(plain, [], plugins, tmp_path / "run", resume="auto")
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, weights(straight)[name]), name


# --- clip ----------------------------------------------------------------------------------------


class Grads:
    """Records the gradients the optimizer steps with, and the norm clip published."""

    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True, trylast=True)
    def optimizer_step(self, trainer):
        if trainer.shared.stepping:
            grads = [p.grad.detach().clone() for p in trainer.module.parameters()]
            self.seen.append((grads, trainer.shared.step_metrics.get("grad_norm")))
        return (yield)


def test_clip_by_norm_limits_the_step_and_publishes_the_norm_before_it(plain):
    grads = Grads()
    trainer = train(plain, ["epochs=1", "lr=0.5"], ["clip:max_norm=0.1"], extra=[grads])
    for clipped, norm in grads.seen:
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
        assert after <= 0.1 + 1e-6 and norm >= after and norm.device == trainer.device
    assert any(norm > 0.1 for _, norm in grads.seen)  # it had something to clip


def test_clip_by_value_and_with_accumulation_clips_only_the_stepping_batch(plain):
    grads = Grads()
    train(plain, ["epochs=1", "lr=0.5"], ["clip:value=0.01", "accumulate:steps=3"], extra=[grads])
    assert len(grads.seen) == 4  # 12 batches, 4 steps
    assert all(max(g.abs().max() for g in clipped) <= 0.01 for clipped, _ in grads.seen)


def test_clip_unscales_fp16_gradients_first(plain):
    grads = Grads()
    train(plain, ["epochs=1"], ["clip:max_norm=1000", "amp:dtype=fp16"], extra=[grads])
    assert all(norm < 100 for _, norm in grads.seen)  # the true norm, not one scaled by 65536


def test_clip_needs_exactly_one_limit(plain, capsys):
    assert cli.main(["run", str(plain), "--plugin", "clip"]) == 2
    assert "give one of max_norm=X or value=X" in capsys.readouterr().err


# --- ema -----------------------------------------------------------------------------------------


def test_ema_averages_on_the_device_resumes_exactly_validates_and_exports(plain, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = train(plain, ["epochs=1"], ["ema:decay=0.5", "checkpoint"], run)
    ema = trainer.pm.get_plugin("ema")
    assert ema.updates == 12
    assert not torch.equal(ema.average[0], trainer.module[1].weight)  # an average, not the weights

    averaged = train(plain, ["epochs=1"], ["ema:decay=0.5,evaluate=true"], tmp_path / "evaluated")
    model = averaged.module
    not_evaluated = weights(train(plain, ["epochs=1"], ["ema:decay=0.5"], tmp_path / "not-evaluated"))
    ema_plugin = averaged.pm.get_plugin("ema")
    assert not torch.equal(dict(zip(ema_plugin.names, ema_plugin.average))["1.weight"], not_evaluated["1.weight"])
    for name, tensor in weights(averaged).items():  # validation put the trained weights back
        assert torch.equal(tensor, not_evaluated[name]), name
    model.load_state_dict(dict(zip(averaged.pm.get_plugin("ema").names, averaged.pm.get_plugin("ema").average)))
    with torch.no_grad():
        loss = sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in averaged.val_loader) / 16
    assert averaged.state.metrics["val_loss"] == pytest.approx(float(loss), rel=1e-6)

    assert (
        cli.main(
            [
                "run",
                str(plain),
                "--plugin",
                "ema:decay=0.5",
                "--plugin",
                "checkpoint",
                "--no-plugin",
                "console",
                "--run-dir",
                str(run),
                "--resume",
                "auto",
                "--set",
                "epochs=2",
            ]
        )
        == 0
    )
    straight = train(plain, [], ["ema:decay=0.5"])
    resumed = checkpointing.load(run / "checkpoints" / "last.pt")["trainer"]["plugins"]["ema"]
    assert all(
        torch.equal(resumed["ema_weights"][n], a)
        for n, a in zip(straight.pm.get_plugin("ema").names, straight.pm.get_plugin("ema").average)
    )

    exported, _ = load(export(run, ema=True, out=tmp_path / "ema.pt2"))
    with torch.no_grad():
        model.load_state_dict(resumed["ema_weights"])
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(exported(x), model(x))


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_warms_up_so_that_a_short_run_averages_trained_weights(plain, warmup):
    trainer = prepare(
        RunRequest(plain, ["max_steps=2"], [f"ema:decay=0.999,warmup={str(warmup).lower()}"], ["console"])
    )
    seen = [weights(trainer)]

    class After:
        @hookimpl(trylast=True)
        def on_batch_end(self, trainer):
            seen.append(weights(trainer))

    register_plugin(trainer.pm, After())
    trainer.fit()
    decays = [0.1, 2 / 11] if warmup else [0.999, 0.999]
    expected = seen[0]["1.weight"]
    for decay, step in zip(decays, seen[1:]):
        expected = decay * expected + (1 - decay) * step["1.weight"]
    ema = trainer.pm.get_plugin("ema")
    torch.testing.assert_close(ema.average[ema.names.index("1.weight")], expected)


def test_export_ema_without_the_plugin_says_so(plain, tmp_path, capsys):
    train(plain, ["epochs=1"], ["checkpoint"], tmp_path / "run")
    assert cli.main(["export", str(tmp_path / "run"), "--ema"]) == 2
    assert "holds no moving average (train with --plugin ema)" in capsys.readouterr().err


# --- compile -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:--resume. this run leaves out the plugin")  # resumed without compile, on purpose
def test_compile_changes_no_tensor_name_and_trains_like_eager(plain, tmp_path):
    eager = train(plain, ["epochs=1"], ["checkpoint"], tmp_path / "eager")
    compiled = train(plain, ["epochs=1"], ["checkpoint", "compile:backend=aot_eager"], tmp_path / "compiled")
    assert compiled.module._compiled_call_impl is not None  # compiled in place
    saved = checkpointing.load(tmp_path / "compiled" / "checkpoints" / "last.pt")["trainer"]["model"]
    assert list(saved) == list(eager.module.state_dict())  # no _orig_mod. anywhere
    for name, tensor in weights(compiled).items():
        torch.testing.assert_close(tensor, weights(eager)[name], rtol=1e-5, atol=1e-6)
    resumed = prepare(
        RunRequest(plain, ["epochs=2"], ["checkpoint"], ["console"], tmp_path / "compiled", resume="auto")
    )
    assert resumed.state.global_step == 12  # a compiled run's checkpoint resumes without the plugin
    assert load(export(tmp_path / "compiled"))[1]["num_classes"] == 10


def test_a_compiler_that_fails_warns_once_and_the_run_goes_on_eager(plain):
    from torch._dynamo import register_backend

    @register_backend
    def always_fails(graph, example_inputs):
        raise RuntimeError("no such compiler here")

    with pytest.warns(UserWarning, match="compile: torch.compile failed .*training goes on eager") as caught:
        trainer = train(plain, ["epochs=1"], ["compile:backend=always_fails"])
    assert len([w for w in caught if "compile:" in str(w.message)]) == 1
    assert trainer.state.global_step == 12 and trainer.module._compiled_call_impl is None


@pytest.mark.skipif(not any(map(shutil.which, ("cc", "gcc", "clang"))), reason="inductor needs a C compiler on the CPU")
def test_inductor_gives_amax_over_bf16_the_gradient_eager_gives():
    """The max-pool head of the CIFAR-10 networks under bf16 autocast: inductor left to keep bf16
    intermediates in fp32 turns every gradient into NaN (PyTorch 2.14 here, 2.11 on CUDA); the
    plugin's default options prevent it."""
    from minitrain_plugins.compile import Compile, compile_in_place

    class MaxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return torch.amax(torch.nn.functional.gelu(self.conv(x)), dim=(2, 3))

    torch.manual_seed(0)
    x = torch.randn(16, 3, 7, 7)
    eager, compiled = MaxHead(), MaxHead()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compile_in_place(compiled, Compile.Config())
    for model in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().square().sum().backward()
    torch.testing.assert_close(compiled.conv.weight.grad, eager.conv.weight.grad, rtol=2e-2, atol=1e-2)


# --- profile -------------------------------------------------------------------------------------


def test_profile_writes_a_trace_over_its_window_and_then_leaves_the_run(plain, tmp_path, capsys):
    trainer = train(plain, ["epochs=1"], ["profile:wait=2,warmup=1,active=3,top=5"], tmp_path / "run")
    out = capsys.readouterr().out
    assert "profile of 3 steps (after 3), top 5 operators by self cpu time total" in out and "aten::" in out
    trace = json.loads((tmp_path / "run" / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    assert list((tmp_path / "run" / "profile" / "tensorboard").glob("*.pt.trace.json"))
    assert trainer.pm.get_plugin("profile") is None  # no per-step call after its window


# --- limits --------------------------------------------------------------------------------------


class Batches:
    def __init__(self):
        self.train, self.val = [], []

    @hookimpl
    def on_epoch_start(self, event):
        self.train.append(event.steps)

    @hookimpl(wrapper=True)
    def eval_step(self, batch):
        self.val.append(len(batch[1]))
        return (yield)


@pytest.mark.parametrize("limit, steps", [("2", 2), ("0.25", 3), ("50", 12)])
def test_limit_train_and_val_batches(plain, limit, steps):
    seen = Batches()
    trainer = train(plain, [f"limit_train_batches={limit}", "limit_val_batches=1"], extra=[seen])
    assert trainer.state.global_step == 2 * steps and seen.train == [steps, steps]
    assert seen.val == [8, 8]  # one validation batch each epoch


def test_max_steps_stops_mid_epoch_resumably_and_exactly(plain, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["run", str(plain), "--plugin", "checkpoint", "--no-plugin", "console", "--run-dir", str(run)]
    assert cli.main(args + ["--set", "max_steps=7"]) == 0
    out, err = capsys.readouterr()
    assert "done: 0 epochs, 7 steps" in out
    assert "stopped at step 7: max_steps=7 reached; resume with: minitrain run" in err and "max_steps=N" in err
    head = checkpointing.load(run / "checkpoints" / "last.pt")["header"]
    assert (head["epoch"], head["batch_idx"], head["global_step"]) == (0, 7, 7)
    assert cli.main(args + ["--resume", "auto"]) == 0  # done as asked: nothing to train, and that is no error
    assert f"run already complete: max_steps=7 reached ({run}); raise max_steps" in capsys.readouterr().out
    assert cli.main(args + ["--resume", "auto", "--set", "max_steps=20"]) == 0
    straight = train(plain, ["max_steps=20"])
    resumed = checkpointing.load(run / "checkpoints" / "last.pt")["trainer"]["model"]
    assert all(torch.equal(resumed[k], v) for k, v in weights(straight).items())


class Slow:
    @hookimpl
    def on_batch_end(self):
        import time

        time.sleep(0.05)


def test_max_time_stops_at_a_step_boundary_with_a_checkpoint(plain, tmp_path):
    trainer = train(plain, ["max_time=0.3", "epochs=50"], ["checkpoint"], tmp_path / "run", extra=[Slow()])
    assert trainer.state.stop_reason == "max_time=0:00:00 reached" and 1 <= trainer.state.global_step < 50 * 12
    head = checkpointing.load(tmp_path / "run" / "checkpoints" / "last.pt")["header"]
    assert head["global_step"] == trainer.state.global_step  # saved where it stopped


def test_max_time_reads_clock_times(plain):
    assert prepare(RunRequest(plain, ["max_time=1:02:03"], [], ["console"])).limits.max_time == 3723
    with pytest.raises(Exception, match="max_time"):
        prepare(RunRequest(plain, ["max_time=soon"], [], ["console"]))


# --- commands around a run -----------------------------------------------------------------------


def test_smoke_runs_every_plugin_twice_and_cleans_up(plain, tmp_path, capsys):
    assert cli.main(["run", str(plain), "--smoke", "--plugin", "checkpoint", "--plugin", "ema"]) == 0
    out = capsys.readouterr().out
    assert "smoke test of" in out and "trained 2 batches of the 12 an epoch has" in out
    assert (
        "validated 2 batches: val_loss" in out
        and "plugin ema: on_validation_end, on_validation_start, optimizer_step, setup" in out
    )
    assert "checkpoint last.pt: loads and fits the model" in out and "removed its run directory" in out
    removed = Path(out.split("removed its run directory ")[1].split(" (")[0])
    assert not removed.exists() and not Path("runs").exists()
    assert cli.main(["run", str(plain), "--smoke", "--run-dir", str(tmp_path / "kept")]) == 0
    assert "kept the run directory" in capsys.readouterr().out and (tmp_path / "kept" / "events.jsonl").is_file()


def test_summary_prints_each_module_with_its_output_shape(plain, capsys):
    assert cli.main(["summary", str(plain)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("plain.py: 1.9k parameters (1.9k trainable), 7.6 kB, float32 on cpu")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert rows["(model)"] == ["Sequential", "4×10", "1,898"]
    assert rows["1"] == ["Linear", "4×32", "1,568"] and rows["0"] == ["Flatten", "4×48", "0"]
    assert not Path("runs").exists()  # nothing written


def test_lr_find_suggests_a_rate_and_touches_no_run(plain, tmp_path, capsys):
    out = tmp_path / "lr.png"
    assert (
        cli.main(["lr-find", str(plain), "--steps", "40", "--min-lr", "1e-4", "--max-lr", "10", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    suggested = float(printed.split("suggested lr: ")[1].split()[0])
    assert 1e-4 < suggested < 10 and f"--set=lr={suggested:.3g}" in printed
    assert out.stat().st_size > 10_000 and not Path("runs").exists()


def test_lr_find_suggests_where_the_loss_falls_fastest():
    """On a made curve (flat, falling fastest at 1e-2, bottoming out at 1e-1, then rising steeply)
    the suggestion is 1e-2: not the steepest rise, not the bottom."""
    from minitrain.commands.lr_find import steepest

    lrs = [10 ** (-4 + 4 * i / 80) for i in range(81)]  # 1e-4 .. 1
    losses = [
        2.3 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 2))) if lr <= 0.1 else 0.9 + 8 * (math.log10(lr) + 1)
        for lr in lrs
    ]
    assert steepest(lrs, losses) == pytest.approx(1e-2, rel=0.06)


def test_lr_find_trains_each_step_at_the_rate_it_reports(plain):
    """The sweep sets every parameter group's rate before each step, growing exponentially from
    --min-lr to --max-lr (in units of the recipe's lr), and the rates it reports are those used."""
    from minitrain.commands.lr_find import _sweep

    class Rates:
        def __init__(self):
            self.seen = []

        @hookimpl(tryfirst=True)
        def optimizer_step(self, trainer):
            self.seen.append(trainer.optimizer.param_groups[0]["lr"])

    trainer = prepare(RunRequest(plain, [], [], ["console"]))
    rates = Rates()
    register_plugin(trainer.pm, rates)
    lrs, losses = _sweep(trainer, 0.05, 1e-3, 1.0, 12)
    assert len(lrs) == len(losses) == len(rates.seen) == 12
    assert rates.seen == pytest.approx(lrs) and lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1.0) and all(b / a == pytest.approx(lrs[1] / lrs[0]) for a, b in zip(lrs, lrs[1:]))


def test_accumulate_refuses_to_skip_non_finite_batches(plain, tmp_path, capsys):
    assert (
        cli.main(
            [
                "run",
                str(plain),
                "--plugin",
                "accumulate:steps=2",
                "--set",
                "nonfinite_loss=skip",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "accumulate: nonfinite_loss=skip would drop a batch" in capsys.readouterr().err

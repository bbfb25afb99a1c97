"""The throughput plugin: FLOPs counted exactly (by hand for known nets), FLOP/s and MFU in the
events, the console and metrics.csv of a real run that trains exactly as without the plugin, the
CPU's measured peak cached, the published GPU peaks found by name, no MFU without a peak."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minitrain.commands.start import RunRequest, prepare
from minitrain.engine.surface import Shared
from minitrain.testing import EpochLog
from minitrain_plugins import throughput
from minitrain_plugins.throughput import Throughput, find_peak, measured_peak, published_peak, step_flops

FIRST_PARTY_PLUGINS = {"throughput", "csv", "amp"}

# A conv net with BatchNorm over a shuffled DataLoader: FLOPs per sample, by hand, with the
# gradients autograd computes (the input needs none):
#   conv 3->4, 3x3, 6x6 -> 4x4: forward 2*4*3*9*16 = 3456; backward: the weight's gradient only, 3456
#   linear 64->2: forward 2*64*2 = 256; backward: its input's and its weight's gradients, 2*256
RECIPE_FLOPS = 3456 * 2 + 256 * 3
RECIPE = """
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import minitrain


class Config(minitrain.RecipeConfig):
    epochs: int = 2
    batch_size: int = 8
    lr: float = 0.05
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"


def build(config, device):
    x = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    y = (x.mean((1, 2, 3)) > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=config.batch_size, shuffle=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train,
                                val_loader=DataLoader(TensorDataset(x[:16], y[:16]), batch_size=16))
"""


def test_the_flops_of_known_nets_are_counted_exactly():
    b = 4
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    # forward 2*M*N*K per layer; backward twice that, but the first layer's input needs no gradient
    forward = 2 * b * 8 * 16 + 2 * b * 16 * 3
    backward = 2 * (2 * b * 16 * 3) + 2 * b * 8 * 16
    assert step_flops(mlp, F.cross_entropy, torch.randn(b, 8), torch.randint(0, 3, (b,))) == forward + backward

    frozen = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    frozen[0].requires_grad_(False)  # a frozen first layer: no backward; the second needs no input gradient
    assert step_flops(frozen, F.cross_entropy, torch.randn(b, 8), torch.randint(0, 3, (b,))) == forward + 2 * b * 16 * 3


def test_counting_leaves_gradients_and_batchnorm_statistics_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    before = {name: b.clone() for name, b in net.named_buffers()}
    flops = step_flops(net, F.cross_entropy, torch.randn(5, 3, 6, 6) + 3, torch.randint(0, 2, (5,)))
    assert flops == 5 * RECIPE_FLOPS
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[name], b) for name, b in net.named_buffers())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(throughput.CACHE_ENV, str(folder))
    return folder


def run(recipe, plugins, run_dir, epochs=2):
    trainer = prepare(RunRequest(recipe, [f"epochs={epochs}"], plugins, [], run_dir=run_dir))
    log = EpochLog()
    trainer.pm.register(log)
    trainer.fit()
    return trainer, log.metrics


def test_flops_and_mfu_reach_the_events_console_and_csv_of_a_run_that_trains_as_without(
    write_recipe, cache, tmp_path, capsys
):
    recipe = write_recipe(RECIPE)
    without = run(recipe, ["amp:dtype=bf16"], "plain")[1]
    capsys.readouterr()
    trainer, metrics = run(recipe, ["amp:dtype=bf16", "throughput:every_steps=2"], "run")
    out = capsys.readouterr().out

    for got, want in zip(metrics, without, strict=True):  # the count's batch and step changed nothing
        timed = ("epoch_time", "samples_per_s", "flops_per_s", "measured_peak_flops_per_s", "mfu")
        assert {k: v for k, v in got.items() if k not in timed} == {k: v for k, v in want.items() if k not in timed}
        assert got["flops_per_s"] == pytest.approx(got["samples_per_s"] * RECIPE_FLOPS)
        assert got["mfu"] == pytest.approx(got["flops_per_s"] / got["measured_peak_flops_per_s"])
        assert 0 < got["mfu"] < 1

    (key, entry), *_ = json.loads((cache / "peaks.json").read_text()).items()  # the run's dtype and layout
    assert key.endswith("| bf16 | contiguous") and entry["peak"] == metrics[0]["measured_peak_flops_per_s"]
    assert f"{RECIPE_FLOPS:.3g} FLOPs per sample (forward and backward); bf16, contiguous" in out
    assert out.count("of measured peak") == 2  # one console line per epoch
    assert set(trainer.shared.step_metrics) == {"samples_per_s_step", "flops_per_s_step", "mfu_step"}  # every 2

    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"flops_per_s", "measured_peak_flops_per_s", "mfu"} <= set(header) and len(rows) == 3
    ends = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["metrics"]["mfu"] for e in ends if e["event"] == "EpochEnd"] == [m["mfu"] for m in metrics]


def test_the_measured_peak_is_kept_and_read_back_not_measured_again(tmp_path):
    first = measured_peak("fp32", "channels-last", tmp_path, seconds=0.05)
    assert first["peak"] == max(first["conv"], first["matmul"]) > 0
    path = tmp_path / "peaks.json"
    cache = json.loads(path.read_text())
    (key,) = cache
    assert f"torch {torch.__version__} | {torch.get_num_threads()} threads | fp32 | channels-last" in key
    cache[key]["peak"] = 1.25e9  # a value no probe measured: what comes back is what the file says
    path.write_text(json.dumps(cache))
    assert measured_peak("fp32", "channels-last", tmp_path, seconds=0.05)["peak"] == 1.25e9
    assert json.loads(path.read_text()) == cache


def test_published_gpu_peaks_are_found_by_name_and_scaled_to_the_sms_seen():
    tera = 1e12
    assert published_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4 * tera
    assert published_peak("NVIDIA H100 PCIe", "bf16") == 756.5 * tera
    assert published_peak("NVIDIA H100 NVL", "tf32") == 417.5 * tera
    assert published_peak("NVIDIA H200", "bf16") == 989.4 * tera
    assert published_peak("NVIDIA GH200 480GB", "bf16") == 990 * tera
    assert published_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156 * tera
    assert published_peak("NVIDIA A100-PCIE-40GB", "fp32") == 19.5 * tera
    assert published_peak("NVIDIA A10", "bf16") == 125 * tera
    assert published_peak("NVIDIA L4", "bf16") == 121 * tera
    assert published_peak("NVIDIA L40S", "bf16") == 362.05 * tera
    assert published_peak("NVIDIA H200", "bf16", sms=66) == 989.4 * tera / 2  # half a GPU (MIG)
    assert published_peak("Tesla T4", "bf16") is None  # no bf16 on a T4
    assert published_peak("NVIDIA GeForce GTX 1080", "fp32") is None


def test_a_device_without_a_known_peak_gets_flops_per_second_without_mfu():
    config = Throughput.Config()
    assert find_peak(torch.device("mps"), "fp32", "contiguous", config)[0] is None
    plugin = Throughput(config)
    plugin.flops_per_sample = 100.0
    shared = Shared()
    plugin.publish(shared, None, "peak")
    assert {name: derive({"samples_per_s": 10.0}) for name, derive in shared.epoch_metrics.items()} == {
        "flops_per_s": 1000.0
    }
    plugin.publish(shared, 4000.0, "peak")  # the option peak_tflops, or a published peak
    assert {name: derive({"samples_per_s": 10.0}) for name, derive in shared.epoch_metrics.items()} == {
        "flops_per_s": 1000.0,
        "peak_flops_per_s": 4000.0,
        "mfu": 0.25,
    }

"""Throughput: how close a run comes to the hardware, per epoch (and every N steps if asked).

* FLOPs per sample are counted once, at fit start, by ``torch.utils.flop_counter`` on one real
  training batch, forward and backward (the gradients the run computes: not an input's), never
  per step. The batch and the probe below leave the random generators as they were, the
  gradients are computed with ``torch.autograd.grad`` (nothing lands in ``.grad``) and
  BatchNorm's statistics are put back, so the run trains exactly as it would without the plugin.
* Each ``EpochEnd`` then carries ``flops_per_s`` (the epoch's ``samples_per_s`` times that count:
  training time only, validation not counted) and, where the peak is known, ``mfu``: that over
  the peak of the device(s) for the type the step computes in. The values are derived by the
  trainer from its own epoch timing (``trainer.shared.epoch_metrics``), so they are in the event
  itself, and from there in the console, ``metrics.csv``, TensorBoard, MLflow and the report.
* The peak: for a known CUDA GPU the vendor's published dense figure (``PUBLISHED``), scaled to
  the SMs the process sees (a MIG slice); for a CPU a *measured peak*: a convolution and a matmul
  in the run's dtype and layout on its threads, two to three seconds, cached per CPU model, torch
  version, threads, dtype and layout in ``peaks.json`` under ``$MINITRAIN_CACHE`` (default
  ``~/.cache/minitrain``). Its column is ``measured_peak_flops_per_s``, a published one's
  ``peak_flops_per_s``. Another device: FLOP/s without MFU (``peak_tflops`` sets a peak).

``every_steps=N`` also publishes ``samples_per_s_step``, ``flops_per_s_step`` and ``mfu_step``
over the last N steps in ``trainer.shared.step_metrics``, which ``console``, ``tensorboard`` and
``mlflow`` show with the loss. No host-device sync: the per-epoch figures use the trainer's
timing, the per-step ones the host's clock (on an accelerator, a queue's length ahead of the
device). Rank 0 only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine import distributed
from minitrain.engine.device import batch_size, get_rng_state, set_rng_state, to_device
from minitrain.engine.files import write_atomic
from minitrain.engine.surface import TrainerView

CACHE_ENV = "MINITRAIN_CACHE"
T = 1e12
# Dense (no sparsity) peaks in FLOP/s by dtype, and the SMs of the full GPU; the datasheets list
# tensor-core figures "with sparsity", which are twice the dense ones halved here.
PUBLISHED: list[tuple[str, dict[str, float], int]] = [
    # NVIDIA GH200 Grace Hopper Superchip datasheet
    (r"\bGH200\b", {"fp32": 67 * T, "tf32": 494 * T, "bf16": 990 * T, "fp16": 990 * T}, 132),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 NVL column): 1,671 TFLOPS bf16 with sparsity
    (r"\bH200 NVL\b", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T}, 132),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column): 1,979 TFLOPS bf16 with sparsity
    (r"\bH200\b", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T}, 132),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 NVL column): 1,671 TFLOPS bf16 with sparsity
    (r"\bH100 NVL\b", {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp16": 835.5 * T}, 132),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column): 1,513 TFLOPS bf16 with sparsity
    (r"\bH100 PCIe\b", {"fp32": 51 * T, "tf32": 378 * T, "bf16": 756.5 * T, "fp16": 756.5 * T}, 114),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column, "NVIDIA H100 80GB HBM3")
    (r"\bH100\b", {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T}, 132),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe alike): 312 TFLOPS bf16 dense
    (r"\bA100\b", {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T}, 108),
    # NVIDIA A30 Tensor Core GPU datasheet
    (r"\bA30\b", {"fp32": 10.3 * T, "tf32": 82 * T, "bf16": 165 * T, "fp16": 165 * T}, 56),
    # NVIDIA A10 Tensor Core GPU datasheet
    (r"\bA10\b", {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T}, 72),
    # NVIDIA L40S GPU datasheet
    (r"\bL40S\b", {"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T}, 142),
    # NVIDIA L40 GPU datasheet
    (r"\bL40\b", {"fp32": 90.5 * T, "tf32": 90.5 * T, "bf16": 181.05 * T, "fp16": 181.05 * T}, 142),
    # NVIDIA L4 Tensor Core GPU datasheet: 242 TFLOPS bf16/fp16, 120 tf32, with sparsity
    (r"\bL4\b", {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T}, 58),
    # NVIDIA V100 Tensor Core GPU datasheet (SXM2 column); no bf16, no tf32
    (r"\bV100-SXM2\b", {"fp32": 15.7 * T, "fp16": 125 * T}, 80),
    # NVIDIA V100 Tensor Core GPU datasheet (PCIe column)
    (r"\bV100\b", {"fp32": 14 * T, "fp16": 112 * T}, 80),
    # NVIDIA T4 Tensor Core GPU datasheet
    (r"\bT4\b", {"fp32": 8.1 * T, "fp16": 65 * T}, 40),
]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Throughput:
    enabled_by_default = False
    role = "observer"
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        every_steps: int = Field(0, ge=0, description="also publish the rates every N steps (0: per epoch only)")
        peak_tflops: float | None = Field(None, gt=0, description="the device's peak, instead of the table or probe")
        cache_dir: str | None = Field(None, description=f"where measured peaks are kept (default: ${CACHE_ENV})")

    def __init__(self, config: Config):
        self.config = config
        self.flops_per_sample = 0.0
        self.peak: float | None = None  # FLOP/s of all the run's devices together
        self.mark: tuple[int, float] | None = None  # (global step, clock) where the step window began
        if not config.every_steps:
            self.on_batch_end = None  # type: ignore[method-assign, assignment]  # no per-step call at all

    @hookimpl(trylast=True)  # its line after the console's
    def on_fit_start(self, event, trainer) -> None:
        if trainer.replaying or not isinstance(trainer, TrainerView):
            return  # a replayed log has the figures already, and no model to count
        rng = get_rng_state()  # the batch taken and the probe's data leave the run's generators as they were
        try:
            self.flops_per_sample = count_flops(trainer)
            dtype = compute_dtype(trainer)
            layout = "channels-last" if channels_last(trainer.module) else "contiguous"
            peak, kind, where = find_peak(trainer.device, dtype, layout, self.config)
        finally:
            set_rng_state(rng)
        self.publish(trainer.shared, None if peak is None else peak * distributed.world_size(), kind)
        shown = f"{kind} {peak / 1e9:,.0f} GFLOP/s ({where})" if peak else f"unknown ({where}): FLOP/s without MFU"
        print(
            f"throughput: {self.flops_per_sample:.3g} FLOPs per sample (forward and backward); "
            f"{dtype}, {layout}; peak: {shown}",
            flush=True,
        )
        self.mark = None

    def publish(self, shared, peak: float | None, kind: str) -> None:
        """Have the trainer add FLOP/s (and, with a peak, the peak and MFU) to each epoch's metrics."""
        self.peak = peak
        derived = shared.epoch_metrics
        for name in [n for n in derived if n == "mfu" or n.endswith("flops_per_s")]:
            del derived[name]  # an earlier fit's
        derived["flops_per_s"] = lambda m: m.get("samples_per_s", 0.0) * self.flops_per_sample
        if peak is not None:
            derived[f"{kind.replace(' ', '_')}_flops_per_s"] = lambda _: peak
            derived["mfu"] = lambda m: m.get("samples_per_s", 0.0) * self.flops_per_sample / peak

    @hookimpl
    def on_batch_end(self, event, trainer) -> None:
        if event.global_step % self.config.every_steps:
            return
        now = time.perf_counter()
        if self.mark is not None and now > self.mark[1]:
            steps, seconds = event.global_step - self.mark[0], now - self.mark[1]
            rate = steps * event.batch_size * distributed.world_size() / seconds  # as if all batches were this size
            values = {"samples_per_s_step": rate, "flops_per_s_step": rate * self.flops_per_sample}
            if self.peak:
                values["mfu_step"] = values["flops_per_s_step"] / self.peak
            trainer.shared.step_metrics.update({k: torch.tensor(v) for k, v in values.items()})  # _step: not
            # the epoch's series (MLflow logs both under their own names)
        self.mark = (event.global_step, now)

    @hookimpl
    def on_epoch_start(self) -> None:
        self.mark = None  # validation between two epochs is not training time


# --- counting ------------------------------------------------------------------------------------


def count_flops(trainer) -> float:
    """Model FLOPs per sample of one training step, forward and backward, on the first batch of
    the loader (without touching ``.grad`` or BatchNorm's running statistics)."""
    batch = next(iter(trainer.train_loader))
    inputs, targets = to_device(batch, trainer.device)
    return step_flops(trainer.module, trainer.loss_fn, inputs, targets) / batch_size(batch)


def step_flops(module: torch.nn.Module, loss_fn, inputs, targets) -> int:
    """FLOPs of ``loss_fn(module(inputs), targets)`` and of the gradients of its trainable
    parameters, as ``torch.utils.flop_counter`` counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in module.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    try:
        with FlopCounterMode(display=False) as counter:
            loss = loss_fn(module(inputs), targets)
            if params:
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
    return counter.get_total_flops()


def compute_dtype(trainer) -> str:
    """``bf16``/``fp16`` (a plugin's choice or the model's own), ``tf32`` (fp32 on CUDA where
    cuDNN or cuBLAS may use TF32 tensor cores for the model's convolutions or matmuls), or fp32."""
    dtype = trainer.shared.compute_dtype or next(
        (p.dtype for p in trainer.module.parameters() if p.is_floating_point()), torch.float32
    )
    name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if name == "fp32" and trainer.device.type == "cuda":
        convs = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in trainer.module.modules())
        if torch.backends.cuda.matmul.allow_tf32 or (convs and torch.backends.cudnn.allow_tf32):
            return "tf32"
    return name


def channels_last(module: torch.nn.Module) -> bool:
    return any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in module.parameters()
    )


# --- the peak ------------------------------------------------------------------------------------


def find_peak(device: torch.device, dtype: str, layout: str, config) -> tuple[float | None, str, str]:
    """(FLOP/s of one device or None, its kind, where it comes from) for one device of the run."""
    if config.peak_tflops:
        return config.peak_tflops * T, "peak", "peak_tflops"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = published_peak(props.name, dtype, props.multi_processor_count)
        return peak, "peak", f"published for {props.name}, {dtype}" if peak else props.name
    if device.type == "cpu":
        found = measured_peak(dtype, layout, cache_dir(config))
        shown = f"conv {found['conv'] / 1e9:,.0f}, matmul {found['matmul'] / 1e9:,.0f}"
        return found["peak"], "measured peak", f"{shown}; {found['cpu']}, {found['threads']} threads"
    return None, "peak", f"no peak known for {device.type}"


def published_peak(name: str, dtype: str, sms: int | None = None) -> float | None:
    """The dense peak of the GPU called ``name`` for ``dtype``, from ``PUBLISHED``, scaled to
    ``sms`` streaming multiprocessors where the process sees fewer (a MIG slice); None if unknown."""
    for pattern, peaks, full in PUBLISHED:
        if re.search(pattern, name, re.IGNORECASE):
            peak = peaks.get(dtype)
            return None if peak is None else peak * min(1.0, (sms or full) / full)
    return None


def cache_dir(config=None) -> Path:
    folder = getattr(config, "cache_dir", None) or os.environ.get(CACHE_ENV)
    return Path(folder) if folder else Path.home() / ".cache" / "minitrain"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_peak(dtype: str, layout: str, folder: Path, seconds: float = 2.0) -> dict:
    """The CPU's measured peak for ``dtype`` and ``layout`` on the current threads: the faster of a
    convolution (forward and backward) and a matmul. Kept in ``folder/peaks.json``, one entry per
    CPU model, torch version, threads, dtype and layout; measured (about ``seconds``) only where
    the file has none."""
    path = folder / "peaks.json"
    threads = torch.get_num_threads()
    key = f"{cpu_model()} | torch {torch.__version__} | {threads} threads | {dtype} | {layout}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), dict) and "peak" in cache[key]:
        return cache[key]
    torch_dtype = {v: k for k, v in DTYPE_NAMES.items()}.get(dtype, torch.float32)
    conv, matmul = probe_conv(torch_dtype, layout, seconds / 2), probe_matmul(torch_dtype, seconds / 2)
    found = {
        "peak": max(conv, matmul),
        "conv": conv,
        "matmul": matmul,
        "cpu": cpu_model(),
        "threads": threads,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    cache[key] = found
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps(cache, indent=1).encode()
    write_atomic(path, lambda file: file.write(data), what="peak cache")
    return found


def _best_rate(work, flops: float, seconds: float) -> float:
    """FLOP/s of ``work()`` at its fastest repetition, after one to warm up, over about ``seconds``."""
    work()
    best, spent = float("inf"), 0.0
    for _ in range(100):
        start = time.perf_counter()
        work()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent >= seconds and best < float("inf"):
            break
    return flops / best


def probe_conv(dtype: torch.dtype, layout: str, seconds: float) -> float:
    """A 3x3, 256-channel convolution on 16x16 maps at batch 16, forward and backward."""
    n, c, hw = 16, 256, 16
    memory = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(dtype).to(memory_format=memory)
    x = torch.randn(n, c, hw, hw, dtype=dtype).to(memory_format=memory).requires_grad_()
    grad = torch.randn(n, c, hw, hw, dtype=dtype).to(memory_format=memory)

    def step():
        torch.autograd.grad(conv(x), (x, conv.weight), grad)

    return _best_rate(step, 3 * 2 * n * c * c * 9 * hw * hw, seconds)  # backward: twice the forward


def probe_matmul(dtype: torch.dtype, seconds: float) -> float:
    size = 1024
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return _best_rate(lambda: a @ b, 2 * size**3, seconds)

"""``minitrain export``: a trained model as one self-contained file, and reading such a file back.

Three formats, two of them PyTorch's own:

* ``exported-program`` (default): ``torch.export``, saved with ``torch.export.save`` (a ``.pt2``
  archive), the format PyTorch develops for deployment (AOTInductor, ExecuTorch);
* ``torchscript``: ``torch.jit.trace``, saved with ``torch.jit.save``; deprecated upstream, but
  what libtorch (C++) and much existing serving tooling load;
* ``onnx``: PyTorch's ONNX exporter, checked by ``onnx.checker`` and run by ONNX Runtime
  (:mod:`.onnx_file`), for runtimes outside PyTorch.

Each file holds the graph, the weights and the metadata (a ``minitrain.json`` extra file, or the
ONNX model's ``metadata_props``): class names, input size, the pixel scale and the normalisation
mean/std the model was trained with. That is everything
``minitrain predict`` needs, so using the file takes no recipe code. The batch dimension stays
free; the inputs are normalised float images, N×C×H×W.

The model is rebuilt from the run's recipe (its path is in ``run.json``) and ``config.json``:
by the recipe's ``build_model(config)`` if it has one, else by ``build(config, cpu)``, which
may need the data set. Then it gets the checkpoint's weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from minitrain.commands import onnx_file
from minitrain.engine import __version__, checkpointing
from minitrain.engine.errors import MinitrainError, describe_validation_error
from minitrain.engine.files import check_writable
from minitrain.kit.augment import TestTimeAugmented
from minitrain.kit.recipe import load_recipe
from minitrain_plugins.ema import STATE as EMA_STATE

METADATA = "minitrain.json"
FORMATS = {"exported-program": ".pt2", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
PIXEL_SCALE = 255.0
"""8-bit pixels are divided by this, then normalised with the mean and std."""


def add_parser(command) -> None:
    """Register ``minitrain export``."""
    parser = command("export", help="write a trained model as one self-contained file, with its metadata")
    parser.add_argument(
        "source",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run directory (its checkpoints/last.pt) or a checkpoint file inside one",
    )
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=list(FORMATS),
        default="exported-program",
        help="torch.export archive (.pt2, default), TorchScript (.torchscript.pt) or ONNX (.onnx, "
        "needs the serve extra)",
    )
    parser.add_argument("--out", metavar="FILE", help="where to write (default: in the run directory)")
    parser.add_argument("--recipe", metavar="PATH", help="the run's recipe file, if it moved since training")
    parser.add_argument(
        "--ema", action="store_true", help="export the moving average of the weights that the run's ema plugin kept"
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="include the run's test-time augmentation (its tta plugin's views) in the model, so "
        "that it scores as the run's validation did",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    print(f"wrote {export(args.source, args.fmt, args.out, args.recipe, args.tta, args.ema)}")
    return 0


def export(
    source: str | Path,
    fmt: str = "exported-program",
    out: str | Path | None = None,
    recipe: str | Path | None = None,
    tta: bool = False,
    ema: bool = False,
) -> Path:
    """Write the model of ``source`` (a run directory: its ``last.pt``; or a checkpoint file
    inside a run directory) in format ``fmt`` to ``out`` (default: ``<run dir>/model-<checkpoint
    name><suffix>``). ``recipe`` replaces the recipe path ``run.json`` records. With ``tta`` the
    file computes the run's test-time augmentation too; with ``ema`` it holds the weights'
    moving average that the ``ema`` plugin kept instead of the trained weights. Returns ``out``."""
    if fmt not in FORMATS:
        raise MinitrainError(f"unknown export format {fmt!r} (choose {' or '.join(FORMATS)})")
    run_dir, checkpoint = locate(source)
    suffix = "-ema" * ema + "-tta" * tta
    out = Path(out) if out else run_dir / f"model-{checkpoint.stem}{suffix}{FORMATS[fmt]}"
    check_writable(out.parent, "--out folder")
    model, metadata, example = prepare(run_dir, checkpoint, recipe, tta, ema)
    metadata["format"] = fmt
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {METADATA: json.dumps(metadata)}
    try:
        if fmt == "onnx":
            onnx_file.save(model, example, metadata, out)
        elif fmt == "torchscript":
            with _jit_quietly(), torch.no_grad():
                torch.jit.save(torch.jit.trace(model, example), str(out), _extra_files=extra)
        else:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, out, extra_files=extra)
    except OSError as exc:
        raise MinitrainError(f"cannot write {out}: {exc.strerror or exc}") from None
    except MinitrainError:
        raise
    except Exception as exc:  # the model does something the tracer cannot capture
        other = "torchscript" if fmt != "torchscript" else "exported-program"
        raise MinitrainError(
            f"{fmt} could not capture the model ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); --format {other} may"
        ) from None
    return out


def prepare(
    run_dir: Path, checkpoint: Path, recipe: str | Path | None = None, tta: bool = False, ema: bool = False
) -> tuple[torch.nn.Module, dict[str, Any], torch.Tensor]:
    """The model an exported file holds (in eval mode on the CPU, with the run's test-time
    augmentation when ``tta``), its metadata, and an example input batch."""
    model, metadata = rebuild(run_dir, checkpoint, recipe, ema)
    views = _read_json(run_dir / "run.json").get("test_time_augmentation")
    if tta:
        if not views:
            raise MinitrainError(
                f"--tta: the run in {run_dir} validated without test-time augmentation (no tta plugin)"
            )
        model, metadata["test_time_augmentation"] = TestTimeAugmented(model, **views).eval(), views
    elif views:
        warnings.warn(
            f"the run validated with test-time augmentation ({views}); this file does not, so it scores "
            "below the run's val_acc (--tta includes it)",
            stacklevel=2,
        )
    example = torch.zeros(2, len(metadata["mean"]), *metadata["input_size"])
    with torch.no_grad():
        metadata["num_classes"] = classes = model(example).shape[1]
    if metadata["class_names"] is None:
        metadata["class_names"] = [str(i) for i in range(classes)]
    elif len(metadata["class_names"]) != classes:
        raise MinitrainError(
            f"the model has {classes} outputs but the run names {len(metadata['class_names'])} classes"
        )
    return model, metadata, example


def locate(source: str | Path) -> tuple[Path, Path]:
    """``(run directory, checkpoint file)`` for a run directory or a checkpoint file in one."""
    source = Path(source)
    if source.is_dir():
        run = _read_json(source / "run.json")
        folder = (run.get("checkpoints") or [checkpointing.DEFAULT_DIR])[0]  # where the run recorded its checkpoints
        checkpoint = source / folder / "last.pt"
        if not checkpoint.is_file():
            raise MinitrainError(
                f"{source} has no {folder}/last.pt (it ran with --no-plugin checkpoint, or stopped "
                "before its first save); export a checkpoint file by its path"
            )
        return source, checkpoint
    if not source.is_file():
        raise MinitrainError(f"not found: {source} (give a run directory or a checkpoint file)")
    for folder in source.resolve().parents:
        if (folder / "run.json").is_file():
            return folder, source
    raise MinitrainError(
        f"{source} is not inside a run directory (none of its folders holds run.json), "
        "so its recipe and config are unknown"
    )


def rebuild(
    run_dir: Path, checkpoint: Path, recipe_path: str | Path | None = None, ema: bool = False
) -> tuple[torch.nn.Module, dict]:
    """The run's model with the checkpoint's weights (or their moving average, ``ema``), in eval
    mode on the CPU, and the metadata an exported file carries."""
    run = _read_json(run_dir / "run.json")
    inputs = run.get("inputs")
    if not inputs:
        raise MinitrainError(
            f"{run_dir / 'run.json'} does not record the input size and normalisation: the "
            "recipe's loader does not describe them (as ImageLoader does), and its Components "
            "have no inputs={'size': [H, W], 'mean': [...], 'std': [...]}"
        )
    recipe_path = Path(recipe_path or run["recipe"])
    if not recipe_path.is_file():
        raise MinitrainError(f"recipe {recipe_path} (recorded in {run_dir / 'run.json'}) not found; pass --recipe PATH")
    recipe = load_recipe(recipe_path)
    try:
        config = recipe.Config.model_validate({**_read_json(run_dir / "config.json"), "device": "cpu"})
    except ValidationError as exc:
        raise MinitrainError(
            f"{run_dir / 'config.json'} does not fit recipe {recipe_path}: {describe_validation_error(exc)}"
        ) from None
    if callable(getattr(recipe, "build_model", None)):
        model = recipe.build_model(config)
    else:
        model = recipe.build(config, torch.device("cpu")).model
    saved = checkpointing.load(checkpoint)
    weights = saved["trainer"]["model"]
    if ema:
        averages = [
            state[EMA_STATE]
            for state in saved["trainer"].get("plugins", {}).values()
            if isinstance(state, dict) and EMA_STATE in state
        ]
        if not averages:
            raise MinitrainError(f"--ema: {checkpoint} holds no moving average (train with --plugin ema)")
        weights = {**weights, **averages[0]}  # the average of every floating tensor; the rest as trained
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise MinitrainError(
            f"checkpoint {checkpoint} does not fit recipe {recipe_path}'s model: {' '.join(str(exc).split())[:300]}"
        ) from None
    metadata = {
        "class_names": run.get("class_names"),
        "input_size": inputs["size"],
        "pixel_scale": PIXEL_SCALE,
        "mean": inputs["mean"],
        "std": inputs["std"],
        "checkpoint": str(checkpoint),
        "global_step": saved["header"].get("global_step"),
        "minitrain_version": __version__,
        "torch_version": str(torch.__version__),
    }
    # fp32 and plain memory layout: what a file for other programs should hold (a channels-last
    # model would save, but with torch warning about its strided weights)
    return model.to(torch.float32, memory_format=torch.contiguous_format).eval(), metadata


def load(path: str | Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """``(model, metadata)`` from a file ``export`` wrote, whichever its format."""
    path = Path(path)
    if not path.is_file():
        raise MinitrainError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return onnx_file.load(path)
    fmt = _format(path)
    extra = {METADATA: ""}
    try:
        if fmt == "torchscript":
            with _jit_quietly():
                model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        else:
            with open(path, "rb") as file:  # a file object: torch.export.load insists on a .pt2 name otherwise
                model = torch.export.load(file, extra_files=extra).module()
    except Exception as exc:
        raise MinitrainError(
            f"{path}: unreadable {fmt} file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    if not extra[METADATA]:
        raise MinitrainError(
            f"{path} is a {fmt} file without minitrain's metadata (class names, input size, "
            "normalisation): write it with `minitrain export`"
        )
    return model, json.loads(extra[METADATA])


def _format(path: Path) -> str:
    """Tell the two formats apart by their archive's layout, without loading either."""
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if any(name.endswith("/archive_format") for name in names):
        return "exported-program"
    if any(name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    raise MinitrainError(
        f"{path} is not a model file that `minitrain export` writes (a TorchScript or torch.export "
        "archive, or an .onnx file)"
    )


@contextlib.contextmanager
def _jit_quietly():
    """TorchScript is deprecated upstream, and every jit call says so; the user chose it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MinitrainError(f"{path} not found: not a minitrain run directory") from None
    except (OSError, ValueError) as exc:
        raise MinitrainError(f"{path} is unreadable: {exc}") from None

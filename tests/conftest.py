"""Shared fixtures for the core test-suite: tiny fake CIFAR-10 on disk, a tiny recipe, an
installable throw-away third-party plugin distribution, and isolation from first-party plugins
that are not part of the core (they are developed separately and may be missing or broken)."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import minitrain.engine.registry
import minitrain.kit.data
from minitrain.testing import make_fake_cifar10

torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared 2-core machine

# First-party plugins every test sees; a test module lists any others it needs in a
# module-level FIRST_PARTY_PLUGINS set. The rest are hidden, so one plugin's breakage stays in
# its own tests.
CORE_PLUGINS = {"console", "jsonl"}
_real_discover = minitrain.engine.registry.discover


def _discover_only(wanted: set[str]):
    """The real discovery (real entry points, real importlib.metadata), minus first-party plugins
    not in ``wanted``; third-party plugins pass through."""

    def discover(autoload_third_party: bool | None = None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = _real_discover(autoload_third_party)
        return {
            name: info
            for name, info in found.items()
            if info.distribution != minitrain.engine.registry.FIRST_PARTY or name in wanted
        }

    return discover


def pytest_configure(config):
    # Generated data never matches the official release's checksums; load_cifar10 says so each time.
    config.addinivalue_line("filterwarnings", "ignore:.*differ from the official release:UserWarning")
    # A test's own observer plugin that fails (an assert in a hook) would otherwise only be
    # disabled with a warning; tests that inject such failures expect it with pytest.warns.
    config.addinivalue_line("filterwarnings", "error::minitrain.engine.registry.ObserverFailed")


@pytest.fixture(autouse=True)
def _isolate(request, monkeypatch, tmp_path):
    """Every test: only the first-party plugins its module asks for, no network, no autoload
    switch from the environment, and a scratch working directory (run dirs land under ``runs/``)."""
    wanted = CORE_PLUGINS | set(getattr(request.module, "FIRST_PARTY_PLUGINS", ()))
    monkeypatch.setattr(minitrain.engine.registry, "discover", _discover_only(wanted))
    monkeypatch.setattr(minitrain.kit.data, "_download", lambda root: None)
    monkeypatch.delenv(minitrain.engine.registry.DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def real_discover():
    """``minitrain.engine.registry.discover`` as shipped, not filtered."""
    return _real_discover


@pytest.fixture
def fake_cifar(tmp_path) -> Path:
    """A 5 x 16 training images / 32 test images CIFAR-10 in torchvision's pickled layout."""
    return make_fake_cifar10(tmp_path / "data", train_per_batch=16, test_size=32)


TINY_RECIPE = '''
"""A recipe small enough to train an epoch in milliseconds."""
from pathlib import Path
from typing import Literal

import torch
from torch import nn

import minitrain
from minitrain.kit.data import CIFAR10_CLASSES, cifar10_loaders


class Config(minitrain.RecipeConfig):
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.2
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    data_dir: Path = Path({data_dir!r})
    augment: bool = False


def build(config: Config, device: torch.device) -> minitrain.Components:
    train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, seed=config.seed,
                                  crop=2 if config.augment else 0,
                                  flip="random" if config.augment else "none")
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    return minitrain.Components(model=model, optimizer=optimizer, train_loader=train, val_loader=test,
                                class_names=CIFAR10_CLASSES)
'''


@pytest.fixture
def recipe(tmp_path, fake_cifar) -> Path:
    """Path of a tiny recipe whose data_dir defaults to ``fake_cifar`` (5 steps per epoch)."""
    path = tmp_path / "tiny_recipe.py"
    path.write_text(TINY_RECIPE.format(data_dir=str(fake_cifar)))
    return path


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe file from source text; returns its path."""

    def write(source: str, name: str = "custom_recipe.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def install_dist(tmp_path, monkeypatch):
    """Make a throw-away distribution importable and discoverable through a REAL entry point:
    ``install_dist(module_name, source, {"plugin_name": "module:attr"})`` writes the module and a
    ``<module>-1.0.dist-info`` (METADATA + entry_points.txt, group ``minitrain``) into a fresh
    site folder and prepends it to sys.path. The module is removed from sys.modules afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules = []

    def install(module: str, source: str, entry_points: dict[str, str], version: str = "1.0") -> Path:
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text("[minitrain]\n" + lines)
        modules.append(module)
        sys.modules.pop(module, None)
        return site

    yield install
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def collect_events():
    """A plugin that records every event it sees (through ``on_event``)."""
    from minitrain import hookimpl

    class Recorder:
        name = "recorder"

        def __init__(self):
            self.events = []

        @hookimpl
        def on_event(self, event):
            self.events.append(event)

        def names(self):
            return [type(e).__name__ for e in self.events]

    return Recorder

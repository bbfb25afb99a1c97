"""The plugin surface (minitrain.engine.surface) is what plugins get: a live trainer is a
``TrainerView``, the replay's stand-in a ``RunView`` and not a ``TrainerView``, and the first-party
plugins read and call nothing on the trainer that the surface does not declare."""

import re
from pathlib import Path

import pluggy
import torch

import minitrain
from minitrain.commands.replay import ReplayTrainer
from minitrain.engine import events as ev
from minitrain.engine.state import Limits, RunState, StopKind
from minitrain.engine.surface import RunView, Shared, TrainerView
from minitrain.kit.data import cifar10_loaders

PLUGINS = Path(__file__).parent.parent / "plugins"


def _members(protocol: type) -> set[str]:
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (object,) or cls.__name__ in ("Protocol", "Generic"):
            continue
        names |= set(getattr(cls, "__annotations__", {}))
        names |= {name for name in vars(cls) if not name.startswith("_")}
    return names


def test_a_live_trainer_is_a_trainer_view_with_the_declared_types(fake_cifar, tmp_path):
    seen = {}

    class Look:
        @minitrain.hookimpl
        def on_fit_start(self, event, trainer):
            seen["trainer"] = trainer

    train, test = cifar10_loaders(fake_cifar, 16, device="cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    trainer = minitrain.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        train,
        test,
        epochs=1,
        device="cpu",
        plugins=[Look()],
        run_dir=tmp_path / "run",
        limits=Limits(max_steps=2),
    )
    trainer.fit()
    live = seen["trainer"]
    assert isinstance(live, TrainerView) and isinstance(live, RunView)
    assert isinstance(live.run_dir, Path) and live.run_dir / "x" == tmp_path / "run" / "x"
    assert isinstance(live.state, RunState) and isinstance(live.shared, Shared) and live.replaying is False
    assert live.state.global_step == 2 and live.state.stop is not None and live.state.stop.kind is StopKind.MAX_STEPS


def test_the_replay_stand_in_is_a_run_view_only(tmp_path):
    stand_in = ReplayTrainer(tmp_path, pluggy.PluginManager("minitrain"))
    assert isinstance(stand_in, RunView) and not isinstance(stand_in, TrainerView)
    assert stand_in.replaying is True
    batch = ev.BatchEnd(epoch=1, batch_idx=4, global_step=9, batch_size=16, loss=0.5)
    seen = stand_in.follow(batch)
    assert torch.is_tensor(seen.loss) and seen.loss.item() == 0.5  # as a live run gives it
    assert (stand_in.state.batch_idx, stand_in.state.global_step) == (5, 9)


def test_first_party_plugins_use_only_the_surface():
    allowed = _members(TrainerView)
    used = {}
    for path in sorted(PLUGINS.glob("*.py")):
        for name in re.findall(r"\btrainer\.([A-Za-z_]\w*)", path.read_text()):
            if name not in allowed:
                used.setdefault(name, []).append(path.name)
    assert used == {}


def test_the_surface_check_sees_what_is_not_declared():
    allowed = _members(TrainerView)
    assert {"state", "shared", "request_stop", "module", "steps_per_epoch"} <= allowed
    assert "pm" not in allowed and "calls" not in allowed and "_stop" not in allowed

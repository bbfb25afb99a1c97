"""Plugins are found through real entry points, configured through validated options, and
rejected (naming plugin and hook) when their hook implementations do not match a spec."""

from __future__ import annotations

import json
import sys
import warnings

import pytest

import minitrain
from minitrain.commands import cli
from minitrain.engine.errors import MinitrainError
from minitrain.engine.registry import (
    DISABLE_AUTOLOAD_ENV,
    PluginRequest,
    check_hooks,
    hook_order,
    make_plugin_manager,
    parse_plugin_spec,
    register_plugin,
    resolve,
)

THIRDPARTY = '''
import minitrain
from pydantic import Field

IMPORTED = True


class ThirdParty:
    """A third-party plugin: counts epochs, greets at the start."""

    class Config(minitrain.PluginConfig):
        greeting: str = "hello"
        times: int = Field(1, ge=1)
        loud: bool = False

    def __init__(self, config):
        self.config = config
        self.epochs_seen = 0
        self.greeted = None

    @minitrain.hookimpl
    def on_fit_start(self, event):
        self.greeted = self.config.greeting * self.config.times

    @minitrain.hookimpl
    def on_epoch_end(self, event, trainer):
        self.epochs_seen += 1

    @minitrain.hookimpl(tryfirst=True)
    def on_batch_end(self, event):
        pass

    @minitrain.hookimpl(wrapper=True)
    def train_step(self, trainer, batch):
        return (yield)
'''


@pytest.fixture
def thirdparty(install_dist):
    install_dist("thirdparty_plugin", THIRDPARTY, {"thirdparty": "thirdparty_plugin:ThirdParty"})
    return "thirdparty"


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- discovery -------------------------------------------------------------------------------


def test_discover_finds_entry_point_with_version_and_distribution(thirdparty, real_discover):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # first-party plugins under development may warn
        found = real_discover()
    info = found[thirdparty]
    assert info.error is None
    assert info.distribution == "thirdparty-plugin"
    assert info.version == "1.0"
    assert info.target is sys.modules["thirdparty_plugin"].ThirdParty
    assert info.enabled_by_default is False
    assert info.config_model is info.target.Config
    # first-party plugins are offered through the same group
    assert found["console"].distribution == "minitrain" and found["jsonl"].distribution == "minitrain"


def test_resolve_instantiates_with_validated_options(thirdparty):
    chosen = dict(resolve([parse_plugin_spec("thirdparty:greeting=hi,times=3,loud=true")]))
    plugin = chosen["thirdparty"]
    assert type(plugin).__name__ == "ThirdParty"
    assert plugin.config.greeting == "hi"
    assert plugin.config.times == 3 and plugin.config.loud is True
    # on by default: the core's first-party loggers
    assert {"console", "jsonl"} <= set(chosen)


def test_resolve_without_request_leaves_off_by_default_plugin_out(thirdparty):
    assert "thirdparty" not in dict(resolve([]))


def test_no_plugin_disables_a_default_plugin():
    names = [name for name, _ in resolve([], {"console"})]
    assert "console" not in names and "jsonl" in names


def test_resolved_plugin_runs_in_a_trainer(thirdparty, recipe, tmp_path):
    from minitrain.commands.start import RunRequest, prepare

    trainer = prepare(
        RunRequest(recipe, plugins=["thirdparty:greeting=hey,times=2"], disabled=["console"], run_dir=tmp_path / "run")
    )
    plugin = trainer.pm.get_plugin("thirdparty")
    trainer.fit()
    assert plugin.greeted == "heyhey"
    assert plugin.epochs_seen == 1
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["plugins"]["thirdparty"] == {"greeting": "hey", "times": 2, "loud": False}


def test_cli_plugins_json_lists_it_with_hooks(thirdparty, capsys):
    code, out, _ = _cli(capsys, "plugins", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    row = rows["thirdparty"]
    assert row["version"] == "1.0"
    assert row["distribution"] == "thirdparty-plugin"
    assert row["error"] is None
    assert row["enabled_by_default"] is False
    assert row["hooks"] == ["on_batch_end", "on_epoch_end", "on_fit_start", "train_step"]
    assert set(row["options"]) == {"greeting", "times", "loud"}
    assert row["role"] == "critical"  # it wraps train_step: it changes training
    assert rows["jsonl"]["enabled_by_default"] is True and rows["jsonl"]["role"] == "observer"


def test_cli_plugins_text_lists_it(thirdparty, capsys):
    code, out, _ = _cli(capsys, "plugins")
    assert code == 0
    assert "thirdparty 1.0 (thirdparty-plugin, off by default, critical)" in out
    assert "hooks: on_batch_end, on_epoch_end, on_fit_start, train_step" in out


def test_disable_autoload_keeps_it_unimported_until_named(thirdparty, monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    found = minitrain.engine.registry.discover()
    assert "thirdparty_plugin" not in sys.modules
    assert found[thirdparty].error and DISABLE_AUTOLOAD_ENV in found[thirdparty].error
    # first-party plugins still load
    assert found["jsonl"].error is None and found["jsonl"].target is not None
    # the default set does not import it either
    resolve([], available=found)
    assert "thirdparty_plugin" not in sys.modules
    # named explicitly, it is imported and configured
    chosen = dict(resolve([PluginRequest("thirdparty", {"times": "2"})], available=found))
    assert "thirdparty_plugin" in sys.modules
    assert chosen["thirdparty"].config.times == 2


def test_disable_autoload_argument(thirdparty):
    found = minitrain.engine.registry.discover(autoload_third_party=False)
    assert "thirdparty_plugin" not in sys.modules
    assert found[thirdparty].version == "1.0"


def test_plugin_that_fails_to_import_warns_and_is_skipped(install_dist, real_discover, thirdparty):
    install_dist("broken_plugin", "import this_module_does_not_exist_anywhere\n", {"broken": "broken_plugin:Plugin"})
    with pytest.warns(UserWarning, match=r"skipping plugin 'broken'.*this_module_does_not_exist_anywhere"):
        found = real_discover()
    assert found["broken"].target is None
    assert "ModuleNotFoundError" in found["broken"].error
    assert found[thirdparty].error is None  # the others are unaffected
    assert "thirdparty" in dict(resolve([PluginRequest("thirdparty")], available=found))
    with pytest.raises(MinitrainError, match="plugin 'broken' cannot be used"):
        resolve([PluginRequest("broken")], available=found)


def test_broken_plugin_is_listed_by_cli(install_dist, capsys):
    install_dist("broken_plugin", "raise RuntimeError('half written')\n", {"broken": "broken_plugin:Plugin"})
    code, out, _ = _cli(capsys, "plugins", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert "half written" in rows["broken"]["error"]


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, key",
    [
        ("thirdparty:times=many", "times"),
        ("thirdparty:times=0", "times"),
        ("thirdparty:loud=perhaps", "loud"),
        ("thirdparty:colour=red", "colour"),
    ],
)
def test_bad_option_names_plugin_and_key(thirdparty, spec, key):
    with pytest.raises(MinitrainError) as info:
        resolve([parse_plugin_spec(spec)])
    message = str(info.value)
    assert "'thirdparty'" in message and key in message
    if key == "colour":
        assert "unknown key" in message


def test_option_given_to_plugin_without_config():
    class NoConfig:
        pass

    info = minitrain.engine.registry.PluginInfo("bare", target=NoConfig)
    with pytest.raises(MinitrainError, match=r"plugin 'bare' takes no options \(got x\)"):
        minitrain.engine.registry.instantiate(info, {"x": "1"})
    assert isinstance(minitrain.engine.registry.instantiate(info, {}), NoConfig)


@pytest.mark.parametrize("spec", [":a=1", "jsonl:flush_every", "jsonl:=3"])
def test_malformed_plugin_spec(spec):
    with pytest.raises(MinitrainError):
        parse_plugin_spec(spec)


def test_plugin_spec_parsing():
    req = parse_plugin_spec(" jsonl : filename = x.jsonl , flush_every=3 ")
    assert req.name == "jsonl" and req.options == {"filename": "x.jsonl", "flush_every": "3"}
    assert parse_plugin_spec("console").options == {}


def test_unknown_plugin_name():
    with pytest.raises(MinitrainError, match="unknown plugin 'nosuch'"):
        resolve([PluginRequest("nosuch")])


# --- hook validation -------------------------------------------------------------------------


class Misspelled:
    @minitrain.hookimpl
    def on_epoch_ned(self, event):
        pass


class WrongArgs:
    @minitrain.hookimpl
    def on_epoch_end(self, evnt, trainer):
        pass


def test_misspelled_hook_is_rejected_by_check_hooks():
    pm = make_plugin_manager()
    register_plugin(pm, Misspelled(), "typo")
    with pytest.raises(MinitrainError) as info:
        check_hooks(pm)
    assert "'typo'" in str(info.value) and "on_epoch_ned" in str(info.value)
    assert "on_epoch_end" in str(info.value)  # the known hooks are listed


def test_optional_hook_for_an_absent_spec_is_allowed():
    class Optional:
        @minitrain.hookimpl(optionalhook=True)
        def on_checkpoint_of_some_other_plugin(self, event):
            pass

    pm = make_plugin_manager()
    register_plugin(pm, Optional(), "optional")
    check_hooks(pm)


def test_wrong_argument_names_are_rejected_at_registration():
    pm = make_plugin_manager()
    with pytest.raises(MinitrainError) as info:
        register_plugin(pm, WrongArgs(), "wrongargs")
    message = str(info.value)
    assert "'wrongargs'" in message and "on_epoch_end" in message and "evnt" in message


@pytest.mark.parametrize("plugin, culprit", [(Misspelled(), "on_epoch_ned"), (WrongArgs(), "on_epoch_end")])
def test_trainer_construction_rejects_bad_plugin(plugin, culprit):
    model = __import__("torch").nn.Linear(2, 2)
    opt = __import__("torch").optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MinitrainError) as info:
        minitrain.Trainer(model, opt, [], epochs=1, device="cpu", plugins=[plugin])
    assert type(plugin).__name__.lower() in str(info.value) and culprit in str(info.value)


def test_bad_third_party_plugin_through_run(install_dist, recipe, tmp_path):
    install_dist(
        "typo_plugin",
        """
        import minitrain

        class Typo:
            @minitrain.hookimpl
            def on_fit_strat(self, event):
                pass
    """,
        {"typo": "typo_plugin:Typo"},
    )
    from minitrain.commands.start import RunRequest, prepare

    with pytest.raises(MinitrainError, match=r"'typo'.*on_fit_strat"):
        prepare(RunRequest(recipe, plugins=["typo"], run_dir=tmp_path / "run"))


def test_same_plugin_name_twice_is_an_error():
    class A:
        pass

    pm = make_plugin_manager()
    register_plugin(pm, A(), "a")
    with pytest.raises(MinitrainError, match="'a'"):
        register_plugin(pm, A(), "a")


# --- call order ------------------------------------------------------------------------------


def test_hook_order_puts_wrappers_first_and_core_last(thirdparty):
    pm = make_plugin_manager()
    for name, plugin in resolve([PluginRequest("thirdparty")]):
        register_plugin(pm, plugin, name)
    order = hook_order(pm)
    assert order["train_step"] == ["thirdparty (wrapper)", "core (trylast)"]
    assert order["setup"] == ["core (tryfirst)"]
    assert order["on_batch_end"][0] == "thirdparty (tryfirst)"
    assert order["on_batch_end"][-1] == "console (trylast)"  # its clock marks the end of all other work
    assert "jsonl" in order["on_event"] and "thirdparty" not in order["on_event"]


def test_cli_plugins_order(thirdparty, capsys):
    code, out, _ = _cli(capsys, "plugins", "--order", "--plugin", "thirdparty")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["train_step"] == "thirdparty (wrapper) -> core (trylast)"
    assert lines["on_fit_start"].split(" -> ")[0] == "jsonl (tryfirst)"
    assert "thirdparty" in lines["on_fit_start"]
    code, out, _ = _cli(capsys, "plugins", "--order", "--json")
    assert code == 0
    order = json.loads(out)
    assert order["backward"] == ["core (trylast)"]
    assert not any("thirdparty" in impl for impls in order.values() for impl in impls)


# --- plugins from a local file --------------------------------------------------------------------

LOCAL_PLUGIN = """
import minitrain
from pydantic import Field


class LossAlarm:
    class Config(minitrain.PluginConfig):
        ceiling: float = Field(10.0, gt=0)

    def __init__(self, config):
        self.config = config

    @minitrain.hookimpl
    def on_epoch_end(self, event, trainer):
        if event.metrics["train_loss"] > self.config.ceiling:
            trainer.request_stop(f"train_loss above {self.config.ceiling}")
"""


@pytest.fixture(autouse=True)
def _forget_local_modules():
    yield
    for name in ("my_plugins", "alarms", "shapes"):
        sys.modules.pop(name, None)


def test_a_plugin_in_a_local_file_is_named_by_its_import_path(recipe, tmp_path, capsys):
    from minitrain.commands import cli

    (tmp_path / "my_plugins.py").write_text(LOCAL_PLUGIN)  # in the working directory
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "--set",
                "epochs=3",
                "--plugin",
                "my_plugins.LossAlarm:ceiling=0.001",
                "--no-plugin",
                "console",
                "--run-dir",
                str(run),
            ]
        )
        == 0
    )
    assert "done: 1 epochs" in capsys.readouterr().out  # it stopped the run after the first epoch
    assert json.loads((run / "run.json").read_text())["plugins"]["my_plugins.LossAlarm"] == {"ceiling": 0.001}

    assert cli.main(["plugins", "--order", "--plugin", "my_plugins.LossAlarm"]) == 0
    assert "on_epoch_end: my_plugins.LossAlarm" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "--plugin",
                "my_plugins.LossAlarm:ceiling=0.001",
                "--no-plugin",
                "my_plugins.LossAlarm",
                "--no-plugin",
                "console",
                "--run-dir",
                str(tmp_path / "off"),
            ]
        )
        == 0
    )
    assert (
        "done: 1 epochs" in capsys.readouterr().out
        and "my_plugins.LossAlarm" not in json.loads((tmp_path / "off" / "run.json").read_text())["plugins"]
    )


def test_a_recipe_imports_the_modules_beside_it_and_names_their_plugins(recipe, tmp_path, capsys):
    from minitrain.commands import cli

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "alarms.py").write_text(LOCAL_PLUGIN)
    (folder / "shapes.py").write_text("FEATURES = 48\n")
    source = recipe.read_text().replace("nn.Linear(48, 10)", "nn.Linear(shapes.FEATURES, 10)")
    (folder / "beside.py").write_text("import shapes\n" + source + '\nPLUGINS = ["alarms.LossAlarm:ceiling=0.001"]\n')
    run = tmp_path / "run"
    assert (
        cli.main(
            ["run", str(folder / "beside.py"), "--set", "epochs=3", "--no-plugin", "console", "--run-dir", str(run)]
        )
        == 0
    )
    assert "done: 1 epochs" in capsys.readouterr().out
    assert "alarms.LossAlarm" in json.loads((run / "run.json").read_text())["plugins"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nowhere.Plugin", "plugin 'nowhere.Plugin': no module 'nowhere' (looked in the current directory"),
        ("json.NoSuchThing", "plugin 'json.NoSuchThing': module json has no 'NoSuchThing'"),
        ("lossalarm", "unknown plugin 'lossalarm' (known: "),
    ],
)
def test_a_local_plugin_that_cannot_be_found_is_one_line(recipe, tmp_path, capsys, spec, message):
    from minitrain.commands import cli

    assert cli.main(["run", str(recipe), "--plugin", spec, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()

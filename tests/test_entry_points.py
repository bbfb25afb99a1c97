"""Entry points not loaded under --disable-plugin-autoload are recognised whatever class
importlib.metadata hands them out as: once a package imports the importlib_metadata backport
(MLflow does), the standard library's entry_points() returns the backport's EntryPoint objects."""

from __future__ import annotations

import importlib.metadata

from minitrain.commands import cli
from minitrain.engine import registry


class ForeignEntryPoint:
    """An entry point of another class than the standard library's, as the backport's are."""

    def __init__(self, ep):
        self.name, self.value, self.group, self.dist = ep.name, ep.value, ep.group, ep.dist
        self._ep = ep

    def load(self):
        return self._ep.load()

    def __eq__(self, other):  # the backport's compares keys, and fails on anything else
        return self._ep == other._ep


def test_a_plugin_named_under_disabled_autoload_loads_from_any_entry_point_class(
    install_dist, recipe, tmp_path, monkeypatch, real_discover, capsys
):
    install_dist("deferred_plugin", "import minitrain\nLOADED = True\n", {"deferred": "deferred_plugin"})
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        registry.importlib.metadata,
        "entry_points",
        lambda **kw: (
            [ForeignEntryPoint(ep) for ep in real(**kw)]
            if kw.get("group") == registry.ENTRY_POINT_GROUP
            else real(**kw)
        ),
    )
    monkeypatch.setattr(registry, "discover", real_discover)
    assert (
        cli.main(
            [
                "--disable-plugin-autoload",
                "run",
                str(recipe),
                "--plugin",
                "deferred",
                "--no-plugin",
                "console",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert "done: 1 epochs" in capsys.readouterr().out

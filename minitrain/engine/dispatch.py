"""The loop's hook calls, resolved when the plugins change instead of at every call.

At each call pluggy works out which implementations to run, in what order, and which arguments
each one takes. Between two real training steps that bookkeeping cost more than the plugins
themselves did (benchmarks/overhead.py), where every Python call costs several times what it
costs in isolation. :class:`Calls` does the work once and keeps,
for each hook, one function written for its implementations that calls them in pluggy's order,
with pluggy's semantics. A hook that has a wrapper is left to pluggy, and so is every hook while
hook calls are traced (``--trace-hooks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from minitrain.engine.hookspecs import PIPELINE_HOOKS

NOTIFY_ALL = "on_event"
"""Its implementations hear every notification, after the event's own hook."""


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager, which tells its :class:`Calls` whenever what they resolved may change."""

    def __init__(self, project_name: str):
        super().__init__(project_name)
        self.traced = 0  # hook call monitors in place (pluggy runs them only inside its own calls)
        self.calls = Calls(self)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self.calls.forget()

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        try:
            return super().unregister(plugin, name)
        finally:
            self.calls.forget()

    def add_hookspecs(self, module_or_class: Any) -> None:
        try:
            super().add_hookspecs(module_or_class)
        finally:
            self.calls.forget()

    def add_hookcall_monitoring(self, before: Callable, after: Callable) -> Callable[[], None]:
        undo = super().add_hookcall_monitoring(before, after)
        self.traced += 1
        self.calls.forget()

        def undo_and_forget() -> None:
            undo()
            self.traced -= 1
            self.calls.forget()

        return undo_and_forget


class Calls:
    """``calls.<hook>``: a function taking the hook's arguments by position, in the order its
    spec declares them, or ``None`` when nothing would run. A notification hook's function also
    runs the implementations of ``on_event``, after its own; a ``firstresult`` hook's returns the
    first result that is not ``None``. Resolved on first use, and again after :meth:`forget`.
    """

    # The core (minitrain.engine.default_protocol) implements these, so they are never None:
    setup: Callable[..., Any]
    train_step: Callable[..., Any]
    backward: Callable[..., Any]
    optimizer_step: Callable[..., Any]
    eval_step: Callable[..., Any]

    def __init__(self, pm: PluginManager):
        self._pm = pm

    def forget(self) -> None:
        """Drop every resolved hook. Call it after changing a registered implementation in place."""
        self.__dict__ = {"_pm": self._pm}

    def __getattr__(self, hook: str) -> Callable | None:
        if hook.startswith("_"):
            raise AttributeError(hook)
        caller = getattr(self._pm.hook, hook, None)
        if caller is None or caller.spec is None:
            raise AttributeError(f"no hookspec {hook!r}")
        callers = [caller]
        if hook not in PIPELINE_HOOKS and hook != NOTIFY_ALL and hasattr(self._pm.hook, NOTIFY_ALL):
            callers.append(getattr(self._pm.hook, NOTIFY_ALL))
        resolved = _resolve(callers, self._pm.traced > 0)
        setattr(self, hook, resolved)
        return resolved


def _resolve(callers: list[pluggy.HookCaller], traced: bool) -> Callable | None:
    impls = [impl for caller in callers for impl in reversed(caller.get_hookimpls())]  # pluggy's call order
    if not impls:
        return None
    spec = callers[0].spec
    assert spec is not None  # Calls.__getattr__ resolves only hooks that have a spec
    if traced or spec.opts.get("historic") or any(impl.wrapper or impl.hookwrapper for impl in impls):
        return _through_pluggy(callers, spec.argnames)
    return _compiled(callers[0].name, spec.argnames, impls, bool(spec.opts.get("firstresult")))


def _compiled(hook: str, argnames: tuple[str, ...], impls: list[pluggy.HookImpl], firstresult: bool) -> Callable:
    """One function, written for these implementations, that calls each with the arguments it
    takes, in order: a hook call costs one Python call plus one per implementation. An observer
    :func:`minitrain.engine.registry.guard_observers` wrapped is unwrapped and guarded right here."""
    scope: dict[str, Callable] = {}  # generated names start with "_": a hook's arguments do not
    body = ["    _result = None"] if firstresult else []
    for i, impl in enumerate(impls):
        function, failed = impl.function, getattr(impl.function, "minitrain_failed", None)
        if len(impls) == 1 and failed is None and tuple(impl.argnames) == argnames:
            return function  # nothing to adapt
        scope[f"_impl{i}"] = (
            function if failed is None else function.__wrapped__  # type: ignore[attr-defined]  # set by functools.wraps
        )
        call = f"{'_result = ' if firstresult else ''}_impl{i}({', '.join(impl.argnames)})"
        if failed is None:
            body.append(f"    {call}")
        else:
            scope[f"_failed{i}"] = failed
            body += ["    try:", f"        {call}", "    except Exception as _exc:", f"        _failed{i}(_exc)"]
        if firstresult:
            body.append("    if _result is not None:\n        return _result")
    if firstresult:
        body.append("    return None")
    exec(f"def {hook}({', '.join(argnames)}):\n" + "\n".join(body), scope)
    return scope[hook]


def _through_pluggy(callers: list[pluggy.HookCaller], argnames: tuple[str, ...]) -> Callable:
    def call(*args):
        kwargs = dict(zip(argnames, args))
        result = callers[0](**kwargs)
        for caller in callers[1:]:
            caller(**kwargs)
        return result

    return call

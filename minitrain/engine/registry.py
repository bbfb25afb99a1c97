"""Plugin discovery, configuration and registration.

A plugin is found through the ``minitrain`` entry-point group (first-party plugins too). The
entry point names either a class, instantiated per run with its validated ``Config`` (a
:class:`PluginConfig` subclass) when it has one, or any other object with hookimpls (a module),
registered as it is. Optional class attributes:

* ``Config``: the pydantic model that ``--plugin NAME:key=value,...`` is validated against;
* ``enabled_by_default``: on in every run unless ``--no-plugin NAME``;
* ``hookspecs``: a module or class of ``@hookspec`` functions the plugin adds (custom hooks);
* ``main_process_only``: under torchrun, registered on rank 0 only (plugins that write or print);
* ``role``: ``"critical"`` or ``"observer"`` (see :func:`role_of`); the reserved option
  ``--plugin NAME:role=...`` overrides it for one run;
* ``changes_training``: whether the plugin changes what training computes (see
  :func:`changes_training`; default: it does when it is critical). A resume refuses to add, drop
  or reconfigure such a plugin;
* ``state_dict()`` / ``load_state_dict()``: state that checkpoints carry.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from typing import Any, cast

import pluggy
from pydantic import BaseModel, ValidationError

from minitrain.engine import distributed, hookspecs
from minitrain.engine.dispatch import PluginManager
from minitrain.engine.errors import MinitrainError, describe_validation_error, one_line
from minitrain.engine.hookspecs import PIPELINE_HOOKS, STEP_HOOKS

ENTRY_POINT_GROUP = "minitrain"
CORE = "core"
"""The name the default training protocol is registered under: not a plugin of the run's choosing."""
DISABLE_AUTOLOAD_ENV = "MINITRAIN_DISABLE_PLUGIN_AUTOLOAD"
FIRST_PARTY = "minitrain"
ROLES = ("critical", "observer")
ROLE_OPTION = "role"
"""The option key every plugin accepts, taken out before its own ``Config`` sees the options."""


class ObserverFailed(UserWarning):
    """An observer plugin raised and was disabled for the rest of the run."""


@dataclass
class PluginInfo:
    name: str
    target: Any = None
    distribution: str | None = None
    version: str | None = None
    error: str | None = None  # why it could not be loaded
    deferred: bool = False  # `target` is the entry point itself, to load if the plugin is named

    @property
    def enabled_by_default(self) -> bool:
        return bool(getattr(self.target, "enabled_by_default", False))

    @property
    def config_model(self) -> type[BaseModel] | None:
        return getattr(self.target, "Config", None)


@dataclass
class PluginRequest:
    """A plugin asked for by name, with its options as given (strings from the command line)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


def make_plugin_manager() -> PluginManager:
    from minitrain.engine.default_protocol import DefaultProtocol

    pm = PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(DefaultProtocol(), name=CORE)
    return pm


def discover(autoload_third_party: bool | None = None) -> dict[str, PluginInfo]:
    """Every plugin the installed distributions offer, by name. A plugin that fails to import is
    listed with its error (and warned about) rather than taking the run down."""
    if autoload_third_party is None:
        autoload_third_party = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    found: dict[str, PluginInfo] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else None
        info = PluginInfo(ep.name, distribution=dist, version=ep.dist.version if ep.dist else None)
        if ep.name in found:
            warnings.warn(
                f"plugin {ep.name!r} is offered by both {found[ep.name].distribution} and {dist}; "
                f"using {found[ep.name].distribution}",
                stacklevel=2,
            )
            continue
        found[ep.name] = info
        if not autoload_third_party and dist != FIRST_PARTY:
            info.error = f"not loaded: {DISABLE_AUTOLOAD_ENV} is set"
            info.target, info.deferred = ep, True  # loaded on demand if named explicitly
            continue
        _load(info, ep)
    return found


def _load(info: PluginInfo, ep: importlib.metadata.EntryPoint) -> None:
    try:
        info.target, info.error = ep.load(), None
    except Exception as exc:  # a broken third-party package must not stop the others
        info.error = f"failed to import {ep.value}: {type(exc).__name__}: {exc}"
        warnings.warn(f"skipping plugin {info.name!r}: {info.error}", stacklevel=3)


def parse_plugin_spec(spec: str) -> PluginRequest:
    """``name[:key=value,key=value]`` -> PluginRequest."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise MinitrainError(f"--plugin {spec!r}: missing plugin name")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MinitrainError(f"plugin {name!r}: option {item!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return PluginRequest(name, options)


def instantiate(info: PluginInfo, options: dict[str, Any]) -> Any:
    """The object to register for ``info``, its options validated against its ``Config``, and
    its role set from the reserved ``role`` option when given."""
    options = dict(options)
    role = options.pop(ROLE_OPTION, None)
    plugin = _create(info, options)
    if role is not None:
        plugin.role = _checked_role(info.name, role)
    return plugin


def _create(info: PluginInfo, options: dict[str, Any]) -> Any:
    if info.deferred:  # autoload was off; named explicitly. (Not an isinstance check: once a package
        info.deferred = False  # imports the importlib_metadata backport, as MLflow does, entry_points()
        _load(info, info.target)  # hands out the backport's EntryPoint class.)
    if info.target is None:
        raise MinitrainError(f"plugin {info.name!r} cannot be used: {info.error}")
    target, model = info.target, info.config_model
    if not inspect.isclass(target):
        if options:
            raise MinitrainError(f"plugin {info.name!r} takes no options (got {', '.join(options)})")
        return target
    if model is None:
        if options:
            raise MinitrainError(f"plugin {info.name!r} takes no options (got {', '.join(options)})")
        return target()
    return cast("Callable[..., Any]", target)(validate_options(info.name, model, options))  # a class taking its Config


def validate_options(plugin: str, model: type[BaseModel], options: dict[str, Any]) -> BaseModel:
    try:
        if all(isinstance(v, str) for v in options.values()):
            return model.model_validate_strings(options)
        return model.model_validate(options)
    except ValidationError as exc:
        raise MinitrainError(f"plugin {plugin!r}: {describe_validation_error(exc)}") from None


def register_plugin(pm: pluggy.PluginManager, plugin: Any, name: str | None = None) -> None:
    """Register one plugin object, adding its own hookspecs first. Wrong argument names are
    rejected here, naming plugin and hook; misspelled hook names by :func:`check_hooks`, once
    every plugin (and so every custom hookspec) is in. A ``main_process_only`` plugin is left
    out on ranks other than 0, its hookspecs still added (other plugins may implement them)."""
    name = name or getattr(plugin, "name", None) or _default_name(plugin)
    if getattr(plugin, "role", None) is not None:
        _checked_role(name, plugin.role)
    try:
        specs = getattr(plugin, "hookspecs", None)
        if specs is not None and not _specs_added(pm, specs):  # two plugins may share one spec source
            pm.add_hookspecs(specs)
        if getattr(plugin, "main_process_only", False) and not distributed.is_main():
            return
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise MinitrainError(f"plugin {name!r}: {exc}") from None


def _checked_role(plugin: str, role: Any) -> str:
    if role not in ROLES:
        raise MinitrainError(f"plugin {plugin!r}: role must be 'critical' or 'observer' (got {role!r})")
    return role


def role_of(plugin: Any) -> str:
    """``critical``: a failure must stop the run (checkpointing, mixed precision, anything that
    changes training); ``observer``: a failure disables the plugin and training goes on
    (logging, plots, progress). A plugin's ``role`` attribute decides; without one, a plugin
    that implements a pipeline hook changes training and is critical, any other is an observer."""
    role = getattr(plugin, "role", None)
    if role is not None:
        return role
    marker = f"{hookspecs.PROJECT}_impl"
    return "critical" if any(hasattr(getattr(plugin, hook, None), marker) for hook in STEP_HOOKS) else "observer"


def changes_training(plugin: Any) -> bool:
    """Whether ``plugin`` changes what a run computes (its weights, when it stops, what it
    validates), so that a resume must keep it exactly as the run had it. A plugin's
    ``changes_training`` attribute decides; without one, a critical plugin does (a checkpoint
    writer is critical, as a run that cannot save must stop, but changes nothing it computes)."""
    explicit = getattr(plugin, "changes_training", None)
    return bool(explicit) if explicit is not None else role_of(plugin) == "critical"


def recorded_options(plugin: Any) -> dict[str, Any]:
    """A plugin's options as ``run.json`` and checkpoints record them (JSON values): its
    ``config``, plus ``role`` where this run overrode the class's."""
    config: Any = getattr(plugin, "config", None)  # a pydantic model, where the plugin has options
    options = config.model_dump(mode="json") if hasattr(config, "model_dump") else {}
    if not inspect.ismodule(plugin) and "role" in vars(plugin):
        options[ROLE_OPTION] = plugin.role
    return options


def resolve_resumed(
    recorded: dict[str, dict[str, Any]],
    requests: list[PluginRequest | object],
    disabled: set[str],
    available: dict[str, PluginInfo] | None = None,
) -> tuple[list[tuple[str, Any]], dict[str, list[Any]]]:
    """The plugins a resumed run goes on with: those it ``recorded`` (name -> options), each
    with its options, whatever is on by default now. ``requests`` (``--plugin``) may add an
    observer or change an observer's options, and ``disabled`` (``--no-plugin``) drop one; the
    same for a plugin that changes training (:func:`changes_training`) is refused, as a changed
    config field is. A plugin object the recipe gives (not a name) is the recipe's again.
    Returns the ``(name, plugin)`` pairs and the changes, name -> [options before, after] (None:
    absent)."""
    available = dict(discover() if available is None else available)
    objects = {getattr(r, "name", None) or _default_name(r): r for r in requests if not isinstance(r, PluginRequest)}
    asked = {r.name: r.options for r in requests if isinstance(r, PluginRequest)}
    chosen: dict[str, Any] = {}
    changes: dict[str, list[Any]] = {}
    refused: list[str] = []

    def info(name: str) -> PluginInfo:
        if name not in available:
            if "." not in name:
                used = "the run used" if name in recorded else "unknown"
                raise MinitrainError(
                    f"--resume: {used} plugin {name!r}, which is not installed here "
                    f"(installed: {', '.join(sorted(available)) or 'none'})"
                )
            available[name] = import_plugin(name)
        return available[name]

    for name, options in recorded.items():
        chosen[name] = objects[name] if name in objects else instantiate(info(name), options)
    for name, plugin in objects.items():  # given by the recipe, which has changed since the run began
        if name not in recorded:
            if changes_training(plugin):
                refused.append(f"add plugin {name} (the recipe now adds it)")
            else:
                chosen[name], changes[name] = plugin, [None, recorded_options(plugin)]
    for name, options in asked.items():
        before = recorded.get(name)
        plugin = instantiate(info(name), {**(before or {}), **options})
        after = recorded_options(plugin)
        if before is not None and after == before:
            continue
        changed = {key for key in {*after, *(before or {})} if (before or {}).get(key) != after.get(key)}
        changeable: Set[str] = getattr(getattr(plugin, "config", None), "changeable_on_resume", frozenset())
        if changes_training(plugin) and not (before is not None and changed <= changeable):
            refused.append(f"change the options of plugin {name}" if before is not None else f"add plugin {name}")
            continue
        chosen[name], changes[name] = plugin, [before, after]
    for name in sorted(disabled):
        if name not in chosen:  # absent already, as asked (a resume command repeats the first one's options)
            if name not in available:
                raise MinitrainError(f"--no-plugin: unknown plugin {name!r} (known: {', '.join(sorted(available))})")
            continue
        if changes_training(chosen[name]):
            refused.append(f"leave out plugin {name}")
            continue
        changes[name] = [recorded.get(name), None]
        del chosen[name]
    if refused:
        they = "it changes" if len(refused) == 1 else "they change"
        raise MinitrainError(
            f"--resume: cannot {'; '.join(refused)}: {they} training, and the checkpoint holds "
            "what the run computed with its plugins as they were. Resume with the run's plugins "
            "(observers, such as loggers and plots, may be added, changed or left out), or start a "
            "new run (another --run-dir; --init-from CHECKPOINT starts from its weights)"
        )
    return list(chosen.items()), changes


def guard_observers(pm: PluginManager, on_failure: Callable[[str, str, Exception], None]) -> None:
    """Route an exception raised by an observer's notification hook to ``on_failure(plugin name,
    hook name, exception)`` instead of up the loop; the call to the other implementations of that
    hook goes on. Each implementation's function is wrapped once, in place, so a run in which
    nothing fails pays one plain function call per observer call and no lookup. Pipeline hooks
    are never guarded: they compute the step, and a step half computed cannot go on."""
    for name, plugin in pm.list_name_plugin():
        if plugin is None or role_of(plugin) != "observer":
            continue
        for caller in pm.get_hookcallers(plugin) or ():
            if caller.name in PIPELINE_HOOKS:
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper or _is_guarded(impl.function)):
                    impl.function = _guarded(  # type: ignore[misc]  # Final in pluggy; wrapped in place on purpose
                        impl.function, name, caller.name, on_failure
                    )
    pm.calls.forget()


def _guarded(function: Callable, plugin: str, hook: str, on_failure: Callable) -> Callable:
    def failed(exc: Exception) -> None:
        on_failure(plugin, hook, exc)

    @functools.wraps(function)
    def guarded(*args):
        try:
            return function(*args)
        except Exception as exc:
            failed(exc)

    guarded.minitrain_failed = failed  # type: ignore[attr-defined]  # dispatch calls `function` and this itself
    return guarded


def _is_guarded(function: Callable) -> bool:
    return hasattr(function, "minitrain_failed")


def _specs_added(pm: pluggy.PluginManager, specs: Any) -> bool:
    return any(
        getattr(caller, "spec", None) is not None and caller.spec.namespace is specs
        for caller in vars(pm.hook).values()
    )


def check_hooks(pm: pluggy.PluginManager) -> None:
    """Refuse implementations of hooks that no spec declares (a typo, or a missing hookspec)."""
    known = sorted(h for h in dir(pm.hook) if not h.startswith("_") and getattr(pm.hook, h).spec)
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if name.startswith("_") or caller.spec is not None:
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                raise MinitrainError(
                    f"plugin {pm.get_name(impl.plugin)!r} implements unknown hook "
                    f"{name!r} (known hooks: {', '.join(known)})"
                )


def _default_name(plugin: Any) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__.lower()


def resolve(
    requests: list[PluginRequest | object],
    disabled: Set[str] = frozenset(),
    available: dict[str, PluginInfo] | None = None,
) -> list[tuple[str, Any]]:
    """Turn the default plugins plus ``requests`` (names with options, or plugin objects given
    directly by a recipe) minus ``disabled`` into ``(name, object)`` pairs ready to register. A
    name with a dot that no entry point offers is an import path (:func:`import_plugin`)."""
    available = dict(discover() if available is None else available)
    wanted: dict[str, dict[str, Any]] = {n: {} for n, i in available.items() if i.enabled_by_default}
    objects: list[tuple[str, Any]] = []
    for req in requests:
        if isinstance(req, PluginRequest):
            if req.name not in available:
                if "." not in req.name:
                    raise MinitrainError(
                        f"unknown plugin {req.name!r} (known: {', '.join(sorted(available)) or 'none'}; "
                        "a plugin in a local file is named by its import path, module.Class)"
                    )
                available[req.name] = import_plugin(req.name)
            wanted.setdefault(req.name, {}).update(req.options)
        else:
            objects.append((getattr(req, "name", None) or _default_name(req), req))
    unknown = sorted(set(disabled) - set(available) - {name for name, _ in objects})
    if unknown:
        raise MinitrainError(f"--no-plugin: unknown plugin {unknown[0]!r} (known: {', '.join(sorted(available))})")
    chosen = [(name, instantiate(available[name], opts)) for name, opts in wanted.items() if name not in disabled]
    return chosen + [(name, plugin) for name, plugin in objects if name not in disabled]


def import_plugin(path: str) -> PluginInfo:
    """A plugin named by its import path, ``module.Class`` (or a module of hook functions),
    imported from the current directory, the recipe's folder or anywhere Python looks: for trying
    a plugin before packaging it. Its name is the path, in ``--no-plugin`` and ``run.json`` too."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module_name, _, attr = path.rpartition(".")
    module = _import(path, module_name)
    target = getattr(module, attr, None)
    if target is None:
        target = _import(path, path, f"module {module_name} has no {attr!r}")  # the path names a module
    return PluginInfo(path, target=target, distribution="(local)")


def _import(path: str, module: str, missing: str | None = None) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module and not module.startswith(f"{exc.name}."):
            raise MinitrainError(f"plugin {path!r}: failed to import: {one_line(exc)}") from None
        raise MinitrainError(
            f"plugin {path!r}: {missing or f'no module {module!r}'} (looked in the current "
            "directory, the recipe's folder and the installed packages)"
        ) from None
    except Exception as exc:
        raise MinitrainError(f"plugin {path!r}: failed to import {module}: {one_line(exc)}") from None


def hook_order(pm: pluggy.PluginManager) -> dict[str, list[str]]:
    """For each hook, its implementations in the order a call runs them (wrappers first, as they
    enclose the rest), each tagged with how it asked to be ordered."""
    order: dict[str, list[str]] = {}
    for name in sorted(h for h in dir(pm.hook) if not h.startswith("_")):
        impls = list(reversed(getattr(pm.hook, name).get_hookimpls()))  # pluggy calls from the end
        wrappers = [i for i in impls if i.wrapper or i.hookwrapper]
        plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]
        order[name] = [_describe_impl(pm, i) for i in wrappers + plain]
    return order


def _describe_impl(pm: pluggy.PluginManager, impl: Any) -> str:
    tags = [t for t in ("wrapper", "hookwrapper", "tryfirst", "trylast") if getattr(impl, t)]
    name = pm.get_name(impl.plugin)
    assert name is not None  # impl is a registered plugin's
    return name + (f" ({', '.join(tags)})" if tags else "")

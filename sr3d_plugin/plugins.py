"""The pluggy plugin manager and the component registry built on it.

Components are looked up by ``(kind, name)``; kinds are the keys of :data:`KINDS`. The built-in
components are registered through the same hooks as third-party ones. Third-party plugins are
loaded from the ``sr3d`` entry-point group; the environment variable ``SR3D_LOAD_PLUGINS``
(comma-separated entry-point or distribution names) restricts which of them load — set it to an
empty string to load none.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from sr3d_plugin import hookspecs
from sr3d_plugin.errors import SR3DPluginError

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "Registration",
    "create",
    "get_factory",
    "get_plugin_manager",
    "list_components",
    "load_errors",
    "register_plugin",
    "registry",
    "reset",
    "unregister_plugin",
]

ENTRY_POINT_GROUP = "sr3d"
BUILTIN_PLUGIN_NAME = "sr3d_plugin.builtin"

#: kind → hook name
KINDS: dict[str, str] = {
    "depth_estimators": "register_depth_estimators",
    "pointmap_sources": "register_pointmap_sources",
    "frame_readers": "register_frame_readers",
    "position_encoders": "register_position_encoders",
    "region_extractors": "register_region_extractors",
    "projectors": "register_projectors",
    "model_builders": "register_model_builders",
    "dataset_converters": "register_dataset_converters",
}


@dataclass(frozen=True)
class Registration:
    """One registered component: what it is, and which plugin (and distribution) provided it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    source: str

    def describe(self) -> str:
        target = getattr(self.factory, "__qualname__", repr(self.factory))
        module = getattr(self.factory, "__module__", "?")
        return f"{module}.{target}"


_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_sources: dict[str, str] = {}
_load_errors: dict[str, str] = {}


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get("SR3D_LOAD_PLUGINS")
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = _allowed_plugins()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take the package down
            _load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"sr3d plugin {ep.name!r} (entry point {ep.value!r} from {dist}) failed to load: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        _sources[ep.name] = f"{dist} (entry point {ep.value})"


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, creating and populating it on first use."""
    global _manager
    with _lock:
        if _manager is None:
            pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
            pm.add_hookspecs(hookspecs)
            from sr3d_plugin import builtin_plugins

            pm.register(builtin_plugins, name=BUILTIN_PLUGIN_NAME)
            _sources[BUILTIN_PLUGIN_NAME] = "sr3d-plugin (built in)"
            _load_entry_points(pm)
            _manager = pm
        return _manager


def register_plugin(plugin: object, name: str | None = None, source: str = "registered directly") -> str:
    """Register a plugin object (module, class or instance with hookimpls) at run time.

    Returns the name it was registered under.
    """
    pm = get_plugin_manager()
    with _lock:
        registered = pm.register(plugin, name=name)
        if registered is None:
            raise SR3DPluginError(f"plugin {name!r} is already registered or blocked")
        _sources[registered] = source
        return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name`` (no-op if absent)."""
    pm = get_plugin_manager()
    with _lock:
        plugin = pm.get_plugin(name)
        if plugin is not None:
            pm.unregister(plugin=plugin, name=name)
        _sources.pop(name, None)


def reset() -> None:
    """Forget the manager so the next use reloads entry points (used by tests and after installs)."""
    global _manager
    with _lock:
        _manager = None
        _sources.clear()
        _load_errors.clear()


def load_errors() -> dict[str, str]:
    """Entry-point plugins that failed to load, name → error text."""
    get_plugin_manager()
    return dict(_load_errors)


def _collect(kind: str) -> dict[str, Registration]:
    if kind not in KINDS:
        raise SR3DPluginError(f"unknown component kind {kind!r}; expected one of {sorted(KINDS)}")
    pm = get_plugin_manager()
    hook = getattr(pm.hook, KINDS[kind])
    found: dict[str, Registration] = {}
    # Call every implementation separately so we know which plugin provided which name.
    for impl in hook.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(name: str, factory: Callable[..., Any], _plugin: str = plugin_name) -> None:
            if not isinstance(name, str) or not name:
                raise SR3DPluginError(f"plugin {_plugin!r} registered a {kind} with an invalid name {name!r}")
            if not callable(factory):
                raise SR3DPluginError(
                    f"plugin {_plugin!r} registered {kind} {name!r} with a non-callable factory {factory!r}"
                )
            if name in found and found[name].plugin != _plugin:
                raise SR3DPluginError(
                    f"{kind} name {name!r} is registered twice: by {found[name].plugin!r} and by {_plugin!r}"
                )
            found[name] = Registration(kind, name, factory, _plugin, _sources.get(_plugin, "?"))

        impl.function(register)
    return found


def registry(kind: str) -> dict[str, Registration]:
    """All components of one kind, name → :class:`Registration`."""
    with _lock:
        return _collect(kind)


def get_factory(kind: str, name: str) -> Callable[..., Any]:
    """The factory registered as ``name`` for ``kind``; a clear error lists the known names."""
    entries = registry(kind)
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise SR3DPluginError(f"no {kind[:-1].replace('_', ' ')} named {name!r}; registered: {known}")
    return entries[name].factory


def create(kind: str, name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Instantiate the component ``name`` of ``kind`` with the given arguments."""
    return get_factory(kind, name)(*args, **kwargs)


def list_components() -> list[Registration]:
    """Every registered component of every kind, sorted by kind then name."""
    out: list[Registration] = []
    for kind in KINDS:
        out.extend(sorted(registry(kind).values(), key=lambda r: r.name))
    return out

"""`Registry`: one shape for every extension point chosen by name (merge rules, heads, data set readers).

``register`` adds a name (refusing one already taken by something else), ``create`` builds what a name stands
for, ``names`` lists them; a registry is a read-only mapping ``name -> registered object``. Config fields that
choose an extension (``HAMConfig.method``, ``HAMModule(head=...)``, ``ClassIncrementalDataModule(dataset=...)``)
are plain names checked against their registry (readers: ``ham_lightning.data.readers.READERS``), so anything a user's package registers is accepted from Python
and from the command line alike.

The built-in entries of a registry are registered by the module that defines them (``builtins``), imported the
first time the registry is read; so this module imports nothing of the package, and a config can check a name
without importing what the name builds. Packages register their own entries when imported; the ``ham-lightning``
command imports every package that declares an entry point in the group ``ham_lightning.plugins``
(`load_plugins`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

__all__ = ["HEADS", "MERGE_RULES", "PLUGIN_GROUP", "Registry", "load_plugins"]

#: Entry-point group whose packages the ``ham-lightning`` command imports before parsing (their registrations).
PLUGIN_GROUP = "ham_lightning.plugins"


class Registry(Mapping[str, T], Generic[T]):
    """Names of one kind of extension, each bound to what builds it (a class or a factory).

    Args:
        kind: what the entries are, for messages (``"merge rule"``).
        builtins: the module that registers the built-in entries, imported on first read.
        how: how to register one, for messages (``"@register_merge_rule('name')"``).
    """

    def __init__(self, kind: str, builtins: str | None = None, how: str = "") -> None:
        self.kind, self.how = kind, how
        self._builtins = builtins
        self._entries: dict[str, T] = {}

    def _load(self) -> dict[str, T]:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # before the import: it registers through us
            try:
                importlib.import_module(module)
            except BaseException:
                self._builtins = module
                raise
        return self._entries

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = None) -> Any:
        """Bind ``name`` to ``obj`` (or, without ``obj``, a decorator that does). A name already bound to another
        object is refused: `unregister` it first to replace it."""

        def bind(value: T) -> T:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {self.kind} is registered under a non-empty string name, got {name!r}")
            taken = self._load().get(name)
            if taken is not None and taken is not value:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({_describe(taken)}); "
                                 f"choose another name, or unregister({name!r}) first to replace it.")
            self._entries[name] = value
            return value

        return bind if obj is None else bind(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it was bound to."""
        self.check(name)
        return self._entries.pop(name)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._load())

    def check(self, name: str, field: str | None = None) -> str:
        """``name`` if registered, else a `ValueError` that lists the registered names (``field``: the setting that
        gave the name, for the message)."""
        entries = self._load()
        if name not in entries:
            where = f"{field}: " if field else ""
            how = f" (a new one: {self.how})" if self.how else ""
            raise ValueError(f"{where}unknown {self.kind} {name!r}; registered: {', '.join(sorted(entries))}{how}.")
        return name

    def get_entry(self, name: str) -> T:
        """What ``name`` is bound to (a `ValueError` naming the registered names if none)."""
        return self._entries[self.check(name)]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build the entry registered as ``name``: ``entry(*args, **kwargs)``."""
        return self.get_entry(name)(*args, **kwargs)  # type: ignore[operator]

    # -- Mapping ------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def _describe(value: Any) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"


def load_plugins(group: str = PLUGIN_GROUP) -> list[str]:
    """Import every package declaring an entry point in ``group`` (so it registers its rules, heads, readers);
    returns their names. A package that fails to import is named in the error."""
    from importlib.metadata import entry_points

    loaded = []
    for entry in entry_points(group=group):
        try:
            entry.load()
        except Exception as err:
            raise ImportError(f"the ham-lightning plug-in {entry.name!r} ({entry.value}) failed to import: {err}. "
                              "Fix or uninstall that package.") from err
        loaded.append(entry.name)
    return loaded


#: `HAMConfig.method`: what happens to the adapters at a task boundary (`ham_lightning.core.merge_rules`).
MERGE_RULES: Registry[Any] = Registry("merge rule", "ham_lightning.core.merge_rules",
                                      how="@register_merge_rule('name') on a MergeRule subclass")
#: ``HAMModule(head=...)``: heads over every class of the scenario (`ham_lightning.core.heads`).
HEADS: Registry[Any] = Registry("head", "ham_lightning.core.heads",
                                how="register_head('name', factory(in_features, num_classes, **kwargs) -> Head)")

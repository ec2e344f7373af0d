"""Name -> factory registries with helpful misses (used by both model files)."""
import difflib
from collections.abc import Callable


class Registry:
    """Factories by name, each with the config it was registered with (an alias shares its factory's)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}
        self._configs: dict[Callable, dict] = {}

    def register(self, fn: Callable | None = None, *, name: str | None = None, **config):
        def add(f):
            key = name or f.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            if config:
                self._configs[f] = dict(config)
            elif f not in self._configs:
                raise ValueError(f"{self.kind} '{key}': register the factory with its config before an alias")
            self._entries[key] = f
            return f

        return add(fn) if fn is not None else add

    def config(self, name: str) -> dict:
        return dict(self._configs[self.get(name)])

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown {self.kind} '{name}'.{hint} Use --model list to print every name.")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

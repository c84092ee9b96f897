"""Name -> entry registries whose entries register themselves on import (the encoders)."""

from importlib import import_module

from fss.errors import CheckpointError, FssError


class Registry:
    """Entries with a ``name``, registered by the modules of ``modules`` when they are imported."""

    def __init__(self, kind: str, modules: tuple[str, ...]):
        self.kind, self.modules = kind, modules
        self.entries: dict = {}

    def register(self, entry):
        if entry.name in self.entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self.entries[entry.name] = entry
        return entry

    def load_all(self) -> None:
        for module in self.modules:  # cheap after the first call: modules are cached
            import_module(module)

    def names(self) -> list[str]:
        self.load_all()
        return sorted(self.entries)

    def get(self, name, path=None):
        """The entry called ``name``; an unknown name is a one-line error naming the known ones."""
        self.load_all()
        entry = self.entries.get(name) if isinstance(name, str) else None
        if entry is None:
            message = f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})"
            raise CheckpointError(message, path) if path is not None else FssError(message)
        return entry

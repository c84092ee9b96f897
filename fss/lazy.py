"""Attributes of a package imported on first use (PEP 562), so that importing the package stays cheap."""

import sys
from importlib import import_module


def lazy_attributes(package: str, table: dict[str, tuple[str, str]]):
    """The module ``__getattr__`` of ``package``: ``table[name]`` is ``(module, attribute)``, imported
    on first use and then kept in the package like any attribute."""

    def __getattr__(name):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = table[name]
        value = getattr(import_module(module), attr)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


def lazy_dir(package: str, table: dict[str, tuple[str, str]]):
    """The module ``__dir__`` of ``package``: its API (``__all__``, the lazy attributes) and dunders, so
    that ``dir()`` and completion show the API before it is imported, and not the package's helpers."""

    def __dir__():
        module = sys.modules[package]
        dunders = {name for name in vars(module) if name.startswith("__")}
        return sorted({*table, *getattr(module, "__all__", ()), *dunders})

    return __dir__

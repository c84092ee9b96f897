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

"""Choosing an implementation: ``impl="auto" | "torch" | "triton" | "native"``."""

IMPLS = ("auto", "torch", "triton", "native")


def resolve_impl(impl: str, tensor, op: str) -> str:
    """The concrete implementation for ``op`` on ``tensor``'s device."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "torch"
    return impl

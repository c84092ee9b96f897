"""Triton tensors in and out: BYTES inputs as text or blobs, one-value inputs, text outputs, and the
tensor specs of :mod:`fss.serve.protocol` as PyTriton's."""

import numpy as np

from fss.serve.handlers import RequestError


def text(values) -> list[str]:
    """A BYTES tensor as a flat list of str (UTF-8)."""
    try:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]
    except UnicodeDecodeError:
        raise RequestError("text inputs (op, classes, support_id, folder) must be UTF-8") from None


def blobs(values) -> list[bytes]:
    return [v if isinstance(v, bytes) else bytes(v) for v in np.asarray(values, dtype=object).ravel()]


def one(request, name: str, convert=text):
    if name not in request.data:
        raise RequestError(f"input {name!r} is required for this operation")
    values = convert(request.data[name])
    if len(values) != 1:
        raise RequestError(f"input {name!r} takes one value, got {len(values)}")
    return values[0]


def bytes_array(values: list[str]) -> np.ndarray:
    """Text outputs as a fixed-width bytes array (PyTriton cannot send an empty object array)."""
    return np.array([v.encode() for v in values], dtype=np.bytes_).reshape(len(values))


NUMPY_TYPES = {"BYTES": bytes, "INT32": np.int32, "UINT8": np.uint8, "FP32": np.float32}


def tensors(spec) -> list:
    from pytriton.model_config import Tensor

    return [
        Tensor(name=name, dtype=NUMPY_TYPES[dtype], shape=shape, optional=optional)
        for name, dtype, shape, optional in spec
    ]

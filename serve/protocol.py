"""What client and server agree on: model and tensor names, operations, content-hash support ids.

Kept free of heavy imports (no torch, no tritonclient) so both sides and the tests can use it.

Support ids are content hashes: ``sha256`` over the class names in label order (name order) and, per
shot, the sha256 of the encoded image bytes and of the encoded mask bytes, exactly as sent. The same support
set therefore has the same id on every server, so a client that meets a server (an instance, a
replica behind a load balancer) that never saw the set, or evicted it, re-registers it under the
same id and retries; a client can compute the id without asking any server.
"""

import hashlib
import json

SUPPORT_MODEL = "fss_support"
SEGMENT_MODEL = "fss_segment"

# fss_support operations (input ``op``).
OP_REGISTER = "register"
OP_ADD_SHOT = "add_shot"
OP_REMOVE_SHOT = "remove_shot"
OP_INFO = "info"

# The error of a request whose support id the server does not hold: the client re-registers.
UNKNOWN_SUPPORT = "unknown support id"
ID_PREFIX = "sha256:"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shot_digest(image: bytes, mask: bytes) -> str:
    """One shot's content: its image bytes and its mask bytes, as encoded files."""
    return digest(image) + digest(mask)


def support_id(classes: list[str], shots: list[list[str]]) -> str:
    """The id of a support set: ``classes[n]`` in label order, ``shots[n]`` their shot digests in order."""
    if len(classes) != len(shots):
        raise ValueError("one shot list per class")
    canonical = json.dumps([[name, list(digests)] for name, digests in zip(classes, shots, strict=True)])
    return ID_PREFIX + digest(canonical.encode())


# The models' tensors, one place for fss-serve (PyTriton) and the model repository (config.pbtxt):
# (name, datatype, shape without the batch axis, optional). BYTES are encoded files or UTF-8 text.
SUPPORT_INPUTS = [
    ("op", "BYTES", (1,), False),
    ("images", "BYTES", (-1,), True),
    ("masks", "BYTES", (-1,), True),
    ("classes", "BYTES", (-1,), True),
    ("support_id", "BYTES", (1,), True),
    ("index", "INT32", (1,), True),
    ("folder", "BYTES", (1,), True),
]
SUPPORT_OUTPUTS = [
    ("support_id", "BYTES", (1,), False),
    ("classes", "BYTES", (-1,), False),
    ("shots", "INT32", (-1,), False),
    ("info", "BYTES", (1,), False),
    ("error", "BYTES", (1,), False),
]
# ``min_area``: objects of at least that many pixels go into ``result`` (0 or not sent: no objects).
SEGMENT_INPUTS = [
    ("support_id", "BYTES", (1,), False),
    ("image", "BYTES", (1,), False),
    ("min_area", "INT32", (1,), True),
]
# A row's labels / prob: its H x W values flattened (row-major), zero-padded to the request's largest row.
# ``result``: JSON text, the row's classes (label k: classes[k - 1]), presence ``score`` per class, the
# ``absent`` classes (no pixels), ``min_score``, and ``instances`` (COCO records) where asked for.
SEGMENT_OUTPUTS = [
    ("labels", "UINT8", (-1,), False),
    ("size", "INT32", (2,), False),
    ("prob", "FP32", (-1,), False),
    ("result", "BYTES", (1,), False),
    ("error", "BYTES", (1,), False),
]

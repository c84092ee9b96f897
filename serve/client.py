"""``fss.serve.Client``: the Python client of ``fss-serve``, on ``tritonclient``.

>>> client = Client("127.0.0.1:8000")            # HTTP; "grpc://127.0.0.1:8001" for gRPC
>>> sid = client.register_support("examples/support")
>>> labels = client.segment(sid, Path("query.jpg").read_bytes())   # H x W uint8, as fss-run writes
>>> result = client.predict(sid, Path("query.jpg").read_bytes(), instances=True)   # + scores, objects

Support ids are content hashes (:mod:`fss.serve.protocol`). The client keeps the encoded shots of the
sets it registered, so when a request reaches a server that does not hold the set (another replica, a
restart, an LRU eviction) it registers the set there under the same id and retries. Several URLs make
the client balance requests over replicas itself (round robin); every request also carries the
``fss-support-id`` header, on which a load balancer can hash to keep a set on one replica.
"""

import contextlib
import itertools
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fss.io.instances import DEFAULT_MIN_AREA
from fss.serve import protocol

SUPPORT_HEADER = "fss-support-id"
SUPPORT_OUTPUTS = ["support_id", "classes", "shots", "info", "error"]


class ServeError(Exception):
    """A request the server refused or could not serve; the message is the server's one line."""


def split_url(url: str) -> tuple[str, str]:
    """``"grpc://h:p"`` -> ``("grpc", "h:p")``; ``"http://h:p"`` or ``"h:p"`` -> ``("http", "h:p")``."""
    scheme, _, address = url.rpartition("://")
    scheme = scheme or "http"
    if scheme not in ("http", "grpc"):
        raise ValueError(f"url scheme must be http or grpc, got {scheme!r}")
    return scheme, address.rstrip("/")


def objects(values) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else bytes(v) for v in values], dtype=object)


def first_text(array) -> str:
    return array.ravel()[0].decode()


def read_support_folder(folder) -> tuple[list[str], list[bytes], list[bytes]]:
    """Per-shot class names, image bytes and mask bytes of a support folder (``fss-run`` layout/order)."""
    from fss.io.folders import find_support_pairs

    classes, images, masks = [], [], []
    for name, pairs in find_support_pairs(folder).items():
        for image_path, mask_path in pairs:
            classes.append(name)
            images.append(Path(image_path).read_bytes())
            masks.append(Path(mask_path).read_bytes())
    return classes, images, masks


def is_miss(err: ServeError) -> bool:
    return str(err).startswith(protocol.UNKNOWN_SUPPORT)


class Client:
    """A client of one ``fss-serve`` server, or of several replicas (a list of URLs, round robin).

    Thread-safe: each thread gets its own connections (``tritonclient.http`` ones are bound to their
    thread).

    Args:
        url: ``"host:port"`` / ``"http://host:port"`` (HTTP) or ``"grpc://host:port"``; or a list of them.
        timeout_s: connection and network timeout of each request.
        remembered: how many registered sets the client keeps (their encoded shots) to re-register.
        attempts: tries of a request whose set the server does not hold (behind a load balancer each
            miss registers the set on the replica reached, so misses stop once every replica holds it).
    """

    def __init__(
        self, url="127.0.0.1:8000", timeout_s: float = 120.0, remembered: int = 64, attempts: int = 3
    ):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("need at least one url")
        self.backends = [split_url(u) for u in urls]
        if len({scheme for scheme, _ in self.backends}) != 1:
            raise ValueError("all urls must use the same protocol (http or grpc)")
        self.scheme = self.backends[0][0]
        if self.scheme == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self.remembered = remembered
        self.reregistrations = 0
        self._next = itertools.count()
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()
        self._sets: OrderedDict[str, tuple[list[str], list[bytes], list[bytes]]] = OrderedDict()

    # -- plumbing ----------------------------------------------------------------------------------
    def connection(self, backend: int):
        """This thread's connection to backend ``backend``."""
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        if backend not in connections:
            address = self.backends[backend][1]
            if self.scheme == "grpc":
                client = self._tc.InferenceServerClient(address)
            else:
                client = self._tc.InferenceServerClient(
                    address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            connections[backend] = client
            with self._lock:
                self._connections.append(client)
        return connections[backend]

    def pick(self) -> int:
        return next(self._next) % len(self.backends)

    def infer(self, model: str, inputs: dict, outputs: list[str], backend: int, support_id: str = "") -> dict:
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        tensors = []
        for name, array in inputs.items():
            tensor = self._tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        wanted = [self._tc.InferRequestedOutput(name) for name in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.scheme == "grpc" else {}
        headers = {SUPPORT_HEADER: support_id} if support_id else None
        try:
            result = self.connection(backend).infer(model, tensors, outputs=wanted, headers=headers, **kwargs)
        except InferenceServerException as err:
            raise ServeError(err.message() or str(err)) from None
        return {name: result.as_numpy(name) for name in outputs}

    def support_op(self, op: str, backend: int | None = None, **inputs) -> dict:
        arrays = {"op": objects([op])}
        for name, values in inputs.items():
            arrays[name] = np.array(values, dtype=np.int32) if name == "index" else objects(values)
        backend = self.pick() if backend is None else backend
        sid = first_text(arrays["support_id"]) if "support_id" in arrays else ""
        out = self.infer(protocol.SUPPORT_MODEL, arrays, SUPPORT_OUTPUTS, backend, sid)
        error = first_text(out["error"])
        if error:
            raise ServeError(error)
        return out

    def remember(self, support_id: str, payload) -> None:
        """Keep the encoded shots of the ``remembered`` latest sets, to re-register them on a miss."""
        with self._lock:
            self._sets[support_id] = payload
            self._sets.move_to_end(support_id)
            while len(self._sets) > self.remembered:
                self._sets.popitem(last=False)

    def with_support(self, support_id: str, call):
        """``call(backend)``; on a miss, register the set on that backend and call again."""
        backend = self.pick()
        for attempt in range(self.attempts):
            try:
                return call(backend)
            except ServeError as err:
                if not is_miss(err) or support_id not in self._sets or attempt == self.attempts - 1:
                    raise
            with self._lock:
                self.reregistrations += 1
                payload = self._sets[support_id]
            self.register(*payload, backend=backend)
        raise AssertionError("unreachable")

    # -- server state --------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Every server live and ready, both models loaded."""
        try:
            return all(
                self.connection(b).is_server_ready()
                and all(
                    self.connection(b).is_model_ready(m)
                    for m in (protocol.SUPPORT_MODEL, protocol.SEGMENT_MODEL)
                )
                for b in range(len(self.backends))
            )
        except Exception:  # refused connection, timeout: not ready
            return False

    def info(self) -> dict:
        """The served model's metadata, limits and cache state (JSON of ``op=info``)."""
        return json.loads(first_text(self.support_op(protocol.OP_INFO)["info"]))

    # -- support sets --------------------------------------------------------------------------------
    def register_support(self, folder) -> str:
        """Register a support folder (``fss-run``'s layout, read here, client-side) -> its id."""
        return self.register(*read_support_folder(folder))

    def register(self, classes: list[str], images: list[bytes], masks: list[bytes], backend=None) -> str:
        """Shot i: ``images[i]`` / ``masks[i]`` (encoded files) of class ``classes[i]`` -> the set's id.

        Label k is the k-th distinct class name in order of appearance (``fss-run`` sorts folders).
        """
        if not images:  # PyTriton's server cannot carry an empty tensor: refuse it here, in one line
            raise ServeError("a support set needs at least one shot (image + mask + class name)")
        out = self.support_op(protocol.OP_REGISTER, backend, images=images, masks=masks, classes=classes)
        support_id = first_text(out["support_id"])
        self.remember(support_id, (list(classes), list(images), list(masks)))
        return support_id

    def classes(self, support_id: str) -> list[str]:
        """Class names in label order (label k = ``classes[k - 1]``) of a set this client registered."""
        return list(dict.fromkeys(self._sets[support_id][0]))

    def edit(self, op: str, support_id: str, payload, **inputs) -> str:
        out = self.with_support(
            support_id, lambda b: self.support_op(op, b, support_id=[support_id], **inputs)
        )
        new_id = first_text(out["support_id"])
        if payload is not None:
            self.remember(new_id, payload)
        return new_id

    def add_shot(self, support_id: str, class_name: str, image: bytes, mask: bytes) -> str:
        """A new set: ``support_id``'s shots plus this one (a new class is appended last) -> its id."""
        payload = None
        if support_id in self._sets:
            classes, images, masks = self._sets[support_id]
            payload = (classes + [class_name], images + [image], masks + [mask])
        return self.edit(
            protocol.OP_ADD_SHOT, support_id, payload, classes=[class_name], images=[image], masks=[mask]
        )

    def remove_shot(self, support_id: str, class_name: str, index: int) -> str:
        """A new set: ``support_id`` without shot ``index`` of ``class_name`` -> its id."""
        payload = None
        if support_id in self._sets:
            classes, images, masks = self._sets[support_id]
            positions = [i for i, name in enumerate(classes) if name == class_name]
            if -len(positions) <= index < len(positions):
                drop = positions[index]
                payload = tuple(
                    [v for i, v in enumerate(values) if i != drop] for values in (classes, images, masks)
                )
        return self.edit(protocol.OP_REMOVE_SHOT, support_id, payload, classes=[class_name], index=[index])

    # -- queries -------------------------------------------------------------------------------------
    def segment(self, support_id: str, image: bytes, with_prob: bool = False):
        """One encoded image -> ``H x W`` uint8 labels (0 background, k the k-th class), as ``fss-run``.

        With ``with_prob`` also the ``H x W`` float32 probability of each pixel's label.
        """
        return self.segment_batch(support_id, [image], with_prob)[0]

    def segment_batch(self, support_id: str, images: list[bytes], with_prob: bool = False) -> list:
        """Several images in one request (at most the server's ``--max-batch``); a row that fails raises."""
        return self.with_support(support_id, lambda b: self.segment_on(b, support_id, images, with_prob))

    def predict(
        self, support_id: str, image: bytes, instances: bool = False, min_area: int = DEFAULT_MIN_AREA
    ):
        """One encoded image -> its :class:`fss.runtime.results.Segmentation`, as ``Segmenter.predict``
        gives it: labels, classes, presence scores, and its objects (``instances``) of ``min_area``
        pixels or more, their masks decoded from the server's COCO RLE."""
        area = min_area if instances else 0

        def request(backend):
            return self.segment_on(backend, support_id, [image], False, area)

        return self.with_support(support_id, request)[0]

    def segment_on(
        self, backend: int, support_id: str, images: list[bytes], with_prob: bool, min_area: int | None = None
    ) -> list:
        """Labels (and probabilities) per image; with ``min_area`` (0: no objects) a Segmentation each."""
        n = len(images)
        inputs = {
            "support_id": objects([support_id] * n).reshape(n, 1),
            "image": objects(images).reshape(n, 1),
        }
        if min_area is not None:
            inputs["min_area"] = np.full((n, 1), min_area, np.int32)
        outputs = ["labels", "size", "error"] + (["prob"] if with_prob else [])
        outputs += ["result"] if min_area is not None else []
        out = self.infer(protocol.SEGMENT_MODEL, inputs, outputs, backend, support_id)
        results = []
        for k in range(n):
            error = out["error"][k, 0].decode()
            if error:
                raise ServeError(error)
            h, w = (int(v) for v in out["size"][k])
            labels = out["labels"][k, : h * w].reshape(h, w).copy()
            if min_area is not None:
                results.append(segmentation(labels, json.loads(out["result"][k, 0].decode())))
            else:
                results.append(
                    (labels, out["prob"][k, : h * w].reshape(h, w).copy()) if with_prob else labels
                )
        return results

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for client in connections:
            with contextlib.suppress(Exception):  # a connection of a finished thread
                client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def segmentation(labels: np.ndarray, summary: dict):
    """A row's labels and ``result`` JSON -> a Segmentation (objects' masks decoded from their RLE)."""
    from pycocotools import mask as coco_mask

    from fss.io.instances import Instance
    from fss.runtime.results import Segmentation

    classes = summary["classes"]
    scores = np.array([summary["score"][name] for name in classes], np.float32)
    instances = None
    if "instances" in summary:
        instances = [
            Instance(
                r["category_id"],
                coco_mask.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}) > 0,
                r["score"],
                r["bbox"],
                r["area"],
            )
            for r in summary["instances"]
        ]
    return Segmentation(labels, classes, scores, summary["min_score"], instances=instances)

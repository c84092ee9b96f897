"""``fss.serve.Client``: the Python client of ``fss-serve`` (and of a model repository written by
``fss-export --triton-repo``), on ``tritonclient``.

>>> client = Client("127.0.0.1:8000")            # HTTP; "grpc://127.0.0.1:8001" for gRPC
>>> sid = client.register_support("examples/support")
>>> labels = client.segment(sid, Path("query.jpg").read_bytes())   # H x W uint8, as fss-run writes

Support ids are content hashes (:mod:`fss.serve.protocol`). The client keeps the encoded shots of the
sets it registered, so when a request reaches a server that does not hold the set (another replica, a
restart, an LRU eviction) it registers the set there under the same id and retries once.
"""

from pathlib import Path

import numpy as np

from fss.serve import protocol


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


def read_support_folder(folder) -> tuple[list[str], list[bytes], list[bytes]]:
    """Per-shot class names, image bytes and mask bytes of a support folder (``fss-run`` layout/order)."""
    from fss.io import find_support_pairs

    classes, images, masks = [], [], []
    for name, pairs in find_support_pairs(folder).items():
        for image_path, mask_path in pairs:
            classes.append(name)
            images.append(Path(image_path).read_bytes())
            masks.append(Path(mask_path).read_bytes())
    return classes, images, masks


class Client:
    """One connection to an ``fss-serve`` server (not shared between threads: make one per thread)."""

    def __init__(self, url: str = "127.0.0.1:8000", timeout_s: float = 120.0):
        self.scheme, self.address = split_url(url)
        if self.scheme == "grpc":
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(self.address)
        else:
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(
                self.address, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        self._tc = tc
        self.timeout_s = timeout_s
        self._sets: dict[str, tuple[list[str], list[bytes], list[bytes]]] = {}
        self.reregistrations = 0

    # -- plumbing ----------------------------------------------------------------------------------
    def infer(self, model: str, inputs: dict, outputs: list[str]) -> dict:
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        tensors = []
        for name, array in inputs.items():
            tensor = self._tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        wanted = [self._tc.InferRequestedOutput(name) for name in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.scheme == "grpc" else {}
        try:
            result = self._client.infer(model, tensors, outputs=wanted, **kwargs)
        except InferenceServerException as err:
            raise ServeError(err.message() or str(err)) from None
        return {name: result.as_numpy(name) for name in outputs}

    def support_op(self, op: str, **inputs) -> dict:
        arrays = {"op": objects([op])}
        for name, values in inputs.items():
            arrays[name] = np.array(values, dtype=np.int32) if name == "index" else objects(values)
        out = self.infer(protocol.SUPPORT_MODEL, arrays, ["support_id", "classes", "shots", "info", "error"])
        error = out["error"].ravel()[0].decode()
        if error:
            raise ServeError(error)
        return out

    # -- server state --------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Server live and ready, both models loaded."""
        try:
            return self._client.is_server_ready() and all(
                self._client.is_model_ready(m) for m in (protocol.SUPPORT_MODEL, protocol.SEGMENT_MODEL)
            )
        except Exception:  # refused connection, timeout: not ready
            return False

    def info(self) -> dict:
        """The served model's metadata, limits and cache state (JSON of ``op=info``)."""
        import json

        return json.loads(self.support_op(protocol.OP_INFO)["info"].ravel()[0].decode())

    # -- support sets --------------------------------------------------------------------------------
    def register_support(self, folder) -> str:
        """Register a support folder (``fss-run``'s layout, read here, client-side) -> its id."""
        return self.register(*read_support_folder(folder))

    def register(self, classes: list[str], images: list[bytes], masks: list[bytes]) -> str:
        """Shot i: ``images[i]`` / ``masks[i]`` (encoded files) of class ``classes[i]`` -> the set's id.

        Label k is the k-th distinct class name in order of appearance (``fss-run`` sorts folders).
        """
        out = self.support_op(protocol.OP_REGISTER, images=images, masks=masks, classes=classes)
        support_id = out["support_id"].ravel()[0].decode()
        self._sets[support_id] = (list(classes), list(images), list(masks))
        return support_id

    def register_folder_on_server(self, folder: str) -> str:
        """A folder below the server's ``--support-root`` (the server must allow it)."""
        return self.support_op(protocol.OP_REGISTER, folder=[folder])["support_id"].ravel()[0].decode()

    def classes(self, support_id: str) -> list[str]:
        """Class names in label order (label k = ``classes[k - 1]``) of a set this client registered."""
        names = []
        for name in self._sets[support_id][0]:
            if name not in names:
                names.append(name)
        return names

    def ensure_registered(self, support_id: str) -> None:
        if support_id not in self._sets:
            raise ServeError(
                f"{protocol.UNKNOWN_SUPPORT} {support_id!r}, and this client did not register it: "
                "register it again"
            )
        self.reregistrations += 1
        self.register(*self._sets[support_id])

    def edit(self, op: str, support_id: str, payload, **inputs) -> str:
        try:
            out = self.support_op(op, support_id=[support_id], **inputs)
        except ServeError as err:
            if not str(err).startswith(protocol.UNKNOWN_SUPPORT) or support_id not in self._sets:
                raise
            self.ensure_registered(support_id)
            out = self.support_op(op, support_id=[support_id], **inputs)
        new_id = out["support_id"].ravel()[0].decode()
        self._sets[new_id] = payload
        return new_id

    def add_shot(self, support_id: str, class_name: str, image: bytes, mask: bytes) -> str:
        """A new set: ``support_id``'s shots plus this one (a new class is appended last) -> its id."""
        classes, images, masks = self._sets.get(support_id, ([], [], []))
        payload = (classes + [class_name], images + [image], masks + [mask])
        return self.edit(
            protocol.OP_ADD_SHOT, support_id, payload, classes=[class_name], images=[image], masks=[mask]
        )

    def remove_shot(self, support_id: str, class_name: str, index: int) -> str:
        """A new set: ``support_id`` without shot ``index`` of ``class_name`` -> its id."""
        payload = ([], [], [])
        if support_id in self._sets:
            classes, images, masks = self._sets[support_id]
            positions = [i for i, name in enumerate(classes) if name == class_name]
            drop = positions[index] if -len(positions) <= index < len(positions) else None
            keep = [i for i in range(len(classes)) if i != drop]
            payload = tuple([values[i] for i in keep] for values in (classes, images, masks))
        return self.edit(protocol.OP_REMOVE_SHOT, support_id, payload, classes=[class_name], index=[index])

    # -- queries -------------------------------------------------------------------------------------
    def segment(self, support_id: str, image: bytes, with_prob: bool = False):
        """One encoded image -> ``H x W`` uint8 labels (0 background, k the k-th class), as ``fss-run``.

        With ``with_prob`` also the ``H x W`` float32 probability of each pixel's label.
        """
        return self.segment_batch(support_id, [image], with_prob)[0]

    def segment_batch(self, support_id: str, images: list[bytes], with_prob: bool = False) -> list:
        """Several images in one request (at most the server's ``--max-batch``); a row that fails raises."""
        try:
            return self._segment(support_id, images, with_prob)
        except ServeError as err:
            if not str(err).startswith(protocol.UNKNOWN_SUPPORT) or support_id not in self._sets:
                raise
            self.ensure_registered(support_id)
            return self._segment(support_id, images, with_prob)

    def _segment(self, support_id: str, images: list[bytes], with_prob: bool) -> list:
        n = len(images)
        inputs = {
            "support_id": objects([support_id] * n).reshape(n, 1),
            "image": objects(images).reshape(n, 1),
        }
        outputs = ["labels", "size", "error"] + (["prob"] if with_prob else [])
        out = self.infer(protocol.SEGMENT_MODEL, inputs, outputs)
        results = []
        for k in range(n):
            error = out["error"][k, 0].decode()
            if error:
                raise ServeError(error)
            h, w = (int(v) for v in out["size"][k])
            labels = out["labels"][k, :h, :w].copy()
            results.append((labels, out["prob"][k, :h, :w].copy()) if with_prob else labels)
        return results

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

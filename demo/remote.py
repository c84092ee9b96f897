"""The page as a client of a running ``fss-serve`` (``fss-demo --server URL``): no local model.

:class:`RemoteEngine` has :class:`fss.demo.session.Engine`'s interface; a tab's support set is
registered on the server (its id, a content hash, changes with every shot edit) and each query is sent
as a lossless PNG of the pixels the page shows, so the server decodes exactly what a local model would
segment. What the page keeps per query is that PNG (the server keeps no query features).
"""

import threading
import time

import numpy as np
from PIL import Image

from fss.demo.session import MAX_PIXELS, MAX_QUERY_PIXELS, DemoError
from fss.errors import FssError
from fss.io.outputs import encoded, voc_palette


def png(image: Image.Image) -> bytes:
    return encoded(image, format="PNG", compress_level=1)


def mask_png(mask: np.ndarray) -> bytes:
    """A shot's mask (0 / 1 / 255 ignored) as the palette PNG the page's zip holds (fss-run reads both)."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    return encoded(image, format="PNG")


class RemoteEngine:
    """Segments through ``fss.serve.Client``; one client (and its connections) for every tab.

    Args:
        url: the server, as ``fss.serve.Client`` takes it (``host:port``, ``grpc://host:port``).
        feature_budget_mb: the queries' PNGs kept per session (beyond it, they are encoded again).
    """

    adapts = False

    def __init__(
        self,
        url: str,
        batch: int = 4,
        feature_budget_mb: float = 512,
        max_pixels: int = MAX_PIXELS,
        max_query_pixels: int = MAX_QUERY_PIXELS,
        timeout_s: float = 120.0,
    ):
        try:
            from fss.serve.client import Client, ServeError
        except ImportError:
            raise FssError("--server needs the fss-serve client: pip install 'fss[serve]'") from None

        self.serve_error = ServeError
        self.client = Client(url, timeout_s=timeout_s)
        if not self.client.ready():
            raise FssError(f"no fss-serve ready at {url} (start one with fss-serve, or check --server)")
        self.info = self.call(self.client.info)
        self.url = url
        self.model_name = self.info["model"]  # the server's checkpoint, as results.json names it
        self.batch = batch
        self.feature_budget = feature_budget_mb * 2**20
        self.max_pixels = max_pixels
        self.max_query_pixels = max_query_pixels
        self.support_ids: dict[str, str] = {}  # session name -> the id of its current set
        self.lock = threading.Lock()
        self.encoded_images = 0

    @property
    def meta(self) -> dict:
        return self.info["meta"]

    @property
    def size(self) -> int:
        return int(self.info["input_size"])

    @property
    def where(self) -> str:
        return f"fss-serve {self.url}"

    def call(self, request, *args):
        """A request to the server; its refusal (bad image, server gone) becomes the page's message."""
        try:
            return request(*args)
        except self.serve_error as err:
            raise DemoError(f"fss-serve: {err}") from None
        except Exception as err:  # connection refused, timeout: tritonclient's own exceptions
            raise DemoError(f"fss-serve at {self.client.backends[0][1]} did not answer: {err}") from None

    def encode_queries(self, images: list[Image.Image]) -> tuple[list[bytes], float]:
        start = time.perf_counter()
        pngs = [png(image) for image in images]
        return pngs, (time.perf_counter() - start) / len(images)

    def label(self, features: bytes, image: Image.Image, support: str):
        """The server's Segmentation of one query (labels, presence scores)."""
        result = self.call(self.client.predict, self.support_ids[support], features)
        if result.labels.shape != (image.height, image.width):
            shape = result.labels.shape
            raise DemoError(f"fss-serve answered a {shape[1]}x{shape[0]} mask for this image")
        return result

    def add_support(self, name: str, images, masks, classes) -> None:
        per_shot = [
            (c, png(i), mask_png(m))
            for c, ii, mm in zip(classes, images, masks, strict=True)
            for i, m in zip(ii, mm, strict=True)
        ]
        names, pngs, mask_pngs = (list(v) for v in zip(*per_shot, strict=True))
        support_id = self.call(self.client.register, names, pngs, mask_pngs)
        with self.lock:
            self.support_ids[name] = support_id
            self.encoded_images += len(pngs)

    def add_shot(self, name: str, class_name: str, image, mask) -> None:
        shot = (class_name, png(image), mask_png(mask))
        support_id = self.call(self.client.add_shot, self.support_ids[name], *shot)
        with self.lock:
            self.support_ids[name] = support_id
            self.encoded_images += 1

    def remove_shot(self, name: str, class_name: str, index: int) -> None:
        support_id = self.call(self.client.remove_shot, self.support_ids[name], class_name, index)
        with self.lock:
            self.support_ids[name] = support_id

    def remove_support(self, name: str) -> None:
        """Forget the set's id; the server drops it from its cache in its own time (LRU)."""
        with self.lock:
            self.support_ids.pop(name, None)

"""What the served models do, free of Triton: decoding under limits, support sets, the head.

``SupportService`` registers support sets (content-hash ids, see :mod:`fss.serve.protocol`) and adds or
removes shots; ``SegmentService`` segments rows of ``(support id, encoded image)`` through
:meth:`fss.Segmenter.segment_encoded`, the same fused head as ``fss-run``. Every problem a request can
cause raises :class:`RequestError` with one line; the Triton layer turns it into that request's error.
"""

import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fss.errors import (
    CorruptImageError,
    FssError,
    ImageError,
    ImageFormatError,
    ImageTooLargeError,
    MissingSupportError,
    NoSupportError,
    ShotError,
)
from fss.io import images as image_io
from fss.io.folders import check_class_names, find_support_pairs
from fss.io.images import as_rgb
from fss.io.masks import check_shot, parse_mask
from fss.runtime.supports import class_position
from fss.serve import protocol
from fss.serve.support_store import SupportStore

LOG = logging.getLogger("fss.serve")

# The formats fss-run reads (its image extensions); Pillow would open many more.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")


class RequestError(Exception):
    """A bad request: the message is what the client sees."""


def internal_error(what: str, err: Exception) -> str:
    """A server bug: the traceback goes to the log, the client gets one line without it."""
    LOG.error("%s failed", what, exc_info=err)
    return f"internal error in {what} ({type(err).__name__}); details are in the server's log"


@dataclass(frozen=True)
class Limits:
    """Request limits, checked before any decoding or encoding."""

    max_image_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096
    max_shots: int = 64
    max_class_name: int = 128


def check_bytes(data: bytes, limits: Limits, what: str) -> None:
    """An encoded image is bytes, and not too many."""
    if not isinstance(data, bytes) or not data:
        raise RequestError(f"{what}: empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"{what}: {len(data)} bytes, more than the limit of {limits.max_image_bytes}")


def decoded(data: bytes, limits: Limits, what: str, kind: str) -> Image.Image:
    """Encoded bytes -> decoded image under the limits (format and pixel count from its header), as
    ``fss-run`` decodes a file; ``kind`` (image, mask) words a corrupt one."""
    check_bytes(data, limits, what)
    try:
        return image_io.decode_image(io.BytesIO(data), kind, limit=limits.max_pixels, formats=IMAGE_FORMATS)
    except ImageTooLargeError as err:
        pixels = f"{err.size[0]}x{err.size[1]} pixels, more" if err.size else "more"
        raise RequestError(f"{what}: {pixels} than the limit of {limits.max_pixels} pixels") from None
    except CorruptImageError:
        raise RequestError(f"{what}: unreadable or corrupt {kind}") from None
    except ImageFormatError as err:
        raise RequestError(f"{what}: {err.message}") from None
    except ImageError:
        raise RequestError(f"{what}: not a readable image") from None


def decode_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Encoded bytes -> RGB image, read as ``fss-run`` reads a file."""
    return as_rgb(decoded(data, limits, what, "image"))


def decode_mask(data: bytes, limits: Limits, what: str = "mask") -> np.ndarray:
    """Encoded mask bytes -> ``H x W`` uint8 (0 background, 1 foreground, 255 ignored), as ``fss-run``."""
    img = decoded(data, limits, what, "mask")
    try:
        return parse_mask(img)
    except FssError as err:
        raise RequestError(f"{what}: {err.message}") from None


def decode_shot(image: bytes, mask: bytes, limits: Limits, what: str) -> tuple[Image.Image, np.ndarray]:
    img, parsed = decode_image(image, limits, f"{what} image"), decode_mask(mask, limits, f"{what} mask")
    try:
        check_shot(img.size, parsed)
    except ShotError as err:
        raise RequestError(f"{what}: {err.message}") from None
    return img, parsed


def unknown_support(support_id: str) -> RequestError:
    return RequestError(f"{protocol.UNKNOWN_SUPPORT} {support_id!r}: register the support set (again)")


def check_label_names(names: list[str]) -> None:
    """``fss-run``'s class-name rules (no class named like label 0, labels fit a uint8 PNG)."""
    try:
        check_class_names(names)
    except FssError as err:
        raise RequestError(err.message) from None


def group_shots(classes: list[str], images: list[bytes], masks: list[bytes]):
    """Per-shot lists -> class names in name order (the label order, :mod:`fss.runtime.results`) and
    per-class ``(image, mask)`` lists, in the order sent."""
    grouped: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, image, mask in zip(classes, images, masks, strict=True):
        grouped.setdefault(name, []).append((image, mask))
    names = sorted(grouped)
    return names, [grouped[name] for name in names]


class SupportService:
    """Registration and shot edits; encodes with its own Segmenter, publishes into the shared store.

    A set is encoded (:meth:`Segmenter.encode_support`, :meth:`~Segmenter.with_shot`) before its id is
    put in the store, so no request ever sees half a set.
    """

    def __init__(self, segmenter, store: SupportStore, limits: Limits, support_root: Path | None = None):
        self.seg = segmenter
        self.store = store
        self.limits = limits
        self.support_root = None if support_root is None else Path(support_root).resolve()
        self._lock = threading.Lock()

    def describe(self, support_id: str) -> dict:
        shots = self.store.shots(support_id)
        classes = self.store[support_id].classes
        return {"support_id": support_id, "classes": list(classes), "shots": [len(s) for s in shots]}

    def check_class_name(self, name) -> str:
        if not isinstance(name, str) or not name.strip():
            raise RequestError("class names must be non-empty text")
        if len(name) > self.limits.max_class_name:
            raise RequestError(f"class name longer than {self.limits.max_class_name} characters")
        return name

    def register(self, classes: list[str], images: list[bytes], masks: list[bytes]) -> dict:
        """Shot i: ``images[i]`` / ``masks[i]`` of class ``classes[i]``; label k: the k-th class by name."""
        if not images:
            raise RequestError("a support set needs at least one shot (image + mask + class name)")
        if not len(images) == len(masks) == len(classes):
            raise RequestError(
                f"need one mask and one class name per image: {len(images)} images, {len(masks)} masks, "
                f"{len(classes)} class names"
            )
        if len(images) > self.limits.max_shots:
            raise RequestError(f"{len(images)} shots, more than the limit of {self.limits.max_shots}")
        for name in classes:
            self.check_class_name(name)
        names, pairs = group_shots(classes, images, masks)
        check_label_names(names)
        shots = [[protocol.shot_digest(i, m) for i, m in class_pairs] for class_pairs in pairs]
        support_id = protocol.support_id(names, shots)
        if support_id in self.store:
            return self.describe(support_id)
        decoded = [
            [decode_shot(i, m, self.limits, f"shot {k + 1} of class {name!r}") for k, (i, m) in enumerate(ps)]
            for name, ps in zip(names, pairs, strict=True)
        ]
        support = self.seg.encode_support(
            [[img for img, _ in d] for d in decoded], [[m for _, m in d] for d in decoded], names
        )
        with self._lock:
            self.store.put(support_id, support, shots)
        return self.describe(support_id)

    def register_folder(self, folder: str) -> dict:
        """A support folder on the server (``fss-run`` layout), only below the server's support root.

        Every path read is resolved first, the folder, its class folders and each image and mask, so
        a symbolic link leading out of the root is refused rather than followed.
        """
        if self.support_root is None:
            raise RequestError("server-side support folders are disabled: this server has no support root")
        path = (self.support_root / folder).resolve()
        if not path.is_relative_to(self.support_root):
            raise RequestError(f"support folder {folder!r} is outside the server's support root")
        if path.is_dir():
            for entry in path.iterdir():
                if entry.is_dir():  # a class folder find_support_pairs would list
                    self.inside_root(entry, folder)
        try:
            found = find_support_pairs(path)
        except FssError as err:
            raise RequestError(f"{err.message} ({folder})") from None
        classes, images, masks = [], [], []
        for name, pairs in found.items():
            for image_path, mask_path in pairs:
                classes.append(name)
                images.append(self.read_below_root(image_path, folder))
                masks.append(self.read_below_root(mask_path, folder))
        return self.register(classes, images, masks)

    def inside_root(self, path: Path, folder: str) -> Path:
        """``path`` resolved; refused when it leads outside the support root (the target is not named)."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.support_root):
            shown = str(path.relative_to(self.support_root))
            raise RequestError(f"support folder {folder!r}: {shown!r} leads outside the support root")
        return resolved

    def read_below_root(self, path: Path, folder: str) -> bytes:
        """A file's bytes, read only below the root, and no more than the image size limit (+1 to tell)."""
        with self.inside_root(path, folder).open("rb") as f:
            return f.read(self.limits.max_image_bytes + 1)

    def base(self, support_id: str):
        try:
            return self.store[support_id], self.store.shots(support_id)
        except KeyError:
            raise unknown_support(support_id) from None

    def derive(self, base_id: str, edit) -> dict:
        """A new set from a stored one (left as it is): ``edit(base)`` returns (new set, new id, shots)."""
        base, _ = self.base(base_id)
        support, new_id, shots = edit(base)
        with self._lock:
            if new_id not in self.store:
                self.store.put(new_id, support, shots)
        return self.describe(new_id)

    def add_shot(self, base_id: str, class_name: str, image: bytes, mask: bytes) -> dict:
        """One more shot of a class (a new class takes its place in name order); only it is encoded."""
        self.check_class_name(class_name)
        base, base_shots = self.base(base_id)
        check_label_names(list(dict.fromkeys([*base.classes, class_name])))
        if sum(len(s) for s in base_shots) >= self.limits.max_shots:
            raise RequestError(f"support set already has the limit of {self.limits.max_shots} shots")
        img, parsed = decode_shot(image, mask, self.limits, f"new shot of class {class_name!r}")
        classes, shots = list(base.classes), [list(s) for s in base_shots]
        if class_name in classes:
            shots[classes.index(class_name)].append(protocol.shot_digest(image, mask))
        else:
            n = class_position(classes, class_name)
            classes.insert(n, class_name)
            shots.insert(n, [protocol.shot_digest(image, mask)])

        def edit(base):
            return (
                self.seg.with_shot(base, class_name, img, parsed),
                protocol.support_id(classes, shots),
                shots,
            )

        return self.derive(base_id, edit)

    def remove_shot(self, base_id: str, class_name: str, index: int) -> dict:
        """Drop shot ``index`` (negative counts from the end) of a class; nothing is re-encoded."""
        base, base_shots = self.base(base_id)
        if class_name not in base.classes:
            raise RequestError(f"support set has no class {class_name!r} (classes: {list(base.classes)})")
        n = base.classes.index(class_name)
        count = len(base_shots[n])
        if not -count <= index < count:
            raise RequestError(f"class {class_name!r} has {count} shots, no shot {index}")
        if count == 1:
            raise RequestError(f"cannot remove the only shot of class {class_name!r}")
        shots = [list(s) for s in base_shots]
        del shots[n][index]

        def edit(base):
            new_id = protocol.support_id(list(base.classes), shots)
            return self.seg.without_shot(base, class_name, index), new_id, shots

        return self.derive(base_id, edit)


@dataclass
class Row:
    """One query of a batch: its support, its image, whether max probabilities were asked for, and the
    smallest object where objects were (None: none)."""

    support_id: str
    image: bytes
    with_prob: bool
    min_area: int | None = None


@dataclass
class RowResult:
    labels: np.ndarray | None = None  # H x W uint8, 0 background, k the k-th class
    prob: np.ndarray | None = None  # H x W float32, the winning class's probability
    summary: dict | None = None  # classes, presence scores, absent classes, objects (Segmentation.summary)
    error: str = ""


class SegmentService:
    """Segments rows from any number of requests: decodes them in parallel, then one encoder batch per
    support set through ``Segmenter.segment_encoded`` (the head of ``fss-run``)."""

    def __init__(self, segmenter, limits: Limits, workers: int = 2):
        self.seg = segmenter
        self.limits = limits
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fss-decode")

    def load(self, row: Row):
        img = decode_image(row.image, self.limits, "query image")
        return self.seg.load_query(img)

    def segment(self, rows: list[Row]) -> list[RowResult]:
        """One result per row; whatever goes wrong with a row or a support set's group fails only those."""
        results = [RowResult() for _ in rows]
        loaded = {}
        for i, future in enumerate([self.pool.submit(self.load, row) for row in rows]):
            try:
                loaded[i] = future.result()
            except RequestError as err:
                results[i].error = str(err)
            except Exception as err:  # a server bug on this image: its batchmates go on
                results[i].error = internal_error("fss_segment decoding", err)
        groups: dict[tuple[str, bool, int | None], list[int]] = {}
        for i in loaded:
            groups.setdefault((rows[i].support_id, rows[i].with_prob, rows[i].min_area), []).append(i)
        for (support_id, with_prob, min_area), members in groups.items():
            try:
                outputs = self.run_group(support_id, with_prob, min_area, [loaded[i] for i in members])
            except Exception as err:  # e.g. out of memory for this group: the other groups go on
                outputs = [internal_error("fss_segment", err)] * len(members)
            for i, out in zip(members, outputs, strict=True):
                if isinstance(out, str):
                    results[i].error = out
                else:
                    results[i].labels, results[i].prob, results[i].summary = (
                        out.labels,
                        out.prob,
                        out.summary(),
                    )
        return results

    def run_group(self, support_id: str, with_prob: bool, min_area: int | None, loaded) -> list:
        import torch

        if not self.seg.has_support(support_id):
            return [str(unknown_support(support_id))] * len(loaded)
        try:
            imgs, batch = [img for img, _ in loaded], torch.stack([x for _, x in loaded])
            return self.seg.segment_encoded(imgs, batch, support_id, with_prob, min_area=min_area)
        except (MissingSupportError, NoSupportError):  # evicted between the check and the use
            if self.seg.has_support(support_id):
                raise
            return [str(unknown_support(support_id))] * len(loaded)

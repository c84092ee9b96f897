"""The demo's state, free of any web framework: one shared model, one support set per browser session.

An :class:`Engine` owns the model (one :class:`fss.Segmenter`, encoded once per process) and
serialises its device work. Each browser tab gets a :class:`Session` whose support set lives in
the Segmenter under the session's own name, so concurrent users never see each other's shots.
Query features are encoded once and kept (within a memory budget): when a shot changes only the
prototypes change, and the cached features are matched again without re-encoding.

What the page shows and downloads is :mod:`fss.demo.outputs`'s; its mask editor, :mod:`fss.demo.editor`'s.
"""

import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fss.errors import EmptyMaskError, FssError, ImageTooLargeError, ShotError
from fss.io.folders import check_class_names, is_class_folder_name
from fss.io.images import as_rgb, decode_image
from fss.io.masks import check_shot, read_mask

MAX_PIXELS = 40_000_000  # larger photos are refused before decoding (a 40 MP photo is ~120 MB as RGB)
MAX_QUERY_PIXELS = 400_000_000  # the queries one tab may hold (kept decoded for re-matching, ~1.2 GB)
MAX_CLASSES = 20
CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]{0,39}")


class DemoError(FssError):
    """A message for the page: bad input, never a crash."""


def check_class_name(name: str) -> str:
    """A name the page accepts: one the zip's ``support/<name>/`` folder gives back to ``fss-run``."""
    name = (name or "").strip()
    if not CLASS_NAME.fullmatch(name):
        raise DemoError(
            f"class name {name!r} must be 1-40 letters, digits, spaces or _ . + - (starting with a letter "
            "or digit)"
        )
    try:
        check_class_names([name])
    except FssError as err:
        raise DemoError(err.message) from None
    if not is_class_folder_name(name):
        raise DemoError(f"class name {name!r} ends like an image file name: fss-run skips such folders")
    return name


def open_checked(path, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an uploaded file, refusing corrupt files and huge images (checked from the header)."""
    name = Path(path).name
    try:
        return decode_image(path, what, limit=max_pixels)
    except ImageTooLargeError as err:
        size = f"{err.size[0]}x{err.size[1]} is" if err.size else "it is"
        raise DemoError(
            f"{what} too large: {size} over {max_pixels / 1e6:.0f} megapixels, resize it first", name
        ) from None
    except FssError:
        raise DemoError(f"unreadable or corrupt {what}", name) from None


def read_uploaded_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded support or query photo as ``fss-run`` reads it: 8-bit RGB, turned as displayed (EXIF
    orientation), so that a phone photo and the mask painted on it match what fss-run segments."""
    return as_rgb(open_checked(path, "image", max_pixels))


def read_mask_file(path, size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A mask file parsed with fss-run's conventions, checked as a shot of an image of ``size``."""
    open_checked(path, "mask", max_pixels)
    mask = read_mask(path)
    try:
        check_shot(size, mask, Path(path).name)
    except ShotError as err:
        raise DemoError(err.message, err.path) from None
    return mask


def feature_bytes(features) -> int:
    """What a query's kept features cost: a tensor, or an encoded image where the server encodes."""
    return len(features) if isinstance(features, bytes) else features.numel() * features.element_size()


@dataclass(eq=False)
class Shot:
    image: Image.Image
    mask: np.ndarray  # H x W uint8: 0 background, 1 foreground, 255 ignored


@dataclass(eq=False)
class Query:
    """One uploaded query: its features (``C x h x w``, kept within the budget) and latest labels."""

    name: str
    image: Image.Image | None = None
    features: torch.Tensor | None = None
    encode_s: float = 0.0
    labels: np.ndarray | None = None
    segment_s: float = 0.0
    error: str | None = None
    scores: dict | None = None  # class -> presence score of the latest labels


class Engine:
    """One model for every session; its device work (encoding, matching) runs one call at a time.

    Args:
        model: a loaded PANet or bundle (``fss.load_model``); input size and normalisation come from it.
        model_name: what ``results.json`` calls the model (as ``fss-run``: the checkpoint path).
        feature_budget_mb: query features kept per session; beyond it, queries are re-encoded on change.
        max_pixels: larger uploads are refused (checked from the file's header, before decoding).
        max_query_pixels: the query pixels one session may hold; further queries are refused.
    """

    def __init__(
        self,
        model,
        model_name: str,
        device=None,
        batch: int = 4,
        feature_budget_mb: float = 512,
        max_pixels: int = MAX_PIXELS,
        max_query_pixels: int = MAX_QUERY_PIXELS,
        refine: str | None = None,
        min_score: float | None = None,
        edges: str | None = None,
    ):
        from fss.runtime.segmenter import Segmenter

        options = dict(refine=refine, min_score=min_score, edges=edges)
        self.segmenter = Segmenter(model, device=device, batch=batch, **options)
        # An adapting refinement encodes queries with an encoder tuned to each support set: the page
        # keeps their preprocessed inputs instead of features and encodes them at every change.
        self.adapts = self.segmenter.adaptation is not None
        self.model_name = model_name
        self.feature_budget = feature_budget_mb * 2**20
        self.max_pixels = max_pixels
        self.max_query_pixels = max_query_pixels
        self.lock = threading.Lock()
        self.encoded_images = 0  # queries + shots encoded since start (the tests count re-use with it)

    @property
    def meta(self) -> dict:
        return self.segmenter.model.meta

    @property
    def size(self) -> int:
        return self.segmenter.size

    @property
    def batch(self) -> int:
        return self.segmenter.batch

    @property
    def where(self) -> str:
        """Where the model runs, for the page's model line."""
        return f"{self.segmenter.device}, refinement {self.segmenter.refine}"

    def encode_queries(self, images: list[Image.Image]) -> tuple[torch.Tensor, float]:
        """Queries -> ``M x C x h x w`` features (Segmenter's preprocessing) and seconds per query."""
        seg = self.segmenter
        batch = torch.stack([seg.load_query(img)[1] for img in images])
        if self.adapts:
            return batch, 0.0
        with self.lock:
            start = time.perf_counter()
            feats = seg.encode(batch)
            seconds = time.perf_counter() - start
            self.encoded_images += len(images)
        return feats, seconds / len(images)

    def label(self, features: torch.Tensor, image: Image.Image, support: str):
        """``C x h x w`` query features -> the Segmentation (labels, presence scores) at the image's size;
        the image guides the edges where the model's are guided."""
        seg = self.segmenter
        with self.lock:
            if self.adapts:  # ``features`` are the query's input: encoded with the set's adapted encoder
                with seg.encoder_of(seg.support(support)):
                    features = seg.encode(features[None])[0]
            guide = seg.load_query(image)[1] if seg.edges == "guided" else None
            return seg.predict_features(features, (image.height, image.width), support, guide)

    # The Segmenter's support edits, under the engine's lock, counting the shots encoded.
    def add_support(self, name: str, images, masks, classes) -> None:
        with self.lock:
            self.segmenter.add_support(name, images, masks, classes)
            self.encoded_images += sum(len(c) for c in images)

    def add_shot(self, name: str, class_name: str, image, mask) -> None:
        with self.lock:
            self.segmenter.add_shot(class_name, image, mask, support=name)
            self.encoded_images += 1

    def remove_shot(self, name: str, class_name: str, index: int) -> None:
        with self.lock:
            self.segmenter.remove_shot(class_name, index, support=name)

    def remove_support(self, name: str) -> None:
        with self.lock:
            if self.segmenter.has_support(name):
                self.segmenter.remove_support(name)


class Session:
    """One browser tab: classes of painted shots, uploaded queries, and their results."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.id = f"demo-{uuid.uuid4().hex}"
        self.shots: dict[str, list[Shot]] = {}
        self.queries: dict[str, Query] = {}
        self.feature_bytes = 0
        self.pending: Image.Image | None = None  # the support image in the editor
        self.pending_mask: np.ndarray | None = None  # its mask file, if one was loaded
        self.selected: tuple[str, int] | None = None  # (class, shot index) picked in the shot list
        self.editor_stale = False  # a shot was added from the editor's paint: show the image unpainted
        self.lock = threading.Lock()  # one tab's events may arrive together
        self.tmp = tempfile.TemporaryDirectory(prefix="fss-demo-")

    # -- supports -------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """Sorted class names: label k is the k-th class, 0 background (fss-run's rule)."""
        return sorted(self.shots)

    def add_shot(self, class_name: str, image: Image.Image, mask: np.ndarray) -> str:
        class_name = check_class_name(class_name)
        try:
            check_shot(image.size, mask)
        except EmptyMaskError:
            raise DemoError(
                f"the mask of this {class_name} shot has no foreground: paint the object first"
            ) from None
        except ShotError as err:
            raise DemoError(err.message) from None
        if class_name not in self.shots and len(self.shots) >= MAX_CLASSES:
            raise DemoError(f"at most {MAX_CLASSES} classes")
        shot = Shot(image, mask)
        with self.lock:
            existing = self.classes
            if not existing:
                self.engine.add_support(self.id, [[image]], [[mask]], [class_name])
            elif class_name in self.shots or class_name > existing[-1]:
                # Only the new shot is encoded; a new class sorting last is appended as Segmenter does.
                self.engine.add_shot(self.id, class_name, image, mask)
            else:
                self.shots[class_name] = [shot]
                self.rebuild()
                return self.refresh()
            self.shots.setdefault(class_name, []).append(shot)
            return self.refresh()

    def remove_shot(self, class_name: str, index: int) -> str:
        with self.lock:
            if class_name not in self.shots or not 0 <= index < len(self.shots[class_name]):
                raise DemoError(f"no shot {index + 1} of class {class_name!r}")
            if len(self.shots[class_name]) > 1:
                self.engine.remove_shot(self.id, class_name, index)
                del self.shots[class_name][index]
            else:
                del self.shots[class_name]
                self.rebuild()
            return self.refresh()

    def rebuild(self) -> None:
        """Register the whole support set again (a class added in the middle or removed): re-encodes it."""
        if not self.shots:
            self.close_support()
            return
        names = self.classes
        images = [[s.image for s in self.shots[n]] for n in names]
        masks = [[s.mask for s in self.shots[n]] for n in names]
        self.engine.add_support(self.id, images, masks, names)

    def close_support(self) -> None:
        self.engine.remove_support(self.id)

    def close(self) -> None:
        """The tab is gone: free its support set, features and files."""
        with self.lock:
            self.close_support()
            self.queries.clear()
            self.tmp.cleanup()

    # -- queries --------------------------------------------------------------------------------
    def add_queries(self, paths) -> list[str]:
        """Decode, check and encode uploaded queries (once); returns a message per refused file."""
        messages, decoded = [], []
        held = sum(q.image.width * q.image.height for q in self.queries.values() if q.image is not None)
        for path in paths:
            path = Path(path)
            try:
                image = read_uploaded_image(path, self.engine.max_pixels)
                held += image.width * image.height
                if held > self.engine.max_query_pixels:
                    held -= image.width * image.height
                    raise DemoError(
                        f"the queries of this tab would pass {self.engine.max_query_pixels / 1e6:g} "
                        "megapixels: clear some first",
                        path.name,
                    )
                decoded.append(Query(path.name, image))
            except DemoError as err:
                messages.append(str(err))
                decoded.append(Query(path.name, error=err.message))
        with self.lock:
            for query in decoded:
                stem = Path(query.name).stem
                old = self.queries.pop(stem, None)
                if old is not None:
                    self.forget_features(old)
                    messages.append(f"{query.name} replaces the earlier {old.name} (same name)")
                self.queries[stem] = query
            fresh = [q for q in decoded if q.image is not None]
            messages += self.encode(fresh)
            messages += self.segment(fresh)
        return messages

    def encode(self, queries: list[Query]) -> list[str]:
        """Encode queries, keeping their features within the budget (the others are labelled now);
        returns a message per query that failed to be labelled."""
        failed, batch = [], self.engine.batch
        for start in range(0, len(queries), batch):
            chunk = queries[start : start + batch]
            feats, seconds = self.engine.encode_queries([q.image for q in chunk])
            for query, feat in zip(chunk, feats, strict=True):
                query.encode_s = seconds
                size = feature_bytes(feat)
                if self.feature_bytes + size <= self.engine.feature_budget:
                    query.features = feat
                    self.feature_bytes += size
                else:
                    query.features = None  # over the budget: encoded again when the supports change
                    failed += self.labelled(query, feat)
        return failed

    def forget_features(self, query: Query) -> None:
        if query.features is not None:
            self.feature_bytes -= feature_bytes(query.features)
            query.features = None

    def clear_queries(self) -> None:
        with self.lock:
            self.queries.clear()
            self.feature_bytes = 0

    def label(self, query: Query, features: torch.Tensor) -> np.ndarray | None:
        if not self.shots:
            return None
        start = time.perf_counter()
        result = self.engine.label(features, query.image, self.id)
        query.segment_s = time.perf_counter() - start
        query.scores = result.class_scores()
        return result.labels

    def refresh(self) -> str:
        """Match every query with the current prototypes (features re-used where kept)."""
        good = [q for q in self.queries.values() if q.image is not None]
        uncached = [q for q in good if q.features is None]
        failed = []
        if uncached and self.shots:
            failed += self.encode(uncached)  # over the feature budget: encoded (and labelled) again
        failed += self.segment(good)  # the queries over the budget were labelled while encoded
        if not self.shots:
            for query in good:
                query.labels = None
        done = f"{len(good) - len(failed)} queries segmented" if self.shots and good else ""
        return "; ".join([done, *failed]) if failed else done

    def segment(self, queries: list[Query]) -> list[str]:
        """Label the queries whose features are kept; a message per query that failed."""
        return [m for q in queries if q.features is not None for m in self.labelled(q, q.features)]

    def labelled(self, query: Query, features) -> list[str]:
        """Label one query; one that fails (a server's refusal) keeps its error, shown in its row, and
        the others go on. Returns its message, if it failed."""
        try:
            query.labels, query.error = self.label(query, features), None
        except DemoError as err:
            query.labels, query.error = None, err.message
            return [f"{query.name} not segmented: {err.message}"]
        return []

    # -- results --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return ["background", *self.classes]

"""``Segmenter``: encode a support set once, cache its state, segment any number of queries.

The model (a :class:`fss.models.base.FewShotModel`) defines the support state: per-shot states (e.g.
foreground / background poolings), cached, so the episode state is combined from cached vectors and one
shot can be added or removed without re-encoding the others. A test-time refinement (``refine``, e.g. PRNet's
fusion) adapts the cached prototypes to each query; each query is its own episode, so a query's labels
never depend on the other queries of its batch.
"""

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fss.errors import FssError, SettingError
from fss.io.images import as_rgb
from fss.io.masks import check_shot, parse_mask
from fss.io.tensors import image_tensor, mask_tensor
from fss.models.adaptation import adapted_state, restore
from fss.models.base import adapts, resolve_refine
from fss.runtime.encoder_call import make_encoder
from fss.runtime.encoder_path import choose_encoder_path

DEFAULT_SUPPORT = "default"


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} cuda asked for, but torch sees no CUDA device")
    return device


@dataclass
class StreamResult:
    """One query of :meth:`Segmenter.segment_stream`: its labels (and probabilities), or the error."""

    query: object
    image: Image.Image | None
    labels: np.ndarray | None = None
    prob: np.ndarray | None = None
    error: Exception | None = None
    seconds: float = 0.0  # this query's share of its batch's device time


@dataclass
class SupportSet:
    """Per-class cached per-shot states (the pair of ``K_n x ...`` tensors of the model's
    ``shot_states``): ``fg[n]``, ``bg[n]``; ``protos`` is the episode state combined from them by the
    model's ``combine`` (prototypes, for the prototype methods)."""

    classes: list[str]
    fg: list[torch.Tensor]
    bg: list[torch.Tensor]
    protos: torch.Tensor
    combine: Callable
    shots: list | None = None  # adapting: per class (images, fg, bg) at the input size, to re-adapt
    encoder_state: dict | None = None  # adapting: the encoder adapted to this set

    def refresh(self) -> None:
        self.protos = self.combine(self.fg, self.bg)


class Segmenter:
    """Few-shot segmentation with cached support sets.

    >>> seg = Segmenter(fss.load_model(None))
    >>> seg.set_support([[img_a1, img_a2], [img_b1]], [[mask_a1, mask_a2], [mask_b1]], ["cat", "dog"])
    >>> labels = seg.segment([query1, query2])   # list of H x W uint8: 0 background, n class n

    Images are PIL images, ``H x W x 3`` arrays or paths; masks are arrays, PIL images or paths to
    mask files, read by ``fss.io.parse_mask`` (0 background, other values foreground; palette 255
    and arrays of only 0 / 1 / 255 mark ignored pixels).

    Args:
        model: a model or bundle (moved to ``device``; channels-last where chosen), a checkpoint path,
            or None for the bundled demo model.
        size: encoder input side (default: the checkpoint's).
        batch: queries encoded together.
        precision: ``"fp32" | "fp16" | "bf16"``: the encoder's precision (CUDA only for fp16); the head
            (prototypes, cosine, upsampling, argmax) always runs in fp32.
        channels_last: encoder memory layout (default: on; faster with oneDNN and cuDNN).
        cuda_graph: capture the encoder at ``batch x 3 x size x size`` in a CUDA graph (CUDA only).
        workers: CPU threads decoding and resizing queries while the encoder runs (``segment_stream``).
        refine: test-time refinement of the prototypes on each query (``none``, ``fusion``); default:
            what the checkpoint's method says (``none`` for PANet, ``fusion`` for PRNet).
        backend: what runs a torch model's encoder: ``auto`` (on the CPU, ONNX Runtime with a graph
            exported, verified and cached once per checkpoint; torch elsewhere), ``torch`` or
            ``onnxruntime`` (:mod:`fss.runtime.encoder_path`). ``self.backend`` and
            ``self.backend_reason`` say which and why.
        expected_images: for ``auto``, the images a batch job will encode: a new checkpoint is exported
            for ONNX Runtime first only when that many repay the export, else it runs in torch while the
            export runs in the background (None: a long-lived Segmenter, export first).
        continuing: for ``auto``, the encoder path of earlier results this job completes (kept).

    The device work of every call is serialised by an internal lock, so one Segmenter may be shared
    by threads; decoding happens outside the lock.
    """

    def __init__(
        self,
        model=None,
        device=None,
        size: int | None = None,
        batch: int = 8,
        impl: str = "auto",
        precision: str = "fp32",
        channels_last: bool = True,
        cuda_graph: bool = False,
        workers: int = 2,
        refine: str | None = None,
        backend: str = "auto",
        expected_images: int | None = None,
        continuing: str | None = None,
    ):
        from fss.checkpoint import load_model

        self.device = resolve_device(device)
        if model is None or isinstance(model, (str, Path)):
            model = load_model(model, device=self.device)
        self.model = model.to(self.device).eval()
        # The support state and the head run on the model given (its encoder may run in a backend).
        self.network = self.model
        self.size = int(size or model.meta["input_size"])
        # A method may encode supports at their own size (OSLSM's conditioning branch: 224).
        self.support_size = int(model.meta.get("support_size", self.size))
        self.normalisation = model.meta["normalisation"]
        self.batch = int(batch)
        self.impl = impl
        self.workers = int(workers)
        self.refine = resolve_refine(refine, self.model)
        self.base_state = None  # adapting: the encoder's own weights, restored after every use
        if adapts(self.refine):
            if getattr(self.model, "backend", "torch") != "torch":
                raise FssError(
                    "adaptation fine-tunes a checkpoint's encoder: load a checkpoint, not a bundle"
                )
            self.base_state = {k: v.detach().clone() for k, v in self.model.trunks()[0].state_dict().items()}
        if precision == "fp32":
            path = choose_encoder_path(
                self.model,
                self.device,
                self.size,
                backend,
                adapts(self.refine),
                images=expected_images,
                continuing=continuing,
            )
            self.model, self.backend, self.backend_reason = path.model, path.backend, path.reason
        elif backend == "onnxruntime":
            raise ValueError(f"the onnxruntime encoder path is float32; precision {precision} runs in torch")
        else:
            self.backend, self.backend_reason = "torch", f"torch ({precision})"
        self.encode_batch = make_encoder(
            self.model, self.device, self.batch, self.size, precision, channels_last, cuda_graph
        )
        self.supports: dict[str, SupportSet] = {}
        self._lock = threading.RLock()  # re-entered while an adapted encoder is swapped in

    # -- supports -------------------------------------------------------------------------------
    def set_support(self, images, masks, classes=None) -> None:
        """Replace the default support set. ``images[n][k]``, ``masks[n][k]``: shot k of class n."""
        self.add_support(DEFAULT_SUPPORT, images, masks, classes)

    def add_support(self, name: str, images, masks, classes=None) -> None:
        """Encode and cache a named support set (replacing one of the same name)."""
        if len(images) == 0 or len(images) != len(masks):
            raise ValueError(
                "images and masks must be non-empty lists of per-class shot lists of equal length"
            )
        classes = list(classes) if classes is not None else [f"class{n + 1}" for n in range(len(images))]
        if len(classes) != len(images) or len(set(classes)) != len(classes):
            raise ValueError(f"need {len(images)} distinct class names, got {classes}")
        shots = []
        for class_images, class_masks in zip(images, masks, strict=True):
            if len(class_images) == 0 or len(class_images) != len(class_masks):
                raise ValueError("every class needs at least one shot and one mask per image")
            shots.append(self.prepare_shots(list(class_images), list(class_masks)))
        if self.base_state is not None:
            support = self.adapted_support(classes, shots)
        else:
            fg, bg = map(list, zip(*(self.pool_prepared(*shot) for shot in shots), strict=True))
            support = SupportSet(classes, fg, bg, self.network.combine(fg, bg), self.network.combine)
        with self._lock:
            self.supports[name] = support

    def adapted_support(self, classes, shots) -> SupportSet:
        """Adapt the encoder to the whole support set once, pool every shot with it, keep its state."""
        N, K = len(shots), max(len(images) for images, _, _ in shots)
        imgs = torch.zeros(N, K, *shots[0][0].shape[1:])
        fg, bg = (torch.zeros(N, K, *shots[0][1].shape[1:]) for _ in range(2))
        shot_mask = torch.zeros(N, K, dtype=torch.bool)
        for n, (images, fgs, bgs) in enumerate(shots):
            k = len(images)
            imgs[n, :k], fg[n, :k], bg[n, :k], shot_mask[n, :k] = images, fgs, bgs, True
        to = dict(device=self.device)
        with self._lock:
            state = adapted_state(self.model, imgs.to(**to), fg.to(**to), bg.to(**to), shot_mask.to(**to))
        support = SupportSet(classes, [], [], None, self.network.combine, shots, state)
        with self.encoder_of(support):
            for shot in shots:
                fg_pools, bg_pools = self.pool_prepared(*shot)
                support.fg.append(fg_pools)
                support.bg.append(bg_pools)
        support.refresh()
        return support

    def readapt(self, support: str | None, class_name: str, add=None, keep=None) -> None:
        """An adapted support set after adding a shot to (or keeping ``keep`` of) a class: adapted anew."""
        with self._lock:
            s = self.support(support)
            classes, shots = list(s.classes), list(s.shots)
            if class_name not in classes:
                classes.append(class_name)
                shots.append(add)
            elif add is not None:
                n = classes.index(class_name)
                shots[n] = tuple(torch.cat([old, new]) for old, new in zip(shots[n], add, strict=True))
            else:
                n = classes.index(class_name)
                shots[n] = tuple(t[keep] for t in shots[n])
            self.supports[DEFAULT_SUPPORT if support is None else support] = self.adapted_support(
                classes, shots
            )

    @contextmanager
    def encoder_of(self, support: SupportSet):
        """The encoder a support set's queries need: its adapted one (swapped in, restored after)."""
        if support.encoder_state is None:
            yield
            return
        with self._lock:
            restore(self.model, support.encoder_state)
            try:
                yield
            finally:
                restore(self.model, self.base_state)

    def remove_support(self, name: str) -> None:
        with self._lock:
            if name not in self.supports:
                raise KeyError(f"no support set named {name!r}")
            del self.supports[name]

    def add_shot(self, class_name: str, image, mask, support: str | None = None) -> None:
        """Add one annotated image to a class (a new class is appended last); only it is encoded (with
        adaptation, the encoder is adapted to the changed set again and every shot re-encoded)."""
        if self.base_state is not None:
            return self.readapt(support, class_name, add=self.prepare_shots([image], [mask]))
        fg, bg = self.pool_shots([image], [mask])
        with self._lock:
            s = self.support(support)
            if class_name in s.classes:
                n = s.classes.index(class_name)
                s.fg[n] = torch.cat([s.fg[n], fg])
                s.bg[n] = torch.cat([s.bg[n], bg])
            else:
                s.classes.append(class_name)
                s.fg.append(fg)
                s.bg.append(bg)
            s.refresh()

    def remove_shot(self, class_name: str, index: int, support: str | None = None) -> None:
        """Remove shot ``index`` of a class from the cached poolings; nothing is re-encoded."""
        with self._lock:
            s = self.support(support)
            n = s.classes.index(class_name) if class_name in s.classes else None
            if n is None:
                raise KeyError(f"no class {class_name!r} (have {s.classes})")
            shots = len(s.fg[n])
            if not -shots <= index < shots:
                raise IndexError(f"class {class_name!r} has {shots} shots, no shot {index}")
            if shots == 1:
                raise ValueError(f"cannot remove the only shot of class {class_name!r}")
            keep = [k for k in range(shots) if k != index % shots]
            if s.encoder_state is not None:
                return self.readapt(support, class_name, keep=keep)
            s.fg[n], s.bg[n] = s.fg[n][keep], s.bg[n][keep]
            s.refresh()

    def pool_shots(self, images, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode shots and pool them: their per-shot states (``K x C`` foreground and ``K x C``
        background vectors, for the prototype methods)."""
        return self.pool_prepared(*self.prepare_shots(images, masks))

    def prepare_shots(self, images, masks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shots at the input size: ``K x 3 x S x S`` normalised images, ``K x S x S`` fg and bg masks."""
        imgs, fgs, bgs = [], [], []
        for image, mask in zip(images, masks, strict=True):
            img, parsed = as_rgb(image), parse_mask(mask)
            check_shot(img.size, parsed)
            resized = mask_tensor(parsed, self.support_size)
            imgs.append(image_tensor(img, self.support_size, self.normalisation))
            fgs.append(resized == 1)
            bgs.append(resized == 0)
        return torch.stack(imgs), torch.stack(fgs).float(), torch.stack(bgs).float()

    def pool_prepared(self, imgs, fg, bg) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`prepare_shots`'s tensors -> the model's per-shot states (a pair of ``K x ...`` tensors);
        supports the model encodes go through this Segmenter's encoder path."""
        to = dict(device=self.device)
        with self._lock, torch.inference_mode():
            return self.network.shot_states(
                imgs.to(**to), fg.to(**to), bg.to(**to), self.encode, self.refine, impl=self.impl
            )

    def support(self, name: str | None) -> SupportSet:
        name = DEFAULT_SUPPORT if name is None else name
        if name not in self.supports:
            if not self.supports:
                raise RuntimeError(
                    "no support set: call set_support(images, masks, classes) before segment()"
                )
            raise KeyError(f"no support set named {name!r} (have {sorted(self.supports)})")
        return self.supports[name]

    def classes(self, support: str | None = None) -> list[str]:
        return list(self.support(support).classes)

    # -- queries --------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``M x 3 x S x S`` normalised images -> ``M x C x h x w`` fp32 features, ``batch`` at a time."""
        with torch.inference_mode():
            return torch.cat(
                [self.encode_batch(images[i : i + self.batch]) for i in range(0, len(images), self.batch)]
            )

    def segment_torch(self, qry_imgs: torch.Tensor, out_size, support: str | None = None, return_prob=False):
        """``M x 3 x S x S`` normalised queries -> ``M x H x W`` uint8 labels (+ max probabilities)."""
        with self._lock:
            s = self.support(support)
            protos = s.protos
            with self.encoder_of(s):
                feats = self.encode(qry_imgs)
            with torch.inference_mode():
                out = self.segment_features(feats, protos, tuple(out_size), return_prob)
        return out

    def segment_features(self, feats: torch.Tensor, protos: torch.Tensor, out_size, return_prob=False):
        """``M x C x h x w`` query features, ``(1+N) x C`` prototypes -> ``M x H x W`` uint8 labels (+ max
        probabilities): the method's fused head, each query its own episode (refinements per query)."""
        refined = self.refine != "none"
        qry = feats[:, None] if refined else feats[None]  # M episodes of 1 query, or 1 episode of M
        protos = protos[None].expand(len(qry), *protos.shape)
        out = self.network.segment(
            qry, protos, out_size, self.refine, return_prob, impl=self.impl, in_size=(self.size, self.size)
        )
        flat = (lambda t: t[:, 0]) if refined else (lambda t: t[0])
        return (flat(out[0]), flat(out[1])) if return_prob else flat(out)

    def segment_encoded(self, imgs: list[Image.Image], batch: torch.Tensor, support, return_prob):
        """Already decoded queries and their ``M x 3 x S x S`` tensor -> per-query results."""
        results = []
        with self._lock:
            s = self.support(support)
            protos = s.protos
            with self.encoder_of(s):
                feats = self.encode(batch)
            with torch.inference_mode():
                for img, feat in zip(imgs, feats, strict=True):
                    # Logits go straight from feature resolution to the query's own size.
                    out = self.segment_features(feat[None], protos, (img.height, img.width), return_prob)
                    if return_prob:
                        results.append((out[0][0].cpu().numpy(), out[1][0].float().cpu().numpy()))
                    else:
                        results.append(out[0].cpu().numpy())
        return results

    def segment(self, queries, support: str | None = None, return_prob: bool = False):
        """Label maps at each query's own size (``H x W`` uint8 numpy), and max probabilities if asked."""
        imgs = [as_rgb(q) for q in queries]
        if not imgs:
            return ([], []) if return_prob else []
        results = self.segment_encoded(
            imgs,
            torch.stack([image_tensor(i, self.size, self.normalisation) for i in imgs]),
            support,
            return_prob,
        )
        return tuple(map(list, zip(*results, strict=True))) if return_prob else results

    def load_query(self, query) -> tuple[Image.Image, torch.Tensor]:
        img = as_rgb(query)
        return img, image_tensor(img, self.size, self.normalisation)

    def segment_stream(
        self, queries: Iterable, support: str | None = None, return_prob: bool = False
    ) -> Iterator[StreamResult]:
        """Segment a stream of queries in batches, decoding the next batch while the current one runs.

        Yields one :class:`StreamResult` per query, in input order; a query that cannot be decoded
        carries its ``error`` and the stream goes on.
        """
        queries = iter(queries)

        def next_batch(pool):
            items = [q for _, q in zip(range(self.batch), queries, strict=False)]
            return items, [pool.submit(self.load_query, q) for q in items]

        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            items, futures = next_batch(pool)
            while items:
                loaded = []
                for item, future in zip(items, futures, strict=True):
                    try:
                        loaded.append((item, *future.result()))
                    except (FssError, OSError, ValueError) as err:
                        loaded.append((item, None, err))
                items, futures = next_batch(pool)  # decoding overlaps the encoder below
                good = [entry for entry in loaded if entry[1] is not None]
                start = time.perf_counter()
                outputs = (
                    self.segment_encoded(
                        [e[1] for e in good], torch.stack([e[2] for e in good]), support, return_prob
                    )
                    if good
                    else []
                )
                share = (time.perf_counter() - start) / max(1, len(good))
                outputs = iter(outputs)
                for item, img, payload in loaded:
                    if img is None:
                        yield StreamResult(item, None, error=payload)
                        continue
                    out = next(outputs)
                    labels, prob = out if return_prob else (out, None)
                    yield StreamResult(item, img, labels, prob, seconds=share)

"""``Segmenter``: encode a support set once, cache its state, segment any number of queries.

The model (a :class:`fss.models.base.FewShotModel`) defines the support state: per-shot states (e.g.
foreground / background poolings), cached, so the episode state is combined from cached vectors and one
shot can be added or removed without re-encoding the others. A test-time refinement (``refine``, e.g. PRNet's
fusion) adapts the cached prototypes to each query; each query is its own episode, so a query's labels
never depend on the other queries of its batch.

The predictor is handed a store of support sets (:mod:`fss.runtime.supports`; its own in-memory one
by default) and builds its encoder backend through one factory (:mod:`fss.runtime.encoder_backend`);
adaptation (:mod:`fss.runtime.adapted_encoder`) and streams (:mod:`fss.runtime.streaming`) live beside it.
"""

import os
import threading
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

from fss.errors import MissingSupportError, SettingError
from fss.io.images import as_rgb, is_one_image
from fss.io.instances import DEFAULT_MIN_AREA
from fss.io.tensors import image_tensor
from fss.kernels.guided import grey_of_normalised
from fss.models.base import resolve_edges, resolve_min_score, resolve_refine
from fss.runtime.adapted_encoder import adaptation_for, edited_shots
from fss.runtime.encoder_backend import build_backend, resolve_device
from fss.runtime.results import Segmentation, head, sorted_classes
from fss.runtime.streaming import StreamResult, stream
from fss.runtime.supports import (
    SupportSet,
    SupportSets,
    class_names,
    find_support,
    folder_shots,
    kept_shots,
    shot_tensors,
    support_name,
)


class Segmenter:
    """Few-shot segmentation with cached support sets.

    >>> seg = Segmenter(fss.load_model(None))
    >>> seg.set_support([[img_a1, img_a2], [img_b1]], [[mask_a1, mask_a2], [mask_b1]], ["cat", "dog"])
    >>> labels = seg.segment([query1, query2])   # list of H x W uint8: 0 background, n class n
    >>> result = seg.predict(query1)   # a Segmentation: labels, classes, presence scores (and more)

    Label ``n`` is the ``n``-th class in name order (``classes[n - 1]``), however the set was built:
    :mod:`fss.runtime.results` states the rule.

    Images are PIL images, ``H x W x 3`` arrays or paths; masks are arrays, PIL images or paths to
    mask files, read by ``fss.io.masks.parse_mask`` (0 background, other values foreground; palette 255
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
        store: where support sets are kept by name (any ``MutableMapping``; a server passes its shared
            store so that every predictor segments every registered set); default: its own.
        min_score: presence cut-off in ``[0, 1]``: a class scoring below it on a query is judged absent
            there and gets no pixels (:mod:`fss.models.presence`); None: the checkpoint's calibrated
            cut-off (0 without a calibration); 0: nothing is gated.
        edges: ``none`` (bilinear logits) or ``guided`` (the probabilities guided-filtered with each
            query, :mod:`fss.kernels.guided`); None: the checkpoint's ``meta["edges"]``, else ``none``.

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
        store: MutableMapping | None = None,
        min_score: float | None = None,
        edges: str | None = None,
    ):
        from fss.checkpoint import load_model

        self.device = resolve_device(device)
        if model is None or isinstance(model, (str, Path)):
            model = load_model(model, device=self.device)
        # The support state and the head run on the model given (its encoder may run in a backend).
        self.network = model.to(self.device).eval()
        self.size = int(size or model.meta["input_size"])
        # A method may encode supports at their own size (OSLSM's conditioning branch: 224).
        self.support_size = int(model.meta.get("support_size", self.size))
        self.normalisation = model.meta["normalisation"]
        self.batch = int(batch)
        self.impl = impl
        self.workers = int(workers)
        self.refine = resolve_refine(refine, self.network)
        self._lock = threading.RLock()  # the device work; re-entered while an adapted encoder is swapped in
        self.adaptation = adaptation_for(self.network, self.refine, self._lock)
        self.encoder = build_backend(
            self.network,
            self.device,
            self.size,
            self.batch,
            precision,
            channels_last,
            cuda_graph,
            backend,
            adapting=self.adaptation is not None,
            expected_images=expected_images,
            continuing=continuing,
        )
        self.model = self.encoder.model  # what runs the encoder: the network, or a bundle of its graph
        self.backend, self.backend_reason = self.encoder.name, self.encoder.reason
        self.store = SupportSets() if store is None else store
        self.min_score = resolve_min_score(min_score, model)
        self.edges = resolve_edges(edges, model)
        if not 0 <= self.min_score <= 1:
            raise SettingError(f"min_score must lie in [0, 1], got {min_score}")

    # -- supports -------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder, model=None, box_supports: str = "mask", **options) -> "Segmenter":
        """A Segmenter (``model`` and ``options`` as the constructor's) with the support folder that
        ``fss-run --support`` takes registered as its default set: ``folder/<class>/<image> + mask``,
        classes in name order (label n is the n-th class, as ``fss-run`` writes it); ``box_supports``
        as ``fss-run --box-supports`` (``mask`` or ``grabcut``: what a box file in place of a mask gives)."""
        segmenter = cls(model, **options)
        segmenter.set_support(folder, box_supports=box_supports)
        return segmenter

    def set_support(self, images, masks=None, classes=None, box_supports: str = "mask") -> None:
        """Replace the default support set: ``images[n][k]``, ``masks[n][k]`` is shot k of class n, or
        ``images`` is a support folder (``masks`` and ``classes`` None; see :meth:`from_folder`)."""
        self.add_support(None, images, masks, classes, box_supports)

    def add_support(
        self, name: str | None, images, masks=None, classes=None, box_supports: str = "mask"
    ) -> None:
        """Encode and store a named support set (replacing one of the same name); ``images`` may be a
        support folder, as in :meth:`set_support`."""
        if isinstance(images, (str, os.PathLike)) and masks is None and classes is None:
            images, masks, classes = folder_shots(images, box_supports)
        support = self.encode_support(images, masks, classes)
        with self._lock:
            self.store[support_name(name)] = support

    def encode_support(self, images, masks, classes=None) -> SupportSet:
        """A support set encoded for this predictor (not stored): ``images[n][k]``, ``masks[n][k]``; the
        classes are kept in name order (label n is the n-th)."""
        images, masks, classes = sorted_classes(images, masks, class_names(images, masks, classes))
        shots = [self.prepare_shots(list(i), list(m)) for i, m in zip(images, masks, strict=True)]
        if self.adaptation is not None:
            return self.adapted_support(classes, shots)
        fg, bg = map(list, zip(*(self.pool_prepared(*shot) for shot in shots), strict=True))
        return SupportSet(classes, fg, bg, self.network.combine(fg, bg), self.network.combine)

    def adapted_support(self, classes, shots) -> SupportSet:
        """Adapt the encoder to the whole support set once, pool every shot with it, keep its state."""
        state = self.adaptation.adapt(shots, self.device)
        support = SupportSet(classes, [], [], None, self.network.combine, shots, state)
        with self.encoder_of(support):
            for shot in shots:
                fg_pools, bg_pools = self.pool_prepared(*shot)
                support.fg.append(fg_pools)
                support.bg.append(bg_pools)
        support.refresh()
        return support

    def encoder_of(self, support: SupportSet):
        """The encoder a support set's queries need: its adapted one (swapped in, restored after)."""
        if self.adaptation is None:
            return nullcontext()
        return self.adaptation.swapped_in(support.encoder_state)

    def with_shot(self, support: SupportSet, class_name: str, image, mask) -> SupportSet:
        """``support`` with one more annotated image of a class (a new class in name order): only it
        is encoded (with adaptation, the encoder is adapted to the changed set again)."""
        return self.with_prepared_shot(support, class_name, self.prepare_shots([image], [mask]))

    def with_prepared_shot(self, support: SupportSet, class_name: str, shot) -> SupportSet:
        """:meth:`with_shot` of a shot already at the support size (:meth:`prepare_shots`)."""
        if self.adaptation is not None:
            return self.adapted_support(*edited_shots(support, class_name, add=shot))
        return support.with_shots(class_name, *self.pool_prepared(*shot))

    def without_shot(self, support: SupportSet, class_name: str, index: int) -> SupportSet:
        """``support`` without shot ``index`` (negative from the end) of a class; nothing is re-encoded
        (with adaptation, the encoder is adapted to the changed set again)."""
        n, keep = kept_shots(support, class_name, index)
        if support.encoder_state is not None:
            return self.adapted_support(*edited_shots(support, class_name, keep=keep))
        return support.without_shot(n, keep)

    def add_shot(self, class_name: str, image, mask, support: str | None = None) -> None:
        """Add one annotated image to a class of a stored set (see :meth:`with_shot`)."""
        shot = self.prepare_shots([image], [mask])  # decoded outside the device lock
        name = support_name(support)
        with self._lock:
            self.store[name] = self.with_prepared_shot(self.support(name), class_name, shot)

    def remove_shot(self, class_name: str, index: int, support: str | None = None) -> None:
        """Remove shot ``index`` of a class of a stored set (see :meth:`without_shot`)."""
        with self._lock:
            name = support_name(support)
            self.store[name] = self.without_shot(self.support(name), class_name, index)

    def remove_support(self, name: str) -> None:
        with self._lock:
            if name not in self.store:
                raise MissingSupportError(f"no support set named {name!r}")
            del self.store[name]

    def has_support(self, name: str | None) -> bool:
        return support_name(name) in self.store

    def support(self, name: str | None) -> SupportSet:
        """The stored set of that name (None: the default set)."""
        return find_support(self.store, name)

    def classes(self, support: str | None = None) -> list[str]:
        return list(self.support(support).classes)

    def pool_shots(self, images, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode shots and pool them: their per-shot states (``K x C`` foreground and ``K x C``
        background vectors, for the prototype methods)."""
        return self.pool_prepared(*self.prepare_shots(images, masks))

    def prepare_shots(self, images, masks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shots at the support size: ``K x 3 x S x S`` normalised images, ``K x S x S`` fg and bg masks."""
        return shot_tensors(images, masks, self.support_size, self.normalisation)

    def pool_prepared(self, imgs, fg, bg) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`prepare_shots`'s tensors -> the model's per-shot states (a pair of ``K x ...`` tensors);
        supports the model encodes go through this Segmenter's encoder path."""
        to = dict(device=self.device)
        with self._lock, torch.inference_mode():
            return self.network.shot_states(
                imgs.to(**to), fg.to(**to), bg.to(**to), self.encode, self.refine, impl=self.impl
            )

    # -- queries --------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``M x 3 x S x S`` normalised images -> ``M x C x h x w`` fp32 features, ``batch`` at a time."""
        return self.encoder.encode(images)

    def segment_torch(self, qry_imgs: torch.Tensor, out_size, support: str | None = None, return_prob=False):
        """``M x 3 x S x S`` normalised queries -> ``M x H x W`` uint8 labels (+ max probabilities)."""
        with self._lock:
            s = self.support(support)
            with self.encoder_of(s):
                feats = self.encode(qry_imgs)
            with torch.inference_mode():
                guides = self.guides(qry_imgs)
                labels, prob, _, _ = self.head(
                    feats, s.protos, tuple(out_size), return_prob, False, guides=guides
                )
                return (labels, prob) if return_prob else labels

    def guides(self, qry_imgs: torch.Tensor) -> torch.Tensor | None:
        """``M x 3 x S x S`` normalised queries -> ``M x S x S`` grey guides where edges are guided."""
        return grey_of_normalised(qry_imgs, self.normalisation) if self.edges == "guided" else None

    def head(self, feats, protos, out_size, return_prob=False, scores=True, return_probs=False, guides=None):
        """:func:`fss.runtime.results.head` with this predictor's method, refinement and cut-off."""
        options = dict(refine=self.refine, impl=self.impl, in_size=(self.size, self.size))
        return head(
            self.network,
            feats,
            protos,
            out_size,
            self.min_score,
            options,
            return_prob,
            scores,
            return_probs,
            guides,
        )

    def predict_features(self, features, out_size, support: str | None = None, image=None) -> Segmentation:
        """One query's ``C x h x w`` features (from :meth:`encode`) -> its :class:`Segmentation` at
        ``out_size`` (H, W) with a stored set's state: queries encoded once, labelled per support set;
        ``image`` (its ``3 x S x S`` normalised tensor) where edges are guided."""
        with self._lock, torch.inference_mode():
            s = self.support(support)
            guides = None if image is None else self.guides(image[None])
            out = self.head(features[None], s.protos, tuple(out_size), guides=guides)
            return Segmentation.of_tensors(*out, s.classes, self.min_score)

    def segment_encoded(
        self,
        imgs: list[Image.Image],
        batch: torch.Tensor,
        support,
        return_prob=False,
        scores=True,
        return_probs=False,
        min_area: int | None = None,
    ) -> list[Segmentation]:
        """Already decoded queries and their ``M x 3 x S x S`` tensor -> one :class:`Segmentation` each
        (objects of ``min_area`` pixels or more where ``min_area`` is given)."""
        results = []
        with self._lock:
            s = self.support(support)
            with self.encoder_of(s):
                feats = self.encode(batch)
            with torch.inference_mode():
                guides = self.guides(batch)
                for i, (img, feat) in enumerate(zip(imgs, feats, strict=True)):
                    # Logits go straight from feature resolution to the query's own size.
                    size, want_prob = (img.height, img.width), return_prob or min_area is not None
                    guide = None if guides is None else guides[i : i + 1]
                    out = self.head(feat[None], s.protos, size, want_prob, scores, return_probs, guide)
                    results.append(Segmentation.of_tensors(*out, s.classes, self.min_score))
        for result in results:  # outside the device lock
            result.add_instances(min_area, keep_prob=return_prob)
        return results

    def segment(self, queries, support: str | None = None, return_prob: bool = False):
        """Label maps (``H x W`` uint8 numpy at each query's size), and max probabilities if asked; one
        image gives one map, an iterable a list. :meth:`predict` gives the whole result."""
        out = self.predict(queries, support, scores=False, return_prob=return_prob)
        if isinstance(out, Segmentation):
            return (out.labels, out.prob) if return_prob else out.labels
        labels = [r.labels for r in out]
        return (labels, [r.prob for r in out]) if return_prob else labels

    def predict(
        self, queries, support=None, return_probs=False, instances=False, min_area=DEFAULT_MIN_AREA,
        return_prob=False, scores=True,
    ):  # fmt: skip
        """One image (a path, PIL image or ``H x W x 3`` array) -> its :class:`Segmentation`, an iterable
        of images -> a list: labels, the set's classes (label n is ``classes[n - 1]``) and each class's
        presence score; ``return_probs``: the ``(1 + N) x H x W`` probability maps; ``instances``: the
        objects (:mod:`fss.io.instances`) of ``min_area`` pixels or more; ``return_prob``: the winner's
        probability."""
        if is_one_image(queries):
            return self.predict([queries], support, return_probs, instances, min_area, return_prob, scores)[0]
        imgs = [as_rgb(q) for q in queries]
        if not imgs:
            return []
        batch = torch.stack([image_tensor(i, self.size, self.normalisation) for i in imgs])
        area = min_area if instances else None
        return self.segment_encoded(imgs, batch, support, return_prob, scores, return_probs, area)

    def load_query(self, query) -> tuple[Image.Image, torch.Tensor]:
        img = as_rgb(query)
        return img, image_tensor(img, self.size, self.normalisation)

    def segment_stream(
        self, queries: Iterable, support: str | None = None, return_prob: bool = False,
        return_probs: bool = False, instances: bool = False, min_area: int = DEFAULT_MIN_AREA,
    ) -> Iterator[StreamResult]:  # fmt: skip
        """Segment a stream of queries in batches, decoding the next batch while the current one runs.

        Yields one :class:`StreamResult` per query, in input order, its ``result`` the
        :class:`Segmentation` (options as :meth:`predict`'s); a query that cannot be decoded carries its
        ``error`` and the stream goes on.
        """

        def segment(images, tensors):
            area = min_area if instances else None
            batch = torch.stack(tensors)
            return self.segment_encoded(images, batch, support, return_prob, True, return_probs, area)

        return stream(queries, self.batch, self.workers, self.load_query, segment)

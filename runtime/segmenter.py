"""``Segmenter``: encode a support set once, cache its prototypes, segment any number of queries.

PANet's prototypes depend only on the supports, so a support set is encoded once; each shot's
foreground / background poolings are cached so that a prototype is a mean over cached vectors.
"""

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fss import kernels
from fss.errors import FssError
from fss.io import IGNORE_INDEX, image_tensor, mask_tensor, read_image, read_mask

DEFAULT_SUPPORT = "default"


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FssError("--device cuda asked for, but torch sees no CUDA device")
    return device


def as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    return read_image(image)


def as_mask(mask) -> np.ndarray:
    """A parsed ``H x W`` uint8 mask (0 background, 1 foreground, 255 ignored)."""
    if isinstance(mask, (str, Path)):
        return read_mask(mask)
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L")).astype(bool).astype(np.uint8)
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    parsed = (mask != 0).astype(np.uint8)
    parsed[mask == IGNORE_INDEX] = IGNORE_INDEX
    return parsed


@dataclass
class SupportSet:
    """Per-class cached poolings: ``fg[n]``, ``bg[n]`` are ``K_n x C``; ``protos`` is ``(1+N) x C``."""

    classes: list[str]
    fg: list[torch.Tensor]
    bg: list[torch.Tensor]
    protos: torch.Tensor


def combine(fg: list[torch.Tensor], bg: list[torch.Tensor]) -> torch.Tensor:
    """Per-shot poolings -> ``(1+N) x C`` prototypes: fg mean over shots, bg mean over ways of means."""
    fg_protos = torch.stack([pools.mean(dim=0) for pools in fg])
    bg_proto = torch.stack([pools.mean(dim=0) for pools in bg]).mean(dim=0, keepdim=True)
    return torch.cat([bg_proto, fg_protos])


class Segmenter:
    """Few-shot segmentation with a cached support set.

    >>> seg = Segmenter(fss.load_model(None))
    >>> seg.set_support([[img_a1, img_a2], [img_b1]], [[mask_a1, mask_a2], [mask_b1]], ["cat", "dog"])
    >>> labels = seg.segment([query1, query2])   # list of H x W uint8: 0 background, n class n

    Images are PIL images, ``H x W x 3`` uint8 arrays or paths; masks are arrays (0 background, 255
    ignored, other values foreground), bool arrays, PIL images or paths to mask files.
    Calls are serialised by an internal lock, so one Segmenter may be shared between threads.
    """

    def __init__(self, model=None, device=None, size: int | None = None, batch: int = 8, impl: str = "auto"):
        from fss.checkpoint import load_model

        self.device = resolve_device(device)
        if model is None or isinstance(model, (str, Path)):
            model = load_model(model, device=self.device)
        self.model = model.to(self.device).eval()
        self.size = int(size or model.meta["input_size"])
        self.batch = int(batch)
        self.impl = impl
        self.supports: dict[str, SupportSet] = {}
        self._lock = threading.Lock()

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
        if len(classes) != len(images):
            raise ValueError(f"{len(classes)} class names for {len(images)} classes")
        fg, bg = [], []
        for class_images, class_masks in zip(images, masks, strict=True):
            if len(class_images) == 0 or len(class_images) != len(class_masks):
                raise ValueError("every class needs at least one shot and one mask per image")
            fg_pools, bg_pools = self.pool_shots(list(class_images), list(class_masks))
            fg.append(fg_pools)
            bg.append(bg_pools)
        with self._lock:
            self.supports[name] = SupportSet(classes, fg, bg, combine(fg, bg))

    def remove_support(self, name: str) -> None:
        with self._lock:
            if name not in self.supports:
                raise KeyError(f"no support set named {name!r}")
            del self.supports[name]

    def pool_shots(self, images, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode shots and pool them: ``K x C`` foreground and ``K x C`` background vectors."""
        imgs, fgs, bgs = [], [], []
        for image, mask in zip(images, masks, strict=True):
            img, parsed = as_image(image), as_mask(mask)
            if parsed.shape != (img.height, img.width):
                raise ValueError(f"mask size {parsed.shape[::-1]} differs from image size {img.size}")
            if not (parsed == 1).any():
                raise ValueError("support mask has no foreground pixel")
            resized = mask_tensor(parsed, self.size)
            imgs.append(image_tensor(img, self.size))
            fgs.append(resized == 1)
            bgs.append(resized == 0)
        feats = self.encode(torch.stack(imgs))  # K x C x h x w
        fg = torch.stack(fgs).to(self.device, feats.dtype)[:, None, None]  # K x 1 x 1 x S x S
        bg = torch.stack(bgs).to(self.device, feats.dtype)[:, None, None]
        # Each shot as its own 1-way 1-shot episode: prototypes = [bg pooling, fg pooling].
        with torch.inference_mode():
            pooled = kernels.prototypes(feats[:, None, None], fg, bg, impl=self.impl)  # K x 2 x C
        return pooled[:, 1], pooled[:, 0]

    def support(self, name: str | None) -> SupportSet:
        name = DEFAULT_SUPPORT if name is None else name
        if name not in self.supports:
            if not self.supports:
                raise RuntimeError(
                    "no support set: call set_support(images, masks, classes) before segment()"
                )
            raise KeyError(f"no support set named {name!r} (have {sorted(self.supports)})")
        return self.supports[name]

    # -- queries --------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``M x 3 x S x S`` normalised images -> ``M x C x h x w`` features, in batches of ``batch``."""
        with torch.inference_mode():
            chunks = [
                self.model.encode(images[i : i + self.batch].to(self.device, non_blocking=True))
                for i in range(0, len(images), self.batch)
            ]
        return torch.cat(chunks)

    def segment_torch(self, qry_imgs: torch.Tensor, out_size, support: str | None = None, return_prob=False):
        """``M x 3 x S x S`` normalised queries -> ``M x H x W`` uint8 labels (+ max probabilities)."""
        with self._lock:
            protos = self.support(support).protos
            feats = self.encode(qry_imgs)
            with torch.inference_mode():
                out = kernels.segment(
                    feats[None], protos[None], tuple(out_size), return_prob=return_prob, impl=self.impl
                )
        return (out[0][0], out[1][0]) if return_prob else out[0]

    def segment(self, queries, support: str | None = None, return_prob: bool = False):
        """Label maps at each query's own size (``H x W`` uint8 numpy), and max probabilities if asked.

        Query logits are upsampled straight from feature resolution to the query's size, then argmax.
        """
        imgs = [as_image(q) for q in queries]
        labels, probs = [], []
        with self._lock:
            protos = self.support(support).protos
            feats = self.encode(torch.stack([image_tensor(img, self.size) for img in imgs]))
            with torch.inference_mode():
                for img, feat in zip(imgs, feats, strict=True):
                    out = kernels.segment(
                        feat[None, None],
                        protos[None],
                        (img.height, img.width),
                        return_prob=return_prob,
                        impl=self.impl,
                    )
                    label, prob = out if return_prob else (out, None)
                    labels.append(label[0, 0].cpu().numpy())
                    if return_prob:
                        probs.append(prob[0, 0].float().cpu().numpy())
        return (labels, probs) if return_prob else labels

    def classes(self, support: str | None = None) -> list[str]:
        return list(self.support(support).classes)

"""Support sets: per-shot states cached per class, and the store that names them.

A :class:`SupportSet` is never changed once stored: adding or removing a shot makes a new set from the
cached per-shot states (only the new shot is encoded), so a reader never sees half an edit. Any
``MutableMapping`` from name to set is a store (serve's ``SupportStore`` and ``DiskStore`` are); the
predictor only reads, puts and deletes through :func:`find_support` and item access.
"""

import bisect
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace

import torch

from fss.errors import MissingSupportError, NoSupportError, ShotIndexError, SupportError
from fss.io.folders import find_support_pairs
from fss.io.images import as_rgb
from fss.io.masks import check_shot, parse_mask, read_support_shots
from fss.io.tensors import image_tensor, mask_tensor

DEFAULT_SUPPORT = "default"


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

    def with_shots(self, class_name: str, fg: torch.Tensor, bg: torch.Tensor) -> "SupportSet":
        """A new set with per-shot states appended to a class (a new class takes its place in name order)."""
        classes, fgs, bgs = list(self.classes), list(self.fg), list(self.bg)
        if class_name in classes:
            n = classes.index(class_name)
            fgs[n], bgs[n] = torch.cat([fgs[n], fg]), torch.cat([bgs[n], bg])
        else:
            n = class_position(classes, class_name)
            classes.insert(n, class_name)
            fgs.insert(n, fg)
            bgs.insert(n, bg)
        return replace(self, classes=classes, fg=fgs, bg=bgs, protos=self.combine(fgs, bgs))

    def without_shot(self, n: int, keep: list[int]) -> "SupportSet":
        """A new set keeping only shots ``keep`` of class ``n``."""
        fgs, bgs = list(self.fg), list(self.bg)
        fgs[n], bgs[n] = fgs[n][keep], bgs[n][keep]
        return replace(self, classes=list(self.classes), fg=fgs, bg=bgs, protos=self.combine(fgs, bgs))


class SupportSets(MutableMapping):
    """The in-memory store of one predictor: name -> :class:`SupportSet`, safe to use from threads."""

    def __init__(self):
        self._sets: dict[str, SupportSet] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> SupportSet:
        return self._sets[name]  # one dict read: atomic

    def __setitem__(self, name: str, support: SupportSet) -> None:
        with self._lock:
            self._sets[name] = support

    def __delitem__(self, name: str) -> None:
        with self._lock:
            del self._sets[name]

    def __iter__(self):
        with self._lock:
            return iter(list(self._sets))

    def __len__(self) -> int:
        return len(self._sets)


def support_name(name: str | None) -> str:
    return DEFAULT_SUPPORT if name is None else name


def find_support(store: MutableMapping, name: str | None) -> SupportSet:
    """The set of that name (None: the default set), or a typed error naming what the store holds."""
    name = support_name(name)
    try:
        return store[name]
    except KeyError:
        if len(store) == 0:
            raise NoSupportError(
                "no support set: call set_support(images, masks, classes) before segment()"
            ) from None
        raise MissingSupportError(f"no support set named {name!r} (have {sorted(store)})") from None


def class_position(classes: list[str], name: str) -> int:
    """Where a new class goes in a set's classes: the label order is the classes' name order."""
    return bisect.bisect(classes, name)


def class_names(images, masks, classes) -> list[str]:
    """The class names of a support set's per-class lists, checked; when not given ``class1``...
    (zero-padded from 10 classes on, so that name order is list order)."""
    if len(images) == 0 or len(images) != len(masks):
        raise SupportError("images and masks must be non-empty lists of per-class shot lists of equal length")
    digits = len(str(len(images)))
    if classes is None:
        classes = [f"class{n + 1:0{digits}d}" for n in range(len(images))]
    classes = list(classes)
    if len(classes) != len(images) or len(set(classes)) != len(classes):
        raise SupportError(f"need {len(images)} distinct class names, got {classes}")
    for class_images, class_masks in zip(images, masks, strict=True):
        if len(class_images) == 0 or len(class_images) != len(class_masks):
            raise SupportError("every class needs at least one shot and one mask per image")
    return classes


def kept_shots(support: SupportSet, class_name: str, index: int) -> tuple[int, list[int]]:
    """(class index, the shots kept) once shot ``index`` (negative from the end) of a class is removed."""
    if class_name not in support.classes:
        raise MissingSupportError(f"no class {class_name!r} (have {support.classes})")
    n = support.classes.index(class_name)
    shots = len(support.fg[n])
    if not -shots <= index < shots:
        raise ShotIndexError(f"class {class_name!r} has {shots} shots, no shot {index}")
    if shots == 1:
        raise SupportError(f"cannot remove the only shot of class {class_name!r}")
    return n, [k for k in range(shots) if k != index % shots]


def shot_tensors(images, masks, size: int, normalisation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shots at ``size``: ``K x 3 x S x S`` normalised images, ``K x S x S`` fg and bg masks."""
    imgs, fgs, bgs = [], [], []
    for image, mask in zip(images, masks, strict=True):
        img, parsed = as_rgb(image), parse_mask(mask)
        check_shot(img.size, parsed)
        resized = mask_tensor(parsed, size)
        imgs.append(image_tensor(img, size, normalisation))
        fgs.append(resized == 1)
        bgs.append(resized == 0)
    return torch.stack(imgs), torch.stack(fgs).float(), torch.stack(bgs).float()


def folder_shots(folder, box_supports: str = "mask") -> tuple[list, list, list[str]]:
    """A support folder's images, masks (per class) and classes, read and ordered as fss-run reads them
    (box files as ``fss-run --box-supports`` reads them)."""
    classes, images, masks = read_support_shots(find_support_pairs(folder, boxes=True), box_supports)
    return images, masks, classes

"""Few-shot episodes: datasets of classes and photos, and the seeded episode sampler they all share.

A dataset (:class:`EpisodeDataset`) lists, per class, the photos that contain it, and gives each photo
at one input size: the normalised image and the masks of its classes (0 background, 1 the class, 255
ignored). Three kinds share the sampler: class folders (:class:`FolderDataset`, below), PASCAL-5i
(:mod:`fss.train.voc`) and COCO-20i (:mod:`fss.train.coco`).

An episode never uses a photo twice, and a photo's pixels of the episode's other classes are labelled
with those classes (so they are neither background nor foreground of a support), as the official
pipeline does with its multi-class label maps.
"""

import hashlib
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fss.constants import IGNORE_INDEX, PAPER_NORMALISATION
from fss.errors import FssError
from fss.io.folders import find_support_pairs
from fss.io.images import read_image
from fss.io.masks import read_mask
from fss.io.tensors import image_tensor, mask_tensor
from fss.train.weak import annotation_rng, box_masks, connected_components, grabcut_masks, scribble_masks

SAMPLING_ATTEMPTS = 100
ANNOTATIONS = ("dense", "box", "grabcut", "scribble")


@dataclass(frozen=True)
class Item:
    photo: str  # identity of the photo across classes
    image: Path


@dataclass(frozen=True)
class Way:
    """One way of an episode: its class and the items of its supports and queries."""

    cls: str
    supports: tuple[Item, ...]
    queries: tuple[Item, ...]


@dataclass
class EpisodeBatch:
    """Tensors in the shapes of ``panet_losses`` / ``PANet.forward`` (Q = ways x queries per way)."""

    supp_imgs: torch.Tensor  # B x N x K x 3 x S x S
    supp_fg: torch.Tensor  # B x N x K x S x S float
    supp_bg: torch.Tensor  # B x N x K x S x S float
    qry_imgs: torch.Tensor  # B x Q x 3 x S x S
    qry_labels: torch.Tensor  # B x Q x S x S int64: 0 background, n way n, 255 ignored
    classes: list[list[str]]  # B lists of the N class names, way order
    # B lists naming each image (supports in way order, then queries; its photo, "~" if mirrored):
    # equal names, equal pixels.
    image_keys: list[list[str]]

    def to(self, device) -> "EpisodeBatch":
        tensors = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.type is torch.Tensor}
        return EpisodeBatch(**tensors, classes=self.classes, image_keys=self.image_keys)


def tensor_bytes(value) -> int:
    tensors = value.values() if isinstance(value, dict) else [value]
    return sum(t.numel() * t.element_size() for t in tensors)


class EpisodeDataset:
    """Classes, the photos of each (``items``), and the photos' pixels at one input size.

    Subclasses fill ``items`` (class -> items, in the dataset's class order) and implement
    :meth:`photo_masks`; they may refine :meth:`instances` (default: connected parts of the mask).
    Decoded tensors are cached up to ``cache_mb`` (later ones are decoded on every use).
    """

    # The PASCAL reference pipeline counts void (255) pixels of a support image as its background.
    support_void_is_background = False
    # Folder masks refer to the photo as displayed; VOC / COCO annotations to the pixels as stored.
    orient_exif = True

    def __init__(self, root, size: int, cache_mb: float = 2048, normalisation: dict | None = None):
        self.root = Path(root)
        self.size = size
        self.normalisation = normalisation or PAPER_NORMALISATION
        self.items: dict[str, list[Item]] = {}
        self.cache: dict = {}
        self.cache_bytes_left = int(cache_mb * 2**20)

    @property
    def classes(self) -> list[str]:
        return list(self.items)

    def cached(self, key, load):
        value = self.cache.get(key)
        if value is None:
            value = load()
            nbytes = tensor_bytes(value)
            if nbytes <= self.cache_bytes_left:
                self.cache[key] = value
                self.cache_bytes_left -= nbytes
        return value

    def image(self, path: Path) -> torch.Tensor:
        """``3 x S x S`` resized bilinearly and normalised (``fss.io``, exactly as ``fss-run``)."""

        def load():
            return image_tensor(read_image(path, self.orient_exif), self.size, self.normalisation)

        return self.cached(("image", path), load)

    def photo_masks(self, photo: str) -> dict[str, torch.Tensor]:
        """Class -> ``S x S`` uint8 mask (0, 1 the class, 255 ignored) of the classes in a photo."""
        raise NotImplementedError

    def instances(self, item: Item, cls: str) -> list[np.ndarray]:
        """``S x S`` bool masks of the class's instances in a photo (boxes need them)."""
        mask = self.photo_masks(item.photo).get(cls)
        return [] if mask is None else connected_components(mask.numpy() == 1)

    def label_map(self, item: Item, cls: str, episode_classes: list[str]) -> torch.Tensor:
        """``S x S`` int64 of one photo: way n + 1 where a class of the episode is, 255 ignored, 0 else.

        The photo's own class goes last, so that its pixels win where masks of two classes overlap.
        """
        labels = torch.zeros(self.size, self.size, dtype=torch.int64)
        masks = self.photo_masks(item.photo)
        # A class can vanish from a small photo at the input size; then it labels nothing.
        order = [c for c in episode_classes if c != cls and c in masks] + ([cls] if cls in masks else [])
        for other in order:
            mask = masks[other]
            labels[mask == 1] = episode_classes.index(other) + 1
            labels[mask == IGNORE_INDEX] = IGNORE_INDEX
        return labels

    def photo_count(self, cls: str) -> int:
        return len({item.photo for item in self.items[cls]})

    def check_episodes(self, classes: list[str], ways: int, images_per_class: int, what: str) -> None:
        """User errors for a set of classes that cannot give ``ways``-way episodes."""
        if len(classes) < ways:
            raise FssError(
                f"{what} has {len(classes)} class(es) ({', '.join(classes) or 'none'}), "
                f"{ways}-way episodes need {ways}",
                self.root,
            )
        for cls in classes:
            if self.photo_count(cls) < images_per_class:
                raise FssError(
                    f"class {cls!r} has {self.photo_count(cls)} image(s), episodes need {images_per_class} "
                    f"(shots + queries)",
                    self.class_path(cls),
                )

    def class_path(self, cls: str) -> Path:
        """Where a user looks for a class's images (for messages)."""
        return self.root

    def usable_classes(self, classes: list[str], images_per_class: int) -> tuple[list[str], dict[str, str]]:
        """The classes with enough photos for an episode, and why each other one was left out."""
        usable, skipped = [], {}
        for cls in classes:
            count = self.photo_count(cls) if cls in self.items else 0
            if count < images_per_class:
                skipped[cls] = f"{count} image(s), episodes need {images_per_class} (shots + queries)"
            else:
                usable.append(cls)
        return usable, skipped


def photo_identities(pairs: dict[str, list[tuple[Path, Path]]]) -> dict[Path, str]:
    """Image path -> photo id: the stem, made unique by content where one stem has different bytes."""
    by_stem = defaultdict(list)
    for class_pairs in pairs.values():
        for image, _ in class_pairs:
            by_stem[image.stem].append(image)
    ids = {}
    for stem, images in by_stem.items():
        if len(images) == 1:
            ids[images[0]] = stem
            continue
        for image in images:  # only shared stems are hashed: a cheap check that they are one photo
            ids[image] = f"{stem}:{hashlib.sha1(image.read_bytes()).hexdigest()}"
    return ids


class FolderDataset(EpisodeDataset):
    """Class folders (the support-folder layout of ``fss.io.folders.find_support_pairs``, FSS-1000 style).

    Files with the same stem and the same bytes in two class folders are one photo (``python -m
    fss.train.coco`` writes COCO images that way). Masks are read with ``fss.io`` (palette 255 ignored).
    """

    def __init__(self, root, size: int, cache_mb: float = 2048, normalisation: dict | None = None):
        super().__init__(root, size, cache_mb, normalisation)
        pairs = find_support_pairs(self.root)
        ids = photo_identities(pairs)
        self.items = {cls: [Item(ids[img], img) for img, _ in p] for cls, p in pairs.items()}
        self.masks_of_photo: dict[str, dict[str, Path]] = defaultdict(dict)
        for cls, class_pairs in pairs.items():
            for image, mask in class_pairs:
                self.masks_of_photo[ids[image]][cls] = mask

    def mask(self, path: Path) -> torch.Tensor:
        return self.cached(("mask", path), lambda: mask_tensor(read_mask(path), self.size))

    def photo_masks(self, photo: str) -> dict[str, torch.Tensor]:
        return {cls: self.mask(path) for cls, path in self.masks_of_photo[photo].items()}

    def class_path(self, cls: str) -> Path:
        return self.root / cls


def sample_episode(rng: np.random.Generator, dataset: EpisodeDataset, classes, ways, shots, queries):
    """N distinct classes, K supports + Q queries per class, no photo twice in the episode."""
    for _ in range(SAMPLING_ATTEMPTS):
        chosen = [classes[i] for i in rng.choice(len(classes), ways, replace=False)]
        used: set[str] = set()
        episode = []
        for cls in chosen:
            free = [item for item in dataset.items[cls] if item.photo not in used]
            if len(free) < shots + queries:
                break  # earlier ways took the photos this class needs: draw again
            picked = [free[i] for i in rng.choice(len(free), shots + queries, replace=False)]
            used.update(item.photo for item in picked)
            episode.append(Way(cls, tuple(picked[:shots]), tuple(picked[shots:])))
        else:
            return episode
    raise FssError(
        f"could not draw {ways}-way episodes of {shots}+{queries} distinct images from classes "
        f"{', '.join(classes)}: too many photos are shared between classes",
        dataset.root,
    )


class NegativeQueries:
    """Photos to replace queries with, so that a share of them do not show their way's class.

    A negative query is a photo of the sampler's classes that shows none of the episode's classes (as
    the dataset lists them), so its labels are all background: users' photos often lack the class, and
    the official protocols never ask for that.
    """

    def __init__(self, dataset: EpisodeDataset, classes, share: float):
        self.share = float(share)
        self.photo_classes: dict[str, set[str]] = defaultdict(set)
        self.items: dict[str, Item] = {}
        for cls in classes:
            for item in dataset.items[cls]:
                self.photo_classes[item.photo].add(cls)
                self.items.setdefault(item.photo, item)

    def apply(self, rng: np.random.Generator, episode: list[Way]) -> list[Way]:
        """``episode`` with each query, with probability ``share``, replaced by an unused negative photo."""
        classes = {way.cls for way in episode}
        used = {item.photo for way in episode for item in way.supports + way.queries}
        free = [p for p, c in self.photo_classes.items() if not c & classes and p not in used]
        out = []
        for way in episode:
            queries = list(way.queries)
            for q in range(len(queries)):
                if rng.random() < self.share and free:
                    photo = free.pop(int(rng.integers(len(free))))
                    queries[q] = self.items[photo]
            out.append(Way(way.cls, way.supports, tuple(queries)))
        return out


def weak_support_masks(dataset: EpisodeDataset, item: Item, cls: str, fg, bg, annotation: str):
    """A support's (fg, bg) masks replaced by its box (refined by GrabCut: "grabcut") or scribble annotation
    (``S x S`` bool tensors)."""
    rng = annotation_rng(item.photo, cls)
    if annotation in ("box", "grabcut"):
        weak = box_masks(dataset.instances(item, cls), tuple(fg.shape), rng)
        if annotation == "grabcut":  # on the photo as the model sees it (S x S, bilinear)
            image = read_image(item.image, dataset.orient_exif).resize(fg.shape[::-1], Image.BILINEAR)
            weak = grabcut_masks(np.asarray(image), *weak)
    else:
        weak = scribble_masks(fg.numpy(), bg.numpy(), rng)
    return (torch.from_numpy(mask) for mask in weak)


def episode_tensors(dataset: EpisodeDataset, episode: list[Way], flip=None, annotation: str = "dense"):
    """One episode's tensors without the batch dimension; ``flip`` marks the images to mirror.

    ``flip`` holds one bool per image: all supports in way order, then all queries in way order.
    ``annotation`` (one of ``ANNOTATIONS``) is what the supports' masks are made from.
    """
    classes = [way.cls for way in episode]
    supports = [(item, way.cls) for way in episode for item in way.supports]
    queries = [(item, way.cls) for way in episode for item in way.queries]
    images = [dataset.image(item.image) for item, _ in supports + queries]
    labels = [dataset.label_map(item, cls, classes) for item, cls in supports + queries]
    n_supp = len(supports)
    fgs, bgs = [], []
    for (item, cls), label in zip(supports, labels[:n_supp], strict=True):
        fg = label == classes.index(cls) + 1
        bg = label == 0
        if dataset.support_void_is_background:
            bg |= label == IGNORE_INDEX
        if annotation != "dense":
            fg, bg = weak_support_masks(dataset, item, cls, fg, bg, annotation)
        fgs.append(fg)
        bgs.append(bg)
    if flip is not None:
        images = [img.flip(-1) if f else img for img, f in zip(images, flip, strict=True)]
        labels = [lab.flip(-1) if f else lab for lab, f in zip(labels, flip, strict=True)]
        fgs = [m.flip(-1) if f else m for m, f in zip(fgs, flip[:n_supp], strict=True)]
        bgs = [m.flip(-1) if f else m for m, f in zip(bgs, flip[:n_supp], strict=True)]
    N, K, S = len(episode), len(episode[0].supports), dataset.size
    return (
        torch.stack(images[:n_supp]).view(N, K, 3, S, S),
        torch.stack(fgs).view(N, K, S, S).float(),
        torch.stack(bgs).view(N, K, S, S).float(),
        torch.stack(images[n_supp:]),
        torch.stack(labels[n_supp:]),
    )


def image_keys(episode: list[Way], flip=None) -> list[str]:
    """Names of an episode's images in ``episode_tensors`` order: the photo, ``~`` marking mirrored ones."""
    supports = [item for way in episode for item in way.supports]
    items = supports + [item for way in episode for item in way.queries]
    flip = np.zeros(len(items), bool) if flip is None else flip
    return [f"{item.photo}{'~' if mirrored else ''}" for item, mirrored in zip(items, flip, strict=True)]


class EpisodeSampler:
    """Batches of random episodes from a fixed set of classes, drawn from one seeded numpy Generator;
    ``negatives``: the share of queries replaced by photos without their class (:class:`NegativeQueries`).

    ``batch(B, part=(r, W))`` draws all B episodes (the generator advances the same in every process)
    and builds the tensors of episodes r, r + W, ... only: W processes with one seed share out one
    global batch.
    """

    def __init__(
        self,
        dataset: EpisodeDataset,
        classes,
        ways,
        shots,
        queries=1,
        flip=False,
        rng=None,
        what="dataset",
        annotation="dense",
        negatives: float = 0.0,
    ):
        self.dataset, self.classes = dataset, sorted(classes)
        # No draws for negatives unless asked: episodes of a seed stay those of earlier versions.
        self.negatives = NegativeQueries(dataset, self.classes, negatives) if negatives > 0 else None
        self.ways, self.shots, self.queries, self.flip = ways, shots, queries, flip
        self.annotation = annotation
        self.rng = rng if rng is not None else np.random.default_rng()
        dataset.check_episodes(self.classes, ways, shots + queries, what)

    def draw(self) -> tuple[list[Way], np.ndarray | None]:
        """The next episode and its flips, without touching any pixel."""
        episode = sample_episode(self.rng, self.dataset, self.classes, self.ways, self.shots, self.queries)
        if self.negatives is not None:
            episode = self.negatives.apply(self.rng, episode)
        n_images = self.ways * (self.shots + self.queries)
        return episode, (self.rng.random(n_images) < 0.5 if self.flip else None)

    def tensors(self, episode: list[Way], flip=None):
        return episode_tensors(self.dataset, episode, flip, self.annotation)

    def episode(self):
        episode, flip = self.draw()
        return episode, self.tensors(episode, flip)

    def batch(self, episodes: int = 1, part: tuple[int, int] = (0, 1)) -> EpisodeBatch | None:
        """``episodes`` drawn, this part's built; None where the part holds none of them."""
        rank, world = part
        drawn = [self.draw() for _ in range(episodes)][rank::world]
        if not drawn:
            return None
        built = [self.tensors(episode, flip) for episode, flip in drawn]
        stacked = [torch.stack(parts) for parts in zip(*built, strict=True)]
        classes = [[way.cls for way in episode] for episode, _ in drawn]
        return EpisodeBatch(*stacked, classes=classes, image_keys=[image_keys(*d) for d in drawn])

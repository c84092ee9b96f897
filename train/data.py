"""Few-shot episodes from a folder dataset (one subfolder of image + mask pairs per class).

The layout is the support-folder layout of ``fss.io.find_support_pairs``. Files with the same stem
and the same bytes in two class folders are one photo (``python -m fss.train.coco`` writes COCO
images that way): an episode never uses a photo twice, and a photo's masks of the other episode
classes label those pixels too, as the official pipeline does with its multi-class label maps.
"""

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fss.constants import IGNORE_INDEX
from fss.errors import FssError
from fss.io import find_support_pairs, image_tensor, mask_tensor, read_image, read_mask

SAMPLING_ATTEMPTS = 100


@dataclass(frozen=True)
class Item:
    photo: str  # identity of the photo across class folders
    image: Path
    mask: Path


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


class FolderDataset:
    """The classes of a folder dataset, with decoded images and masks cached at one input size.

    Images are resized (bilinear) and normalised, masks resized (nearest) with ``fss.io``, exactly as
    ``fss-run`` prepares them; ``cache_mb`` bounds the memory of the cache (later files are decoded
    on every use).
    """

    def __init__(self, root, size: int, cache_mb: float = 2048):
        self.root = Path(root)
        self.size = size
        pairs = find_support_pairs(self.root)
        ids = photo_identities(pairs)
        self.items = {cls: [Item(ids[img], img, mask) for img, mask in p] for cls, p in pairs.items()}
        self.masks_of_photo: dict[str, dict[str, Path]] = defaultdict(dict)
        for cls, items in self.items.items():
            for item in items:
                self.masks_of_photo[item.photo][cls] = item.mask
        self.cache: dict[Path, torch.Tensor] = {}
        self.cache_bytes_left = int(cache_mb * 2**20)

    @property
    def classes(self) -> list[str]:
        return sorted(self.items)

    def cached(self, path: Path, load) -> torch.Tensor:
        tensor = self.cache.get(path)
        if tensor is None:
            tensor = load(path)
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes <= self.cache_bytes_left:
                self.cache[path] = tensor
                self.cache_bytes_left -= nbytes
        return tensor

    def image(self, path: Path) -> torch.Tensor:
        return self.cached(path, lambda p: image_tensor(read_image(p), self.size))

    def mask(self, path: Path) -> torch.Tensor:
        return self.cached(path, lambda p: mask_tensor(read_mask(p), self.size))

    def label_map(self, item: Item, cls: str, episode_classes: list[str]) -> torch.Tensor:
        """``S x S`` int64 of one photo: way n + 1 where a class of the episode is, 255 ignored, 0 else.

        The photo's own class goes last, so that its pixels win where masks of two classes overlap.
        """
        labels = torch.zeros(self.size, self.size, dtype=torch.int64)
        masks = self.masks_of_photo[item.photo]
        order = [c for c in episode_classes if c != cls and c in masks] + [cls]
        for other in order:
            mask = self.mask(masks[other] if other != cls else item.mask)
            labels[mask == 1] = episode_classes.index(other) + 1
            labels[mask == IGNORE_INDEX] = IGNORE_INDEX
        return labels

    def check_episodes(self, classes: list[str], ways: int, images_per_class: int, what: str) -> None:
        """User errors for a set of classes that cannot give ``ways``-way episodes."""
        if len(classes) < ways:
            raise FssError(
                f"{what} has {len(classes)} class(es) ({', '.join(classes) or 'none'}), "
                f"{ways}-way episodes need {ways}",
                self.root,
            )
        for cls in classes:
            photos = {item.photo for item in self.items[cls]}
            if len(photos) < images_per_class:
                raise FssError(
                    f"class {cls!r} has {len(photos)} image(s), episodes need {images_per_class} "
                    f"(shots + queries)",
                    self.root / cls,
                )


def sample_episode(rng: np.random.Generator, dataset: FolderDataset, classes, ways, shots, queries):
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


def episode_tensors(dataset: FolderDataset, episode: list[Way], flip: np.ndarray | None = None):
    """One episode's tensors without the batch dimension; ``flip`` marks the images to mirror.

    ``flip`` holds one bool per image: all supports in way order, then all queries in way order.
    """
    classes = [way.cls for way in episode]
    supports = [(item, way.cls) for way in episode for item in way.supports]
    queries = [(item, way.cls) for way in episode for item in way.queries]
    images, labels = [], []
    for index, (item, cls) in enumerate(supports + queries):
        image, label = dataset.image(item.image), dataset.label_map(item, cls, classes)
        if flip is not None and flip[index]:
            image, label = image.flip(-1), label.flip(-1)
        images.append(image)
        labels.append(label)
    N, K, S = len(episode), len(episode[0].supports), dataset.size
    n_supp = len(supports)
    supp_labels = torch.stack(labels[:n_supp]).view(N, K, S, S)
    own_label = torch.arange(1, N + 1).view(N, 1, 1, 1)
    return (
        torch.stack(images[:n_supp]).view(N, K, 3, S, S),
        (supp_labels == own_label).float(),
        (supp_labels == 0).float(),
        torch.stack(images[n_supp:]),
        torch.stack(labels[n_supp:]),
    )


class EpisodeSampler:
    """Batches of random episodes from a fixed set of classes, drawn from one seeded numpy Generator."""

    def __init__(self, dataset, classes, ways, shots, queries=1, flip=False, rng=None, what="dataset"):
        self.dataset, self.classes = dataset, sorted(classes)
        self.ways, self.shots, self.queries, self.flip = ways, shots, queries, flip
        self.rng = rng if rng is not None else np.random.default_rng()
        dataset.check_episodes(self.classes, ways, shots + queries, what)

    def episode(self):
        episode = sample_episode(self.rng, self.dataset, self.classes, self.ways, self.shots, self.queries)
        n_images = self.ways * (self.shots + self.queries)
        flip = self.rng.random(n_images) < 0.5 if self.flip else None
        return episode, episode_tensors(self.dataset, episode, flip)

    def batch(self, episodes: int = 1) -> EpisodeBatch:
        drawn = [self.episode() for _ in range(episodes)]
        stacked = [torch.stack(parts) for parts in zip(*(tensors for _, tensors in drawn), strict=True)]
        classes = [[way.cls for way in episode] for episode, _ in drawn]
        return EpisodeBatch(*stacked, classes=classes)

"""PASCAL-5i: few-shot episodes from a VOC2012 + SBD folder, in the official PANet layout.

    VOC/JPEGImages/<id>.jpg
    VOC/SegmentationClassAug/<id>.png          label maps: 0 background, k class k (1..20), 255 void
    VOC/ImageSets/Segmentation/<split>.txt     the split's image ids (trainaug, train, val, ...)
    VOC/ImageSets/Segmentation/<split>/class<k>.txt   ids whose label map holds class k (built if absent)
    VOC/SegmentationObjectAug/<id>.png         optional instance maps (or SegmentationObject/), for boxes

Fold i tests classes 5i+1 .. 5i+5 and trains on the other 15. As in the reference pipeline, void pixels
(255) of a support image count as its background and are not counted in a query.
"""

import sys

import numpy as np
import torch
from tqdm import tqdm

from fss.constants import IGNORE_INDEX
from fss.errors import FssError
from fss.io.images import decode_image
from fss.io.outputs import atomic_write
from fss.io.tensors import mask_tensor
from fss.train.data import EpisodeDataset, Item

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
CLASSES_PER_FOLD = 5
DEFAULT_SPLIT = "trainaug"
INSTANCE_FOLDERS = ("SegmentationObjectAug", "SegmentationObject")


def pascal_fold_classes(fold: int) -> list[str]:
    """The 5 test classes of PASCAL-5i fold ``fold`` (the other 15 are its training classes)."""
    return list(VOC_CLASSES[CLASSES_PER_FOLD * fold : CLASSES_PER_FOLD * (fold + 1)])


def read_label_map(path) -> np.ndarray:
    """``H x W`` uint8 class indices of a palette or greyscale PNG (the values as stored)."""
    img = decode_image(path, "label map")
    if img.mode not in ("P", "L"):
        raise FssError(f"label map must be a palette or greyscale PNG of class indices, not {img.mode}", path)
    return np.asarray(img, dtype=np.uint8)


def read_ids(path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def class_id_lists(root, split: str, ids: list[str]) -> dict[int, list[str]]:
    """Class index -> ids of the split whose label map holds it: the official ``<split>/class<k>.txt``
    files where they exist, else built from the label maps and written there (when writable)."""
    folder = root / "ImageSets" / "Segmentation" / split
    if any(folder.glob("class*.txt")):
        return {
            k: read_ids(folder / f"class{k}.txt") if (folder / f"class{k}.txt").is_file() else []
            for k in range(1, len(VOC_CLASSES) + 1)
        }
    lists: dict[int, list[str]] = {k: [] for k in range(1, len(VOC_CLASSES) + 1)}
    for image_id in tqdm(ids, desc=f"class lists of {split}", leave=False, file=sys.stderr):
        labels = read_label_map(root / "SegmentationClassAug" / f"{image_id}.png")
        for k in np.unique(labels):
            if 1 <= k <= len(VOC_CLASSES):
                lists[int(k)].append(image_id)
    try:
        for k, class_ids in lists.items():
            text = "".join(f"{i}\n" for i in class_ids).encode()
            atomic_write(folder / f"class{k}.txt", lambda f, text=text: f.write(text))
    except OSError:
        pass  # a read-only dataset: the lists are rebuilt on the next run
    return lists


class VocDataset(EpisodeDataset):
    """The images of one split, listed per class; label maps and instance maps at the input size."""

    support_void_is_background = True
    orient_exif = False  # annotations refer to the stored pixels

    def __init__(
        self, root, size: int, split: str = DEFAULT_SPLIT, cache_mb: float = 2048, normalisation=None
    ):
        super().__init__(root, size, cache_mb, normalisation)
        self.split = split
        if not self.root.is_dir():
            raise FssError("VOC folder not found", self.root)
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise FssError(f"VOC split list {split}.txt not found", split_file)
        lists = class_id_lists(self.root, split, read_ids(split_file))
        self.items = {
            name: [Item(i, self.root / "JPEGImages" / f"{i}.jpg") for i in lists[k]]
            for k, name in enumerate(VOC_CLASSES, start=1)
        }

    def labels(self, photo: str) -> torch.Tensor:
        path = self.root / "SegmentationClassAug" / f"{photo}.png"
        return self.cached(("labels", photo), lambda: mask_tensor(read_label_map(path), self.size))

    def photo_masks(self, photo: str) -> dict[str, torch.Tensor]:
        labels = self.labels(photo)
        void = labels == IGNORE_INDEX
        masks = {}
        for k in labels.unique().tolist():
            if 1 <= k <= len(VOC_CLASSES):
                mask = (labels == k).to(torch.uint8)
                mask[void] = IGNORE_INDEX
                masks[VOC_CLASSES[k - 1]] = mask
        return masks

    def instances(self, item: Item, cls: str) -> list[np.ndarray]:
        """From the instance maps where the folder has them, else the connected parts of the class."""
        for folder in INSTANCE_FOLDERS:
            path = self.root / folder / f"{item.photo}.png"
            if path.is_file():
                inst = self.cached(("inst", path), lambda p=path: mask_tensor(read_label_map(p), self.size))
                own = (self.labels(item.photo) == VOC_CLASSES.index(cls) + 1).numpy()
                inst = inst.numpy()
                return [(inst == i) & own for i in np.unique(inst[own]) if i not in (0, IGNORE_INDEX)]
        return super().instances(item, cls)

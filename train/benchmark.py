"""The benchmark protocol: which dataset, which split, which classes a fold tests.

- ``voc``: PASCAL-5i (:mod:`fss.train.voc`), split ``trainaug`` by default, fold i tests classes
  5i+1 .. 5i+5.
- ``coco``: COCO-20i (:class:`fss.train.coco.CocoDataset`), split ``train2017`` by default (several
  splits pool: ``train2017,val2017``), fold i tests 20 of the 80 classes, ``consecutive`` or
  ``interleaved`` (:func:`fss.train.coco.coco20i_fold_indices`).
- ``folder``: class folders; fold i tests every 4th class in name order, starting at the i-th.

A fold's training classes are all the others. The reference uses the same split for training and
testing (the classes differ).
"""

from fss.errors import FssError, SettingError
from fss.train.coco import DEFAULT_SPLIT as COCO_DEFAULT_SPLIT
from fss.train.coco import FOLD_CONVENTIONS, CocoDataset, coco20i_fold_indices
from fss.train.data import EpisodeDataset, FolderDataset
from fss.train.voc import DEFAULT_SPLIT as VOC_DEFAULT_SPLIT
from fss.train.voc import VocDataset, pascal_fold_classes

DATASETS = ("folder", "voc", "coco")
FOLDS = 4


def add_split_args(parser) -> None:
    """``--split`` and ``--fold-convention``: which part of a benchmark dataset, and how COCO's folds run."""
    parser.add_argument(
        "--split",
        default=None,
        help="voc: split of ImageSets/Segmentation (default trainaug); coco: split(s), comma-separated "
        "(default train2017)",
    )
    parser.add_argument(
        "--fold-convention",
        choices=FOLD_CONVENTIONS,
        default="consecutive",
        help="COCO-20i folds: consecutive classes 20i+1..20i+20 (PANet, default) or interleaved 4k+i+1",
    )


def default_split(kind: str) -> str | None:
    return {"voc": VOC_DEFAULT_SPLIT, "coco": COCO_DEFAULT_SPLIT}.get(kind)


def open_dataset(
    kind: str, root, size: int, split: str | None = None, cache_mb: float = 2048, *, normalisation: dict
) -> EpisodeDataset:
    """A dataset of ``kind``; ``split``: a VOC split or comma-separated COCO splits (None: the default);
    images normalised as the model's ``meta["normalisation"]`` says."""
    if kind == "folder":
        if split is not None:
            raise SettingError("{split} applies to {dataset} voc and coco, not to class folders", root)
        return FolderDataset(root, size, cache_mb, normalisation)
    split = split or default_split(kind)
    if kind == "voc":
        return VocDataset(root, size, split, cache_mb, normalisation)
    if kind == "coco":
        splits = [s.strip() for s in split.split(",") if s.strip()]
        return CocoDataset(root, size, splits, cache_mb, normalisation)
    raise ValueError(f"dataset must be one of {DATASETS}, got {kind!r}")


def fold_classes(dataset: EpisodeDataset, kind: str, fold: int, convention: str = "consecutive") -> list[str]:
    """The test classes of fold ``fold`` (0..3)."""
    if not 0 <= fold < FOLDS:
        raise FssError(f"fold must be 0..{FOLDS - 1}, got {fold}", dataset.root)
    if kind == "voc":
        return pascal_fold_classes(fold)
    if kind == "coco":
        return dataset.class_names(coco20i_fold_indices(fold, convention))
    classes = sorted(dataset.classes)
    return classes[fold::FOLDS]

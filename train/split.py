"""Which classes a training run trains on and which it holds out, and the datasets of their episodes."""

from dataclasses import dataclass, field

from fss.errors import FssError, SettingError
from fss.train.benchmark import fold_classes, open_dataset
from fss.train.data import EpisodeDataset


@dataclass
class EpisodeData:
    """The datasets of training and validation episodes and their classes."""

    train_set: EpisodeDataset
    val_set: EpisodeDataset
    train_classes: list[str]
    val_classes: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # class -> why no episode can use it


def default_val_classes(classes: list[str], ways: int) -> list[str]:
    """A deterministic quarter of the classes (evenly spaced in name order), at least ``ways``."""
    count = max(ways, len(classes) // 4)
    return [classes[i * len(classes) // count] for i in range(count)]


def split_classes(dataset: EpisodeDataset, config) -> tuple[list[str], list[str]]:
    """(training classes, held-out classes) of the dataset's classes."""
    classes = dataset.classes
    if config.fold is not None:
        if config.val_classes is not None:
            message = "{fold} and {val_classes} both choose the held-out classes: give one"
            raise SettingError(message, config.data)
        val = fold_classes(dataset, config.dataset, config.fold, config.fold_convention)
    elif config.dataset != "folder":
        raise SettingError("{dataset} {name} needs {fold} (0..3)", config.data, name=config.dataset)
    elif config.val_classes is None:
        val = default_val_classes(sorted(classes), config.ways)
    else:
        unknown = [c for c in config.val_classes if c not in classes]
        if unknown:
            raise FssError(
                f"validation class {unknown[0]!r} is not a class folder (classes: {', '.join(classes)})",
                dataset.root,
            )
        val = sorted(set(config.val_classes))
    return [c for c in classes if c not in val], val


def episode_data(config, normalisation: dict) -> EpisodeData:
    """Open the dataset(s) and choose the classes; on voc / coco, classes with too few photos for an
    episode are left out (``skipped``), where a class folder with too few is a user error. Images are
    normalised as the model's ``meta["normalisation"]`` says."""

    def open_split(split):
        return open_dataset(
            config.dataset, config.data, config.size, split, config.cache_mb, normalisation=normalisation
        )

    train_set = open_split(config.split)
    val_set = train_set
    if config.val_split is not None and config.val_split != config.split:
        val_set = open_split(config.val_split)
    train_classes, val_classes = split_classes(train_set, config)
    skipped = {}
    if config.dataset != "folder":
        train_classes, skipped_train = train_set.usable_classes(train_classes, config.shots + config.queries)
        val_classes, skipped_val = val_set.usable_classes(val_classes, config.shots + 1)
        skipped = {**skipped_train, **{c: f"{why} (held out)" for c, why in skipped_val.items()}}
    if val_classes:
        val_set.check_episodes(val_classes, config.ways, config.shots + 1, "validation classes")
    return EpisodeData(train_set, val_set, train_classes, val_classes, skipped)

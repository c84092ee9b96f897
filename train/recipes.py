"""``fss-train --recipe``: the defaults of a training run, by what it is for, in one table.

``finetune`` (the default) fine-tunes the bundled model on the user's classes: it starts from the
``--init`` checkpoint (the bundled ``demo-panet.pt``) and takes its method, encoder, width, input
size and normalisation, with the schedule that trained it (docs/demo-model.md "Reproduce"): 4 stages
frozen, 400 steps of 4 episodes, lr x0.1 after 3/4 of them. ``paper`` is the paper's: VGG16 from
scratch at 417 px for 30,000 steps, :class:`~fss.train.trainer.TrainConfig`'s own defaults.

Precedence: a flag given wins; then the method's own optimizer and learning rate
(``FewShotModel.train_defaults``); then the recipe (a value, or a function of the settings before
it); then the ``--init`` checkpoint's model (``finetune``); then ``TrainConfig``'s defaults.
"""

from dataclasses import dataclass
from pathlib import Path

from fss.checkpoint import CHECKPOINT_FORMAT, DEMO_MODEL, PRETRAINED_ONLY_SUFFIXES
from fss.errors import FssError
from fss.io.folders import find_support_pairs
from fss.models.base import DEFAULT_METHOD, get_method
from fss.validation import check_meta, read_torch_file


@dataclass(frozen=True)
class Recipe:
    what: str  # one line for --help and the run's first line
    defaults: dict  # fss-train option (argparse dest) -> value, or function of the settings so far
    model_from_init: bool = False  # method, encoder, width and size: the --init checkpoint's
    hold_out_from: int = 0  # folders: the default held-out quarter needs this many classes (else none)


RECIPES = {
    "finetune": Recipe(
        "fine-tune the bundled model (its method, encoder, size and normalisation)",
        {
            "init": str(DEMO_MODEL),
            "freeze_stages": 4,
            "iters": 400,
            "batch_episodes": 4,
            "lr_milestones": lambda settings: [settings["iters"] * 3 // 4],
            "eval_every": 100,
            "eval_episodes": 500,
            "save_every": 50,
            "snapshot_every": 0,
        },
        model_from_init=True,
        hold_out_from=4,
    ),
    "paper": Recipe("the paper's: VGG16 from scratch at 417 px, 30,000 steps", {}),
}
DEFAULT_RECIPE = "finetune"
MODEL_FROM_INIT = {"method": "method", "encoder": "encoder", "width": "width", "size": "input_size"}


def recipe_settings(name: str, settings: dict) -> dict:
    """``settings`` (None: not given) with the recipe's defaults filled in, in the table's order."""
    settings = dict(settings)
    for key, value in RECIPES[name].defaults.items():
        if settings.get(key) is None:
            settings[key] = value(settings) if callable(value) else value
    return settings


def init_model(init) -> dict | None:
    """The metadata of the fss checkpoint ``init`` names (None where it names none: ``auto``, pretrained
    weights, an official snapshot)."""
    if init is None or str(init) == "auto" or Path(init).suffix in PRETRAINED_ONLY_SUFFIXES:
        return None
    ckpt = read_torch_file(init)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT):
        return None
    return check_meta(ckpt.get("meta", {}), init)


INHERITED_META = ("refine", "edges")  # how it is used; a presence calibration must be learned anew


def initial_meta(init, method: str, method_options: dict) -> dict:
    """A new model's metadata: the method's own options, and what a model fine-tuned from the fss
    checkpoint ``init`` keeps of its metadata (same method only)."""
    meta = init_model(init) or {}
    kept = {k: meta[k] for k in INHERITED_META if k in meta} if meta.get("method") == method else {}
    if kept.get("refine") == "learned":  # its decision head, like a presence calibration, is learned anew
        kept["refine"] = "ssp"
    return {**kept, **({method: dict(method_options)} if method_options else {})}


def recorded_recipe(path: Path) -> str:
    """The recipe of the run whose checkpoint ``path`` is (runs from before recipes: the paper's)."""
    ckpt = read_torch_file(path)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    config = meta.get("train_config") if isinstance(meta, dict) else None
    recipe = config.get("recipe", "paper") if isinstance(config, dict) else None
    return recipe if recipe in RECIPES else DEFAULT_RECIPE


def model_from_init(name: str, settings: dict, given: set) -> None:
    """Method, encoder, width and size not given: the ``--init`` checkpoint's. An encoder or width given
    that does not fit the recipe's own checkpoint is refused (it would fail once the model is built)."""
    model = init_model(settings["init"])
    if model is None:
        return
    for key, meta_key in MODEL_FROM_INIT.items():
        if settings[key] is None:
            settings[key] = model.get(meta_key)
        elif key in ("encoder", "width") and "init" not in given and settings[key] != model[meta_key]:
            raise FssError(
                f"--{key} {settings[key]}: --recipe {name} fine-tunes {Path(settings['init']).name} "
                f"({meta_key} {model[meta_key]}); give that encoder its own --init (auto, a file) or "
                "--recipe paper"
            )


def held_out_default(recipe: Recipe, settings: dict) -> list[str] | None:
    """``--val-classes`` not given: None (the default quarter) or, on a folder with fewer classes than
    the recipe holds some out from, ``[]`` (train on every class: a held-out one would be most of them)."""
    if settings["dataset"] != "folder" or settings["fold"] is not None or not recipe.hold_out_from:
        return None
    if settings["eval_only"]:  # evaluating needs classes held out
        return None
    classes = find_support_pairs(settings["data"], warn=lambda message, path: None)
    return [] if len(classes) < recipe.hold_out_from else None


def resolve(settings: dict) -> dict:
    """fss-train's parsed options (None: not given) with the defaults of their recipe, in the order of
    precedence of this module's docstring; ``recipe``, ``method``, ``out`` always set."""
    settings = dict(settings)
    given = {key for key, value in settings.items() if value is not None}
    data = Path(settings["data"])
    if settings["out"] is None:
        settings["out"] = Path("runs") / (data.resolve().name or "run")
    if settings["resume"] is not None:
        settings["resume"] = Path(settings["resume"] or Path(settings["out"]) / "last.pt")
    name = settings["recipe"] or DEFAULT_RECIPE
    if settings["recipe"] is None and settings["resume"] is not None:
        name = recorded_recipe(settings["resume"])  # a run goes on with its recipe
    recipe = RECIPES[name]
    settings = recipe_settings(name, {**settings, "recipe": name})
    if str(settings["init"]).lower() == "none":
        settings["init"] = None
    if recipe.model_from_init:
        model_from_init(name, settings, given)
    method = get_method(settings["method"] or DEFAULT_METHOD)
    settings["method"] = method.name
    settings["optimizer"] = settings["optimizer"] or method.train_defaults.get("optimizer", "sgd")
    if settings["lr"] is None:
        settings["lr"] = method.train_defaults["lr"]
    if settings["val_classes"] is None:
        settings["val_classes"] = held_out_default(recipe, settings)
    return settings

"""A method is one file: a fifth method, defined and registered here, runs through every caller.

The method is a training-free nearest-neighbour matcher on an existing encoder: each query feature takes
the class of its most similar (cosine) support feature. Its per-shot state is the shot's normalised
features and its feature-resolution labels; an episode's state is the bank of labelled support features.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_queries, make_support
from PIL import Image
from test_train import SIZE, make_shapes

import fss
from fss.models.base import (
    FewShotModel,
    build_model,
    default_meta,
    method_names,
    method_of,
    register_method,
    unregister_method,
)
from fss.models.encoders import build_encoder

NAME = "nearest-neighbour"
IGNORED = -1.0  # a support feature location that is neither foreground nor background


class NearestNeighbour(FewShotModel):
    """An encoder; no head, no training: the nearest labelled support feature decides."""

    refinements = ("none",)
    train_defaults = {"lr": 0.0}
    scale = 1.0

    def __init__(self, encoder: str, width: float = 1.0, meta: dict | None = None, impl: str = "auto"):
        super().__init__()
        self.encoder = build_encoder(encoder, width)
        self.meta = {**default_meta(width, encoder, NAME), **(meta or {}), "encoder": encoder, "width": width}
        self.impl = impl

    def pool_shots(self, feats, fg, bg, refine="none", impl=None):
        """``K x C x h x w`` features, ``K x S x S`` masks -> normalised features, ``K x h x w`` labels."""
        size = feats.shape[-2:]
        fg, bg = (F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0] for m in (fg, bg))
        labels = torch.where(fg > 0.5, 1.0, torch.where(bg > 0.5, 0.0, IGNORED))
        return F.normalize(feats, dim=1), labels

    def combine(self, feats: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """Per-way shot states -> the ``M x (C + 1)`` bank: features and class (0 background, n way n)."""
        rows = []
        for way, (f, lab) in enumerate(zip(feats, labels, strict=True), start=1):
            cls = torch.where(lab > 0.5, float(way), torch.where(lab == 0, 0.0, IGNORED))
            rows.append(torch.cat([f.permute(0, 2, 3, 1).flatten(0, 2), cls.flatten()[:, None]], dim=1))
        return torch.cat(rows)

    def episode_state(self, supp_feats, supp_fg, supp_bg, shot_mask=None, refine="none", impl=None):
        """``B x N x K x C x h x w`` features -> ``B x M x (C + 1)`` banks (ragged ones padded, ignored)."""
        banks = []
        for b in range(len(supp_feats)):
            present = [
                slice(None) if shot_mask is None else shot_mask[b, n] for n in range(supp_feats.shape[1])
            ]
            pairs = [self.pool_shots(supp_feats[b, n][k], supp_fg[b, n][k], supp_bg[b, n][k]) for n, k in
                     enumerate(present)]  # fmt: skip
            banks.append(self.combine(*map(list, zip(*pairs, strict=True))))
        padded = supp_feats.new_full(
            (len(banks), max(len(bank) for bank in banks), banks[0].shape[1]), IGNORED
        )
        for b, bank in enumerate(banks):
            padded[b, : len(bank)] = bank
        return padded

    def logits(self, qry_feats, bank, out_size, refine="none", impl=None, in_size=None):
        """Per class, the best cosine of a support feature of that class: ``B x Q x P x H x W``."""
        feats, classes = bank[..., :-1], bank[..., -1]
        sim = torch.einsum("bqchw,bmc->bqmhw", F.normalize(qry_feats, dim=2), feats)
        per_class = [
            sim.masked_fill(~(classes == p)[:, None, :, None, None], -2.0).amax(dim=2)
            for p in range(int(classes.max()) + 1)
        ]
        low = torch.stack(per_class, dim=2)
        return F.interpolate(low.flatten(0, 1), size=tuple(out_size), mode="bilinear").unflatten(
            0, low.shape[:2]
        )

    def segment(self, qry_feats, bank, out_size, refine="none", return_prob=False, impl=None, in_size=None):
        logits = self.logits(qry_feats, bank, out_size)
        labels = logits.argmax(dim=2).to(torch.uint8)
        return (labels, logits.softmax(dim=2).amax(dim=2)) if return_prob else labels

    def losses(self, *episode, shot_mask=None, second=True):
        raise NotImplementedError("training-free")


@pytest.fixture(scope="module", autouse=True)
def registered():
    """``@register_method(NAME)`` for this module's tests only (other tests list the built-in methods)."""
    register_method(NAME)(NearestNeighbour)
    yield
    unregister_method(NAME)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(NAME, "vgg16-dilated", 0.0625, {"input_size": SIZE})
    for conv in model.encoder.convs():  # as helpers.random_model: features that differ between pixels
        torch.nn.init.kaiming_normal_(conv.weight)
        torch.nn.init.normal_(conv.bias, std=0.1)
    path = tmp_path_factory.mktemp("nn") / "nn.pt"
    fss.save_checkpoint(model, path)
    return path


def test_the_registered_method_loads_and_matches_its_nearest_support_feature(ckpt):
    assert NAME in method_names()
    model = fss.load_model(ckpt)
    assert isinstance(model, NearestNeighbour) and method_of(model) is NearestNeighbour
    g = torch.Generator().manual_seed(0)
    supp = torch.randn(1, 2, 1, 3, SIZE, SIZE, generator=g)
    fg = torch.zeros(1, 2, 1, SIZE, SIZE)
    fg[:, 0, ..., :16], fg[:, 1, ..., 16:] = 1, 1  # way 1 the left half, way 2 the right
    with torch.no_grad():
        # a support image as its own query: every location finds itself (cosine 1), so its own class
        labels = model(supp, fg, 1 - fg, supp[:, 0]).argmax(dim=2)
    assert (labels[0, 0, :, :8] == 1).float().mean() > 0.9 and (
        labels[0, 0, :, -8:] == 0
    ).float().mean() > 0.9


def test_fss_run_from_a_checkpoint_and_from_its_exported_bundle(ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from fss.export.cli import main as export_main
    from fss.runtime.cli import main as run_main

    support, queries = make_support(tmp_path / "support"), make_queries(tmp_path / "queries")
    outputs = {}
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bundle")]) == 0
    for name, source in (("ckpt", ["--ckpt", str(ckpt), "--backend", "torch"]),
                         ("bundle", ["--bundle", str(tmp_path / "bundle")])):  # fmt: skip
        out = tmp_path / name
        assert run_main(["--support", str(support), "--query", str(queries), "--out", str(out), *source]) == 0
        summary = json.loads((out / "results.json").read_text())
        assert summary["settings"]["method"] == NAME
        outputs[name] = {p.name: np.array(Image.open(p)) for p in sorted(out.glob("q*.png"))}
    assert len(outputs["ckpt"]) == 3
    for name, mask in outputs["ckpt"].items():
        assert len(np.unique(mask)) > 1
        assert (mask != outputs["bundle"][name]).mean() < 0.01  # ONNX Runtime's features, float noise


def test_fss_eval_scores_it(ckpt, tmp_path):
    from fss.train.eval_cli import main as eval_main

    shapes = make_shapes(tmp_path / "shapes", per_class=3)
    args = ["--ckpt", str(ckpt), "--data", str(shapes), "--episodes", "3", "--runs", "1", "--no-progress"]
    assert eval_main([*args, "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < result["mean_iou"] <= 1


def test_segmenter_caches_its_state_per_shot(ckpt, tmp_path):
    support, queries = make_support(tmp_path / "support"), make_queries(tmp_path / "queries")
    seg = fss.Segmenter(fss.load_model(ckpt), device="cpu", backend="torch")
    images = [sorted((support / c).glob("*.jpg")) for c in ("cat", "dog")]
    masks = [[p.with_suffix(".png") for p in shots] for shots in images]
    seg.set_support(images, masks, ["cat", "dog"])
    paths = sorted(queries.glob("*.jpg"))
    before = seg.segment(paths)
    seg.add_shot("dog", images[0][0], masks[0][0])
    seg.remove_shot("dog", -1)  # back to the original shots, nothing re-encoded
    after = seg.segment(paths)
    for a, b, path in zip(before, after, paths, strict=True):
        assert np.array_equal(a, b) and a.shape == Image.open(path).size[::-1]


def test_no_caller_names_a_method():
    """A method's name (as a string) appears only in its own module and the registry's default."""
    import fss.models.base as base

    root = Path(base.__file__).parents[2]
    own = {root / "fss" / "models" / f"{name}.py" for name in method_names()} | {Path(base.__file__)}
    packages = ("fss", "kernels", "runtime", "export", "train", "demo", "serve")
    sources = [p for package in packages for p in sorted((root / package).rglob("*.py")) if p not in own]
    assert len(sources) > 50
    for path in sources:
        text = path.read_text()
        named = [name for name in method_names() if f'"{name}"' in text or f"'{name}'" in text]
        assert not named, f"{path.relative_to(root)} names {named}"

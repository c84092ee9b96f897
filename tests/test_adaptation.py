"""PRNet's test-time adaptation: the encoder learns the support set, then every weight is restored."""

import numpy as np
import pytest
import torch
from helpers import random_model

from fss.errors import FssError
from fss.models import adaptation
from fss.models.adaptation import adaptation_loss, adapted, support_labels
from fss.runtime.segmenter import Segmenter

SIZE = 33


def support_set(N=2, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(N, K, 3, SIZE, SIZE, generator=g)
    fg = (torch.rand(N, K, SIZE, SIZE, generator=g) > 0.6).float()
    bg = 1 - fg
    bg[:, :, :3] = 0  # an ignored band
    return imgs, fg, bg


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_support_labels():
    fg = torch.tensor([[[[1.0, 0, 0]]], [[[0, 1, 0]]]])  # N=2, K=1, 1 x 3
    bg = torch.tensor([[[[0.0, 1, 0]]], [[[1, 0, 0]]]])
    assert support_labels(fg, bg).flatten().tolist() == [1, 0, 255, 0, 2, 255]


def test_adaptation_learns_the_supports_and_restores_every_weight():
    model = random_model(width=0.0625, input_size=SIZE)
    imgs, fg, bg = support_set()
    before = snapshot(model)
    with torch.no_grad():
        loss_before = adaptation_loss(model, imgs, fg, bg).item()
    with torch.no_grad(), adapted(model, imgs, fg, bg):
        inside = snapshot(model)
        loss_after = adaptation_loss(model, imgs, fg, bg).item()
    assert loss_after < loss_before  # five steps fit the support set better
    assert any(not torch.equal(inside[k], before[k]) for k in before)
    after = snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="boom"), adapted(model, imgs, fg, bg):
        raise RuntimeError("boom")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_segmenter_adapts_a_cached_support_set_once(monkeypatch):
    rng = np.random.default_rng(0)
    imgs = [[(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(2)] for _ in range(2)]
    masks = [[(rng.random((SIZE, SIZE)) > 0.5).astype(np.uint8) for _ in range(2)] for _ in range(2)]
    queries = [(rng.random((SIZE, SIZE + 4, 3)) * 255).astype(np.uint8) for _ in range(3)]
    model = random_model(width=0.0625, input_size=SIZE)
    before = snapshot(model)
    calls = []
    real = adaptation.adapt_encoder
    monkeypatch.setattr(adaptation, "adapt_encoder", lambda *a, **k: calls.append(1) or real(*a, **k))
    seg = Segmenter(model, device="cpu", impl="torch", refine="adapt+fusion")
    seg.set_support(imgs, masks, ["a", "b"])
    first = seg.segment(queries[:2])
    again = seg.segment(queries)
    assert len(calls) == 1  # once per support set, not per query or call
    assert all(np.array_equal(x, y) for x, y in zip(first, again[:2], strict=True))
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    fusion_only = Segmenter(model, device="cpu", impl="torch", refine="fusion")
    fusion_only.set_support(imgs, masks, ["a", "b"])
    assert any(not np.array_equal(x, y) for x, y in zip(again, fusion_only.segment(queries), strict=True))
    seg.add_shot("a", imgs[1][0], masks[1][0])  # the set changed: adapted again
    seg.remove_shot("a", 0)
    assert len(calls) == 3 and [len(f) for f in seg.support(None).fg] == [2, 2]
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_bundles_cannot_adapt():
    class Bundle:
        backend = "onnxruntime"
        meta = {"method": "panet", "input_size": SIZE, "normalisation": {"mean": [0] * 3, "std": [1] * 3}}
        scale = 20.0

        def to(self, device):
            return self

        def eval(self):
            return self

    with pytest.raises(FssError, match="adaptation fine-tunes a checkpoint's encoder"):
        Segmenter(Bundle(), device="cpu", refine="adapt+fusion")


def test_evaluation_with_adaptation_leaves_the_model_unchanged(tmp_path):
    from test_train import SIZE as SHAPES_SIZE
    from test_train import make_shapes

    from fss.train.data import FolderDataset
    from fss.train.evaluate import evaluate

    model = random_model(width=0.0625, input_size=SHAPES_SIZE)
    before = snapshot(model)
    dataset = FolderDataset(make_shapes(tmp_path / "shapes", per_class=4), SHAPES_SIZE)
    kwargs = dict(ways=2, shots=1, episodes=2, batch_episodes=2)
    fused = evaluate(model, dataset, ["bar", "circle", "square"], refine="fusion", **kwargs)
    both = evaluate(model, dataset, ["bar", "circle", "square"], refine="adapt+fusion", **kwargs)
    assert both["refine"] == "adapt+fusion" and both["mean_iou"] != fused["mean_iou"]
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)

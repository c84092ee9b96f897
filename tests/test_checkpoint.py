"""Checkpoint formats: official snapshots (with/without ``module.``), ours, VGG16 init, clear errors."""

import pytest
import torch
from helpers import official_snapshot, random_model

import fss
from fss.checkpoint import init_encoder
from fss.errors import CheckpointError


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_official_snapshot_loads_with_and_without_module_prefix(tmp_path, prefix):
    model = random_model(width=0.25)
    torch.save(official_snapshot(model, prefix), tmp_path / "30000.pth")
    loaded = fss.load_model(tmp_path / "30000.pth")
    assert not loaded.training
    assert len(official_snapshot(model)) == 26
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert loaded.meta["width"] == 0.25 and loaded.meta["input_size"] == 417


def test_own_format_round_trip_keeps_metadata(tmp_path):
    model = random_model()
    fss.save_checkpoint(model, tmp_path / "m.pt", classes=["a", "b"], train_config={"iters": 3})
    loaded = fss.load_model(tmp_path / "m.pt")
    assert loaded.meta["classes"] == ["a", "b"]
    assert loaded.meta["train_config"] == {"iters": 3}
    assert loaded.meta["input_size"] == 65
    x = torch.randn(2, 3, 33, 33)
    torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)


def test_checkpoint_is_loadable_with_weights_only(tmp_path):
    fss.save_checkpoint(random_model(), tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    assert obj["format"] == "fss-checkpoint"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda s: s.pop("module.encoder.backbone.features.8.4.bias"),
            "missing keys encoder.features.8.4.bias",
        ),
        (lambda s: s.update({"module.encoder.backbone.extra.weight": torch.zeros(1)}), "unexpected keys"),
        (
            lambda s: s.update({"module.encoder.backbone.features.2.0.weight": torch.zeros(5, 8, 3, 3)}),
            "features.2.0.weight has shape (5, 8, 3, 3)",
        ),
        (
            lambda s: s.update({"module.decoder.weight": torch.zeros(1)}),
            "not a PANet checkpoint: unexpected keys",
        ),
    ],
)
def test_wrong_snapshot_gives_one_clear_line(tmp_path, mutate, message):
    state = official_snapshot(random_model())
    mutate(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        fss.load_model(tmp_path / "bad.pth")
    assert "\n" not in str(err.value) and str(tmp_path / "bad.pth") in str(err.value)


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        fss.load_model(tmp_path / "junk.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a PANet/fss checkpoint"):
        fss.load_model(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        fss.load_model(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        fss.load_model(tmp_path / "missing.pth")


class Payload:
    """An arbitrary class: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_not_executed(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        fss.load_model(tmp_path / "pickle.pth")


def test_vgg16_imagenet_init_takes_first_26_tensors_in_order(tmp_path):
    model = fss.PANet(width=1.0)
    # torchvision's layout: features.{0,2,5,...}.weight/bias then the classifier.
    tv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    state = {}
    for conv, index in zip(model.encoder.convs(), tv_indices, strict=True):
        state[f"features.{index}.weight"] = torch.randn_like(conv.weight)
        state[f"features.{index}.bias"] = torch.randn_like(conv.bias)
    state["classifier.0.weight"] = torch.randn(4, 4)
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    init_encoder(model, tmp_path / "vgg16-397923af.pth")
    for conv, index in zip(model.encoder.convs(), tv_indices, strict=True):
        assert torch.equal(conv.weight, state[f"features.{index}.weight"])
    narrow = fss.PANet(width=0.5)
    with pytest.raises(CheckpointError, match="fit width 1.0 only"):
        init_encoder(narrow, tmp_path / "vgg16-397923af.pth")


def test_encoder_geometry_matches_the_paper():
    model = fss.PANet(width=0.125)
    assert model.encode(torch.randn(1, 3, 417, 417)).shape == (1, 64, 53, 53)
    assert fss.models.VGG16Dilated.feature_size(417) == 53
    assert len(model.encoder.convs()) == 13
    assert isinstance(model.encoder.features[8][-1], torch.nn.Conv2d)  # no ReLU after the last conv


def test_init_encoder_from_an_fss_checkpoint_or_official_snapshot(tmp_path):

    source = random_model(width=0.25, seed=3)
    fss.save_checkpoint(source, tmp_path / "pre.pt")
    torch.save(official_snapshot(source), tmp_path / "official.pth")
    for path in (tmp_path / "pre.pt", tmp_path / "official.pth"):
        target = fss.PANet(width=0.25)
        init_encoder(target, path)
        assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters(), strict=True))
    with pytest.raises(CheckpointError, match="has shape"):
        init_encoder(fss.PANet(width=0.5), tmp_path / "pre.pt")


@pytest.mark.parametrize("method", ["sst", "oslsm"])
def test_init_from_another_methods_checkpoint_starts_every_trunk_from_its_encoder(method, tmp_path):
    from fss.models.base import build_model

    source = random_model(width=0.25, seed=3)
    fss.save_checkpoint(source, tmp_path / "panet.pt")
    torch.manual_seed(0)
    target = build_model(method, "vgg16-dilated", 0.25)
    heads = {k: v.clone() for k, v in target.state_dict().items() if not k.startswith("encoder.")}
    init_encoder(target, tmp_path / "panet.pt")
    trunks = target.trunks()
    for trunk in trunks:
        for (name, a), b in zip(
            trunk.state_dict().items(), source.encoder.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name
    for name, value in heads.items():
        if not name.startswith("support_encoder."):
            assert torch.equal(target.state_dict()[name], value), name  # the head keeps its initialisation
    fss.save_checkpoint(target, tmp_path / "same.pt")  # the same method: the whole model, heads included
    torch.manual_seed(1)
    again = build_model(method, "vgg16-dilated", 0.25)
    init_encoder(again, tmp_path / "same.pt")
    for name, value in target.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name

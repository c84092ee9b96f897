"""The "VGG16 dilated" encoder of PANet, and narrower members of the same family.

Five blocks of 3x3 convs (64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3 channels, times ``width``),
each followed by ReLU except the very last; max-pool (3, padding 1) with stride 2 after blocks 1-3
and stride 1 after block 4; block 5 dilated by 2. Output stride 8: 417 x 417 -> 53 x 53.

Parameter names match the official snapshot without its ``module.encoder.backbone.`` prefix:
``features.<block>.<layer>.weight|bias`` with blocks 0, 2, 4, 6, 8 and convs at layers 0, 2, 4.
"""

import torch
from torch import nn

VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
ENCODER_NAME = "vgg16-dilated"


def block_channels(width: float) -> list[int]:
    return [max(1, round(c * width)) for _, c in VGG16_BLOCKS]


class VGG16Dilated(nn.Module):
    """``M x 3 x H x W`` normalised images -> ``M x C x h x w`` features, ``h = ceil(H / 8)``."""

    def __init__(self, width: float = 1.0, in_channels: int = 3):
        super().__init__()
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

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features.modules() if isinstance(m, nn.Conv2d)]

    @staticmethod
    def feature_size(size: int) -> int:
        """Feature side for an input side: three stride-2 pools of kernel 3, padding 1."""
        for _ in range(3):
            size = (size - 1) // 2 + 1
        return size

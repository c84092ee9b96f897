"""Encoders and heads. Every method is an encoder plus a head; PANet's head is non-parametric."""

from fss.models.panet import PANet
from fss.models.vgg import VGG16Dilated

__all__ = ["PANet", "VGG16Dilated"]

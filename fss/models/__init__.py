"""Encoders and methods. Every method is a :class:`FewShotModel` (:mod:`fss.models.base`): an encoder plus
its head, registered by name with ``@register_method``."""

from fss.models.base import FewShotModel, build_model, get_method, method_names, method_of, register_method
from fss.models.panet import PANet
from fss.models.vgg import VGG16Dilated

__all__ = [
    "FewShotModel",
    "PANet",
    "VGG16Dilated",
    "build_model",
    "get_method",
    "method_names",
    "method_of",
    "register_method",
]

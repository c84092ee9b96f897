"""Fused PANet head operations: prototypes (masked average pooling) and matching (cosine, upsample, argmax).

Each public function takes ``impl="auto" | "torch" | "triton" | "native"``.
"""

from fss.kernels.matching import match, segment
from fss.kernels.prototypes import prototypes

__all__ = ["prototypes", "match", "segment"]

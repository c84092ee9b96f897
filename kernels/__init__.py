"""Fused PANet head operations: prototypes (masked average pooling) and matching (cosine, upsample, argmax).

Each public function takes ``impl="auto" | "torch" | "triton" | "native"``: ``torch`` is plain
differentiable torch ops, ``native`` a C++/OpenMP kernel for CPU tensors, ``triton`` GPU kernels (imported
lazily; on CPU only under ``TRITON_INTERPRET=1``). ``auto`` picks ``native`` on CPU and ``triton`` on CUDA
when available, else ``torch``. ``prototypes`` and ``match`` are differentiable with every impl (the fast
ones through an ``autograd.Function`` whose backward is torch ops); ``segment`` returns labels only.
"""

from fss.kernels.matching import match, segment
from fss.kernels.prototypes import prototypes

__all__ = ["prototypes", "match", "segment"]

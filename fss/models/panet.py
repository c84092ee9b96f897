"""PANet: prototypes by masked average pooling, ``20 x cosine`` matching, batched over episodes."""

import torch
from torch import nn

from fss import kernels
from fss.constants import PAPER_INPUT_SIZE, PROTOTYPE_SCALE
from fss.models.encoders import build_encoder, get_encoder

DEFAULT_ENCODER = "vgg16-dilated"  # the paper's


def default_meta(width: float = 1.0, encoder: str = DEFAULT_ENCODER) -> dict:
    return {
        "method": "panet",
        "encoder": encoder,
        "width": float(width),
        "input_size": PAPER_INPUT_SIZE,
        "normalisation": get_encoder(encoder).normalisation,
        "classes": [],
        "train_config": {},
    }


class PANet(nn.Module):
    """The PANet network: an encoder plus the non-parametric prototype head.

    ``meta`` describes the checkpoint (method, encoder, width, input size, normalisation, classes seen
    in training, training config); ``impl`` picks the kernels (``fss.kernels``) of the head. The encoder
    is ``encoder`` (a name of :mod:`fss.models.encoders`), else ``meta["encoder"]``, else the paper's.
    """

    def __init__(
        self, width: float = 1.0, meta: dict | None = None, impl: str = "auto", encoder: str | None = None
    ):
        super().__init__()
        meta = dict(meta or {})
        encoder = encoder or meta.get("encoder") or DEFAULT_ENCODER
        self.encoder = build_encoder(encoder, width)
        self.meta = {**default_meta(width, encoder), **meta, "encoder": encoder, "width": float(width)}
        self.scale = PROTOTYPE_SCALE
        self.impl = impl

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``M x 3 x H x W`` normalised images -> ``M x C x h x w``."""
        return self.encoder(images)

    def episode_features(self, supp_imgs, qry_imgs):
        """One encoder pass over supports and queries: ``B x N x K x C x h x w``, ``B x Q x C x h x w``."""
        return encode_episode(self.encode, supp_imgs, qry_imgs)

    def forward(self, supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask=None):
        """Logits ``B x Q x (1+N) x H x W`` of the query images; see :func:`episode_logits`."""
        return episode_logits(
            self.encode, supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask, scale=self.scale, impl=self.impl
        )


def encode_episode(encode, supp_imgs, qry_imgs):
    """One ``encode`` call over supports and queries: ``B x N x K x C x h x w``, ``B x Q x C x h x w``."""
    B, N, K = supp_imgs.shape[:3]
    Q = qry_imgs.shape[1]
    feats = encode(torch.cat([supp_imgs.flatten(0, 2), qry_imgs.flatten(0, 1)]))
    supp_feats = feats[: B * N * K].unflatten(0, (B, N, K))
    qry_feats = feats[B * N * K :].unflatten(0, (B, Q))
    return supp_feats, qry_feats


def episode_logits(
    encode, supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask=None, scale=PROTOTYPE_SCALE, impl="auto"
):
    """PANet's logits for a batch of episodes, whatever computes the features (torch, ONNX Runtime, ...).

    Args:
        encode: ``M x 3 x H x W`` normalised images -> ``M x C x h x w`` features.
        supp_imgs: ``B x N x K x 3 x H x W`` normalised support images.
        supp_fg, supp_bg: ``B x N x K x H x W`` foreground / background masks.
        qry_imgs: ``B x Q x 3 x H x W`` normalised query images.
        shot_mask: optional ``B x N x K`` bool for ways with fewer than K shots.

    Returns:
        ``B x Q x (1+N) x H x W`` logits, background first.
    """
    check_episode(supp_imgs, supp_fg, supp_bg, qry_imgs)
    supp_feats, qry_feats = encode_episode(encode, supp_imgs, qry_imgs)
    protos = kernels.prototypes(supp_feats, supp_fg, supp_bg, shot_mask, impl=impl)
    return kernels.match(qry_feats, protos, qry_imgs.shape[-2:], scale, impl=impl)


def check_episode(supp_imgs, supp_fg, supp_bg, qry_imgs):
    if supp_imgs.dim() != 6 or supp_imgs.shape[3] != 3:
        raise ValueError(f"supp_imgs must be B x N x K x 3 x H x W, got {tuple(supp_imgs.shape)}")
    B, N, K = supp_imgs.shape[:3]
    H, W = supp_imgs.shape[-2:]
    for name, mask in (("supp_fg", supp_fg), ("supp_bg", supp_bg)):
        if tuple(mask.shape) != (B, N, K, H, W):
            raise ValueError(f"{name} must be B x N x K x H x W = {(B, N, K, H, W)}, got {tuple(mask.shape)}")
    if qry_imgs.dim() != 5 or qry_imgs.shape[0] != B or qry_imgs.shape[2] != 3:
        raise ValueError(f"qry_imgs must be B x Q x 3 x H x W with B = {B}, got {tuple(qry_imgs.shape)}")

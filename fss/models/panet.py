"""PANet: prototypes by masked average pooling, ``20 x cosine`` matching, batched over episodes.

The network is an encoder and the non-parametric prototype head of :mod:`fss.models.methods`; the
method entry registered here adds PANet's training losses (query cross-entropy + prototype alignment).
"""

from torch import nn

from fss.constants import PAPER_INPUT_SIZE, PROTOTYPE_SCALE
from fss.models.encoders import build_encoder, get_encoder
from fss.models.methods import Method, encode_episode, episode_logits, get_method, register

DEFAULT_ENCODER = "vgg16-dilated"  # the paper's


def default_meta(width: float = 1.0, encoder: str = DEFAULT_ENCODER, method: str = "panet") -> dict:
    return {
        "method": method,
        "encoder": encoder,
        "width": float(width),
        "input_size": PAPER_INPUT_SIZE,
        "normalisation": get_encoder(encoder).normalisation,
        "classes": [],
        "train_config": {},
    }


class PANet(nn.Module):
    """A prototype network: an encoder plus the non-parametric prototype head (PANet's, PRNet's).

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
        method = meta.get("method", "panet")
        self.meta = {
            **default_meta(width, encoder, method),
            **meta,
            "encoder": encoder,
            "width": float(width),
        }
        self.scale = get_method(method).scale
        self.impl = impl

    def encode(self, images):
        """``M x 3 x H x W`` normalised images -> ``M x C x h x w``."""
        return self.encoder(images)

    def episode_features(self, supp_imgs, qry_imgs):
        """One encoder pass over supports and queries: ``B x N x K x C x h x w``, ``B x Q x C x h x w``."""
        return encode_episode(self.encode, supp_imgs, qry_imgs)

    def forward(self, supp_imgs, supp_fg, supp_bg, qry_imgs, shot_mask=None, refine="none"):
        """Logits ``B x Q x (1+N) x H x W`` of the query images; see :func:`episode_logits`."""
        method = get_method(self.meta["method"])
        return episode_logits(
            self.encode,
            method,
            supp_imgs,
            supp_fg,
            supp_bg,
            qry_imgs,
            shot_mask,
            self.scale,
            self.impl,
            refine,
        )


def build(encoder: str, width: float, meta: dict, impl: str) -> PANet:
    return PANet(width=width, meta=meta, impl=impl, encoder=encoder)


def losses(model, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask=None, second=True):
    """Query cross-entropy and PAR (:func:`fss.train.losses.panet_losses`)."""
    from fss.train.losses import panet_losses  # training code stays out of inference imports

    return panet_losses(model, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels, shot_mask, align=second)


register(
    Method(
        name="panet",
        build=build,
        losses=losses,
        default_refine="none",
        train_defaults={"lr": 1e-3},
        scale=PROTOTYPE_SCALE,
    )
)

"""A learned decision head over prototype matching (``--refine learned``), for PANet and PRNet.

Prototype matching gives each position to the label whose prototype is nearest. On a photo without
the class, or crowded with look-alikes, the nearest is often the class by a small lead, and neither
a softmax nor a cut-off on the whole photo can tell those leads from true ones (measured: docs/
methods.md). This head reads, per class and position, the cosines to the support's prototypes and
to the self-support ones (:mod:`fss.models.self_support`), with three statistics of the class's
whole map, and a small convolutional network turns them into the class's logit against the
background. It is trained on episodes of the training classes, half of whose queries lack the class
(``python -m fss.train.decision``), and stored in the checkpoint: ``meta["decision_head"]`` (its
width and the logit a class must exceed, ``threshold``) and the ``decision_head.*`` weights. Only
cosines go in, so it fits any encoder; at 417 px (a 53 x 53 grid) it costs ~9 ms per query for one
class, ~13 ms for three, on 2 CPU cores (benches/bench_quality.py).

A fresh head (output layer zero) decides exactly as self-support matching does for one class.

Shapes: ``B`` episodes, ``Q`` queries, ``P = 1 + N`` prototypes (background first), ``C`` channels,
``h x w`` the feature grid.
"""

import torch
from torch import nn

from fss.kernels.matching import cosine_logits
from fss.models.self_support import self_support_prototypes

MAP_CHANNELS = 7  # 4 cosine maps + 3 statistics of the class's lead over the background
TOP_POSITIONS = 10  # the lead's mean over its best positions is one statistic


def matching_maps(qry_feats: torch.Tensor, protos: torch.Tensor, scale: float) -> torch.Tensor:
    """``B x Q x C x h x w`` queries, ``B x P x C`` support prototypes -> ``B x Q x N x 7 x h x w``: per
    class, the cosines to the support's background and class prototypes, the same to the self-support
    ones, and the class's lead over the background (support prototypes) as its maximum, its mean over
    the best :data:`TOP_POSITIONS` positions and the share of positions it is positive, broadcast."""
    support = cosine_logits(qry_feats, protos, 1.0)
    own = cosine_logits(qry_feats, self_support_prototypes(qry_feats, protos, scale), 1.0)
    B, Q, P, h, w = support.shape
    N = P - 1
    lead = (support[:, :, 1:] - support[:, :, :1]).flatten(3)  # B x Q x N x hw
    top = lead.topk(min(TOP_POSITIONS, lead.shape[3]), dim=3).values.mean(dim=3)
    stats = torch.stack([lead.amax(dim=3), top, (lead > 0).to(lead.dtype).mean(dim=3)], dim=3)
    maps = [support[:, :, :1].expand(B, Q, N, h, w), support[:, :, 1:]]
    maps += [own[:, :, :1].expand(B, Q, N, h, w), own[:, :, 1:]]
    return torch.cat([torch.stack(maps, dim=3), stats[..., None, None].expand(B, Q, N, 3, h, w)], dim=3)


class DecisionHead(nn.Module):
    """``M x 7 x h x w`` maps (:func:`matching_maps`) -> ``M x h x w`` logits of the class against the
    background: three convolutions (dilations 1, 2, 4: a receptive field of 15 positions), their mean
    and maximum over the photo added back everywhere, two more convolutions, plus ``skip`` times the
    self-support lead (a fresh head is that lead at the prototype scale)."""

    def __init__(self, width: int = 32, scale: float = 20.0):
        super().__init__()
        self.local = nn.Sequential(
            nn.Conv2d(MAP_CHANNELS, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4),
            nn.ReLU(),
        )
        self.photo = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, width))
        self.out = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.skip = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.dim() != 4 or maps.shape[1] != MAP_CHANNELS:
            raise ValueError(f"maps must be M x {MAP_CHANNELS} x h x w, got {tuple(maps.shape)}")
        local = self.local(maps)
        photo = self.photo(torch.cat([local.mean(dim=(2, 3)), local.amax(dim=(2, 3))], dim=1))
        return self.out(local + photo[:, :, None, None])[:, 0] + self.skip * (maps[:, 3] - maps[:, 2])


def decision_logits(
    head: DecisionHead, qry_feats: torch.Tensor, protos: torch.Tensor, scale: float, threshold: float = 0.0
) -> torch.Tensor:
    """``B x Q x C x h x w`` queries, ``B x P x C`` prototypes -> ``B x Q x P x h x w`` logits: the
    background 0, class n the head's logit minus ``threshold`` (the operating point the checkpoint
    was calibrated to)."""
    maps = matching_maps(qry_feats, protos, scale)
    B, Q, N = maps.shape[:3]
    classes = head(maps.flatten(0, 2).to(next(head.parameters()).dtype)).unflatten(0, (B, Q, N))
    classes = classes.to(qry_feats.dtype) - threshold
    return torch.cat([torch.zeros_like(classes[:, :, :1]), classes], dim=2)

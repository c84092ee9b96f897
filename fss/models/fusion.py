"""PRNet's two-stage prototype fusion: support prototypes refined on the query features, batched.

Usable on any prototype checkpoint (PANet, PRNet). Per episode, with ``p_s`` the ``P = 1 + N``
support prototypes (background first) and the episode's ``Q`` queries (the paper's Eq. 7-13):

1. ``M1`` = cosine map of each query against ``p_s``; predicted class = argmax over ``P`` (ties: the
   first class); per query and class ``n`` the threshold ``alpha_n = (max + mean) / 2`` of ``M1[n]`` at
   the locations predicted as ``n``; a location is *confident* when its value is strictly above its
   predicted class's ``alpha`` (Eq. 8), every other location is excluded (-1).
2. ``p_q1`` = masked average pooling (PANet's, ``sum / (count + 1e-5)``) of each query's features over
   its confident locations of each class, averaged over the episode's queries (Eq. 7);
   ``p_f1 = 0.5 p_s + 0.5 p_q1``.
3. ``M2`` = cosine map against ``p_f1``; ``M3 = (M1 + M2) / 2`` gives the mask, thresholds and
   confident locations of ``p_q2`` as in 1-2; ``p_f2 = 0.5 p_f1 + 0.5 p_q2`` segments the queries.

Where the paper is silent (our choice): a class with no confident location in a query (never
predicted, or all its values equal) contributes no pooling from that query; a class with none in any
query of the episode keeps its prototype (``p_q = p_s``, so the fusion leaves it unchanged). The
cosine maps are computed at feature resolution, where the pooling happens, as PANet's alignment does.
"""

import torch
import torch.nn.functional as F

from fss.constants import POOL_EPS
from fss.kernels.matching import cosine_logits

FUSION_WEIGHT = 0.5  # the paper's omega_s = omega_q = omega_f = 0.5


def confident_query_prototypes(qry_feats, maps, fallback):
    """Query prototypes pooled over the confident locations of ``maps``.

    Args:
        qry_feats: ``B x Q x C x h x w`` query features.
        maps: ``B x Q x P x h x w`` cosine maps.
        fallback: ``B x P x C`` prototypes of classes with no confident location in any query.

    Returns:
        ``B x P x C``: per query the masked average over its confident locations of each class, then the
        mean over the queries that have any.
    """
    P = maps.shape[2]
    predicted = F.one_hot(maps.argmax(dim=2), P).movedim(-1, 2).bool()  # B x Q x P x h x w
    count = predicted.sum(dim=(3, 4))  # B x Q x P
    v_max = maps.masked_fill(~predicted, float("-inf")).amax(dim=(3, 4))
    v_mean = (maps * predicted).sum(dim=(3, 4)) / count.clamp_min(1)
    alpha = (v_max + v_mean) / 2
    confident = (predicted & (maps > alpha[..., None, None])).to(qry_feats.dtype)
    n_confident = confident.sum(dim=(3, 4))  # B x Q x P
    pooled = torch.einsum("bqchw,bqphw->bqpc", qry_feats, confident) / (n_confident + POOL_EPS)[..., None]
    has = (n_confident > 0).to(qry_feats.dtype)
    queries = has.sum(dim=1)  # B x P
    mean = (pooled * has[..., None]).sum(dim=1) / queries.clamp_min(1)[..., None]
    return torch.where((queries > 0)[..., None], mean, fallback)


def fuse_prototypes(qry_feats, protos, weight: float = FUSION_WEIGHT):
    """Two-stage fusion: ``B x Q x C x h x w`` queries, ``B x P x C`` support prototypes -> ``B x P x C``
    fused prototypes ``p_f2`` (module docstring)."""
    m1 = cosine_logits(qry_feats, protos, 1.0)
    p_f1 = (1 - weight) * protos + weight * confident_query_prototypes(qry_feats, m1, protos)
    m3 = (m1 + cosine_logits(qry_feats, p_f1, 1.0)) / 2
    return (1 - weight) * p_f1 + weight * confident_query_prototypes(qry_feats, m3, p_f1)

"""Edge-aware upsampling: a guided filter (He, Sun and Tang, ECCV 2010) of class probabilities, guided by
the image, so that label boundaries follow the photo's edges instead of the stride-8 feature grid.

``guided_probabilities`` filters ``P x H x W`` probabilities (bilinearly upsampled logits' softmax) with
the ``H x W`` grey image as the guide: per window of side ``2 r + 1``, each output is a linear function
of the guide (``a I + b``) fitted to the input by least squares with regulariser ``eps``, averaged over
the windows that cover the pixel. Window means come from integral images. Callers filter at a bounded size
(the runtime: the encoder's input size, then the filtered probabilities are upsampled to the photo):
the cost grows with the pixels filtered. With ``subsample`` s > 1 the linear coefficients are fitted on
the inputs resized by 1/s (radius r/s) and resized back before ``a I + b`` is taken at full resolution
(He and Sun's "fast guided filter", arXiv 1505.00996): s^2 fewer pixels to filter, edges still the
full-resolution guide's.
"""

import torch
import torch.nn.functional as F

GUIDED_RADIUS = 16  # pixels at the input size (two stride-8 cells): measured best of 8, 16 at 321 px
GUIDED_EPS = 1e-3  # on grey levels in [0, 1]: edges of contrast ~0.03 and above are followed
GUIDED_SUBSAMPLE = 2  # the fast filter's factor where labels are made (held-out mean-IoU: docs/methods.md)


def window_counts(n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    """How many of ``n`` positions each clipped window of radius ``r`` covers (1-D)."""
    idx = torch.arange(n, device=like.device)
    return ((idx + r).clamp(max=n - 1) - (idx - r).clamp(min=0) + 1).to(like.dtype)


def box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """``P x H x W`` -> the mean over each ``(2r+1)^2`` window clipped to the image: an integral image of
    the zero-padded input, four shifted views (a clipped window's count is the product of 1-D counts)."""
    H, W = x.shape[-2:]
    k = 2 * r + 1
    integral = F.pad(F.pad(x, (r, r, r, r)).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    sums = integral[..., k:, k:] - integral[..., :-k, k:] - integral[..., k:, :-k] + integral[..., :-k, :-k]
    return sums / (window_counts(H, r, x)[:, None] * window_counts(W, r, x)[None])


def guided_filter(guide: torch.Tensor, src: torch.Tensor, r=GUIDED_RADIUS, eps=GUIDED_EPS, subsample=1):
    """``H x W`` guide, ``P x H x W`` inputs -> ``P x H x W`` filtered inputs (module docstring)."""
    assert guide.dim() == 2 and src.dim() == 3 and guide.shape == src.shape[-2:], (guide.shape, src.shape)
    guide = guide[None].to(src.dtype)
    small_guide, small_src = guide, src
    if subsample > 1:
        size = [max(1, -(-n // subsample)) for n in guide.shape[-2:]]
        small_guide, small_src = (resize(x, size) for x in (guide, src))
        r = max(1, r // subsample)
    mean_i, mean_p = box_mean(small_guide, r), box_mean(small_src, r)
    cov = box_mean(small_guide * small_src, r) - mean_i * mean_p
    var = box_mean(small_guide * small_guide, r) - mean_i * mean_i
    a = cov / (var + eps)
    b = mean_p - a * mean_i
    mean_a, mean_b = box_mean(a, r), box_mean(b, r)
    if subsample > 1:
        mean_a, mean_b = (resize(x, guide.shape[-2:]) for x in (mean_a, mean_b))
    return mean_a * guide + mean_b


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """``P x h x w`` -> ``P x size``, bilinear (align_corners=False)."""
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def guided_labels(grey: torch.Tensor, logits: torch.Tensor, r: int = GUIDED_RADIUS, eps: float = GUIDED_EPS):
    """``H x W`` grey image in ``[0, 1]``, ``P x H x W`` logits at the image's size -> ``H x W`` uint8
    labels and the winner's filtered probability: the argmax of the guided-filtered softmax (the fast
    filter, :data:`GUIDED_SUBSAMPLE`)."""
    filtered = guided_filter(grey, logits.float().softmax(dim=0), r, eps, GUIDED_SUBSAMPLE)
    prob, labels = filtered.max(dim=0)
    return labels.to(torch.uint8), prob.clamp(0, 1)


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's "L" mode


def grey_of_normalised(images: torch.Tensor, normalisation: dict) -> torch.Tensor:
    """``... x 3 x H x W`` images normalised by a model's ``meta["normalisation"]`` -> ``... x H x W``
    grey levels in ``[0, 1]`` (the guide)."""
    mean, std, luma = (
        images.new_tensor(v)[:, None, None] for v in (normalisation["mean"], normalisation["std"], LUMA)
    )
    return ((images * std + mean) * luma).sum(dim=-3).clamp(0, 1)

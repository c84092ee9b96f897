"""PRNet's test-time adaptation: fine-tune the encoder on one support set, restore it afterwards.

The support prototypes segment the support images themselves (the paper's Eq. 6), cross-entropy against
the support labels (way n's foreground is class n, the episode's background 0, everything else
ignored), for ``ADAPT_STEPS`` steps. What the paper leaves open, chosen here:

- parameters: every encoder parameter; BatchNorm stays in eval mode (running statistics fixed: one to
  five support images cannot estimate them);
- optimiser: Adam, lr ``ADAPT_LR`` = 1e-4, chosen on held-out photos (bundled model, 24 classes it never
  saw, 1-way 1-shot, 100 episodes of seed 4321, adapt+fusion mean-IoU): lr 0 (fusion alone) 0.408,
  1e-5 0.410, 1e-4 0.414 (binary-IoU 0.625), 1e-3 0.339 (overfits the support set); SGD momentum 0.9
  lr 1e-3 0.411, 1e-2 0.415 (binary-IoU 0.611). A small sample (differences of 0.005 are noise):
  change it with ``lr``.

:func:`adapted` restores every weight bit for bit when it exits, whatever happens inside.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fss.constants import IGNORE_INDEX
from fss.kernels.matching import match_torch

ADAPT_STEPS = 5  # the paper's
ADAPT_LR = 1e-4


def support_labels(supp_fg, supp_bg):
    """``N x K x H x W`` masks -> int64 labels: ``n + 1`` on way n's foreground, 0 on the background,
    255 elsewhere."""
    N = supp_fg.shape[0]
    labels = torch.full(supp_fg.shape, IGNORE_INDEX, dtype=torch.long, device=supp_fg.device)
    ways = torch.arange(1, N + 1, device=supp_fg.device).view(N, 1, 1, 1).expand_as(labels)
    labels = torch.where(supp_fg == 1, ways, labels)
    return torch.where(supp_bg == 1, torch.zeros_like(labels), labels)


def adaptation_loss(model, supp_imgs, supp_fg, supp_bg, shot_mask=None):
    """The support set segmented by its own prototypes: ``N x K x 3 x H x W`` images, ``N x K x H x W``
    masks, optional ``N x K`` shot mask -> scalar cross-entropy."""
    N, K = supp_imgs.shape[:2]
    feats = model.encode(supp_imgs.flatten(0, 1)).unflatten(0, (N, K))
    mask = None if shot_mask is None else shot_mask[None]
    protos = model.episode_state(feats[None], supp_fg[None], supp_bg[None], mask, impl="torch")  # 1 x P x C
    logits = match_torch(feats.flatten(0, 1)[None], protos, supp_imgs.shape[-2:], model.scale)[0]
    labels = support_labels(supp_fg, supp_bg)
    if shot_mask is not None:
        labels[~shot_mask] = IGNORE_INDEX
    return F.cross_entropy(logits, labels.flatten(0, 1), ignore_index=IGNORE_INDEX)


def adapt_encoder(model, supp_imgs, supp_fg, supp_bg, shot_mask=None, steps=ADAPT_STEPS, lr=ADAPT_LR):
    """Fine-tune the model's query trunk in place on one support set (``N x K`` shots)."""
    params = [p for p in query_trunk(model).parameters()]
    flags = [p.requires_grad for p in params]
    optimiser = torch.optim.Adam(params, lr=lr)
    was_training = model.training
    model.eval()  # BatchNorm keeps its running statistics
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for _ in range(steps):
                optimiser.zero_grad(set_to_none=True)
                adaptation_loss(model, supp_imgs, supp_fg, supp_bg, shot_mask).backward()
                optimiser.step()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None  # no trace of the adaptation is left on the model
        model.train(was_training)


@contextmanager
def adapted(model, supp_imgs, supp_fg, supp_bg, shot_mask=None, steps=ADAPT_STEPS, lr=ADAPT_LR):
    """Within the block, ``model``'s encoder is adapted to the support set; on exit every weight and
    buffer is restored exactly."""
    saved = {k: v.detach().clone() for k, v in query_trunk(model).state_dict().items()}
    try:
        adapt_encoder(model, supp_imgs, supp_fg, supp_bg, shot_mask, steps, lr)
        yield model
    finally:
        restore(model, saved)


def adapted_state(model, supp_imgs, supp_fg, supp_bg, shot_mask=None, steps=ADAPT_STEPS, lr=ADAPT_LR):
    """The adapted encoder's state for one support set, the model itself left unchanged."""
    with adapted(model, supp_imgs, supp_fg, supp_bg, shot_mask, steps, lr):
        return {k: v.detach().clone() for k, v in query_trunk(model).state_dict().items()}


def query_trunk(model):
    """What adaptation tunes: the model's first trunk (:meth:`fss.models.base.FewShotModel.trunks`)."""
    return model.trunks()[0]


def restore(model, state: dict) -> None:
    """Copy ``state`` into the encoder's own tensors (in place: CUDA graphs keep their addresses)."""
    own = query_trunk(model).state_dict()
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)

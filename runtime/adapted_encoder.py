"""Test-time adaptation in the predictor: the encoder fine-tuned once per support set, its weights swapped
in for that set's queries and restored after (:mod:`fss.models.adaptation` does the fine-tuning)."""

import threading
from contextlib import contextmanager

import torch

from fss.errors import FssError
from fss.models.adaptation import adapted_state, restore
from fss.models.base import adapts
from fss.runtime.supports import class_position


class AdaptedEncoder:
    """The encoder's own weights, kept to restore after every adapted use; ``lock``: the predictor's
    (re-entrant) device lock, held while weights are swapped."""

    def __init__(self, model, lock: threading.RLock):
        self.model = model
        self.lock = lock
        self.base_state = {k: v.detach().clone() for k, v in model.trunks()[0].state_dict().items()}

    def adapt(self, shots, device: torch.device) -> dict:
        """Per class ``(images, fg, bg)`` at the input size -> the encoder state adapted to all of them."""
        N, K = len(shots), max(len(images) for images, _, _ in shots)
        imgs = torch.zeros(N, K, *shots[0][0].shape[1:])
        fg, bg = (torch.zeros(N, K, *shots[0][1].shape[1:]) for _ in range(2))
        shot_mask = torch.zeros(N, K, dtype=torch.bool)
        for n, (images, fgs, bgs) in enumerate(shots):
            k = len(images)
            imgs[n, :k], fg[n, :k], bg[n, :k], shot_mask[n, :k] = images, fgs, bgs, True
        to = dict(device=device)
        with self.lock:
            return adapted_state(self.model, imgs.to(**to), fg.to(**to), bg.to(**to), shot_mask.to(**to))

    @contextmanager
    def swapped_in(self, state: dict | None):
        """The encoder with ``state``'s weights (None: its own) until the block ends."""
        if state is None:
            yield
            return
        with self.lock:
            restore(self.model, state)
            try:
                yield
            finally:
                restore(self.model, self.base_state)


def adaptation_for(model, refine: str, lock: threading.RLock) -> AdaptedEncoder | None:
    """The adapted encoder a refinement needs (None when it does not adapt); a bundle cannot adapt."""
    if not adapts(refine):
        return None
    if getattr(model, "backend", "torch") != "torch":
        raise FssError("adaptation fine-tunes a checkpoint's encoder: load a checkpoint, not a bundle")
    return AdaptedEncoder(model, lock)


def edited_shots(support, class_name: str, add=None, keep=None) -> tuple[list[str], list]:
    """An adapted set's (classes, per-class shots) after adding shots ``add`` to a class (a new class is
    inserted in name order) or keeping only shots ``keep`` of it."""
    classes, shots = list(support.classes), list(support.shots)
    if class_name not in classes:
        n = class_position(classes, class_name)
        classes.insert(n, class_name)
        shots.insert(n, add)
    elif add is not None:
        n = classes.index(class_name)
        shots[n] = tuple(torch.cat([old, new]) for old, new in zip(shots[n], add, strict=True))
    else:
        n = classes.index(class_name)
        shots[n] = tuple(t[keep] for t in shots[n])
    return classes, shots

"""Training: episodic PANet training, losses, data sets and evaluation."""

from fss.train.losses import panet_losses

__all__ = ["panet_losses"]

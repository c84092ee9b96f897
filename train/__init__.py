"""Training: episodic training of any registered method, data sets and evaluation."""

from fss.models.panet import panet_losses

__all__ = ["panet_losses"]

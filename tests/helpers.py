"""Small synthetic data for tests: images, masks, folders, narrow random checkpoints."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fss
from fss.constants import voc_palette


def random_model(width=0.125, seed=0, input_size=65) -> fss.PANet:
    torch.manual_seed(seed)
    model = fss.PANet(width=width, meta={"input_size": input_size})
    for conv in model.encoder.convs():
        torch.nn.init.kaiming_normal_(conv.weight)
        torch.nn.init.normal_(conv.bias, std=0.1)
    return model.eval()


def official_snapshot(model, prefix="module.") -> dict:
    """The official ``nn.DataParallel(PANet).state_dict()`` (``prefix=""``: saved without DataParallel)."""
    return {f"{prefix}encoder.backbone.{k[len('encoder.') :]}": v for k, v in model.state_dict().items()}


def save_image(path: Path, rng, size=(48, 40)) -> np.ndarray:
    """A random RGB image of ``size`` = (width, height); returns its pixels."""
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def save_mask(path: Path, size=(48, 40), box=(8, 6, 30, 28), value=255, palette=False) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    img = Image.fromarray(mask, mode="P" if palette else "L")
    if palette:
        img.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return mask


def make_support(root: Path, classes=("cat", "dog"), shots=(2, 1), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for name, k in zip(classes, shots, strict=True):
        for i in range(k):
            save_image(root / name / f"{name}{i}.jpg", rng)
            save_mask(root / name / f"{name}{i}.png", box=(4 + i, 5, 30 + i, 30))
    return root


def make_queries(root: Path, n=3, seed=1) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        save_image(root / f"q{i}.jpg", rng, size=(40 + 3 * i, 36 + i))
    return root

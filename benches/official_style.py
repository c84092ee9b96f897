"""The official-style pipeline of ``bench_runtime.py`` as a whole process: ``python official_style.py ROOT``.

One episode per query, the support re-encoded with each query, upsample-then-pool prototypes,
per-prototype cosine, interpolate, argmax (``tests/official_reference.py``: the official math, not
fss's), each mask written as a PNG beside the queries' folder (``ROOT/official-out``).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from official_reference import episode_logits, episode_prototypes  # noqa: E402

import fss  # noqa: E402
from fss.constants import PAPER_NORMALISATION as NORM  # noqa: E402
from fss.io.images import read_image
from fss.io.masks import read_mask
from fss.io.tensors import image_tensor, mask_tensor  # noqa: E402


def official_style_pipeline(root: Path, model, size: int) -> dict[str, np.ndarray]:
    """``{query stem: size x size uint8 labels}`` of the 1-way 1-shot episode folder ``root``."""
    support = read_image(root / "support" / "thing" / "s.jpg")
    mask = mask_tensor(read_mask(root / "support" / "thing" / "s.png"), size)
    fg, bg = (mask == 1).float()[None, None], (mask == 0).float()[None, None]
    labels = {}
    with torch.no_grad():
        for path in sorted((root / "query").glob("*.jpg")):
            imgs = torch.stack(
                [image_tensor(support, size, NORM), image_tensor(read_image(path), size, NORM)]
            )
            feats = model.encoder(imgs)
            protos = episode_prototypes(feats[:1][None], fg, bg, [1])
            _, up = episode_logits(feats[1:], protos, (size, size))
            labels[path.stem] = up.argmax(1)[0].to(torch.uint8).numpy()
    return labels


def main(root: Path) -> None:
    model = fss.load_model(root / "vgg16.pt")
    out = root / "official-out"
    out.mkdir(exist_ok=True)
    for stem, labels in official_style_pipeline(root, model, model.meta["input_size"]).items():
        Image.fromarray(labels).save(out / f"{stem}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

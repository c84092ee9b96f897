"""How close box supports come to the true masks: support-mask IoU of the filled boxes and of GrabCut.

    python -m fss.train.box_quality --data runs/heldout/unseen

For every image + mask of a class folder (the support-folder layout), the boxes a user would draw are
made from the true mask: one per connected part (8-neighbour) holding at least
:data:`MIN_PART_SHARE` of the mask, at full size. Each photo's boxes become masks exactly as
``fss-run --box-supports mask|grabcut`` makes them (:func:`fss.io.boxes.boxes_mask`), scored by their
IoU with the true mask (its ignored pixels left out). Prints the means and GrabCut's CPU time per photo.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from fss.command import run_command
from fss.constants import IGNORE_INDEX
from fss.io.boxes import BOX_MODES, boxes_mask, import_cv2
from fss.io.folders import find_support_pairs
from fss.io.images import read_image
from fss.io.masks import read_mask

PROG = "python -m fss.train.box_quality"
MIN_PART_SHARE = 0.01  # smaller specks of a mask get no box of their own: a user would not draw one


def user_boxes(truth: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of the connected parts of a parsed mask's foreground, largest first."""
    cv2 = import_cv2()
    count, _, stats, _ = cv2.connectedComponentsWithStats((truth == 1).astype(np.uint8), connectivity=8)
    parts = sorted(stats[1:count].tolist(), key=lambda s: -s[cv2.CC_STAT_AREA])
    total = sum(s[cv2.CC_STAT_AREA] for s in parts)
    return [(x, y, x + w, y + h) for x, y, w, h, area in parts if area >= MIN_PART_SHARE * total]


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    known = truth != IGNORE_INDEX
    found, true = (mask == 1) & known, (truth == 1) & known
    return float((found & true).sum() / max((found | true).sum(), 1))


def measure(root: Path) -> dict:
    """Per mode: mean support-mask IoU over the photos of a support folder, and seconds per photo."""
    scores = {mode: [] for mode in BOX_MODES}
    seconds = dict.fromkeys(BOX_MODES, 0.0)
    for pairs in find_support_pairs(root).values():
        for image_path, mask_path in pairs:
            image, truth = read_image(image_path, draft=False), read_mask(mask_path)
            boxes = user_boxes(truth)
            for mode in BOX_MODES:
                start = time.process_time()
                mask = boxes_mask(image, boxes, mode, mask_path)
                seconds[mode] += time.process_time() - start
                scores[mode].append(iou(mask, truth))
    photos = len(scores["mask"])
    return {
        "photos": photos,
        **{f"iou_{mode}": float(np.mean(scores[mode])) for mode in BOX_MODES},
        "grabcut_better": float(np.mean(np.greater(scores["grabcut"], scores["mask"]))),
        "grabcut_seconds": seconds["grabcut"] / photos,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Support-mask IoU of box supports (filled, GrabCut).")
    p.add_argument("--data", type=Path, required=True, help="support folder: <class>/<image> + mask")
    args = p.parse_args(argv)

    def work() -> int:
        found = measure(args.data)
        print(
            f"{args.data}: {found['photos']} photos, support-mask IoU: boxes {found['iou_mask']:.3f}, "
            f"GrabCut {found['iou_grabcut']:.3f} (better on {found['grabcut_better']:.0%} of photos; "
            f"{found['grabcut_seconds']:.2f} CPU s per photo)"
        )
        return 0

    return run_command(PROG, work)


if __name__ == "__main__":
    raise SystemExit(main())

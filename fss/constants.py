"""Facts every part of fss agrees on: input normalisation, paper input size, the VOC palette."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER_NORMALISATION = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}  # meta["normalisation"] form
PAPER_INPUT_SIZE = 417
REFINEMENTS = ("none", "fusion", "adapt+fusion", "ssp", "learned", "tune")  # test-time (resolve_refine)
PROTOTYPE_REFINEMENTS = REFINEMENTS[:5]  # those of the prototype head (PANet, PRNet)
PROTOTYPE_SCALE = 20.0  # PANet multiplies cosine similarity by 20 before the softmax
POOL_EPS = 1e-5  # masked average pooling: sum(F * m) / (sum(m) + POOL_EPS)
COSINE_EPS = 1e-8  # as torch.nn.functional.cosine_similarity
IGNORE_INDEX = 255


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat list of 256 x RGB, for palette PNGs."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


MIN_INPUT_SIZE = 8  # three stride-2 poolings leave at least one feature pixel
MAX_INPUT_SIZE = 4096  # encoder input side: beyond this the activations need tens of GB

# What a presence score is computed from (fss.models.presence), in the order of a calibration's weights.
PRESENCE_FEATURES = ("area", "max_prob", "mean_prob", "confidence", "max_margin")
# How labels are brought from the feature grid to the photo (fss.kernels.guided): bilinear logits, or
# their probabilities guided-filtered with the photo as the guide.
EDGES = ("none", "guided")

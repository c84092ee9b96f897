"""PRNet (prototype refinement): PANet's network and head, bidirectional training, two-stage fusion.

The network is PANet's (any encoder); training adds the support segmented by the query prototypes as a
full second loss term (PANet's PAR with weight 1, the paper's recipe: lr 7e-3); at test time the
support prototypes are refined on the queries by two-stage fusion (:mod:`fss.models.fusion`).
"""

from fss.constants import PROTOTYPE_SCALE
from fss.models.methods import Method, register
from fss.models.panet import build, losses

register(
    Method(
        name="prnet",
        build=build,
        losses=losses,
        default_refine="fusion",
        train_defaults={"lr": 7e-3},
        scale=PROTOTYPE_SCALE,
    )
)

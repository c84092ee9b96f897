"""PRNet (prototype refinement): PANet's network and head, bidirectional training, two-stage fusion.

The network is PANet's (any encoder, the same state_dict names); training adds the support segmented
by the query prototypes as a full second loss term (PANet's PAR with weight 1, the paper's recipe: lr
7e-3); at test time the support prototypes are refined on the queries by two-stage fusion
(:mod:`fss.models.fusion`).
"""

from fss.errors import FssError
from fss.models.base import register_method
from fss.models.panet import PANet


@register_method("prnet")
class PRNet(PANet):
    default_refine = "fusion"
    train_defaults = {"lr": 7e-3}

    @classmethod
    def check_train_args(cls, args) -> None:
        if args.no_align or args.align_weight != 1.0:
            raise FssError(
                "--method prnet trains with its second term at full weight: drop --no-align / --align-weight"
            )

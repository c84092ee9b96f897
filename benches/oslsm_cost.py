"""Cost per query on EfficientNet-Lite0 at 321, one thread: min over 10 repetitions (ms).

Run: ``python benches/oslsm_cost.py`` (docs/performance.md, OSLSM).
"""

import time

import torch

import fss
from fss.kernels.logistic import segment
from fss.models.base import build_model

torch.set_num_threads(1)
panet = fss.load_model(None)
oslsm = build_model("oslsm", "efficientnet-lite0", 1.0).eval()  # the cost does not depend on the weights
x, s = torch.randn(1, 3, 321, 321), torch.randn(1, 3, 224, 224)


def best(fn, reps=10):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, out


enc_p, _ = best(lambda: panet.encode(x))
enc_o, feats = best(lambda: oslsm.encode(x))
cond, w = best(lambda: oslsm.condition_masked(s))
for k in (1, 5):
    head, _ = best(lambda k=k: segment(feats[None], w[None, None].expand(1, 1, k, -1), (321, 321)))
    print(f"OSLSM head 1-way {k}-shot 41x41 -> 321: {head:.2f} ms")
print(
    f"PANet encoder {enc_p:.1f} ms; OSLSM query branch (trunk + fc6 + fc7) {enc_o:.1f} ms; "
    f"OSLSM conditioning branch, per support shot (once per support set) {cond:.1f} ms"
)

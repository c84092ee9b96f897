"""PANet's batched fast path against the official-style reference: logits, losses, gradients."""

import pytest
import torch
from official_reference import reference_forward, reference_losses

import fss
from fss.models.panet import panet_losses

# Same float32 math in another order (adjoint pooling, batched einsum): logits agree to ~1e-5 of
# their scale (20); losses to 1e-4 as the project promises.
LOGIT_ATOL = 2e-4
LOSS_ATOL = 1e-4


def random_episode(B, N, K, Q, H, W, generator=None):
    supp = torch.randn(B, N, K, 3, H, W, generator=generator)
    qry = torch.randn(B, Q, 3, H, W, generator=generator)
    fg = (torch.rand(B, N, K, H, W, generator=generator) > 0.6).float()
    # Ignored pixels are in neither mask, as in the official data pipeline's 255 regions.
    ignored = torch.rand(B, N, K, H, W, generator=generator) > 0.9
    bg = ((1 - fg) * ~ignored).float()
    labels = torch.randint(0, N + 1, (B, Q, H, W), generator=generator)
    labels[torch.rand(B, Q, H, W, generator=generator) > 0.9] = 255
    return supp, fg, bg, qry, labels


def narrow_model(seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model = fss.PANet(width=0.125)
    # Random weights with a healthy scale so that logits spread over several classes.
    for conv in model.encoder.convs():
        torch.nn.init.kaiming_normal_(conv.weight)
        torch.nn.init.normal_(conv.bias, std=0.1)
    return model.eval()


SHAPES = [  # B, N, K, Q, H, W
    (1, 1, 1, 1, 41, 41),
    (1, 2, 3, 4, 33, 47),
    (3, 1, 5, 1, 29, 29),
    (2, 5, 1, 2, 37, 31),
    (1, 1, 1, 1, 7, 9),  # 1 x 1 features
]


@pytest.mark.parametrize("B,N,K,Q,H,W", SHAPES)
def test_logits_match_official(B, N, K, Q, H, W):
    model = narrow_model()
    supp, fg, bg, qry, _ = random_episode(B, N, K, Q, H, W)
    with torch.no_grad():
        ours = model(supp, fg, bg, qry)
        ref = reference_forward(model, supp, fg, bg, qry)
    assert ours.shape == (B, Q, 1 + N, H, W)
    torch.testing.assert_close(ours, ref, atol=LOGIT_ATOL, rtol=1e-4)
    # Labels agree wherever the reference is not a near-tie (1 x 1 features make every pixel one tie).
    top2 = ref.topk(2, dim=2).values
    decisive = (top2[:, :, 0] - top2[:, :, 1]) > 4 * LOGIT_ATOL
    assert torch.equal(ours.argmax(2)[decisive], ref.argmax(2)[decisive])


def test_ragged_shots_match_official():
    model = narrow_model()
    supp, fg, bg, qry, _ = random_episode(2, 3, 4, 2, 35, 35)
    shots = [[4, 1, 2], [3, 4, 1]]
    shot_mask = torch.tensor([[[k < n for k in range(4)] for n in row] for row in shots])
    # Padding shots hold garbage: they must not leak into the result.
    with torch.no_grad():
        ours = model(supp, fg, bg, qry, shot_mask=shot_mask)
        ref = reference_forward(model, supp, fg, bg, qry, shots=shots)
    torch.testing.assert_close(ours, ref, atol=LOGIT_ATOL, rtol=1e-4)


@pytest.mark.parametrize("B,N,K,Q,H,W", [(1, 1, 1, 1, 41, 41), (2, 2, 3, 2, 33, 29), (1, 3, 2, 3, 25, 37)])
def test_losses_and_gradients_match_official(B, N, K, Q, H, W):
    model = narrow_model()
    supp, fg, bg, qry, labels = random_episode(B, N, K, Q, H, W)
    model.train()
    query, align = panet_losses(model, supp, fg, bg, qry, labels)
    ours = [g.clone() for g in torch.autograd.grad(query + align, list(model.parameters()))]
    ref_query, ref_align = reference_losses(model, supp, fg, bg, qry, labels)
    ref = torch.autograd.grad(ref_query + ref_align, list(model.parameters()))
    assert abs(query.item() - ref_query.item()) < LOSS_ATOL
    assert abs(align.item() - float(ref_align.detach())) < LOSS_ATOL
    assert float(ref_align.detach()) > 0  # the alignment branch really ran
    for g_ours, g_ref in zip(ours, ref, strict=True):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-4 * g_ref.abs().max().item() + 1e-6, rtol=1e-3)


def test_align_loss_skips_ways_without_query_pixels():
    """With one way's prototype far from every query pixel, PAR must skip that way as the official code."""
    model = narrow_model()
    supp, fg, bg, qry, labels = random_episode(1, 2, 2, 1, 33, 33)
    fg[0, 1] = 0  # way 2 has an empty support mask: its prototype is 0, cosine 0 everywhere
    bg[0, 1] = 1
    query, align = panet_losses(model, supp, fg, bg, qry, labels)
    ref_query, ref_align = reference_losses(model, supp, fg, bg, qry, labels)
    assert abs(query.item() - ref_query.item()) < LOSS_ATOL
    assert abs(align.item() - float(torch.as_tensor(ref_align).detach())) < LOSS_ATOL


def test_bad_shapes_raise():
    model = narrow_model()
    supp, fg, bg, qry, _ = random_episode(1, 2, 1, 1, 17, 17)
    with pytest.raises(ValueError, match="supp_fg"):
        model(supp, fg[:, :1], bg, qry)
    with pytest.raises(ValueError, match="qry_imgs"):
        model(supp, fg, bg, qry[0])

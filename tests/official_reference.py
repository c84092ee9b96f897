"""An independent, line-by-line restatement of the official PANet computation (method-facts.md).

Deliberately slow and loop-based: per episode, per way, per shot it upsamples the support features to
the mask size and pools them; it compares each prototype with ``F.cosine_similarity`` one at a time.
Tests compare fss's batched fast paths against it.
"""

import torch
import torch.nn.functional as F


def masked_pool(feats, mask):
    """1 x C x h x w features, H x W mask -> 1 x C (upsample, then masked average)."""
    up = F.interpolate(feats, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return torch.sum(up * mask[None, None], dim=(2, 3)) / (mask[None, None].sum(dim=(2, 3)) + 1e-5)


def cal_dist(feats, prototype, scaler=20):
    return F.cosine_similarity(feats, prototype[..., None, None], dim=1) * scaler


def episode_prototypes(supp_feats, fg, bg, shots):
    """supp_feats N x K x C x h x w (one episode); shots[n] = valid shots of way n."""
    n_ways = len(shots)
    fg_protos = []
    bg_sum = 0
    for way in range(n_ways):
        fg_pool = [masked_pool(supp_feats[way, [shot]], fg[way, shot]) for shot in range(shots[way])]
        bg_pool = [masked_pool(supp_feats[way, [shot]], bg[way, shot]) for shot in range(shots[way])]
        fg_protos.append(sum(fg_pool) / shots[way])
        bg_sum = bg_sum + sum(bg_pool) / shots[way]
    return [bg_sum / n_ways, *fg_protos]  # each 1 x C


def episode_logits(qry_feats, prototypes, img_size):
    """qry_feats Q x C x h x w -> (Q x P x h x w at feature size, Q x P x H x W upsampled)."""
    pred = torch.stack([cal_dist(qry_feats, p) for p in prototypes], dim=1)
    return pred, F.interpolate(pred, size=img_size, mode="bilinear", align_corners=False)


def align_loss(qry_feats, pred, supp_feats, fg, bg, shots):
    """Prototype alignment loss of one episode (the official ``alignLoss``)."""
    n_ways = len(shots)
    pred_mask = pred.argmax(dim=1, keepdim=True)
    binary = [pred_mask == i for i in range(1 + n_ways)]
    skip = [i for i in range(n_ways) if binary[i + 1].sum() == 0]
    pred_mask = torch.stack(binary, dim=1).float()
    qry_protos = torch.sum(qry_feats.unsqueeze(1) * pred_mask, dim=(0, 3, 4))
    qry_protos = qry_protos / (pred_mask.sum((0, 3, 4)) + 1e-5)
    loss = 0
    for way in range(n_ways):
        if way in skip:
            continue
        protos = [qry_protos[[0]], qry_protos[[way + 1]]]
        for shot in range(shots[way]):
            img_feats = supp_feats[way, [shot]]
            supp_pred = torch.stack([cal_dist(img_feats, p) for p in protos], dim=1)
            supp_pred = F.interpolate(supp_pred, size=fg.shape[-2:], mode="bilinear", align_corners=False)
            label = torch.full_like(fg[way, shot], 255).long()
            label[fg[way, shot] == 1] = 1
            label[bg[way, shot] == 1] = 0
            loss = loss + F.cross_entropy(supp_pred, label[None], ignore_index=255) / shots[way] / n_ways
    return loss


def reference_forward(model, supp_imgs, supp_fg, supp_bg, qry_imgs, shots=None, with_align=False):
    """B x Q x (1+N) x H x W logits (and the batch-mean align loss) computed the official way.

    ``shots``: optional B x N list of valid-shot counts (ragged ways); default all K.
    """
    B, N, K = supp_imgs.shape[:3]
    Q = qry_imgs.shape[1]
    img_size = supp_imgs.shape[-2:]
    outputs, total_align = [], 0
    for epi in range(B):
        supp_feats = model.encoder(supp_imgs[epi].flatten(0, 1)).unflatten(0, (N, K))
        qry_feats = model.encoder(qry_imgs[epi])
        epi_shots = [K] * N if shots is None else list(shots[epi])
        protos = episode_prototypes(supp_feats, supp_fg[epi], supp_bg[epi], epi_shots)
        pred, up = episode_logits(qry_feats, protos, img_size)
        outputs.append(up)
        if with_align:
            total_align = total_align + align_loss(
                qry_feats, pred, supp_feats, supp_fg[epi], supp_bg[epi], epi_shots
            )
    logits = torch.stack(outputs)
    assert logits.shape[:3] == (B, Q, 1 + N)
    return (logits, total_align / B) if with_align else logits


def reference_losses(model, supp_imgs, supp_fg, supp_bg, qry_imgs, qry_labels):
    logits, align = reference_forward(model, supp_imgs, supp_fg, supp_bg, qry_imgs, with_align=True)
    query = F.cross_entropy(logits.flatten(0, 1), qry_labels.flatten(0, 1), ignore_index=255)
    return query, align

"""The guided filter of class probabilities (kernels/guided.py) against a plain windowed reference."""

import pytest
import torch
import torch.nn.functional as F

from fss.kernels.guided import box_mean, guided_filter, guided_labels


def box_reference(x, r):
    """The window mean by average pooling, windows clipped at the border."""
    return F.avg_pool2d(x[None], 2 * r + 1, stride=1, padding=r, count_include_pad=False)[0]


@pytest.mark.parametrize("shape, r", [((1, 5, 7), 1), ((3, 17, 11), 2), ((2, 9, 23), 4), ((1, 4, 4), 6)])
def test_box_mean_equals_average_pooling(shape, r):
    torch.manual_seed(sum(shape) + r)
    x = torch.rand(shape, dtype=torch.float64)
    torch.testing.assert_close(box_mean(x, r), box_reference(x, r))


def test_guided_filter_equals_its_definition():
    torch.manual_seed(0)
    guide, src, r, eps = (
        torch.rand(13, 19, dtype=torch.float64),
        torch.rand(2, 13, 19, dtype=torch.float64),
        3,
        1e-2,
    )
    m = lambda t: box_reference(t, r)  # noqa: E731
    a = (m(guide[None] * src) - m(guide[None]) * m(src)) / (m(guide[None] ** 2) - m(guide[None]) ** 2 + eps)
    b = m(src) - a * m(guide[None])
    torch.testing.assert_close(guided_filter(guide, src, r, eps), m(a) * guide + m(b))


def test_labels_follow_an_edge_of_the_guide():
    grey = torch.zeros(40, 40)
    grey[:, 23:] = 1.0  # the object's true edge at column 23
    logits = torch.zeros(2, 40, 40)
    logits[1] = (torch.arange(40.0) - 19.5) / 3  # a blurred boundary between columns 19 and 20
    labels, prob = guided_labels(grey, logits, r=6, eps=1e-3)
    assert (labels[:, 23:] == 1).all() and (labels[:, 15:23] == 0).all()
    assert labels.dtype == torch.uint8 and ((prob >= 0) & (prob <= 1)).all()
    flat = guided_labels(torch.full((40, 40), 0.5), logits, r=6)[0]  # no edge: the plain boundary
    assert torch.equal(flat, (logits.argmax(0)).to(torch.uint8))


def test_float32_integral_images_stay_accurate_at_the_input_size():
    torch.manual_seed(1)
    x = torch.rand(2, 321, 321)
    torch.testing.assert_close(box_mean(x, 8), box_reference(x, 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape, s", [((2, 13, 19), 2), ((1, 17, 17), 2), ((3, 20, 9), 4)])
def test_the_fast_filter_fits_coefficients_on_resized_inputs(shape, s):
    torch.manual_seed(sum(shape) + s)
    guide, src, r, eps = (
        torch.rand(shape[1:], dtype=torch.float64),
        torch.rand(shape, dtype=torch.float64),
        4,
        1e-2,
    )
    small = [-(-n // s) for n in shape[1:]]
    size = lambda t, hw: F.interpolate(t[None], size=hw, mode="bilinear", align_corners=False)[0]  # noqa: E731
    g, p = size(guide[None], small), size(src, small)
    m = lambda t: box_reference(t, r // s)  # noqa: E731
    a = (m(g * p) - m(g) * m(p)) / (m(g * g) - m(g) ** 2 + eps)
    b = m(p) - a * m(g)
    want = size(m(a), shape[1:]) * guide + size(m(b), shape[1:])
    torch.testing.assert_close(guided_filter(guide, src, r, eps, subsample=s), want)

"""Learning-rate schedule and the loss (masking and L2Wrap), against direct computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from src.training.loss import masked_lm_loss
from src.training.schedule import learning_rate


def test_warmup_then_each_schedule():
    kw = dict(total_steps=110, lr_init=1e-3, lr_final=1e-5, warmup_steps=10)
    assert learning_rate(0, schedule="cosine", **kw) == pytest.approx(1e-5)
    assert learning_rate(5, schedule="cosine", **kw) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    for schedule in ("constant", "exponential", "cosine"):
        assert learning_rate(10, schedule=schedule, **kw) == pytest.approx(1e-3)
    assert learning_rate(110, schedule="constant", **kw) == pytest.approx(1e-3)
    assert learning_rate(110, schedule="exponential", **kw) == pytest.approx(1e-5)
    assert learning_rate(60, schedule="exponential", **kw) == pytest.approx(math.sqrt(1e-3 * 1e-5))
    assert learning_rate(110, schedule="cosine", **kw) == pytest.approx(1e-5)
    assert learning_rate(60, schedule="cosine", **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    with pytest.raises(ValueError, match="Unknown --lr_schedule 'linear'"):
        learning_rate(0, schedule="linear", **kw)


@pytest.mark.numerical
def test_masked_loss_is_the_mean_over_unmasked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.float)
    picked = [F.cross_entropy(logits[b, t][None], targets[b, t][None]) for b in range(2) for t in range(5) if mask[b, t]]
    # fp32 means of at most 10 log-softmax terms of order 1, grouped differently: a few eps (1e-6 = 8 eps).
    assert masked_lm_loss(logits, targets, mask).item() == pytest.approx(torch.stack(picked).mean().item(), rel=1e-6)
    assert masked_lm_loss(logits, targets, None).item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel=1e-6)


@pytest.mark.numerical
def test_l2wrap_adds_the_max_logit_term_to_the_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    masked_lm_loss(logits, targets, None).backward()
    plain = logits.detach().clone().requires_grad_()
    F.cross_entropy(plain.flatten(0, 1), targets.flatten()).backward()
    extra = torch.zeros_like(plain)
    for b in range(2):
        for t in range(3):
            j = plain[b, t].argmax()
            extra[b, t, j] = plain[b, t, j].detach() * 1e-4 / 6
    # float64 gradients of order 1/6, each from a few elementwise operations: a few eps = 1e-16.
    assert torch.allclose(logits.grad, plain.grad + extra, atol=1e-15)

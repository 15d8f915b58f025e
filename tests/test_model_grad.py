"""Gradients through the whole model: the fast WKV6 against the reference swapped in."""
import pytest
import torch

import src.model
from src.model import RWKV6
from src.ops.wkv6_reference import wkv6_reference
from tests.tiny import SHAPES, random_state_dict

pytestmark = pytest.mark.numerical


def grads(model, tokens):
    model.zero_grad()
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def model():
    return RWKV6.from_state_dict(random_state_dict(SHAPES["deep"], seed=9), op="cpu").double().train()


@pytest.fixture
def tokens():
    return torch.randint(0, SHAPES["deep"].vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))


def test_model_gradients_match_the_reference_op(model, tokens, monkeypatch):
    fast = grads(model, tokens)
    monkeypatch.setattr(src.model, "wkv6", lambda r, k, v, w, u, s, op: wkv6_reference(r, k, v, w, u, s))
    slow = grads(model, tokens)
    for name in fast:
        scale = slow[name].abs().max()
        assert scale > 0, f"{name} got no gradient"
        # float64: the chunked op sums the same terms as the step-by-step reference in another order,
        # through T = 45 steps of decays, ~T eps = 1e-14 of the scale; 1e-9 is far above that and far
        # below a wrong or missing gradient term.
        assert (fast[name] - slow[name]).abs().max() <= 1e-9 * max(1.0, scale), name


def test_gradient_checkpointing_gives_the_same_gradients(model, tokens):
    plain = grads(model, tokens)
    model.grad_cp = True
    checkpointed = grads(model, tokens)
    for name in plain:
        # The checkpointed pass recomputes the same forward in the same order: equal up to a rare
        # last-place difference (float64 eps 2.2e-16 of gradients of order 1).
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-12), name

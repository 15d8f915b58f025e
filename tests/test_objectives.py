"""The preference losses (src/objectives) against independent references on the same log-probs: each
paper's formula written here in float64 from its definitions (sigmoid, odds P / (1 - P)), value and
gradient; and HF TRL's own loss code (DPOTrainer._compute_loss, CPOTrainer.cpo_loss for SimPO,
ORPOTrainer.odds_ratio_loss), called on log-probs through a stand-in trainer, metrics included."""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from src.objectives import OBJECTIVES, PairLogps
from src.objectives.orpo import log1mexp
from tests.runtimes import require

B = 6


def logps(seed):
    """Summed reply log-probs of B pairs, their token counts, and reference sums: a spread of lengths and
    values, one reply a single near-certain token (mean log-prob near 0: ORPO's odds near infinity)."""
    g = torch.Generator().manual_seed(seed)
    n_c = torch.randint(1, 40, (B,), generator=g).double()
    n_r = torch.randint(1, 40, (B,), generator=g).double()
    c = -n_c * torch.rand(B, generator=g, dtype=torch.float64) * 3
    r = -n_r * torch.rand(B, generator=g, dtype=torch.float64) * 3
    n_c[0], c[0] = 1, -1e-4
    return c, r, n_c, n_r, c + torch.randn(B, generator=g, dtype=torch.float64), r + torch.randn(B, generator=g, dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def paper(name, c, r, n_c, n_r, ref_c, ref_r, **h):
    """The papers' losses, batch means, in float64, as written in them."""
    if name == "dpo":
        loss = -torch.log(sigmoid(h["beta"] * ((c - ref_c) - (r - ref_r)))).mean()
        return loss + h["sft_weight"] * (-c.sum() / n_c.sum())
    if name == "simpo":
        return -torch.log(sigmoid(h["beta"] * c / n_c - h["beta"] * r / n_r - h["gamma"])).mean()
    p_c, p_r = torch.exp(c / n_c), torch.exp(r / n_r)
    odds = lambda p: p / (1 - p)   # noqa: E731
    return -c.sum() / n_c.sum() - h["lam"] * torch.log(sigmoid(torch.log(odds(p_c) / odds(p_r)))).mean()


HYPER = {"dpo": [dict(beta=0.1, sft_weight=0.0), dict(beta=0.5, sft_weight=0.3)],
         "simpo": [dict(beta=2.0, gamma=1.0), dict(beta=2.5, gamma=0.3)],
         "orpo": [dict(lam=0.1), dict(lam=1.0)]}


def ours(name, c, r, n_c, n_r, ref_c, ref_r, **h):
    pair = PairLogps(c, r, n_c, n_r, ref_c if name == "dpo" else None, ref_r if name == "dpo" else None)
    return OBJECTIVES[name].loss(pair, **h)


@pytest.mark.numerical
@pytest.mark.parametrize("name", sorted(HYPER))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_equal_the_papers_formula_in_float64(name, seed):
    for hyper in HYPER[name]:
        want_in = [t.clone().requires_grad_() for t in logps(seed)[:2]]
        got_in = [t.float().clone().requires_grad_() for t in logps(seed)[:2]]
        rest = logps(seed)[2:]
        want = paper(name, *want_in, *rest, **hyper)
        got, _ = ours(name, *got_in, *(t.float() for t in rest), **hyper)
        want.backward()
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
        for g, w in zip(got_in, want_in):   # fp32 against float64: a few fp32 roundings of each
            torch.testing.assert_close(g.grad.double(), w.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.numerical
def test_dpo_at_the_start_is_ln2_with_zero_rewards():
    c, r, n_c, n_r, _, _ = (t.float() for t in logps(3))
    loss, m = ours("dpo", c, r, n_c, n_r, c.clone(), r.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[key].item() == 0


@pytest.mark.numerical
def test_log1mexp_is_accurate_near_zero_and_far_below():
    x = torch.tensor([-1e-30, -1e-8, -1e-3, -0.5, -0.7, -2.0, -50.0], dtype=torch.float64)
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x.float()).double(), want, rtol=1e-6, atol=1e-12)
    assert torch.isfinite(log1mexp(torch.zeros(1))).all()     # a mean log-prob that rounds to 0


# --- TRL's own code ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl():
    return require("trl", "pip install -r requirements-test.txt (trl, pinned there)")


def accelerator():
    same = lambda t: t   # noqa: E731   one process: gather is the identity
    return SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same)


def trl_dpo(trl, c, r, ref_c, ref_r, n_c, n_r, beta, sft_weight):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs: a stand-in model returns them (the
    reply's log-probs spread over its tokens, 0 elsewhere, as TRL's fused head gives with labels -100)."""
    T = int(max(n_c.max(), n_r.max())) + 2
    n = torch.cat([n_c, n_r]).long()
    mask = (torch.arange(T)[None, :] >= 1) & (torch.arange(T)[None, :] <= n[:, None])   # completion tokens
    per_token = (torch.cat([c, r]) / n)[:, None] * mask[:, 1:]
    per_token = per_token.detach().requires_grad_()
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, T - 1),
                              mean_logits=torch.zeros(2 * B, T - 1), is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool))
    model = lambda **kw: outputs   # noqa: E731
    types, weights = (["sigmoid", "sft"], [1.0, sft_weight]) if sft_weight else (["sigmoid"], [1.0])
    stand_in = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator(), aux_loss_enabled=False,
                               ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                               loss_types=types, loss_weights=weights, beta=beta, use_weighting=False,
                               _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": mask.long(), "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = trl.DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    loss.backward()
    grad = (per_token.grad * mask[:, 1:]).sum(1) / n   # each token's share of d loss / d (summed log-prob)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}, grad[:B], grad[B:]


@pytest.mark.numerical
@pytest.mark.parametrize("hyper", HYPER["dpo"])
def test_dpo_equals_trl(trl, hyper):
    c, r, n_c, n_r, ref_c, ref_r = (t.float() for t in logps(4))
    want, want_m, want_gc, want_gr = trl_dpo(trl, c, r, ref_c, ref_r, n_c, n_r, **hyper)
    got_in = [c.clone().requires_grad_(), r.clone().requires_grad_()]
    got, m = ours("dpo", *got_in, n_c, n_r, ref_c, ref_r, **hyper)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_in[0].grad, want_gc, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got_in[1].grad, want_gr, rtol=1e-5, atol=1e-8)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert m[key].item() == pytest.approx(want_m[key], rel=1e-5, abs=1e-6), key


@pytest.mark.numerical
@pytest.mark.parametrize("hyper", HYPER["simpo"])
def test_simpo_equals_trl_cpo_trainer(trl, hyper):
    from trl.experimental.cpo import CPOTrainer
    c, r, n_c, n_r, _, _ = (t.float() for t in logps(5))
    stand_in = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=hyper["gamma"], beta=hyper["beta"],
                               label_smoothing=0.0, accelerator=accelerator())
    want_in = [(c / n_c).requires_grad_(), (r / n_r).requires_grad_()]      # CPOTrainer's SimPO averages
    losses, want_c, want_r = CPOTrainer.cpo_loss(stand_in, *want_in)
    losses.mean().backward()
    got_in = [c.clone().requires_grad_(), r.clone().requires_grad_()]
    got, m = ours("simpo", *got_in, n_c, n_r, None, None, **hyper)
    got.backward()
    assert got.item() == pytest.approx(losses.mean().item(), rel=1e-6)
    torch.testing.assert_close(got_in[0].grad, want_in[0].grad / n_c)     # through the average
    torch.testing.assert_close(got_in[1].grad, want_in[1].grad / n_r)
    assert m["rewards/chosen"].item() == pytest.approx(want_c.mean().item(), rel=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(want_r.mean().item(), rel=1e-6)
    assert m["rewards/accuracies"].item() == (want_c > want_r).float().mean().item()


@pytest.mark.numerical
@pytest.mark.parametrize("hyper", HYPER["orpo"])
def test_orpo_equals_trl_orpo_trainer(trl, hyper):
    from trl.experimental.orpo import ORPOTrainer
    c, r, n_c, n_r, _, _ = (t.float() for t in logps(6))
    stand_in = SimpleNamespace(beta=hyper["lam"], accelerator=accelerator())
    want_in = [(c / n_c).requires_grad_(), (r / n_r).requires_grad_()]      # ORPO's mean token log-probs
    losses, want_c, want_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stand_in, *want_in)
    # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean(), the NLL a token mean
    nll = -(want_in[0] * n_c).sum() / n_c.sum()
    want = nll - losses.mean()
    want.backward()
    got_in = [c.clone().requires_grad_(), r.clone().requires_grad_()]
    got, m = ours("orpo", *got_in, n_c, n_r, None, None, **hyper)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_in[0].grad, want_in[0].grad / n_c)
    torch.testing.assert_close(got_in[1].grad, want_in[1].grad / n_r)
    assert m["log_odds_ratio"].item() == pytest.approx(ratio.item(), rel=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(log_odds.item(), rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(want_c.mean().item(), rel=1e-6)
    assert m["rewards/margins"].item() == pytest.approx((want_c - want_r).mean().item(), rel=1e-6, abs=1e-7)

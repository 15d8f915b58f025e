"""ORPO (Hong et al. 2024): NLL(chosen) + lambda * -log sigmoid(log odds_c - log odds_r), odds(y) =
P/(1-P), P = exp(mean token log-prob of y); no reference. As TRL's ORPOTrainer: the NLL is the mean
over every chosen token of the batch, the rewards lambda * mean token log-prob (its "beta" is lambda)."""
import math

import torch
import torch.nn.functional as F

from .dpo import reward_metrics


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x))
    below -ln 2. x is kept below 0 by the smallest normal number, so a reply whose mean log-prob rounds
    to 0 gives a large finite log-odds rather than infinity."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near = x > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def loss(pair, lam=0.1):
    chosen = pair.chosen / pair.n_chosen.clamp(min=1)
    rejected = pair.rejected / pair.n_rejected.clamp(min=1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -pair.chosen.sum() / pair.n_chosen.sum().clamp(min=1)
    total = nll - lam * ratio.mean()
    metrics = reward_metrics(lam * chosen, lam * rejected, pair, chosen, rejected)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()})
    return total, metrics

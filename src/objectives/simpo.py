"""SimPO (Meng et al. 2024): -log sigmoid(beta logp_c/|c| - beta logp_r/|r| - gamma), no reference;
TRL's CPOTrainer with loss_type "simpo" (its simpo_gamma is this gamma; rewards beta * logp/|y|)."""
import torch.nn.functional as F

from .dpo import reward_metrics


def loss(pair, beta=2.0, gamma=1.0):
    chosen = pair.chosen / pair.n_chosen.clamp(min=1)       # the mean token log-prob of each reply
    rejected = pair.rejected / pair.n_rejected.clamp(min=1)
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses.mean(), reward_metrics(chosen_rewards, rejected_rewards, pair, chosen, rejected)

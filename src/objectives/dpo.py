"""DPO (Rafailov et al. 2023): -log sigmoid(beta ((logp_c - ref_c) - (logp_r - ref_r))), logp summed
over the reply's tokens; TRL's DPOTrainer (loss_type "sigmoid"). sft_weight > 0 adds the NLL of the
chosen reply, per token over the batch (TRL's rpo_alpha)."""
import torch.nn.functional as F


def loss(pair, beta=0.1, sft_weight=0.0):
    chosen_rewards = beta * (pair.chosen - pair.ref_chosen)
    rejected_rewards = beta * (pair.rejected - pair.ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    total = losses.mean()
    metrics = reward_metrics(chosen_rewards, rejected_rewards, pair)
    if sft_weight:
        nll = -pair.chosen.sum() / pair.n_chosen.sum().clamp(min=1)
        total = total + sft_weight * nll
        metrics["nll_loss"] = nll.detach()
    return total, metrics


def reward_metrics(chosen_rewards, rejected_rewards, pair, chosen=None, rejected=None):
    """TRL's metrics: the rewards' means, the fraction of pairs whose chosen reward is higher, the mean
    margin, and the log-probs the loss used (summed by default)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
            "rewards/accuracies": (c > r).float().mean(), "rewards/margins": (c - r).mean(),
            "logps/chosen": (pair.chosen if chosen is None else chosen).detach().mean(),
            "logps/rejected": (pair.rejected if rejected is None else rejected).detach().mean()}

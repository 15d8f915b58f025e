"""Preference objectives, one module per method, one interface: each `loss(pair, **hyper)` is a pure
function of a PairLogps (summed reply log-probs and their token counts, per pair) and returns
(loss, metrics), the loss the batch mean, the metrics named as HF TRL's trainers name them
(rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected...).
train.py --objective picks one by name from OBJECTIVES."""
from dataclasses import dataclass
from typing import Optional

import torch

from . import dpo, orpo, simpo


@dataclass
class PairLogps:
    """Per pair [B]: the reply's summed token log-probs under the model being trained (chosen, rejected),
    the reply's learnt token count |y|, and for DPO the same sums under the reference model."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor
    ref_chosen: Optional[torch.Tensor] = None
    ref_rejected: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Objective:
    loss: callable
    needs_reference: bool      # DPO's log-ratio needs the starting model's log-probs
    beta_default: float        # --pref_beta's default (ORPO has no beta: its lambda is --orpo_lambda)


OBJECTIVES = {
    "dpo": Objective(dpo.loss, True, 0.1),      # TRL's DPOConfig beta
    "simpo": Objective(simpo.loss, False, 2.0),   # the SimPO paper's beta of about 2 to 2.5
    "orpo": Objective(orpo.loss, False, 0.0),
}

__all__ = ["OBJECTIVES", "Objective", "PairLogps"]

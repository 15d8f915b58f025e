"""The training loss: token cross-entropy over the unmasked positions, with RWKV's L2Wrap."""
import torch
import torch.nn.functional as F


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in the backward pass it adds max_logit * 1e-4 / n_tokens to the
    gradient at each position's arg-max logit, which keeps logits from drifting upwards."""

    @staticmethod
    def forward(ctx, loss, logits, n_tokens):
        ctx.save_for_backward(logits)
        ctx.n_tokens = n_tokens
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        top, index = logits.max(dim=-1, keepdim=True)
        glogits = torch.zeros_like(logits).scatter_(-1, index, top * (1e-4 / ctx.n_tokens))
        return grad_output, glogits, None


def masked_lm_loss(logits, targets, mask):
    """Mean cross-entropy over positions where mask is 1 (all positions when mask is None)."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        loss = losses.mean()
    else:
        mask = mask.flatten().to(losses.dtype)
        loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    return L2Wrap.apply(loss, logits, targets.numel())

"""The head and the training loss fused, token block by token block: the [T, vocab] logits of a
whole sample never exist, only those of one block at a time.

With rows=True it returns each row's sum instead of the total ([B] for x [B, T, C]), whose
gradient may differ row to row: the preference objectives' per-reply log-probs (negated) come
from it, at the cost of the SFT loss (one head product forward, one backward).

loss = sum over unmasked positions of cross_entropy(x W^T, target) / denom, with RWKV's L2Wrap
(see src/training/loss.py, the plain form this equals): in the backward pass only, each
position's arg-max logit gets max_logit * 1e-4 / n_tokens more gradient, unscaled by the loss's
own upstream gradient, exactly as L2Wrap does.

The forward pass computes the loss and, block by block, its gradient with respect to x (and W,
when W trains), so nothing is recomputed: the backward pass only scales what was kept.
What is kept: dL/dx ([tokens, C], in the compute dtype), and for a trained W its gradient.
"""
import torch

# Tokens per block: the block's logits (and their fp32 copy) stay near 2**23 elements (32 MB
# in fp32) whatever the vocabulary.
BLOCK_ELEMENTS = 1 << 23


def _mm(a, b):
    """a @ b. The CPU's half-precision gemm is tens of times slower for this layout (b row-major,
    a long inner dimension) than for the transposed product, which gives the same values."""
    if a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16):
        return (b.t() @ a.t().contiguous()).t()
    return a @ b


def _compute_dtype(x):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, mask, n_tokens, denom, sink, rows):
        shape, n, c = x.shape, x.shape[:-1].numel(), x.shape[-1]
        dtype = _compute_dtype(x)
        acc = torch.promote_types(dtype, torch.float32)          # fp32 math, fp64 for fp64 inputs
        x2, w = x.reshape(n, c), weight.to(dtype)
        targets = targets.reshape(n)
        scale = (mask.reshape(n).to(acc) if mask is not None else torch.ones(n, dtype=acc, device=x.device)) / denom
        want_w = ctx.needs_input_grad[1]
        gx = torch.empty(n, c, dtype=dtype, device=x.device)
        l2_index = torch.empty(n, dtype=torch.long, device=x.device)
        l2_value = torch.empty(n, dtype=dtype, device=x.device)
        if want_w and "ce" not in sink:
            sink["ce"] = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            sink["l2"] = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        losses = torch.empty(n, dtype=acc, device=x.device)
        block = max(1, BLOCK_ELEMENTS // weight.shape[0])
        for s in range(0, n, block):
            e = min(n, s + block)
            xb, tb, sb = x2[s:e].to(dtype), targets[s:e], scale[s:e]
            logits = xb @ w.t()
            top, index = logits.max(dim=-1)                     # L2Wrap reads the logits as computed
            l2_index[s:e], l2_value[s:e] = index, top * (1e-4 / n_tokens)
            p = logits.to(acc)                                   # a copy unless already fp32 (or fp64)
            lse = torch.logsumexp(p, dim=-1)
            losses[s:e] = (lse - p.gather(1, tb[:, None]).squeeze(1)) * sb
            p.sub_(lse[:, None]).exp_()                          # softmax, in place (logits are done with)
            p[torch.arange(e - s, device=x.device), tb] -= 1.0   # softmax - onehot
            g = p.mul_(sb[:, None]).to(dtype)                    # d(loss)/d(logits)
            gx[s:e] = _mm(g, w)
            if want_w:
                sink["ce"] += (g.t() @ xb).to(acc)
                sink["l2"].index_add_(0, l2_index[s:e], (l2_value[s:e, None] * xb).to(acc))
        ctx.save_for_backward(gx, weight, l2_index, l2_value)
        ctx.shape, ctx.x_dtype, ctx.sink = shape, x.dtype, sink
        return losses.view(shape[:-1]).sum(-1) if rows else losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        gx, weight, l2_index, l2_value = ctx.saved_tensors
        if grad_loss.dim() > 0:     # rows=True: each token takes its row's gradient
            grad_loss = grad_loss.unsqueeze(-1).expand(ctx.shape[:-1]).reshape(-1, 1).to(gx.dtype)
        gx = gx * grad_loss + l2_value[:, None] * weight[l2_index].to(gx.dtype)
        gw = None
        if ctx.needs_input_grad[1] and "ce" in ctx.sink:     # (the total only: rows=True refuses a trained W)
            # Several calls can share one sink (a sample cut into chunks): the first backward
            # returns the whole sum, the others nothing, so W's gradient is held once, not per call.
            gw = (ctx.sink.pop("ce") * grad_loss + ctx.sink.pop("l2")).to(weight.dtype)
        return gx.to(ctx.x_dtype).view(ctx.shape), gw, None, None, None, None, None, None


def head_loss(x, weight, targets, mask=None, n_tokens=None, denom=None, sink=None, rows=False):
    """sum of masked cross-entropy of x @ weight^T against targets, / denom, with L2Wrap.
    rows=True: each row's sum ([B] for x [B, T, C]) instead, for a frozen weight only.

    x [..., C]; weight [V, C]; targets [...] ids; mask [...] (1: learn this target) or None.
    n_tokens (L2Wrap's divisor) defaults to targets.numel(), denom to the number of unmasked
    targets (at least 1). A sample cut into pieces passes the whole sample's n_tokens and denom
    to each piece, and one `sink` dict shared by the pieces; the sum of the pieces then equals
    (value and gradients) one call on the whole sample.
    """
    if n_tokens is None:
        n_tokens = targets.numel()
    if denom is None:
        denom = mask.sum().clamp(min=1) if mask is not None else targets.numel()
    if rows and weight.requires_grad:
        raise ValueError("head_loss(rows=True) needs a frozen head weight: its gradient is summed over the rows")
    return _HeadLoss.apply(x, weight, targets, mask, n_tokens, denom, {} if sink is None else sink, rows)

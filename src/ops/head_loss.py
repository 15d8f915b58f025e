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

# Tokens per block: the block's logits stay near 2**24 elements (64 MB in fp32) whatever the
# vocabulary. At a 65536 vocabulary (2-core EPYC, fp32) the step's head runs 1.1x faster than with
# 2**23 and 1.3x than with 2**22; 2**25 gains nothing more.
BLOCK_ELEMENTS = 1 << 24


def _column_max(a, group=128):
    """a.max(dim=0) of a [V, n] tensor, the first maximal index as torch's: the maxima of groups of
    rows, then the maximum of those. torch's arg-max down a column is several times slower."""
    while a.shape[0] % group:
        group //= 2
    top, index = a.view(-1, group, a.shape[1]).max(dim=1)         # [V / group, n]
    top, which = top.max(dim=0)                                  # the first group holding the maximum
    return top, index.gather(0, which[None])[0] + which * group


def _compute_dtype(x):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _softmax_blocks(x2, w, targets, dtype, acc):
    """For each block of the rows of x2 [n, C]: (s, e, the block's x, p, top, index, sumexp, nll) with
    p = exp(logits - top) transposed ([V, tokens], acc dtype), top and index each column's largest
    logit and its index (as computed, in dtype), sumexp p's column sums and nll = -log p(target).

    The logits are held transposed in one buffer reused from block to block: W x^T writes them
    faster than x W^T, and a fresh 64 MB for every block (new pages, out of the cache) costs more
    than the softmax itself. p is that buffer, unless the compute dtype is below fp32."""
    n = x2.shape[0]
    block = max(1, BLOCK_ELEMENTS // w.shape[0])
    buf = torch.empty(w.shape[0] * min(block, n), dtype=dtype, device=x2.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        xb = x2[s:e].to(dtype)
        logits = torch.mm(w, xb.t(), out=buf[:w.shape[0] * (e - s)].view(w.shape[0], e - s))
        top, index = _column_max(logits)
        p, top_acc = logits.to(acc), top.to(acc)
        target_logit = p[targets[s:e], torch.arange(e - s, device=x2.device)]
        sumexp = p.sub_(top_acc).exp_().sum(dim=0)
        yield s, e, xb, p, top, index, sumexp, top_acc + sumexp.log() - target_logit


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
        for s, e, xb, p, top, index, sumexp, nll in _softmax_blocks(x2, w, targets, dtype, acc):
            sb, cols = scale[s:e], torch.arange(e - s, device=x.device)
            l2_index[s:e], l2_value[s:e] = index, top * (1e-4 / n_tokens)   # L2Wrap reads the logits as computed
            losses[s:e] = nll * sb
            p.mul_(sb / sumexp)
            p[targets[s:e], cols] -= sb                          # (softmax - onehot) * scale
            g = p.to(dtype)                                      # d(loss)/d(logits), transposed
            # W^T g, transposed back: the form the CPU's half-precision gemm is also fast at.
            gx[s:e] = torch.mm(w.t(), g).t()
            if want_w:
                sink["ce"] += (g @ xb).to(acc)
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


@torch.no_grad()
def target_logps(x, weight, targets):
    """log p(target) of each row of x [n, C] under the head weight [V, C] (frozen), without
    gradients: the fused head's blocks, no logits kept. In fp32 (float64 for float64 inputs)."""
    dtype = _compute_dtype(x)
    acc = torch.promote_types(dtype, torch.float32)
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for s, e, *_, nll in _softmax_blocks(x, weight.to(dtype), targets, dtype, acc):
        out[s:e] = -nll
    return out

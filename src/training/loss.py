"""The training loss: token cross-entropy over the unmasked positions, with RWKV's L2Wrap."""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..checkpoint import trim_heap
from ..model import Head
from ..ops import head_loss as head_loss_mod


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


def masked_lm_loss(logits, targets, mask, n_tokens=None, denom=None):
    """Mean cross-entropy over positions where mask is 1 (all positions when mask is None), from
    materialised logits: the plain form. A piece of a batch passes the whole batch's n_tokens
    (L2Wrap's divisor) and denom (its number of unmasked targets)."""
    losses = F.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                             targets.flatten(), reduction="none")
    if mask is not None:
        mask = mask.flatten().to(losses.dtype)
        losses = losses * mask
    if denom is None:
        denom = mask.sum().clamp(min=1) if mask is not None else losses.numel()
    return L2Wrap.apply(losses.sum() / denom, logits, targets.numel() if n_tokens is None else n_tokens)


def lm_loss(model, idx, targets, mask=None, chunk_ctx=0):
    """The training loss of an RWKV model (either family) on a batch: equal, value and gradients, to
    masked_lm_loss(model(idx)[0], targets, mask), without ever holding the whole batch's logits.

    chunk_ctx > 0 runs the sample chunk_ctx tokens at a time: each chunk's blocks are recomputed
    in the backward pass (activation memory: one chunk's), and the state (token shifts and the
    fp32 WKV state) passes from chunk to chunk with its gradient, so backpropagation runs through
    the whole sample exactly, not truncated at chunk boundaries. Every chunk's loss is divided by
    the whole batch's number of unmasked targets: a chunk with none adds zero.
    """
    n_tokens = targets.numel()
    denom = mask.sum().clamp(min=1) if mask is not None else n_tokens
    T = idx.shape[1]
    step = chunk_ctx if chunk_ctx > 0 else T
    state, sink, loss = None, {}, 0.0
    for s in range(0, T, step):
        piece = slice(s, min(T, s + step))
        if step < T:
            x, state = checkpoint(model.hidden, idx[:, piece], state, use_reentrant=False)
            if x.device.type == "cpu":
                _trim_between_pieces(state)
        else:
            x, state = model.hidden(idx[:, piece], state)
        m = None if mask is None else mask[:, piece]
        loss = loss + _head_loss(model.head, x, targets[:, piece], m, n_tokens, denom, sink)
    return loss


def _trim_between_pieces(state):
    # glibc keeps the heap pages a piece's temporaries were freed into; handed back after each
    # piece's forward pass and, through a hook on its state's gradient, after its backward pass,
    # the process's resident memory stays that of one piece, as its live tensors do.
    trim_heap()
    if state[0][1].requires_grad:
        state[0][1].register_hook(lambda grad: trim_heap())


def _head_loss(head, x, targets, mask, n_tokens, denom, sink):
    if isinstance(head, Head):
        return head(x, targets, mask=mask, n_tokens=n_tokens, denom=denom, sink=sink)
    # Another head (an adapter layer, or one held quantized): the plain loss, a block of tokens
    # at a time, each block's logits recomputed in the backward pass, so that no more than one
    # block's logits exist at once either.
    block = max(1, head_loss_mod.BLOCK_ELEMENTS // head.out_features)
    total = 0.0
    for s in range(0, x.shape[1], block):
        b = slice(s, s + block)
        total = total + checkpoint(_plain_piece_loss, head, x[:, b], targets[:, b], None if mask is None else mask[:, b],
                                   n_tokens, denom, use_reentrant=False)
    return total


def _plain_piece_loss(head, x, targets, mask, n_tokens, denom):
    return masked_lm_loss(head(x), targets, mask, n_tokens, denom)


def sequence_logps(model, idx, targets, mask, chunk_ctx=0, state=None):
    """[rows] each row's sum of log p(target) over its unmasked targets (the preference objectives'
    logp of a reply), with the same pieces as lm_loss: chunk_ctx > 0 runs the rows chunk_ctx tokens
    at a time with exact gradients, and the logits exist a block of tokens at a time. L2Wrap acts on
    every position's logits as in lm_loss, its divisor the batch's token count: it is the same nudge
    on the largest logit, whatever the objective. Without gradients (the reference pass) only the
    learnt targets' logits are computed. state: the model state the rows start from (None: a
    sequence's start)."""
    n_tokens = targets.numel()
    T = idx.shape[1]
    step = chunk_ctx if chunk_ctx > 0 else T
    grad = torch.is_grad_enabled()
    total = 0.0
    for s in range(0, T, step):
        piece = slice(s, min(T, s + step))
        if step < T and grad:
            x, state = checkpoint(model.hidden, idx[:, piece], state, use_reentrant=False)
            if x.device.type == "cpu":
                _trim_between_pieces(state)
        else:
            x, state = model.hidden(idx[:, piece], state)
        args = (model.head, x, targets[:, piece], mask[:, piece])
        total = total + (_piece_logps(*args, n_tokens) if grad else _learnt_logps(*args))
    return total


@torch.no_grad()
def reference_pair_logps(model, idx, targets, mask, chunk_ctx=0):
    """sequence_logps without gradients for rows in pairs (rows 2i, 2i + 1: chosen, rejected): each
    pair's shared start (its prompt: the same tokens, nothing learnt) runs once, and its state
    carries into both rows' rest. The same sums as sequence_logps, for about 3/4 of the tokens."""
    sums = []
    for i in range(0, idx.shape[0], 2):
        pair = slice(i, i + 2)
        apart = (idx[i] != idx[i + 1]) | (mask[pair] != 0).any(0)
        n = int(apart.nonzero()[0]) if apart.any() else idx.shape[1] - 1
        state, step = None, chunk_ctx if chunk_ctx > 0 else max(n, 1)
        for s in range(0, n, step):
            _, state = model.hidden(idx[i:i + 1, s:min(n, s + step)], state)
        if state is not None:
            state = [tuple(t.expand(2, *t.shape[1:]).contiguous() for t in layer) for layer in state]
        sums.append(sequence_logps(model, idx[pair, n:], targets[pair, n:], mask[pair, n:], chunk_ctx, state))
    return torch.cat(sums)


def _piece_logps(head, x, targets, mask, n_tokens):
    if isinstance(head, Head) and not head.weight.requires_grad:
        # The fused head (ops/head_loss.py): per-row cross-entropy sums, negated.
        return -head(x, targets, mask=mask, n_tokens=n_tokens, denom=1, rows=True)
    # Another head, or a trained one: the plain form, a block of tokens at a time, each block's
    # logits recomputed in the backward pass.
    block = max(1, head_loss_mod.BLOCK_ELEMENTS // head.out_features)
    total = 0.0
    for s in range(0, x.shape[1], block):
        b = slice(s, s + block)
        total = total + checkpoint(_plain_piece_logps, head, x[:, b], targets[:, b], mask[:, b], n_tokens,
                                   use_reentrant=False)
    return total


def _plain_piece_logps(head, x, targets, mask, n_tokens):
    logits = head(x)
    logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    sums = (logps.gather(-1, targets[..., None]).squeeze(-1) * mask.to(logps.dtype)).sum(1)
    return L2Wrap.apply(sums, logits, n_tokens)


def _learnt_logps(head, x, targets, mask):
    """Without gradients: the log-probs of the unmasked positions only (the fused head's blocks for
    the model's own head, else the head's logits a block at a time)."""
    rows, cols = mask.nonzero(as_tuple=True)
    sums = torch.zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if isinstance(head, Head):
        return sums.index_add_(0, rows, head(x[rows, cols], targets[rows, cols], logps=True).to(sums.dtype))
    block = max(1, head_loss_mod.BLOCK_ELEMENTS // head.out_features)
    for s in range(0, rows.numel(), block):
        r, c = rows[s:s + block], cols[s:s + block]
        logits = head(x[r, c])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[r, c, None]).squeeze(-1)   # (faster than logsumexp here)
        sums.index_add_(0, r, logps.to(sums.dtype))
    return sums

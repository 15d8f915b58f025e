"""Chunked WKV6 for the CPU: the recurrence as batched tensor products within chunks.

Within a chunk of L steps, with lw = -exp(w) the log decay, c the inclusive cumulative
sum of lw inside the chunk and p the exclusive one (p_t = c_{t-1}, p_0 = 0):

    y_t   = sum_{s<t} A[t, s] v_s  +  b_t v_t  +  (r_t * exp(p_t)) @ S_start
    A[t, s] = sum_j r_t[j] k_s[j] exp(p_t[j] - c_s[j])        b_t = sum_j r_t[j] u[j] k_t[j]
    S_end = exp(c_last)[:, None] * S_start + (k * exp(c_last - c))^T @ v

A is computed in one of two ways. Where no step decays by more than e^-1 (w <= 0 everywhere,
as the official initialisation and most channels are), as exp(p_t) exp(-c_s): A is then one
[L, N] x [N, L] product per chunk. Otherwise each pair's exponent (<= 0) is summed on its own
through an [L, L, N] tensor, which never overflows for any decay and keeps the w gradient
exact to fp32 rounding: the factored form's w gradient subtracts the terms of the pairs that do
not span a step, and that cancellation grows with the decay (FACTOR_DECAY_LIMIT). The
cumulative sums are taken in float64 so that their differences keep fp32 precision when the
sums are large (strong decay). The backward pass is written out by hand: autograd over the
same steps is about 3x slower and keeps several L x L x N temporaries alive.
"""
import torch

from .chunks import FACTOR_LIMIT, to_chunks, unchunk

# The largest per-step decay -lw = e^w for the factored pair products. Their w gradient's error,
# measured against the float64 reference (tests/test_wkv6_cpu.py), grows with it and with the
# chunk: at most 0.6x the tests' bound (3x a plain fp32 loop's error) up to e^0 = 1 in chunks of
# 8 or 16 (1.5x in chunks of 32), 1.2x at e^0.5, 2.5x at e^1 (chunks of 8).
FACTOR_DECAY_LIMIT = 1.0
# Steps per chunk, the fastest of 4, 8, 16 (and 32) for each form (T 1024, H 8, N 64, fp32, 2-core
# EPYC): the factored form 25 ms fwd+bwd in chunks of 16 (38 ms in 8s), the per-pair sums
# in chunks of 8, whose [L, L, N] tensors grow with L^2.
FACTORED_CHUNK_LEN, PAIRWISE_CHUNK_LEN = 16, 8


def wkv6_cpu(r, k, v, w, u, state=None, chunk_len=None):
    """Same contract as `src.ops.wkv6.wkv6`: y comes back in r's dtype, the state in fp32.
    chunk_len: steps per chunk, by default the faster one for the form the decays allow."""
    if state is None:
        B, _, H, N = r.shape
        state = torch.zeros(B, H, N, N, device=r.device, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)
    return _ChunkedWKV6.apply(r, k, v, w, u, state, chunk_len)


class _ChunkedWKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u, s0, chunk_len):
        ctx.dtypes = [x.dtype for x in (r, k, v, w, u, s0)]
        # fp32 math for bf16/fp16/fp32 inputs; float64 inputs stay float64 (for gradcheck).
        f = ctx.compute_dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
        T = r.shape[1]
        lw = -torch.exp(w.to(f))
        factored = -lw.min() <= FACTOR_DECAY_LIMIT
        L = min(chunk_len or (FACTORED_CHUNK_LEN if factored else PAIRWISE_CHUNK_LEN), T)
        # Padded steps have k = 0 (add nothing) and lw = 0 (decay 1): the state passes through.
        r, k, v, lw = (to_chunks(x, L, f) for x in (r, k, v, lw))
        u = u.to(f)[:, None, :]                                         # broadcasts over [C, B, H, L, N]
        c = torch.cumsum(lw.double(), dim=-2)
        p = torch.nn.functional.pad(c, (0, 0, 1, 0))[..., :-1, :]
        c_last = c[..., -1:, :]

        from_start = p.exp().to(f)              # decay from the chunk start to just before t
        to_end = (c_last - c).exp().to(f)       # decay from just after s to the chunk end
        chunk_decay = c_last.exp().to(f).transpose(-1, -2)              # [C, B, H, N, 1]
        q = r * from_start
        if factored and c_last.min() >= -FACTOR_LIMIT:
            # e^{p_t - c_s} = e^{p_t} e^{-c_s}: A is one [L, N] x [N, L] product per chunk.
            pair_factor = (-c).exp().to(f)                               # e^{-c_s}, [C, B, H, L, N]
            A = (q @ (k * pair_factor).mT).tril_(-1)
        else:
            pair_factor = _pair_decays(lw)                               # [C, B, H, L(t), L(s), N]
            A = (pair_factor * r.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)       # [C, B, H, L(t), L(s)]
        b = (r * u * k).sum(-1, keepdim=True)                            # [C, B, H, L, 1]
        kv = (k * to_end).transpose(-1, -2) @ v                           # [C, B, H, N, N]
        states = _scan(kv, chunk_decay, s0.to(f), reverse=False)       # [C + 1, B, H, N, N]
        # The final state as a copy: a view would keep every chunk's state alive with it (a
        # sample run in pieces holds each piece's final state until its backward pass).
        starts, s = states[:-1], states[-1].clone()

        y = A @ v + b * v + q @ starts
        ctx.save_for_backward(r, k, v, lw, u, pair_factor, A, b, from_start, to_end, chunk_decay, starts)
        return unchunk(y, T, ctx.dtypes[0]), s

    @staticmethod
    def backward(ctx, gy, gs_end):
        r, k, v, lw, u, pair_factor, A, b, from_start, to_end, chunk_decay, starts = ctx.saved_tensors
        T, L = gy.shape[1], r.shape[3]
        gy = to_chunks(gy, L, ctx.compute_dtype)
        q, k_end = r * from_start, k * to_end

        # State gradient back through the chunks: gs_next[i] = dLoss/dS at the end of chunk i.
        gs_end = torch.zeros_like(starts[0]) if gs_end is None else gs_end.to(ctx.compute_dtype)
        g_states = _scan(q.transpose(-1, -2) @ gy, chunk_decay, gs_end, reverse=True)
        gs, gs_next = g_states[0], g_states[1:]

        gA = (gy @ v.transpose(-1, -2)).tril_(-1)
        gb = (gy * v).sum(-1, keepdim=True)
        gq = gy @ starts.transpose(-1, -2)
        gk_end = v @ gs_next.transpose(-1, -2)
        gv = A.transpose(-1, -2) @ gy + b * gy + k_end @ gs_next

        # dLoss/dlw[m] gathers each term over exactly the steps m its exponent spans:
        #   A[t, s]: s < m < t      q[t]: m < t      k_end[s]: m > s      chunk decay: every m
        if pair_factor.dim() == r.dim():        # factored: A = q (k e^{-c})^T, c_s spans m <= s
            k_back = k * pair_factor
            gq = gq + gA @ k_back
            g_k_back = gA.transpose(-1, -2) @ q
            gk_A = g_k_back * pair_factor
            g_lw = -(g_k_back * k_back).flip(-2).cumsum(-2).flip(-2)
            gr = gb * u * k + gq * from_start
        else:
            # Summed directly (not as a total minus a cumulative sum) to avoid cancellation.
            g_decay = gA.unsqueeze(-1) * pair_factor                      # [C, B, H, L(t), L(s), N]
            g_decay_r = g_decay * r.unsqueeze(-2)
            gk_A = g_decay_r.sum(-3)
            gr = (g_decay * k.unsqueeze(-3)).sum(-2) + gb * u * k + gq * from_start
            pair_terms = (g_decay_r * k.unsqueeze(-3)).cumsum(-2)         # sum over s' <= s
            pair_terms = torch.nn.functional.pad(pair_terms, (0, 0, 1, 0))[..., :-1, :]
            later = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)[:, :, None]
            g_lw = pair_terms.masked_fill_(~later, 0).sum(-3)
        gk = gk_A + gb * u * r + gk_end * to_end
        gu = (gb * r * k).sum((0, 1, 3))
        g_lw += _exclusive_cumsum((gq * q).flip(-2)).flip(-2)
        g_lw += _exclusive_cumsum(gk_end * k_end)
        g_lw += ((starts * gs_next).sum(-1, keepdim=True) * chunk_decay).transpose(-1, -2)
        gw = g_lw * lw

        dt = ctx.dtypes
        grads = [unchunk(g, T, d) for g, d in zip((gr, gk, gv, gw), dt[:4])]
        return (*grads, gu.to(dt[4]), gs.to(dt[5]), None)



def _pair_decays(lw):
    """[..., L(t), L(s), N]: exp(sum of lw over s < m < t) for s < t, else 0. Summing each pair's
    own terms (a cumsum over t that starts at zero past s) keeps the rounding relative to that
    pair's sum, not to the large running sum when decay is strong."""
    L = lw.shape[-2]
    ones = torch.ones(L, L, dtype=torch.bool, device=lw.device)
    causal, spans_a_step = ones.tril(-1)[:, :, None], ones.tril(-2)[:, :, None]   # s < t, s < t - 1
    lw_prev = torch.nn.functional.pad(lw, (0, 0, 1, 0))[..., :-1, :]              # lw[t - 1]
    return torch.where(spans_a_step, lw_prev.unsqueeze(-2), 0.0).cumsum_(-3).exp_().mul_(causal)


def _exclusive_cumsum(x):
    """Sum over the earlier steps of a chunk (dim -2), not including the step itself."""
    return torch.nn.functional.pad(x.cumsum(-2), (0, 0, 1, 0))[..., :-1, :]


def _scan(increments, decay, first, reverse):
    """The chunk-level recurrence x_{i+1} = decay_i * x_i + increments_i, run forward, or
    backward (x_i = decay_i * x_{i+1} + increments_i). Returns all C + 1 values along dim 0."""
    C = increments.shape[0]
    out = increments.new_empty(C + 1, *increments.shape[1:])
    src, dst = (1, 0) if reverse else (0, 1)
    out[C if reverse else 0] = first
    for i in (range(C - 1, -1, -1) if reverse else range(C)):
        torch.addcmul(increments[i], decay[i], out[i + src], out=out[i + dst])
    return out

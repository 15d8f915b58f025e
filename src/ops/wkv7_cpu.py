"""Chunked WKV7 for the CPU: the recurrence as batched tensor products within chunks of L steps,
with a short loop carrying the state from chunk to chunk; both backward passes written out.

The step is S_t = S_{t-1} (D_t + a_t b_t^T) + v_t k_t^T, y_t = S_t r_t (wkv7_reference.py). With
c the inclusive cumulative sum of the log decays lw = -exp(w) inside a chunk, p the exclusive
one, S_0 the chunk's starting state and u_t = S_{t-1} a_t (what the state holds along a_t):

    u_t = S_0 (a_t e^{p_t}) + sum_{s<t} A_ab[t, s] u_s + A_ak[t, s] v_s
          A_xy[t, s] = sum_j x_t[j] y_s[j] e^{p_t[j] - c_s[j]}          (s < t)
    so U = W S_0^T + U',  W = (I - A_ab)^-1 (a e^p),  U' = (I - A_ab)^-1 A_ak V
          ((I - A_ab)^-1: A_ab is strictly lower triangular, so it is (I + A_ab)(I + A_ab^2)(I + A_ab^4)(I + A_ab^8))
    y_t = S_0 (r_t e^{c_t}) + sum_{s<=t} B_rb[t, s] u_s + B_rk[t, s] v_s   (B: e^{c_t - c_s}, s <= t)
        = Q S_0^T + B_rb U' + B_rk V,   Q = r e^c + B_rb W
    S_end = S_0 M + E,   M = diag(e^{c_L}) + W^T (b e^{c_L - c}),   E = U'^T (b e^{c_L - c}) + V^T (k e^{c_L - c})

Everything but the scan S_{i+1} = S_i M_i + E_i is computed for all chunks at once, and M_i is
never formed: S M = S diag(e^{c_L}) + (S W^T) B_end, two thin products instead of an N x N one.
The four pair matrices are the blocks of one [2L, 2L] matrix P = [[A_ab, A_ak], [B_rb, B_rk]].
Every exponent e^{p_t - c_s} is a sum of log decays (<= 0); it is computed as e^{p_t} e^{-c_s}, so
that P is one [2L, N] x [N, 2L] product, X Y^T with X = [a e^p; r e^c], Y = [b e^-c; k e^-c]
(_FactoredTerms, its backward written out and its forward recomputed there, so that only the
model's own inputs are kept). Where a chunk decays by more than FACTOR_LIMIT, e^{-c_s} could
overflow: there each pair is summed from its own exponent through an [L, L, N] tensor, and
autograd differentiates it (_pairwise_terms, recomputed in the backward pass by checkpoint).
The state comes in and goes out with its gradient, so a sample run in pieces (--chunk_ctx) is
exact. The scan's backward is written out too (_StateScan).
"""
import torch
from torch.utils.checkpoint import checkpoint

from .chunks import FACTOR_LIMIT, from_chunks, to_chunks, unchunk

DEFAULT_CHUNK_LEN = 16
# FACTOR_LIMIT (chunks.py): the model's decays (w <= -0.5, so -lw <= 0.61) reach at most 16 * 0.61 = 9.7.


def wkv7_cpu(r, w, k, v, a, b, state=None, chunk_len=DEFAULT_CHUNK_LEN):
    """Same contract as `src.ops.wkv7.wkv7`: y comes back in r's dtype, the state in fp32
    (float64 inputs stay float64 throughout)."""
    B, T, H, N = r.shape
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    W, B_end, decay, E, Q, y_inside = _chunk_terms(r, w, k, v, a, b, min(chunk_len, T))
    S = torch.zeros(B, H, N, N, dtype=f, device=r.device) if state is None else state.to(f)
    starts, S = _StateScan.apply(W, B_end, decay, E, S)
    y = torch.baddbmm(y_inside.flatten(0, 2), Q.flatten(0, 2), starts.flatten(0, 2).mT)
    return from_chunks(y.view(Q.shape), T, r.dtype), S


def _chunk_terms(r, w, k, v, a, b, L):
    """Per chunk: what the state scan needs (W, B_end, the decay e^{c_L}, E), Q and the chunk's own
    part of y (see the module doc)."""
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    with torch.no_grad():      # the largest decay of a chunk, -c_L, over chunks and channels: L e^{max w} bounds it
        factored = L * w.max().to(f).exp() <= FACTOR_LIMIT or to_chunks(w.to(f).exp(), L, f).sum(-2).max() <= FACTOR_LIMIT
    if factored:
        return _FactoredTerms.apply(r, w, k, v, a, b, L)
    return checkpoint(_pairwise_terms, r, w, k, v, a, b, L, use_reentrant=False)


def _solve(P, a_p, V, W=None):
    """From the pair matrices P (module doc): (I - A_ab)^-1, W (written into W when given) and [U'; V]."""
    L = V.shape[-2]
    inverse = _unit_lower_inverse(P[..., :L, :L])
    return inverse, torch.matmul(inverse, a_p, out=W), torch.cat([inverse @ (P[..., :L, L:] @ V), V], -2)


def _outputs(P, r_c, W, UV, out=(None, None)):
    """Q = r e^c + B_rb W and the chunk's own part of y, [B_rb | B_rk] [U'; V] (written into `out` when given)."""
    L = W.shape[-2]
    return torch.add(r_c, P[..., L:, :L] @ W, out=out[0]), torch.matmul(P[..., L:, :], UV, out=out[1])


def _factored_parts(r, w, k, v, a, b, L):
    """X = [a e^p; r e^c] and Y = [b e^-c; k e^-c] ([C, B, H, 2L, N]), V, c and lw, in chunks."""
    B, T, H, N = r.shape
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    X = r.new_empty(-(-T // L), B, H, 2 * L, N, dtype=f)
    Y = torch.empty_like(X)
    for x, into in ((a, X[..., :L, :]), (r, X[..., L:, :]), (b, Y[..., :L, :]), (k, Y[..., L:, :])):
        to_chunks(x, L, f, out=into)
    lw = to_chunks(w, L, f).exp_().neg_()
    if T % L:
        lw[-1, :, :, T % L:] = 0        # padded steps (r = k = v = a = b = 0) decay by 1: the state passes
    c = lw.cumsum(-2)
    X[..., :L, :].mul_(torch.sub(c, lw).exp_())
    X[..., L:, :].mul_(c.exp())
    Y.unflatten(-2, (2, L)).mul_(c.neg().exp_().unsqueeze(-3))
    return X, Y, to_chunks(v, L, f), c, lw


def _pair_mask(L, like):
    """1 where P's blocks keep a pair: s < t in the A rows, s <= t in the B rows."""
    i = torch.arange(L, device=like.device)
    strict, inclusive = (i[None, :] < i[:, None]).repeat(1, 2), (i[None, :] <= i[:, None]).repeat(1, 2)
    return torch.cat([strict, inclusive]).to(like.dtype)


class _FactoredTerms(torch.autograd.Function):
    """_chunk_terms where every chunk's decay is within FACTOR_LIMIT. The backward pass recomputes
    the forward's parts from the inputs and runs its products backwards; autograd over the same steps
    ran the forward twice (checkpoint) and allocated a tensor per elementwise step."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, L):
        B, T, H, N = r.shape
        # The outputs first, the temporaries after: torch allocates with posix_memalign, and glibc
        # cannot reuse a freed block of exactly a tensor's size for another tensor of that size, so
        # temporaries freed between kept tensors stay in the heap. Outputs allocated among the
        # temporaries left ~50 MB more resident at the end of a 6-layer RWKV-7 forward pass.
        W, B_end, Q, y_inside = (r.new_empty(-(-T // L), B, H, L, N, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)
                                 for _ in range(4))
        X, Y, V, c, _ = _factored_parts(r, w, k, v, a, b, L)
        d = c[..., -1:, :].exp()
        P = (X @ Y.mT).mul_(_pair_mask(L, X))
        _, W, UV = _solve(P, X[..., :L, :], V, W)
        torch.mul(Y[..., :L, :], d, out=B_end)
        _outputs(P, X[..., L:, :], W, UV, (Q, y_inside))
        ctx.L = L
        ctx.save_for_backward(r, w, k, v, a, b)
        return W, B_end, d, (UV.mT @ Y).mul_(d), Q, y_inside

    @staticmethod
    def backward(ctx, gW, gB_end, gd, gE, gQ, gy):
        r, w, k, v, a, b = ctx.saved_tensors
        L, T = ctx.L, r.shape[1]
        X, Y, V, c, lw = _factored_parts(r, w, k, v, a, b, L)
        d = c[..., -1:, :].exp()
        mask = _pair_mask(L, X)
        P = (X @ Y.mT).mul_(mask)
        inverse, W, UV = _solve(P, X[..., :L, :], V)
        # E = UV^T (Y d), B_end = (b e^-c) d, y_inside = [B_rb | B_rk] UV, Q = r e^c + B_rb W.
        UV_gE = UV @ gE
        g_UV = P[..., L:, :].mT @ gy + (Y * d) @ gE.mT
        g_W = gW + P[..., L:, :L].mT @ gQ
        # W = inverse (a e^p), U' = inverse (A_ak V): through (I - A_ab)^-1, G = inverse^T dOut.
        G_W, G_U = inverse.mT @ g_W, inverse.mT @ g_UV[..., :L, :]
        g_P = torch.cat([torch.cat([G_W @ W.mT + G_U @ UV[..., :L, :].mT, G_U @ V.mT], -1),
                         torch.cat([gy @ UV[..., :L, :].mT + gQ @ W.mT, gy @ V.mT], -1)], -2).mul_(mask)
        g_V = g_UV[..., L:, :] + P[..., :L, L:].mT @ G_U
        # P = X Y^T
        g_X = g_P @ Y
        g_X[..., :L, :] += G_W
        g_X[..., L:, :] += gQ
        g_Y = (g_P.mT @ X).addcmul_(UV_gE, d)
        g_Y[..., :L, :].addcmul_(gB_end, d)
        g_d = gd + (Y * UV_gE).sum(-2, keepdim=True) + (gB_end * Y[..., :L, :]).sum(-2, keepdim=True)
        # X = [a e^p; r e^c], Y = [b e^-c; k e^-c], p = c - lw, c = cumsum(lw), d = e^{c_L}, lw = -e^w.
        g_p = g_X[..., :L, :] * X[..., :L, :]
        g_c = g_X[..., L:, :] * X[..., L:, :] - (g_Y * Y).unflatten(-2, (2, L)).sum(-3) + g_p
        g_c[..., -1:, :] += g_d * d
        g_lw = g_c.flip(-2).cumsum(-2).flip(-2) - g_p
        g_X[..., :L, :] *= torch.sub(c, lw).exp_()
        g_X[..., L:, :] *= c.exp()
        g_Y.unflatten(-2, (2, L)).mul_(c.neg().exp_().unsqueeze(-3))
        grads = (g_X[..., L:, :], g_lw.mul_(lw), g_Y[..., L:, :], g_V, g_X[..., :L, :], g_Y[..., :L, :])
        return (*(unchunk(g, T, x.dtype) for g, x in zip(grads, (r, w, k, v, a, b))), None)


def _pairwise_terms(r, w, k, v, a, b, L):
    """_chunk_terms for decays past FACTOR_LIMIT, differentiated by autograd."""
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    # Padded steps have r = k = v = a = b = 0 and lw = 0 (decay 1): the state passes through.
    R, K, V, A, Bb = (to_chunks(x, L, f) for x in (r, k, v, a, b))
    lw = to_chunks(-torch.exp(w.to(f)), L, f)
    c = lw.cumsum(-2)
    p = c - lw
    c_last = c[..., -1:, :]
    P = torch.cat([torch.cat([_pairwise(A, Bb, p, c, -1), _pairwise(A, K, p, c, -1)], -1),
                   torch.cat([_pairwise(R, Bb, c, c, 0), _pairwise(R, K, c, c, 0)], -1)], -2)
    _, W, UV = _solve(P, A * p.exp(), V)
    to_end = (c_last - c).exp()
    B_end = Bb * to_end
    return W, B_end, c_last.exp(), UV.mT @ torch.cat([B_end, K * to_end], -2), *_outputs(P, R * c.exp(), W, UV)


def _pairwise(x, y, e_x, c, diagonal):
    """[..., L(t), L(s)]: sum_j x_t[j] y_s[j] e^{e_x[t, j] - c[s, j]} where s - t <= diagonal, else 0,
    through an [L, L, N] tensor; e^{-inf} = 0 where masked, so no inf reaches the gradient either."""
    L = x.shape[-2]
    keep = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(diagonal)[:, :, None]
    exponent = torch.where(keep, e_x.unsqueeze(-2) - c.unsqueeze(-3), -torch.inf)
    return (x.unsqueeze(-2) * y.unsqueeze(-3) * exponent.exp()).sum(-1)


def _unit_lower_inverse(N):
    """(I - N)^-1 for N strictly lower triangular [..., L, L]: the sum of N^k for k < L (N^L = 0), as
    (I + N)(I + N^2)(I + N^4)...: a few batched products, where a batched triangular solve makes one
    small LAPACK call per matrix (slow, and very slow with 2 threads on a busy machine)."""
    T, P, span = torch.eye(N.shape[-1], dtype=N.dtype, device=N.device) + N, N, 2
    while span < N.shape[-1]:
        P = P @ P
        T = T + T @ P
        span *= 2
    return T


def _step(x, i):
    """Chunk i of x [C, B, H, ...] as a batch of matrices [B * H, ...] (a contiguous view)."""
    return x[i].flatten(0, 1)


class _StateScan(torch.autograd.Function):
    """S_{i+1} = S_i diag(d_i) + (S_i W_i^T) B_end_i + E_i over the chunks i: the only sequential part.
    Returns every chunk's starting state [C, B, H, N, N] and the final state. Written out by hand so
    that the states are kept once (autograd's own loop kept each step's inputs and made every
    chunk's gradient a separate tensor); each step writes its result in place, three calls a chunk."""

    @staticmethod
    def forward(ctx, W, B_end, d, E, S):
        C, B, H, N, _ = E.shape
        states = E.new_empty(C + 1, B, H, N, N)
        states[0] = S
        X = E.new_empty(B * H, N, W.shape[-2])
        for i in range(C):
            S_i = _step(states, i)
            torch.bmm(S_i, _step(W, i).mT, out=X)
            torch.addcmul(_step(E, i), S_i, _step(d, i), out=_step(states, i + 1)).baddbmm_(X, _step(B_end, i))
        starts = states[:C]
        ctx.save_for_backward(W, B_end, d, starts)
        # The final state as a copy: a view would keep every chunk's state alive with it.
        return starts, states[C].clone()

    @staticmethod
    def backward(ctx, g_starts, g_S):
        W, B_end, d, starts = ctx.saved_tensors
        C, B, H, N, _ = starts.shape
        g_E = torch.empty_like(starts)          # chunk i: dLoss/dS_{i+1}, which is also dLoss/dE_i
        g_E[C - 1] = g_S
        g_S0 = torch.empty_like(g_E[0])
        g_X = g_E.new_empty(C, B, H, N, W.shape[-2])   # dLoss/d(S_i W_i^T) = G_{i+1} B_end_i^T
        for i in range(C - 1, -1, -1):
            G = _step(g_E, i)
            torch.bmm(G, _step(B_end, i).mT, out=_step(g_X, i))
            torch.addcmul(_step(g_starts, i), G, _step(d, i), out=_step(g_E, i - 1) if i else g_S0.flatten(0, 1)).baddbmm_(_step(g_X, i), _step(W, i))
        return g_X.mT @ starts, (starts @ W.mT).mT @ g_E, (g_E * starts).sum(-2, keepdim=True), g_E, g_S0

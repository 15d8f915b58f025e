"""Chunked WKV7 for the CPU: the recurrence as batched tensor products within chunks of L steps,
with a short loop carrying the state from chunk to chunk (its backward written out, the rest autograd's).

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
Every exponent e^{p_t - c_s} is a sum of log decays (<= 0); it is computed as e^{p_t} e^{-c_s}, so
that each pair matrix is one [L, N] x [N, L] product, unless a chunk decays by more than
FACTOR_LIMIT, where e^{-c_s} could overflow: then each pair is summed from its own exponent
through an [L, L, N] tensor. The state comes in and goes out with its gradient, so a sample run in
pieces (--chunk_ctx) is exact. The chunk terms are recomputed in the backward pass (checkpoint),
and the scan's backward is written out (_StateScan), so only the inputs, the scan's per-chunk
terms and the chunk states are kept.
"""
import torch
from torch.utils.checkpoint import checkpoint

from .chunks import FACTOR_LIMIT, from_chunks, to_chunks

DEFAULT_CHUNK_LEN = 16
# FACTOR_LIMIT (chunks.py): the model's decays (w <= -0.5, so -lw <= 0.61) reach at most 16 * 0.61 = 9.7.


def wkv7_cpu(r, w, k, v, a, b, state=None, chunk_len=DEFAULT_CHUNK_LEN):
    """Same contract as `src.ops.wkv7.wkv7`: y comes back in r's dtype, the state in fp32
    (float64 inputs stay float64 throughout)."""
    B, T, H, N = r.shape
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    # Recomputed in the backward pass rather than kept: autograd would hold a dozen per-chunk
    # tensors per layer. The inputs kept are the model's own tensors (the chunked copies are not).
    W, B_end, decay, E, Q, y_inside = checkpoint(_chunk_terms, r, w, k, v, a, b, min(chunk_len, T), use_reentrant=False)
    S = torch.zeros(B, H, N, N, dtype=f, device=r.device) if state is None else state.to(f)
    starts, S = _StateScan.apply(W, B_end, decay, E, S)
    return from_chunks(Q @ starts.mT + y_inside, T, r.dtype), S


def _chunk_terms(r, w, k, v, a, b, L):
    """Per chunk: what the state scan needs (W, B_end, the decay e^{c_L}, E), Q and the chunk's own
    part of y (see the module doc)."""
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    # Padded steps have r = k = v = a = b = 0 and lw = 0 (decay 1): the state passes through.
    R, K, V, A, Bb = (to_chunks(x, L, f) for x in (r, k, v, a, b))
    lw = to_chunks(-torch.exp(w.to(f)), L, f)
    c = lw.cumsum(-2)
    p = c - lw
    c_last = c[..., -1:, :]
    a_p, r_c = A * p.exp(), R * c.exp()
    if c_last.min() >= -FACTOR_LIMIT:
        # e^{p_t - c_s} = e^{p_t} e^{-c_s}: each pair matrix is one [L, N] x [N, L] product.
        b_c, k_c = Bb * (-c).exp(), K * (-c).exp()
        pairs = ((x @ y.mT).tril(d) for x, y, d in ((a_p, b_c, -1), (a_p, k_c, -1), (r_c, b_c, 0), (r_c, k_c, 0)))
    else:
        pairs = (_pairwise(x, y, e, c, d) for x, y, e, d in ((A, Bb, p, -1), (A, K, p, -1), (R, Bb, c, 0), (R, K, c, 0)))
    A_ab, A_ak, B_rb, B_rk = pairs      # A_*: s < t, exponent p_t - c_s;  B_*: s <= t, c_t - c_s
    inverse = _unit_lower_inverse(A_ab)
    W, U = inverse @ a_p, inverse @ (A_ak @ V)
    to_end = (c_last - c).exp()
    B_end = Bb * to_end
    E = torch.cat([U, V], -2).mT @ torch.cat([B_end, K * to_end], -2)     # U^T B_end + V^T K_end in one product
    return W, B_end, c_last.exp(), E, r_c + B_rb @ W, B_rb @ U + B_rk @ V


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
    """Chunk i of x [B, H, C, ...] as a batch of matrices [B * H, ...] (a view)."""
    return x[:, :, i].flatten(0, 1)


class _StateScan(torch.autograd.Function):
    """S_{i+1} = S_i diag(d_i) + (S_i W_i^T) B_end_i + E_i over the chunks i: the only sequential part.
    Returns every chunk's starting state [B, H, C, N, N] and the final state. Written out by hand so
    that the states are kept once (autograd's own loop kept each step's inputs and made every
    chunk's gradient a separate tensor) and the backward loop is two products per chunk."""

    @staticmethod
    def forward(ctx, W, B_end, d, E, S):
        B, H, C, N, _ = E.shape
        starts = E.new_empty(B, H, C, N, N)
        for i in range(C):
            starts[:, :, i] = S
            S_i = S.flatten(0, 1)
            S = torch.baddbmm(torch.addcmul(_step(E, i), S_i, _step(d, i)), S_i @ _step(W, i).mT,
                              _step(B_end, i)).view(B, H, N, N)
        ctx.save_for_backward(W, B_end, d, starts)
        return starts, S

    @staticmethod
    def backward(ctx, g_starts, g_S):
        W, B_end, d, starts = ctx.saved_tensors
        B, H, C, N, _ = starts.shape
        g_starts = torch.zeros_like(starts) if g_starts is None else g_starts
        G = torch.zeros_like(starts[:, :, 0]) if g_S is None else g_S.to(starts.dtype)
        g_E = torch.empty_like(starts)          # chunk i: dLoss/dS_{i+1}, which is also dLoss/dE_i
        for i in range(C - 1, -1, -1):
            g_E[:, :, i] = G
            G_i = G.flatten(0, 1)
            G = torch.baddbmm(torch.addcmul(_step(g_starts, i), G_i, _step(d, i)), G_i @ _step(B_end, i).mT,
                              _step(W, i)).view(B, H, N, N)
        # The rest for all chunks at once, with X = S W^T: dX = G B_end^T, dW = dX^T S, dB_end = X^T G.
        g_X = g_E @ B_end.mT
        return g_X.mT @ starts, (starts @ W.mT).mT @ g_E, (g_E * starts).sum(-2, keepdim=True), g_E, G

"""Chunked WKV7 for the CPU: the recurrence as batched tensor products within chunks of L steps,
with a short loop carrying the state from chunk to chunk; autograd gives the backward pass.

The step is S_t = S_{t-1} (D_t + a_t b_t^T) + v_t k_t^T, y_t = S_t r_t (wkv7_reference.py). With
c the inclusive cumulative sum of the log decays lw = -exp(w) inside a chunk, p the exclusive
one, S_0 the chunk's starting state and u_t = S_{t-1} a_t (what the state holds along a_t):

    u_t = S_0 (a_t e^{p_t}) + sum_{s<t} A_ab[t, s] u_s + A_ak[t, s] v_s
          A_xy[t, s] = sum_j x_t[j] y_s[j] e^{p_t[j] - c_s[j]}          (s < t)
    so U = W S_0^T + U',  W = (I - A_ab)^-1 (a e^p),  U' = (I - A_ab)^-1 A_ak V  (unit lower triangular)
    y_t = S_0 (r_t e^{c_t}) + sum_{s<=t} B_rb[t, s] u_s + B_rk[t, s] v_s   (B: e^{c_t - c_s}, s <= t)
        = Q S_0^T + B_rb U' + B_rk V,   Q = r e^c + B_rb W
    S_end = S_0 M + E,   M = diag(e^{c_L}) + W^T (b e^{c_L - c}),   E = U'^T (b e^{c_L - c}) + V^T (k e^{c_L - c})

Everything but the S_{i+1} = S_i M_i + E_i scan is computed for all chunks at once. Every
exponent is a sum of log decays over the steps it spans (<= 0), so nothing overflows however
strong the decay. The state comes in and goes out with its gradient, so a sample run in
pieces (--chunk_ctx) is exact. The chunk terms are recomputed in the backward pass (checkpoint),
so only the inputs, the per-chunk maps and the chunk states are kept.
"""
import torch
from torch.utils.checkpoint import checkpoint

from .chunks import from_chunks, to_chunks

DEFAULT_CHUNK_LEN = 16


def wkv7_cpu(r, w, k, v, a, b, state=None, chunk_len=DEFAULT_CHUNK_LEN):
    """Same contract as `src.ops.wkv7.wkv7`: y comes back in r's dtype, the state in fp32
    (float64 inputs stay float64 throughout)."""
    B, T, H, N = r.shape
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    L = min(chunk_len, T)
    # Padded steps have r = k = v = a = b = 0 and lw = 0 (decay 1): the state passes through.
    R, K, V, A, Bb = (to_chunks(x, L, f) for x in (r, k, v, a, b))
    lw = to_chunks(-torch.exp(w.to(f)), L, f)
    # Recomputed in the backward pass rather than kept: autograd would hold several
    # [L, L, N] pair tensors per chunk, most of a long sample's memory.
    M, E, Q, y_inside = checkpoint(_chunk_terms, R, K, V, A, Bb, lw, use_reentrant=False)
    S = torch.zeros(B, H, N, N, dtype=f, device=r.device) if state is None else state.to(f)
    starts = []
    for i in range(M.shape[2]):
        starts.append(S)
        S = torch.baddbmm(E[:, :, i].reshape(B * H, N, N), S.reshape(B * H, N, N),
                          M[:, :, i].reshape(B * H, N, N)).view(B, H, N, N)
    y = Q @ torch.stack(starts, 2).transpose(-1, -2) + y_inside
    return from_chunks(y, T, r.dtype), S


def _pairs(x, y, exponent):
    """[..., L(t), L(s)]: sum_j x_t[j] y_s[j] exp(exponent[t, s, j])."""
    return (x.unsqueeze(-2) * y.unsqueeze(-3) * exponent.exp()).sum(-1)


def _chunk_terms(R, K, V, A, Bb, lw):
    """Per chunk: the state map (M, E), Q and the chunk's own part of y (see the module doc)."""
    L = R.shape[-2]
    c = lw.cumsum(-2)
    p = c - lw
    c_last = c[..., -1:, :]
    ones = torch.ones(L, L, dtype=torch.bool, device=R.device)
    before = torch.where(ones.tril(-1)[:, :, None], p.unsqueeze(-2) - c.unsqueeze(-3), -torch.inf)    # s < t
    up_to = torch.where(ones.tril()[:, :, None], c.unsqueeze(-2) - c.unsqueeze(-3), -torch.inf)      # s <= t
    A_ab, A_ak = _pairs(A, Bb, before), _pairs(A, K, before)
    B_rb, B_rk = _pairs(R, Bb, up_to), _pairs(R, K, up_to)
    lower = torch.eye(L, dtype=R.dtype, device=R.device) - A_ab
    W = torch.linalg.solve_triangular(lower, A * p.exp(), upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(lower, A_ak @ V, upper=False, unitriangular=True)
    to_end = (c_last - c).exp()
    B_end, K_end = Bb * to_end, K * to_end
    M = torch.diag_embed(c_last.squeeze(-2).exp()) + W.transpose(-1, -2) @ B_end
    E = U.transpose(-1, -2) @ B_end + V.transpose(-1, -2) @ K_end
    return M, E, R * c.exp() + B_rb @ W, B_rb @ U + B_rk @ V

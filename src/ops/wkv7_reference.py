"""The WKV7 recurrence, step by step: the one reference every WKV7 fast path is tested against.

Per batch b and head h, state S is N x N (value index i, key index j, as the `rwkv` package
holds it), d_t = exp(-exp(w_t)) the per-key decay:
    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t
The model passes a = -kk and b = kk * (in-context rate), so S a b^T removes part of what the
state holds along kk before v k^T is written (a generalised delta rule).

Run it in float64 for the truth; in float32 to measure what a plain fp32 loop loses.
"""
import torch


def wkv7_reference(r, w, k, v, a, b, state=None, dtype=torch.float64):
    """r, w, k, v, a, b: [B, T, H, N] (w raw: the decay is exp(-exp(w))); state: [B, H, N, N]
    (value, key) or None for zeros. Returns (y [B, T, H, N], final state [B, H, N, N]) in `dtype`.
    Differentiable with respect to every input."""
    B, T, H, N = r.shape
    r, w, k, v, a, b = (x.to(dtype) for x in (r, w, k, v, a, b))
    S = torch.zeros(B, H, N, N, dtype=dtype, device=r.device) if state is None else state.to(dtype)
    decay = torch.exp(-torch.exp(w))
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * decay[:, t, :, None, :] + sa[..., :, None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    return torch.stack(ys, dim=1), S

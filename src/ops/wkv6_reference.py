"""The WKV6 recurrence, step by step: the one reference every fast path is tested against.

Per batch b and head h, state S is N x N (key index j, value index i):
    y_t[i] = sum_j r_t[j] * (u[j] * k_t[j] * v_t[i] + S[j, i])
    S[j, i] <- exp(-exp(w_t[j])) * S[j, i] + k_t[j] * v_t[i]

Run it in float64 for the truth; run it in float32 to measure what a plain fp32
step-by-step evaluation loses, so fast paths can be held to the same standard.
"""
import torch


def wkv6_reference(r, k, v, w, u, state=None, dtype=torch.float64):
    """r, k, v, w: [B, T, H, N]; u: [H, N]; state: [B, H, N, N] or None.

    Returns (y [B, T, H, N], final state [B, H, N, N]), both in `dtype`.
    Differentiable with respect to every input.
    """
    B, T, H, N = r.shape
    r, k, v, w = (x.to(dtype) for x in (r, k, v, w))
    u = u.to(dtype)
    S = torch.zeros(B, H, N, N, dtype=dtype, device=r.device) if state is None else state.to(dtype)
    decay = torch.exp(-torch.exp(w))
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]              # [B, H, N(j), N(i)]
        ys.append(torch.einsum("bhj,bhji->bhi", r[:, t], u[None, :, :, None] * kv + S))
        S = decay[:, t, :, :, None] * S + kv
    return torch.stack(ys, dim=1), S

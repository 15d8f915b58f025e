"""The WKV recurrences for one token (T = 1: generation), written out as a few small batched
products: the chunked CPU paths (wkv6_cpu.py, wkv7_cpu.py) spend longer setting up a chunk than the
step itself takes. wkv6 and wkv7 take them for T = 1 off the GPU, with the same contracts (y in r's
dtype, the state fp32, float64 kept float64; differentiable) and the math of wkv6_reference.py and
wkv7_reference.py. The state passed in is never written: a chat goes back to an earlier one."""
import torch


def _per_head(r, state):
    """(row, col, S0): row(x) and col(x) give x [B, 1, H, N] as [B H, 1, N] and [B H, N, 1] in the
    compute dtype (fp32; float64 for float64 inputs), each head a batch entry for bmm; S0 is the
    state as [B H, N, N], zeros for None."""
    B, _, H, N = r.shape
    f = torch.float64 if r.dtype == torch.float64 else torch.float32
    S0 = torch.zeros(B * H, N, N, dtype=f, device=r.device) if state is None else state.to(f).reshape(B * H, N, N)
    return (lambda x: x.to(f).reshape(B * H, 1, N)), (lambda x: x.to(f).reshape(B * H, N, 1)), S0


def wkv6_step(r, k, v, w, u, state=None):
    """y = (r . u k) v + r S,   S <- diag(exp(-exp(w))) S + k^T v        (S: [key, value])"""
    B, _, H, N = r.shape
    row, col, S0 = _per_head(r, state)
    bonus = ((row(r) * row(k)).view(B, H, N) * u).sum(-1).view(B * H, 1, 1)       # r . u k
    y = torch.baddbmm(bonus * row(v), row(r), S0)
    S = torch.exp(-torch.exp(col(w))) * S0             # a new tensor: the caller's state is kept
    S.addcmul_(col(k), row(v))                         # + k^T v, broadcast
    return y.view(B, 1, H, N).to(r.dtype), S.view(B, H, N, N)


def wkv7_step(r, w, k, v, a, b, state=None):
    """S <- S diag(exp(-exp(w))) + (S a) b^T + v k^T,   y = S r        (S: [value, key])"""
    B, _, H, N = r.shape
    row, col, S0 = _per_head(r, state)
    Sa = torch.bmm(row(a), S0.transpose(1, 2)).transpose(1, 2)      # S a, as a row times S^T (MKL's column product is slow)
    S = torch.exp(-torch.exp(row(w))) * S0             # a new tensor: the caller's state is kept
    S.addcmul_(Sa, row(b)).addcmul_(col(v), row(k))    # + (S a) b^T + v k^T, broadcast
    y = torch.bmm(row(r), S.transpose(1, 2))           # (S r)^T
    return y.view(B, 1, H, N).to(r.dtype), S.view(B, H, N, N)

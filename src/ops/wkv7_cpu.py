"""WKV7 for the CPU: the recurrence step by step over all batch rows and heads at once, with
the state kept only at chunk boundaries and a hand-written backward pass.

The forward pass runs S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T, y_t = S_t r_t
(see wkv7_reference.py) as batched [B*H, N, N] products, and keeps S at the start of every
chunk of `chunk_len` steps (not at every step: T x N x N floats would be most of a long
sample's memory). The backward pass walks the chunks from last to first: it recomputes the
chunk's states from its start, then carries dLoss/dS back step by step:
    dS  += dy_t r_t^T                       dr_t = S_t^T dy_t
    dv_t = dS k_t     dk_t = dS^T v_t       dsa  = dS b_t      db_t = dS^T (S_{t-1} a_t)
    da_t = S_{t-1}^T dsa                    dd_t[j] = sum_i S_{t-1}[i, j] dS[i, j]
    dS   = dS diag(d_t) + dsa a_t^T         (the gradient with respect to S_{t-1})
and dw = dd * d * ln(d), since d = exp(-exp(w)). The state comes in and goes out with its
gradient, so a sample run in pieces (--chunk_ctx) is exact. Nothing is inverted: no step
divides by a decay, so no decay, however strong, loses precision.
"""
import torch

DEFAULT_CHUNK_LEN = 32


def wkv7_cpu(r, w, k, v, a, b, state=None, chunk_len=DEFAULT_CHUNK_LEN):
    """Same contract as `src.ops.wkv7.wkv7`: y comes back in r's dtype, the state in fp32."""
    if state is None:
        B, _, H, N = r.shape
        state = torch.zeros(B, H, N, N, device=r.device, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)
    return _WKV7.apply(r, w, k, v, a, b, state, chunk_len)


def _rows(x, f):
    """[B, T, H, N] -> [T, B*H, N] in dtype f: one contiguous slab per step."""
    B, T, H, N = x.shape
    return x.to(f).permute(1, 0, 2, 3).reshape(T, B * H, N).contiguous()


def _steps(S, d, k, v, a, b, r, y=None, keep=None):
    """Run the recurrence from S over the given steps ([L, BH, N] each). Writes y_t into y when
    given; appends (S_{t-1}, S_{t-1} a_t) to keep when given. Returns the final S."""
    for t in range(d.shape[0]):
        sa = torch.bmm(S, a[t].unsqueeze(-1))                          # [BH, N, 1]
        if keep is not None:
            keep.append((S, sa))
        S = torch.baddbmm(torch.baddbmm(S * d[t].unsqueeze(1), sa, b[t].unsqueeze(1)),
                          v[t].unsqueeze(-1), k[t].unsqueeze(1))
        if y is not None:
            torch.bmm(S, r[t].unsqueeze(-1), out=y[t].unsqueeze(-1))
    return S


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, chunk_len):
        ctx.dtypes = [x.dtype for x in (r, w, k, v, a, b, s0)]
        f = torch.float64 if r.dtype == torch.float64 else torch.float32     # float64 stays (gradcheck)
        B, T, H, N = r.shape
        ctx.shape, ctx.chunk_len = (B, T, H, N), chunk_len
        r, k, v, a, b = (_rows(x, f) for x in (r, k, v, a, b))
        d = torch.exp(-torch.exp(_rows(w, f)))
        S = s0.to(f).reshape(B * H, N, N)
        y = r.new_empty(T, B * H, N)
        starts = []
        for t0 in range(0, T, chunk_len):
            starts.append(S)
            sl = slice(t0, t0 + chunk_len)
            S = _steps(S, d[sl], k[sl], v[sl], a[sl], b[sl], r[sl], y=y[sl])
        ctx.save_for_backward(r, d, k, v, a, b, *starts)
        y = y.view(T, B, H, N).permute(1, 0, 2, 3).to(ctx.dtypes[0])
        return y, S.view(B, H, N, N).clone()

    @staticmethod
    def backward(ctx, gy, gs_end):
        r, d, k, v, a, b, *starts = ctx.saved_tensors
        B, T, H, N = ctx.shape
        L = ctx.chunk_len
        gy = _rows(gy, r.dtype)
        dS = (torch.zeros_like(starts[0]) if gs_end is None else gs_end.to(r.dtype).reshape(B * H, N, N).clone())
        grads = {name: torch.empty_like(r) for name in "rwkvab"}
        for c in range(len(starts) - 1, -1, -1):
            t0 = c * L
            sl = slice(t0, min(t0 + L, T))
            keep = []
            S_end = _steps(starts[c], d[sl], k[sl], v[sl], a[sl], b[sl], r[sl], keep=keep)
            for i in range(sl.stop - t0 - 1, -1, -1):
                t = t0 + i
                S_prev, sa = keep[i]
                S_t = keep[i + 1][0] if i + 1 < len(keep) else S_end
                g = gy[t].unsqueeze(-1)                                    # [BH, N, 1]
                grads["r"][t] = torch.bmm(S_t.transpose(1, 2), g).squeeze(-1)
                dS = torch.baddbmm(dS, g, r[t].unsqueeze(1))
                grads["v"][t] = torch.bmm(dS, k[t].unsqueeze(-1)).squeeze(-1)
                grads["k"][t] = torch.bmm(dS.transpose(1, 2), v[t].unsqueeze(-1)).squeeze(-1)
                dsa = torch.bmm(dS, b[t].unsqueeze(-1))                   # [BH, N, 1]
                grads["b"][t] = torch.bmm(dS.transpose(1, 2), sa).squeeze(-1)
                grads["a"][t] = torch.bmm(S_prev.transpose(1, 2), dsa).squeeze(-1)
                grads["w"][t] = (S_prev * dS).sum(1)                       # dLoss/dd_t for now
                dS = torch.baddbmm(dS * d[t].unsqueeze(1), dsa, a[t].unsqueeze(1))
        grads["w"] *= d * torch.log(d)                                     # dd/dw = -exp(w) d = d ln d
        out = [grads[n].view(T, B, H, N).permute(1, 0, 2, 3).to(dt) for n, dt in zip("rwkvab", ctx.dtypes)]
        return (*out, dS.view(B, H, N, N).to(ctx.dtypes[6]), None)

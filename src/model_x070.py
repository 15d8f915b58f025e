"""RWKV-7 ("x070"), on the RWKV base class of model.py: the model whose state_dict() is exactly
the official x070 checkpoint, equal to the `rwkv` package's RWKV_x070.

Time mix, per token (B, T, C; H heads of N):
    xx = shift(x) - x;  x_r .. x_g = x + xx * x_r .. x_g
    r = receptance(x_r); k = key(x_k); v = value(x_v)
    w = -softplus(-(w0 + tanh(x_w w1) w2)) - 0.5          the decay is exp(-exp(w)), in (0.545, 1)
    v = v + (v_first - v) * sigmoid(v0 + x_v v1 v2)        value residual (layer 0: v_first = v)
    a = sigmoid(a0 + x_a a1 a2)                            in-context learning rate
    g = sigmoid(x_g g1) g2
    kk = normalize(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    y = WKV7(r, w, k, v, -kk, kk * a);  y = GroupNorm(H, eps 64e-5)(y) + (r * k * r_k).sum per head * v
    out = output(y * g)
Channel mix: out = value(relu(key(x + (shift(x) - x) * x_k)) ** 2).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RWKV7Config
from .model import RWKV, Block, initial_wkv_state, token_shift
from .ops import wkv7


def _vector(C):
    return nn.Parameter(torch.zeros(1, 1, C))


class TimeMix7(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        # Attribute order is the official key order.
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (_vector(C) for _ in range(6))
        self.w1, self.w2, self.w0 = nn.Parameter(torch.zeros(C, cfg.w_lora)), nn.Parameter(torch.zeros(cfg.w_lora, C)), _vector(C)
        self.a1, self.a2, self.a0 = nn.Parameter(torch.zeros(C, cfg.a_lora)), nn.Parameter(torch.zeros(cfg.a_lora, C)), _vector(C)
        self.v1, self.v2, self.v0 = nn.Parameter(torch.zeros(C, cfg.v_lora)), nn.Parameter(torch.zeros(cfg.v_lora, C)), _vector(C)
        self.g1, self.g2 = nn.Parameter(torch.zeros(C, cfg.g_lora)), nn.Parameter(torch.zeros(cfg.g_lora, C))
        self.k_k, self.k_a = _vector(C), _vector(C)
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x, v_first, shift, wkv_state, op):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        wkv_state = initial_wkv_state(self, wkv_state, B, key_first=False)   # the operator's layout is the file's
        xx = token_shift(x, shift)
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, m) for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w = F.logsigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2) - 0.5     # -softplus(-x) = logsigmoid(x), one pass
        if self.layer_id == 0:
            v_first = v       # layer 0's v0, v1, v2 are in the file but unused, as in the reference
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2))   # v + (v_first - v) * gate, one pass
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize(heads(k * self.k_k), dim=-1, p=2.0)
        k = k * torch.addcmul(1 - self.k_a, a, self.k_a)     # k * (1 + (a - 1) * k_a)

        y, wkv_state = wkv7(heads(r), heads(w), heads(k), heads(v), -kk, kk * heads(a), wkv_state, op=op)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        y = y + ((heads(r) * heads(k) * self.r_k).sum(-1, keepdim=True) * heads(v)).view(B, T, C)
        return self.output(y * g), v_first, x[:, -1].clone(), wkv_state   # a copy: a view would keep all of x alive


class ChannelMix7(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = _vector(cfg.n_embd)
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x, shift):
        k = torch.addcmul(x, token_shift(x, shift), self.x_k)
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1].clone()


class Block7(Block):
    TimeMix, ChannelMix = TimeMix7, ChannelMix7


class RWKV7(RWKV):
    config_class, Block = RWKV7Config, Block7

"""RWKV-6 ("x060"), and what both model families share: the model whose state_dict() is
exactly the official checkpoint.

Sizes come from the weights (see config.py). `model(idx, state)` returns (logits, state);
the state carries each layer's token-shift vectors and WKV state, so a sequence fed in
pieces gives the same logits as fed at once. RWKV-7 is in model_x070.py, on the same RWKV
base class; family.py picks the class a checkpoint needs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checkpoint import check_finite, load_checkpoint
from .config import CheckpointError, RWKV6Config, read_config
from .ops import OPS, wkv6
from .ops.head_loss import head_loss, target_logps


def token_shift(x, prev):
    """shift(x) - x, where shift(x)[:, t] = x[:, t-1] and shift(x)[:, 0] = prev."""
    if x.shape[1] == 1:         # one token (generation): no concatenation to build
        return prev.unsqueeze(1) - x
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1) - x


def initial_wkv_state(att, wkv_state, batch_size, key_first):
    """The WKV state a layer starts from: the one carried in (wkv_state), else the layer's trained
    initial state att.time_state (state tuning) expanded over the batch, else None (zeros).
    time_state is [H, value index, key index] as the ecosystem stores it (the older repository,
    RWKV-Runner); RWKV-6's operator holds [key, value], so it is transposed there, as the `rwkv`
    package does on load."""
    s = getattr(att, "time_state", None)
    if wkv_state is not None or s is None:
        return wkv_state
    s = s.to(torch.promote_types(s.dtype, torch.float32))     # fp32 (float64 in a float64 model)
    s = s.transpose(-1, -2) if key_first else s
    return s.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()


STATE_KEY = "time_state"    # blocks.{i}.att.time_state, the trained initial WKV state


def new_time_states(model):
    """{blocks.{i}.att.time_state: a zero fp32 Parameter [H, N, N]} for each layer that has none, not yet attached."""
    cfg, device = model.config, model.ln_out.weight.device
    return {f"blocks.{i}.att.{STATE_KEY}": nn.Parameter(torch.zeros(cfg.n_head, cfg.head_size, cfg.head_size, device=device))
            for i, block in enumerate(model.blocks) if getattr(block.att, STATE_KEY, None) is None}


def add_time_state(model, states=None):
    """Give every layer's att a time_state Parameter (new_time_states', or those given) where it has none."""
    for key, p in (new_time_states(model) if states is None else states).items():
        setattr(model.get_submodule(key.rsplit(".", 1)[0]), STATE_KEY, p)


def remove_time_state(model):
    for block in model.blocks:
        if getattr(block.att, STATE_KEY, None) is not None:
            del block.att.time_state


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id):
        super().__init__()
        C, A, H, N = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size
        self.n_head, self.head_size = H, N
        self.time_maa_x = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * cfg.mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, cfg.mix_lora, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, cfg.decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.zeros(cfg.decay_lora, A))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=1e-5 * 8**2)

    def forward(self, x, v_first, shift, wkv_state, op):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        wkv_state = initial_wkv_state(self, wkv_state, B, key_first=True)
        xx = token_shift(x, shift)
        xxx = torch.addcmul(x, xx, self.time_maa_x)     # x + xx * time_maa_x in one pass (so below)
        m = torch.tanh(xxx @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(m, self.time_maa_w2).view(5, B, T, C)
        xw = torch.addcmul(x, xx, self.time_maa_w + mw)
        xk = torch.addcmul(x, xx, self.time_maa_k + mk)
        xv = torch.addcmul(x, xx, self.time_maa_v + mv)
        xr = torch.addcmul(x, xx, self.time_maa_r + mr)
        xg = torch.addcmul(x, xx, self.time_maa_g + mg)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, wkv_state = wkv6(heads(r), heads(k), heads(v), heads(w), self.time_faaaa, wkv_state, op=op)
        y = self.ln_x(y.reshape(B * T, H * N)).view(B, T, H * N)
        return self.output(y * g), v_first, x[:, -1].clone(), wkv_state   # a copy: a view would keep all of x alive


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        C, F_ = cfg.n_embd, cfg.dim_ffn
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x, shift):
        xx = token_shift(x, shift)
        xk = torch.addcmul(x, xx, self.time_maa_k)
        xr = torch.addcmul(x, xx, self.time_maa_r)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2), x[:, -1].clone()


class Block(nn.Module):
    """ln0 (layer 0), then x + att(ln1(x)), then x + ffn(ln2(x)); v_first is RWKV-7's value of
    layer 0, carried through the blocks (RWKV-6 passes None along)."""
    TimeMix, ChannelMix = TimeMix, ChannelMix

    def __init__(self, cfg, layer_id):
        super().__init__()
        # Attribute order is the official key order (ln1, ln2, ln0, att, ffn).
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.att = self.TimeMix(cfg, layer_id)
        self.ffn = self.ChannelMix(cfg)

    def forward(self, x, v_first, att_shift, wkv_state, ffn_shift, op):
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        dx, v_first, att_shift, wkv_state = self.att(self.ln1(x), v_first, att_shift, wkv_state, op)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, v_first, att_shift, wkv_state, ffn_shift


class Head(nn.Linear):
    """The output projection (key `head.weight`). Given targets it returns the training loss
    (or with logps=True each row's log p(target), without gradients) instead of the logits, fused with the projection block by block (ops/head_loss.py), so the
    whole sample's logits never exist. Either way it is called as a module, so that DeepSpeed
    ZeRO-3 gathers its weight."""

    def forward(self, x, targets=None, logps=False, **loss_args):
        if targets is None:
            return super().forward(x)
        if logps:       # log p(target) of each row of x [n, C], without gradients
            return target_logps(x, self.weight, targets)
        return head_loss(x, self.weight, targets, **loss_args)


class RWKV(nn.Module):
    """What both families share: emb, blocks, ln_out, head, the state and the forward loop.
    A family subclass names its config class and its Block."""
    config_class, Block = None, Block

    def __init__(self, cfg, op="auto", grad_cp=False):
        super().__init__()
        if op not in OPS:
            raise ValueError(f"Unknown WKV op {op!r}: choose one of {', '.join(OPS)}.")
        self.config = cfg
        self.op = op              # which WKV implementation: auto, cpu or cuda
        self.grad_cp = grad_cp    # recompute each block in the backward pass to save memory
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(self.Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Head(cfg.n_embd, cfg.vocab_size, bias=False)

    @classmethod
    def from_state_dict(cls, sd, **kwargs):
        """A model holding exactly these weights (in their dtype); sizes read off the tensors."""
        cfg = read_config(sd)
        if cfg.family != cls.config_class.family:
            raise CheckpointError(f"This is an {cfg.title} checkpoint, not an {cls.config_class.title} one: "
                                  "load it with src.family.load_model.")
        with torch.device("meta"):
            model = cls(cfg, **kwargs)
        states = [k for k in sd if k.endswith(f".att.{STATE_KEY}")]
        if states:      # a file with its initial states inside (a merged RWKV-6 state tune): kept in fp32
            add_time_state(model)
            sd = {k: v.float() if k in states else v for k, v in sd.items()}
        model.load_state_dict(sd, assign=True)
        return model

    @classmethod
    def from_checkpoint(cls, path, dtype=None, **kwargs):
        """Load an official .pth (weights_only). dtype: None keeps the file's, else e.g. torch.float32."""
        sd, _ = load_checkpoint(path)
        for key, tensor in sd.items():
            check_finite(key, tensor, path)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        return cls.from_state_dict(sd, **kwargs)

    def empty_state(self, batch_size):
        """Per layer: (att token shift [B, C], WKV state [B, H, N, N] fp32, ffn token shift [B, C])."""
        cfg, p = self.config, self.ln_out.weight     # not emb.weight: src/quant.py may hold emb quantized
        shift = lambda: torch.zeros(batch_size, cfg.n_embd, dtype=p.dtype, device=p.device)  # noqa: E731
        wkv = lambda: torch.zeros(batch_size, cfg.n_head, cfg.head_size, cfg.head_size, device=p.device)  # noqa: E731
        return [(shift(), wkv(), shift()) for _ in range(cfg.n_layer)]

    def hidden(self, idx, state=None):
        """idx: [B, T] token ids. Returns (ln_out of the last block's output [B, T, C], new state):
        everything but the head."""
        if state is None:    # a sequence's start: its WKV state is each layer's time_state, or zeros
            state = [(a, None, f) for a, _, f in self.empty_state(idx.shape[0])]
        x = self.emb(idx)
        v_first = None
        new_state = []
        for block, (att_shift, wkv_state, ffn_shift) in zip(self.blocks, state):
            if self.grad_cp and self.training:
                # Non-reentrant checkpointing: gradients reach adapter parameters inside the
                # block even when nothing fed into it requires grad (a frozen embedding).
                out = checkpoint(block, x, v_first, att_shift, wkv_state, ffn_shift, self.op, use_reentrant=False)
            else:
                out = block(x, v_first, att_shift, wkv_state, ffn_shift, self.op)
            x, v_first, layer_state = out[0], out[1], out[2:]
            new_state.append(layer_state)
        return self.ln_out(x), new_state

    def forward(self, idx, state=None, full_output=True):
        """idx: [B, T] token ids. Returns (logits [B, T, vocab], new state); with
        full_output=False only the last position's logits ([B, 1, vocab]), as for a prompt."""
        x, new_state = self.hidden(idx, state)
        if not full_output:
            x = x[:, -1:]
        return self.head(x), new_state


class RWKV6(RWKV):
    config_class = RWKV6Config

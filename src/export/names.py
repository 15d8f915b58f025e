"""Which tensors each export format writes, per model family: one table per family, so that
each family is one entry in GGUF_TABLES / ST_RULES.

A GGUF table is a list of (GGUF name, official keys it is made of, transform). Names, the
transforms and the fusion of the time-mix lerps are those llama.cpp's own converter
(convert_hf_to_gguf.py, classes Rwkv6Model and Rwkv7Model) applies to the HF copy of the same
weights; llama.cpp reverses every shape (ggml order), which is why the low-rank matrices are
transposed here."""
import torch


def same(t):
    return t


def squeeze(t):
    return t.squeeze()


def transpose(t):
    return t.transpose(0, 1)


def swap_last(t):
    """time_maa_w2 [5, D, C] -> [5, C, D] (the converter's permute(0, 2, 1))."""
    return t.permute(0, 2, 1)


def flatten(t):
    return t.reshape(-1)


def fuse_lerps(*ts):
    """x060: time_maa_w, _k, _v, _r, _g; x070: x_r, _w, _k, _v, _a, _g ([1, 1, C] each) -> one
    [n, 1, 1, C] tensor, in that order."""
    return torch.stack([t.reshape(1, 1, -1) for t in ts], dim=0)


def gguf_table(n_layer, layer_rows):
    """The rows both architectures share (embedding, ln0, each layer's two norms, ln_out, head),
    around each layer's own rows, layer_rows(layer index, official prefix, GGUF prefix)."""
    table = [("token_embd.weight", ["emb.weight"], same),
             ("token_embd_norm.weight", ["blocks.0.ln0.weight"], same),
             ("token_embd_norm.bias", ["blocks.0.ln0.bias"], same)]
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        table += [(g + "attn_norm.weight", [b + "ln1.weight"], same),
                  (g + "attn_norm.bias", [b + "ln1.bias"], same),
                  (g + "attn_norm_2.weight", [b + "ln2.weight"], same),
                  (g + "attn_norm_2.bias", [b + "ln2.bias"], same)]
        table += layer_rows(i, b, g)
    table += [("output_norm.weight", ["ln_out.weight"], same),
              ("output_norm.bias", ["ln_out.bias"], same),
              ("output.weight", ["head.weight"], same)]
    return table


def x060_layer(i, b, g):
    """A layer of the llama.cpp "rwkv6" architecture, in the official key order."""
    return [
        (g + "time_mix_lerp_x.weight", [b + "att.time_maa_x"], squeeze),
        (g + "time_mix_lerp_fused.weight", [b + f"att.time_maa_{m}" for m in "wkvrg"], fuse_lerps),
        (g + "time_mix_w1.weight", [b + "att.time_maa_w1"], transpose),
        (g + "time_mix_w2.weight", [b + "att.time_maa_w2"], swap_last),
        (g + "time_mix_decay.weight", [b + "att.time_decay"], squeeze),
        (g + "time_mix_decay_w1.weight", [b + "att.time_decay_w1"], transpose),
        (g + "time_mix_decay_w2.weight", [b + "att.time_decay_w2"], transpose),
        (g + "time_mix_first.weight", [b + "att.time_faaaa"], same),
        (g + "time_mix_receptance.weight", [b + "att.receptance.weight"], same),
        (g + "time_mix_key.weight", [b + "att.key.weight"], same),
        (g + "time_mix_value.weight", [b + "att.value.weight"], same),
        (g + "time_mix_output.weight", [b + "att.output.weight"], same),
        (g + "time_mix_gate.weight", [b + "att.gate.weight"], same),
        (g + "time_mix_ln.weight", [b + "att.ln_x.weight"], same),
        (g + "time_mix_ln.bias", [b + "att.ln_x.bias"], same),
        (g + "channel_mix_lerp_k.weight", [b + "ffn.time_maa_k"], squeeze),
        (g + "channel_mix_lerp_r.weight", [b + "ffn.time_maa_r"], squeeze),
        (g + "channel_mix_key.weight", [b + "ffn.key.weight"], same),
        (g + "channel_mix_receptance.weight", [b + "ffn.receptance.weight"], same),
        (g + "channel_mix_value.weight", [b + "ffn.value.weight"], same),
    ]


def x070_layer(i, b, g):
    """A layer of the llama.cpp "rwkv7" architecture. Layer 0 has no value-residual mix (it makes
    the residual), but llama.cpp wants v0/v1/v2 there of the a0/a1/a2 shapes: as the converter
    does, they are copies of a0/a1/a2 (never used), and a .pth's own layer-0 v0/v1/v2 are ignored."""
    rows = [(g + "time_mix_lerp_fused.weight", [b + f"att.x_{m}" for m in "rwkvag"], fuse_lerps)]
    for m in "wav":
        src = "a" if i == 0 and m == "v" else m
        rows += [(g + f"time_mix_{m}0.weight", [b + f"att.{src}0"], squeeze),
                 (g + f"time_mix_{m}1.weight", [b + f"att.{src}1"], transpose),
                 (g + f"time_mix_{m}2.weight", [b + f"att.{src}2"], transpose)]
    return rows + [
        (g + "time_mix_g1.weight", [b + "att.g1"], transpose),
        (g + "time_mix_g2.weight", [b + "att.g2"], transpose),
        (g + "time_mix_k_k.weight", [b + "att.k_k"], squeeze),
        (g + "time_mix_k_a.weight", [b + "att.k_a"], squeeze),
        (g + "time_mix_r_k.weight", [b + "att.r_k"], flatten),
        (g + "time_mix_receptance.weight", [b + "att.receptance.weight"], same),
        (g + "time_mix_key.weight", [b + "att.key.weight"], same),
        (g + "time_mix_value.weight", [b + "att.value.weight"], same),
        (g + "time_mix_output.weight", [b + "att.output.weight"], same),
        (g + "time_mix_ln.weight", [b + "att.ln_x.weight"], same),
        (g + "time_mix_ln.bias", [b + "att.ln_x.bias"], same),
        (g + "channel_mix_lerp_k.weight", [b + "ffn.x_k"], squeeze),
        (g + "channel_mix_key.weight", [b + "ffn.key.weight"], same),
        (g + "channel_mix_value.weight", [b + "ffn.value.weight"], same),
    ]


def x060_gguf(n_layer):
    return gguf_table(n_layer, x060_layer)


def x070_gguf(n_layer):
    return gguf_table(n_layer, x070_layer)


# The converter's rule: these stay F32 whatever --outtype says (so do 1-D tensors and biases).
GGUF_ALWAYS_F32 = {"x060": ("time_mix_first", "time_mix_w1", "time_mix_w2", "time_mix_decay_w1",
                            "time_mix_decay_w2", "time_mix_lerp_fused"),
                   "x070": ("time_mix_w1", "time_mix_w2", "time_mix_lerp_fused")}
GGUF_ARCH = {"x060": "rwkv6", "x070": "rwkv7"}
# The weights llama.cpp's RWKV-6/7 graphs multiply through build_lora_mm, so a LoRA adapter can
# change (rwkv6-base.cpp, rwkv7-base.cpp, rwkv6.cpp / rwkv7.cpp for the head): the projections.
GGUF_LORA = ("time_mix_receptance", "time_mix_key", "time_mix_value", "time_mix_gate", "time_mix_output",
             "channel_mix_key", "channel_mix_value", "channel_mix_receptance", "output")
GGUF_TABLES = {"x060": x060_gguf, "x070": x070_gguf}

# web-rwkv / Ai00 ".st" files (web-rwkv's assets/scripts/convert_safetensors.py; for RWKV-7 the
# converter's longer transpose list): the official keys with these substrings renamed, then
# lower-cased; the matrices whose (renamed) key contains one of `transpose` get their last two
# dimensions swapped; every tensor fp16.
ST_RULES = {"x060": {"rename": (("time_faaaa", "time_first"), ("time_maa", "time_mix")),
                     "transpose": ("time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2")},
            "x070": {"rename": (),
                     "transpose": ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")}}


def st_tensor(family, key, t):
    """(web-rwkv key, tensor) of one official tensor."""
    rules = ST_RULES[family]
    for old, new in rules["rename"]:
        key = key.replace(old, new)
    key = key.lower()
    if any(name in key for name in rules["transpose"]):
        t = t.transpose(-2, -1)
    return key, t

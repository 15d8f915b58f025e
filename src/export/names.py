"""Which tensors each export format writes, per model family: one table per family, so that
another family (RWKV-7, "x070") is one more entry in GGUF_TABLES / ST_RULES and nothing else.

A GGUF table is a list of (GGUF name, official keys it is made of, transform). Names, the
transforms and the fusion of the five time-mix lerps are those llama.cpp's own converter
(convert_hf_to_gguf.py, class Rwkv6Model) applies to the HF copy of the same weights; llama.cpp
reverses every shape (ggml order), which is why the low-rank matrices are transposed here."""
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


def fuse_lerps(*ts):
    """time_maa_w, _k, _v, _r, _g ([1, 1, C] each) -> one [5, 1, 1, C] tensor, in that order."""
    return torch.stack([t.squeeze().unsqueeze(0) for t in ts], dim=0).unsqueeze(1)


def x060_gguf(n_layer):
    """The llama.cpp "rwkv6" architecture's tensors, in the official key order."""
    table = [("token_embd.weight", ["emb.weight"], same),
             ("token_embd_norm.weight", ["blocks.0.ln0.weight"], same),
             ("token_embd_norm.bias", ["blocks.0.ln0.bias"], same)]
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        table += [
            (g + "attn_norm.weight", [b + "ln1.weight"], same),
            (g + "attn_norm.bias", [b + "ln1.bias"], same),
            (g + "attn_norm_2.weight", [b + "ln2.weight"], same),
            (g + "attn_norm_2.bias", [b + "ln2.bias"], same),
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
    table += [("output_norm.weight", ["ln_out.weight"], same),
              ("output_norm.bias", ["ln_out.bias"], same),
              ("output.weight", ["head.weight"], same)]
    return table


# The converter's rule: these stay F32 whatever --outtype says (so do 1-D tensors and biases).
GGUF_ALWAYS_F32 = {"x060": ("time_mix_first", "time_mix_w1", "time_mix_w2", "time_mix_decay_w1",
                            "time_mix_decay_w2", "time_mix_lerp_fused")}
GGUF_ARCH = {"x060": "rwkv6"}
GGUF_TABLES = {"x060": x060_gguf}

# web-rwkv / Ai00 ".st" files (web-rwkv's assets/scripts/convert_safetensors.py): the official
# keys with these substrings renamed, then lower-cased; the matrices whose (renamed) key contains
# one of `transpose` get their last two dimensions swapped; every tensor fp16.
ST_RULES = {"x060": {"rename": (("time_faaaa", "time_first"), ("time_maa", "time_mix")),
                     "transpose": ("time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2")}}


def st_tensor(family, key, t):
    """(web-rwkv key, tensor) of one official tensor."""
    rules = ST_RULES[family]
    for old, new in rules["rename"]:
        key = key.replace(old, new)
    key = key.lower()
    if any(name in key for name in rules["transpose"]):
        t = t.transpose(-2, -1)
    return key, t

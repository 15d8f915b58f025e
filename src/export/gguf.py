"""GGUF for llama.cpp, with the `gguf` package (the writer llama.cpp's own converter uses).

What is written is what convert_hf_to_gguf.py writes for RWKV-6 and RWKV-7 (classes Rwkv6Model,
Rwkv7Model) from the HF copy of the same weights: architecture "rwkv6" / "rwkv7", its hyper-parameter keys, the tensor names and
transforms of names.py, the converter's rule for which tensors stay F32, and the World tokenizer
as its _set_vocab_rwkv_world writes it (tokenizer model "rwkv", token 0 "<s>", the 65529 tokens of
rwkv_vocab_v20230424.txt as repr() text, padding to the vocabulary size). Two choices of ours:
rescale_every_n_layers (x060) is 0 (official .pth weights are not pre-divided, as the HF copies are),
and `same` keeps an fp32 file fp32 (the converter's auto guesses f16 there).

The header (metadata and every tensor's name, type, shape and offset) is computed from shapes
alone and written first; then each tensor is made, converted and written, one at a time."""
import math
import sys

import gguf
import numpy as np
import torch

from ..checkpoint import atomic_write, release_pages, trim_heap
from ..tokenizer import default_vocab_path, read_vocab
from . import ExportError, row_chunks
from .names import GGUF_ALWAYS_F32, GGUF_ARCH, GGUF_TABLES

Q = gguf.GGMLQuantizationType
FILE_TYPES = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
MAIN_TYPE = {"fp32": Q.F32, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
SAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CONTEXT_LENGTH = 1048576        # RWKV has no context limit; the converter writes this
LAYER_NORM_EPS = 1e-5
EOT = 261                       # "\n\n": the converter's end-of-turn token for the World vocabulary
ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT


def world_tokens(vocab_size):
    """(token texts, token types) as the converter writes the World vocabulary."""
    by_id = {i: t for t, i in read_vocab(default_vocab_path()).items()}
    n = len(by_id)
    if sorted(by_id) != list(range(1, n + 1)):
        raise ExportError("The World vocabulary file does not number its tokens 1..n: the `rwkv` package's "
                          "rwkv_vocab_v20230424.txt is damaged.")
    if vocab_size < n + 1:
        raise ExportError(f"The model's vocabulary has {vocab_size} entries, fewer than the World tokenizer's {n + 1}: "
                          "llama.cpp needs a World-vocabulary model (65536) to tokenize for it.")
    tokens = [b"<s>"] + [repr(by_id[i])[2:-1].encode("utf-8") for i in range(1, n + 1)]
    tokens += [f"[PAD{i}]".encode("utf-8") for i in range(n + 1, vocab_size)]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * n + [gguf.TokenType.UNUSED] * (vocab_size - n - 1)
    return tokens, types


def tensor_type(name, shape, main, family):
    """The converter's choice of GGML type for one output tensor."""
    base = name.rsplit(".", 2)[-2]
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or base in GGUF_ALWAYS_F32[family]:
        return Q.F32
    if main == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16            # rows that are not whole Q8_0 blocks: the converter falls back to F16
    return main


def _nbytes(shape, qtype):
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return math.prod(shape) * {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[qtype]
    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def convert(t, qtype, what):
    """One output tensor as the bytes GGUF holds (flat uint8), quantized as the converter does, a
    few rows at a time into one buffer; NaN or Inf, before or after rounding, is refused."""
    out, pos = np.empty(_nbytes(tuple(t.shape), qtype), np.uint8), 0
    for rows in row_chunks(t):
        x = rows if rows.dtype in (torch.float16, torch.float32) else rows.to(torch.float32)
        if qtype == Q.BF16:     # torch rounds to nearest even as gguf's numpy BF16 does, several times faster
            q = rows.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        else:
            with np.errstate(over="ignore", invalid="ignore"):     # checked just below, in one sentence
                q = gguf.quants.quantize(x.contiguous().numpy(), qtype)
        if not torch.isfinite(x).all() or (q.dtype != np.uint8 and not np.isfinite(q).all()):
            raise ExportError(f"{what} holds NaN or Inf once written as {qtype.name}: nothing was written"
                              f"{'' if torch.isfinite(x).all() else ' (the .pth itself holds them)'}.")
        q = q.reshape(-1).view(np.uint8)
        out[pos:pos + q.size] = q
        pos += q.size
    assert pos == out.size
    return out


def x060_hparams(w, config):
    if config.dim_att != config.n_embd:
        raise ExportError(f"llama.cpp's rwkv6 needs dim_att = n_embd, but this model has dim_att {config.dim_att} "
                          f"and n_embd {config.n_embd}.")
    w.add_rescale_every_n_layers(0)
    w.add_time_mix_extra_dim(config.mix_lora)
    w.add_time_decay_extra_dim(config.decay_lora)


def x070_hparams(w, config):
    w.add_decay_lora_rank(config.w_lora)
    w.add_iclr_lora_rank(config.a_lora)
    w.add_value_residual_mix_lora_rank(config.v_lora)
    w.add_gate_lora_rank(config.g_lora)


HPARAMS = {"x060": x060_hparams, "x070": x070_hparams}   # what each architecture adds to the common keys


class GGUFPlan:
    """Everything about the file that can be known before any tensor is read."""

    def __init__(self, sd, config, family, dtype, name, **_):
        self.dtype = SAME.get(sd["emb.weight"].dtype, "fp32") if dtype == "same" else dtype
        main = MAIN_TYPE[self.dtype]
        self.sd, self.family = sd, family
        self.table = GGUF_TABLES[family](config.n_layer)
        w = self.writer = gguf.GGUFWriter(path=None, arch=GGUF_ARCH[family])
        total = sum(v.numel() for v in sd.values())
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_size_label(gguf.size_label(total, 0, 0, 0))
        w.add_context_length(CONTEXT_LENGTH)
        w.add_embedding_length(config.n_embd)
        w.add_block_count(config.n_layer)
        w.add_layer_norm_eps(LAYER_NORM_EPS)
        w.add_wkv_head_size(config.head_size)
        HPARAMS[family](w, config)
        w.add_feed_forward_length(config.dim_ffn)
        w.add_file_type(FILE_TYPES[self.dtype])
        w.add_head_count(0)     # required by llama.cpp, unused
        tokens, types = world_tokens(config.vocab_size)
        w.add_tokenizer_model("rwkv")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_eot_token_id(EOT)
        w.add_chat_template("rwkv-world")   # llama.cpp's built-in template of that name
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        self.types = {}
        nbytes = 4096 + sum(len(t) + 12 for t in tokens)
        for out, keys, transform in self.table:   # zero-stride stand-ins: the shapes without the data
            shape = tuple(transform(*(torch.zeros(()).expand(sd[k].shape) for k in keys)).shape)
            qtype = self.types[out] = tensor_type(out, shape, main, family)
            size = _nbytes(shape, qtype)
            w.add_tensor_info(out, shape, np.dtype(np.float32), size, raw_dtype=qtype)
            nbytes += len(out) + 64 + size + ALIGN
        self.nbytes = nbytes
        kinds = sorted({t.name for t in self.types.values()})
        self.line = (f"GGUF for llama.cpp, architecture {GGUF_ARCH[family]}, file type {self.dtype} "
                     f"({len(self.table)} tensors: {', '.join(kinds)}), World tokenizer")

    def write(self, output, progress=False):
        w = self.writer

        def write(f):
            w.fout, w.state = [f], gguf.WriterState.EMPTY    # the writer writes into atomic_write's temporary
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            untrimmed = 0
            for i, (out, keys, transform) in enumerate(self.table):
                t = transform(*(self.sd[k] for k in keys))
                data = convert(t, self.types[out], f"{out} (from {keys[0]})")
                w.write_tensor_data(data)
                untrimmed += data.nbytes
                del t, data
                for k in keys:
                    release_pages(self.sd[k])
                if untrimmed >= 1 << 26:
                    trim_heap()
                    untrimmed = 0
                if progress:
                    print(f"\rexport: {i + 1}/{len(self.table)} tensors", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)
            w.flush()
            w.fout = None       # atomic_write closes the file

        atomic_write(output, write)


def prepare(sd, config, family, dtype, name, fmt="gguf"):
    return GGUFPlan(sd, config, family, dtype, name)

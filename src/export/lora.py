"""A trained adapter as a llama.cpp LoRA adapter GGUF, served beside an unchanged base GGUF
(llama.cpp / llama-server --lora, Ollama's ADAPTER, LM Studio) instead of a merged model.

What llama.cpp's loader reads (src/llama-adapter.cpp; its own writer is convert_lora_to_gguf.py):
general.type "adapter", general.architecture the base's (rwkv6 / rwkv7), adapter.type "lora",
adapter.lora.alpha (f32), and per adapted weight `<base GGUF name>.lora_a` [r, in] and `.lora_b`
[out, r] (torch order); it adds scale * alpha / r * B A x, with r = B's width and alpha 0 meaning
alpha / r = 1.

Every mode that is a fixed low-rank product is exact here (src/bone/functional.lora_factors):
bone is B A with A the tiled identity and B = bone^T (alpha = r, so alpha / r = 1), mini the same
once tiled along the outputs, lora its own A and B with its alpha. bat (an update that depends on
W), train parts and trained states have no LoRA form: refused before any work, nothing written.
The weights a LoRA adapts are written by the base export unchanged (names.py's `same`), so A and
B need no transform of their own; any other row is refused rather than guessed.

Types: B (the trained values) is always F32, so the update is the adapter's own; A is F32
(`--dtype same`/`fp32`: exact against an fp32 base), or F16 (`--dtype fp16`: bone's 0/1 entries are
exact in f16, half A's size; llama.cpp then rounds the activations entering A to f16, as an f16 or
q8_0 base's own product rounds them, so choose it for those bases only)."""
import math
import os
import sys

import gguf
import numpy as np
import torch

from ..bone import AdapterError, check_base, plan_merge, read_adapter
from ..bone.functional import lora_factors
from ..checkpoint import atomic_write, clean_stale_temporaries, load_checkpoint, new_config
from . import ExportError, check_output, check_room
from .gguf import convert
from .names import GGUF_ARCH, GGUF_LORA, GGUF_TABLES, same

Q = gguf.GGMLQuantizationType
ADAPTER_DTYPES = ("same", "fp32", "fp16")
A_TYPE = {"same": Q.F32, "fp32": Q.F32, "fp16": Q.F16}


def refuse_unservable(sd, meta, source):
    """One sentence for what a LoRA file cannot hold, before any other work."""
    if meta["mode"] == "bat":
        raise ExportError(f"{source} is a bat adapter, whose update W B + B depends on the base weight and has no "
                          "small exact rank, so no LoRA file can hold it: merge it instead (merge.py --format gguf).")
    # A trained state is a train part ("state", att.time_state) in newer files, a bare tensor in older ones.
    states = [k for k in sd if k.endswith("time_state")] or (["state"] if "state" in meta["train_parts"] else [])
    parts = [p for p in meta["train_parts"] if p != "state"]
    if parts or states:
        what = (f"trained {', '.join(parts)} parameters" if parts else "") + (" and " if parts and states else "") \
            + (f"a trained state ({states[0]})" if states else "")
        raise ExportError(f"{source} holds {what} besides its adapters, which a LoRA file cannot hold (llama.cpp "
                          "adds only B A to the projections): merge it instead (merge.py --format gguf).")


def base_shapes(meta, source, model=None):
    """(family, n_layer, {official key: shape}, fingerprint, (state dict, config) of `model` or None) of
    the base: read off `model` when given, else rebuilt from the sizes the adapter file records."""
    if model is not None:
        sd, config = load_checkpoint(model, mmap=True)
        return (config.family, config.n_layer, {k: tuple(v.shape) for k, v in sd.items()}, config.fingerprint(),
                (sd, config))
    fp = meta.get("fingerprint")
    if not fp:
        raise ExportError(f"{source} does not record its base model's sizes (an older file): pass --model with the "
                          "base .pth as well.")
    family = fp.get("family", "x060")
    config = new_config(family, fp["vocab_size"], fp["n_embd"], fp["n_layer"], fp["dim_ffn"], fp["head_size"])
    return family, config.n_layer, dict(config.shapes()), fp, None


def is_state(key):
    return key.endswith(".att.time_state")


def without_state(sd, meta):
    """An adapter's tensors and metadata less its trained state (train part "state"), which goes beside
    the LoRA file (export.py): what the LoRA file is to hold."""
    return ({k: v for k, v in sd.items() if not is_state(k)},
            {**meta, "train_parts": [p for p in meta["train_parts"] if p != "state"]})


class LoraPlan:
    """Header first (from shapes), then each A and B made and written one pair at a time. With
    `model`, the adapter is checked against that base as merge.py checks it: its sizes and family,
    then the fingerprint of the base's weights the adapter records (bone.check_base: another base is
    one sentence, unless allow_other_base, which makes it a note, self.note). state_beside: the
    adapter's trained state is written beside the LoRA (export.py) and left out here."""

    def __init__(self, adapter, dtype="same", model=None, name=None, allow_other_base=False, state_beside=False):
        if dtype not in ADAPTER_DTYPES:
            raise ExportError(f"--dtype {dtype} cannot be written for an adapter: its B is always fp32 and its A "
                              f"{', '.join(ADAPTER_DTYPES[1:])} (same: fp32).")
        sd, meta, source = read_adapter(adapter, mmap=True)
        if state_beside:
            sd, meta = without_state(sd, meta)
        refuse_unservable(sd, meta, source)
        family, n_layer, shapes, fingerprint, base = base_shapes(meta, source, model)
        mode, plan = plan_merge(shapes, fingerprint, adapter)
        # merge.py's check of the base (src/bone/base_hash.py), after the sizes, before any work.
        self.note = None if base is None else check_base(adapter, base[0], base[1], model, allow_other_base)
        if state_beside:
            plan = {k: change for k, change in plan.items() if not is_state(k)}
        targets = {keys[0]: out for out, keys, transform in GGUF_TABLES[family](n_layer)
                   if transform is same and out.rsplit(".", 2)[-2] in GGUF_LORA}
        self.rows, ranks = [], set()
        for key, (_, tensors, scaling) in plan.items():
            if key not in targets:
                raise ExportError(f"{source} adapts {key}, to which llama.cpp applies no LoRA: merge it instead.")
            out_f, in_f = shapes[key]
            r = (tensors[0] if mode == "lora" else tensors).shape[0]
            ranks.add(r)
            self.rows.append((targets[key], key, tensors, (r, in_f), (out_f, r)))
        lora_alpha = meta.get("lora_alpha")
        # llama.cpp scales by alpha / r with one alpha per file: bone's alpha = r gives 1; with several
        # ranks (rank_pattern) alpha 0, which llama.cpp reads as alpha / r = 1 for every module.
        if mode == "lora":
            self.alpha = float(lora_alpha or 0.0)
        else:
            self.alpha = float(ranks.pop()) if len(ranks) == 1 else 0.0
        self.mode, self.a_type, self.source = mode, A_TYPE[dtype], source
        w = self.writer = gguf.GGUFWriter(path=None, arch=GGUF_ARCH[family])
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(name or os.path.splitext(os.path.basename(os.fspath(adapter)))[0])
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, self.alpha)
        nbytes = 4096
        for out, _, _, a_shape, b_shape in self.rows:
            for suffix, shape, qtype in ((".lora_a", a_shape, self.a_type), (".lora_b", b_shape, Q.F32)):
                size = math.prod(shape) * (2 if qtype == Q.F16 else 4)
                w.add_tensor_info(out + suffix, shape, np.dtype(np.float32), size, raw_dtype=qtype)
                nbytes += len(out) + 72 + size + gguf.GGUF_DEFAULT_ALIGNMENT
        self.nbytes = nbytes
        self.line = (f"llama.cpp LoRA adapter for {GGUF_ARCH[family]}, from a {mode} adapter ({len(self.rows)} "
                     f"weights, rank {', '.join(str(r) for r in sorted({row[3][0] for row in self.rows}))}, "
                     f"alpha {self.alpha:g}, A {self.a_type.name}, B F32)")

    def write(self, output, progress=False):
        w = self.writer

        def write(f):
            w.fout, w.state = [f], gguf.WriterState.EMPTY
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, (out, key, tensors, a_shape, b_shape) in enumerate(self.rows):
                a, b = lora_factors(tensors, self.mode, b_shape[0], a_shape[1])
                w.write_tensor_data(convert(a.float(), self.a_type, f"{out}.lora_a (from {key})"))
                w.write_tensor_data(convert(b.float(), Q.F32, f"{out}.lora_b (from {key})"))
                if progress:
                    print(f"\rexport: {i + 1}/{len(self.rows)} weights", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)
            w.flush()
            w.fout = None

        atomic_write(output, write)


def export_adapter(adapter, output, dtype="same", model=None, overwrite=False, progress=True, name=None,
                   allow_other_base=False, state_beside=False):
    """Write `adapter` as a llama.cpp LoRA GGUF to `output` (checked against the base `model` when
    given, as merge.py checks it; another base is refused unless allow_other_base, then a note).
    state_beside: its trained state is left out (export.py writes it beside). Returns (bytes
    written, one line saying what was written)."""
    say = lambda m: print(f"export: {m}", file=sys.stderr)  # noqa: E731
    try:
        plan = LoraPlan(adapter, dtype, model, name, allow_other_base, state_beside)
    except AdapterError as e:
        raise ExportError(str(e)) from None
    if plan.note:
        say(plan.note)
    existing = check_output(output, adapter, overwrite)
    check_room(existing, plan.nbytes)
    clean_stale_temporaries(output, say=say)
    plan.write(output, progress=progress and sys.stderr.isatty())
    return os.path.getsize(output), plan.line

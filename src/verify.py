"""Checking a merged file end to end: the `rwkv` runtime reads it and must give the logits that
this repository's model gives with the base weights and the adapter active, run the way it was
trained (the base held quantized when the adapter records a train.py --quant run); then the
merged model writes a short continuation. Used by merge.py --verify and scripts/verify_merged.py."""
import os

import torch

from .bone import load_adapter, read_adapter
from .checkpoint import load_checkpoint
from .model import RWKV6
from .quant import quantize_model
from .tokenizer import world_tokenizer

WORLD_VOCAB = 65536
DEFAULT_PROMPT = "The old lighthouse keeper opened the door and"
KEPT = 0.1      # the verdict: the merged file may differ from base + adapter by 10% of the adapter's effect


def _rwkv_runtime(path):
    # The rwkv package reads these at its import; its CUDA kernel must not be built here.
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV
    return RWKV(os.fspath(path), strategy="cpu fp32", verbose=False)


def verify_merged(base, adapter, merged, prompt=DEFAULT_PROMPT, n_tokens=32, out=print):
    """Returns (max |logit difference| merged vs base+adapter, the same for base vs base+adapter,
    the verdict). Prints both, the verdict (the difference is at most 10% of the adapter's own
    effect, or of 1e-3 of the largest logit when the adapter changes almost nothing) and the merged
    model's greedy continuation of `prompt` (deterministic, so two runs compare; World tokenizer
    when the vocabulary is the World one, token ids otherwise)."""
    meta = read_adapter(adapter, mmap=True)[1]
    quant = meta.get("quant") or "none"

    def logits(with_adapter):
        # The base as the adapter was trained against: held quantized when the run was --quant.
        model = RWKV6.from_checkpoint(base, dtype=torch.float32, op="cpu").eval().requires_grad_(False)
        if with_adapter:
            load_adapter(model, adapter)
        quantize_model(model, quant, keys=meta.get("quantized"))
        with torch.no_grad():
            return model(idx)[0][0]

    vocab = load_checkpoint(base)[1].vocab_size
    tokenizer = world_tokenizer() if vocab == WORLD_VOCAB else None
    ids = tokenizer.encode(prompt) if tokenizer else [i % vocab for i in range(1, 17)]
    idx = torch.tensor([ids])
    plain, adapted = logits(False), logits(True)
    trained = "" if quant == "none" else f", base held {quant} as in training"
    runtime = _rwkv_runtime(merged)
    with torch.no_grad():
        logits, state = runtime.forward(ids, None, full_output=True)
        diff = (logits.float() - adapted).abs().max().item()
        effect = (plain - adapted).abs().max().item()
        out(f"verify: max |logit difference| over {len(ids)} tokens, merged file in the rwkv runtime vs base + "
            f"adapter in this repository's model{trained}: {diff:.3e} (the adapter itself moves the logits by up to "
            f"{effect:.3e})")
        allowed = max(KEPT * effect, 1e-3 * adapted.abs().max().item())
        ok = diff <= allowed
        out(f"verify: {'PASS' if ok else 'FAIL'}: the merged file {'reproduces' if ok else 'does NOT reproduce'} base + "
            f"adapter (difference {diff / max(effect, 1e-30):.1%} of the adapter's effect; allowed {allowed:.3e})"
            + ("" if ok else ": merge again with --dtype fp32"))
        new, last = [], logits[-1]
        for _ in range(n_tokens):
            new.append(int(last.argmax()))
            last, state = runtime.forward([new[-1]], state)
    text = repr(prompt + tokenizer.decode(new)) if tokenizer else f"{ids} -> {new}"
    out(f"verify: the merged model continues the prompt (greedy): {text}")
    return diff, effect, ok

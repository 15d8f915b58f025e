"""Checking a merged file end to end: the `rwkv` runtime reads it and must give the logits that
this repository's model gives with the base weights and the adapter active, run the way it was
trained (the base held quantized when the adapter records a train.py --quant run); then the
merged model writes a short continuation. Used by merge.py --verify and scripts/verify_merged.py."""
import torch

from .bone import read_adapter
from .checkpoint import load_checkpoint
from .generation import WORLD_VOCAB, load_model
from .rwkv_package import run_rwkv_package
from .state_file import read_states
from .tokenizer import world_tokenizer

DEFAULT_PROMPT = "The old lighthouse keeper opened the door and"
KEPT = 0.1      # the verdict: the merged file may differ from base + adapter by 10% of the adapter's effect


def verify_merged(base, adapter, merged, prompt=DEFAULT_PROMPT, n_tokens=32, out=print, state=None):
    """Returns (max |logit difference| merged vs base+adapter, the same for base vs base+adapter,
    the verdict). Prints both, the verdict (the difference is at most 10% of the adapter's own
    effect, or of 1e-3 of the largest logit when the adapter changes almost nothing) and the merged
    model's greedy continuation of `prompt` (deterministic, so two runs compare; World tokenizer
    when the vocabulary is the World one, token ids otherwise). state: the state file merge.py wrote
    beside an RWKV-7 merge, passed to the package as its initial state (as RWKV-Runner does)."""
    meta = read_adapter(adapter, mmap=True)[1]
    quant = meta.get("quant") or "none"

    def logits(with_adapter):
        # The base as the adapter was trained against: held quantized when the run was --quant.
        model = load_model(base, adapter, apply_adapter=with_adapter)
        with torch.no_grad():
            return model(idx)[0][0]

    config = load_checkpoint(base)[1]
    vocab = config.vocab_size
    tokenizer = world_tokenizer() if vocab == WORLD_VOCAB else None
    ids = tokenizer.encode(prompt) if tokenizer else [i % vocab for i in range(1, 17)]
    idx = torch.tensor([ids])
    plain, adapted = logits(False), logits(True)
    trained = "" if quant == "none" else f", base held {quant} as in training"
    # In the package's own process (its RWKV-7 class is chosen at import); greedy, no penalties.
    package = run_rwkv_package(merged, config.family, ids, n_tokens,
                               initial_state=None if state is None else read_states(state, config))
    diff = (package["logits"] - adapted).abs().max().item()
    effect = (plain - adapted).abs().max().item()
    out(f"verify: max |logit difference| over {len(ids)} tokens, merged file in the rwkv runtime vs base + "
        f"adapter in this repository's model{trained}: {diff:.3e} (the adapter itself moves the logits by up to "
        f"{effect:.3e})")
    allowed = max(KEPT * effect, 1e-3 * adapted.abs().max().item())
    ok = diff <= allowed
    out(f"verify: {'PASS' if ok else 'FAIL'}: the merged file {'reproduces' if ok else 'does NOT reproduce'} base + "
        f"adapter (difference {diff / max(effect, 1e-30):.1%} of the adapter's effect; allowed {allowed:.3e})"
        + ("" if ok else ": merge again with --dtype fp32"))
    new = package["continuation"]
    text = repr(prompt + tokenizer.decode(new)) if tokenizer else f"{ids} -> {new}"
    out(f"verify: the merged model continues the prompt (greedy): {text}")
    return diff, effect, ok

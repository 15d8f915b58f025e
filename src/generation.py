"""Generation: a base model with its adapter (or a merged file) run as trained, read over the
prompt once and then one token at a time through its state, each token chosen by
src/sampling.py. Used by generate.py and merge.py --verify."""
import codecs
import dataclasses

import torch

from .bone import load_adapter, read_adapter
from .family import from_checkpoint
from .quant import quantize_model
from .sampling import Sampler, weightless_ids

WORLD_VOCAB = 65536     # the World models' logits; the tokenizer's ids stop at 65529


def load_model(base, adapter=None, dtype=torch.float32, op="cpu", device="cpu", apply_adapter=True):
    """`base` (an official or merged .pth) with `adapter` applied, for inference, run as the
    adapter was trained: the base held quantized when it records a train.py --quant run.
    apply_adapter=False gives that base alone (quantized the same way), for comparisons."""
    model = from_checkpoint(base, dtype=dtype, op=op).eval().requires_grad_(False)
    if adapter is not None:
        meta = read_adapter(adapter, mmap=True)[1]
        if apply_adapter:
            load_adapter(model, adapter)
            model.requires_grad_(False)
        # Quantized on the target device, so that it never holds the full-precision base.
        quantize_model(model, meta.get("quant") or "none", device=device, keys=meta.get("quantized"))
    return model.to(device)


def model_step(model):
    """step(ids, state) -> (logits of the last position [vocab], new state), the form the `rwkv`
    runtime's RWKV.forward has, for our model."""
    device = model.ln_out.weight.device

    @torch.no_grad()
    def step(ids, state):
        logits, state = model(torch.tensor([ids], device=device), state, full_output=False)
        return logits[0, -1], state
    return step


def generate(step, prompt_ids, max_tokens, sampler, token_stop=()):
    """Yields up to max_tokens ids: the prompt read once, then each chosen token fed back
    through the state; stops early at an id in token_stop (not yielded)."""
    logits, state = step(list(prompt_ids), None)
    for _ in range(max_tokens):
        token = sampler(logits)
        if token in token_stop:
            return
        yield token
        logits, state = step([token], state)


def world_sampler(args, tokenizer, vocab_size=WORLD_VOCAB, generator=None):
    """A Sampler for a World-vocabulary model: ids past the tokenizer's (no text) are banned."""
    texts = {i: tokenizer.decode([i]) for i in range(tokenizer.vocab_size)}
    banned = tuple(args.token_ban) + tuple(range(tokenizer.vocab_size, vocab_size))
    args = dataclasses.replace(args, token_ban=banned)
    return Sampler(args, vocab_size, weightless_ids(texts), generator)


def stream_text(ids, tokenizer, write):
    """write() the text of each id as soon as its UTF-8 is complete (a character can span
    tokens); at the end what was written equals tokenizer.decode(all ids)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        write(decoder.decode(tokenizer.decode_bytes([i])))
    write(decoder.decode(b"", final=True))

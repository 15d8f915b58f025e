"""Generation: a base model with its adapter (or a merged file) run as trained, read over the
prompt once and then one token at a time through its state, each token chosen by
src/sampling.py; a chat (generate.py --chat) carried in the state turn to turn. Used by
generate.py and merge.py --verify."""
import codecs
import dataclasses
import mmap
import time

import torch
import torch.nn as nn

from .bone import load_adapter, read_adapter
from .chat_template import SEP, chat_prompt, clean_turn, render
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
    if device == "cpu":
        pack_for_decoding(model)
    return model.to(device)


def pack_for_decoding(model):
    """Copy the weights a token reads (every parameter but the embedding, of which a token reads one
    row) into one block of memory in huge pages where the system gives them, and store each plain
    nn.Linear weight with at least as many outputs as inputs transposed, input-major, as the `rwkv`
    package stores its matrices. Values, shapes, keys and Parameter objects stay; what changes is
    how fast a token streams them, measured on a 2-core EPYC, one thread, weights not in cache:
    - input-major: one-row products x W^T run 768 -> 65536 (the head) at 22 GB/s against 13,
      768 -> 3072 at 21 against 13, 768 -> 768 at 15 against 13; 3072 -> 768 is faster as stored
      (18 against 14.5), so a weight keeps its layout when it has more inputs than outputs;
    - huge pages (2 MB, madvise): 4-15% more tokens/s for whole models, the hardware prefetchers
      no longer stopping at every 4 KB page boundary."""
    transposed = {id(m.weight) for m in model.modules()
                  if isinstance(m, nn.Linear) and m.out_features >= m.in_features}   # not adapter or quantized layers
    params = [p for name, p in model.named_parameters() if name != "emb.weight"]
    sizes = [-(-p.nbytes // 64) * 64 for p in params]         # each at a cache line
    if hasattr(mmap, "MADV_HUGEPAGE"):      # Linux: private memory (shared memory has its own huge page rule)
        arena = mmap.mmap(-1, max(sum(sizes), 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    else:
        arena = mmap.mmap(-1, max(sum(sizes), 1))
    memory, offset = torch.frombuffer(arena, dtype=torch.uint8), 0
    for p, size in zip(params, sizes):
        block = memory[offset:offset + p.nbytes].view(p.dtype)
        offset += size
        if id(p) in transposed:
            p.data = block.view(p.shape[1], p.shape[0]).t().copy_(p.data)
        else:
            p.data = block.view(p.shape).copy_(p.data)


def model_step(model):
    """step(ids, state) -> (logits of the last position [vocab], new state), the form the `rwkv`
    runtime's RWKV.forward has, for our model."""
    device = model.ln_out.weight.device

    @torch.inference_mode()
    def step(ids, state):
        logits, state = model(torch.tensor([ids], device=device), state, full_output=False)
        return logits[0, -1], state
    return step


def generate(step, prompt_ids, max_tokens, sampler, token_stop=()):
    """Yields up to max_tokens ids: the prompt read once, then each chosen token fed back
    through the state; stops early at an id in token_stop (not yielded)."""
    logits, state = step(list(prompt_ids), None)
    for token, _ in continuation(step, logits, state, max_tokens, sampler, token_stop):
        yield token


def best_time(run, repeat):
    """The least of `repeat` timed calls of run(), after one untimed call (warm-up), in seconds."""
    run()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def generation_times(step, prompt, short_prompt, new_tokens, repeat):
    """(prefill, per token) seconds of generating through step, each the best of `repeat` after a
    warm-up: prefill reads `prompt` in one call; per token is the time of new_tokens + 1 greedy
    tokens after short_prompt less the time of 1 (the prompt and the first token), over new_tokens."""
    def tokens(n):
        return lambda: list(generate(step, short_prompt, n, lambda logits: int(logits.argmax())))
    prefill = best_time(lambda: step(list(prompt), None), repeat)
    return prefill, (best_time(tokens(new_tokens + 1), repeat) - best_time(tokens(1), repeat)) / new_tokens


def continuation(step, logits, state, max_tokens, sampler, token_stop=()):
    """Yields (id, the state after it) for up to max_tokens ids, the first chosen from logits and
    each fed back through the state; stops early at an id in token_stop (neither yielded nor fed)."""
    for _ in range(max_tokens):
        token = sampler(logits)
        if token in token_stop:
            return
        logits, state = step([token], state)
        yield token, state


class Chat:
    """A multi-turn chat in RWKV's format (src/chat_template.py) carried in the model's state, as
    the `rwkv` package's chat demo runs it: each turn reads only its own prompt
    (`User: msg\n\nAssistant:`), never the history again; a reply ends at the first `\n\n` of
    its decoded text, and the state carried on is the one after the id that completed it (ids
    such as `\n\n ` hold more than the separator). `messages` (cleaned turns, a system turn
    first or none) resume a chat: their rendered text is read once, with the first new prompt."""

    def __init__(self, step, tokenizer, sampler, max_tokens, token_stop=(), messages=()):
        self.step, self.tokenizer, self.sampler = step, tokenizer, sampler
        self.max_tokens, self.token_stop = max_tokens, token_stop
        self.messages = [dict(m) for m in messages]
        self.pending = render(self.messages)[0]     # text the state has not read yet
        self.state = None                            # None: the model's own initial state

    def reply(self, message, write=None):
        """The reply to a user message (its text before the `\n\n`, cleaned as a turn is), streamed
        raw to write(text) as it comes (leading space included, nothing of the separator). An
        interrupt leaves the chat as it was before the message."""
        prompt = self.tokenizer.encode(self.pending + chat_prompt(message))
        logits, state = self.step(prompt, self.state)
        self.sampler.reset()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, shown, closed = "", 0, False
        for token, state in continuation(self.step, logits, state, self.max_tokens, self.sampler, self.token_stop):
            text += decoder.decode(self.tokenizer.decode_bytes([token]))
            closed = SEP in text
            text = text[:text.find(SEP)] if closed else text
            # A trailing "\n" waits: the next id may make it the separator.
            ready = len(text) if closed or not text.endswith("\n") else len(text) - 1
            if write and ready > shown:
                write(text[shown:ready])
                shown = ready
            if closed:
                break
        if not closed:      # --max_tokens or a stop id: the turn is closed in the state all the same
            text += decoder.decode(b"", final=True)
            if write and len(text) > shown:
                write(text[shown:])
            state = self.step(self.tokenizer.encode(SEP), state)[1]
        self.state, self.pending = state, ""
        self.messages += [{"role": "user", "content": clean_turn(message)},
                          {"role": "assistant", "content": clean_turn(text)}]
        return clean_turn(text)


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

"""Choosing the next token from a model's logits with the meaning of the `rwkv` package's
PIPELINE_ARGS (rwkv.utils): temperature, top_p, top_k, alpha_presence, alpha_frequency,
alpha_decay and token_ban, applied in PIPELINE.generate's order. Draws come from a
torch.Generator, so a seeded run repeats exactly, on any device (logits are sampled on the CPU)."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingArgs:
    temperature: float = 1.0    # 0: greedy
    top_p: float = 0.85         # keep the most likely tokens that together reach this probability
    top_k: int = 0              # keep at most this many tokens (0: no limit)
    alpha_presence: float = 0.2     # subtracted from a token's logit once it has been generated
    alpha_frequency: float = 0.2    # subtracted per (decayed) occurrence
    alpha_decay: float = 0.996      # each new token multiplies earlier occurrence counts by this
    token_ban: tuple = ()           # ids never generated

    def check(self):
        """One sentence for a value PIPELINE would accept silently but that means nothing."""
        for name, ok, want in (("temperature", self.temperature >= 0, "0 (greedy) or more"),
                               ("top_p", 0 <= self.top_p <= 1, "between 0 and 1"),
                               ("top_k", self.top_k >= 0, "0 (no limit) or more"),
                               ("alpha_decay", 0 <= self.alpha_decay <= 1, "between 0 and 1")):
            if not ok:
                raise ValueError(f"--{name} {getattr(self, name)} is out of range: give a value {want}.")
        return self


GREEDY = SamplingArgs(temperature=0, alpha_presence=0, alpha_frequency=0)   # the most likely token, no penalties


def distribution(logits, temperature=1.0, top_p=0.85, top_k=0):
    """PIPELINE.sample_logits' distribution (temperature > 0): the softmax; zero below the
    probability at which the descending cumulative sum first reaches top_p (every token kept if
    rounding leaves it short, where PIPELINE would fall back to greedy); only the top_k most
    likely kept; then probs ** (1 / temperature), renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    ranked = probs.sort(descending=True).values
    reached = torch.nonzero(ranked.cumsum(-1) >= top_p)
    cutoff = ranked[reached[0, 0]] if len(reached) else ranked[-1]
    keep = probs >= cutoff
    if 0 < top_k < len(probs):
        keep &= torch.zeros_like(keep).scatter_(0, probs.topk(top_k).indices, True)
    probs = torch.where(keep, probs, 0) ** (1.0 / temperature)
    return probs / probs.sum()


class Sampler:
    """The next token from each step's logits, with PIPELINE.generate's repetition penalty:
    logits minus alpha_presence + count * alpha_frequency for every token generated so far,
    where each new token first decays all counts by alpha_decay and then adds 1 to its own,
    0 when its text is a substring of " \\t0123456789" (PIPELINE's test: spaces and digits
    get the presence penalty only). `weightless` lists those ids (see `weightless_ids`)."""

    def __init__(self, args: SamplingArgs, vocab_size, weightless=(), generator=None):
        self.args, self.generator = args.check(), generator
        self.counts = torch.zeros(vocab_size)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.weight = torch.ones(vocab_size)
        self.weight[list(weightless)] = 0.0
        self.ban = list(args.token_ban)

    def reset(self):
        """Forget the tokens generated so far (a chat's next reply: PIPELINE's chat demo penalises
        repetition within a reply, not across the conversation)."""
        self.counts.zero_()
        self.seen.zero_()

    def __call__(self, logits):
        a = self.args
        logits = logits.detach().float().cpu().clone()
        logits[self.ban] = -float("inf")
        logits -= torch.where(self.seen, a.alpha_presence + self.counts * a.alpha_frequency, 0.0)
        if a.temperature == 0:
            token = int(logits.argmax())
        else:
            probs = distribution(logits, a.temperature, a.top_p, a.top_k)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts *= a.alpha_decay
        self.counts[token] += self.weight[token]
        self.seen[token] = True
        return token


def weightless_ids(token_text):
    """Ids whose text PIPELINE counts with weight 0: {i: text} -> ids with text in " \\t0123456789"."""
    return [i for i, text in token_text.items() if text in " \t0123456789"]

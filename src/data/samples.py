"""The map-style datasets the trainer draws from. Item i of every dataset is a pure function of
(seed, i), so a resumed run gets the same samples for the same global sample index. Each item is
(input_ids LongTensor[ctx_len], targets LongTensor[ctx_len], loss_mask FloatTensor[ctx_len]) with
targets the inputs shifted by one."""
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import EOD, DataError


class Samples(Dataset):
    """What every dataset here shares: item i is defined for any i >= 0 (a global sample
    counter); len() is one epoch; iterating goes over one epoch."""

    def __init__(self, ctx_len, seed, num_samples, summary):
        self.ctx_len, self.seed, self.num_samples, self.summary = ctx_len, seed, num_samples, summary

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        if i < 0:
            raise IndexError(f"sample index {i} is negative.")
        return self.sample(int(i))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def rng(self, key):
        return np.random.default_rng((self.seed, key))

    def item(self, ids, mask):
        """(inputs, targets, loss mask) from ctx_len+1 ids and the mask of those ids as targets."""
        ids = torch.from_numpy(ids.astype(np.int64))
        return ids[:-1], ids[1:], torch.from_numpy(mask[1:].astype(np.float32))


class WindowDataset(Samples):
    """Windows of ctx_len+1 tokens at random offsets in one token stream. `mask` (same length
    as tokens, optional) marks the tokens to learn; when given, a window with nothing to learn
    is redrawn (up to 8 draws, still a function of (seed, i))."""
    DRAWS = 8

    def __init__(self, tokens, ctx_len, seed=0, mask=None, num_samples=None, summary=""):
        super().__init__(ctx_len, seed, num_samples or max(1, len(tokens) // ctx_len), summary)
        self.tokens, self.mask = tokens, mask

    def offset(self, i):
        rng = self.rng(i)
        for _ in range(self.DRAWS):
            o = int(rng.integers(0, len(self.tokens) - self.ctx_len))  # the last window ends at the last token
            if self.mask is None or self.mask[o + 1:o + self.ctx_len + 1].any():
                break
        return o

    def sample(self, i):
        o = self.offset(i)
        span = slice(o, o + self.ctx_len + 1)
        mask = np.ones(self.ctx_len + 1, np.float32) if self.mask is None else self.mask[span]
        return self.item(self.tokens[span], mask)

    def __getstate__(self):
        # A DataLoader worker started by spawn gets the file's name, not a pickled copy of it.
        state = self.__dict__.copy()
        for key in ("tokens", "mask"):
            if isinstance(state[key], np.memmap):
                state[key] = (state[key].filename, state[key].dtype.str, state[key].offset, state[key].shape)
        return state

    def __setstate__(self, state):
        for key in ("tokens", "mask"):
            if isinstance(state[key], tuple):
                name, dtype, offset, shape = state[key]
                state[key] = np.memmap(name, np.dtype(dtype), "r", offset, shape)
        self.__dict__.update(state)


class PaddedDataset(Samples):
    """One document per sample: its first ctx_len+1 tokens, padded with EOD, padding masked
    out. Every epoch visits each document once, in an order drawn from (seed, epoch)."""

    def __init__(self, docs, masks, ctx_len, seed=0, summary=""):
        super().__init__(ctx_len, seed, len(docs), summary)
        self.docs, self.masks = docs, masks
        self.order = (None, None)  # (epoch, permutation): drawing one is O(documents)

    def document(self, i):
        epoch = i // len(self.docs)
        if self.order[0] != epoch:
            self.order = (epoch, self.rng(epoch).permutation(len(self.docs)))
        return int(self.order[1][i % len(self.docs)])

    def sample(self, i):
        d = self.document(i)
        return self.padded(self.docs[d], self.masks[d])

    def padded(self, doc, doc_mask):
        """The item of one document: its first ctx_len+1 tokens, padded with EOD (masked)."""
        ids = np.full(self.ctx_len + 1, EOD, np.int64)
        mask = np.zeros(self.ctx_len + 1, np.float32)
        n = min(len(doc), self.ctx_len + 1)
        ids[:n], mask[:n] = doc[:n], doc_mask[:n]
        return self.item(ids, mask)


class DocumentStream:
    """Some documents of a token array (a memmap) as one stream, without copying them: len()
    and slices, as WindowDataset reads its tokens. starts, sizes: each document's place."""

    def __init__(self, tokens, starts, sizes):
        self.tokens, self.dtype = tokens, tokens.dtype
        self.starts, self.sizes = np.asarray(starts, np.int64), np.asarray(sizes, np.int64)
        self.ends = np.cumsum(self.sizes)     # where each document ends in this stream

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, span):
        start, stop, _ = span.indices(len(self))
        i, pieces = int(np.searchsorted(self.ends, start, side="right")), []
        while start < stop:
            end = min(stop, int(self.ends[i]))
            at = int(self.starts[i] + start - (self.ends[i] - self.sizes[i]))
            pieces.append(self.tokens[at:at + end - start])
            start, i = end, i + 1
        return np.concatenate(pieces) if pieces else self.tokens[:0]


def held_out(n_docs, fraction, seed, source="the data"):
    """Sorted indices of the documents --val_split holds out of training: round(fraction * n),
    at least one and never all, drawn from the seed alone (so a resumed run holds out the same)."""
    if not 0 < fraction < 1:
        raise DataError(f"--val_split {fraction} is not a fraction between 0 and 1 of the documents.")
    if n_docs < 2:
        raise DataError(f"{source} holds a single document: --val_split needs two or more, or give --val_data.")
    k = min(n_docs - 1, max(1, round(fraction * n_docs)))
    return np.sort(np.random.default_rng((seed, 0x7A1)).permutation(n_docs)[:k])


def padded_sft(docs, masks, ctx_len, seed, summary):
    """PaddedDataset of SFT documents, saying how many get cut and refusing data where no
    response token survives the cut."""
    cut = [len(d) > ctx_len + 1 for d in docs]
    # the first id is never a target, so a response must start within ids 1..ctx_len
    lost = [not m[1:ctx_len + 1].any() for m in masks]
    if all(lost):
        raise DataError(f"no document has a response token within its first {ctx_len + 1} tokens: nothing to learn at ctx_len {ctx_len}.")
    if any(cut):
        warnings.warn(f"{sum(cut)} of {len(docs)} SFT documents are longer than ctx_len + 1 = {ctx_len + 1} "
                      f"tokens and are cut ({sum(lost)} of them lose every response token).", stacklevel=3)
    return PaddedDataset(docs, masks, ctx_len, seed, summary)

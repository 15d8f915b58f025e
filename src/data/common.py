"""What every data format shares: the error it raises, the end-of-document id, the vocabulary check."""
import numpy as np

EOD = 0  # end-of-document and padding id: the World tokenizer never produces it


class DataError(ValueError):
    """Training data that cannot be used; the message says why in one sentence."""


def check_ids(tokens, vocab_size, source):
    """Every id in 0..vocab_size-1, checked in slices so a memmap is streamed, not loaded."""
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return  # the dtype cannot hold a bad id (uint16 data for a 65536-id model)
    low, high = 0, 0
    for i in range(0, len(tokens), 1 << 24):
        part = tokens[i:i + (1 << 24)]
        low, high = min(low, int(part.min())), max(high, int(part.max()))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(f"{source} holds token id {bad} (max {high}), outside the model's vocabulary of {vocab_size} ids: it was tokenized for another model.")



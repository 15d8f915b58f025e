"""Training data, one module per format: binidx (Megatron .bin/.idx, read and written), text
(jsonl), sft (single-turn prompt/response), chat (multi-turn conversations); samples holds the
map-style datasets the trainer draws from, and make_dataset builds one. Bad data is refused while
the dataset is built, with one sentence (DataError), before any training starts."""
import os

import numpy as np

from .binidx import BinIdx, BinIdxWriter, binidx_prefix, write_binidx
from .common import EOD, DataError, check_ids
from .samples import DocumentStream, PaddedDataset, Samples, WindowDataset, held_out, padded_sft
from .sft import SFT_TEMPLATE, read_sft, sft_parts
from .text import iter_jsonl

__all__ = ["BinIdx", "BinIdxWriter", "DATA_TYPES", "DataError", "DocumentStream", "EOD", "PaddedDataset",
           "SFT_TEMPLATE", "Samples", "WindowDataset", "binidx_prefix", "check_ids", "held_out", "iter_jsonl",
           "make_dataset", "padded_sft", "read_sft", "sft_parts", "write_binidx"]

DATA_TYPES = ("binidx", "jsonl", "sft", "sft_padded")


def make_dataset(data_file, data_type, ctx_len, vocab_size, seed=0, num_samples=None, *,
                 text_field="text", prompt_field="prompt", response_field="response",
                 template=SFT_TEMPLATE, tokenizer=None, val_split=0.0, part="train"):
    """The training dataset of `data_type`:
    binidx     PREFIX.bin/.idx, random windows over the whole token stream, every token learnt;
    jsonl      {text_field: ...} per line, tokenized once, documents each followed by EOD, windows;
    sft        {prompt_field, response_field} per line through `template`, windows over the
               joined documents, loss only on response tokens and the EOD after each;
    sft_padded the same documents one per sample, padded with EOD (masked), cut at ctx_len+1.
    num_samples (windows only) is the epoch length, by default tokens // ctx_len.
    val_split > 0: only the documents `held_out` (part="val") or only the others (part="train")."""
    if data_type not in DATA_TYPES:
        raise DataError(f"data_type must be one of {', '.join(DATA_TYPES)}, not {data_type!r}.")
    if not (isinstance(ctx_len, int) and ctx_len > 0):
        raise DataError(f"ctx_len must be a positive integer, not {ctx_len!r}.")
    if not (isinstance(seed, int) and seed >= 0):
        raise DataError(f"seed must be a non-negative integer, not {seed!r}.")
    data_file = os.fspath(data_file)
    if tokenizer is None and data_type != "binidx":
        from ..tokenizer import world_tokenizer
        tokenizer = world_tokenizer()

    if data_type == "binidx":
        data = BinIdx(data_file)
        tokens, mask, source = data.tokens, None, data.prefix + ".bin"
        what = f"{len(data):,} documents"
    elif data_type == "jsonl":
        docs = [np.array(tokenizer.encode(text) + [EOD], np.int32) for _, (text,), _ in iter_jsonl(data_file, (text_field,))]
        tokens, mask, source = np.concatenate(docs), None, data_file
        what = f"{len(docs):,} documents"
    else:
        docs, masks = read_sft(data_file, tokenizer, prompt_field, response_field, template)
        tokens, mask, source = np.concatenate(docs), np.concatenate(masks), data_file
        what = f"{len(docs):,} SFT documents"

    check_ids(tokens, vocab_size, source)
    if val_split:
        n = len(data) if data_type == "binidx" else len(docs)
        out = held_out(n, val_split, seed, source)
        keep = out if part == "val" else np.setdiff1d(np.arange(n), out)
        what += f", {'the' if part == 'val' else 'all but the'} {len(out):,} held out for validation"
        if data_type == "binidx":
            tokens = DocumentStream(data.tokens, data.pointers[keep] // data.dtype.itemsize, data.sizes[keep])
        else:
            docs = [docs[i] for i in keep]
            tokens = np.concatenate(docs)
            if data_type != "jsonl":
                masks = [masks[i] for i in keep]
                mask = np.concatenate(masks)
        source = f"{source} ({part} part)"
    if data_type == "sft_padded":
        return padded_sft(docs, masks, ctx_len, seed, f"{data_type} {data_file}: {what}, one per sample")
    if len(tokens) < ctx_len + 1:
        raise DataError(f"{source} holds {len(tokens)} tokens, fewer than the ctx_len + 1 = {ctx_len + 1} one sample needs.")
    summary = f"{data_type} {data_file}: {what}, {len(tokens):,} tokens, random windows of {ctx_len} tokens"
    return WindowDataset(tokens, ctx_len, seed, mask, num_samples, summary)



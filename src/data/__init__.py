"""Training data, one module per format: binidx (Megatron .bin/.idx, read and written), text
(jsonl), sft (single-turn prompt/response), chat (multi-turn conversations); samples holds the
map-style datasets the trainer draws from, and make_dataset builds one. Bad data is refused while
the dataset is built, with one sentence (DataError), before any training starts."""
import os

import numpy as np

from .binidx import BinIdx, BinIdxWriter, binidx_prefix, write_binidx
from .chat import LOSS_ON, LOSS_WHAT, ChatFormat, cut_at_turns, read_chat
from .common import EOD, DataError, check_ids
from .samples import DocumentStream, PaddedDataset, Samples, WindowDataset, held_out, padded_sft
from .sft import SFT_TEMPLATE, read_sft, sft_parts
from .text import iter_jsonl

__all__ = ["BinIdx", "BinIdxWriter", "ChatFormat", "DATA_TYPES", "LOSS_ON", "DataError", "DocumentStream", "EOD", "PaddedDataset",
           "SFT_TEMPLATE", "Samples", "WindowDataset", "binidx_prefix", "check_ids", "data_options", "held_out",
           "iter_jsonl", "make_dataset", "padded_sft", "read_sft", "sft_parts", "write_binidx"]

DATA_TYPES = ("binidx", "jsonl", "sft", "sft_padded", "chat", "chat_padded")


def make_dataset(data_file, data_type, ctx_len, vocab_size, seed=0, num_samples=None, *,
                 text_field="text", prompt_field="prompt", response_field="response",
                 template=SFT_TEMPLATE, chat=None, tokenizer=None, val_split=0.0, part="train"):
    """The training dataset of `data_type`:
    binidx      PREFIX.bin/.idx, random windows over the whole token stream, every token learnt
                (or, with a PREFIX.mask from make_binidx.py --chat, the tokens it marks);
    jsonl       {text_field: ...} per line, tokenized once, documents each followed by EOD, windows;
    sft         {prompt_field, response_field} per line through `template`, windows over the
                joined documents, loss only on response tokens and the EOD after each;
    sft_padded  the same documents one per sample, padded with EOD (masked), cut at ctx_len+1;
    chat        conversations (src/data/chat.py; `chat` a ChatFormat: fields, role names, loss_on),
                windows over the joined conversations, loss on the learnt replies;
    chat_padded the same conversations one per sample, a longer one cut at a turn's end.
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

    bounds = None
    if data_type == "binidx":
        data = BinIdx(data_file)
        tokens, mask, source = data.tokens, data.mask, data.prefix + ".bin"
        what = f"{len(data):,} documents" + (f", loss where {data.prefix}.mask says" if mask is not None else "")
    elif data_type == "jsonl":
        docs = [np.array(tokenizer.encode(text) + [EOD], np.int32)
                for _, (text,), _ in iter_jsonl(data_file, (text_field,), ("--text_field",))]
        tokens, mask, source = np.concatenate(docs), None, data_file
        what = f"{len(docs):,} documents"
    elif data_type.startswith("sft"):
        docs, masks = read_sft(data_file, tokenizer, prompt_field, response_field, template)
        tokens, mask, source = np.concatenate(docs), np.concatenate(masks), data_file
        what = f"{len(docs):,} SFT documents"
    else:
        chat = chat or ChatFormat(prompt_field=prompt_field, response_field=response_field)
        docs, masks, bounds, turns, changed = read_chat(data_file, tokenizer, chat)
        tokens, mask, source = np.concatenate(docs), np.concatenate(masks), data_file
        what = (f"{len(docs):,} conversations, {turns:,} turns ({changed:,} changed by the template's cleaning: "
                f"CRLF, blank lines, spaces at the ends), loss on {LOSS_WHAT[chat.loss_on]}")

    check_ids(tokens, vocab_size, source)
    if val_split:
        n = len(data) if data_type == "binidx" else len(docs)
        out = held_out(n, val_split, seed, source)
        keep = out if part == "val" else np.setdiff1d(np.arange(n), out)
        what += f", {'the' if part == 'val' else 'all but the'} {len(out):,} held out for validation"
        if data_type == "binidx":
            starts, sizes = data.pointers[keep] // data.dtype.itemsize, data.sizes[keep]
            tokens = DocumentStream(data.tokens, starts, sizes)
            mask = None if mask is None else DocumentStream(mask, starts, sizes)
        else:
            docs = [docs[i] for i in keep]
            tokens = np.concatenate(docs)
            if data_type != "jsonl":
                masks = [masks[i] for i in keep]
                mask = np.concatenate(masks)
            if bounds is not None:
                bounds = [bounds[i] for i in keep]
        source = f"{source} ({part} part)"
    if data_type == "sft_padded":
        return padded_sft(docs, masks, ctx_len, seed, f"{data_type} {data_file}: {what}, one per sample")
    if data_type == "chat_padded":
        docs, masks, cut = cut_at_turns(docs, masks, bounds, ctx_len + 1)
        if cut:
            what += (f"; {cut:,} longer than ctx_len + 1 = {ctx_len + 1} tokens, cut at a turn's end "
                     "(a larger --ctx_len, with --chunk_ctx to keep memory flat, trains them whole)")
        return padded_sft(docs, masks, ctx_len, seed, f"{data_type} {data_file}: {what}, one per sample")
    if len(tokens) < ctx_len + 1:
        raise DataError(f"{source} holds {len(tokens)} tokens, fewer than the ctx_len + 1 = {ctx_len + 1} one sample needs.")
    summary = f"{data_type} {data_file}: {what}, {len(tokens):,} tokens, random windows of {ctx_len} tokens"
    return WindowDataset(tokens, ctx_len, seed, mask, num_samples, summary)


def data_options(args):
    """make_dataset's keyword arguments from train.py's options (train.py and validation share them)."""
    chat = ChatFormat.from_options(args.chat_field, args.turn_keys, args.chat_roles, args.prompt_field,
                                   args.response_field, args.loss_on)
    return dict(text_field=args.text_field, prompt_field=args.prompt_field, response_field=args.response_field,
                template=args.sft_template, chat=chat)

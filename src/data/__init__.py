"""Training data, one module per format: binidx (Megatron .bin/.idx, read and written), text
(jsonl), sft (single-turn prompt/response), chat (multi-turn conversations); samples holds the
map-style datasets the trainer draws from, and make_dataset builds one. Bad data is refused while
the dataset is built, with one sentence (DataError), before any training starts."""
import os

import numpy as np

from .binidx import BinIdx, BinIdxWriter, binidx_prefix, write_binidx
from .chat import LOSS_ON, LOSS_WHAT, ChatFormat, cut_at_turns, iter_chat, read_chat
from .common import EOD, DataError, check_ids
from .samples import DocumentStream, PaddedDataset, Samples, WindowDataset, held_out, padded_sft
from .sft import SFT_TEMPLATE, read_sft, sft_parts
from .preference import preference_dataset, read_pairs
from .text import iter_jsonl

__all__ = ["BinIdx", "BinIdxWriter", "ChatFormat", "DATA_TYPES", "LOSS_ON", "DataError", "DocumentStream", "EOD", "PaddedDataset",
           "SFT_TEMPLATE", "Samples", "WindowDataset", "binidx_prefix", "add_data_options", "check_ids", "data_options", "documents",
           "iter_chat", "held_out",
           "iter_jsonl", "make_dataset", "padded_sft", "read_sft", "sft_parts", "write_binidx"]

DATA_TYPES = ("binidx", "jsonl", "sft", "sft_padded", "chat", "chat_padded", "preference")


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
    chat_padded the same conversations one per sample, a longer one cut at a turn's end;
    preference  {"prompt", "chosen", "rejected"} pairs (src/data/preference.py), one pair per sample.
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

    if data_type == "preference":
        pairs = read_pairs(data_file, tokenizer, chat or ChatFormat())
        check_ids(np.concatenate([ids for p in pairs for ids in (p[1], p[3])]), vocab_size, data_file)
        what = f"{len(pairs):,} preference pairs"
        if val_split:
            out = held_out(len(pairs), val_split, seed, data_file)
            keep = out if part == "val" else np.setdiff1d(np.arange(len(pairs)), out)
            pairs = [pairs[i] for i in keep]
            what += f", {'the' if part == 'val' else 'all but the'} {len(out):,} held out for validation"
        return preference_dataset(pairs, ctx_len, seed, f"{data_type} {data_file}: {what}, one pair per sample")

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


def documents(data_file, data_type, tokenizer, *, text_field="text", prompt_field="prompt",
              response_field="response", template=SFT_TEMPLATE, chat=None):
    """(where, ids, mask) for each document as training reads it, in file order (what
    scripts/show_data.py prints): mask[j] = 1 when token j is learnt as a target."""
    if data_type not in DATA_TYPES:
        raise DataError(f"data_type must be one of {', '.join(DATA_TYPES)}, not {data_type!r}.")
    if data_type == "binidx":
        data = BinIdx(data_file)
        for i in range(len(data)):
            start, size = int(data.pointers[i]) // data.dtype.itemsize, int(data.sizes[i])
            mask = np.ones(size, np.uint8) if data.mask is None else data.mask[start:start + size]
            yield f"{data.prefix} document {i + 1}", data[i], mask
    elif data_type == "jsonl":
        for n, (text,), _ in iter_jsonl(data_file, (text_field,), ("--text_field",)):
            ids = np.array(tokenizer.encode(text) + [EOD], np.int32)
            yield f"{data_file} line {n}", ids, np.ones(len(ids), np.uint8)
    elif data_type.startswith("sft"):
        docs, masks = read_sft(data_file, tokenizer, prompt_field, response_field, template)
        for n, (ids, mask) in enumerate(zip(docs, masks), 1):
            yield f"{data_file} document {n}", ids, mask
    elif data_type == "preference":
        for where, ids_c, mask_c, ids_r, mask_r in read_pairs(data_file, tokenizer, chat or ChatFormat()):
            yield f"{where} chosen", ids_c, mask_c
            yield f"{where} rejected", ids_r, mask_r
    else:
        chat = chat or ChatFormat(prompt_field=prompt_field, response_field=response_field)
        for where, _, ids, mask, _ in iter_chat(data_file, tokenizer, chat):
            yield where, ids, mask


def add_data_options(add, kinds=("jsonl", "sft", "chat")):
    """The options that say how to read records (train.py, scripts/show_data.py, make_binidx.py
    --chat): `add` is a parser's add_argument; kinds, which data types' options to add. Each help
    names its default (so parsers without ArgumentDefaultsHelpFormatter show it too)."""
    if "jsonl" in kinds:
        add("--text_field", default="text", help="jsonl: the field that holds the text (default: %(default)s)")
    add("--prompt_field", default="prompt", help="sft: the field that holds the prompt (default: %(default)s)")
    if "sft" in kinds:
        add("--sft_template", default=SFT_TEMPLATE,
            help="sft: how a prompt and its response make one document ({prompt} once, then {response} once; "
                 "default: %(default)r)")
    add("--response_field", default="response", help="sft: the field that holds the response (the loss is on it only) (default: %(default)s)")
    add("--loss_on", default="assistant", help="chat: assistant (every reply) | last (each conversation's last reply) | all (default: %(default)s)")
    add("--chat_field", default="messages,conversations", help="chat: the field that holds a conversation's turns "
                                                                "(the first of these a record has) (default: %(default)s)")
    add("--turn_keys", default="role:content,from:value", help="chat: a turn's role key and text key (the first pair "
                                                                "a turn has) (default: %(default)s)")
    add("--chat_roles", default="", help="chat: more role names, NAME=system|user|assistant, comma-separated (known: "
                                         "system, user, human, assistant, gpt)")


def data_options(args):
    """make_dataset's keyword arguments from train.py's options (train.py and validation share them)."""
    chat = ChatFormat.from_options(args.chat_field, args.turn_keys, args.chat_roles, args.prompt_field,
                                   args.response_field, args.loss_on)
    return dict(text_field=getattr(args, "text_field", "text"), prompt_field=args.prompt_field,
                response_field=args.response_field, template=getattr(args, "sft_template", SFT_TEMPLATE), chat=chat)

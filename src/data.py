"""Training data: Megatron binidx files (read and write), jsonl text and SFT jsonl, and the
map-style datasets the trainer draws from. Item i of every dataset is a pure function of
(seed, i), so a resumed run gets the same samples for the same global sample index. Each
item is (input_ids LongTensor[ctx_len], targets LongTensor[ctx_len], loss_mask FloatTensor[ctx_len])
with targets the inputs shifted by one. Bad data is refused while the dataset is built, with
one sentence (DataError), before any training starts."""
import json
import os
import struct
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from .checkpoint import temporary_file

EOD = 0  # end-of-document and padding id: the World tokenizer never produces it
DATA_TYPES = ("binidx", "jsonl", "sft", "sft_padded")
SFT_TEMPLATE = "User: {prompt}\n\nAssistant: {response}"

# Megatron MMapIndexedDataset (.idx): magic, version <Q = 1, dtype code <B, sequence count <Q,
# doc_idx count <Q, then sizes int32[count], pointers int64[count] (byte offsets into .bin),
# doc_idx int64[doc count]. The .bin is the flat token array.
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = (6, 7)  # float64 / float32 (their order differs between Megatron forks)


class DataError(ValueError):
    """Training data that cannot be used; the message says why in one sentence."""


def binidx_prefix(path):
    """`data/x`, `data/x.bin` and `data/x.idx` all name the pair data/x.bin + data/x.idx."""
    path = os.fspath(path)
    return path[:-4] if path.endswith((".bin", ".idx")) else path


class BinIdx:
    """A binidx pair, memory-mapped: `tokens` is the whole .bin as one array (never read into
    memory as a whole), `sizes`/`pointers`/`doc_idx` come from the .idx, item i is sequence i."""

    def __init__(self, path):
        self.prefix = prefix = binidx_prefix(path)
        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise DataError(f"binidx data needs {prefix}.bin and {prefix}.idx, and {prefix}{ext} does not exist.")
        idx = prefix + ".idx"
        with open(idx, "rb") as f:
            head = f.read(IDX_HEADER.size)
        if len(head) < IDX_HEADER.size or not head.startswith(IDX_MAGIC):
            raise DataError(f"{idx} is not a Megatron binidx index (its first bytes are not MMIDIDX).")
        _, version, code, count, doc_count = IDX_HEADER.unpack(head)
        if version != 1:
            raise DataError(f"{idx} is binidx version {version}; only version 1 is known.")
        if code in FLOAT_CODES:
            raise DataError(f"{idx} says its tokens are floating-point numbers, not token ids.")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx} has the unknown dtype code {code}.")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = IDX_HEADER.size + 12 * count + 8 * doc_count
        if os.path.getsize(idx) != expected:
            raise DataError(f"{idx} has {os.path.getsize(idx)} bytes where its header implies {expected}: it is truncated or corrupt.")
        if count == 0:
            raise DataError(f"{idx} lists no documents.")
        at = IDX_HEADER.size
        self.sizes = np.memmap(idx, np.int32, "r", at, (count,))
        self.pointers = np.memmap(idx, np.int64, "r", at + 4 * count, (count,))
        self.doc_idx = np.memmap(idx, np.int64, "r", at + 12 * count, (doc_count,))
        bin_bytes = os.path.getsize(prefix + ".bin")
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if end != bin_bytes:  # also what a .bin paired with another .idx looks like
            raise DataError(f"{idx} describes {end} bytes of tokens but {prefix}.bin holds {bin_bytes}: the two files do not belong together.")
        if bin_bytes == 0:
            raise DataError(f"{prefix}.bin is empty: it holds no tokens.")
        self.check_index(idx, prefix + ".bin", bin_bytes)
        self.tokens = np.memmap(prefix + ".bin", self.dtype, "r")

    def check_index(self, idx, bin_path, bin_bytes, chunk=1 << 22):
        """Every sequence of the .idx lies inside the .bin: sizes >= 0, pointers aligned to the
        token size, each sequence ending within the file (in slices: a memmap is streamed)."""
        size = self.dtype.itemsize
        for i in range(0, len(self.sizes), chunk):
            sizes, pointers = np.asarray(self.sizes[i:i + chunk], np.int64), np.asarray(self.pointers[i:i + chunk])
            bad = np.flatnonzero((sizes < 0) | (pointers < 0) | (pointers % size != 0)
                                 | (pointers + sizes * size > bin_bytes))
            if len(bad):
                j = i + int(bad[0])
                raise DataError(f"{idx} puts sequence {j} ({int(self.sizes[j])} tokens at byte {int(self.pointers[j])}) "
                                f"outside {bin_path}, which holds {bin_bytes} bytes: the index is corrupt.")

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]


class BinIdxWriter:
    """Writes documents (one binidx sequence each, as json2binidx does) under temporary names
    beside the target; close() renames them into place. The old .idx goes first and the new
    one comes last, so a crash never leaves a .idx that describes another .bin."""

    def __init__(self, path, dtype=np.uint16):
        self.prefix = binidx_prefix(path)
        self.dtype = np.dtype(dtype)
        if self.dtype.type not in DTYPE_CODES.values():
            raise ValueError(f"binidx cannot store {self.dtype}.")
        fd, self.tmp_bin = temporary_file(self.prefix + ".bin")
        self.file = os.fdopen(fd, "wb")
        self.sizes = []

    def add(self, ids):
        ids = np.asarray(ids)
        info = np.iinfo(self.dtype)
        if ids.size and (ids.min() < info.min or ids.max() > info.max):
            raise ValueError(f"token ids {ids.min()}..{ids.max()} do not fit in {self.dtype}.")
        self.file.write(ids.astype(self.dtype).tobytes())
        self.sizes.append(ids.size)

    def close(self):
        self.file.close()
        sizes = np.array(self.sizes, np.int64)
        pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * self.dtype.itemsize
        code = next(c for c, t in DTYPE_CODES.items() if t == self.dtype.type)
        fd, tmp_idx = temporary_file(self.prefix + ".idx")
        with os.fdopen(fd, "wb") as f:
            f.write(IDX_HEADER.pack(IDX_MAGIC, 1, code, len(sizes), len(sizes) + 1))
            f.write(sizes.astype(np.int32).tobytes())
            f.write(pointers.astype(np.int64).tobytes())
            f.write(np.arange(len(sizes) + 1, dtype=np.int64).tobytes())
        umask = os.umask(0)
        os.umask(umask)
        for tmp in (self.tmp_bin, tmp_idx):  # mkstemp makes owner-only files; give the usual mode
            os.chmod(tmp, 0o666 & ~umask)
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(tmp_idx, self.prefix + ".idx")

    def discard(self):
        self.file.close()
        os.remove(self.tmp_bin)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_binidx(path, documents, dtype=np.uint16):
    """Write an iterable of token-id sequences as PATH.bin + PATH.idx, atomically."""
    with BinIdxWriter(path, dtype) as w:
        for ids in documents:
            w.add(ids)


def iter_jsonl(path, fields):
    """(line number, values of `fields`, bytes read so far) for each non-blank line of a
    jsonl file; a file without one is refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist.")
    done = found = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            done += len(line)
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n} is not UTF-8 text (byte {e.start + 1} of the line).") from None
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as e:
                reason = getattr(e, "msg", None) or "nested too deeply"
                raise DataError(f"{path} line {n} is not valid JSON ({reason}).") from None
            if not isinstance(record, dict):
                raise DataError(f'{path} line {n} has no "{fields[0]}" field (it is a JSON {type(record).__name__}, '
                                "not an object).")
            values = []
            for field in fields:
                if field not in record:
                    raise DataError(f'{path} line {n} has no "{field}" field.')
                if not isinstance(record[field], str):
                    raise DataError(f'{path} line {n}: "{field}" is not a string.')
                try:
                    record[field].encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(f'{path} line {n}: "{field}" holds an unpaired surrogate escape, '
                                    "not Unicode text.") from None
                values.append(record[field])
            found += 1
            yield n, values, done
    if not found:
        raise DataError(f"{path} contains no documents.")


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
        if isinstance(self.tokens, np.memmap):
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.str)
        return state

    def __setstate__(self, state):
        if isinstance(state["tokens"], tuple):
            state["tokens"] = np.memmap(state["tokens"][0], np.dtype(state["tokens"][1]), "r")
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
        ids = np.full(self.ctx_len + 1, EOD, np.int64)
        mask = np.zeros(self.ctx_len + 1, np.float32)
        n = min(len(self.docs[d]), self.ctx_len + 1)
        ids[:n], mask[:n] = self.docs[d][:n], self.masks[d][:n]
        return self.item(ids, mask)


def sft_parts(template):
    """Split a template into the prompt part and the response part. Whitespace just before
    {response} goes with the response, so ' Hello' stays one token, as at generation time
    when the prompt ends with 'Assistant:'."""
    head, sep, tail = template.partition("{response}")
    if not sep or head.count("{prompt}") != 1 or "{prompt}" in tail or "{response}" in tail:
        raise DataError("the SFT template must contain {prompt} once, followed by {response} once.")
    prompt = head.rstrip()
    return prompt, head[len(prompt):] + "{response}" + tail


def read_sft(path, tokenizer, prompt_field, response_field, template):
    """Per document: ids (prompt part, response part, EOD) and mask (1 on response and EOD)."""
    prompt_part, response_part = sft_parts(template)
    docs, masks = [], []
    for n, (prompt, response), _ in iter_jsonl(path, (prompt_field, response_field)):
        if not response.strip():
            raise DataError(f'{path} line {n} has an empty "{response_field}": nothing to learn.')
        p = tokenizer.encode(prompt_part.replace("{prompt}", prompt))
        r = tokenizer.encode(response_part.replace("{response}", response)) + [EOD]
        docs.append(np.array(p + r, np.int32))
        masks.append(np.array([0] * len(p) + [1] * len(r), np.uint8))
    return docs, masks


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
        from .tokenizer import world_tokenizer
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


def held_out(n_docs, fraction, seed, source="the data"):
    """Sorted indices of the documents --val_split holds out of training: round(fraction * n),
    at least one and never all, drawn from the seed alone (so a resumed run holds out the same)."""
    if not 0 < fraction < 1:
        raise DataError(f"--val_split {fraction} is not a fraction between 0 and 1 of the documents.")
    if n_docs < 2:
        raise DataError(f"{source} holds a single document: --val_split needs two or more, or give --val_data.")
    k = min(n_docs - 1, max(1, round(fraction * n_docs)))
    return np.sort(np.random.default_rng((seed, 0x7A1)).permutation(n_docs)[:k])


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

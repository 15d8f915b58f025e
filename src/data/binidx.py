"""Megatron binidx files (PREFIX.bin + PREFIX.idx), memory-mapped for reading, written atomically,
and the loss mask that make_binidx.py --chat writes beside them (PREFIX.mask)."""
import hashlib
import os
import struct

import numpy as np

from ..checkpoint import temporary_file
from .common import DataError

# Megatron MMapIndexedDataset (.idx): magic, version <Q = 1, dtype code <B, sequence count <Q,
# doc_idx count <Q, then sizes int32[count], pointers int64[count] (byte offsets into .bin),
# doc_idx int64[doc count]. The .bin is the flat token array.
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = (6, 7)  # float64 / float32 (their order differs between Megatron forks)
# PREFIX.mask: magic, the SHA-256 of the .idx it was made with (so a .bin/.idx remade by another
# tool never meets an old mask), then one uint8 per token of the .bin: 1 = learnt as a target.
MASK_MAGIC = b"RWKVMASK"
MASK_HEADER = len(MASK_MAGIC) + 32


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.digest()


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
        self.mask = self.read_mask(idx, len(self.tokens)) if os.path.exists(prefix + ".mask") else None

    def read_mask(self, idx, n_tokens):
        """PREFIX.mask as a memmap, checked: made for this .idx, one 0 or 1 per token."""
        path = self.prefix + ".mask"
        with open(path, "rb") as f:
            head = f.read(MASK_HEADER)
        if not head.startswith(MASK_MAGIC):
            raise DataError(f"{path} is not a loss mask written by make_binidx.py --chat (its first bytes are not RWKVMASK).")
        if head[len(MASK_MAGIC):] != file_sha256(idx):
            raise DataError(f"{path} was made for another {idx}: remake both with make_binidx.py --chat, or delete the mask.")
        if os.path.getsize(path) != MASK_HEADER + n_tokens:
            raise DataError(f"{path} holds {os.path.getsize(path) - MASK_HEADER} mask bytes for the {n_tokens} tokens of "
                            f"{self.prefix}.bin: it is truncated or corrupt.")
        mask = np.memmap(path, np.uint8, "r", MASK_HEADER, (n_tokens,))
        if any(int(mask[i:i + (1 << 24)].max()) > 1 for i in range(0, n_tokens, 1 << 24)):
            raise DataError(f"{path} holds a value other than 0 and 1: it is corrupt.")
        return mask

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
    one comes last, so a crash never leaves a .idx that describes another .bin. masked: each
    document comes with its loss mask, written as PREFIX.mask; without, an old PREFIX.mask goes."""

    def __init__(self, path, dtype=np.uint16, masked=False):
        self.prefix = binidx_prefix(path)
        self.dtype = np.dtype(dtype)
        if self.dtype.type not in DTYPE_CODES.values():
            raise ValueError(f"binidx cannot store {self.dtype}.")
        fd, self.tmp_bin = temporary_file(self.prefix + ".bin")
        self.file = os.fdopen(fd, "wb")
        self.mask_file = self.tmp_mask = None
        if masked:
            fd, self.tmp_mask = temporary_file(self.prefix + ".mask")
            self.mask_file = os.fdopen(fd, "wb")
            self.mask_file.write(bytes(MASK_HEADER))    # the header is filled in once the .idx exists
        self.sizes = []

    def add(self, ids, mask=None):
        ids = np.asarray(ids)
        info = np.iinfo(self.dtype)
        if ids.size and (ids.min() < info.min or ids.max() > info.max):
            raise ValueError(f"token ids {ids.min()}..{ids.max()} do not fit in {self.dtype}.")
        if (mask is None) != (self.mask_file is None) or (mask is not None and len(mask) != ids.size):
            raise ValueError("a masked writer takes one mask value per token, and an unmasked one none.")
        self.file.write(ids.astype(self.dtype).tobytes())
        if mask is not None:
            self.mask_file.write(np.asarray(mask, np.uint8).tobytes())
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
        if self.mask_file is not None:
            self.mask_file.seek(0)
            self.mask_file.write(MASK_MAGIC + file_sha256(tmp_idx))
            self.mask_file.close()
        umask = os.umask(0)
        os.umask(umask)
        for tmp in filter(None, (self.tmp_bin, tmp_idx, self.tmp_mask)):  # mkstemp makes owner-only files
            os.chmod(tmp, 0o666 & ~umask)
        for ext in (".idx", ".mask"):   # a mask stays only if this writer makes a new one
            if os.path.exists(self.prefix + ext):
                os.remove(self.prefix + ext)
        os.replace(self.tmp_bin, self.prefix + ".bin")
        if self.tmp_mask:
            os.replace(self.tmp_mask, self.prefix + ".mask")
        os.replace(tmp_idx, self.prefix + ".idx")

    def discard(self):
        self.file.close()
        os.remove(self.tmp_bin)
        if self.mask_file is not None:
            self.mask_file.close()
            os.remove(self.tmp_mask)

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



"""The RWKV World tokenizer (rwkv_vocab_v20230424), offline: greedy longest match over UTF-8
bytes, the same ids as rwkv.rwkv_tokenizer.TRIE_TOKENIZER, a few times faster. Ids run
1..65529; id 0 is never produced and means end-of-document (and padding) in training data."""
import ast
import functools
import importlib.util
import os
import re
from collections import Counter, defaultdict

import numpy as np

VOCAB_NAME = "rwkv_vocab_v20230424.txt"


def default_vocab_path():
    """The vocabulary file shipped inside the `rwkv` pip package (found without importing it)."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the `rwkv` package is not installed: pass the path of {VOCAB_NAME}.")
    return os.path.join(os.path.dirname(spec.origin), VOCAB_NAME)


def read_vocab(path):
    """{token bytes: id} from lines `ID REPR LENGTH`, REPR a Python str or bytes literal."""
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            i, rest = line.split(" ", 1)
            literal, length = rest.rstrip("\n").rsplit(" ", 1)
            token = ast.literal_eval(literal)  # not eval(): a vocab file is data
            token = token.encode("utf-8") if isinstance(token, str) else token
            if len(token) != int(length):
                raise ValueError(f"{path} line {n}: the token has {len(token)} bytes, not {length}.")
            vocab[token] = int(i)
    return vocab


def trie_pattern(tokens):
    """A regular expression whose match at any position is the longest token there.

    It spells out the token trie: each node is an alternation over its next bytes, plus an
    empty branch when the node is itself a token, so the regex engine goes as deep as it can
    and backs up to the last complete token. Branches are tried most-populated first (a
    proxy for frequency): sre scans alternatives one by one, so that order is the speed."""
    below = Counter(t[:k] for t in tokens for k in range(1, len(t) + 1))  # tokens under a node
    children = defaultdict(list)
    for node in below:
        children[node[:-1]].append(node)

    def node_pattern(node):
        kids = sorted(children[node], key=lambda c: -below[c])
        alts = [re.escape(c[-1:]) + node_pattern(c) for c in kids] + ([b""] if node in tokens else [])
        return alts[0] if len(alts) == 1 else b"(?:" + b"|".join(alts) + b")"

    return re.compile(node_pattern(b""))


class WorldTokenizer:
    MEMO_LIMIT = 100_000  # cached multi-token pieces (a few tens of MB at most)

    def __init__(self, vocab_file=None):
        self.vocab_file = os.fspath(vocab_file or default_vocab_path())
        self.ids = read_vocab(self.vocab_file)
        missing = [b for b in range(256) if bytes([b]) not in self.ids]
        if missing:  # greedy matching needs every single byte to be a token
            raise ValueError(f"{self.vocab_file} lacks the single-byte token {missing[0]}.")
        self.vocab_size = max(self.ids.values()) + 1  # 65530 for the World vocabulary
        self.token_bytes = [b""] * self.vocab_size  # index 0 (end-of-document) decodes to nothing
        for token, i in self.ids.items():
            self.token_bytes[i] = token
        # joins[a << 8 | b]: the byte pair a, b occurs inside some token. Where a pair occurs in
        # none, no token can span it, so every segmentation (the greedy one too) cuts there.
        self.joins = np.zeros(1 << 16, bool)
        for token in self.ids:
            for a, b in zip(token, token[1:]):
                self.joins[a << 8 | b] = True
        self.regex = trie_pattern(self.ids)
        self.memo = {}

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, src: bytes) -> list[int]:
        """Cut `src` wherever no token can span, then tokenize the pieces alone: greedy matching
        never crosses a forced cut, so the ids are unchanged. Most pieces are a single token
        (one dict look-up); the rest go through the trie regex, memoised since words recur."""
        if not src:
            return []
        a = np.frombuffer(src, np.uint8).astype(np.int32)
        cuts = (np.flatnonzero(~self.joins[a[:-1] << 8 | a[1:]]) + 1).tolist()
        out, ids, memo = [], self.ids, self.memo
        for start, end in zip([0] + cuts, cuts + [len(src)]):
            piece = src[start:end]
            i = ids.get(piece)
            if i is not None:
                out.append(i)
                continue
            piece_ids = memo.get(piece)
            if piece_ids is None:
                if len(memo) >= self.MEMO_LIMIT:
                    memo.clear()
                piece_ids = memo[piece] = tuple(map(ids.__getitem__, self.regex.findall(piece)))
            out += piece_ids
        return out

    def decode_bytes(self, ids) -> bytes:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1}).")
        return b"".join(map(self.token_bytes.__getitem__, ids))

    def decode(self, ids) -> str:
        """Text of `ids`; id 0 gives nothing, a cut-off UTF-8 sequence gives U+FFFD (where
        TRIE_TOKENIZER returns a lone U+FFFD for the whole text)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def world_tokenizer(vocab_file=None) -> WorldTokenizer:
    """One shared instance per vocabulary file (building one takes a second or two)."""
    return WorldTokenizer(vocab_file)

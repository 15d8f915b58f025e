"""The offline World tokenizer gives exactly the ids of the `rwkv` package's TRIE_TOKENIZER."""
import random

import pytest

from src.tokenizer import WorldTokenizer, world_tokenizer

SAMPLES = [
    "",
    "a",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "机器学习是人工智能的一个分支。你好，世界！我们今天学习分词器。",
    "日本語のテキスト、한국어 텍스트, русский текст, ελληνικά, العربية, עברית, हिन्दी",
    "emoji 😀👍🏽🇫🇷 👨‍👩‍👧 ✨ and symbols ∑∫√ ≤≥ €£¥",
    " " * 300 + "x" + "\t" * 40 + "\n" * 30 + " \n \n" * 10,
    "\x00\x01\x02\x07\x1b[31mred\x1b[0m\x7f\r\n\x0b\x0c",
    "mixed中文English混合123数字！？...---===###",
    "-" * 200 + "#" * 100 + "=" * 77,
    "\u200b\ufeff zero-width and BOM, combining e\u0301 and Å",
]


@pytest.fixture(scope="module")
def trie():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    return TRIE_TOKENIZER(world_tokenizer().vocab_file)


def random_texts(tok, n, seed=0):
    """Texts glued from random vocabulary tokens and random code points: they put token
    boundaries and byte pairs in places natural text rarely does."""
    rng = random.Random(seed)
    tokens = tok.token_bytes[1:]
    texts = []
    for _ in range(n):
        glued = b"".join(rng.choice(tokens) for _ in range(rng.randint(1, 60)))
        texts.append(glued.decode("utf-8", errors="ignore"))
        texts.append("".join(chr(rng.choice([rng.randint(0, 0x7f), rng.randint(0x80, 0xd7ff), rng.randint(0xe000, 0x10ffff)]))
                             for _ in range(rng.randint(1, 40))))
    return texts


def test_same_ids_as_trie_tokenizer(trie):
    tok = world_tokenizer()
    texts = SAMPLES + ["".join(SAMPLES) * 3] + random_texts(tok, 300)
    for text in texts:
        assert tok.encode(text) == trie.encode(text), repr(text[:80])
        assert tok.decode(tok.encode(text)) == text


def test_memo_does_not_change_ids(trie):
    tok = world_tokenizer()
    text = "".join(SAMPLES)
    tok.memo.clear()
    first = tok.encode(text)
    assert tok.memo  # the multi-token pieces were cached...
    assert tok.encode(text) == first == trie.encode(text)  # ...and reusing them is exact


def test_vocabulary_facts():
    tok = world_tokenizer()
    assert tok.vocab_size == 65530 and len(tok.ids) == 65529
    assert 0 not in tok.ids.values()  # id 0 is left for end-of-document
    assert tok.decode([0]) == "" and tok.decode(tok.encode("hi") + [0]) == "hi"
    with pytest.raises(ValueError, match="65530 is outside the vocabulary"):
        tok.decode([65530])


def test_vocab_file_must_hold_every_byte(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'a' 1\n2 'b' 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lacks the single-byte token 0"):
        WorldTokenizer(bad)

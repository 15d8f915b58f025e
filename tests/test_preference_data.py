"""Preference pairs (--data_type preference) against independent references: each sequence's text is
built here by plain string formatting from RWKV's official template (not with src/chat_template.py)
and tokenized by the `rwkv` package's TRIE_TOKENIZER; the learnt tokens, decoded, must be exactly the
final reply from its leading space to its closing blank line, and no EOD."""
import json

import numpy as np
import pytest
import torch

from src.data import DataError, make_dataset
from tests.test_chat_data import official_clean, official_text, trie, write  # noqa: F401  (trie: a fixture)

# (prompt turns, chosen, rejected): one-turn strings, a system prompt and earlier turns, non-Latin
# text, CRLF and blank lines inside turns, replies that differ only late.
PAIRS = [
    ([("user", "What is 2+2?")], "4.", "5."),
    ([("system", "Be brief.\r\n\r\nVery."), ("user", "Hi"), ("assistant", "Hello."), ("user", "和 3+3 呢？\r\n")],
     "<think>\n\n六。</think>\n6。", " 7. \n"),
    ([("user", "日本語で挨拶して。")], "こんにちは！🌸\nお元気ですか？", "こんにちは！🌸\nさようなら。"),
]


def string_record(prompt, chosen, rejected):
    return {"prompt": prompt[-1][1], "chosen": chosen, "rejected": rejected}


def conversational(prompt, chosen, rejected):
    return {"prompt": [{"role": r, "content": c} for r, c in prompt],
            "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}


def learnt_text(trie, ids, mask):
    assert 0 not in [int(i) for i, m in zip(ids, mask) if m]     # no EOD is learnt
    return trie.decodeBytes([int(i) for i, m in zip(ids, mask) if m]).decode("utf-8")


def check_item(trie, item, prompt, chosen, rejected, ctx_len):
    inputs, targets, mask = item
    assert inputs.shape == targets.shape == mask.shape == (2, ctx_len)
    for row, reply in enumerate((chosen, rejected)):
        want = trie.encode(official_text(prompt + [("assistant", reply)]))
        n = len(want) - 1
        assert inputs[row, :n].tolist() == want[:-1] and targets[row, :n].tolist() == want[1:]
        assert (targets[row, n:] == 0).all() and (mask[row, n:] == 0).all()     # EOD padding, masked
        assert learnt_text(trie, targets[row], mask[row]) == f" {official_clean(reply)}\n\n"


@pytest.mark.parametrize("form", [string_record, conversational])
@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_pairs_are_the_official_template(tmp_path, trie, form, ext):
    pairs = PAIRS[:1] + PAIRS[2:] if form is string_record else PAIRS    # a string prompt is one user turn
    data = write(tmp_path / f"p.{ext}", [form(*p) for p in pairs])
    ds = make_dataset(data, "preference", 64, 65536, seed=0)
    assert len(ds) == len(pairs)
    items = {int(ds.document(i)): ds[i] for i in range(len(ds))}
    for k, p in enumerate(pairs):
        check_item(trie, items[k], *p, 64)


def test_a_long_pair_is_cut_from_its_replies_end_and_counted(tmp_path, trie):
    prompt, chosen = [("user", "Count.")], " ".join(str(i) for i in range(200))
    data = write(tmp_path / "p.jsonl", [string_record(prompt, chosen, "no."), string_record(*PAIRS[0])])
    ds = make_dataset(data, "preference", 32, 65536)
    assert "1 pairs longer than ctx_len + 1 = 33 tokens" in ds.summary
    inputs, targets, mask = ds[[ds.document(i) for i in range(2)].index(0)]
    want = trie.encode(official_text(prompt + [("assistant", chosen)]))
    assert inputs[0].tolist() == want[:32] and targets[0].tolist() == want[1:33]
    assert learnt_text(trie, targets[0], mask[0]) == trie.decodeBytes(want[:33]).decode().split("Assistant:", 1)[1]


def refused(tmp_path, records, ctx_len=64):
    data = write(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as e:
        make_dataset(data, "preference", ctx_len, 65536)
    return str(e.value)


def test_bad_records_are_one_sentence_with_the_record_number(tmp_path):
    good = string_record(*PAIRS[0])
    message = refused(tmp_path, [good, {"prompt": "a", "chosen": "b"}])
    assert "line 2" in message and '"rejected"' in message and message.count(". ") == 0
    message = refused(tmp_path, [good, good, {"prompt": "a", "chosen": "Same.", "rejected": " Same.\r\n"}])
    assert "line 3" in message and "same reply" in message
    assert "line 1" in refused(tmp_path, [{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}])
    assert "line 2" in refused(tmp_path, [good, {"prompt": [{"role": "assistant", "content": "a"}], "chosen": "b",
                                                 "rejected": "c"}])
    message = refused(tmp_path, [good, string_record([("user", "word " * 100)], "a", "b")])
    assert "line 2" in message and "prompt alone" in message


def test_a_bad_record_is_refused_before_any_pair_is_used(tmp_path):
    """The whole file is read and checked when the dataset is made: the last record's fault is found."""
    records = [string_record(*PAIRS[0])] * 50 + [{"prompt": "a", "chosen": "b", "rejected": 3}]
    assert "line 51" in refused(tmp_path, records)

"""Chat data (--data_type chat / chat_padded, show_data.py, make_binidx.py --chat) against independent
references: the text is built here by plain string formatting from RWKV's official template (not with
src/chat_template.py) and tokenized by the `rwkv` package's TRIE_TOKENIZER; the learnt tokens, decoded,
must be exactly each assistant reply with its closing blank line."""
import importlib.util
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from src.data import DataError, make_dataset
from src.tokenizer import world_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = {"system": "System", "user": "User", "assistant": "Assistant"}
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}

# Conversations as (role, content): a system prompt, several turns, non-Latin text, <think> replies,
# CRLF and blank lines inside turns, spaces at the ends, one ending with a user turn.
CONVERSATIONS = [
    [("system", "You are a helpful assistant.\r\n\r\nAnswer briefly."),
     ("user", "What is 2+2?"),
     ("assistant", "<think>\nTwo plus two.\n\n\nThat is four.\n</think>\n4"),
     ("user", "  和 3+3 呢？\r\n"),
     ("assistant", "6。\n\n好。")],
    [("user", "日本語で挨拶して。"),
     ("assistant", "こんにちは！🌸\r\nお元気ですか？"),
     ("user", "مرحبا\n\n\nكيف حالك؟"),
     ("assistant", " بخير، شكرا. "),
     ("user", "bye")],
    [("system", "Think first."),
     ("user", "Name a prime."),
     ("assistant", "<think>2 is prime.</think> 2")],
]
PROMPT_RESPONSE = [{"prompt": "Translate: cat\r\n\r\n", "response": "猫。"},
                   {"prompt": "Say hi", "response": "<think>\n\nEasy.</think>\nHi!"}]


def official_clean(text):
    return re.sub(r'\n{2,}', '\n', text.replace('\r\n', '\n')).strip()


def official_text(turns):
    """`System: xxx\\n\\nUser: xxx\\n\\nAssistant: xxx\\n\\n...`, each turn cleaned as the template does."""
    return "".join(f"{PREFIX[role]}: {official_clean(text)}\n\n" for role, text in turns)


def openai(turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def sharegpt(turns):
    return {"conversations": [{"from": SHAREGPT[r], "value": c} for r, c in turns]}


def pr_turns(record):
    return [("user", record["prompt"]), ("assistant", record["response"])]


@pytest.fixture(scope="module")
def trie():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    return TRIE_TOKENIZER(world_tokenizer().vocab_file)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """HF datasets reads local files only: no hub, no cache outside the test's directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def show_json(capsys, data, *options):
    capsys.readouterr()
    script("show_data").main([str(data), "--data_type", "chat", "--n", "0", "--json", *options])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def expected(trie, turns, loss_on="assistant"):
    """(tokens, the learnt texts): TRIE_TOKENIZER's ids of the official text and a 0; the learnt texts
    are ` reply\\n\\n` for each assistant turn (the last one only for `last`), plus the 0 when the
    conversation ends with a reply."""
    tokens = trie.encode(official_text(turns)) + [0]
    replies = [f" {official_clean(c)}\n\n" for r, c in turns if r == "assistant"]
    return tokens, replies[-1:] if loss_on == "last" else replies


def learnt_runs(trie, tokens, mask):
    """The decoded text of each run of learnt tokens (the 0 written as <0>)."""
    runs, run = [], None
    for t, m in zip(tokens, mask):
        if m and run is None:
            run = b""
        if m:
            run += b"<0>" if t == 0 else trie.decodeBytes([t])
        elif run is not None:
            runs.append(run.decode("utf-8"))
            run = None
    return runs + ([run.decode("utf-8")] if run is not None else [])


def check(trie, line, turns, loss_on="assistant"):
    tokens, replies = expected(trie, turns, loss_on)
    assert line["tokens"] == tokens
    assert len(line["mask"]) == len(tokens) and line["mask"][0] == 0
    ends_learnt = turns[-1][0] == "assistant"
    if ends_learnt:
        replies[-1] += "<0>"
    assert learnt_runs(trie, tokens, line["mask"]) == replies
    assert line["mask"][-1] == ends_learnt


def write(path, records):
    """records as .jsonl, .json (a list), .parquet or an HF datasets save_to_disk directory."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False)
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        import datasets
        datasets.Dataset.from_list(records).save_to_disk(path)
    return path


@pytest.mark.parametrize("convention", [openai, sharegpt])
def test_tokens_and_mask_are_the_official_templates(tmp_path, capsys, trie, convention):
    data = write(tmp_path / "c.jsonl", [convention(c) for c in CONVERSATIONS])
    lines = show_json(capsys, data)
    assert len(lines) == len(CONVERSATIONS)
    for line, turns in zip(lines, CONVERSATIONS):
        check(trie, line, turns)


def test_prompt_response_records_are_one_turn(tmp_path, capsys, trie):
    lines = show_json(capsys, write(tmp_path / "pr.jsonl", PROMPT_RESPONSE))
    for line, record in zip(lines, PROMPT_RESPONSE, strict=True):
        check(trie, line, pr_turns(record))


@pytest.mark.parametrize("loss_on", ["last", "all"])
def test_loss_on(tmp_path, capsys, trie, loss_on):
    lines = show_json(capsys, write(tmp_path / "c.jsonl", [openai(c) for c in CONVERSATIONS]), "--loss_on", loss_on)
    for line, turns in zip(lines, CONVERSATIONS, strict=True):
        if loss_on == "last":
            check(trie, line, turns, "last")
        else:
            assert line["tokens"] == expected(trie, turns)[0] and line["mask"] == [0] + [1] * (len(line["tokens"]) - 1)


@pytest.mark.parametrize("kind", ["json", "parquet", "saved", "shards", "comma"])
def test_every_file_kind_reads_the_same(tmp_path, capsys, trie, kind):
    """The same conversations from .json, .parquet, a save_to_disk directory, a directory of parquet
    shards, and a comma-separated list of files (OpenAI, ShareGPT and prompt/response in turn)."""
    records = ([openai(c) for c in CONVERSATIONS], [sharegpt(c) for c in CONVERSATIONS], PROMPT_RESPONSE)
    turns = CONVERSATIONS + CONVERSATIONS + [pr_turns(r) for r in PROMPT_RESPONSE]
    if kind == "saved":
        data = write(tmp_path / "saved", [openai(c) for c in CONVERSATIONS])
        turns = CONVERSATIONS
    elif kind == "shards":
        os.mkdir(tmp_path / "shards")
        for i, part in enumerate(records):
            write(tmp_path / "shards" / f"train-{i:05d}.parquet", part)
        data = str(tmp_path / "shards")
    else:
        ext = "json" if kind == "json" else "parquet"
        data = ",".join(write(tmp_path / f"{i}.{ext}", part) for i, part in enumerate(records))
        if kind == "comma":     # and a mix of kinds
            data = ",".join([write(tmp_path / "0.jsonl", records[0]), write(tmp_path / "1.parquet", records[1]),
                             write(tmp_path / "2.json", records[2])])
    lines = show_json(capsys, data)
    assert len(lines) == len(turns)
    for line, t in zip(lines, turns):
        check(trie, line, t)


def test_the_runtime_prompt_is_a_prefix_of_the_training_tokens(tmp_path, capsys, trie):
    """What a chat runtime sends before each reply (`...User: xxx\\n\\nAssistant:`) tokenizes to the
    training tokens up to the reply: no token boundary differs at `Assistant:` and its space."""
    lines = show_json(capsys, write(tmp_path / "c.jsonl", [openai(c) for c in CONVERSATIONS]))
    for line, turns in zip(lines, CONVERSATIONS, strict=True):
        for k, (role, _) in enumerate(turns):
            if role == "assistant":
                prompt = trie.encode(official_text(turns[:k]) + "Assistant:")
                assert line["tokens"][:len(prompt)] == prompt
                assert line["mask"][len(prompt)] == 1 and not any(line["mask"][:len(prompt)][-3:])


def test_make_binidx_chat_gives_the_samples_of_chat(tmp_path):
    """binidx + the mask file samples exactly what chat does in memory: every window, with
    --val_split both parts, and the mask's checks."""
    data = write(tmp_path / "c.jsonl", [openai(c) for c in CONVERSATIONS * 3] + PROMPT_RESPONSE)
    script("make_binidx").main([data, str(tmp_path / "b"), "--chat"])
    for split, part in ((0.0, "train"), (0.3, "train"), (0.3, "val")):
        mem = make_dataset(data, "chat", 24, 65536, seed=5, val_split=split, part=part)
        disk = make_dataset(str(tmp_path / "b"), "binidx", 24, 65536, seed=5, val_split=split, part=part)
        assert len(mem) == len(disk) > 3
        again = pickle.loads(pickle.dumps(disk))   # a spawned DataLoader worker's copy reopens the files
        for i in range(len(mem) + 5):      # past one epoch too (a resumed run's indices)
            assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(mem[i], disk[i], again[i])), i
    assert isinstance(make_dataset(str(tmp_path / "b"), "binidx", 24, 65536).mask, np.memmap)
    # a .bin/.idx remade without --chat takes the old mask away; another .idx is refused
    os.replace(tmp_path / "b.mask", tmp_path / "keep.mask")
    script("make_binidx").main([write(tmp_path / "t.jsonl", [{"text": "hello there"}] * 40), str(tmp_path / "b"),
                                "--overwrite"])
    assert not os.path.exists(tmp_path / "b.mask")
    os.replace(tmp_path / "keep.mask", tmp_path / "b.mask")
    with pytest.raises(DataError, match=r"b\.mask was made for another .*b\.idx"):
        make_dataset(str(tmp_path / "b"), "binidx", 8, 65536)


def test_summary_counts_cleaned_turns_and_cut_conversations(tmp_path, trie):
    data = write(tmp_path / "c.jsonl", [openai(c) for c in CONVERSATIONS])
    changed = sum(official_clean(c) != c for turns in CONVERSATIONS for _, c in turns)
    ds = make_dataset(data, "chat", 16, 65536)
    assert f"3 conversations, 13 turns ({changed} changed by the template's cleaning" in ds.summary
    # chat_padded: one conversation a sample, a longer one cut where one of its turns ends
    long = sum(len(expected(trie, c)[0]) > 41 for c in CONVERSATIONS)
    ds = make_dataset(data, "chat_padded", 40, 65536)
    assert long and f"{long} longer than ctx_len + 1 = 41 tokens, cut at a turn's end" in ds.summary
    texts = {official_text(c) for c in CONVERSATIONS}
    for i in range(len(ds)):
        x, y, _ = ds[i]
        text = trie.decode([t for t in [int(x[0])] + y.tolist() if t])
        assert text.endswith("\n\n") and any(t.startswith(text) for t in texts)
        texts -= {next(t for t in texts if t.startswith(text))}   # each conversation once


BAD = {
    "no assistant": ([openai([("user", "hi")])], r"c\.jsonl line 1 has no assistant turn"),
    "unknown role": ([openai([("user", "hi"), ("assistant", "yo")]),
                      {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}],
                     r"c\.jsonl line 2: turn 2 has the role 'tool'.*--chat_roles"),
    "system later": ([openai([("user", "hi"), ("system", "be nice"), ("assistant", "yo")])],
                     r"c\.jsonl line 1: turn 2 is a system turn; a system turn may only come first"),
    "empty content": ([openai([("user", "hi"), ("assistant", " \r\n\r\n ")])], r"c\.jsonl line 1: turn 2 .*is empty"),
    "neither format": ([{"text": "hi"}], r'c\.jsonl line 1 has neither a "messages" or "conversations" list'),
    "content not text": ([{"messages": [{"role": "user", "content": None}]}], r"c\.jsonl line 1: turn 1 .* not a string"),
    "json not a list": ({"messages": []}, r"c\.json holds a JSON dict, not a list"),
    "parquet column": ([{"text": "a"}], r'c\.parquet has no column "messages", "conversations", nor "prompt" and '
                                        r'"response" \(its columns: text'),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_sentence_and_nothing_is_written(tmp_path, capsys, case):
    records, message = BAD[case]
    ext = {"json not a list": "json", "parquet column": "parquet"}.get(case, "jsonl")
    if ext == "json":
        data = str(tmp_path / "c.json")
        with open(data, "w") as f:
            json.dump(records, f)
    else:
        data = write(tmp_path / f"c.{ext}", records)
    with pytest.raises(DataError, match=message) as e:
        make_dataset(data, "chat", 8, 65536)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        script("make_binidx").main([data, str(tmp_path / "out"), "--chat"])
    assert re.search(message, str(e.value)) and str(e.value).strip().count("\n") == 0
    assert sorted(os.listdir(tmp_path)) == before      # no output, no temporary left


@pytest.mark.numerical
def test_masked_out_tokens_change_neither_loss_nor_gradient(tmp_path):
    """A tiny World-vocabulary model on chat samples: any target outside the mask replaced by
    another id leaves the training loss and every gradient bit for bit the same."""
    from src.family import from_state_dict
    from src.training.loss import lm_loss
    from tests.tiny import WORLD, random_state_dict
    ds = make_dataset(write(tmp_path / "c.jsonl", [openai(c) for c in CONVERSATIONS]), "chat", 48, 65536, seed=1)
    x, y, mask = (torch.stack(t) for t in zip(*(ds[i] for i in range(2))))
    assert 0 < mask.sum() < mask.numel()
    model = from_state_dict(random_state_dict(WORLD, 0)).train()

    def loss_and_grads(targets):
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model, x, targets, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(y)
    other = torch.where(mask.bool(), y, torch.randint(1, 65530, y.shape, generator=torch.Generator().manual_seed(0)))
    assert (other != y).sum() > 10
    loss2, grads2 = loss_and_grads(other)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_a_token_straddling_a_reply_start_is_learnt():
    """The World vocabulary has no token across `Assistant:|` and the reply's space; a vocabulary
    with `: ` as one token shows the rule: the token that holds the reply's first character is learnt."""
    from src.data.chat import encode

    class Bytes:    # one token a byte, and b": " (id 257)
        token_bytes = [b""] + [bytes([i]) for i in range(1, 256)] + [b"", b": "]

        def encode(self, text):
            out, raw = [], text.encode()
            i = 0
            while i < len(raw):
                if raw[i:i + 2] == b": ":
                    out, i = out + [257], i + 2
                else:
                    out, i = out + [raw[i]], i + 1
            return out

    ids, mask, _ = encode([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], Bytes())
    text = [Bytes.token_bytes[i] for i in ids]
    assert b"".join(text) == b"User: a\n\nAssistant: b\n\n"
    learnt = b"".join(t for t, m in zip(text, mask) if m)
    assert learnt == b": b\n\n" and mask[-1] == 1 and mask.sum() == 5      # `: `, b, \n, \n and the 0

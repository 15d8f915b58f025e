"""Binidx files against the Megatron format, the datasets' sampling and masks, the refusals of
bad data, and scripts/make_binidx.py end to end."""
import importlib.util
import json
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch

from src.data import DATA_TYPES, EOD, BinIdx, DataError, make_dataset, write_binidx
from src.tokenizer import world_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def megatron_files(prefix, docs, code=8, dtype=np.uint16):
    """A binidx pair written field by field from the Megatron MMapIndexedDataset layout, not
    with src.data: the reader and writer are checked against the format, not against each other."""
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))              # version
        f.write(struct.pack("<B", code))           # dtype code
        f.write(struct.pack("<Q", len(docs)))      # number of sequences
        f.write(struct.pack("<Q", len(docs) + 1))  # doc_idx length
        for d in docs:
            f.write(struct.pack("<i", len(d)))     # sizes, int32
        address = 0
        for d in docs:
            f.write(struct.pack("<q", address))    # pointers, int64 byte offsets
            address += len(d) * np.dtype(dtype).itemsize
        for i in range(len(docs) + 1):
            f.write(struct.pack("<q", i))          # doc_idx
    return str(prefix)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def random_docs(n, high, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("code,dtype,high", [(8, np.uint16, 65530), (4, np.int32, 100_000)])
def test_reads_megatron_files(tmp_path, code, dtype, high):
    docs = random_docs(30, high)
    data = BinIdx(megatron_files(tmp_path / "m", docs, code, dtype) + ".bin")  # .bin/.idx/prefix all work
    assert len(data) == 30 and isinstance(data.tokens, np.memmap) and data.tokens.dtype == dtype
    assert list(data.doc_idx) == list(range(31)) and list(data.sizes) == [len(d) for d in docs]
    for i, d in enumerate(docs):
        assert np.array_equal(data[i], d)
    assert np.array_equal(data.tokens, np.concatenate(docs))


@pytest.mark.parametrize("code,dtype,high", [(8, np.uint16, 65530), (4, np.int32, 100_000)])
def test_writer_gives_megatron_bytes(tmp_path, code, dtype, high):
    docs = random_docs(30, high, seed=1)
    megatron_files(tmp_path / "ref", docs, code, dtype)
    write_binidx(tmp_path / "ours", docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ours.idx", "ref.bin", "ref.idx"]  # no temp files left


def test_windows_are_deterministic_slices(tmp_path):
    stream = np.random.default_rng(0).integers(0, 65530, 5000)
    prefix = megatron_files(tmp_path / "d", [stream[:1234], stream[1234:]])
    ds = make_dataset(prefix, "binidx", 64, 65536, seed=7)
    again = make_dataset(prefix, "binidx", 64, 65536, seed=7)
    other = make_dataset(prefix, "binidx", 64, 65536, seed=8)
    assert len(ds) == 5000 // 64
    for i in [0, 1, 5, len(ds) - 1, 10**6]:  # any global index, past one epoch too
        x, y, m = ds[i]
        assert x.dtype == y.dtype == torch.long and m.dtype == torch.float32
        assert x.shape == y.shape == m.shape == (64,)
        o = ds.offset(i)
        assert np.array_equal(x, stream[o:o + 64]) and np.array_equal(y, stream[o + 1:o + 65])
        assert bool((m == 1).all())
        assert all(torch.equal(a, b) for a, b in zip(ds[i], again[i]))
    assert sum(ds.offset(i) != other.offset(i) for i in range(20)) >= 18
    with pytest.raises(IndexError):
        ds[-1]


def test_windows_cover_the_whole_stream(tmp_path):
    prefix = megatron_files(tmp_path / "d", [np.arange(1, 41)])  # token value = position + 1
    ds = make_dataset(prefix, "binidx", 8, 65536, seed=0)
    starts = {int(ds[i][0][0]) - 1 for i in range(2000)}
    assert starts == set(range(40 - 8))  # the first and the last token included, nothing past the end


def test_pickle_reopens_the_memmap(tmp_path):
    prefix = megatron_files(tmp_path / "d", [np.arange(100_000) % 65530])
    ds = make_dataset(prefix, "binidx", 16, 65536)
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 4000  # the name travels, not 200 kB of tokens
    assert all(torch.equal(a, b) for i in range(5) for a, b in zip(ds[i], copy[i]))


def test_jsonl_is_tokenized_with_eod(tmp_path):
    texts = ["Hello world.", "第二个文档", "third\n\ndoc"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)] + ["   "])
    ds = make_dataset(path, "jsonl", 4, 65536)
    tok = world_tokenizer()
    assert list(ds.tokens) == [i for t in texts for i in tok.encode(t) + [EOD]]


SFT = [{"prompt": str(1000 + 37 * i), "response": " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4]) * (1 + i % 3)}
       for i in range(12)]


def sft_token_sets():
    """Ids of the prompt parts and of the response parts, encoded here by hand. Digits-only
    prompts and letters-only responses keep the two sets apart, so a misplaced mask shows."""
    tok = world_tokenizer()
    prompt = {i for r in SFT for i in tok.encode(f"User: {r['prompt']}\n\nAssistant:")}
    response = {i for r in SFT for i in tok.encode(" " + r["response"])} | {EOD}
    assert not prompt & response
    return prompt, response


def test_sft_windows_mask_exactly_the_responses(tmp_path):
    prompt_ids, response_ids = sft_token_sets()
    ds = make_dataset(write_jsonl(tmp_path / "s.jsonl", SFT), "sft", 24, 65536, seed=3)
    for i in range(200):
        _, y, m = ds[i]
        assert m.sum() > 0  # windows with nothing to learn are redrawn
        assert set(y[m == 1].tolist()) <= response_ids
        assert set(y[m == 0].tolist()) <= prompt_ids


def test_sft_padded_one_document_per_sample(tmp_path):
    tok = world_tokenizer()
    ds = make_dataset(write_jsonl(tmp_path / "s.jsonl", SFT), "sft_padded", 64, 65536, seed=3)
    assert len(ds) == len(SFT)
    seen = []
    for i in range(len(ds)):
        x, y, m = ds[i]
        learnt = torch.nonzero(m).flatten()
        first, last = int(learnt[0]), int(learnt[-1])
        assert y[last] == EOD and bool((m[first:last + 1] == 1).all())
        assert bool((m[last + 1:] == 0).all()) and bool((x[last + 1:] == EOD).all()) and bool((y[last + 1:] == EOD).all())
        prompt = tok.decode([int(x[0])] + y[:first].tolist())
        record = next(r for r in SFT if prompt == f"User: {r['prompt']}\n\nAssistant:")
        assert tok.decode(y[first:last + 1].tolist()) == " " + record["response"]
        seen.append(record["prompt"])
    assert sorted(seen) == sorted(r["prompt"] for r in SFT)  # each document once per epoch
    second = [tok.decode(ds[len(ds) + i][0][:3].tolist()) for i in range(len(ds))]
    first = [tok.decode(ds[i][0][:3].tolist()) for i in range(len(ds))]
    assert second != first  # a new order each epoch


def test_sft_fields_template_and_truncation(tmp_path):
    tok = world_tokenizer()
    records = [{"q": "Why?", "a": "Because the sky is blue. " * (20 if i < 2 else 1)} for i in range(5)]
    path = write_jsonl(tmp_path / "s.jsonl", records)
    with pytest.warns(UserWarning, match="2 of 5 SFT documents are longer than ctx_len"):
        ds = make_dataset(path, "sft_padded", 32, 65536, prompt_field="q", response_field="a",
                          template="Question: {prompt}\nAnswer: {response}\n")
    x, y, m = next(ds[i] for i in range(5) if ds[i][2][-1] == 1)  # a cut document: masked to the end
    assert tok.decode(y[m == 1].tolist()) == tok.decode(tok.encode(" " + records[0]["a"] + "\n")[: int(m.sum())])
    x, y, m = next(ds[i] for i in range(5) if ds[i][2][-1] == 0)
    assert tok.decode(y[m == 1].tolist()) == " " + records[4]["a"] + "\n"


def load_script():
    spec = importlib.util.spec_from_file_location("make_binidx", os.path.join(ROOT, "scripts", "make_binidx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_binidx_end_to_end(tmp_path, capsys):
    texts = ["The first document.", "第二个文档 with 😀", "   indented\n\tcode()", "last"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"body": t} for t in texts])
    load_script().main([src, str(tmp_path / "out" / "data"), "--text-field", "body"])
    assert "4 documents" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["data.bin", "data.idx"]
    tok = world_tokenizer()
    expected = [tok.encode(t) + [EOD] for t in texts]
    data = BinIdx(tmp_path / "out" / "data")
    assert [data[i].tolist() for i in range(len(data))] == expected
    ds = make_dataset(tmp_path / "out" / "data", "binidx", 8, 65536)
    stream = sum(expected, [])
    x, y, _ = ds[0]
    o = ds.offset(0)
    assert x.tolist() == stream[o:o + 8] and y.tolist() == stream[o + 1:o + 9]


def test_make_binidx_bad_line_leaves_nothing(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, "{oops"])
    with pytest.raises(SystemExit, match="line 2 is not valid JSON"):
        load_script().main([src, str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def bad_binidx(tmp_path, docs=((1, 2, 3),), code=8, dtype=np.uint16):
    return megatron_files(tmp_path / "b", [np.array(d) for d in docs], code, dtype)


def patched_idx(tmp_path, at, value):
    prefix = bad_binidx(tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.seek(at)
        f.write(value)
    return prefix


BAD = {  # name: (make the file, data_type, ctx_len, vocab_size, what the sentence says)
    "id past vocab (memmap)": (lambda p: bad_binidx(p, [range(5), [3, 70000, 9]], 4, np.int32), "binidx", 2, 65536,
                               r"holds token id 70000 \(max 70000\), outside the model's vocabulary of 65536 ids"),
    "negative id": (lambda p: bad_binidx(p, [[4, -2, 9]], 4, np.int32), "binidx", 2, 65536, r"holds token id -2"),
    "World ids, tiny model": (lambda p: write_jsonl(p / "t.jsonl", [{"text": "hello world"}]), "jsonl", 2, 260,
                              r"outside the model's vocabulary of 260 ids"),
    "empty jsonl": (lambda p: write_jsonl(p / "t.jsonl", ["", "  "]), "jsonl", 2, 65536, r"t\.jsonl contains no documents"),
    "empty sft": (lambda p: write_jsonl(p / "t.jsonl", []), "sft", 2, 65536, r"t\.jsonl contains no documents"),
    "no sequences": (lambda p: bad_binidx(p, []), "binidx", 2, 65536, r"b\.idx lists no documents"),
    "bin and idx disagree": (lambda p: (bad_binidx(p), open(p / "b.bin", "wb").close())[0], "binidx", 2, 65536,
                             r"describes 6 bytes of tokens but .*b\.bin holds 0"),
    "too short": (lambda p: bad_binidx(p, [range(10)]), "binidx", 16, 65536, r"holds 10 tokens, fewer than the ctx_len \+ 1 = 17"),
    "missing jsonl": (lambda p: str(p / "nope.jsonl"), "sft", 2, 65536, r"nope\.jsonl does not exist"),
    "missing idx": (lambda p: (bad_binidx(p), os.remove(p / "b.idx"))[0], "binidx", 2, 65536, r"b\.idx does not exist"),
    "not json": (lambda p: write_jsonl(p / "t.jsonl", [{"text": "a"}, "", "{'text': 1}"]), "jsonl", 2, 65536,
                 r"t\.jsonl line 3 is not valid JSON"),
    "no field": (lambda p: write_jsonl(p / "t.jsonl", [{"text": "a"}, {"txt": "b"}]), "jsonl", 2, 65536,
                 r'line 2 has no "text" field \(to read another field, give its name with --text_field\)'),
    "not an object": (lambda p: write_jsonl(p / "t.jsonl", ['["text"]']), "jsonl", 2, 65536, r'line 1 has no "text" field'),
    "field not text": (lambda p: write_jsonl(p / "t.jsonl", [{"text": 5}]), "jsonl", 2, 65536, r'line 1: "text" is not a string'),
    "empty response": (lambda p: write_jsonl(p / "t.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": " "}]),
                       "sft", 2, 65536, r'line 2 has an empty "response": nothing to learn'),
    "responses beyond ctx_len": (lambda p: write_jsonl(p / "t.jsonl", [{"prompt": "word " * 20, "response": "b"}]),
                                 "sft_padded", 8, 65536, r"no document has a response token within its first 9 tokens"),
    "unknown type": (lambda p: bad_binidx(p), "text", 2, 65536, f"data_type must be one of {', '.join(DATA_TYPES)}, not 'text'"),
    "not binidx": (lambda p: patched_idx(p, 0, b"NOTMAGIC!"), "binidx", 2, 65536, r"is not a Megatron binidx index"),
    "float tokens": (lambda p: patched_idx(p, 17, b"\x07"), "binidx", 2, 65536, r"floating-point numbers, not token ids"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_data_is_refused_in_one_sentence(tmp_path, name):
    make, data_type, ctx_len, vocab_size, pattern = BAD[name]
    path = make(tmp_path)
    with pytest.raises(DataError, match=pattern) as e:
        make_dataset(path, data_type, ctx_len, vocab_size)
    message = str(e.value)
    assert "\n" not in message and message.endswith(".") and not re.search(r"[.?!] [A-Z]", message)


def test_template_needs_both_fields(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"must contain \{prompt\} once, followed by \{response\} once"):
        make_dataset(path, "sft", 2, 65536, template="{response} then {prompt}")

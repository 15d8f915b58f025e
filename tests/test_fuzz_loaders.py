"""Property-based: random corruptions of real adapter files (ours, with every metadata field, and
the older repository's), run.json, binidx pairs and jsonl files, fed to the loaders in this
process. Each case ends in a correct load or one sentence raised by our own checks (never another
exception type, never a library's error passed on), and never changes the input file. The cases
are drawn from a fixed seed (derandomize) so CI runs the same ones every time; each test counts
what it ran, and together they run more than 2000."""
import copy
import io
import json
import os
import struct
import tempfile
import traceback
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from src.bone import BoneConfig, apply_adapters, check_base, load_adapter, plan_merge, read_adapter, save_adapter
from src.bone.config import AdapterError
from src.config import CheckpointError
from src.data import BinIdx, DataError, make_dataset, write_binidx
from src.model import RWKV6
from src.training.rundir import RunDir, differences
from tests.tiny import SHAPES, random_state_dict, randomize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = (AdapterError, CheckpointError, DataError, ValueError)
RUNS = {}       # test name -> cases run, for the report at the end of each test


def cases(n):
    """n cases, times FUZZ_SCALE (for a longer search by hand; CI runs n)."""
    return int(n * float(os.environ.get("FUZZ_SCALE", 1)))


def fuzz_settings(n):
    phases = [Phase.explicit, Phase.generate] if os.environ.get("FUZZ_NO_SHRINK") else list(Phase)
    return settings(max_examples=cases(n), deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck), phases=phases, report_multiple_bugs=True)


def one_sentence(e):
    """e was raised by a check of ours (its raise statement is in src/) as one sentence."""
    assert isinstance(e, OURS), f"{type(e).__name__}: {e}"
    frames = traceback.extract_tb(e.__traceback__)
    assert frames[-1].filename.startswith(os.path.join(ROOT, "src")), f"raised by {frames[-1].filename}: {e}"
    message = str(e)
    assert message and "\n" not in message and message.rstrip().endswith((".", ")")), repr(message)
    assert "Traceback" not in message


def outcome(call):
    """call() returns normally, or raises one sentence of ours."""
    try:
        return call()
    except BaseException as e:  # noqa: B902 (anything else fails the test, with its own type)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        one_sentence(e)
        return None


def unchanged(paths, call):
    before = {p: open(p, "rb").read() for p in paths if os.path.exists(p)}
    result = outcome(call)
    assert {p: open(p, "rb").read() for p in paths if os.path.exists(p)} == before, "an input file changed"
    return result


# --- value strategies ------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.integers(-3, 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(["bone", "bat", "lora", "none", "nf4", "rwkv6-adapter", "time", "ln", "head",
                                     "blocks.0.att.key", "blocks.0.att.key.weight"]))
tensors = st.builds(lambda shape, fill, dtype: torch.full(shape, fill).to(dtype),
                    st.lists(st.integers(0, 3), max_size=3).map(tuple),
                    st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -2.0]),
                    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]))
values = st.recursive(scalars | tensors, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(
                          ["blocks.0.att.key", "blocks.1.ffn.value", "vocab_size", "n_embd"]), st.integers(0, 3)),
                          inner, max_size=3), max_leaves=6)


def byte_corruption():
    """A change to a file's bytes: truncate, overwrite some bytes, or append."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)))


def corrupt_bytes(data, how):
    kind, arg = how
    if kind == "truncate":
        return data[:int(arg * len(data))]
    if kind == "append":
        return data + arg
    data = bytearray(data)
    for at, byte in arg:
        if data:
            data[min(len(data) - 1, int(at * len(data)))] = byte
    return bytes(data)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --- adapter files -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters():
    """A plain base model and real adapter files for it: bone with train parts, bat, LoRA, and the
    older repository's layout (model.-prefixed .disha tensors, no metadata)."""
    base = RWKV6.from_state_dict(random_state_dict(SHAPES["small"], seed=0))
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    files = {}
    for mode, r, parts in (("bone", 16, ["time", "ln"]), ("bat", 16, []), ("lora", 4, ["ln"])):
        model = copy.deepcopy(base)
        apply_adapters(model, BoneConfig(r=r, mode=mode, train_parts=parts, lora_alpha=8 if mode == "lora" else None),
                       verbose=False)
        randomize(model, 1)
        with tempfile.TemporaryDirectory() as d:
            save_adapter(model, os.path.join(d, "a.pth"))
            files[mode] = torch.load(os.path.join(d, "a.pth"), weights_only=True)
    files["legacy"] = OrderedDict(("model." + k.replace(".bone", ".disha"), v) for k, v in files["bat"].items()
                                  if k != "__bone_meta__")
    return base, shapes, files


def structural_change():
    """A change to an adapter state dict: a metadata field set, removed or added; a tensor
    replaced, removed, renamed or given NaN; the whole metadata or a tensor swapped for another kind."""
    meta_fields = st.sampled_from(["format", "version", "mode", "r", "targets", "train_parts", "lora_alpha",
                                   "fingerprint", "quant", "quantized", "base_weights", "extra"])
    return st.one_of(
        st.tuples(st.just("set"), meta_fields, values),
        st.tuples(st.just("delete"), meta_fields, st.none()),
        st.tuples(st.just("r entry"), st.integers(0, 40), values),
        st.tuples(st.just("fingerprint entry"), st.sampled_from(["vocab_size", "n_embd", "n_layer", "dim_ffn",
                                                                 "head_size", "new"]), values),
        st.tuples(st.just("meta"), st.none(), values),
        st.tuples(st.just("tensor"), st.integers(0, 60), values),
        st.tuples(st.just("drop tensor"), st.integers(0, 60), st.none()),
        st.tuples(st.just("nan"), st.integers(0, 60), st.integers(0, 10**6)),
        st.tuples(st.just("rename"), st.integers(0, 60), st.sampled_from(["x", "blocks.9.att.key.bone", "emb.weight",
                                                                          "head.weight", "blocks.0.att.time_faaaa"])),
        st.tuples(st.just("whole"), st.none(), values))


def apply_change(sd, change):
    kind, key, value = change
    sd = OrderedDict(sd)
    meta = sd.get("__bone_meta__")
    meta = copy.deepcopy(meta) if isinstance(meta, dict) else meta
    names = [k for k in sd if k != "__bone_meta__"]
    if kind == "whole":
        return value
    if kind in ("set", "delete", "r entry", "fingerprint entry", "meta") and not isinstance(meta, dict):
        kind, key = ("tensor", 0)  # the older layout has no metadata: change a tensor instead
    if kind == "set":
        meta[key] = value
    elif kind == "delete":
        meta.pop(key, None)
    elif kind == "r entry":
        r = dict(meta["r"]) if isinstance(meta.get("r"), dict) else {}
        r[list(r)[key % len(r)] if r and key < 30 else "blocks.7.att.key"] = value
        meta["r"] = r
    elif kind == "fingerprint entry":
        fp = meta.get("fingerprint")
        meta["fingerprint"] = {**(fp if isinstance(fp, dict) else {}), key: value}
    elif kind == "meta":
        meta = value
    elif not names:
        pass
    elif kind == "tensor":
        sd[names[key % len(names)]] = value
    elif kind == "drop tensor":
        del sd[names[key % len(names)]]
    elif kind == "nan" and isinstance(sd[names[key % len(names)]], torch.Tensor):
        t = sd[names[key % len(names)]].clone()
        if t.numel():
            t.view(-1)[value % t.numel()] = float("nan")
        sd[names[key % len(names)]] = t
    elif kind == "rename":
        name = names[key % len(names)]
        sd = OrderedDict((value if k == name else k, v) for k, v in sd.items())
    if meta is not None or "__bone_meta__" in sd:
        sd["__bone_meta__"] = meta
    return sd


def exercise_adapter(base, shapes, path):
    """What merge.py, train.py --bone_load and generate.py --adapter do with the file."""
    read = outcome(lambda: read_adapter(path))
    fingerprint = base.config.fingerprint()
    outcome(lambda: plan_merge(shapes, fingerprint, path))
    outcome(lambda: check_base(path, base.state_dict(), base.config, "the base"))
    model = copy.deepcopy(base)
    loaded = outcome(lambda: load_adapter(model, path))
    if loaded is not None:
        assert read is not None
        sd, _, _ = read
        state = dict(loaded.named_parameters())
        for k, v in sd.items():     # a correct load: every tensor of the file is in the model as it was
            assert torch.equal(state[k].detach(), v.to(state[k].dtype)), k


def test_adapter_file_corruptions(adapters, tmp_path):
    base, shapes, files = adapters
    d = str(tmp_path)
    path = os.path.join(d, "adapter.pth")
    count = [0]

    @fuzz_settings(900)
    @given(which=st.sampled_from(sorted(files)), changes=st.lists(structural_change(), max_size=3),
           raw=st.one_of(st.none(), byte_corruption()))
    def case(which, changes, raw):
        count[0] += 1
        sd = files[which]
        for change in changes:
            if not isinstance(sd, dict):
                break
            sd = apply_change(sd, change)
        data = saved(sd)
        write(path, corrupt_bytes(data, raw) if raw else data)
        unchanged([path], lambda: exercise_adapter(base, shapes, path))
        assert os.listdir(d) == ["adapter.pth"]     # nothing left behind

    case()
    RUNS["adapter"] = count[0]
    print(f"adapter files: {count[0]} cases")
    assert count[0] >= cases(900)


def test_the_real_files_load(adapters):
    """The corruptions start from files that load (so an error is the corruption's doing)."""
    base, shapes, files = adapters
    for sd in files.values():
        load_adapter(copy.deepcopy(base), sd)
        plan_merge(shapes, base.config.fingerprint(), sd)


# --- run.json ------------------------------------------------------------------------------------------

RUN_JSON = {"settings": {"base model": "small-0.pth (816,105 bytes)", "adapter mode": "bone",
                         "r": {"blocks.0.att.key": 16, "blocks.1.att.key": 16},
                         "targets": ["blocks.0.att.key", "blocks.1.att.key"], "train parts": [], "lora_alpha": None,
                         "quant": "none"},
            "total_steps": 16, "resume_step": 8, "arguments": {"lr_init": 0.01, "ctx_len": 32, "resume": False},
            "resolved": {"total_steps": 16, "data": {"documents": 40, "tokens": 12000}}}
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=6)


def test_run_json_corruptions(tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "run.json")
    count = [0]

    @fuzz_settings(400)
    @given(field=st.sampled_from(["settings", "total_steps", "resume_step", "other", "settings.r", "settings.quant",
                                  "arguments", "resolved", None]),
           value=json_values, drop=st.booleans(), raw=st.one_of(st.none(), byte_corruption()),
           as_text=st.sampled_from(["json", "not utf-8", "nan"]))
    def case(field, value, drop, raw, as_text):
        count[0] += 1
        data = copy.deepcopy(RUN_JSON)
        if field and field.startswith("settings."):
            data["settings"][field[len("settings."):]] = value
        elif field and drop:
            data.pop(field, None)
        elif field:
            data[field] = value
        else:
            data = value
        text = json.dumps(data).encode()
        if as_text == "not utf-8":
            text = text[:len(text) // 2] + b"\xff\xfe" + text[len(text) // 2:]
        elif as_text == "nan":
            text = text.replace(b"16", b"NaN")
        write(path, corrupt_bytes(text, raw) if raw else text)

        def load():
            recorded = RunDir(d).recorded()
            differences(recorded["settings"], RUN_JSON["settings"])     # what --resume does with it
            differences(recorded.get("arguments") or {}, RUN_JSON["arguments"])
        unchanged([path], load)
        assert os.listdir(d) == ["run.json"]

    case()
    print(f"run.json: {count[0]} cases")
    assert count[0] >= cases(400)


# --- binidx and jsonl ------------------------------------------------------------------------------------

def test_binidx_corruptions(tmp_path):
    d = str(tmp_path)
    write_binidx(os.path.join(d, "good"), [list(range(1, 30)), list(range(5, 25)), [7] * 12])
    good = {ext: open(os.path.join(d, "good" + ext), "rb").read() for ext in (".bin", ".idx")}
    prefix = os.path.join(d, "data")
    count = [0]
    fields = st.one_of(
        st.tuples(st.just("header"), st.integers(0, 4), st.integers(-2**63, 2**64 - 1)),
        st.tuples(st.just("size"), st.integers(0, 2), st.integers(-2**31, 2**31 - 1)),
        st.tuples(st.just("pointer"), st.integers(0, 2), st.integers(-2**63, 2**63 - 1)),
        st.tuples(st.just("small"), st.integers(0, 2), st.integers(-4, 200)))

    @fuzz_settings(450)
    @given(edits=st.lists(fields, max_size=3), idx_raw=st.one_of(st.none(), byte_corruption()),
           bin_raw=st.one_of(st.none(), byte_corruption()), ctx_len=st.integers(1, 40),
           missing=st.sampled_from([None, None, None, ".bin", ".idx"]))
    def case(edits, idx_raw, bin_raw, ctx_len, missing):
        count[0] += 1
        idx = bytearray(good[".idx"])
        for kind, i, v in edits:
            if kind == "header":
                fmt = ["<9s", "<Q", "<B", "<Q", "<Q"][i]
                at = [0, 9, 17, 18, 26][i]
                value = b"MMIDIDY\x00\x00" if i == 0 else v % (256 if i == 2 else 2**64)
                idx[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
            elif kind in ("size", "small"):
                struct.pack_into("<i", idx, 34 + 4 * i, max(-2**31, min(2**31 - 1, v)))
            else:
                struct.pack_into("<q", idx, 34 + 12 + 8 * i, v)
        for ext, data, raw in ((".idx", bytes(idx), idx_raw), (".bin", good[".bin"], bin_raw)):
            path = prefix + ext
            if os.path.exists(path):
                os.remove(path)
            if ext != missing:
                write(path, corrupt_bytes(data, raw) if raw else data)

        def load():
            b = BinIdx(prefix)
            for i in range(len(b)):
                b[i].sum()
            ds = make_dataset(prefix, "binidx", ctx_len=ctx_len, vocab_size=50, seed=0)
            ds[0]
            ds[3]
        unchanged([prefix + ".bin", prefix + ".idx"], load)
        assert not [n for n in os.listdir(d) if n.startswith(".tmp")]

    case()
    print(f"binidx: {count[0]} cases")
    assert count[0] >= cases(450)


@pytest.fixture(scope="module")
def tokenizer():
    from src.tokenizer import world_tokenizer
    return world_tokenizer()


def test_jsonl_corruptions(tokenizer, tmp_path):
    d = str(tmp_path)
    path = os.path.join(d, "data.jsonl")
    count = [0]
    line = st.one_of(
        st.builds(lambda t: json.dumps({"text": t}).encode(), st.text(max_size=20)),
        st.builds(lambda p, r: json.dumps({"prompt": p, "response": r}).encode(), st.text(max_size=10),
                  st.text(max_size=10)),
        st.builds(lambda v: json.dumps(v).encode(), json_values),
        st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                  st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)),
        st.builds(lambda t: json.dumps({"text": t}).replace("\\u", "\\ud800\\u", 1).encode(), st.text(max_size=5)),
        st.binary(max_size=20),
        st.just(b"[" * 5000))

    @fuzz_settings(450)
    @given(lines=st.lists(line, max_size=5), data_type=st.sampled_from(["jsonl", "sft", "sft_padded"]),
           raw=st.one_of(st.none(), byte_corruption()), ctx_len=st.integers(1, 12))
    def case(lines, data_type, raw, ctx_len):
        count[0] += 1
        data = b"\n".join(lines)
        write(path, corrupt_bytes(data, raw) if raw else data)

        def load():
            ds = make_dataset(path, data_type, ctx_len=ctx_len, vocab_size=65536, seed=0, tokenizer=tokenizer)
            ds[0]
        with np.errstate(all="ignore"):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # sft_padded's note on cut documents
                unchanged([path], load)
        assert os.listdir(d) == ["data.jsonl"]

    case()
    print(f"jsonl: {count[0]} cases")
    assert count[0] >= cases(450)

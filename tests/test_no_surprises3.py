"""No surprises, round two, the rest (issue 20): --quant on a dtype or shape bitsandbytes refuses and
a quant-trained adapter merged against another base; generate.py after a prompt longer than any
context, and Ctrl-C; kill -9 during a validation pass and during a quantized run, then --resume
(the losses repeat); Lightning's start-up lines absent from train.py's output (and the filter that
removes them shown to matter); merge.py naming the base file that holds NaN. House style of
tests/test_no_surprises.py: exit != 0, one sentence, no traceback, directories unchanged."""
import csv
import json
import logging
import re
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

import generate
import merge
from src.checkpoint import atomic_save, load_state_dict
from src.data import write_binidx
from src.quant import QuantError, check_quantizable, quantize_model
from tests.test_no_surprises import args, killed_on_failure, refused
from tests.test_train import ROOT, losses, setup, train as run_train  # noqa: F401 (setup is a fixture)
from tests.test_generate import world  # noqa: F401 (a fixture)
from tests.tiny import save_random_checkpoint

import bitsandbytes.functional as bnb_F


def float64_copy(path, out):
    """The same checkpoint with every tensor in float64 (the values unchanged)."""
    atomic_save({k: v.double() for k, v in load_state_dict(path, mmap=False).items()}, out)
    return str(out)


# --- --quant on what bitsandbytes cannot take, and against another base --------------------------------

def test_quant_refuses_a_base_dtype_bitsandbytes_does_not_take(setup, tmp_path):
    """A float64 base kept as stored (--precision bf16 on the CPU does not cast it) cannot be held
    nf4: one sentence before any work. merge.py --quant rounds such a base through fp32 first, as
    --precision fp32 trains it: the merge equals the one from the fp32 file."""
    f64 = float64_copy(setup[1], tmp_path / "f64.pth")
    out = tmp_path / "out"
    refused(args(setup, out, "--quant", "nf4", "--precision", "bf16", "--load_model", f64),
            r"--quant nf4 cannot hold emb.weight \(\[260, 64\], float64\) quantized: bitsandbytes quantizes fp32, "
            r"bf16 and fp16 weights only \(--precision fp32 loads the base in fp32\)", setup[0], tmp_path)
    assert not out.exists()
    from tests.test_quant import trained_pair
    base, adapter, _, _ = trained_pair(tmp_path, "bone")
    f64 = float64_copy(base, tmp_path / "f64-base.pth")
    for b, m in ((base, "m32.pth"), (f64, "m64.pth")):
        assert merge.main(["--base_model", b, "--adapter", str(adapter), "--output", str(tmp_path / m), "--quant",
                           "nf4", "--dtype", "fp32", "--quiet"]) is None
    m32, m64 = load_state_dict(tmp_path / "m32.pth"), load_state_dict(tmp_path / "m64.pth")
    assert m32.keys() == m64.keys() and all(torch.equal(m32[k], m64[k]) for k in m32)


def test_quant_refuses_a_shape_bitsandbytes_refuses(setup, tmp_path, monkeypatch):
    """bitsandbytes 0.50 takes every shape (odd sizes, fewer values than a block: shown last, with
    the values it gives back); one that refused a shape is a stand-in here (matrices wider than 200
    refused): train.py says which tensor, before any work, and quantize_model says the same."""
    real = bnb_F.quantize_4bit

    def picky(A, *a, **k):
        if A.shape[-1] > 200:
            raise ValueError("Blockwise quantization here takes at most 200 columns.\nmore detail")
        return real(A, *a, **k)
    monkeypatch.setattr(bnb_F, "quantize_4bit", picky)
    said = (r"bitsandbytes cannot hold blocks.0.ffn.value.weight \(\[64, 224\], float32\) as nf4 \(Blockwise "
            r"quantization here takes at most 200 columns\): choose another --quant, or none\.$")
    refused(args(setup, tmp_path / "out", "--quant", "nf4"), said, setup[0], tmp_path)
    assert not (tmp_path / "out").exists()
    from tests.test_quant import adapted
    from tests.tiny import SHAPES, random_state_dict
    with pytest.raises(QuantError, match=said):
        quantize_model(adapted(random_state_dict(SHAPES["small"], 0), "bone"), "nf4")
    monkeypatch.undo()
    from src.quant import QuantizedWeight
    from tests.test_quant import roundtrip
    for shape in ((7, 3), (1, 1), (65, 3), (3, 130)):
        frozen = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False)).requires_grad_(False)
        w = frozen[0].weight
        for quant in ("nf4", "fp4", "int8"):
            bnb_F.name2qmap.pop("dynamic", None)     # the probe must not leave bitsandbytes a meta code table
            check_quantizable(frozen, quant)
            assert torch.equal(QuantizedWeight(w, quant).dequantize(), roundtrip(w, quant)), (shape, quant)


def test_a_quant_trained_adapter_merged_against_another_base(tmp_path):
    """An adapter trained on an nf4-held small base, merged against a base of other sizes or of the
    other family: one sentence naming what differs, nothing written."""
    from tests.test_quant import trained_pair
    _, adapter, _, _ = trained_pair(tmp_path, "bone")
    deep, _, _ = save_random_checkpoint(str(tmp_path), "deep", 0, dtype="fp32")
    rwkv7, _, _ = save_random_checkpoint(str(tmp_path), "small7", 0, dtype="fp32")
    for other, differs in ((deep, r"vocab_size=260, n_embd=64, n_layer=2, dim_ffn=224, but this model has "
                                  r"vocab_size=300, n_embd=96, n_layer=3, dim_ffn=200"),
                           (rwkv7, r"family=x060, dim_ffn=224, but this model has family=x070, dim_ffn=192")):
        for quant in ("nf4", "none"):
            refused(["--base_model", other, "--adapter", str(adapter), "--output", str(tmp_path / "m.pth"),
                     "--quant", quant], r"adapter-bone.pth was made for a model with " + differs, tmp_path,
                    main=merge.main)
    assert not (tmp_path / "m.pth").exists()


# --- the data readers by name, through train.py -------------------------------------------------------------

def damaged_binidx(tmp_path, name, damage):
    prefix = str(tmp_path / name)
    write_binidx(prefix, [list(range(1, 60)), list(range(3, 70))])
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as f:
            data = bytearray(f.read())
        with open(prefix + ext, "wb") as f:
            f.write(damage(ext, data))
    return prefix


def jsonl(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def pointer_past_the_bin(ext, data):
    if ext == ".idx":           # header (34 bytes), 2 sizes (int32), then the pointers (int64)
        struct.pack_into("<q", data, 34 + 4 * 2 + 8, 10**6)
    return bytes(data)


DATA = {  # name: (make the file, --data_type, what the sentence says)
    "truncated .bin": (lambda p: damaged_binidx(p, "t", lambda e, d: d[:len(d) // 2] if e == ".bin" else d), "binidx",
                       r"t.idx describes 252 bytes of tokens but .*t.bin holds 126: the two files do not belong together"),
    ".idx past the .bin": (lambda p: damaged_binidx(p, "p", pointer_past_the_bin), "binidx",
                           r"p.idx describes 1000134 bytes of tokens but .*p.bin holds 252"),
    "wrong magic": (lambda p: damaged_binidx(p, "m", lambda e, d: b"XXXX" + d[4:] if e == ".idx" else d), "binidx",
                    r"m.idx is not a Megatron binidx index \(its first bytes are not MMIDIDX\)"),
    "empty .idx": (lambda p: damaged_binidx(p, "e", lambda e, d: b"" if e == ".idx" else d), "binidx",
                   r"e.idx is not a Megatron binidx index"),
    "empty .bin": (lambda p: damaged_binidx(p, "z", lambda e, d: b"" if e == ".bin" else d), "binidx",
                   r"z.idx describes 252 bytes of tokens but .*z.bin holds 0"),
    "empty jsonl": (lambda p: jsonl(p, "e.jsonl", b""), "jsonl", r"e.jsonl contains no documents"),
    "non-UTF-8 line": (lambda p: jsonl(p, "u.jsonl", b'{"text": "hello"}\n{"text": "caf\xe9"}\n'), "jsonl",
                       r"u.jsonl line 2 is not UTF-8 text \(byte 14 of the line\)"),
    "a line not an object": (lambda p: jsonl(p, "a.jsonl", b'{"text": "hello"}\n["text", "x"]\n'), "jsonl",
                             r'a.jsonl line 2 has no "text" field \(it is a JSON list, not an object\)'),
}


@pytest.mark.parametrize("name", list(DATA))
def test_damaged_data_through_train(setup, tmp_path, name):
    """The cases the issue names, one by one (tests/test_fuzz_loaders.py draws them at random):
    train.py says which file and what is wrong, and changes nothing."""
    make, data_type, pattern = DATA[name]
    data = tmp_path / "data"
    data.mkdir()
    path = make(data)
    out = tmp_path / "out"
    refused(args(setup, out, "--data_file", path, "--data_type", data_type), pattern, setup[0], tmp_path)
    if data_type == "binidx":       # the validation data goes through the same reader
        refused(args(setup, out, "--val_data", path), pattern, setup[0], tmp_path)
    assert not out.exists() or not [p for p in os.listdir(out) if p != ".lock"]


# --- generate.py --------------------------------------------------------------------------------------------

# (the `world` fixture, imported above: a World base, an adapter, their fp32 merge)

def test_generate_after_a_prompt_longer_than_any_context(world, capsys):
    """RWKV is recurrent: a 600+ token prompt (far past the ctx_len of 32 the tests train with, or
    any other) is read whole, and the greedy continuation is the `rwkv` package's on the fp32-merged
    file; feeding the prompt in three pieces through the state gives the same tokens."""
    from src.generation import generate as generate_ids, load_model, model_step, world_sampler
    from src.sampling import SamplingArgs
    from src.tokenizer import world_tokenizer
    from tests.test_generate import NO_PENALTY, runtime_greedy
    base, adapter, merged = world
    tokenizer = world_tokenizer()
    text = " ".join(f"{i} {w}" for i, w in enumerate(["fox", "dog", "quick", "lazy", "brown", "over"] * 60))
    prompt = tokenizer.encode(text)
    assert len(prompt) > 600
    expected = runtime_greedy(merged, prompt, 16)
    assert max(expected) < tokenizer.vocab_size
    generate.main(["--model", base, "--adapter", adapter, "--prompt", text, "--max_tokens", "16", "--temperature", "0",
                   "--token_stop", "", *NO_PENALTY])
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"
    step = model_step(load_model(base, adapter))
    state = None
    for piece in (prompt[:250], prompt[250:500], prompt[500:]):
        logits, state = step(piece, state)

    def fed(ids, s):        # the prompt was read above, in pieces: its logits and state stand in for it
        return (logits, state) if s is None else step(ids, s)
    greedy = SamplingArgs(temperature=0, alpha_presence=0, alpha_frequency=0)
    assert list(generate_ids(fed, prompt, 16, world_sampler(greedy, tokenizer))) == expected


def test_ctrl_c_while_generating_is_one_sentence(world, tmp_path):
    base, _, _ = world
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "generate.py", "--model", base, "--prompt", "Once upon a time",
                                 "--max_tokens", "1000000", "--temperature", "0", "--token_stop", ""], cwd=ROOT,
                                stdout=out, stderr=subprocess.PIPE, text=True)
        with killed_on_failure(proc):
            deadline = time.time() + 240
            while (tmp_path / "out.txt").stat().st_size < 20:      # it is generating
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert err.strip() == "generate.py: interrupted.", err


# --- kill -9 during a validation pass and during a quantized run, then --resume -------------------------------

CASES = {
    # Validation at steps 8 and 16 over the 375 windows of the training data (about 2 s; a step
    # takes about 0.05 s); a resume point every 4 steps. Killed in step 8's validation.
    "validation": lambda d: ["--val_data", str(d / "data"), "--val_every", "8", "--save_every_steps", "4"],
    "quant": lambda d: ["--quant", "nf4", "--save_every_steps", "4"],
}
STRAIGHT = {}


def log_rows(out):
    try:
        with open(out / "log.csv") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def val_losses(out):
    return {int(r["step"]): float(r["val_loss"]) for r in log_rows(out) if r["val_loss"]}


def straight_run(setup, tmp_path_factory, case):
    """The uninterrupted run of a case (made once per module) and its output."""
    if case not in STRAIGHT:
        out = tmp_path_factory.mktemp(f"straight-{case}")
        output = run_train(setup, out, "--strategy", "deepspeed_stage_2", *CASES[case](setup[0]), steps=16)
        STRAIGHT[case] = out, output
    return STRAIGHT[case]


def recorded(out):
    """run.json as far as it is written (nothing yet: {})."""
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.parametrize("case", list(CASES))
def test_kill_9_then_resume_repeats_the_losses(setup, tmp_path, tmp_path_factory, case):
    straight, _ = straight_run(setup, tmp_path_factory, case)
    a = losses(straight)
    assert sorted(a) == list(range(1, 17))
    killed = tmp_path / "killed"
    extra = ["--strategy", "deepspeed_stage_2", *CASES[case](setup[0])]
    proc = run_train(setup, killed, *extra, steps=16, wait=False)
    with killed_on_failure(proc):
        deadline = time.time() + 240
        if case == "validation":
            # Killed once the run says step 8's validation has begun (it takes seconds, a step a tenth
            # of one): read from its output, not guessed from timings, which a busy machine upsets.
            started = threading.Event()

            def watch():
                for line in proc.stdout:
                    if "validation at step 8 " in line:
                        started.set()
            threading.Thread(target=watch, daemon=True).start()
            assert started.wait(timeout=240), "the run never began step 8's validation"
            time.sleep(0.2)
        else:
            # run.json records the resume point just after it is written: wait for the record, which is
            # what this test reads (killed between the two, a busy machine failed it).
            while "resume_step" not in recorded(killed):
                assert proc.poll() is None and time.time() < deadline, "the run ended before its first resume point"
                time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed_from = json.load(open(killed / "run.json"))["resume_step"]
    if case == "validation":
        # Killed after step 7 was logged and before step 8 was: in step 8's validation.
        assert max(losses(killed)) == 7 and resumed_from == 4, (losses(killed), resumed_from)
    assert resumed_from < 16, "killed too late to test anything"
    run_train(setup, killed, *extra, "--resume", steps=16)
    b = losses(killed)
    assert sorted(b) == list(range(1, 17))
    for s in range(resumed_from + 1, 17):
        # Same samples, same optimizer state: equal up to fp32 summation order.
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
    if case == "validation":
        va, vb = val_losses(straight), val_losses(killed)
        assert sorted(va) == sorted(vb) == [8, 16]
        assert all(vb[s] == pytest.approx(va[s], rel=1e-5) for s in va), (va, vb)
    else:
        meta = torch.load(sorted(killed.glob("adapter-*.pth"))[-1], weights_only=True)["__bone_meta__"]
        assert meta["quant"] == "nf4" and meta["quantized"]


def test_chunk_ctx_0_is_the_plain_pass(setup, tmp_path, tmp_path_factory):
    """--chunk_ctx 0 is accepted and means off: the losses are the plain run's (the straight
    validation run: its validation comes after step 8's loss; the sample stream does not depend on
    the step count)."""
    straight, _ = straight_run(setup, tmp_path_factory, "validation")
    output = run_train(setup, tmp_path, "--strategy", "deepspeed_stage_2", "--chunk_ctx", "0", steps=8)
    assert "in pieces of" not in output
    a, b = losses(straight), losses(tmp_path)
    assert sorted(b) == list(range(1, 9))
    assert all(b[s] == pytest.approx(a[s], rel=1e-6) for s in b), (a, b)


# --- Lightning's start-up lines -------------------------------------------------------------------------------

LIGHTNING_LINES = ("GPU available", "TPU available", "HPU available", "`Trainer.fit` stopped", "LOCAL_RANK")


def test_lightning_start_up_lines_are_not_in_train_output(setup, tmp_path_factory):
    _, output = straight_run(setup, tmp_path_factory, "validation")     # stdout and stderr together
    assert "done: 16 steps" in output and "validation loss on" in output, output[-2000:]
    for line in LIGHTNING_LINES:
        assert line not in output, (line, output[-3000:])


def test_without_the_filter_lightning_prints_them():
    """The check above can fail: a handler on Lightning's logger that noise.silence() has not seen
    receives "GPU available" from a Trainer and "`Trainer.fit` stopped" from rank_zero_info; once
    silence() has run, neither arrives, while any other line still does."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    from src.training import noise
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                                              "lightning.fabric")]
    saved = [(x, list(x.filters)) for lg in loggers for x in (lg, *lg.handlers)]
    seen = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    capture = Capture()
    loggers[0].addHandler(capture)

    def lightning_speaks():
        seen.clear()
        pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
        rank_zero_info("`Trainer.fit` stopped: `max_steps=2` reached.")
        rank_zero_info("an ordinary line")
        return " | ".join(seen)
    try:
        heard = lightning_speaks()
        assert "GPU available: False" in heard and "`Trainer.fit` stopped" in heard and "an ordinary line" in heard
        noise.silence()
        heard = lightning_speaks()
        assert not any(line in heard for line in LIGHTNING_LINES) and "an ordinary line" in heard, heard
    finally:
        loggers[0].removeHandler(capture)
        for x, filters in saved:
            x.filters[:] = filters


# --- merge.py and a base with NaN --------------------------------------------------------------------------

def test_merge_names_the_base_file_that_holds_nan(tmp_path):
    from tests.test_merge import make_pair
    base, adapter = make_pair(tmp_path, "small", "bone", 32)
    sd = load_state_dict(base, mmap=False)
    sd["blocks.0.att.key.weight"][1, 2] = float("nan")
    atomic_save(sd, tmp_path / "nan.pth")
    message = refused(["--base_model", str(tmp_path / "nan.pth"), "--adapter", adapter, "--output",
                       str(tmp_path / "m.pth")], re.escape(f"merge.py: {tmp_path / 'nan.pth'}: blocks.0.att.key.weight "
                                                           "holds 1 NaN or Inf values: the checkpoint is damaged"),
                      tmp_path, main=merge.main)
    assert message.startswith("merge.py: ")

"""Ordinary use without surprises: every file protected, every input checked up front (one
sentence, exit != 0, no traceback, the directories involved unchanged, nothing left behind), the
user told what happened. Item by item, as issue 13 lists them."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import merge
import train
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import make_binidx  # noqa: E402
from src.bone import BoneConfig, apply_adapters, save_adapter
from src.checkpoint import atomic_save, load_state_dict, make_checkpoint
from src.model import RWKV6
from src.training.rundir import resume_point_step, run_state
from tests.test_train import ROOT, losses, setup, train as run_train  # noqa: F401 (setup is a fixture)
from tests.tiny import save_random_checkpoint


def snapshot(*dirs):
    """Every file under dirs with its bytes: to show that nothing changed and nothing was left."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    out[path] = fh.read()
    return out


def refused(argv, pattern, *dirs, main=train.main):
    """main(argv) must exit with one sentence matching pattern and change nothing under dirs."""
    before = snapshot(*dirs)
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = e.value.code
    assert isinstance(message, str) and re.search(pattern, message), message
    assert "\n" not in message.strip() and message.rstrip().endswith((".", ")")), message
    assert snapshot(*dirs) == before
    return message


def args(setup, out, *extra, steps=16):
    d, model = setup
    return ["--load_model", model, "--data_file", str(d / "data"), "--proj_dir", str(out), "--ctx_len", "32",
            "--micro_bsz", "4", "--epoch_steps", "8", "--epoch_count", str(steps // 8), "--lr_init", "1e-2",
            "--lr_final", "1e-2", "--bone_r", "16", "--accelerator", "cpu", "--strategy", "deepspeed_stage_2",
            "--seed", "1", *extra]


def adapters(out):
    return sorted(p.name for p in out.glob("adapter-*.pth"))


# --- bad arguments: one sentence before any work -------------------------------------------------

@pytest.mark.parametrize("extra, pattern", [
    (["--keep_last", "-1"], r"--keep_last -1 is too small: it must be at least 0"),
    (["--devices", "0"], r"--devices 0 is too small"),
    (["--micro_bsz", "0"], r"--micro_bsz 0 is too small"),
    (["--lr_init", "0"], r"--lr_init 0.0 must be a positive number"),
    (["--lr_final=-1e-5"], r"--lr_final -1e-05 must be a positive number"),
    (["--epoch_steps", "0"], r"--epoch_steps 0 is too small"),
    (["--bone_r", "0"], r"--bone_r and --lora_r must be at least 1"),
    (["--op", "cuda"], r"--op cuda needs a CUDA GPU, but PyTorch sees none here"),
    (["--bone_r", "128"], r"bone r = 128 is larger than the input size of blocks.0.att.receptance \(64\): use r = 64"),
])
def test_bad_arguments(setup, tmp_path, extra, pattern):
    if "--op" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    refused(args(setup, out, *extra), pattern, setup[0], tmp_path)
    assert not out.exists() or not [p for p in os.listdir(out) if p != ".lock"]


def test_bad_files(setup, tmp_path):
    d, model = setup
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
    refused(args(setup, tmp_path / "o") + ["--data_file", str(tmp_path / "docs.jsonl")],
            r"is a .jsonl file, but --data_type is binidx: add --data_type jsonl", tmp_path, d)
    (tmp_path / "notes.pth").write_text("not weights")
    refused(args(setup, tmp_path / "o") + ["--load_model", str(tmp_path / "notes.pth")],
            r"notes.pth is not a PyTorch checkpoint \(.pth\) file: give an RWKV model file", tmp_path, d)
    (tmp_path / "afile").write_text("x")
    refused(args(setup, tmp_path / "afile"), r"--proj_dir .*afile is a file, not a directory", tmp_path, d)
    refused(args(setup, tmp_path / "afile" / "run"), r"--proj_dir .*afile/run cannot be made \(Not a directory\): "
                                                     r"choose a directory you can write", tmp_path, d)
    if os.geteuid() != 0:       # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        refused(args(setup, tmp_path / "ro"), r"is not writable", tmp_path, d)
    sd = load_state_dict(model, mmap=False)
    sd["blocks.1.att.key.weight"][3, 5] = float("nan")
    atomic_save(sd, tmp_path / "nan.pth")
    refused(args(setup, tmp_path / "o") + ["--load_model", str(tmp_path / "nan.pth")],
            r"blocks.1.att.key.weight holds 1 NaN or Inf values: the checkpoint is damaged", tmp_path, d)
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_the_command_line_has_no_traceback(setup, tmp_path):
    p = subprocess.run([sys.executable, "train.py", *args(setup, tmp_path, "--micro_bsz", "-2")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "train.py: --micro_bsz -2 is too small: it must be at least 1."
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "(default: 1024)" in p.stdout and "(default: cosine)" in p.stdout    # --help shows defaults


# --- the run directory ------------------------------------------------------------------------------

def test_one_run_per_directory(setup, tmp_path):
    """An earlier run is refused (and kept) without --resume or --overwrite; a merged model beside
    the adapters is never pruned; --keep_last 0 keeps every adapter; --overwrite starts anew."""
    out = tmp_path / "out"
    run_train(setup, out, "--strategy", "deepspeed_stage_2", "--keep_last", "1")
    assert adapters(out) == ["adapter-0000016.pth"]
    (out / "adapter-0000016-merged.pth").write_bytes(b"the user's merged model")
    refused(args(setup, out), r"holds an earlier run \(log.csv, loss.png, run.json, train.log, resume, 1 adapter files\): "
                              r"continue it with --resume, choose another --proj_dir, or pass --overwrite", out)
    run_train(setup, out, "--strategy", "deepspeed_stage_2", "--keep_last", "0", "--overwrite", steps=24)
    assert adapters(out) == ["adapter-0000008.pth", "adapter-0000016-merged.pth", "adapter-0000016.pth",
                             "adapter-0000024.pth"]
    assert (out / "adapter-0000016-merged.pth").read_bytes() == b"the user's merged model"
    assert sorted(losses(out)) == list(range(1, 25))


def test_resume_compares_settings_and_knows_a_finished_run(setup, tmp_path):
    out = tmp_path / "out"
    output = run_train(setup, out, "--strategy", "deepspeed_stage_2")
    # What the user sees: the start line, the progress line, the summary; no third-party noise.
    assert "train.py: bone r=16 on att.gate, att.key, att.output" in output
    assert re.search(r"epoch 2/2: 100%\|.*\| 16/16 .*loss \d\.\d{3}, lr 0.01, [\d.]+k? tokens/s", output), output
    assert "done: 16 steps, final loss " in output and f"last adapter {out}/adapter-0000016.pth" in output
    assert f"merge it with: python merge.py --base_model {setup[1]} --adapter {out}/adapter-0000016.pth" in output
    for noise in ("unreliable results", "weights_only", "litlogger", "LeafSpec"):
        assert noise not in output, noise
    refused(args(setup, out, "--resume"), r"already finished at step 16: to train further, raise --epoch_count", out)
    refused(args(setup, out, "--resume", "--bone_r", "8", steps=24),
            r"was started with other settings \(r of blocks.0.att.gate: 16 then, 8 now \(and 15 more\)\)", out)
    refused(args(setup, out, "--resume", "--bone_mode", "bat", steps=24),
            r"other settings \(adapter mode: bone then, bat now\)", out)
    other, _, _ = save_random_checkpoint(str(tmp_path), "deep", seed=3)
    refused(args(setup, out, "--resume", "--load_model", other, steps=24), r"base model: small-0.pth .* then, deep-3", out)
    output = run_train(setup, out, "--strategy", "deepspeed_stage_2", "--resume", steps=24)
    assert re.search(r"epoch 3/3: 100%\|.*\| 24/24", output) and "unreliable results" not in output, output
    assert sorted(losses(out)) == list(range(1, 25))


def test_a_live_lock_refuses_and_a_stale_one_is_removed(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    refused(args(setup, out), rf"Another run \(pid {os.getpid()} on .*\) is using {out}: wait for it", out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    (out / f".tmp-{dead.pid}-abc-log.csv").write_text("half a log")
    (out / ".resume-tmp").mkdir()
    (out / ".resume-tmp" / "part").write_text("half a resume point")
    output = run_train(setup, out, "--strategy", "deepspeed_stage_2", steps=8)
    assert f"removed the stale lock {out}/.lock (pid {dead.pid} is no longer running)" in output
    assert "left by an interrupted run" in output
    assert sorted(os.listdir(out)) == ["adapter-0000008.pth", "log.csv", "loss.png", "resume", "run.json", "train.log"]


def test_two_runs_at_once(setup, tmp_path):
    out = tmp_path / "out"
    first = run_train(setup, out, "--strategy", "deepspeed_stage_2", "--epoch_steps", "1000", steps=1000, wait=False)
    with killed_on_failure(first):
        wait_for(first, out / "log.csv")
        refuse_while_running(setup, out, first)
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=300)
    assert "interrupted: the resume point" in output, output[-2000:]
    assert not (out / ".lock").exists()


def refuse_while_running(setup, out, first):
    for extra in ([], ["--resume"]):
        second = subprocess.run([sys.executable, "train.py", *args(setup, out, *extra)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert re.search(rf"Another run \(pid {first.pid} on .*\) is using {out}", second.stderr), second.stderr


# --- interruptions ------------------------------------------------------------------------------------

@contextlib.contextmanager
def killed_on_failure(proc):
    """A run started in the background never outlives its test (it would hold CPU and files)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(proc, path, timeout=600):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended too early"
        time.sleep(0.01)


def test_ctrl_c_saves_a_resume_point_and_says_how_to_continue(setup, tmp_path):
    out = tmp_path / "out"
    proc = run_train(setup, out, "--strategy", "deepspeed_stage_2", "--epoch_steps", "1000", steps=1000, wait=False)
    with killed_on_failure(proc):
        wait_for(proc, out / "log.csv")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in output, output[-3000:]
    m = re.search(rf"interrupted: the resume point in {out} holds step (\d+); continue with the same command and "
                  r"--resume.", output)
    assert m, output[-3000:]
    step = int(m.group(1))
    assert json.load(open(out / "run.json"))["resume_step"] == step
    assert set(range(1, step + 1)) <= set(losses(out))
    assert not [p for p in os.listdir(out) if p.startswith((".tmp-", ".resume-tmp", ".lock"))]


def test_kill_9_keeps_the_log_up_to_the_resume_point_and_a_timed_resume_point(setup, tmp_path):
    out = tmp_path / "out"
    proc = run_train(setup, out, "--strategy", "deepspeed_stage_2", "--epoch_steps", "1000",
                     "--save_every_minutes", "0.0005", steps=1000, wait=False)   # every 0.03 s
    with killed_on_failure(proc):
        wait_for(proc, out / "resume")
        time.sleep(1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = json.load(open(out / "run.json"))["resume_step"]
    assert 0 < step < 1000 and not adapters(out)      # the resume point came from the clock, not a step count
    assert set(range(1, step + 1)) <= set(losses(out))
    # run.json records the step just after the point is swapped in; a kill between the two must not make
    # the demo call the run "stopped": the step is read from the resume point itself.
    held = resume_point_step(str(out))
    assert held is not None and held >= step
    record = json.load(open(out / "run.json"))
    del record["resume_step"]
    (out / "run.json").write_text(json.dumps(record))
    assert run_state(str(out)) == ("resumable", held)


# --- make_binidx.py and merge.py ------------------------------------------------------------------------

def test_make_binidx_protects_its_output(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    make_binidx.main([str(tmp_path / "a.jsonl"), str(tmp_path / "data")])
    refused([str(tmp_path / "a.jsonl"), str(tmp_path / "data")], r"data.bin already exists: choose another output, "
            r"or pass --overwrite", tmp_path, main=make_binidx.main)
    refused([str(tmp_path), str(tmp_path / "x")], r"is a directory: give one .jsonl file", tmp_path, main=make_binidx.main)
    make_binidx.main([str(tmp_path / "a.jsonl"), str(tmp_path / "data"), "--overwrite"])


def test_make_binidx_help_is_complete():
    """Every option is explained, with its default where it has one, and the usage names both files."""
    p = subprocess.run([sys.executable, "scripts/make_binidx.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for phrase in ("OUTPUT.bin and OUTPUT.idx", "--text-field TEXT_FIELD the field holding each document's text "
                   "(default: text)", "--no-eod do not append the end-of-document id 0", "--vocab VOCAB World "
                   "vocabulary file (default: the one in the rwkv package)", "--overwrite replace an existing",
                   "--data_type binidx --data_file"):
        assert phrase in text, phrase


def kill_when_a_temporary_appears(cmd, directory):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with killed_on_failure(proc):
        deadline = time.time() + 300
        while not [p for p in os.listdir(directory) if p.startswith(".tmp-")]:
            assert proc.poll() is None and time.time() < deadline, "finished before a temporary was seen"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return [p for p in os.listdir(directory) if p.startswith(".tmp-")]


def test_kill_9_temporaries_are_removed_by_the_next_run(tmp_path):
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(20000):
            f.write(json.dumps({"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 8}) + "\n")
    cmd = [sys.executable, "scripts/make_binidx.py", str(tmp_path / "big.jsonl"), str(tmp_path / "data")]
    assert kill_when_a_temporary_appears(cmd, tmp_path)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "left by an interrupted run" in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl", "data.bin", "data.idx"]

    base, adapter = str(tmp_path / "wide.pth"), tmp_path / "adapter.pth"
    make_checkpoint(base, vocab_size=65536, n_embd=256, n_layer=2, head_size=64, seed=0)   # 70 MB: slow enough
    model = RWKV6.from_checkpoint(base, op="cpu")
    apply_adapters(model, BoneConfig(r=32), verbose=False)
    save_adapter(model, adapter)
    cmd = [sys.executable, "merge.py", "--base_model", base, "--adapter", str(adapter), "--output",
           str(tmp_path / "merged" / "m.pth"), "--dtype", "fp32"]
    (tmp_path / "merged").mkdir()
    assert kill_when_a_temporary_appears(cmd, tmp_path / "merged")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "left by an interrupted run" in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path / "merged")) == ["m.pth", "m.pth.report.txt"]


def test_malformed_adapter_metadata(setup, tmp_path):
    from tests.test_merge import make_pair
    base, adapter = make_pair(tmp_path, "small", "bone", 32)
    sd = load_state_dict(adapter, mmap=False)
    for field, value, pattern in (("r", {"blocks.0.att.key": 0}, r"records r = 0 for blocks.0.att.key, which is not "
                                                                  r"a positive integer: the file is damaged"),
                                  ("lora_alpha", "sixteen", r"a field of the wrong type")):
        meta = dict(sd["__bone_meta__"], **{field: {**sd["__bone_meta__"]["r"], **value} if field == "r" else value})
        atomic_save({**sd, "__bone_meta__": meta}, tmp_path / "bad.pth")
        refused(["--base_model", base, "--adapter", str(tmp_path / "bad.pth"), "--output", str(tmp_path / "m.pth")],
                pattern, tmp_path, main=merge.main)
        refused(args(setup, tmp_path / "o", "--bone_load", str(tmp_path / "bad.pth")), pattern, tmp_path)


def test_merge_refuses_a_base_with_nan(tmp_path):
    from tests.test_merge import make_pair
    base, adapter = make_pair(tmp_path, "small", "bone", 32)
    sd = load_state_dict(base, mmap=False)
    sd["ln_out.weight"][0] = float("inf")
    atomic_save(sd, tmp_path / "nan.pth")
    refused(["--base_model", str(tmp_path / "nan.pth"), "--adapter", adapter, "--output", str(tmp_path / "m.pth")],
            r"ln_out.weight holds 1 NaN or Inf values: the checkpoint is damaged", tmp_path, main=merge.main)


# --- full disk ----------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_a_full_disk_is_said_and_leaves_nothing_partial(setup, small_disk):
    """300 KB: the log, the plot and the first adapter fit, the resume point (about 400 KB) does not."""
    out = small_disk / "out"
    proc = run_train(setup, out, "--strategy", "deepspeed_stage_2", wait=False)
    with killed_on_failure(proc):
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert f"train.py: the disk is full ({out}): free some space, then run the same command with --resume" in output
    assert sorted(os.listdir(out)) == ["adapter-0000008.pth", "log.csv", "loss.png", "run.json", "train.log"]


# --- the scripts -----------------------------------------------------------------------------------------

def test_scripts_read_paths_from_where_the_user_stands(setup, tmp_path):
    """run_bone.sh and merge_bone.sh from another directory with relative paths, and the
    environment variables for options that had none (PEFT=lora with LORA_R, LORA_ALPHA,
    TARGET_MODULES, KEEP_LAST, MAX_STEPS)."""
    d, model = setup
    for name in ("data.bin", "data.idx"):
        os.symlink(d / name, tmp_path / name)
    os.symlink(model, tmp_path / "base.pth")
    env = dict(os.environ, MODEL="base.pth", DATA="data", PROJ_DIR="run", CTX_LEN="32", MICRO_BSZ="2",
               EPOCH_STEPS="4", EPOCH_COUNT="3", MAX_STEPS="6", KEEP_LAST="1", PEFT="lora", LORA_R="4", LORA_ALPHA="8",
               TARGET_MODULES="att.key,ffn.value", ACCELERATOR="cpu", STRATEGY="deepspeed_stage_1", LR_INIT="1e-3",
               LR_FINAL="1e-3", CHUNK_CTX="16", QUANT="nf4", SAVE_EVERY_MINUTES="0")
    p = subprocess.run(["sh", os.path.join(ROOT, "scripts", "run_bone.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "train.py: lora r=4 on att.key, ffn.value, base held nf4; 6 steps" in p.stdout          # QUANT
    assert "each sample in pieces of 16 tokens" in p.stdout                                         # CHUNK_CTX
    assert adapters(tmp_path / "run") == ["adapter-0000006.pth"]      # KEEP_LAST=1, MAX_STEPS=6
    meta = load_state_dict(tmp_path / "run" / "adapter-0000006.pth")["__bone_meta__"]
    assert meta["mode"] == "lora" and set(meta["r"].values()) == {4} and meta["lora_alpha"] == 8.0
    assert meta["quant"] == "nf4"
    env = dict(os.environ, BASE="base.pth", ADAPTER="run/adapter-0000006.pth", OUTPUT="merged.pth")
    p = subprocess.run(["sh", os.path.join(ROOT, "scripts", "merge_bone.sh"), "--quiet"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and (tmp_path / "merged.pth").exists(), p.stderr


def test_the_sft_template_reaches_the_data(tmp_path):
    from src.data import make_dataset
    from src.tokenizer import world_tokenizer
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "hi", "response": "there " * 20}) + "\n")
    ds = make_dataset(str(tmp_path / "c.jsonl"), "sft", ctx_len=16, vocab_size=65536, seed=0,
                      template="Q: {prompt}\nA: {response}")
    assert "Q: hi\nA:" in world_tokenizer().decode([int(t) for t in ds.tokens[:8]])

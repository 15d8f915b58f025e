"""train.py end to end on the CPU through the real Lightning + DeepSpeed path (DS_ACCELERATOR=cpu, gloo)."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from src import bone
from src.data import write_binidx
from src.family import from_state_dict
from src.model import RWKV6
from tests.tiny import SHAPES, SHAPES7, random_state_dict, save_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_setup(tmp_path_factory, shape):
    d = tmp_path_factory.mktemp(f"train-{shape}")
    model, _, _ = save_random_checkpoint(str(d), shape, seed=0)
    # Arithmetic sequences modulo 50: a pattern a small adapter learns within a few steps.
    write_binidx(str(d / "data"), [list((np.arange(300) * 7 + s) % 50 + 1) for s in range(40)])
    return d, model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory, "small")


@pytest.fixture(scope="module")
def setup7(tmp_path_factory):
    """The same, on an RWKV-7 (x070) base."""
    return make_setup(tmp_path_factory, "small7")


def free_port():
    """A port no one listens on now: each run its own, so a run still shutting down (or killed)
    never blocks the next one's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(setup, out, *extra, devices=1, micro_bsz=4, steps=16, wait=True):
    d, model = setup
    cmd = [sys.executable, "train.py", "--load_model", model, "--data_file", str(d / "data"),
           "--proj_dir", str(out), "--ctx_len", "32", "--micro_bsz", str(micro_bsz), "--epoch_steps", "8",
           "--epoch_count", str(steps // 8), "--lr_init", "1e-2", "--lr_final", "1e-2", "--bone_r", "16",
           "--accelerator", "cpu", "--devices", str(devices), "--seed", "1", *extra]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def losses(out):
    with open(out / "log.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def latest_adapter(out):
    return sorted(out.glob("adapter-*.pth"))[-1]


@pytest.mark.parametrize("strategy, extra", [("deepspeed_stage_1", []), ("deepspeed_stage_2", []),
                                             ("deepspeed_stage_3", []), ("deepspeed_stage_3", ["--chunk_ctx", "12"])])
def test_zero_stage_trains_and_saves_a_loadable_adapter(setup, tmp_path, strategy, extra):
    train(setup, tmp_path, "--strategy", strategy, "--train_parts", "ln", *extra)
    loss = losses(tmp_path)
    assert len(loss) == 16
    assert np.mean([loss[s] for s in range(13, 17)]) < np.mean([loss[s] for s in range(1, 5)]) - 0.1, loss
    saved = torch.load(latest_adapter(tmp_path), weights_only=True)
    tensors = {k for k in saved if k != "__bone_meta__"}
    assert tensors and all(k.endswith(".bone") or bone.train_part_of(k) == "ln" for k in tensors), tensors
    assert any(k.endswith(".bone") for k in tensors)
    # Complete (not a ZeRO-3 shard): it loads into a fresh model and changes its logits.
    model = loads_and_changes_the_logits(RWKV6.from_state_dict(random_state_dict(SHAPES["small"], seed=0)), tmp_path)
    assert all(saved[k].shape == dict(model.named_parameters())[k].shape for k in tensors)


def loads_and_changes_the_logits(model, run_dir):
    tokens = torch.arange(1, 33)[None]
    with torch.no_grad():
        before = model(tokens)[0]
        bone.load_adapter(model, latest_adapter(run_dir))
        after = model(tokens)[0]
    assert (after - before).abs().max() > 1e-3
    return model


def test_two_processes_give_the_one_process_adapter(setup, tmp_path):
    """devices=2 x micro_bsz 2 reads the same global batches as 1 x 4 (ZeRO-2, gloo)."""
    train(setup, tmp_path / "one", "--strategy", "deepspeed_stage_2", micro_bsz=4, steps=8)
    train(setup, tmp_path / "two", "--strategy", "deepspeed_stage_2", micro_bsz=2, steps=8, devices=2)
    one = torch.load(latest_adapter(tmp_path / "one"), weights_only=True)
    two = torch.load(latest_adapter(tmp_path / "two"), weights_only=True)
    assert one.keys() == two.keys()
    # Tolerance: the runs add the same numbers in a different order (fp32), and Adam's
    # normalised step turns that noise in near-zero gradients into changes of up to ~lr in a
    # few single elements (seen: 1.4e-4 of the tensor's largest value, on an AVX-512 CPU); so
    # each tensor must agree to 1e-4 relative in norm, and the loss curves to 1e-5.
    for k in one:
        if k != "__bone_meta__":
            assert (one[k] - two[k]).norm() <= 1e-4 * one[k].norm(), k
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == set(range(1, 9))
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a), (a, b)


@pytest.mark.parametrize("base, extra", [("setup", []), ("setup", ["--chunk_ctx", "12"]),
                                         ("setup7", ["--train_parts", "time,ln"])], ids=["plain", "chunked", "x070"])
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(request, tmp_path, base, extra):
    setup = request.getfixturevalue(base)
    straight = tmp_path / "straight"
    train(setup, straight, "--strategy", "deepspeed_stage_2", "--save_every_steps", "8", *extra, steps=32)
    a = losses(straight)
    assert np.mean([a[s] for s in range(29, 33)]) < np.mean([a[s] for s in range(1, 5)]) - 0.1, a
    killed = tmp_path / "killed"
    proc = train(setup, killed, "--strategy", "deepspeed_stage_2", "--save_every_steps", "8", *extra, steps=32,
                 wait=False)
    deadline = time.time() + 240
    while not (killed / "resume").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first resume point"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = max(int(p.name[8:15]) for p in killed.glob("adapter-*.pth"))
    assert resumed_from < 32, "killed too late to test anything"
    train(setup, killed, "--strategy", "deepspeed_stage_2", "--save_every_steps", "8", "--resume", *extra, steps=32)
    b = losses(killed)
    assert sorted(b) == list(range(1, 33))
    for step in range(resumed_from + 1, 33):
        # Same samples, same optimizer state: equal up to fp32 summation order.
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])


def test_rwkv7_trains_with_its_own_targets_and_train_parts(setup7, tmp_path):
    """An x070 base under ZeRO-2 with --grad_cp, --chunk_ctx and the time train part (x_*, the
    low-rank parts, k_k / k_a / r_k): the loss falls, the adapter holds the 6 x070 projections
    and loads into a fresh x070 model, changing its logits."""
    train(setup7, tmp_path, "--strategy", "deepspeed_stage_2", "--train_parts", "time", "--grad_cp", "1",
          "--chunk_ctx", "12")
    loss = losses(tmp_path)
    assert np.mean([loss[s] for s in range(13, 17)]) < np.mean([loss[s] for s in range(1, 5)]) - 0.1, loss
    saved = torch.load(latest_adapter(tmp_path), weights_only=True)
    adapted = {k.rsplit(".", 1)[0].split(".", 2)[2] for k in saved if k.endswith(".bone")}
    assert adapted == {"att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"}
    parts = {k for k in saved if k != "__bone_meta__" and not k.endswith(".bone")}
    assert "blocks.1.att.w1" in parts and "blocks.0.att.k_k" in parts and "blocks.0.att.v1" not in parts
    loads_and_changes_the_logits(from_state_dict(random_state_dict(SHAPES7["small7"], seed=0)), tmp_path)


def test_grad_cp_with_frozen_embedding_gives_every_bone_parameter_a_gradient():
    model = RWKV6.from_state_dict(random_state_dict(SHAPES["small"], seed=2), op="cpu", grad_cp=True).train()
    bone.apply_adapters(model, bone.BoneConfig(r=16, init_weights=False), verbose=False)
    assert not model.emb.weight.requires_grad
    logits, _ = model(torch.randint(1, 200, (2, 20)))
    logits.float().pow(2).mean().backward()
    adapters = {n: p for n, p in model.named_parameters() if n.endswith(".bone")}
    assert len(adapters) == 8 * SHAPES["small"].n_layer
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_bad_arguments_are_one_sentence(setup, tmp_path):
    d, model = setup
    for extra, message in ((["--bone_mode", "lorax"], "Unknown adapter mode 'lorax'"),
                           (["--n_layer", "7"], "--n_layer 7 does not match the checkpoint"),
                           (["--strategy", "fsdp"], "Unknown --strategy 'fsdp'")):
        result = subprocess.run([sys.executable, "train.py", "--load_model", model, "--data_file", str(d / "data"),
                                 "--proj_dir", str(tmp_path), "--accelerator", "cpu", *extra],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr

"""A newcomer's first hour without surprises: the demo never deletes what the user did not ask it
to; --temperature 0 is the greedy text merge.py --verify prints; a misspelled setting of the
scripts is named, not ignored; every mistake is one sentence that says what was given and what to
do (exit != 0, no traceback, nothing lost, nothing left behind)."""
import ast
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import export
import generate
import merge
import train
from src.checkpoint import load_state_dict, save_checkpoint
from src.merging import Survival, format_report
from tests.test_generate import PROMPT, run_generate, world  # noqa: F401 (world is a fixture)
from tests.test_merge import pair, run_merge  # noqa: F401 (pair is a fixture)
from tests.test_no_surprises import args as train_args, killed_on_failure, refused, snapshot, wait_for
from tests.test_train import ROOT, losses, setup, setup7  # noqa: F401 (setup, setup7 are fixtures)
from tests.tiny import save_random_checkpoint

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_settings  # noqa: E402


# --- 1. the demo deletes nothing it was not asked to ------------------------------------------------

@pytest.fixture
def demo_root(setup, setup7, tmp_path):
    """A copy of the repository's layout whose out/demo (and out/demo-x070) already holds a tiny
    RWKV-6 (RWKV-7) base and data, so that scripts/run_bone.sh's demo runs in seconds and in
    tmp_path only."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("train.py", "merge.py", "export.py", "src"):
        os.symlink(os.path.join(ROOT, name), root / name)
    for name in os.listdir(os.path.join(ROOT, "scripts")):
        os.symlink(os.path.join(ROOT, "scripts", name), root / "scripts" / name)
    for demo, (d, model) in (("demo", setup), ("demo-x070", setup7)):
        (root / "out" / demo).mkdir(parents=True)
        os.symlink(model, root / "out" / demo / "base.pth")
        for ext in ("bin", "idx"):
            os.symlink(d / f"data.{ext}", root / "out" / demo / f"stories.{ext}")
    return root


def run_demo(root, *extra, wait=True, **env):
    # A smaller Bone than the demo's (BONE_R is an adapter flag, which PEFT=lora ignores and PEFT=state refuses).
    small = {"BONE_R": "16"} if env.get("PEFT", "bone") == "bone" else {}
    env = {**os.environ, "CTX_LEN": "32", "MICRO_BSZ": "2", "ACCELERATOR": "cpu", "SAVE_EVERY_MINUTES": "0", **small,
           **env}
    cmd = ["sh", str(root / "scripts" / "run_bone.sh"), *extra]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)     # its own process group: Ctrl-C reaches sh and train.py
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def test_rerunning_the_demo_resumes_an_interrupted_run_and_refuses_to_delete_a_finished_one(demo_root):
    run = demo_root / "out" / "demo" / "run"
    proc = run_demo(demo_root, wait=False, EPOCH_STEPS="1000", EPOCH_COUNT="1")
    with killed_on_failure(proc):
        wait_for(proc, run / "log.csv")
        os.killpg(proc.pid, signal.SIGINT)      # Ctrl-C
        out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert f"tokens into {run} (a new directory)" in out, out       # 4e: train.py says it made --proj_dir
    step = int(re.search(r"holds step (\d+)", out + err).group(1))
    before = losses(run)

    # The same demo command again: it continues the run (here to 2 steps more), deleting nothing.
    code, out, err = run_demo(demo_root, EPOCH_STEPS="1000", EPOCH_COUNT="1", MAX_STEPS=str(step + 2))
    assert code == 0, (out + err)[-3000:]
    again = f"sh {demo_root}/scripts/run_bone.sh --overwrite"
    assert (f"run_bone.sh: resuming the interrupted demo run in {run} from step {step} (to start it anew instead, "
            f"deleting it: {again})") in out, out
    assert "deleted the earlier run" not in out + err
    after = losses(run)
    assert sorted(after) == list(range(1, step + 3)) and all(after[s] == before[s] for s in range(1, step + 1))

    # Finished: running the demo again is refused, with the command that redoes it; nothing changes.
    kept = snapshot(demo_root / "out")
    code, out, err = run_demo(demo_root, EPOCH_STEPS="1000", EPOCH_COUNT="1", MAX_STEPS=str(step + 2))
    assert code == 1 and out == "" and err == (f"run_bone.sh: the demo run in {run} is finished (step {step + 2}): to "
                                               f"train it again from the start, deleting it, run: {again}\n"), err
    assert snapshot(demo_root / "out") == kept

    # A run stopped before its first resume point cannot be resumed: refused with the command too.
    stopped = demo_root / "out" / "demo-x070" / "run"
    stopped.mkdir()
    (stopped / "log.csv").write_text("step,loss\n1,5.0\n")
    code, out, err = run_demo(demo_root, "--val_split", "0.1", MODEL_FAMILY="x070")
    assert code == 1 and err == (f"run_bone.sh: the demo run in {stopped} stopped before its first resume point: to "
                                 f"start it anew, deleting it, run: MODEL_FAMILY=x070 sh {demo_root}/scripts/"
                                 "run_bone.sh --overwrite --val_split 0.1\n"), err
    assert os.listdir(stopped) == ["log.csv"]


@pytest.mark.parametrize("family", ["x060", "x070"])
@pytest.mark.parametrize("peft", ["state", "lora"])
def test_the_demo_with_peft_state_or_lora(demo_root, family, peft):
    """PEFT=state trains each layer's initial state alone, at a state's learning rate; PEFT=lora
    trains LoRA (r 32, the layer norms and time-mix vectors); each in its own run directory, which
    merge_bone.sh with the same PEFT merges and verifies. A state run's summary also gives the
    command that exports the state file, and it writes what RWKV-Runner loads. (Two steps each.)
    And the line make_demo.py prints while it makes the base reaches the terminal."""
    from src.bone import read_adapter
    demo = demo_root / "out" / ("demo" if family == "x060" else "demo-x070")
    # No base yet: make_demo.py makes it (here a copy of the tiny one), and its line is shown, not swallowed.
    tiny = os.readlink(demo / "base.pth")
    os.remove(demo / "base.pth")
    os.remove(demo_root / "scripts" / "make_demo.py")
    (demo_root / "scripts" / "make_demo.py").write_text(
        f"import runpy, shutil, sys\nsys.path.insert(0, {ROOT!r})\nimport src.checkpoint\n"
        f"src.checkpoint.make_checkpoint = lambda path, **config: shutil.copy({tiny!r}, path)\n"
        f"runpy.run_path({os.path.join(ROOT, 'scripts', 'make_demo.py')!r}, run_name='__main__')\n")
    code, out, err = run_demo(demo_root, MODEL_FAMILY=family, PEFT=peft, EPOCH_STEPS="2", EPOCH_COUNT="1")
    assert code == 0, (out + err)[-3000:]
    assert out.startswith(f"making the demo base model {demo / 'base.pth'} ({family})\n"), out
    adapter = demo / f"run-{peft}" / "adapter-0000002.pth"
    assert "demo: loss " in out and not os.path.exists(demo / "run")
    sd, meta, _ = read_adapter(str(adapter), mmap=False)
    if peft == "state":
        assert ("train.py: state tuning (each layer's initial WKV state; every weight frozen); lr 1 -> 0.01 (state "
                "tuning's default") in out, out
        assert meta["train_parts"] == ["state"]
        export_line = out.split("or export its state (RWKV-Runner, the rwkv package) with: ", 1)[1].splitlines()[0]
        argv = shlex.split(export_line)
        assert argv[:2] == ["python", "export.py"]
        export.main(argv[2:])
        exported = torch.load(argv[argv.index("--output") + 1], weights_only=True)
        names = [f"blocks.{i}.att.time_state" for i in range(2)]     # the tiny bases' two layers, as RWKV-Runner reads them
        assert sorted(k for k in sd if k != "__bone_meta__") == names
        assert all(torch.equal(exported[k].float(), sd[k].float()) for k in names)
    else:
        assert "train.py: lora r=32 on " in out and meta["mode"] == "lora", out
        assert sorted(meta["train_parts"]) == ["ln", "time"]

    p = subprocess.run(["sh", str(demo_root / "scripts" / "merge_bone.sh")], cwd=demo_root, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "MODEL_FAMILY": family, "PEFT": peft})
    assert p.returncode == 0 and "verify: PASS" in p.stdout, (p.stdout + p.stderr)[-3000:]
    merged = demo / f"run-{peft}" / "adapter-0000002-merged.pth"
    if peft == "state":     # RWKV-6: the state in the merged file; RWKV-7: beside it (src/merging.py)
        holds = any(k.endswith("time_state") for k in torch.load(merged, weights_only=True, mmap=True))
        assert holds == (family == "x060")
        assert os.path.exists(demo / f"run-{peft}" / "adapter-0000002-merged-state.pth") == (family == "x070")


def test_state_tuning_beside_other_parts_says_what_is_frozen(setup):
    """--peft state --train_parts ln: the start-up line names ln as trained, not "every weight frozen"."""
    from src import bone
    from src.family import from_checkpoint
    d, model = setup
    a = train.parse_args(["--load_model", model, "--data_file", str(d / "data"), "--peft", "state", "--train_parts", "ln"])
    train.check_state_args(a)
    m = from_checkpoint(model, op="cpu")
    train.apply_peft(m, a, bone)
    assert train.describe(m, a, bone) == ("state tuning (each layer's initial WKV state; every weight but ln frozen), "
                                          "training ln; the state at lr 1, the rest at 2e-05, on one schedule "
                                          "(--lr_state's default)")


# --- 2. --temperature 0 is plain greedy -------------------------------------------------------------

def test_temperature_0_is_the_greedy_text_merge_verify_prints(world, capsys):
    from src.verify import verify_merged
    base, adapter, merged = world
    said = []
    assert verify_merged(base, adapter, merged, prompt=PROMPT, out=said.append)[2]
    verified = ast.literal_eval(said[-1].split("(greedy): ", 1)[1])     # the prompt and 32 greedy tokens
    greedy = ["--prompt", PROMPT, "--max_tokens", 32, "--temperature", 0, "--token_stop", ""]
    assert PROMPT + run_generate(capsys, "--model", merged, *greedy)[:-1] == verified
    assert PROMPT + run_generate(capsys, "--model", base, "--adapter", adapter, *greedy)[:-1] == verified
    # A penalty given is a penalty applied (the rwkv package's generate, as tests/test_generate.py checks).
    penalised = run_generate(capsys, "--model", merged, *greedy, "--alpha_presence", 0.2, "--alpha_frequency", 0.2)
    assert PROMPT + penalised[:-1] != verified
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    assert "0: greedy (plain argmax, as merge.py --verify prints it, unless a penalty is given)" in \
        " ".join(capsys.readouterr().out.split())


# --- 3. a misspelled setting of the scripts -------------------------------------------------------------

def test_a_misspelled_setting_stops_the_scripts_before_any_work(setup, tmp_path):
    d, model = setup
    env = dict(os.environ, MODEL=model, DATA=str(d / "data"), PROJ_DIR=str(tmp_path / "run"), EPOCH_STEP="2",
               BONE_RANK="8")
    p = subprocess.run(["sh", os.path.join(ROOT, "scripts", "run_bone.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr == ("run_bone.sh: BONE_RANK and EPOCH_STEP are not settings of this script; did you mean BONE_R "
                        "and EPOCH_STEPS? (unset BONE_RANK and EPOCH_STEP if they are meant for something else)\n")
    assert os.listdir(tmp_path) == []
    env = dict(os.environ, BASE=model, ADAPTR="adapter.pth")
    p = subprocess.run(["sh", os.path.join(ROOT, "scripts", "merge_bone.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr == ("merge_bone.sh: ADAPTR is not a setting of this script; did you mean "
                                              "ADAPTER? (unset ADAPTR if it is meant for something else)\n"), p.stderr
    assert os.listdir(tmp_path) == []


def test_the_misspelling_check_leaves_the_usual_environment_alone():
    script = os.path.join(ROOT, "scripts", "run_bone.sh")
    usual = ["PATH", "HOME", "USER", "SHELL", "TERM", "LANG", "PWD", "OLDPWD", "BASH", "MAIL", "EDITOR", "TMPDIR", "CC",
             "CXX", "PS1", "MAX_JOBS", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "LD_LIBRARY_PATH",
             "PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "WANDB_MODE",
             "WANDB_PROJECT", "DS_ACCELERATOR", "MODEL_PATH", "DATA_DIR", "OUTPUT_DIR", "NUM_THREADS", "http_proxy",
             "EPOCH_STEPS", "BONE_R", "MODEL_FAMILY"]
    assert check_settings.main(script, {name: "x" for name in usual}) == 0
    for typo, setting in (("epoch_steps", "EPOCH_STEPS"), ("LR_INT", "LR_INIT"), ("BONE_MDOE", "BONE_MODE"),
                          ("LORA_RANK", "LORA_R"), ("CTX_LENGTH", "CTX_LEN")):
        assert check_settings.meant(typo, {"EPOCH_STEPS", "LR_INIT", "BONE_MODE", "BONE_R", "LORA_R", "CTX_LEN",
                                           "OP", "SEED"}) == setting


# --- 4a, 4b. a text file or an adapter file given as the model --------------------------------------

def test_a_text_file_given_as_the_model(setup, pair, tmp_path):
    _, adapter = pair
    notes = tmp_path / "notes.pth"
    notes.write_text("my notes, not weights\n")
    said = rf"{notes} is not a PyTorch checkpoint \(\.pth\) file: give an RWKV model file\.$"
    refused(train_args(setup, tmp_path / "o", "--load_model", str(notes)), said, tmp_path)
    refused(["--base_model", str(notes), "--adapter", adapter, "--output", str(tmp_path / "m.pth")], said, tmp_path,
            main=merge.main)
    refused(["--model", str(notes), "--prompt", "x"], said, tmp_path, main=generate.main)
    refused(["--model", str(notes), "--format", "safetensors", "--output", str(tmp_path / "m.st")], said, tmp_path,
            main=export.main)


def test_an_adapter_file_given_as_the_model(setup, pair, tmp_path):
    base, adapter = pair
    said = rf"{adapter} is an adapter file, not a model: give it as {{}} and the base model as {{}}\.$"
    refused(train_args(setup, tmp_path / "o", "--load_model", adapter), said.format("--bone_load", "--load_model"),
            tmp_path)
    refused(["--base_model", adapter, "--adapter", adapter, "--output", str(tmp_path / "m.pth")],
            said.format("--adapter", "--base_model"), tmp_path, main=merge.main)
    refused(["--model", adapter, "--prompt", "x"], said.format("--adapter", "--model"), tmp_path, main=generate.main)


# --- 4c. command-line mistakes are one short line -------------------------------------------------------

def test_a_flag_typo_is_one_line_with_the_flag_meant():
    p = subprocess.run([sys.executable, "train.py", "--lr_int", "1e-3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr == "train.py: unknown option --lr_int; did you mean --lr_init? (train.py --help lists all)\n"


@pytest.mark.parametrize("main, argv, message", [
    (train.main, ["--load_model", "m.pth", "--data_file", "d", "--ctx_len", "1k"],
     "train.py: --ctx_len '1k' is not a whole number (train.py --help lists all)"),
    (train.main, ["--data_file", "d"], "train.py: --load_model is required (train.py --help lists all)"),
    (merge.main, ["--base_model", "b.pth", "--adapter", "a.pth", "--output", "m.pth", "--dtype", "fp8"],
     "merge.py: --dtype 'fp8' is not a choice: choose from 'auto', 'same', 'bf16', 'fp16', 'fp32' "
     "(merge.py --help lists all)"),
    (merge.main, ["--base_model", "b.pth", "--adapter", "a.pth", "--ouput", "m.pth"],
     "merge.py: unknown option --ouput; did you mean --output? (merge.py --help lists all)"),
    (generate.main, ["--model", "m.pth"], "generate.py: give --prompt or --prompt_file or --chat (generate.py --help lists all)"),
    (generate.main, ["--model", "m.pth", "--prompt", "x", "--temperature"],
     "generate.py: --temperature needs a value (generate.py --help lists all)"),
    (export.main, ["--model", "m.pth", "--format", "gguf", "--output", "m.gguf", "--dtyp=fp16", "--quite"],
     "export.py: unknown option --quite; did you mean --quiet? (export.py --help lists all)"),
])
def test_bad_arguments_are_one_line_with_no_usage(main, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == message
    assert capsys.readouterr().err == ""        # no usage dump before it


# --- 4d. the merge report's rows for weights that are all zero ----------------------------------------------

def test_the_merge_report_explains_an_all_zero_base_weight():
    report = {"att.key": Survival(4, 2.0, 0.5, 0.0), "att.output": Survival(2, 0.0, 0.3, 0.0),
              "ffn.value": Survival(2, 0.0, 0.2, 0.0)}
    text = format_report(report, "fp32")
    assert "W is 0" not in text
    assert re.search(r"  att\.output\s+2\s+n/a\s+0\.000e\+00", text), text
    assert text.splitlines()[-1] == ("  (n/a: the base's att.output and ffn.value weights are all zero, as in a freshly "
                                     "initialised model, so the update has no size relative to them; it is merged "
                                     "all the same)")


# --- 4e. no directory is made without a word -----------------------------------------------------------------

@pytest.mark.parametrize("argv", [[], ["--format", "safetensors"]])
def test_merge_refuses_an_output_in_a_missing_directory(pair, tmp_path, argv):
    base, adapter = pair
    output = tmp_path / "missing" / "dir" / "m.pth"
    before = snapshot(tmp_path)
    message = run_merge("--base_model", base, "--adapter", adapter, "--output", output, *argv)
    assert message == (f"merge.py: --output {output}: the directory {output.parent} does not exist: create it first "
                       "or give another --output.")
    assert snapshot(tmp_path) == before and not (tmp_path / "missing").exists()


def test_export_refuses_an_output_in_a_missing_directory(pair, tmp_path):
    base, _ = pair
    output = tmp_path / "missing" / "m.safetensors"
    with pytest.raises(SystemExit) as e:
        export.main(["--model", base, "--format", "safetensors", "--output", str(output)])
    assert e.value.code == (f"export.py: --output {output}: the directory {output.parent} does not exist: create it "
                            "first or give another --output.")
    assert not (tmp_path / "missing").exists()


# --- 4f. safetensors refuses NaN as the other formats do ------------------------------------------------------

def test_safetensors_export_refuses_a_model_holding_nan(tmp_path):
    path, _, sd = save_random_checkpoint(str(tmp_path), "small", seed=1)
    sd["blocks.0.att.key.weight"][5, 7] = float("nan")
    save_checkpoint(sd, path, "fp32")
    assert torch.isnan(load_state_dict(path)["blocks.0.att.key.weight"]).any()
    for dtype in ("same", "fp16"):
        refused(["--model", path, "--format", "safetensors", "--output", str(tmp_path / "m.safetensors"), "--dtype",
                 dtype], r"blocks\.0\.att\.key\.weight holds NaN or Inf: nothing was written \(the \.pth itself holds "
                         r"them\)\.$", tmp_path, main=export.main)

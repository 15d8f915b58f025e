"""What a run leaves behind (a newcomer's first hour): one name for merged files (train.py's summary,
merge_bone.sh, demo or not), train.log (the console's lines, kept through a kill and a --resume),
merge.py's report beside its output, run.json with every setting, and loss.png with the learning
rate. One training run is killed after its first resume point and resumed: every train.py check
here reads that pair."""
import csv
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import merge
import train
from src.training.callbacks import loss_figure
from src.training.rundir import RunDir, run_adapters
from tests.test_merge import make_pair, snapshot
from tests.test_train import ROOT, free_port, make_setup
from tests.tiny import save_random_checkpoint

STEPS = 8      # steps per epoch; the run is killed after epoch 1 of 2, then resumed to 3 epochs


def command(setup, out, *extra):
    d, model = setup
    return [sys.executable, "train.py", "--load_model", model, "--data_file", str(d / "data"), "--proj_dir", str(out),
            "--ctx_len", "32", "--micro_bsz", "4", "--epoch_steps", str(STEPS), "--lr_init", "1e-2",
            "--lr_schedule", "cosine", "--bone_r", "16", "--accelerator", "cpu", "--save_every_steps", str(STEPS),
            "--val_split", "0.1", "--val_tokens", "320", "--seed", "1", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, train.log after the kill, the resumed run's stdout and stderr)."""
    setup = make_setup(tmp_path_factory, "small")
    out = tmp_path_factory.mktemp("outputs") / "run"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    with open(out.parent / "killed.txt", "w") as log:
        proc = subprocess.Popen(command(setup, out, "--epoch_count", "2", "--lr_final", "1e-3"), cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (out / "resume").exists():
            assert proc.poll() is None and time.time() < deadline, (out.parent / "killed.txt").read_text()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_log = (out / "train.log").read_text()
    env["MASTER_PORT"] = str(free_port())
    p = subprocess.run(command(setup, out, "--epoch_count", "3", "--lr_final", "2e-3", "--resume"), cwd=ROOT, env=env,
                       capture_output=True, timeout=600)
    # Decoded here: text=True would turn the progress bar's carriage returns into newlines.
    stdout, stderr = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, stderr[-3000:]
    return out, killed_log, stdout, stderr


def shown(stream):
    """The lines a terminal shows at the end: a line redrawn with carriage returns, in its last state."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in stream.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def test_train_log_keeps_the_console_through_a_kill_and_a_resume(run):
    out, killed_log, stdout, stderr = run
    # Killed: the lines printed up to then are there, under a first separator and the command.
    first = killed_log.splitlines()
    assert first[0].startswith("=" * 20 + " train.py started ") and first[1].startswith("$ python train.py --load_model")
    assert any(line.startswith("train.py: bone r=16 on ") for line in first), killed_log
    assert any(line.startswith("data: binidx ") for line in first), killed_log
    assert not any(line.startswith("done: ") for line in first)
    # Resumed: appended after a second separator, the killed run's part unchanged.
    log = (out / "train.log").read_text()
    assert log.startswith(killed_log) and "\r" not in log
    resumed = log[len(killed_log):].splitlines()
    assert resumed[0] == "" and resumed[1].startswith("=" * 20 + " train.py resumed ") and "--resume" in resumed[2]
    # Every line the resumed run showed on either stream is in its part of the log...
    for stream in (stdout, stderr):
        missing = [line for line in shown(stream) if line not in resumed]
        assert not missing, (missing, resumed)
    assert "done: 24 steps" in stdout and "--resume: options changed since the run's last command: epoch_count: 2 " \
                                          "then, 3 now; lr_final: 0.001 then, 0.002 now" in stdout
    # ... the progress line in its final state, not one line per redraw (16 steps were redrawn).
    # (Found by its rate, "step/s", or "s/step" below one step a second, as on a busy machine.)
    progress = [line for line in resumed if "step/s" in line or "s/step" in line]
    assert 1 <= len(progress) <= 3 and progress[-1].startswith("epoch 3/3: 100%") and "24/24" in progress[-1], progress
    assert stderr.count("\r") > len(progress)


def test_train_log_is_part_of_the_run(tmp_path):
    """--overwrite deletes it with the rest of the run; a directory holding one is an earlier run."""
    for name in ("train.log", "run.json", "adapter-0000008.pth", "adapter-0000008-merged.pth"):
        (tmp_path / name).write_text("x")
    said = []
    RunDir(str(tmp_path)).prepare(resume=False, overwrite=True, say=said.append)
    assert sorted(os.listdir(tmp_path)) == ["adapter-0000008-merged.pth"], said
    (tmp_path / "train.log").write_text("x")
    with pytest.raises(ValueError, match=r"holds an earlier run \(train.log\)"):
        RunDir(str(tmp_path)).prepare(resume=False, overwrite=False)


def test_run_json_records_every_setting(run):
    out = run[0]
    recorded = RunDir(str(out)).recorded()      # passes the schema --resume reads it with
    arguments = recorded["arguments"]
    assert set(arguments) == set(vars(train.parse_args(["--load_model", "m", "--data_file", "d"])))
    assert arguments["lr_init"] == 1e-2 and arguments["lr_final"] == 2e-3 and arguments["ctx_len"] == 32
    assert arguments["epoch_count"] == 3 and arguments["resume"] is True and arguments["val_split"] == 0.1
    resolved = recorded["resolved"]
    assert resolved["total_steps"] == recorded["total_steps"] == 24 and resolved["tokens_per_step"] == 128
    assert resolved["model"]["family"] == "x060" and resolved["model"]["n_layer"] == 2
    assert resolved["model"]["n_embd"] == 64 and resolved["model"]["vocab_size"] == 260
    # 40 documents of 300 tokens; --val_split 0.1 holds 4 of them out.
    assert resolved["data"]["documents"] == 36 and resolved["data"]["tokens"] == 36 * 300
    assert resolved["validation"]["documents"] == 4 and resolved["validation"]["tokens"] == 4 * 300
    assert resolved["data"]["file"].endswith("data") and resolved["data"]["type"] == "binidx"
    assert resolved["versions"]["torch"] == torch.__version__
    assert recorded["settings"]["adapter mode"] == "bone" and recorded["resume_step"] == 24


def test_loss_png_shows_the_learning_rate(run):
    out = run[0]
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    fig = loss_figure(rows)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    steps = [int(r["step"]) for r in rows]
    lr = lines["learning rate"]
    assert list(lr.get_xdata()) == steps and list(lr.get_ydata()) == [float(r["lr"]) for r in rows]
    assert lr.axes.get_ylabel() == "learning rate" and lr.axes is not lines["training loss"].axes
    assert len(set(lr.get_ydata())) > 10           # the cosine schedule, not a constant
    assert list(lines["training loss"].get_ydata()) == [float(r["loss"]) for r in rows]
    assert list(lines["validation loss"].get_xdata()) == [8, 16, 24]
    # The loss.png the run wrote is this figure.
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    assert (out / "loss.png").read_bytes() == png.getvalue()


def merge_script(tmp_path, env):
    """scripts/merge_bone.sh in a copy of the layout whose merge.py prints its arguments: the
    --output the script chooses."""
    root = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "scripts"), root / "scripts", dirs_exist_ok=True)     # and what it runs
    (root / "merge.py").write_text("import sys\nprint('\\n'.join(sys.argv[1:]))\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("BASE", "ADAPTER", "OUTPUT", "FORMAT", "MODEL_FAMILY")}
    p = subprocess.run(["sh", str(root / "scripts" / "merge_bone.sh")], env={**clean, **env}, cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    argv = p.stdout.splitlines()
    return argv[argv.index("--output") + 1]


def test_one_name_for_merged_files(run, tmp_path):
    """<adapter>-merged.<format> beside the adapter: train.py's summary, merge_bone.sh's default
    and its demo's; run_adapters never takes it for an adapter."""
    out, _, stdout, _ = run
    last = str(run_adapters(str(out))[-1])
    assert last.endswith("adapter-0000024.pth")
    printed = shlex.split(stdout.split("merge it with: ", 1)[1].splitlines()[0])
    assert printed[printed.index("--output") + 1] == last[:-4] + "-merged.pth"
    assert merge_script(tmp_path, {"BASE": "base.pth", "ADAPTER": last}) == last[:-4] + "-merged.pth"
    assert merge_script(tmp_path, {"BASE": "b.pth", "ADAPTER": last, "FORMAT": "gguf"}) == last[:-4] + "-merged.gguf"
    demo = tmp_path / "repo" / "out" / "demo"
    (demo / "run").mkdir(parents=True)
    (demo / "base.pth").write_bytes(b"")
    for step in (40, 60):
        (demo / "run" / f"adapter-{step:07d}.pth").write_bytes(b"")
    assert merge_script(tmp_path, {}) == str(demo / "run" / "adapter-0000060-merged.pth")
    assert merge_script(tmp_path, {"FORMAT": "st"}) == str(demo / "run" / "adapter-0000060-merged.st")
    (demo / "run" / "adapter-0000060-merged.pth").write_bytes(b"")
    assert [os.path.basename(p) for p in run_adapters(str(demo / "run"))] == ["adapter-0000040.pth", "adapter-0000060.pth"]
    assert train.merged_name(last) == last[:-4] + "-merged.pth"      # the one rule, in code


def run_merge(argv, capsys):
    try:
        merge.main(argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().out
    return None, capsys.readouterr().out


def test_merge_report_beside_the_output(run, tmp_path, capsys):
    """The command train.py printed, run: OUTPUT.report.txt holds what merge.py printed (the dtype
    decision, the table, --verify's verdict); a refusal leaves none and keeps an earlier one;
    --overwrite replaces it."""
    out, _, stdout, _ = run
    argv = shlex.split(stdout.split("merge it with: ", 1)[1].splitlines()[0])[2:] + ["--verify", "--quiet"]
    output = argv[argv.index("--output") + 1]
    report = output + ".report.txt"
    code, printed = run_merge(argv, capsys)
    assert code is None, printed
    text = open(report).read()
    assert text.endswith(printed) and "$ python merge.py --base_model " in text
    for what in ("merge: wrote ", "how much of the fine-tuning survives", "  kind ", "verify: PASS"):
        assert what in printed, printed
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    # Refused (the output exists): nothing changes, the report included.
    before = snapshot(out)
    code, _ = run_merge(argv, capsys)
    assert isinstance(code, str) and "already exists" in code and snapshot(out) == before
    # Refused on a fresh output name: no report appears.
    fresh = str(tmp_path / "m.pth")
    code, _ = run_merge(argv[:argv.index("--output") + 1] + [fresh, "--base_model", str(tmp_path / "none.pth")], capsys)
    assert isinstance(code, str) and not os.path.exists(fresh + ".report.txt") and not os.listdir(tmp_path)
    # --overwrite replaces the output and its report.
    code, printed = run_merge(argv + ["--overwrite", "--dtype", "fp32"], capsys)
    assert code is None
    text = open(report).read()
    assert text.endswith(printed) and "--dtype fp32" in text and "cast to the output dtype (fp32)" in text
    # Another format: the report beside that file.
    st = str(tmp_path / "m.st")
    code, printed = run_merge(argv[:argv.index("--output") + 1] + [st, "--format", "st", "--quiet"], capsys)
    assert code is None and sorted(os.listdir(tmp_path)) == ["m.st", "m.st.report.txt"]
    assert open(st + ".report.txt").read().endswith(printed) and f"wrote {st}" in printed


@pytest.mark.parametrize("fmt", ["pth", "st"])
def test_the_report_keeps_the_note_that_the_base_is_another(tmp_path, capsys, fmt):
    """--allow_other_base: the note that the base is not the adapter's goes to the terminal (stderr)
    and into OUTPUT.report.txt, which is what is left to read later."""
    _, adapter = make_pair(tmp_path, "small", "bone", 16)
    other, _, _ = save_random_checkpoint(str(tmp_path), "small", seed=5)
    output = str(tmp_path / f"o.{fmt}")
    merge.main(["--base_model", other, "--adapter", str(adapter), "--output", output, "--format", fmt, "--quiet",
                "--allow_other_base"])
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if line.startswith("merge: note: ")]
    assert len(note) == 1 and "is not the base model" in note[0] and "applying the adapter to it anyway" in note[0], err
    assert note[0] in open(output + ".report.txt").read().splitlines()

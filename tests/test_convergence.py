"""bench/convergence.py in a tiny configuration: equal trainable parameters for Bone, Bat and
LoRA, the curves and tables of two seeds written, the ratio of the seeds' mean as the last line."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_tiny_run_writes_its_curves_and_the_ratio(tmp_path):
    p = subprocess.run([sys.executable, "bench/convergence.py", "--quick", "--steps", "4", "--pretrain", "6",
                        "--lrs", "0.01", "--seeds", "2", "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    name, value = last.split()
    assert name == "bone_vs_lora_val_loss_ratio" and float(value) > 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    bone, bat, lora = (results[m]["params"] for m in ("bone", "bat", "lora"))
    assert abs(bone / lora - 1) <= 0.05 and abs(bat / lora - 1) <= 0.05, (bone, bat, lora)
    assert results["full"]["params"] > 5 * lora
    per_seed = json.loads((tmp_path / "results.json").read_text())["final_val_loss_per_seed"]
    mean = {m: sum(v) / 2 for m, v in per_seed.items()}
    assert abs(mean["bone"] / mean["lora"] - float(value)) < 1e-3
    assert per_seed["bone"][0] == results["bone"]["final_val_loss"]
    assert per_seed["bone"][0] != per_seed["bone"][1]             # seed 2 is another data order and init
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert rows[0] == "seed,method,lr,kind,step,loss"
    for seed in (1, 2):
        for method in ("bone", "bat", "lora", "full"):
            assert sum(r.startswith(f"{seed},{method},") and ",train," in r for r in rows) == 4
            assert sum(r.startswith(f"{seed},{method},") and ",val," in r for r in rows) >= 2  # step 0, the last
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "table.md").read_text()
    assert "| bone |" in report and "| bone / lora |" in report
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]

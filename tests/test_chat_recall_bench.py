"""bench/chat_recall.py --quick: both runs train, their held-out conversations are recalled through
Chat and scored, and the table holds each figure beside its counterpart with the ratio."""
import json

from bench import chat_recall


def test_the_quick_run_prints_its_table_with_the_ratios(tmp_path, capsys):
    chat_recall.main(["--quick", "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| held out | --loss_on assistant | --loss_on all | assistant / all |" in out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for label, key in (("turn-3 recall accuracy", "recall"), ("loss on the assistant tokens", "assistant_loss"),
                       ("loss on the turn-3 reply", "reply3_loss")):
        row = next(line for line in out.splitlines() if line.startswith(f"| {label} |"))
        a, b = results["assistant"][key], results["all"][key]
        assert row == f"| {label} | {a:.3f} | {b:.3f} | {f'{a / b:.2f}' if b else 'n/a'} |"
    # A tiny random model after 2 steps: the losses are near ln(vocabulary) (ln 136 = 4.9), and
    # they differ between the masks (the runs trained on different tokens).
    assert all(1 < results[m]["assistant_loss"] < 8 for m in ("assistant", "all"))
    assert results["assistant"]["assistant_loss"] != results["all"]["assistant_loss"]
    assert all(0 <= results[m]["recall"] <= 1 for m in ("assistant", "all"))

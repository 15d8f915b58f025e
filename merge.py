"""Merge a Bone (or bat, or LoRA) adapter into its base RWKV-6 or RWKV-7 checkpoint: the output is an
official-layout .pth (the base's keys, in the base's order, no adapter keys) that the `rwkv`
runtime and every other RWKV inference program loads as it loads the base.

    python merge.py --base_model base.pth --adapter out/bone/adapter-0001000.pth \\
        --output out/bone/adapter-0001000-merged.pth

--format gguf|safetensors|st writes the merged model in that format instead (see export.py).
Beside the output, OUTPUT.report.txt keeps what the merge printed (the dtype chosen, the table,
--verify's verdict). train.py's summary and scripts/merge_bone.sh name the output after the
adapter: adapter-STEP-merged.pth (or .gguf...) beside it.
"""
import argparse
import contextlib
import io
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from src.bone import AdapterError  # noqa: E402
from src.cli import ArgumentParser, sentence  # noqa: E402
from src.checkpoint import atomic_write, clean_stale_temporaries, temporary_file  # noqa: E402
from src.config import CheckpointError  # noqa: E402
from src.export import FORMATS, ExportError, check_choice, check_output, export_model  # noqa: E402
from src.merging import OUTPUT_DTYPES, MergeError, format_report, merge_checkpoint, quant_plan  # noqa: E402
from src.quant import QUANT_TYPES, QuantError  # noqa: E402
from src.state_file import state_beside  # noqa: E402
from src.verify import DEFAULT_PROMPT  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser("merge.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", required=True, help="the official .pth the adapter was trained on")
    p.add_argument("--adapter", "--lora_checkpoint", dest="adapter", required=True,
                   help="the adapter file train.py wrote (adapter-STEP.pth); --lora_checkpoint is the older name")
    p.add_argument("--output", required=True, help="where to write the merged .pth (never the base itself)")
    p.add_argument("--dtype", choices=OUTPUT_DTYPES, default="auto",
                   help="dtype of the merged file: auto (default: the narrowest of bf16, fp16, fp32 that keeps at least "
                        "90%% of the update of every kind of module and holds every value), same (as the base), bf16, "
                        "fp16 or fp32; the merge is computed in fp32 either way and cast once")
    p.add_argument("--safe_merge", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse NaN/Inf in the adapter or the merged weights before anything is written (default on)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the merge arithmetic runs (cuda: faster for big models; the file goes through CPU memory)")
    p.add_argument("--quant", choices=QUANT_TYPES, default="none",
                   help="none (default): merge into the base as stored; nf4, fp4 or int8: first round the base through "
                        "that quantization (in fp32), to reproduce the base a train.py --quant run trained against")
    p.add_argument("--allow_other_base", action="store_true",
                   help="merge even when --base_model is not the base the adapter records (another model, or this "
                        "adapter already merged): by default that is refused")
    p.add_argument("--format", default="pth", help=f"pth (default): an official-layout .pth; or {', '.join(FORMATS)}: "
                   "the merged model written as export.py writes it (the merge goes through a temporary .pth beside "
                   "the output, removed afterwards)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it already exists")
    p.add_argument("--verify", action="store_true",
                   help="afterwards, load the merged file in the rwkv runtime (cpu fp32) and compare its logits with "
                        "base + adapter in this repository's model, run as trained (the base held quantized when the "
                        "adapter records a --quant run), then sample a short continuation")
    p.add_argument("--verify_prompt", default=DEFAULT_PROMPT, help=f"the prompt --verify feeds and continues "
                                                                   f"(default: {DEFAULT_PROMPT!r})")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    printed = io.StringIO()     # what the merge prints, for <output>.report.txt

    def note(line):     # a note about the inputs (another base let through): on stderr, and in the report
        print(line, file=sys.stderr)
        printed.write(line + "\n")

    with contextlib.redirect_stdout(_Tee(sys.stdout, printed)):
        ok = merge_to_format(args, note) if args.format != "pth" else merge_pth(args, note)
    write_report(args, argv, printed.getvalue())
    if not ok:
        sys.exit(1)     # --verify FAILed: the merged file and its report stay, for a look


def merge_pth(args, note):
    start = time.time()
    try:
        report, dtype, why = merge_checkpoint(args.base_model, args.adapter, args.output, dtype=args.dtype,
                                  safe_merge=args.safe_merge, device=args.device, overwrite=args.overwrite,
                                  progress=not args.quiet, quant=args.quant, allow_other_base=args.allow_other_base,
                                  note=note)
    except (CheckpointError, AdapterError, MergeError, QuantError) as e:
        sys.exit(f"merge.py: {sentence(e, model_flag='--base_model')}")
    size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({size / 1e6:.1f} MB) in {time.time() - start:.1f}s")
    return report_merge(args, report, dtype, why, args.output)


def report_merge(args, report, dtype, why, merged):
    """What merge.py prints after the merge (and --verify, on the merged .pth); False when it FAILs."""
    print(quant_plan(args.adapter, args.quant)[1])
    if why:
        print(f"merge: wrote {dtype} ({why}; --dtype chooses another)")
    dtype = "the base's dtype" if dtype == "same" else dtype
    print(format_report(report, dtype))
    if args.verify:
        from src.verify import verify_merged
        from src.bone import read_adapter
        # An RWKV-7 merge's trained state is in the state file beside it: the package gets it as RWKV-Runner passes it.
        state = state_beside(merged if args.format == "pth" else args.output)
        trained = "state" in read_adapter(args.adapter, mmap=True)[1]["train_parts"]
        return verify_merged(args.base_model, args.adapter, merged, prompt=args.verify_prompt,
                             state=state if trained and os.path.exists(state) else None)[2]
    return True


def merge_to_format(args, note):
    """merge.py --format X: merge into a temporary .pth beside --output (a temporary's name, so that
    a killed run's is removed by the next), export it, remove it."""
    start = time.time()
    try:
        if args.format not in FORMATS:
            raise ExportError(f"--format must be one of pth, {', '.join(FORMATS)}, not {args.format!r}.")
        check_choice(args.format, "same")
        if os.path.isfile(args.adapter) and os.path.exists(args.output) and os.path.samefile(args.output, args.adapter):
            raise ExportError(f"--output {args.output} is the adapter file itself: choose another path.")
        check_output(args.output, args.base_model, args.overwrite)
        clean_stale_temporaries(args.output, say=lambda m: print(f"merge: {m}", file=sys.stderr))
        fd, merged = temporary_file(args.output)
        os.close(fd)
        try:
            report, dtype, why = merge_checkpoint(args.base_model, args.adapter, merged, dtype=args.dtype,
                                                  safe_merge=args.safe_merge, device=args.device, overwrite=True,
                                                  progress=not args.quiet, quant=args.quant,
                                                  allow_other_base=args.allow_other_base,
                                                  state_output=state_beside(args.output), note=note)
            if not report_merge(args, report, dtype, why, merged):
                sys.exit(1)     # --verify FAILed: nothing is exported
            size, line = export_model(merged, args.format, args.output, overwrite=args.overwrite,
                                      progress=not args.quiet, name=os.path.splitext(os.path.basename(args.output))[0])
        finally:
            if os.path.exists(merged):
                os.remove(merged)
    except (CheckpointError, AdapterError, MergeError, QuantError, ExportError) as e:
        sys.exit(f"merge.py: {sentence(e, model_flag='--base_model')}")
    print(f"wrote {args.output} ({size / 1e6:.1f} MB) in {time.time() - start:.1f}s: {line}")
    return True


def write_report(args, argv, printed):
    """<output>.report.txt: the command, the checks, and what the merge printed (the plan, the
    dtype and why, the per-kind table, --verify's verdict); written once the output is, atomically
    (a refused or failed merge leaves none), replacing an earlier one as the output was."""
    path = args.output + ".report.txt"
    command = shlex.join(["python", "merge.py", *map(str, sys.argv[1:] if argv is None else argv)])
    checks = ("checked before writing: the base (a complete checkpoint, no NaN/Inf), the adapter against it "
              "(model shape, every tensor's home and shape" + (", no NaN/Inf" if args.safe_merge else "")
              + "), the output path and the free space" + (" (and every merged tensor finite)" if args.safe_merge else ""))
    text = (f"merge.py report, {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ {command}\n"
            f"base: {os.path.abspath(args.base_model)}\nadapter: {os.path.abspath(args.adapter)}\n"
            f"output: {os.path.abspath(args.output)}\n{checks}\n\n{printed}")
    clean_stale_temporaries(path, say=lambda m: print(f"merge: {m}", file=sys.stderr))
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class _Tee(io.TextIOBase):
    """stdout during a merge: the terminal and the report's text."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


if __name__ == "__main__":
    main()

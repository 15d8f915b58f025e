"""Export a merged (or any official-layout) RWKV-6 or RWKV-7 .pth for another runtime:

    python export.py --model merged.pth --format gguf --output merged.gguf      # llama.cpp
    python export.py --model merged.pth --format safetensors --output merged.safetensors
    python export.py --model merged.pth --format st --output merged.st          # web-rwkv / Ai00
    python export.py --adapter adapter.pth --format gguf --output adapter.gguf  # a llama.cpp LoRA adapter
    python export.py --adapter adapter.pth --format state --output state.pth    # its trained state: RWKV-Runner
    python export.py --adapter adapter.pth --format web-rwkv-state --output state.st   # the same for Ai00
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from src.cli import ArgumentParser  # noqa: E402
from src.bone import AdapterError  # noqa: E402
from src.config import CheckpointError  # noqa: E402
from src.export import EXPORT_DTYPES, FORMATS, ExportError, export_model  # noqa: E402
from src.state_file import STATE_FORMATS  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser("export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the RWKV-6 (x060) or RWKV-7 (x070) .pth to export, e.g. merge.py's output; "
                   "with --adapter, the base it is checked against (optional): its sizes and family, and, as merge.py "
                   "checks it, the fingerprint of the base's weights the adapter records")
    p.add_argument("--adapter", default=None, help="a bone, mini or lora adapter file to write as a llama.cpp LoRA adapter "
                   "(--format gguf), served beside the base's GGUF without merging")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}; with --adapter, gguf (a llama.cpp "
                   "LoRA; a trained state goes beside it) or a trained state alone: state (RWKV-Runner's state file, "
                   "the rwkv package's: the n_layer blocks.{i}.att.time_state tensors as its only keys, the model "
                   "family recorded beside them) or web-rwkv-state (web-rwkv / Ai00: safetensors f16, last two dims "
                   "transposed, the family in its metadata)")
    p.add_argument("--output", required=True, help="the file to write (never the input itself)")
    p.add_argument("--dtype", default="same", help=f"one of {', '.join(EXPORT_DTYPES)}: same (default) keeps the "
                   ".pth's dtype; q8_0 is GGUF only; st is always fp16")
    p.add_argument("--allow_other_base", action="store_true",
                   help="with --adapter and --model: export even when --model is not the base the adapter records "
                        "(another model, or this adapter already merged): by default that is refused, as merge.py does")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (once the new file is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    try:
        if args.adapter is not None and args.format in STATE_FORMATS:
            size, line = export_state(args)
        elif args.adapter is not None:
            from src.export.lora import export_adapter
            if args.format != "gguf":
                raise ExportError(f"An adapter is written as a llama.cpp LoRA (--format gguf), not {args.format}: "
                                  "merge it (merge.py --format) for other runtimes.")
            size, line = export_adapter_and_state(args, export_adapter)
        elif args.model is None:
            raise ExportError("Give --model (a .pth to export) or --adapter (an adapter to write as a llama.cpp LoRA).")
        else:
            size, line = export_model(args.model, args.format, args.output, dtype=args.dtype, overwrite=args.overwrite,
                                      progress=not args.quiet)
    except (CheckpointError, ExportError, AdapterError) as e:
        sys.exit(f"export.py: {e}")
    print(f"wrote {args.output} ({size / 1e6:.1f} MB) in {time.time() - start:.1f}s: {line}")


def export_state(args):
    """--adapter A --format state|web-rwkv-state: the adapter's trained state alone (also reads a state
    file of either format, or a model file with a state inside), checked against --model when given
    (sizes, the family the file records, then the base fingerprint an adapter file records, as merge.py
    checks it). The file written records the family: the input's, else --model's, else none."""
    from src.bone import META_KEY, check_base
    from src.checkpoint import load_checkpoint
    from src.export import check_output
    from src.state_file import load_state, save_states, states_and_family
    if not os.path.isfile(args.adapter):
        raise ExportError(f"--adapter {args.adapter} does not exist or is not a file.")
    if args.dtype not in ("same", "fp32" if args.format == "state" else "fp16"):
        raise ExportError(f"--dtype {args.dtype}: a {args.format} file is always "
                          f"{'fp32' if args.format == 'state' else 'fp16'} (leave --dtype out).")
    base_sd, config = load_checkpoint(args.model) if args.model else (None, None)
    states, family = states_and_family(args.adapter, config)
    if config is not None:
        if META_KEY in load_state(args.adapter):     # an adapter file records its base (a state file never does)
            note = check_base(args.adapter, base_sd, config, args.model, args.allow_other_base)
            if note:
                print(f"export: {note}", file=sys.stderr)
        family = family or config.family
    check_output(args.output, args.adapter, args.overwrite)
    size = save_states(states, args.output, args.format, family=family)
    where = "RWKV-Runner's state file (the rwkv package: RWKV-6 in the model file, RWKV-7 as the initial state)" \
        if args.format == "state" else "web-rwkv / Ai00's state file ([[state]] in Ai00's Config.toml)"
    of = f"of an {family} model" if family else ("recording no model family, as the input records none (pass --model "
                                                  "to check it against the base and record its family)")
    return size, f"{where}: {len(states)} layers of {list(states[0].shape)}, {of}"


def export_adapter_and_state(args, export_adapter):
    """--adapter A --format gguf: llama.cpp's LoRA holds the adapter; llama.cpp has no initial state, so a
    trained state goes beside the output as a state file (RWKV-Runner's), said in the closing line."""
    from src.bone import read_adapter
    from src.export import state_note
    from src.state_file import save_states, states_and_family, state_beside
    _, meta, source = read_adapter(args.adapter, mmap=True) if os.path.isfile(args.adapter) else (None, None, None)
    if meta is None or "state" not in meta["train_parts"]:
        return export_adapter(args.adapter, args.output, dtype=args.dtype, model=args.model, overwrite=args.overwrite,
                              progress=not args.quiet, allow_other_base=args.allow_other_base)
    if not meta["r"]:
        raise ExportError(f"{source} holds only a trained state, and llama.cpp has no initial state: write it with "
                          "--format state (RWKV-Runner, the rwkv package) or --format web-rwkv-state (Ai00).")
    states, family = states_and_family(args.adapter)
    if family is None and args.model:       # an older file without its base's sizes: the base's family
        from src.checkpoint import load_checkpoint
        family = load_checkpoint(args.model)[1].family
    state_output = state_beside(args.output)
    if os.path.lexists(state_output) and not args.overwrite:
        raise ExportError(f"{state_output} (where the adapter's trained state goes) already exists: pass --overwrite "
                          "to replace it, or choose another --output.")
    if os.path.exists(args.output) and os.path.samefile(args.output, args.adapter):
        raise ExportError(f"--output {args.output} is the input model itself: choose another path.")
    size, line = export_adapter(args.adapter, args.output, dtype=args.dtype, model=args.model, overwrite=args.overwrite,
                                progress=not args.quiet, allow_other_base=args.allow_other_base, state_beside=True)
    save_states(states, state_output, family=family)
    return size, f"{line}; {state_note('gguf', state_output)}"


if __name__ == "__main__":
    main()

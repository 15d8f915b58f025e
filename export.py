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
                   "with --adapter, the base it is checked against (optional)")
    p.add_argument("--adapter", default=None, help="a bone, mini or lora adapter file to write as a llama.cpp LoRA adapter "
                   "(--format gguf), served beside the base's GGUF without merging")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}; with --adapter, gguf (a llama.cpp "
                   "LoRA; a trained state goes beside it) or a trained state alone: state (RWKV-Runner's state file, "
                   "the rwkv package's: exactly the n_layer blocks.{i}.att.time_state tensors) or web-rwkv-state "
                   "(web-rwkv / Ai00: safetensors f16, last two dims transposed)")
    p.add_argument("--output", required=True, help="the file to write (never the input itself)")
    p.add_argument("--dtype", default="same", help=f"one of {', '.join(EXPORT_DTYPES)}: same (default) keeps the "
                   ".pth's dtype; q8_0 is GGUF only; st is always fp16")
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
    file), checked against --model when given, else against the sizes and family the adapter records."""
    from src.checkpoint import load_checkpoint
    from src.export import check_output
    from src.state_file import read_states, save_states
    if not os.path.isfile(args.adapter):
        raise ExportError(f"--adapter {args.adapter} does not exist or is not a file.")
    if args.dtype not in ("same", "fp32" if args.format == "state" else "fp16"):
        raise ExportError(f"--dtype {args.dtype}: a {args.format} file is always "
                          f"{'fp32' if args.format == 'state' else 'fp16'} (leave --dtype out).")
    config = load_checkpoint(args.model)[1] if args.model else None
    states = read_states(args.adapter, config)
    check_output(args.output, args.adapter, args.overwrite)
    size = save_states(states, args.output, args.format)
    where = "RWKV-Runner's state file (the rwkv package: RWKV-6 in the model file, RWKV-7 as the initial state)" \
        if args.format == "state" else "web-rwkv / Ai00's state file ([[state]] in Ai00's Config.toml)"
    return size, f"{where}: {len(states)} layers of {list(states[0].shape)}"


def export_adapter_and_state(args, export_adapter):
    """--adapter A --format gguf: llama.cpp's LoRA holds the adapter; llama.cpp has no initial state, so a
    trained state goes beside the output as a state file (RWKV-Runner's), said in the closing line."""
    import tempfile

    import torch
    from src.bone import META_KEY, read_adapter
    from src.export import state_note
    from src.state_file import read_states, save_states, state_beside
    sd, meta, source = read_adapter(args.adapter, mmap=True) if os.path.isfile(args.adapter) else (None, None, None)
    if meta is None or "state" not in meta["train_parts"]:
        return export_adapter(args.adapter, args.output, dtype=args.dtype, model=args.model, overwrite=args.overwrite,
                              progress=not args.quiet)
    if not meta["r"]:
        raise ExportError(f"{source} holds only a trained state, and llama.cpp has no initial state: write it with "
                          "--format state (RWKV-Runner, the rwkv package) or --format web-rwkv-state (Ai00).")
    states = read_states(args.adapter)
    state_output = state_beside(args.output)
    if os.path.lexists(state_output) and not args.overwrite:
        raise ExportError(f"{state_output} (where the adapter's trained state goes) already exists: pass --overwrite "
                          "to replace it, or choose another --output.")
    if os.path.exists(args.output) and os.path.samefile(args.output, args.adapter):
        raise ExportError(f"--output {args.output} is the input model itself: choose another path.")
    # The adapter without its state, for the LoRA writer (which refuses what a LoRA cannot hold: checked here,
    # so that the sentence names the file given).
    from src.export.lora import refuse_unservable
    rest = {k: v for k, v in sd.items() if not k.endswith(".att.time_state")}
    refuse_unservable(rest, {**meta, "train_parts": [p for p in meta["train_parts"] if p != "state"]}, source)
    rest[META_KEY] = {**meta, "train_parts": [p for p in meta["train_parts"] if p != "state"]}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.output))) as tmp:
        stripped = os.path.join(tmp, os.path.basename(args.adapter))
        torch.save(rest, stripped)
        size, line = export_adapter(stripped, args.output, dtype=args.dtype, model=args.model,
                                    overwrite=args.overwrite, progress=not args.quiet,
                                    name=os.path.splitext(os.path.basename(args.adapter))[0])
    save_states(states, state_output)
    return size, f"{line}; {state_note('gguf', state_output)}"


if __name__ == "__main__":
    main()

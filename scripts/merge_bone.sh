#!/bin/sh
# Merge a trained adapter into its base model: an official-layout .pth for any RWKV runtime.
# Override from the environment: BASE=base.pth ADAPTER=adapter.pth OUTPUT=merged.pth
# sh scripts/merge_bone.sh; extra arguments go to merge.py (--dtype fp32, --verify, --overwrite...).
# The output is by default named after the adapter, beside it: run/adapter-0000060.pth ->
# run/adapter-0000060-merged.pth (as train.py's summary says), with merge.py's report beside it
# (run/adapter-0000060-merged.pth.report.txt).
# FORMAT=gguf (or safetensors, st) writes the merged model in that format (default pth; see export.py).
# With no BASE and no ADAPTER it merges the latest adapter of the demo run of scripts/run_bone.sh
# (out/demo/run/adapter-0000060-merged.pth, replacing an earlier demo merge) and verifies it
# (MODEL_FAMILY=x070: the RWKV-7 demo's, in out/demo-x070; PEFT=lora or state: that demo's, in run-lora
# or run-state). Relative paths are read from where you stand.
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# A misspelled setting (ADAPTR=...) would be ignored silently: refuse it before any work.
python "$ROOT/scripts/check_settings.py" "$ROOT/scripts/merge_bone.sh" || exit 2

if [ -z "$BASE" ] && [ -z "$ADAPTER" ]; then
    case "${MODEL_FAMILY:-x060}" in
        x060) DEMO=out/demo ;;
        x070) DEMO=out/demo-x070 ;;
        *) echo "merge_bone.sh: MODEL_FAMILY must be x060 (RWKV-6) or x070 (RWKV-7), not $MODEL_FAMILY." >&2; exit 2 ;;
    esac
    case "${PEFT:-bone}" in     # where run_bone.sh's demo trains with this PEFT
        bone) RUN=$DEMO/run ;;
        *) RUN=$DEMO/run-$PEFT ;;
    esac
    BASE=$ROOT/$DEMO/base.pth
    ADAPTER=$(ls "$ROOT"/$RUN/adapter-[0-9][0-9][0-9][0-9][0-9][0-9][0-9].pth 2>/dev/null | sort | tail -n 1)
    if [ -z "$ADAPTER" ]; then
        echo "merge_bone.sh: no adapter in $RUN: run ${MODEL_FAMILY:+MODEL_FAMILY=$MODEL_FAMILY }${PEFT:+PEFT=$PEFT }sh" \
             "scripts/run_bone.sh first, or set BASE and ADAPTER." >&2
        exit 1
    fi
    set -- --overwrite --verify --verify_prompt "Alice has 3 apples. Bob gives Alice" "$@"
fi
: "${BASE:?set BASE to the base model .pth}"
: "${ADAPTER:?set ADAPTER to the adapter .pth written by train.py}"

python "$ROOT/merge.py" \
    --base_model "$BASE" \
    --adapter "$ADAPTER" \
    --output "${OUTPUT:-${ADAPTER%.pth}-merged.${FORMAT:-pth}}" \
    --dtype "${DTYPE:-auto}" \
    --format "${FORMAT:-pth}" \
    "$@"

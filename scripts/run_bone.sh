#!/bin/sh
# Fine-tune an RWKV-6 or RWKV-7 checkpoint with Bone (the family is read off MODEL). Every
# setting below can be overridden from the environment (MODEL=... DATA=... sh scripts/run_bone.sh);
# extra arguments go to train.py. Relative paths are read from where you stand. With no MODEL it
# runs the demo: a small base model and generated stories, made once in the repository's out/demo
# (MODEL_FAMILY=x070: an RWKV-7 base, in out/demo-x070), fine-tuned on whatever this machine has
# with Bone in DEMO/run (PEFT=lora: LoRA, in DEMO/run-lora; PEFT=state: the initial state alone,
# in DEMO/run-state).
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# A misspelled setting (EPOCH_STEP=2) would be ignored silently: refuse it before any work.
python "$ROOT/scripts/check_settings.py" "$ROOT/scripts/run_bone.sh" || exit 2

if [ -z "$MODEL" ]; then
    DEMO=1
    case "${MODEL_FAMILY:-x060}" in
        x060) DEMO_DIR=$ROOT/out/demo ;;
        x070) DEMO_DIR=$ROOT/out/demo-x070 ;;
        *) echo "run_bone.sh: MODEL_FAMILY must be x060 (RWKV-6) or x070 (RWKV-7), not $MODEL_FAMILY." >&2; exit 2 ;;
    esac
    python "$ROOT/scripts/make_demo.py" "$DEMO_DIR" --family "${MODEL_FAMILY:-x060}"
    MODEL=$DEMO_DIR/base.pth
    DATA=${DATA:-$DEMO_DIR/stories}
    if [ -z "$PROJ_DIR" ]; then
        # The demo's own run directory, one a PEFT (so that each keeps its result). Nothing in it is deleted
        # unless this command says --overwrite: an interrupted demo run is resumed; a finished one (or one
        # with no resume point) is refused.
        case "${PEFT:-bone}" in
            bone) PROJ_DIR=$DEMO_DIR/run ;;
            *) PROJ_DIR=$DEMO_DIR/run-$PEFT ;;
        esac
        case " $* " in
            *" --resume "* | *" --overwrite "*) ;;
            *)
                STATE=$(cd "$ROOT" && python -m src.training.rundir "$PROJ_DIR")
                AGAIN="${MODEL_FAMILY:+MODEL_FAMILY=$MODEL_FAMILY }${PEFT:+PEFT=$PEFT }sh $0 --overwrite${*:+ $*}"
                case "$STATE" in
                    resumable*) echo "run_bone.sh: resuming the interrupted demo run in $PROJ_DIR from step ${STATE#* }" \
                                     "(to start it anew instead, deleting it: $AGAIN)"
                                set -- --resume "$@" ;;
                    finished*) echo "run_bone.sh: the demo run in $PROJ_DIR is finished (step ${STATE#* }): to train" \
                                    "it again from the start, deleting it, run: $AGAIN" >&2; exit 1 ;;
                    stopped*) echo "run_bone.sh: the demo run in $PROJ_DIR stopped before its first resume point:" \
                                   "to start it anew, deleting it, run: $AGAIN" >&2; exit 1 ;;
                esac ;;
        esac
    fi
    CTX_LEN=${CTX_LEN:-128}
    MICRO_BSZ=${MICRO_BSZ:-8}
    EPOCH_STEPS=${EPOCH_STEPS:-20}
    EPOCH_COUNT=${EPOCH_COUNT:-3}
    WARMUP_STEPS=${WARMUP_STEPS:-5}
    STRATEGY=${STRATEGY:-deepspeed_stage_2}
    case "${PEFT:-bone}" in
        # The state alone, at train.py's state learning rate (1 -> 0.01: a state's values are of order 1);
        # no adapter flag, no other part (--peft state refuses adapter flags).
        state) ;;
        # LoRA and Bone: an adapter of 32 with the layer norms and time-mix vectors, at a rate a random
        # base moves at in 60 steps. LoRA's alpha = 2 r, as train.py's defaults (8, 16).
        lora) LORA_R=${LORA_R:-32}; LORA_ALPHA=${LORA_ALPHA:-64} ;;
        *) BONE_R=${BONE_R:-32} ;;
    esac
    if [ "${PEFT:-bone}" != state ]; then
        LR_INIT=${LR_INIT:-3e-3}
        LR_FINAL=${LR_FINAL:-1e-3}
        TRAIN_PARTS=${TRAIN_PARTS:-ln,time}
    fi
fi
: "${DATA:?set DATA to a binidx prefix or a .jsonl file}"

python "$ROOT/train.py" \
    --load_model "$MODEL" \
    --data_file "$DATA" \
    --data_type "${DATA_TYPE:-binidx}" \
    --proj_dir "${PROJ_DIR:-out/bone}" \
    --ctx_len "${CTX_LEN:-1024}" \
    --micro_bsz "${MICRO_BSZ:-4}" \
    --accumulate_grad_batches "${ACCUMULATE:-1}" \
    --epoch_steps "${EPOCH_STEPS:-1000}" \
    --epoch_count "${EPOCH_COUNT:-1}" \
    --epoch_save "${EPOCH_SAVE:-1}" \
    --save_every_steps "${SAVE_EVERY_STEPS:-0}" \
    ${LR_INIT:+--lr_init} ${LR_INIT:+"$LR_INIT"} \
    ${LR_FINAL:+--lr_final} ${LR_FINAL:+"$LR_FINAL"} \
    --lr_schedule "${LR_SCHEDULE:-cosine}" \
    --warmup_steps "${WARMUP_STEPS:-0}" \
    --keep_last "${KEEP_LAST:-3}" \
    --max_steps "${MAX_STEPS:-0}" \
    --save_every_minutes "${SAVE_EVERY_MINUTES:-30}" \
    --peft "${PEFT:-bone}" \
    ${BONE_R:+--bone_r} ${BONE_R:+"$BONE_R"} \
    ${BONE_MODE:+--bone_mode} ${BONE_MODE:+"$BONE_MODE"} \
    ${BONE_MINI_R:+--bone_mini_r} ${BONE_MINI_R:+"$BONE_MINI_R"} \
    ${LORA_R:+--lora_r} ${LORA_R:+"$LORA_R"} \
    ${LORA_ALPHA:+--lora_alpha} ${LORA_ALPHA:+"$LORA_ALPHA"} \
    ${TARGET_MODULES:+--target_modules} ${TARGET_MODULES:+"$TARGET_MODULES"} \
    ${SFT_TEMPLATE:+--sft_template} ${SFT_TEMPLATE:+"$SFT_TEMPLATE"} \
    --train_parts "${TRAIN_PARTS:-}" \
    --grad_cp "${GRAD_CP:-0}" \
    --chunk_ctx "${CHUNK_CTX:-0}" \
    --quant "${QUANT:-none}" \
    --accelerator "${ACCELERATOR:-auto}" \
    --devices "${DEVICES:-1}" \
    --num_nodes "${NUM_NODES:-1}" \
    --precision "${PRECISION:-auto}" \
    --strategy "${STRATEGY:-deepspeed_stage_1}" \
    --op "${OP:-auto}" \
    --seed "${SEED:-42}" \
    "$@"

if [ -n "$DEMO" ]; then
    python - "${PROJ_DIR}/log.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
print(f"demo: loss {first:.3f} at step 1 -> {last:.3f} at step {rows[-1]['step']}"
      f" ({'lower' if last < first else 'NOT lower'}); adapters and loss.png in {sys.argv[1].rsplit('/', 1)[0]}")
PY
fi

"""Fine-tune an RWKV-6 (x060) or RWKV-7 (x070) checkpoint with Bone (or LoRA) adapters under
pytorch-lightning and DeepSpeed; the family is read off the file.

Example (one GPU):
  python train.py --load_model RWKV-x060-World-1B6.pth --data_file data/mydata --data_type binidx \\
      --proj_dir out/bone --ctx_len 1024 --micro_bsz 8 --epoch_steps 1000 --epoch_count 5 \\
      --bone_r 64 --lr_init 2e-5 --lr_final 2e-5 --precision bf16 --strategy deepspeed_stage_1
"""
import argparse
import contextlib
import os
import shlex
import sys


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the example's layout and shows every default."""


def parse_args(argv=None):
    from src.cli import ArgumentParser
    from src.data import add_data_options
    p = ArgumentParser("train.py", description=__doc__, formatter_class=Formatter)
    a = p.add_argument
    a("--load_model", required=True, help="base RWKV-6 or RWKV-7 .pth (official layout); the family and all sizes are read off it")
    a("--proj_dir", default="out", help="where adapters, the resume point, log.csv, loss.png, run.json and train.log go")
    a("--data_file", required=True, help="binidx prefix (without .bin/.idx) or a .jsonl file; chat: .jsonl, .json, "
                                         ".parquet files or directories, comma-separated")
    a("--data_type", default="binidx", help="binidx | jsonl | sft | sft_padded | chat | chat_padded | preference "
                                            "(pairs for --objective dpo, simpo or orpo)")
    add_data_options(a)     # --text_field, --prompt_field, --sft_template, --response_field, the chat options
    # Preference tuning (docs/training.md): the objective and its hyperparameters
    a("--objective", default="sft", help="sft (the language-model loss) | dpo | simpo | orpo (these three on "
                                         "--data_type preference pairs)")
    a("--pref_beta", type=float, default=None, help="DPO's and SimPO's beta (default: DPO 0.1, as TRL; SimPO 2.0, "
                                                    "as its paper)")
    a("--simpo_gamma", type=float, default=None, help="SimPO's target margin gamma (default: half of --pref_beta, "
                                                      "the paper's gamma/beta of 0.5)")
    a("--orpo_lambda", type=float, default=0.1, help="ORPO's weight of the odds-ratio term beside the NLL "
                                                     "(TRL's ORPOConfig beta)")
    a("--sft_weight", type=float, default=0.0, help="DPO: weight of an added NLL term on the chosen reply "
                                                    "(TRL's rpo_alpha; 0: off)")
    a("--vocab_size", type=int, default=0, help="accepted only to be checked against the checkpoint")
    a("--n_layer", type=int, default=0, help="accepted only to be checked against the checkpoint")
    a("--n_embd", type=int, default=0, help="accepted only to be checked against the checkpoint")
    a("--ctx_len", type=int, default=1024, help="tokens per sample")
    a("--micro_bsz", type=int, default=1, help="samples per process per micro-batch")
    a("--accumulate_grad_batches", type=int, default=1, help="micro-batches per optimizer step")
    a("--epoch_steps", type=int, default=1000, help="optimizer steps per (mini-)epoch")
    a("--epoch_count", type=int, default=1, help="epochs to train in all")
    a("--epoch_begin", type=int, default=0, help="start at this epoch (the lr schedule and data continue from there)")
    a("--epoch_save", type=int, default=1, help="save an adapter every N epochs (0: only at the end and every --save_every_steps)")
    a("--save_every_steps", type=int, default=0, help="also save an adapter and the resume point every N steps (0: off)")
    a("--keep_last", type=int, default=3, help="how many adapter files to keep (0: keep every one)")
    a("--save_every_minutes", type=float, default=30, help="also save the resume point every N minutes (0: off)")
    a("--resume", action="store_true", help="continue the run in --proj_dir from its resume point")
    a("--overwrite", action="store_true", help="start anew in a --proj_dir that holds an earlier run, deleting "
                                               "its adapters, log and resume point first")
    a("--lr_init", type=float, default=None, help="learning rate after warmup (default 2e-5; --peft state alone: 1.0, "
                                                  "a state's scale)")
    a("--lr_final", type=float, default=None, help="learning rate at the end (default 2e-5; --peft state alone "
                                                   "without --lr_init: 0.01)")
    a("--lr_state", type=float, default=None, help="learning rate of the trained initial state (train part state) "
                                                   "beside adapters, on the same schedule (default 1.0; --peft state "
                                                   "alone: --lr_init)")
    a("--lr_schedule", default="cosine", help="constant | exponential | cosine (decay from lr_init to lr_final)")
    a("--warmup_steps", type=int, default=0, help="linear warmup from lr_init/100")
    a("--beta1", type=float, default=0.9, help="Adam beta1")
    a("--beta2", type=float, default=0.99, help="Adam beta2")
    a("--adam_eps", type=float, default=1e-8, help="Adam epsilon")
    a("--weight_decay", type=float, default=0.0, help="on matrices only (adapters decay towards the base model)")
    a("--grad_cp", type=int, default=0, help="1: gradient checkpointing (less memory, about 30%% slower)")
    a("--chunk_ctx", type=int, default=0, help="run each sample this many tokens at a time, with exact gradients: "
                                               "memory no longer grows with --ctx_len (0: off)")
    a("--accelerator", default="auto", help="gpu | cpu | auto")
    a("--devices", type=int, default=1, help="processes (GPUs) per node")
    a("--num_nodes", type=int, default=1, help="machines (see README: multi-node)")
    a("--precision", default="auto", help="bf16 | fp16 | fp32 | auto (bf16 on GPU, fp32 on CPU)")
    a("--strategy", default="deepspeed_stage_1", help="deepspeed_stage_1 | _2 | _2_offload | _3 | _3_offload | ddp | auto")
    a("--op", default="auto", help="WKV (WKV6 or WKV7) implementation: auto | cuda | cpu")
    a("--peft", default="bone", help="bone | lora | state | none (state: state tuning, each layer's initial WKV "
                                     "state and nothing else, every weight frozen; none: only --train_parts train, no adapter)")
    a("--bone_config", default=None, help='older JSON form: \'{"bone_mode": "bone", "bone_r": 64, "bone_load": ""}\'')
    a("--bone_r", type=int, default=None, help="Bone block size r (default 64)")
    a("--bone_mode", default=None, help="bone | bat | mini (PEFT's MiSS mini: needs --bone_mini_r)")
    a("--bone_mini_r", type=int, default=None, help="--bone_mode mini: the bone tensor is [r, mini_r], tiled along "
                                                    "the outputs (mini_r must divide every adapted output size)")
    a("--bone_load", default=None, help="start from this saved adapter")
    a("--allow_other_base", action="store_true", help="--bone_load even when --load_model is not the base the adapter "
                                                      "records (another model, or this adapter already merged)")
    a("--lora_r", type=int, default=8, help="--peft lora: rank")
    a("--lora_alpha", type=float, default=16.0, help="--peft lora: scaling is alpha / r")
    a("--target_modules", default=None, help="comma-separated; default all projections (8 in RWKV-6, 6 in RWKV-7)")
    a("--train_parts", default="", help="comma-separated base parts that also train: time, ln, emb, head, state "
                                        "(state: each layer's initial WKV state, beside the adapters)")
    a("--quant", default="none", help="none | nf4 | fp4 | int8: hold the frozen base quantized (bitsandbytes), "
                                      "dequantized per use; the adapters train in full precision on top")
    a("--seed", type=int, default=42, help="seed for the adapters' init and the data sampling")
    a("--max_steps", type=int, default=0, help="stop after this many steps in all (0: epoch_count * epoch_steps)")
    # Watching a run: held-out loss and loggers.
    a("--val_data", default=None, help="validation data, of --data_type like --data_file")
    a("--val_split", type=float, default=0.0, help="hold this fraction of --data_file's documents out of training, "
                                                   "for validation (instead of --val_data)")
    a("--val_every", type=int, default=0, help="validation loss every N steps and at the end (0: every epoch)")
    a("--val_tokens", type=int, default=65536, help="validation budget: the same ctx_len windows, this many tokens, every time")
    a("--logger", default="csv", help="csv | tensorboard | wandb (log.csv and loss.png are written in every case; "
                                      "wandb runs offline under WANDB_MODE=offline)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    made = not os.path.exists(args.proj_dir)
    console = start_console(argv)   # before any import prints: train.log gets every line
    try:
        check_args(args)
        with run_directory(args, console) as run_dir:
            if run_dir is not None:
                run_dir.made = made     # the start line says so: no directory is made without a word
            run(args, run_dir, console)
    except (ValueError, FileNotFoundError) as e:  # our errors are one sentence: no traceback for the user
        if made and os.path.isdir(args.proj_dir) and not os.listdir(args.proj_dir):
            os.rmdir(args.proj_dir)     # refused before any work: leave nothing behind
        from src.cli import sentence
        sys.exit(f"train.py: {sentence(e, '--bone_load', '--load_model')}")
    except (OSError, RuntimeError) as e:
        from src.training.callbacks import disk_full
        if not disk_full(e, args.proj_dir):
            raise
        sys.exit(f"train.py: the disk is full ({getattr(e, 'filename', None) or args.proj_dir}): free some space, then run the same "
                 "command with --resume to continue from the last complete resume point.")
    finally:
        if console:
            console.close()


def check_args(args):
    """Every check that needs no model, before anything is loaded: one sentence each."""
    check_state_args(args)
    check_objective(args)
    from src.data import data_options
    data_options(args)      # the chat options (--loss_on, --chat_roles, ...) are read here
    for flag, value, least in (("--devices", args.devices, 1), ("--num_nodes", args.num_nodes, 1),
                               ("--micro_bsz", args.micro_bsz, 1), ("--ctx_len", args.ctx_len, 2),
                               ("--accumulate_grad_batches", args.accumulate_grad_batches, 1),
                               ("--epoch_steps", args.epoch_steps, 1), ("--epoch_count", args.epoch_count, 1),
                               ("--keep_last", args.keep_last, 0), ("--epoch_save", args.epoch_save, 0),
                               ("--save_every_steps", args.save_every_steps, 0), ("--max_steps", args.max_steps, 0),
                               ("--epoch_begin", args.epoch_begin, 0), ("--warmup_steps", args.warmup_steps, 0),
                               ("--chunk_ctx", args.chunk_ctx, 0), ("--save_every_minutes", args.save_every_minutes, 0)):
        if value < least:
            raise ValueError(f"{flag} {value} is too small: it must be at least {least}.")
    if args.chunk_ctx > args.ctx_len:
        raise ValueError(f"--chunk_ctx {args.chunk_ctx} is larger than --ctx_len {args.ctx_len}: a sample would be one "
                         f"piece; give a --chunk_ctx below {args.ctx_len}, or 0 for off.")
    for flag, value in (("--lr_init", args.lr_init), ("--lr_final", args.lr_final), ("--adam_eps", args.adam_eps)):
        if not value > 0:
            raise ValueError(f"{flag} {value} must be a positive number (for example {flag} 2e-5).")
    if not os.path.isfile(args.load_model):
        raise FileNotFoundError(f"--load_model {args.load_model} does not exist or is not a file.")
    if args.data_file.endswith(".jsonl") and args.data_type == "binidx":
        raise ValueError(f"--data_file {args.data_file} is a .jsonl file, but --data_type is binidx: add --data_type "
                         "jsonl (or sft), or make binidx with scripts/make_binidx.py.")
    if args.bone_r is not None and args.bone_r < 1 or args.lora_r < 1:
        raise ValueError("--bone_r and --lora_r must be at least 1.")
    if args.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"Unknown --precision {args.precision!r}: choose bf16, fp16, fp32 or auto.")
    from src.training.rundir import check_writable
    check_writable(args.proj_dir)
    from src.training.schedule import learning_rate
    learning_rate(0, 1, args.lr_init, args.lr_final, 0, args.lr_schedule)  # refuses an unknown schedule now
    accelerator = resolve_accelerator(args.accelerator)
    if accelerator == "cpu":
        # DeepSpeed picks its accelerator when first imported: set it before anything imports it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from src.training.strategy import make_strategy
    make_strategy(args.strategy, accelerator)      # refuses an unknown strategy now
    check_quant(args)
    check_bone_load(args)
    check_logger(args.logger, args.proj_dir)
    from src.training.validation import check_args as check_validation
    check_validation(args)
    if (args.op == "cuda" or accelerator == "gpu") and not torch.cuda.is_available():
        flag = "--op cuda" if args.op == "cuda" else "--accelerator gpu"
        raise ValueError(f"{flag} needs a CUDA GPU, but PyTorch sees none here: use --op cpu --accelerator cpu "
                         "(or auto).")


def run(args, run_dir, console=None):
    accelerator = resolve_accelerator(args.accelerator)
    import pytorch_lightning as pl
    import torch
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    from src.training import noise
    noise.silence()

    from src import family
    from src.data import data_options, make_dataset
    from src.training.callbacks import Checkpointer, LearningRateSchedule, QuantizeBase, TrainLog
    from src.training.rundir import run_adapters
    from src.training.module import RWKVLightning
    from src.training.sampler import StepSampler
    from src.training.strategy import make_strategy
    from src.training.validation import Validation, validation_dataset, window_count
    from src import bone

    precision = {"auto": "bf16" if accelerator == "gpu" else "fp32"}.get(args.precision, args.precision)
    strategy = make_strategy(args.strategy, accelerator)
    total_steps = args.max_steps or args.epoch_count * args.epoch_steps
    resume = resume_point(args) if args.resume else None
    logger = make_logger(args.logger, args.proj_dir)
    pl.seed_everything(args.seed, workers=True)

    model = family.from_checkpoint(args.load_model, dtype=torch.float32 if precision == "fp32" else None,
                                   op=args.op, grad_cp=bool(args.grad_cp))
    check_sizes(args, model.config)
    apply_peft(model, args, bone)
    if args.quant != "none":
        from src.quant import check_quantizable
        check_quantizable(model, args.quant)    # a dtype or shape bitsandbytes refuses: now, not in the first step
    # The data before run.json is written: bad data is refused with the run directory as it was.
    dataset = make_dataset(args.data_file, args.data_type, ctx_len=args.ctx_len, vocab_size=model.config.vocab_size,
                           seed=args.seed, val_split=args.val_split, **data_options(args))
    val_dataset = validation_dataset(args, model.config.vocab_size)
    if run_dir is not None:
        print(f"train.py: {describe(model, args, bone)}; {total_steps} steps of {tokens_per_step(args):,} "
              f"tokens into {args.proj_dir}" + (" (a new directory)" if run_dir.made else "")
              + (f", each sample in pieces of {args.chunk_ctx} tokens" if 0 < args.chunk_ctx < args.ctx_len else ""),
              flush=True)
        check_run(run_dir, args, settings(model, args, bone), total_steps)
        record_run(run_dir, args, model.config, dataset, val_dataset, total_steps, precision, accelerator)
        if console:     # the run is accepted: its lines so far, and every later one, go to train.log
            console.open(os.path.join(args.proj_dir, "train.log"), args.resume)
    rank_zero_only(print)(f"data: {dataset.summary}" + (f"\nvalidation: {val_dataset.summary}" if val_dataset else ""))

    step_offset = args.epoch_begin * args.epoch_steps
    objective, hyper = preference(args)
    module = RWKVLightning(model, lr_init=args.lr_init, betas=(args.beta1, args.beta2), adam_eps=args.adam_eps,
                           state_lr_scale=args.lr_state / args.lr_init,
                           weight_decay=args.weight_decay, cpu_adam=args.strategy.endswith("offload"),
                           chunk_ctx=args.chunk_ctx if 0 < args.chunk_ctx < args.ctx_len else 0,
                           objective=objective, hyper=hyper)
    if objective is not None:
        rank_zero_only(print)(f"objective: {objective_line(args, hyper)}", flush=True)
    world = args.devices * args.num_nodes
    schedule = LearningRateSchedule(step_offset + total_steps, args.lr_init, args.lr_final, args.warmup_steps, args.lr_schedule)
    validation = [] if val_dataset is None else [Validation(
        val_dataset, window_count(val_dataset, args.val_tokens, args.ctx_len, world), args.val_every or args.epoch_steps,
        args.micro_bsz, module.chunk_ctx)]
    log = TrainLog(args.proj_dir, schedule, tokens_per_step(args), args.epoch_steps, total_steps, args.epoch_begin,
                   val_losses=validation[0].losses if validation else None, metrics=metric_names(objective, hyper),
                   val_accuracies=validation[0].accuracies if validation else None)
    saver = Checkpointer(args.proj_dir, bone.save_adapter, args.save_every_steps, args.epoch_steps, args.epoch_save,
                         args.keep_last, args.save_every_minutes,
                         on_saved=(lambda step: run_dir.record(resume_step=step)) if run_dir else None)
    callbacks = [
        schedule,
        *validation,    # before TrainLog, which writes this step's validation loss
        log,
        saver,
    ] + ([QuantizeBase(args.quant)] if args.quant != "none" else [])
    trainer = pl.Trainer(accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
                         precision={"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}[precision],
                         max_steps=total_steps, accumulate_grad_batches=args.accumulate_grad_batches,
                         callbacks=callbacks, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         use_distributed_sampler=False, log_every_n_steps=1, num_sanity_val_steps=0)

    def train_dataloader():
        # The sampler starts at the restored step, so a resumed run reads what the killed one would have.
        per_step = args.accumulate_grad_batches
        sampler = StepSampler(lambda: (step_offset + trainer.global_step) * per_step,
                              (step_offset + total_steps) * per_step,
                              args.micro_bsz, rank=trainer.global_rank, world_size=trainer.world_size)
        return torch.utils.data.DataLoader(dataset, batch_size=args.micro_bsz, sampler=sampler, num_workers=0)

    module.train_dataloader = train_dataloader
    trainer.fit(module, ckpt_path=resume)
    if trainer.is_global_zero and log.rows:
        last = saver.last_adapter or (run_adapters(args.proj_dir) or ["(none kept)"])[-1]
        print(f"done: {log.rows[-1]['step']} steps, final loss {float(log.rows[-1]['loss']):.4g}; last adapter {last}\n"
              f"merge it with: python merge.py --base_model {shlex.quote(args.load_model)} --adapter {shlex.quote(last)} "
              f"--output {shlex.quote(merged_name(last))}", flush=True)
        if "state" in bone.adapter_meta(model)["train_parts"]:     # the state file RWKV-Runner loads beside the base
            from src.state_file import state_beside
            print(f"or export its state (RWKV-Runner, the rwkv package) with: python export.py --adapter "
                  f"{shlex.quote(last)} --format state --output {shlex.quote(state_beside(last))}", flush=True)


PREFERENCE = ("dpo", "simpo", "orpo")
BASE_PARTS = ("ln", "time", "emb", "head")


def check_objective(args):
    """--objective and its hyperparameters, and the data and training it needs: one sentence each."""
    if args.objective not in ("sft",) + PREFERENCE:
        raise ValueError(f"Unknown --objective {args.objective!r}: choose sft, dpo, simpo or orpo.")
    if (args.objective == "sft") != (args.data_type != "preference"):
        raise ValueError(f"--objective {args.objective} does not train on --data_type {args.data_type}: preference "
                         "pairs are for --objective dpo, simpo or orpo, and these need --data_type preference.")
    given = [f for f, v, default in (("--pref_beta", args.pref_beta, None), ("--simpo_gamma", args.simpo_gamma, None),
                                      ("--orpo_lambda", args.orpo_lambda, 0.1), ("--sft_weight", args.sft_weight, 0.0))
             if v != default and f not in {"dpo": ("--pref_beta", "--sft_weight"), "simpo": ("--pref_beta", "--simpo_gamma"),
                                           "orpo": ("--orpo_lambda",)}.get(args.objective, ())]
    if given:
        raise ValueError(f"{given[0]} is not an option of --objective {args.objective}: drop it (DPO: --pref_beta, "
                         "--sft_weight; SimPO: --pref_beta, --simpo_gamma; ORPO: --orpo_lambda).")
    if args.pref_beta is not None and not args.pref_beta > 0:
        raise ValueError(f"--pref_beta {args.pref_beta} must be a positive number: at 0 the loss is constant and "
                         "nothing is learnt (DPO's usual beta is 0.1, SimPO's 2).")
    for flag, value in (("--orpo_lambda", args.orpo_lambda), ("--sft_weight", args.sft_weight)):
        if not value >= 0:
            raise ValueError(f"{flag} {value} must be 0 or more.")
    if args.objective != "dpo":
        return
    parts = [p for p in args.train_parts.split(",") if p in BASE_PARTS]
    if args.peft == "none" or parts:
        raise ValueError(f"--objective dpo takes its reference from the trained tensors' starting values, which is "
                         f"cheap for an adapter or a state but not for base weights (--train_parts "
                         f"{','.join(parts) or args.train_parts}): train an adapter or a state only (--peft bone, lora "
                         "or state, --train_parts state), or use --objective simpo or orpo, which need no reference.")
    if args.strategy.startswith("deepspeed_stage_3"):
        raise ValueError("--objective dpo does not run under ZeRO-3 yet (the reference pass swaps the adapter's "
                         "tensors, which ZeRO-3 holds in shards): use --strategy deepspeed_stage_2 (the adapter is "
                         "small; stage 2 still shards its optimizer state and gradients).")


def preference(args):
    """(the objective from src/objectives, its keyword arguments), or (None, {}) for sft."""
    if args.objective == "sft":
        return None, {}
    from src.objectives import OBJECTIVES
    objective = OBJECTIVES[args.objective]
    beta = args.pref_beta if args.pref_beta is not None else objective.beta_default
    hyper = {"dpo": lambda: dict(beta=beta, sft_weight=args.sft_weight),
             "simpo": lambda: dict(beta=beta, gamma=beta / 2 if args.simpo_gamma is None else args.simpo_gamma),
             "orpo": lambda: dict(lam=args.orpo_lambda)}[args.objective]()
    return objective, hyper


def objective_line(args, hyper):
    """The run's first word on its objective: its hyperparameters and, for DPO, which reference it uses."""
    values = ", ".join(f"{'lambda' if k == 'lam' else k} {v:g}" for k, v in hyper.items())
    line = f"{args.objective} ({values})"
    if args.objective == "dpo":
        start = (f"the base with the adapter loaded from {args.bone_load}" if args.bone_load else
                 "the base alone (a fresh adapter or state makes no update)")
        line += (f"; the reference is the model as the run starts, {start}: the trained tensors' starting values "
                 "switched in for one more forward pass without gradients each step")
    else:
        line += "; no reference model"
    return line


def metric_names(objective, hyper):
    """The objective's metrics (log.csv's columns after the usual ones), read off one call of its loss."""
    if objective is None:
        return ()
    import torch
    from src.objectives import PairLogps
    one = torch.zeros(1)
    return tuple(objective.loss(PairLogps(one, one - 1, one + 1, one + 1, one, one), **hyper)[1])


def tokens_per_step(args):
    """Tokens a step reads: a preference item is a pair, two sequences of ctx_len."""
    pair = 2 if args.data_type == "preference" else 1
    return pair * args.ctx_len * args.micro_bsz * args.accumulate_grad_batches * args.devices * args.num_nodes


def merged_name(adapter, fmt="pth"):
    """Where the merge of an adapter goes: beside it, after it (adapter-STEP-merged.pth), as
    scripts/merge_bone.sh names it (src/training/rundir.py never takes it for an adapter)."""
    return f"{adapter.removesuffix('.pth')}-merged.{fmt}"


def resolve_accelerator(name):
    import torch
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in ("gpu", "cuda", "cpu"):
        raise ValueError(f"Unknown --accelerator {name!r}: choose gpu, cpu or auto.")
    return "gpu" if name == "cuda" else name


def check_sizes(args, config):
    for flag, value, actual in (("--n_layer", args.n_layer, config.n_layer), ("--n_embd", args.n_embd, config.n_embd),
                                ("--vocab_size", args.vocab_size, config.vocab_size)):
        if value and value != actual:
            raise ValueError(f"{flag} {value} does not match the checkpoint, which has {actual}: drop the flag, "
                             "sizes are read off the checkpoint.")


def apply_peft(model, args, bone):
    """Adapters from the first-class flags, over the older --bone_config JSON; or, with
    --peft none, only the --train_parts train."""
    parts = [p for p in args.train_parts.split(",") if p]
    if args.peft == "state":     # state tuning: no adapter layer, the states (and any other --train_parts) train
        config = {"target_modules": [], "train_parts": parts + ["state"], "load": args.bone_load}
        return bone.apply_adapters(model, bone.BoneConfig.from_dict(config))
    if args.peft == "none":
        for name, p in model.named_parameters():
            p.requires_grad_(bone.train_part_of(name) in parts)
        if not parts:
            raise ValueError("--peft none with no --train_parts leaves nothing to train.")
        return bone.print_trainable_parameters(model)
    if args.peft not in ("bone", "lora"):
        raise ValueError(f"Unknown --peft {args.peft!r}: choose bone, lora, state or none.")
    config = bone.BoneConfig.from_json(args.bone_config).to_dict() if args.bone_config else {}
    if args.peft == "lora":
        config.update(mode="lora", r=args.lora_r, lora_alpha=args.lora_alpha)
    for key, value in (("mode", args.bone_mode), ("r", args.bone_r), ("load", args.bone_load),
                       ("mini_r", args.bone_mini_r)):
        if value is not None and args.peft == "bone":
            config[key] = value
    config["train_parts"] = parts
    if args.target_modules:
        config["target_modules"] = args.target_modules.split(",")
    bone.apply_adapters(model, bone.BoneConfig.from_dict(config))
    for name, layer in bone.adapter_layers(model).items():
        if layer.mode in ("bone", "bat", "mini") and layer.r > layer.in_features:   # its blocks would be mostly padding
            raise ValueError(f"{layer.mode} r = {layer.r} is larger than the input size of {name} "
                             f"({layer.in_features}): use r = {min(64, layer.in_features)} or another r up to "
                             f"{layer.in_features}.")


ADAPTER_FLAGS = (("--bone_r", "bone_r", None), ("--bone_mode", "bone_mode", None), ("--bone_mini_r", "bone_mini_r", None),
                 ("--bone_config", "bone_config", None), ("--target_modules", "target_modules", None),
                 ("--lora_r", "lora_r", 8), ("--lora_alpha", "lora_alpha", 16.0))
LR_DEFAULTED = []   # the learning-rate flags check_state_args filled in, for the start-of-run line


def check_state_args(args):
    """--peft state takes no adapter flag; the learning rates' defaults depend on what trains: a
    state wants a step of about 1 (its values are O(1), the older repository's state tuning runs
    at 1 -> 0.01), an adapter about 2e-5."""
    parts = [p for p in args.train_parts.split(",") if p]
    if args.peft == "state":
        given = [flag for flag, name, default in ADAPTER_FLAGS if getattr(args, name) != default]
        if given:
            raise ValueError(f"--peft state trains only each layer's initial state, but {given[0]} sets up an adapter: "
                             "drop it, or use --peft bone (or lora) --train_parts state to train both.")
        if "state" in parts:
            raise ValueError("--peft state already trains the state: drop state from --train_parts.")
    if args.peft == "none" and "state" in parts:
        raise ValueError("--peft none trains base parameters, and the state is not one: use --peft state (with "
                         "--train_parts for the others).")
    alone = args.peft == "state" and not parts
    LR_DEFAULTED[:] = [f for f, v in (("--lr_init", args.lr_init), ("--lr_final", args.lr_final),
                                      ("--lr_state", args.lr_state)) if v is None]
    if args.lr_init is None:
        args.lr_init, args.lr_final = (1.0, 0.01 if args.lr_final is None else args.lr_final) if alone else (2e-5, args.lr_final)
    if args.lr_final is None:
        args.lr_final = 2e-5
    if args.lr_state is None:
        args.lr_state = args.lr_init if alone else 1.0
    if not args.lr_state > 0:
        raise ValueError(f"--lr_state {args.lr_state} must be a positive number (for example --lr_state 1).")


def lr_line(args):
    """How the state's learning rate was chosen, said at the start of the run."""
    alone = args.peft == "state" and not [p for p in args.train_parts.split(",") if p]
    if alone:
        lr = f"lr {args.lr_init:g} -> {args.lr_final:g}"
        return lr + (" (state tuning's default: a state learns at about 1, not an adapter's 2e-5)"
                     if "--lr_init" in LR_DEFAULTED else "")
    return (f"the state at lr {args.lr_state:g}, the rest at {args.lr_init:g}, on one schedule"
            + (" (--lr_state's default)" if "--lr_state" in LR_DEFAULTED else ""))


def check_quant(args):
    from src.quant import bnb_functional, check_quant as known
    if known(args.quant) != "none":
        if args.peft == "none":
            raise ValueError(f"--quant {args.quant} holds the frozen base quantized under adapters, but --peft none "
                             "trains the base weights themselves: use --peft bone (or lora), or drop --quant.")
        bnb_functional()    # bitsandbytes missing or too old: one sentence now, not after loading the model


def check_bone_load(args):
    """The adapter apply_peft will load (--bone_load, or the older JSON's bone_load) must record
    --load_model as its base (src/bone/base_hash.py), checked on the file before anything is loaded."""
    from src import bone
    if args.peft == "none":
        return
    load = args.bone_load if args.peft in ("bone", "state") and args.bone_load is not None else (
        bone.BoneConfig.from_json(args.bone_config).load if args.bone_config else None)
    if not load:
        return
    from src.checkpoint import load_checkpoint
    base_sd, config = load_checkpoint(args.load_model)
    note = bone.check_base(load, base_sd, config, args.load_model, args.allow_other_base)
    if note and os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(f"train.py: {note}", file=sys.stderr)


@contextlib.contextmanager
def run_directory(args, console=None):
    """The first process locks --proj_dir for the run and prepares it (src/training/rundir.py);
    the processes Lightning starts for the other devices find it ready (and get None)."""
    if not first_process():
        yield None
        return
    from src.training.rundir import RunDir
    run_dir = RunDir(args.proj_dir)
    run_dir.lock()
    try:
        run_dir.prepare(args.resume, args.overwrite)
        yield run_dir
    except BaseException as e:
        if console:
            console.stopped(e)
        raise
    finally:
        if console:
            console.close()     # train.log is written under the lock only
        run_dir.unlock()


def first_process():
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def start_console(argv):
    """The first process's console log (src/training/console.py: train.log once the run is accepted)."""
    if not first_process():
        return None
    from src.training.console import ConsoleLog
    return ConsoleLog(shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)]))


def describe(model, args, bone):
    meta = bone.adapter_meta(model)
    kinds = sorted({".".join(name.split(".")[2:]) for name in meta["targets"]})
    rs = sorted(set(meta["r"].values()))
    what = f"{meta['mode']} r={'/'.join(map(str, rs))} on {', '.join(kinds)}" if kinds else "no adapter"
    parts = f", training {', '.join(meta['train_parts'])}" if meta["train_parts"] else ""
    if "state" in meta["train_parts"]:     # state tuning: each layer's initial WKV state; its learning rate
        others = [p for p in meta["train_parts"] if p != "state"]
        frozen = f"every weight but {', '.join(others)} frozen" if others else "every weight frozen"
        what = what if kinds else f"state tuning (each layer's initial WKV state; {frozen})"
        parts = (f", training {', '.join(others)}" if others else "") + f"; {lr_line(args)}"
    return what + parts + (f", base held {args.quant}" if args.quant != "none" else "")


def settings(model, args, bone):
    """What the run's adapters depend on, as run.json records it for --resume to compare."""
    meta = bone.adapter_meta(model)
    found = {"base model": f"{os.path.basename(args.load_model)} ({os.path.getsize(args.load_model):,} bytes)",
             "adapter mode": meta["mode"], "r": meta["r"], "targets": meta["targets"],
             "train parts": meta["train_parts"], "lora_alpha": meta["lora_alpha"], "quant": args.quant}
    if args.objective != "sft":     # (an sft run records nothing new: its earlier resume points still match)
        found["objective"] = f"{args.objective} {preference(args)[1]}"
    return found


def check_run(run_dir, args, now, total_steps):
    """--resume: the run's recorded settings must be this command's, and it must have steps left."""
    from src.training.rundir import differences, resume_point_step
    recorded = run_dir.recorded() or {}
    if args.resume and "settings" in recorded:
        diff = differences(recorded["settings"], now)
        if diff:
            raise ValueError(f"--resume: the run in {args.proj_dir} was started with other settings ({'; '.join(diff)}): "
                             "resume with the run's own settings, or start a new run in another --proj_dir.")
        done = resume_point_step(args.proj_dir) or recorded.get("resume_step", 0)
        if done >= total_steps:
            raise ValueError(f"--resume: the run in {args.proj_dir} already finished at step {done}: to train further, "
                             f"raise --epoch_count or --max_steps beyond {done}.")
    run_dir.record(settings=now, total_steps=total_steps)


def record_run(run_dir, args, config, dataset, val_dataset, total_steps, precision, accelerator):
    """run.json's record of the rest: every option of this command, and what the run made of
    them (steps, the model's sizes, the data, versions). --resume may change options other than
    the settings check_run compares (the learning rate, the step count...): it says which."""
    import dataclasses
    import platform
    from importlib import metadata
    from src.training.rundir import differences, resume_point_step

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    arguments = vars(args)
    before = (run_dir.recorded() or {}).get("arguments")
    if args.resume and before:
        ignore = ("resume", "overwrite")
        changed = differences({k: v for k, v in before.items() if k not in ignore},
                              {k: v for k, v in arguments.items() if k not in ignore})
        if changed:
            print(f"--resume: options changed since the run's last command: {'; '.join(changed)}", flush=True)
    world = args.devices * args.num_nodes
    resolved = {"total_steps": total_steps,
                "tokens_per_step": tokens_per_step(args),
                "world_size": world, "accelerator": accelerator, "precision": precision,
                "model": {"file": os.path.abspath(args.load_model), "bytes": os.path.getsize(args.load_model),
                          "family": config.family, **dataclasses.asdict(config)},
                "data": data_facts(dataset, args.data_file, args.data_type),
                "validation": data_facts(val_dataset, args.val_data or args.data_file, args.data_type),
                "versions": {"python": platform.python_version(), **{name: version(name) for name in (
                    "torch", "deepspeed", "pytorch-lightning", "numpy")}}}
    run_dir.record(arguments=arguments, resolved=resolved)


def data_facts(dataset, path, data_type):
    """A dataset (the part this run reads) as run.json records it: file, type, documents, tokens."""
    if dataset is None:
        return None
    if hasattr(dataset, "docs"):        # sft_padded: the documents themselves
        documents, tokens = len(dataset.docs), sum(len(d) for d in dataset.docs)
    elif hasattr(dataset.tokens, "sizes"):      # binidx less the held-out documents
        documents, tokens = len(dataset.tokens.sizes), len(dataset.tokens)
    else:
        # The windows' token stream keeps no document bounds: the summary (after the path) counts them.
        import re
        text = dataset.summary.removeprefix(f"{data_type} {path}: ")
        found = re.match(r"([\d,]+) (?:SFT )?documents(?:, (all but )?the ([\d,]+) held out)?", text)
        n = [int(g.replace(",", "")) if g else None for g in found.group(1, 3)] if found else [None, None]
        documents = n[0] if n[1] is None else n[0] - n[1] if found.group(2) else n[1]
        tokens = len(dataset.tokens)
    return {"file": os.path.abspath(path), "type": data_type, "documents": documents, "tokens": int(tokens),
            "summary": dataset.summary}


def check_logger(name, proj_dir=None):
    """--logger names one we know, its package is installed, and tensorboard's folder in proj_dir
    can be written (one sentence otherwise; nothing is made here)."""
    import importlib.util
    if name not in ("csv", "tensorboard", "wandb"):
        raise ValueError(f"Unknown --logger {name!r}: choose csv, tensorboard or wandb.")
    if name != "csv" and importlib.util.find_spec(name) is None:
        raise ValueError(f"--logger {name} needs the {name} package, which is not installed: "
                         f"pip install {name}, or use --logger csv.")
    events = os.path.join(proj_dir, "tensorboard") if proj_dir and name == "tensorboard" else None
    if events and os.path.lexists(events) and not (os.path.isdir(events) and os.access(events, os.W_OK | os.X_OK)):
        raise ValueError(f"--logger tensorboard writes into {events}, which is not a writable directory: move what is "
                         "there away, or use --logger csv.")
    return name


def make_logger(name, proj_dir):
    """--logger: csv is log.csv and loss.png alone (TrainLog writes those in every case);
    tensorboard and wandb also receive every logged value, through Lightning's loggers."""
    if check_logger(name) == "csv":
        return False
    from pytorch_lightning import loggers
    if name == "tensorboard":    # one folder, so a resumed run's events join the killed run's
        return loggers.TensorBoardLogger(proj_dir, name="tensorboard", version="", default_hp_metric=False)
    return loggers.WandbLogger(save_dir=proj_dir, project=os.environ.get("WANDB_PROJECT", "rwkv-bone"),
                               offline=os.environ.get("WANDB_MODE") in ("offline", "dryrun"))


def resume_point(args):
    from src.training.rundir import check_resume_point
    for name in ("resume", "resume.old"):  # .old survives a crash between the two renames of a save
        path = os.path.join(args.proj_dir, name)
        if os.path.exists(path):
            check_resume_point(path)
            return path
    raise FileNotFoundError(f"--resume: {args.proj_dir} has no resume point; start without --resume.")


if __name__ == "__main__":
    main()

"""Validation: the mean loss of the model being trained on a fixed set of held-out windows (the
same ones every time), every --val_every steps and at the end. Each process computes the loss
sum over its share of the windows; the sums are reduced, so the mean is the whole set's.
For a preference objective the windows are pairs: the objective's mean loss over them, and the
held-out preference accuracy, the fraction of pairs whose chosen reply has the higher summed
log-prob (the same measure whatever the objective, and for the base model)."""
import sys

import pytorch_lightning as pl
import torch

from ..data import data_options, make_dataset
from .callbacks import optimizer_stepped
from .loss import lm_loss


def check_args(args):
    """The validation flags, before any work."""
    if args.val_data and args.val_split:
        raise ValueError("--val_data and --val_split both name validation data: give one of them.")
    if args.val_every and not (args.val_data or args.val_split):
        raise ValueError("--val_every needs validation data: add --val_data FILE or --val_split FRACTION.")
    if not 0 <= args.val_split < 1:
        raise ValueError(f"--val_split {args.val_split} is not a fraction of the documents: give a value between 0 and 1.")
    if args.val_every < 0:
        raise ValueError(f"--val_every {args.val_every} is negative: give a step count, or 0 for every epoch.")
    if args.val_tokens < args.ctx_len:
        raise ValueError(f"--val_tokens {args.val_tokens} is less than one window of --ctx_len {args.ctx_len} tokens.")


def validation_dataset(args, vocab_size):
    """The held-out data: --val_data, or under --val_split --data_file's held-out documents
    (the training dataset is built with the same val_split and leaves them out); None without either."""
    if not (args.val_data or args.val_split):
        return None
    fields = data_options(args)
    if args.val_split:
        return make_dataset(args.data_file, args.data_type, args.ctx_len, vocab_size, args.seed, **fields,
                            val_split=args.val_split, part="val")
    return make_dataset(args.val_data, args.data_type, args.ctx_len, vocab_size, args.seed, **fields)


def window_count(dataset, val_tokens, ctx_len, world_size):
    """How many of the dataset's first samples make the validation set: the --val_tokens budget
    in windows, no more than the data holds, a multiple of the process count (equal shares, so
    that every process runs as many forward passes: ZeRO-3 gathers weights collectively)."""
    n = min(val_tokens // ctx_len, len(dataset))
    return max(world_size, n // world_size * world_size)


class Validation(pl.Callback):
    def __init__(self, dataset, n_windows, every, micro_bsz, chunk_ctx=0):
        self.dataset, self.n_windows, self.every = dataset, n_windows, every
        self.micro_bsz, self.chunk_ctx = micro_bsz, chunk_ctx
        self.losses = {}    # step -> validation loss (TrainLog writes them to log.csv and loss.png)
        self.accuracies = {}    # step -> held-out preference accuracy (preference objectives only)

    def on_train_start(self, trainer, pl_module):
        # A preference run's accuracy means most beside the starting model's (for DPO: the reference).
        self.start = None
        if pl_module.objective is not None and trainer.global_step == 0:
            self.start = self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not optimizer_stepped(trainer, batch_idx):
            return
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            if trainer.is_global_zero:     # (a long pass on a big model should not look like a hang)
                from tqdm import tqdm
                what = "windows" if pl_module.objective is None else "pairs"
                tqdm.write(f"validation at step {step} on {self.n_windows} {what}", file=sys.stdout)
                sys.stdout.flush()
            self.losses[step], accuracy = self.evaluate(trainer, pl_module)
            pl_module.log("val_loss", self.losses[step], prog_bar=True, on_step=True, rank_zero_only=True)
            if accuracy is not None:
                self.accuracies[step] = accuracy
                pl_module.log("val_accuracy", accuracy, on_step=True, rank_zero_only=True)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module):
        """(loss, accuracy): sums over this process's windows, reduced over processes. Language
        modelling: the token mean of the loss over the whole validation set, accuracy None. A
        preference objective: the pair mean of its loss, and the held-out preference accuracy."""
        model, device = pl_module.model, pl_module.device
        training = model.training
        model.eval()
        total = torch.zeros(3, dtype=torch.float64, device=device)    # loss sum, count, pairs preferred
        mine = list(range(trainer.global_rank, self.n_windows, trainer.world_size))
        with trainer.precision_plugin.forward_context():
            for b in range(0, len(mine), self.micro_bsz):
                items = [self.dataset[i] for i in mine[b:b + self.micro_bsz]]
                idx, targets, mask = (torch.stack(t).to(device) for t in zip(*items))
                if pl_module.objective is None:
                    count = mask.sum()
                    loss = lm_loss(model, idx, targets, mask, self.chunk_ctx)   # the mean over this batch's count
                    total += torch.stack([loss.double() * count, count.double(), count.new_zeros((), dtype=torch.float64)])
                else:
                    pair = pl_module.pair_logps(idx, targets, mask, reference=pl_module.objective.needs_reference)
                    loss, _ = pl_module.objective.loss(pair, **pl_module.hyper)     # the mean over the pairs
                    n = pair.chosen.numel()
                    total += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=device),
                                          (pair.chosen > pair.rejected).sum().double()])
        model.train(training)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        loss = (total[0] / total[1].clamp(min=1)).item()
        return loss, None if pl_module.objective is None else (total[2] / total[1].clamp(min=1)).item()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.losses:
            last, best = max(self.losses), min(self.losses, key=self.losses.get)
            what = "pairs" if self.accuracies else "windows"
            print(f"validation loss on {self.n_windows} {what}: {self.losses[last]:.4f} at step {last} "
                  f"(first {self.losses[min(self.losses)]:.4f} at step {min(self.losses)}, "
                  f"best {self.losses[best]:.4f} at step {best})")
            if self.accuracies:
                first = min(self.accuracies)
                print(f"held-out preference accuracy (chosen reply's logp above the rejected one's): "
                      f"{self.accuracies[last]:.3f} at step {last} (first {self.accuracies[first]:.3f} at step {first}"
                      + (f", the starting model {self.start[1]:.3f}" if self.start else "") + ")")

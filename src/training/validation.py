"""Validation: the mean loss of the model being trained on a fixed set of held-out windows (the
same ones every time), every --val_every steps and at the end. Each process computes the loss
sum over its share of the windows; the sums are reduced, so the mean is the whole set's."""
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not optimizer_stepped(trainer, batch_idx):
            return
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            self.losses[step] = self.evaluate(trainer, pl_module)
            pl_module.log("val_loss", self.losses[step], prog_bar=True, on_step=True, rank_zero_only=True)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module):
        """Sum of the loss over every unmasked target of this process's windows, and their
        count; reduced over processes: the token mean over the whole validation set."""
        model, device = pl_module.model, pl_module.device
        training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        mine = list(range(trainer.global_rank, self.n_windows, trainer.world_size))
        with trainer.precision_plugin.forward_context():
            for b in range(0, len(mine), self.micro_bsz):
                items = [self.dataset[i] for i in mine[b:b + self.micro_bsz]]
                idx, targets, mask = (torch.stack(t).to(device) for t in zip(*items))
                count = mask.sum()
                loss = lm_loss(model, idx, targets, mask, self.chunk_ctx)   # the mean over this batch's count
                total += torch.stack([loss.double() * count, count.double()])
        model.train(training)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        return (total[0] / total[1].clamp(min=1)).item()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.losses:
            last, best = max(self.losses), min(self.losses, key=self.losses.get)
            print(f"validation loss on {self.n_windows} windows: {self.losses[last]:.4f} at step {last} "
                  f"(first {self.losses[min(self.losses)]:.4f} at step {min(self.losses)}, "
                  f"best {self.losses[best]:.4f} at step {best})")

"""Callbacks: the learning rate per step, what the user sees and keeps (progress bar, CSV log,
loss plot), adapter checkpoints and the resume point, and the quantized base."""
import contextlib
import csv
import glob
import io
import os
import shutil
import time

import pytorch_lightning as pl
import torch

from ..checkpoint import atomic_write
from .schedule import learning_rate

LOG_FIELDS = ("step", "loss", "lr", "tokens_per_s", "val_loss")


def optimizer_stepped(trainer, batch_idx):
    """True in on_train_batch_end when this micro-batch completed an optimizer step."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class QuantizeBase(pl.Callback):
    """train.py --quant: hold the frozen base quantized (src/quant.py), made on each process's own
    device once the strategy knows it and before the model is moved there, so no accelerator
    ever holds the base in full precision."""

    def __init__(self, quant):
        self.quant = quant

    def setup(self, trainer, pl_module, stage):
        from ..quant import quantize_model
        quantize_model(pl_module.model, self.quant, device=trainer.strategy.root_device)


class LearningRateSchedule(pl.Callback):
    def __init__(self, total_steps, lr_init, lr_final, warmup_steps, schedule):
        self.kwargs = dict(total_steps=total_steps, lr_init=lr_init, lr_final=lr_final,
                           warmup_steps=warmup_steps, schedule=schedule)
        self.lr = lr_init

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = learning_rate(trainer.global_step, **self.kwargs)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr


class TrainLog(pl.Callback):
    """Loss, lr and thousands of tokens/s on the progress bar; a CSV row per step (proj_dir/log.csv);
    the loss curve as proj_dir/loss.png at the end of each epoch. Both files written atomically."""

    def __init__(self, proj_dir, schedule, tokens_per_step, epoch_steps, write_every=10, val_losses=None):
        self.val_losses = {} if val_losses is None else val_losses   # step -> loss, filled by Validation
        self.csv_path = os.path.join(proj_dir, "log.csv")
        self.png_path = os.path.join(proj_dir, "loss.png")
        self.schedule, self.tokens_per_step = schedule, tokens_per_step
        self.epoch_steps, self.write_every = epoch_steps, write_every
        self.rows, self.step_losses = [], []

    def on_train_start(self, trainer, pl_module):
        # A resumed run keeps the log of the steps before its resume point and rewrites the rest.
        if os.path.exists(self.csv_path):
            with open(self.csv_path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.global_step]
        self.last_time = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_losses.append(outputs["loss"].detach().float())
        if not optimizer_stepped(trainer, batch_idx):
            return
        loss = trainer.strategy.reduce(torch.stack(self.step_losses).mean(), reduce_op="mean").item()
        self.step_losses = []
        now = time.perf_counter()
        tokens_per_s = self.tokens_per_step / (now - self.last_time)
        self.last_time = now
        pl_module.log_dict({"loss": loss, "lr": self.schedule.lr, "kt/s": tokens_per_s / 1000},
                           prog_bar=True, on_step=True, rank_zero_only=True)
        step = trainer.global_step
        pl_module.log("step", float(step), on_step=True, rank_zero_only=True)   # the loggers' x axis: log.csv's step
        self.rows.append({"step": step, "loss": f"{loss:.6f}", "lr": f"{self.schedule.lr:.6e}",
                          "tokens_per_s": f"{tokens_per_s:.1f}",
                          "val_loss": f"{self.val_losses[step]:.6f}" if step in self.val_losses else ""})
        if trainer.is_global_zero and step % self.write_every == 0:
            self.write_csv()
        if trainer.is_global_zero and step % self.epoch_steps == 0:
            self.write_csv()
            self.plot()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.write_csv()
            self.plot()

    def write_csv(self):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.csv_path, lambda f: f.write(text.getvalue().encode()))

    def plot(self):
        if not self.rows:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot([int(r["step"]) for r in self.rows], [float(r["loss"]) for r in self.rows], lw=1, label="training")
        val = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r.get("val_loss")]
        if val:
            ax.plot(*zip(*val), "o-", lw=1, ms=3, label="validation")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        atomic_write(self.png_path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)


class Checkpointer(pl.Callback):
    """Every `save_every_steps` steps, at each epoch end and at the end of training: an adapter
    file proj_dir/adapter-STEP.pth (the last `keep_last` are kept) and the resume point
    proj_dir/resume (adapter, optimizer state, step; the data position follows from the step)."""

    def __init__(self, proj_dir, save_adapter, save_every_steps, epoch_steps, epoch_save, keep_last):
        self.proj_dir, self.save_adapter = proj_dir, save_adapter
        self.save_every_steps, self.epoch_steps = save_every_steps, epoch_steps
        self.epoch_save, self.keep_last = epoch_save, keep_last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not optimizer_stepped(trainer, batch_idx):
            return
        step = trainer.global_step
        epoch_end = step % self.epoch_steps == 0 and self.epoch_save > 0 and (step // self.epoch_steps) % self.epoch_save == 0
        if (self.save_every_steps and step % self.save_every_steps == 0) or epoch_end or step == trainer.max_steps:
            self.save(trainer, pl_module, step)

    def save(self, trainer, pl_module, step):
        model = pl_module.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        with gathered(trainable):  # under ZeRO-3 each process holds a shard: gather the full tensors
            if trainer.is_global_zero:
                self.save_adapter(model, os.path.join(self.proj_dir, f"adapter-{step:07d}.pth"))
                for old in sorted(glob.glob(os.path.join(self.proj_dir, "adapter-*.pth")))[:-self.keep_last]:
                    os.remove(old)
        # Every process writes its shard of the resume point into a fresh folder; the swap is atomic.
        tmp, final = os.path.join(self.proj_dir, ".resume-tmp"), os.path.join(self.proj_dir, "resume")
        if trainer.is_global_zero and os.path.exists(tmp):
            shutil.rmtree(tmp)
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            old = final + ".old"
            if os.path.exists(final):
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier()


def gathered(params):
    """DeepSpeed ZeRO-3 parameters gathered to full tensors for the duration of the block."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()

"""Callbacks: the learning rate per step, what the user sees and keeps (progress bar, CSV log,
loss plot), adapter checkpoints and the resume point, and the quantized base."""
import contextlib
import csv
import errno
import io
import os
import shutil
import time

import pytorch_lightning as pl
import torch

from ..checkpoint import atomic_write
from .rundir import run_adapters
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
                group["lr"] = self.lr * group.get("lr_scale", 1.0)    # the initial states' group has its own


class TrainLog(pl.Callback):
    """The progress line (epoch, step of all steps, loss, lr, tokens/s), a CSV row per step
    (proj_dir/log.csv, rewritten atomically after every step, so an interrupted run's log holds
    every step up to its resume point) and the loss and learning-rate curves (proj_dir/loss.png:
    loss_figure) at each epoch end."""

    def __init__(self, proj_dir, schedule, tokens_per_step, epoch_steps, total_steps, epoch_offset=0, val_losses=None,
                 metrics=(), val_accuracies=None):
        self.val_losses = {} if val_losses is None else val_losses   # step -> loss, filled by Validation
        # a preference objective's metrics (TRL's names: rewards/accuracies...), each a column after LOG_FIELDS,
        # then the held-out preference accuracy (Validation fills it)
        self.val_accuracies = {} if val_accuracies is None else val_accuracies
        self.metrics = tuple(metrics)
        self.fields = LOG_FIELDS + self.metrics + (("val_accuracy",) if self.metrics else ())
        self.step_metrics = []
        self.csv_path = os.path.join(proj_dir, "log.csv")
        self.png_path = os.path.join(proj_dir, "loss.png")
        self.schedule, self.tokens_per_step = schedule, tokens_per_step
        self.epoch_steps, self.total_steps, self.epoch_offset = epoch_steps, total_steps, epoch_offset
        self.rows, self.step_losses, self.bar = [], [], None

    def on_train_start(self, trainer, pl_module):
        # A resumed run keeps the log of the steps before its resume point and rewrites the rest.
        if os.path.exists(self.csv_path):
            with open(self.csv_path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.global_step]
        self.last_time = time.perf_counter()
        if trainer.is_global_zero:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total_steps, initial=trainer.global_step, unit="step", dynamic_ncols=True,
                            desc=self.epoch_label(trainer.global_step))

    def epoch_label(self, step):
        epochs = -(-self.total_steps // self.epoch_steps)
        return f"epoch {self.epoch_offset + min(step // self.epoch_steps, epochs - 1) + 1}/{self.epoch_offset + epochs}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_losses.append(outputs["loss"].detach().float())
        if self.metrics:
            self.step_metrics.append(torch.stack([outputs[k].detach().float() for k in self.metrics]))
        if not optimizer_stepped(trainer, batch_idx):
            return
        loss = trainer.strategy.reduce(torch.stack(self.step_losses).mean(), reduce_op="mean").item()
        self.step_losses = []
        metrics = {}
        if self.metrics:    # each the mean over the step's micro-batches and the processes
            values = trainer.strategy.reduce(torch.stack(self.step_metrics).mean(0), reduce_op="mean").tolist()
            metrics, self.step_metrics = dict(zip(self.metrics, values)), []
        now = time.perf_counter()
        tokens_per_s = self.tokens_per_step / (now - self.last_time)
        self.last_time = now
        step = trainer.global_step
        pl_module.log_dict({"loss": loss, "lr": self.schedule.lr, "tokens_per_s": tokens_per_s, **metrics},
                           on_step=True, rank_zero_only=True)      # for --logger tensorboard / wandb
        pl_module.log("step", float(step), on_step=True, rank_zero_only=True)   # the loggers' x axis: log.csv's step
        self.rows.append({"step": step, "loss": f"{loss:.6f}", "lr": f"{self.schedule.lr:.6e}",
                          "tokens_per_s": f"{tokens_per_s:.1f}",
                          "val_loss": f"{self.val_losses[step]:.6f}" if step in self.val_losses else "",
                          **{k: f"{v:.6f}" for k, v in metrics.items()},
                          **({"val_accuracy": f"{self.val_accuracies[step]:.6f}" if step in self.val_accuracies else ""}
                             if self.metrics else {})})
        if not trainer.is_global_zero:
            return
        last_val = self.val_losses[max(self.val_losses)] if self.val_losses else None
        self.bar.set_description(self.epoch_label(step - 1), refresh=False)
        pref = "".join(f", {name} {metrics[key]:#.3g}" for key, name in (("rewards/accuracies", "acc"),
                                                                          ("rewards/margins", "margin")) if key in metrics)
        if self.val_accuracies:
            pref += f", val_acc {self.val_accuracies[max(self.val_accuracies)]:#.3g}"
        self.bar.set_postfix_str(f"loss {loss:#.4g}" + pref + (f", val_loss {last_val:#.4g}" if last_val is not None else "")
                                 + f", lr {self.schedule.lr:.3g}, {readable_rate(tokens_per_s)}", refresh=False)
        self.bar.update(1)
        self.write_csv()
        if step % self.epoch_steps == 0:
            self.plot()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.bar.close()
            self.write_csv()
            self.plot()

    def on_exception(self, trainer, pl_module, exception):
        if self.bar is not None:
            self.bar.close()

    def write_csv(self):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.csv_path, lambda f: f.write(text.getvalue().encode()))

    def plot(self):
        if not self.rows:
            return
        import matplotlib.pyplot as plt
        fig = loss_figure(self.rows)
        atomic_write(self.png_path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)


def loss_figure(rows):
    """loss.png's figure from log.csv's rows: the training (and validation) loss, and the learning
    rate on a second y axis, so a loss that jumps can be read against the schedule; for a
    preference objective a second panel beneath: the reward accuracy (each step's, and its mean
    over the last 10 steps) and the held-out preference accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    preference = "rewards/accuracies" in rows[0]
    if preference:
        fig, (ax, acc) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [int(r["step"]) for r in rows]
    lines = ax.plot(steps, [float(r["loss"]) for r in rows], lw=1, label="training loss")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if val:
        lines += ax.plot(*zip(*val), "o-", lw=1, ms=3, label="validation loss")
    lr = ax.twinx()
    lines += lr.plot(steps, [float(r["lr"]) for r in rows], "--", color="tab:green", lw=1, label="learning rate")
    lr.set_ylabel("learning rate")
    lr.set_ylim(bottom=0)
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss and learning rate")
    ax.grid(alpha=0.3)
    if preference:
        reward = [float(r["rewards/accuracies"]) for r in rows]
        mean = [sum(reward[max(0, i - 9):i + 1]) / len(reward[max(0, i - 9):i + 1]) for i in range(len(reward))]
        acc.plot(steps, reward, ".", ms=2, color="tab:blue", alpha=0.4, label="reward accuracy (each step)")
        acc.plot(steps, mean, lw=1, color="tab:blue", label="reward accuracy (last 10 steps)")
        held = [(int(r["step"]), float(r["val_accuracy"])) for r in rows if r.get("val_accuracy")]
        if held:
            acc.plot(*zip(*held), "o-", lw=1, ms=3, color="tab:orange", label="held-out preference accuracy")
        acc.set_ylim(-0.02, 1.02)
        acc.set_xlabel("step")
        acc.set_ylabel("accuracy")
        acc.legend(loc="lower right")
        acc.grid(alpha=0.3)
        ax.set_xlabel("")
    fig.tight_layout()
    return fig


def readable_rate(tokens_per_s):
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= size:
            return f"{tokens_per_s / size:.3g}{unit} tokens/s"
    return f"{tokens_per_s:.3g} tokens/s"


class Checkpointer(pl.Callback):
    """Every `save_every_steps` steps, at each epoch end and at the end of training: an adapter
    file proj_dir/adapter-STEP.pth (the last `keep_last` are kept; 0 keeps all) and the resume
    point proj_dir/resume (adapter, optimizer state, step; the data position follows from the
    step). Also the resume point alone every `save_every_minutes`, and on Ctrl-C."""

    def __init__(self, proj_dir, save_adapter, save_every_steps, epoch_steps, epoch_save, keep_last,
                 save_every_minutes=0, on_saved=None):
        self.proj_dir, self.save_adapter = proj_dir, save_adapter
        self.save_every_steps, self.epoch_steps = save_every_steps, epoch_steps
        self.epoch_save, self.keep_last = epoch_save, keep_last
        self.save_every_s, self.on_saved = save_every_minutes * 60, on_saved
        self.last_save = time.monotonic()
        self.last_adapter = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not optimizer_stepped(trainer, batch_idx):
            return
        step = trainer.global_step
        epoch_end = step % self.epoch_steps == 0 and self.epoch_save > 0 and (step // self.epoch_steps) % self.epoch_save == 0
        if (self.save_every_steps and step % self.save_every_steps == 0) or epoch_end or step == trainer.max_steps:
            self.save(trainer, pl_module, step)
        elif self.save_every_s:
            # Every process must agree on a save (it has barriers): the first one's clock decides.
            due = trainer.strategy.broadcast(time.monotonic() - self.last_save >= self.save_every_s, src=0)
            if due:
                self.save_resume_point(trainer, step)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0:
            step = trainer.global_step
            self.save_resume_point(trainer, step)
            if trainer.is_global_zero:
                print(f"\ninterrupted: the resume point in {self.proj_dir} holds step {step}; continue with the same "
                      "command and --resume.", flush=True)

    def save(self, trainer, pl_module, step):
        model = pl_module.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        with gathered(trainable):  # under ZeRO-3 each process holds a shard: gather the full tensors
            if trainer.is_global_zero:
                self.last_adapter = os.path.join(self.proj_dir, f"adapter-{step:07d}.pth")
                self.save_adapter(model, self.last_adapter)
                if self.keep_last:
                    for old in run_adapters(self.proj_dir)[:-self.keep_last]:
                        os.remove(old)
        self.save_resume_point(trainer, step)

    def save_resume_point(self, trainer, step):
        # Every process writes its shard of the resume point into a fresh folder; the swap is atomic.
        tmp, final = os.path.join(self.proj_dir, ".resume-tmp"), os.path.join(self.proj_dir, "resume")
        if trainer.is_global_zero and os.path.exists(tmp):
            shutil.rmtree(tmp)
        trainer.strategy.barrier()
        try:
            trainer.save_checkpoint(tmp)
        except BaseException as e:
            # Nothing partial stays behind (a full disk, a kill); the last complete resume point is kept.
            shutil.rmtree(tmp, ignore_errors=True)
            if disk_full(e, self.proj_dir):
                raise OSError(errno.ENOSPC, "No space left on device", self.proj_dir) from None
            raise
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            old = final + ".old"
            if os.path.exists(final):
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            if self.on_saved:
                self.on_saved(step)
        self.last_save = time.monotonic()
        trainer.strategy.barrier()


def disk_full(error, directory, margin=1 << 20):
    """A write failed for want of space: ENOSPC, or torch's zip writer failing (it does not say
    why) on a disk with less than `margin` bytes left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    writer = any(text in str(error) for text in ("unexpected pos", "PytorchStreamWriter", "file write failed"))
    return isinstance(error, RuntimeError) and writer and shutil.disk_usage(directory).free < margin


def gathered(params):
    """DeepSpeed ZeRO-3 parameters gathered to full tensors for the duration of the block."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()

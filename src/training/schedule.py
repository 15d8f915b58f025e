"""Learning rate: linear warmup from lr_init/100 (as RWKV-LM), then constant, exponential or cosine decay to lr_final."""
import math

SCHEDULES = ("constant", "exponential", "cosine")


def learning_rate(step, total_steps, lr_init, lr_final, warmup_steps=0, schedule="cosine"):
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown --lr_schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}.")
    if step < warmup_steps:
        return lr_init * (0.01 + 0.99 * step / warmup_steps)
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr_init
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "exponential":
        return lr_init * (lr_final / lr_init) ** progress
    return lr_final + 0.5 * (lr_init - lr_final) * (1 + math.cos(math.pi * progress))

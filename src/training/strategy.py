"""DeepSpeed ZeRO through Lightning, on GPUs and, for tests and small runs, on the CPU."""
import torch
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy

STRATEGIES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload", "ddp", "auto")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy refuses a CPU accelerator and hands DeepSpeed a CUDA
    device index. DeepSpeed itself runs ZeRO 1-3 on the CPU (DS_ACCELERATOR=cpu, gloo), so
    skip those CUDA-only checks and give it the local rank as the device index."""

    def setup_environment(self):
        DDPStrategy.setup_environment(self)   # skips DeepSpeedStrategy's "CUDA GPUs only" check

    def setup_distributed(self):
        # DeepSpeedStrategy's version first validates CUDA device indices.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self):
        return torch.device("cpu", self.local_rank)


def make_strategy(name, accelerator):
    """A Lightning strategy (object or name) from one of STRATEGIES."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown --strategy {name!r}: choose one of {', '.join(STRATEGIES)}.")
    if not name.startswith("deepspeed"):
        return name
    stage = int(name.split("_")[2])
    offload = name.endswith("_offload")
    cls = CPUDeepSpeedStrategy if accelerator == "cpu" else DeepSpeedStrategy
    # Resume points hold the trainable weights and optimizer state, not a copy of the frozen base.
    return cls(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
               exclude_frozen_parameters=True, process_group_backend="gloo" if accelerator == "cpu" else None)

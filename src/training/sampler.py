"""Which samples each process reads at each step: a pure function of the step, so a resumed
run continues exactly where the killed one stopped, and processes never read the same sample."""
import torch


class StepSampler(torch.utils.data.Sampler):
    """Yields dataset indices for micro-batches first_batch() .. end_batch - 1 of this process.

    Micro-batch b of process `rank` (of `world_size`) holds global samples
    (b * world_size + rank) * micro_bsz + i for i < micro_bsz; the datasets map a global
    sample index to a sample deterministically, so the sample stream does not depend on
    how many times the run was stopped and resumed. `first_batch` is a function read each
    time iteration starts (the trainer's current step): Lightning may iterate a sampler
    again after a mid-epoch resume, and it must go on from where training is, not restart.
    """

    def __init__(self, first_batch, end_batch, micro_bsz, rank=0, world_size=1):
        self.first_batch, self.end_batch = first_batch, end_batch
        self.micro_bsz, self.rank, self.world_size = micro_bsz, rank, world_size

    def __iter__(self):
        for b in range(self.first_batch(), self.end_batch):
            first = (b * self.world_size + self.rank) * self.micro_bsz
            yield from range(first, first + self.micro_bsz)

    def __len__(self):
        return max(0, self.end_batch - self.first_batch()) * self.micro_bsz

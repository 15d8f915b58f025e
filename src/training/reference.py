"""DPO's reference model without a second copy of the base: the network being trained with its trained
tensors (an adapter, a state: small) set back to their values at the run's start, for one extra forward
pass without gradients in each step. For a fresh adapter those values make no update (Bone's, Bat's and
LoRA's B start at zero, a state at zero): the reference is the base; after --bone_load, the base plus
the loaded adapter, as DPO after an SFT run wants. HF TRL does the same for PEFT models."""
import contextlib

import torch


class StartingValues:
    """Copies of the trained tensors as the run starts (made before any resume point is restored, so a
    resumed run keeps its first reference), switched in and out of the model by their storage."""

    def __init__(self, model):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def switched_in(self, model):
        params, now = dict(model.named_parameters()), {}
        try:
            with torch.no_grad():
                for name, start in self.start.items():
                    p = params[name]
                    if (start.device, start.dtype) != (p.device, p.dtype):   # moved or cast by the strategy since
                        self.start[name] = start = start.to(p.device, p.dtype)
                    now[name], p.data = p.data, start
                yield
        finally:
            for name, data in now.items():
                params[name].data = data

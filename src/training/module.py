"""The LightningModule: an (adapted) RWKV model (RWKV-6 or RWKV-7), its loss and its optimizer."""
import pytorch_lightning as pl
import torch

from .loss import lm_loss, reference_pair_logps, sequence_logps


class RWKVLightning(pl.LightningModule):
    def __init__(self, model, lr_init, betas=(0.9, 0.99), adam_eps=1e-8, weight_decay=0.0, cpu_adam=False, chunk_ctx=0,
                 state_lr_scale=1.0, objective=None, hyper=None):
        super().__init__()
        self.model = model
        self.lr_init, self.betas, self.adam_eps = lr_init, betas, adam_eps
        self.weight_decay = weight_decay
        self.cpu_adam = cpu_adam      # DeepSpeed's CPU Adam, which optimizer offload requires
        self.chunk_ctx = chunk_ctx    # > 0: run each sample this many tokens at a time (exact gradients)
        self.state_lr_scale = state_lr_scale    # the initial states' lr over the rest's (--lr_state / --lr_init)
        self.strict_loading = False   # resume points leave the frozen base out
        # A preference objective (src/objectives; None: the language-model loss), its hyperparameters, and for
        # DPO the trained tensors' starting values, the reference (src/training/reference.py)
        self.objective, self.hyper = objective, hyper or {}
        if objective is not None and objective.needs_reference:
            from .reference import StartingValues
            self.reference = StartingValues(model)

    def on_save_checkpoint(self, checkpoint):
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def training_step(self, batch, batch_idx):
        idx, targets, mask = batch
        if self.objective is None:
            return lm_loss(self.model, idx, targets, mask, self.chunk_ctx)
        loss, metrics = self.preference_loss(idx, targets, mask)
        return {"loss": loss, **metrics}

    def pair_logps(self, idx, targets, mask, reference=False):
        """PairLogps of a batch of pairs ([B, 2, T]: chosen, rejected): the summed log-probs of the learnt
        reply tokens; the reference's too when the objective needs it (one more pass, without gradients)."""
        from ..objectives import PairLogps
        rows = [t.flatten(0, 1) for t in (idx, targets, mask)]      # [2B, T]: chosen, rejected, chosen, ...
        ref = (None, None)
        if reference:   # first: its temporaries are gone before the trained pass holds its activations
            with torch.no_grad(), self.reference.switched_in(self.model):
                ref = reference_pair_logps(self.model, *rows, self.chunk_ctx).view(-1, 2).unbind(1)
        logps = sequence_logps(self.model, *rows, self.chunk_ctx).view(-1, 2)
        counts = mask.sum(-1)
        return PairLogps(logps[:, 0], logps[:, 1], counts[:, 0], counts[:, 1], *ref)

    def preference_loss(self, idx, targets, mask):
        pair = self.pair_logps(idx, targets, mask, reference=self.objective.needs_reference)
        return self.objective.loss(pair, **self.hyper)

    def configure_optimizers(self):
        # Weight decay pulls matrices (adapters start at zero: towards the base model); never
        # decay vectors such as LayerNorm weights or time-mix parameters.
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("Nothing to train: the adapter config selects no parameter.")
        # The trained initial states (state tuning) learn at their own rate, and never decay.
        states = [p for n, p in named if n.endswith(".att.time_state")]
        trainable = [p for n, p in named if not n.endswith(".att.time_state")]
        matrices = [p for p in trainable if p.dim() >= 2 and self.weight_decay > 0]
        others = [p for p in trainable if not (p.dim() >= 2 and self.weight_decay > 0)]
        groups = [g for g in ({"params": matrices, "weight_decay": self.weight_decay},
                              {"params": others, "weight_decay": 0.0},
                              {"params": states, "weight_decay": 0.0, "lr_scale": self.state_lr_scale}) if g["params"]]
        for g in groups:
            g["lr"] = self.lr_init * g.get("lr_scale", 1.0)
        if self.cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, lr=self.lr_init, betas=self.betas, eps=self.adam_eps, adamw_mode=True)
        return torch.optim.AdamW(groups, lr=self.lr_init, betas=self.betas, eps=self.adam_eps)

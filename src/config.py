"""The RWKV-6 (x060) checkpoint layout: sizes read off the weights, and the checks that
refuse anything else with one clear sentence. The one home for key names and shapes."""
from collections import OrderedDict
from dataclasses import asdict, dataclass


class CheckpointError(ValueError):
    """A file that is not a usable RWKV-6 (x060) checkpoint; the message says why."""


@dataclass(frozen=True)
class RWKV6Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    dim_att: int
    dim_ffn: int
    head_size: int
    mix_lora: int = 32      # time_maa_w1 is [n_embd, 5 * mix_lora]; larger in 7B/14B files
    decay_lora: int = 64    # time_decay_w1 is [n_embd, decay_lora]

    @property
    def n_head(self):
        return self.dim_att // self.head_size

    def fingerprint(self):
        """The sizes an adapter must agree with (saved in adapter files)."""
        return {k: asdict(self)[k] for k in ("vocab_size", "n_embd", "n_layer", "dim_ffn", "head_size")}

    def shapes(self):
        """Every official key, in the official order, with its shape."""
        C, A, F, V = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size
        out = OrderedDict({"emb.weight": (V, C)})
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            for ln in ("ln1", "ln2") + (("ln0",) if i == 0 else ()):
                out[f"{b}{ln}.weight"] = out[f"{b}{ln}.bias"] = (C,)
            for m in "xwkvrg":
                out[f"{b}att.time_maa_{m}"] = (1, 1, C)
            out[f"{b}att.time_maa_w1"] = (C, 5 * self.mix_lora)
            out[f"{b}att.time_maa_w2"] = (5, self.mix_lora, C)
            out[f"{b}att.time_decay"] = (1, 1, A)
            out[f"{b}att.time_decay_w1"] = (C, self.decay_lora)
            out[f"{b}att.time_decay_w2"] = (self.decay_lora, A)
            out[f"{b}att.time_faaaa"] = (self.n_head, self.head_size)
            for name in ("receptance", "key", "value"):
                out[f"{b}att.{name}.weight"] = (A, C)
            out[f"{b}att.output.weight"] = (C, A)
            out[f"{b}att.gate.weight"] = (A, C)
            out[f"{b}att.ln_x.weight"] = out[f"{b}att.ln_x.bias"] = (A,)
            out[f"{b}ffn.time_maa_k"] = out[f"{b}ffn.time_maa_r"] = (1, 1, C)
            out[f"{b}ffn.key.weight"] = (F, C)
            out[f"{b}ffn.receptance.weight"] = (C, C)
            out[f"{b}ffn.value.weight"] = (C, F)
        out["ln_out.weight"] = out["ln_out.bias"] = (C,)
        out["head.weight"] = (V, C)
        return out

    @classmethod
    def from_state_dict(cls, sd, source="the checkpoint"):
        """Read every size off an x060 state dict, or raise CheckpointError saying what is wrong."""
        if not isinstance(sd, dict) or not sd:
            raise CheckpointError(f"{source} is not a dict of tensors, so it is not an RWKV model checkpoint.")
        _refuse_other_versions(sd, source)
        needed = ("emb.weight", "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w2",
                  "blocks.0.att.time_decay_w1", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight")
        missing = [k for k in needed if k not in sd]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)}: it is not an RWKV-6 (x060) checkpoint.")
        V, C = sd["emb.weight"].shape
        H, N = sd["blocks.0.att.time_faaaa"].shape
        layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith(".ln1.weight")}
        config = cls(vocab_size=V, n_embd=C, n_layer=len(layers), dim_att=sd["blocks.0.att.key.weight"].shape[0],
                     dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0], head_size=N,
                     mix_lora=sd["blocks.0.att.time_maa_w2"].shape[1],
                     decay_lora=sd["blocks.0.att.time_decay_w1"].shape[1])
        if layers != set(range(config.n_layer)):
            raise CheckpointError(f"{source} has blocks {sorted(layers)}: layer numbers must run 0..n-1 without gaps.")
        if config.n_head * N != config.dim_att:
            raise CheckpointError(f"{source} has time_faaaa of shape [{H}, {N}], which does not divide dim_att = {config.dim_att} into heads.")
        expected = config.shapes()
        missing = [k for k in expected if k not in sd]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"{source} lacks {', '.join(missing[:3])}{more}: it is not a complete RWKV-6 (x060) checkpoint.")
        extra = [k for k in sd if k not in expected]
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise CheckpointError(f"{source} has unexpected keys {', '.join(extra[:3])}{more}: "
                                  "pass a plain RWKV-6 (x060) checkpoint (merge adapters with merge.py).")
        for k, shape in expected.items():
            if tuple(sd[k].shape) != shape:
                raise CheckpointError(f"{source} has {k} of shape {list(sd[k].shape)}, but the other weights "
                                      f"imply {list(shape)}: the file is inconsistent or not an x060 model.")
        return config


def _refuse_other_versions(sd, source):
    keys = list(sd)
    has = lambda part: any(part in k for k in keys)  # noqa: E731
    if has("att.time_maa_x"):
        return
    if has(".att.x_r") or has(".att.w0") or has(".att.r_k"):
        version = "RWKV-7 (x070)"
    elif has("att.time_mix_k") and has("att.ln_x"):
        version = "RWKV-5"
    elif has("att.time_mix_k"):
        version = "RWKV-4"
    else:
        return  # not recognisably another version: the key checks will name what is missing
    raise CheckpointError(f"{source} is an {version} model; this project fine-tunes RWKV-6 (x060) checkpoints only.")

"""The official checkpoint layouts of the two model families this project fine-tunes, RWKV-6
("x060") and RWKV-7 ("x070"): sizes read off the weights, and the checks that refuse anything
else with one clear sentence. The one home for key names and shapes; `read_config` says which
family a file is."""
from collections import OrderedDict
from dataclasses import asdict, dataclass


class CheckpointError(ValueError):
    """A file that is not a usable RWKV-6 or RWKV-7 checkpoint; the message says why."""


class AdapterFileError(CheckpointError):
    """An adapter file given where a model goes. The message names generate.py's flags; the other
    scripts word it with their own (advice(), through src/cli.py's sentence())."""

    def __init__(self, source):
        self.source = source
        super().__init__(self.advice("--adapter", "--model"))

    def advice(self, adapter_flag, model_flag):
        if adapter_flag is None:    # a script that takes no adapter (export.py)
            return f"{self.source} is an adapter file, not a model: merge it into its base model with merge.py first."
        return (f"{self.source} is an adapter file, not a model: give it as {adapter_flag} and the base model as "
                f"{model_flag}.")


ADAPTER_KEYS = (".bone", ".disha", ".lora_A", ".lora_B")     # adapter tensors (this project's and the older's)


def _is_adapter_file(sd):
    """train.py's adapter files (metadata), or the older repository's: adapter tensors and no
    projection weights (a model with adapter keys added is refused as a model with extra keys)."""
    keys = [k for k in sd if isinstance(k, str)]
    return "__bone_meta__" in sd or (any(k.endswith(ADAPTER_KEYS) for k in keys)
                                     and not any(k.endswith(".att.key.weight") for k in keys))


@dataclass(frozen=True)
class RWKV6Config:
    family = "x060"
    title = "RWKV-6 (x060)"
    # The projections Bone adapts unless told otherwise (module paths under blocks.N).
    default_targets = ("att.receptance", "att.key", "att.value", "att.gate", "att.output",
                       "ffn.key", "ffn.receptance", "ffn.value")
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
        C, A, F = self.n_embd, self.dim_att, self.dim_ffn

        def block(b):
            out = OrderedDict()
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
            return out
        return _layout(self, block)

    @classmethod
    def from_state_dict(cls, sd, source="the checkpoint"):
        """Read every size off an x060 state dict, or raise CheckpointError saying what is wrong."""
        _check_dict(sd, source)
        _require(sd, source, cls.title, ("emb.weight", "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w2",
                                         "blocks.0.att.time_decay_w1", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"))
        V, C = sd["emb.weight"].shape
        H, N = sd["blocks.0.att.time_faaaa"].shape
        config = cls(vocab_size=V, n_embd=C, n_layer=_count_layers(sd, source), dim_att=sd["blocks.0.att.key.weight"].shape[0],
                     dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0], head_size=N,
                     mix_lora=sd["blocks.0.att.time_maa_w2"].shape[1],
                     decay_lora=sd["blocks.0.att.time_decay_w1"].shape[1])
        if config.n_head * N != config.dim_att:
            raise CheckpointError(f"{source} has time_faaaa of shape [{H}, {N}], which does not divide dim_att = {config.dim_att} into heads.")
        _check_layout(config, sd, source)
        return config


@dataclass(frozen=True)
class RWKV7Config:
    """RWKV-7: n_embd = dim_att, head size from r_k, and four low-rank widths (decay w, in-context
    rate a, value residual v, gate g) read off w1, a1, v1, g1."""
    family = "x070"
    title = "RWKV-7 (x070)"
    default_targets = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")

    vocab_size: int
    n_embd: int
    n_layer: int
    dim_ffn: int
    head_size: int
    w_lora: int = 64
    a_lora: int = 64
    v_lora: int = 32
    g_lora: int = 128

    @property
    def dim_att(self):
        return self.n_embd

    @property
    def n_head(self):
        return self.n_embd // self.head_size

    def fingerprint(self):
        """As RWKV6Config's, plus the family (an x060 fingerprint has none: older files stay valid)."""
        return {"family": self.family, **{k: asdict(self)[k] for k in ("vocab_size", "n_embd", "n_layer", "dim_ffn", "head_size")}}

    def shapes(self):
        """Every official key, in the official order (RWKV-LM's x070 parameter order), with its shape."""
        C, F, H, N = self.n_embd, self.dim_ffn, self.n_head, self.head_size

        def block(b):
            out = OrderedDict()
            for m in "rwkvag":
                out[f"{b}att.x_{m}"] = (1, 1, C)
            for name, width in (("w", self.w_lora), ("a", self.a_lora), ("v", self.v_lora)):
                out[f"{b}att.{name}1"] = (C, width)
                out[f"{b}att.{name}2"] = (width, C)
                out[f"{b}att.{name}0"] = (1, 1, C)
            out[f"{b}att.g1"] = (C, self.g_lora)
            out[f"{b}att.g2"] = (self.g_lora, C)
            out[f"{b}att.k_k"] = out[f"{b}att.k_a"] = (1, 1, C)
            out[f"{b}att.r_k"] = (H, N)
            for name in ("receptance", "key", "value", "output"):
                out[f"{b}att.{name}.weight"] = (C, C)
            out[f"{b}att.ln_x.weight"] = out[f"{b}att.ln_x.bias"] = (C,)
            out[f"{b}ffn.x_k"] = (1, 1, C)
            out[f"{b}ffn.key.weight"] = (F, C)
            out[f"{b}ffn.value.weight"] = (C, F)
            return out
        return _layout(self, block)

    @classmethod
    def from_state_dict(cls, sd, source="the checkpoint"):
        """Read every size off an x070 state dict, or raise CheckpointError saying what is wrong."""
        _check_dict(sd, source)
        _require(sd, source, cls.title, ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1",
                                         "blocks.0.att.v1", "blocks.0.att.g1", "blocks.0.ffn.key.weight"))
        V, C = sd["emb.weight"].shape
        H, N = sd["blocks.0.att.r_k"].shape
        if H * N != C:
            raise CheckpointError(f"{source} has r_k of shape [{H}, {N}], which does not divide n_embd = {C} into heads.")
        width = lambda key: sd[f"blocks.0.att.{key}"].shape[-1]  # noqa: E731
        config = cls(vocab_size=V, n_embd=C, n_layer=_count_layers(sd, source), dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
                     head_size=N, w_lora=width("w1"), a_lora=width("a1"), v_lora=width("v1"), g_lora=width("g1"))
        _check_layout(config, sd, source)
        return config


FAMILIES = (RWKV6Config, RWKV7Config)


def read_config(sd, source="the checkpoint"):
    """The config of whichever family the keys say (x070: blocks.0.att.r_k and no time_maa_x;
    x060: the time_maa_* keys), every size read off the tensors; anything else is refused with
    one sentence naming what was found."""
    _check_dict(sd, source)
    if _is_adapter_file(sd):
        raise AdapterFileError(source)
    if is_state_file(sd):
        raise CheckpointError(f"{source} is a state file (initial states only), not a model: give the base model, "
                              "and the state file as generate.py's --state.")
    return family_of(sd, source).from_state_dict(sd, source)


def family_of(sd, source="the checkpoint"):
    """The config class of the family the keys name, or CheckpointError naming what was found."""
    keys = list(sd)
    has = lambda part: any(part in k for k in keys)  # noqa: E731
    if has("att.time_maa_x"):
        return RWKV6Config
    if has(".att.r_k") or has(".att.x_r") or has(".att.w0"):
        return RWKV7Config
    if has("att.time_mix_k"):
        version = "RWKV-5" if has("att.ln_x") else "RWKV-4"
        raise CheckpointError(f"{source} is an {version} model; this project fine-tunes RWKV-6 (x060) and "
                              "RWKV-7 (x070) checkpoints only.")
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    raise CheckpointError(f"{source} holds {shown}, which is neither an RWKV-6 (x060) nor an RWKV-7 (x070) "
                          "checkpoint (no blocks.0.att.time_maa_x or blocks.0.att.r_k).")


def _layout(config, block):
    """emb, then per layer ln1, ln2 (and ln0 in layer 0) and the family's block(prefix) keys,
    then ln_out and head: the order both families' files share."""
    C, V = config.n_embd, config.vocab_size
    out = OrderedDict({"emb.weight": (V, C)})
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2") + (("ln0",) if i == 0 else ()):
            out[f"{b}{ln}.weight"] = out[f"{b}{ln}.bias"] = (C,)
        out.update(block(b))
    out["ln_out.weight"] = out["ln_out.bias"] = (C,)
    out["head.weight"] = (V, C)
    return out


def _check_dict(sd, source):
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{source} is not a dict of tensors, so it is not an RWKV model checkpoint.")


def _require(sd, source, title, needed):
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}: it is not an {title} checkpoint.")


def _check_states(config, sd, source):
    """Every layer's blocks.{i}.att.time_state, each [H, N, N], or none."""
    shape = (config.n_head, config.head_size, config.head_size)
    for i in range(config.n_layer):
        k = f"blocks.{i}.att.time_state"
        if k not in sd:
            raise CheckpointError(f"{source} holds initial states (time_state) for some layers but lacks {k}: "
                                  "a state needs every layer.")
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{source} has {k} of shape {list(sd[k].shape)}, but this model's heads need "
                                  f"{list(shape)}.")


def is_state_file(sd):
    """A state file (state tuning): only blocks.{i}.att.time_state tensors, as the older repository
    and RWKV-Runner keep them."""
    return isinstance(sd, dict) and bool(sd) and all(
        isinstance(k, str) and k.startswith("blocks.") and k.endswith(".att.time_state") for k in sd)


def _count_layers(sd, source):
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith(".ln1.weight")}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"{source} has blocks {sorted(layers)}: layer numbers must run 0..n-1 without gaps.")
    return len(layers)


def _check_layout(config, sd, source):
    """Exactly the official keys of config's family, each of the shape the sizes imply."""
    expected, title = config.shapes(), config.title
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source} lacks {', '.join(missing[:3])}{more}: it is not a complete {title} checkpoint.")
    extra = [k for k in sd if k not in expected]
    states = [f"blocks.{i}.att.time_state" for i in range(config.n_layer)]
    if any(k in states for k in extra):
        # A merged RWKV-6 state tune carries every layer's initial WKV state, as the rwkv package reads it.
        _check_states(config, sd, source)
        extra = [k for k in extra if k not in states]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(f"{source} has unexpected keys {', '.join(extra[:3])}{more}: "
                              f"pass a plain {title} checkpoint (merge adapters with merge.py).")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{source} has {k} of shape {list(sd[k].shape)}, but the other weights "
                                  f"imply {list(shape)}: the file is inconsistent or not an {config.family} model.")

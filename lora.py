"""
Low-rank adaptation (Hu et al., 2021) for the nn.Linear layers of `model.Bert`, with the A-init variance as an
explicit parameter (the paper's second key factor after the rank).

    W x + b  ->  W x + b + s * B A dropout(x),   A: (r, n_in) random,  B: (n_out, r) zeros,  s = alpha / r

B = 0 makes the adapted model start identical to the base. Var(A_ij) = k / n_in for every init type; k = 1/3 is the
reference implementations' default (nn.Linear's kaiming_uniform with a=sqrt(5), as loralib and peft use).

    from lora import apply_lora, save_lora
    counts = apply_lora(model, rank=8, alpha=16, targets="qv", generator=0)   # wraps in place, freezes the rest
    ...train...
    save_lora(model, "adapter.safetensors")          # LoRA A/B + the classifier head
    export_peft(model, "peft_adapter/", base_model_path="path/to/bert")   # loadable with peft.PeftModel

Reads top to bottom: A-init, the layer, the presets and `apply_lora`, then saving, loading and peft export.
"""
import json
import math
import numbers
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import hf_name

# -----------------------------------------------------------------------------
# A initialisation: one variance convention for every distribution

INITS = ("kaiming_uniform", "gaussian", "xavier_normal")


def init_lora_A_(A, init="kaiming_uniform", init_scale=1 / 3, generator=None):
    """Fill A (r, n_in) in place with i.i.d. zero-mean entries of variance init_scale / n_in.

    kaiming_uniform: U(-b, b) with b = sqrt(3 k / n_in); k = 1/3 gives b = 1/sqrt(n_in), nn.Linear's default.
    gaussian: N(0, k / n_in).
    xavier_normal: Glorot's normal init rescaled to the same variance k / n_in, which makes it the same distribution
    as gaussian; the name is kept for the paper's init sweep (App. E.2), whose code used 2 / (n_in + r) instead.
    Drawn on the CPU in float32 then copied, so a seed gives the same A on every device and dtype.
    """
    if init not in INITS:
        raise ValueError(f"--init {init!r} is not one of {', '.join(INITS)}")
    if not init_scale > 0:
        raise ValueError(f"--init-scale must be > 0 (Var(A) = k / n_in), got {init_scale}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    n_in = A.shape[1]
    draw = torch.empty(A.shape, dtype=torch.float32)
    if init == "kaiming_uniform":
        bound = math.sqrt(3 * init_scale / n_in)  # Var(U(-b, b)) = b^2 / 3
        draw.uniform_(-bound, bound, generator=generator)
    else:
        draw.normal_(0.0, math.sqrt(init_scale / n_in), generator=generator)
    with torch.no_grad():
        A.copy_(draw)
    return A


def _check_rank(rank, limit, where):
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= limit:
        raise ValueError(f"--rank {rank!r} is out of range: {where} allows an integer in 1..{limit} "
                         f"(at most min(n_in, n_out), the full rank)")


# -----------------------------------------------------------------------------
# the layer

class LoRALinear(nn.Module):
    """Wraps an existing nn.Linear (kept as `.base`, weight and bias frozen) and adds s * B A on a side path.

    Not a subclass of nn.Linear on purpose: model.Attention fuses q/k/v only when all three are plain nn.Linear.
    """

    def __init__(self, base, rank, alpha=16, init="kaiming_uniform", init_scale=1 / 3, dropout=0.0, rslora=False,
                 freeze_a=False, generator=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        n_out, n_in = base.weight.shape
        _check_rank(rank, min(n_in, n_out), f"a {n_in}->{n_out} linear layer")
        if not alpha > 0:
            raise ValueError(f"--alpha must be > 0, got {alpha}")
        if not 0 <= dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {dropout}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rslora = int(rank), alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank  # rsLoRA (Kalajdzievski, 2023)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(init_lora_A_(torch.empty(rank, n_in, **kw), init, init_scale, generator),
                                   requires_grad=not freeze_a)  # freeze_a: A stays at its init (App. C)
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # B A already lives in base.weight
            return y
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self):
        """Fold s B A into base.weight for inference; `unmerge` undoes it (exact up to float rounding)."""
        if self.merged:
            raise RuntimeError("merge(): this LoRALinear is already merged")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("unmerge(): this LoRALinear is not merged")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self):
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, "
                f"freeze_a={not self.lora_A.requires_grad}, merged={self.merged}")


# -----------------------------------------------------------------------------
# adapting a model by module name

TARGETS = {  # module-name suffixes in model.Bert (see model.py's docstring)
    "qv": ("attn.query", "attn.value"),
    "attn": ("attn.query", "attn.key", "attn.value", "attn.out"),
    "all": ("attn.query", "attn.key", "attn.value", "attn.out", "intermediate", "output", "pooler"),
}


def lora_layers(model):
    """{module name: LoRALinear} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, rank, alpha=16, targets="qv", init="kaiming_uniform", init_scale=1 / 3, dropout=0.0,
               rslora=False, freeze_a=False, generator=None):
    """Wrap the target nn.Linear modules of `model` in LoRALinear, in place, and freeze everything else except
    the classification head (`model.classifier`, always fully trainable: a frozen random head cannot learn).

    targets: a key of TARGETS, or an iterable of module-name suffixes. generator: a torch.Generator or an int seed;
    A matrices are drawn in module order from it, so one seed fixes them all (None: the global RNG).
    Returns {"trainable": int, "total": int} parameter counts of the adapted model.
    """
    if isinstance(targets, str):
        if targets not in TARGETS:
            raise ValueError(f"--targets {targets!r} is not one of {', '.join(TARGETS)}")
        suffixes = TARGETS[targets]
    else:
        suffixes = tuple(targets)
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers; adapt a fresh model")
    found = {name: m for name, m in model.named_modules()
             if type(m) is nn.Linear and any(name == s or name.endswith("." + s) for s in suffixes)}
    if not found:
        raise ValueError(f"--targets {targets!r} matched no nn.Linear module in {type(model).__name__}")
    limit = min(min(m.weight.shape) for m in found.values())
    _check_rank(rank, limit, f"--targets {targets!r} on this model")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)

    model.requires_grad_(False)
    for name, base in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(base, rank, alpha, init, init_scale, dropout, rslora, freeze_a, generator))
    head = getattr(model, "classifier", None)
    if head is not None:
        head.requires_grad_(True)
    return dict(trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                total=sum(p.numel() for p in model.parameters()))


# -----------------------------------------------------------------------------
# saving and loading: LoRA A/B and the head (what training changed)

def lora_state_dict(model):
    """{name: tensor} of every LoRA A and B and the classifier head, detached."""
    if not lora_layers(model):
        raise ValueError("lora_state_dict: the model has no LoRA layers (call apply_lora first)")
    return {n: t.detach() for n, t in model.state_dict().items()
            if n.endswith((".lora_A", ".lora_B")) or n.startswith("classifier.")}


def save_lora(model, path):
    """Write lora_state_dict(model) to a safetensors file; the metadata records each layer's rank and scaling."""
    from safetensors.torch import save_file
    layers = {name: [m.rank, m.scaling] for name, m in lora_layers(model).items()}
    save_file({n: t.contiguous() for n, t in lora_state_dict(model).items()}, path,
              metadata={"format": "lorasec-lora", "layers": json.dumps(layers)})


def load_lora(model, path):
    """Load a save_lora file into a model adapted with the same targets, rank and scaling."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "lorasec-lora":
        raise ValueError(f"{path}: not a lorasec LoRA file (written by save_lora)")
    ours = {name: [m.rank, m.scaling] for name, m in lora_layers(model).items()}
    if any(m.merged for m in lora_layers(model).values()):
        raise RuntimeError("load_lora: unmerge() the model's LoRA layers first")
    theirs = json.loads(meta["layers"])
    if ours != theirs:
        diff = sorted(set(map(str, ours.items())) ^ set(map(str, theirs.items())))
        raise ValueError(f"{path}: LoRA layers (name, [rank, scaling]) differ from the model's: {diff[:4]}")
    state = load_file(path)
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        raise ValueError(f"{path}: missing {sorted(set(expected) - set(state))}, "
                         f"unexpected {sorted(set(state) - set(expected))}")
    bad = [f"{n}: file {tuple(t.shape)} vs model {tuple(expected[n].shape)}" for n, t in state.items()
           if t.shape != expected[n].shape]
    if bad:
        raise ValueError(f"{path}: shapes differ: " + "; ".join(bad))
    model.load_state_dict(state, strict=False)


def export_peft(model, folder, base_model_path=None):
    """Write `folder/adapter_config.json` + `folder/adapter_model.safetensors` in peft's LoRA format, so that
    `PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), folder)` reproduces our model.

    r, lora_alpha, dropout and rsLoRA are read from the model's LoRA layers (they must agree: one peft config).
    Tensor names follow peft: base_model.model.<HF module>.lora_{A,B}.weight; the trained head is a peft
    `modules_to_save` entry, stored (as peft stores it) under base_model.model.classifier.{weight,bias}.
    """
    from safetensors.torch import save_file
    layers = lora_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no LoRA layers (call apply_lora first)")
    settings = {(m.rank, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"export_peft: LoRA layers differ in (rank, alpha, rslora, dropout): {sorted(settings)}")
    (rank, alpha, rslora, dropout), = settings
    tensors = {}
    for name, m in layers.items():
        prefix = f"base_model.model.{hf_name(name)}"
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = m.lora_B.detach().contiguous()
    for n, p in model.classifier.named_parameters():
        tensors[f"base_model.model.classifier.{n}"] = p.detach().contiguous()
    config = dict(peft_type="LORA", task_type="SEQ_CLS", base_model_name_or_path=base_model_path,
                  r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, bias="none",
                  fan_in_fan_out=False, target_modules=[hf_name(n) for n in layers],
                  modules_to_save=["classifier"], init_lora_weights=True, inference_mode=True)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})

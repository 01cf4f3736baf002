"""
Low-rank adaptation (Hu et al., 2021) for the nn.Linear layers of `model.Encoder` (BERT or MPNet), with the A-init
variance as an explicit parameter (the paper's second key factor after the rank).

    W x + b  ->  W x + b + s * B A dropout(x),   A: (r, n_in) random,  B: (n_out, r) zeros,  s = alpha / r

B = 0 makes the adapted model start identical to the base. Var(A_ij) = k / n_in for every init type; k = 1/3 is the
reference implementations' default (nn.Linear's kaiming_uniform with a=sqrt(5), as loralib and peft use).

Beyond random A, the init zoo (issue 12), each one string of `--init` and each matching Hugging Face peft 0.21.2:
    pissa       A, B = the top-r singular triplets of W; the base becomes the residual W - s B0 A0
    olora       A, B = the first r rows of R / columns of Q of W = Q R; the base becomes W - s B0 A0
    mica        B = the r minor left singular vectors of W, frozen; A = 0 trains; the base is unchanged
    orthogonal  A, B from one random orthogonal matrix with B A = 0; the base is unchanged
    dora        random A (kaiming_uniform, k honoured), B = 0, plus DoRA's trainable magnitude vector m
All of them start at the base model's output (up to float rounding).

    from lora import apply_lora, save_lora
    counts = apply_lora(model, rank=8, alpha=16, targets="qv", generator=0)   # wraps in place, freezes the rest
    ...train...
    save_lora(model, "adapter.safetensors")          # LoRA A/B + the classifier head
    export_peft(model, "peft_adapter/", base_model_path="path/to/model")  # loadable with peft.PeftModel

Reads top to bottom: A-init, the init zoo, the layer, the presets and `apply_lora`, then save, load and peft export.
"""
import json
import math
import numbers
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from model import hf_name, read_safetensors, write_safetensors

# -----------------------------------------------------------------------------
# A initialisation: one variance convention for every distribution

RANDOM_A_INITS = ("kaiming_uniform", "gaussian", "xavier_normal")  # B = 0, A drawn with Var(A) = k / n_in
RESIDUAL_INITS = ("pissa", "olora")  # A, B taken out of W: the base weight becomes the residual W - s B0 A0
INITS = RANDOM_A_INITS + ("pissa", "mica", "olora", "orthogonal", "dora")
DEFAULT_INIT_SCALE = 1 / 3


def _cpu64(t):
    return t.detach().to("cpu", torch.float64)


def _as_generator(generator):
    """An int seed -> a fresh CPU torch.Generator; a Generator or None (the global RNG) as is."""
    return torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator


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
    if init not in RANDOM_A_INITS:
        raise ValueError(f"--init {init!r} does not draw A with Var(A) = k / n_in: init_lora_A_ takes one of "
                         f"{', '.join(RANDOM_A_INITS)} (LoRALinear builds the others)")
    if not init_scale > 0:
        raise ValueError(f"--init-scale must be > 0 (Var(A) = k / n_in), got {init_scale}")
    generator = _as_generator(generator)
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


def _check_init(init, init_scale, rank, freeze_a):
    """One clear error per flag combination that cannot mean anything (checked before any weight changes)."""
    if init not in INITS:
        raise ValueError(f"--init {init!r} is not one of {', '.join(INITS)}")
    if init not in RANDOM_A_INITS + ("dora",) and init_scale != DEFAULT_INIT_SCALE:
        raise ValueError(f"--init-scale {init_scale} has no effect with --init {init} (A is not drawn with "
                         f"Var(A) = k / n_in); leave --init-scale at its default 1/3")
    if init == "orthogonal" and rank % 2:
        raise ValueError(f"--rank {rank} must be even with --init orthogonal (A and B each get r/2 rows of one "
                         f"r x r orthogonal matrix); use --rank {rank + 1}")
    if init == "mica" and freeze_a:
        raise ValueError("--freeze-a with --init mica would train nothing (MiCA freezes B and trains only A); "
                         "drop --freeze-a")


# -----------------------------------------------------------------------------
# the init zoo: (A, B) from the base weight W (n_out, n_in) or, for orthogonal, from a seed. Decompositions run on
# the CPU in float64, so a base model gives the same factors on every device and dtype.

def pissa_factors(W, rank, scaling):
    """PiSSA (Meng et al., 2024): W = U S V^T, and the top-r triplets are split evenly, A = S_r^1/2 V_r^T and
    B = U_r S_r^1/2. The paper has no LoRA scaling s; as peft does, S_r is divided by s so that s B A = U_r S_r V_r^T
    exactly, and the residual W - s B A holds the rest of the spectrum whatever alpha is."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[:rank] / scaling).sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root


def olora_factors(W, rank):
    """OLoRA (Büyükakyüz, 2024): W = Q R, B = Q[:, :r] (orthonormal columns), A = R[:r] (upper trapezoidal).
    As in peft (whose OLoRA is the author's), s is not divided out: the residual W - s B A is exact for any s, but for
    s != 1 it is not W's QR tail."""
    Q, R = torch.linalg.qr(W)
    return R[:rank], Q[:, :rank]


def mica_factors(W, rank):
    """MiCA (Rüdiger & Raschka, 2026, arXiv:2604.01694): B = the r left singular vectors of W with the smallest
    singular values (unscaled, frozen), A = 0 (trained), so every update s B A lies in W's minor output subspace and
    the base needs no residual. As peft, from the reduced SVD: for n_out > n_in, W's n_out - n_in null directions of
    the output are not candidates."""
    U = torch.linalg.svd(W, full_matrices=False)[0]
    return torch.zeros(rank, W.shape[1], dtype=W.dtype), U[:, -rank:]


def orthogonal_factors(n_in, n_out, rank, generator=None):
    """peft's init_lora_weights="orthogonal": Q = qr(X) for a Gaussian r x r X; A = (G_A Q_odd)^T / 10 and
    B = G_B^T Q_even / 10 with Gaussian G_A (n_in, r/2), G_B (r/2, n_out), Q_odd/Q_even Q's even/odd-indexed rows.
    Q's rows are orthonormal, so B A = G_B^T (Q_even Q_odd^T) G_A^T / 100 = 0: the base is unchanged and both A and B
    are non-zero. Drawn in peft's order (X, G_A, G_B), float32 on the CPU, so a seed reproduces peft's factors."""
    X = torch.randn(rank, rank, generator=generator)
    Q = torch.linalg.qr(X)[0]
    A = (torch.randn(n_in, rank // 2, generator=generator) @ Q[0::2]).T / 10.0
    B = torch.randn(rank // 2, n_out, generator=generator).T @ Q[1::2] / 10.0
    return A, B


def initial_factors(init, W, rank, scaling, init_scale=DEFAULT_INIT_SCALE, generator=None):
    """(A (r, n_in), B (n_out, r)) on the CPU for any init in INITS; W is the base weight (n_out, n_in)."""
    n_out, n_in = W.shape
    if init in RANDOM_A_INITS + ("dora",):  # DoRA starts from LoRA's default A (peft: use_dora with the default init)
        a_init = "kaiming_uniform" if init == "dora" else init
        A = init_lora_A_(torch.empty(rank, n_in), a_init, init_scale, generator)
        return A, torch.zeros(n_out, rank)
    if init == "orthogonal":
        return orthogonal_factors(n_in, n_out, rank, _as_generator(generator))
    W = _cpu64(W)
    if init == "pissa":
        return pissa_factors(W, rank, scaling)
    if init == "olora":
        return olora_factors(W, rank)
    return mica_factors(W, rank)


# -----------------------------------------------------------------------------
# the layer

class LoRALinear(nn.Module):
    """Wraps an existing nn.Linear (kept as `.base`, weight and bias frozen) and adds s * B A on a side path.

    init (see INITS): pissa/olora replace base.weight by the residual W - s B0 A0 and keep A0, B0 as buffers (load_lora
    and export_peft need them); mica freezes B; dora adds the trainable magnitude `lora_magnitude` (n_out,).
    init_scale applies to the random A of RANDOM_A_INITS and dora only; the other inits reject a non-default value.
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
        _check_init(init, init_scale, rank, freeze_a)
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rslora, self.init = int(rank), alpha, rslora, init
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank  # rsLoRA (Kalajdzievski, 2023)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        A, B = initial_factors(init, base.weight, rank, self.scaling, init_scale, generator)
        self.lora_A = nn.Parameter(A.to(**kw), requires_grad=not freeze_a)  # freeze_a: A stays at its init (App. C)
        self.lora_B = nn.Parameter(B.to(**kw), requires_grad=init != "mica")  # MiCA trains A only
        if init in RESIDUAL_INITS:  # zeros: base.weight is W - s 0 0; the rebase makes it W - s B0 A0
            self.register_buffer("lora_A0", torch.zeros_like(self.lora_A.detach()))
            self.register_buffer("lora_B0", torch.zeros_like(self.lora_B.detach()))
            self._rebase(self.lora_A.detach(), self.lora_B.detach())
        self.lora_magnitude = nn.Parameter(self._weight_norm()) if init == "dora" else None  # DoRA: m = ||W||_row
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
        if self.merged:  # B A (and DoRA's rescaling) already live in base.weight
            return y
        x = self.dropout(x)
        side = self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
        if self.lora_magnitude is None:
            return y + side
        # DoRA (Liu et al., 2024) Eq. (5): W' = m (W + s B A) / ||W + s B A||_c, written as a correction to the base
        # output with dropout on the adapter's input as peft does; without dropout it is exactly W' x + b.
        g = self.dora_scale()
        return y + (g - 1) * F.linear(x, self.base.weight) + g * side

    def _weight_norm(self):
        """||W + s B A|| per output row (the paper's ||.||_c with its weight stored (n_in, n_out); peft and DoRA's code
        take dim=1 of nn.Linear's (n_out, n_in)), detached: DoRA Sec. 4.3 treats it as a constant, as peft does."""
        return torch.linalg.norm(self.base.weight + self.delta_weight().detach(), dim=1).detach()

    def dora_scale(self):
        """g = m / ||W + s B A||_row, the factor DoRA applies to each output row of W + s B A."""
        return self.lora_magnitude / self._weight_norm()

    def delta_weight(self):
        """s B A: the LoRA update (for DoRA only its additive part; the row rescaling comes on top)."""
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into base.weight for inference; `unmerge` undoes it (exact up to float rounding)."""
        if self.merged:
            raise RuntimeError("merge(): this LoRALinear is already merged")
        if self.lora_magnitude is None:
            self.base.weight += self.delta_weight()
        else:  # W <- g (W + s B A); g is kept because it cannot be recomputed from the merged weight
            self._merged_scale = self.dora_scale()
            self.base.weight.copy_(self._merged_scale[:, None] * (self.base.weight + self.delta_weight()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("unmerge(): this LoRALinear is not merged")
        if self.lora_magnitude is None:
            self.base.weight -= self.delta_weight()
        else:
            self.base.weight.copy_(self.base.weight / self._merged_scale[:, None] - self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def _rebase(self, A0, B0):
        """PiSSA/OLoRA: make base.weight the residual W - s B0 A0 for these (A0, B0) instead of the buffers' ones.
        The original W = base.weight + s B0_buf A0_buf; float64 on the CPU, so a rebase adds one rounding at most."""
        if torch.equal(A0, self.lora_A0) and torch.equal(B0, self.lora_B0):
            return
        W = _cpu64(self.base.weight) + self.scaling * (_cpu64(self.lora_B0) @ _cpu64(self.lora_A0) -
                                                       _cpu64(B0) @ _cpu64(A0))
        self.base.weight.copy_(W)
        self.lora_A0.copy_(A0)
        self.lora_B0.copy_(B0)

    def extra_repr(self):
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, init={self.init}, "
                f"freeze_a={not self.lora_A.requires_grad}, merged={self.merged}")


# -----------------------------------------------------------------------------
# adapting a model by module name

TARGETS = {  # module-name suffixes in model.Encoder, the same in both families (model.py's docstring; MPNet: no pooler)
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
    _check_init(init, init_scale, rank, freeze_a)  # before anything changes: residual inits rewrite base weights
    generator = _as_generator(generator)

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
# saving and loading: LoRA A/B and the head (what training changed), plus what the init zoo needs to rebuild
# the model: PiSSA/OLoRA's initial A0, B0 (the base is W - s B0 A0) and DoRA's magnitude m

SAVED = (".lora_A", ".lora_B", ".lora_A0", ".lora_B0", ".lora_magnitude")


def lora_state_dict(model):
    """{name: tensor} of every LoRA A and B (and A0, B0, m where the init has them) and the classifier head."""
    if not lora_layers(model):
        raise ValueError("lora_state_dict: the model has no LoRA layers (call apply_lora first)")
    return {n: t.detach() for n, t in model.state_dict().items() if n.endswith(SAVED) or n.startswith("classifier.")}


def _init_kind(init):
    """What a saved file must agree on: the random-A inits differ only in A's draw, which the file overwrites."""
    return "random A" if init in RANDOM_A_INITS else init


def save_lora(model, path):
    """Write lora_state_dict(model) to a safetensors file; the metadata records each layer's rank, scaling and init."""
    layers = {name: [m.rank, m.scaling] for name, m in lora_layers(model).items()}
    inits = {name: m.init for name, m in lora_layers(model).items()}
    write_safetensors(path, {n: t.contiguous() for n, t in lora_state_dict(model).items()},
                      metadata={"format": "lorasec-lora", "layers": json.dumps(layers), "inits": json.dumps(inits)})


def load_lora(model, path):
    """Load a save_lora file into a model adapted with the same targets, rank, scaling and init.

    PiSSA/OLoRA: the base is rebuilt as W - s B0 A0 with the file's A0, B0 (the model's own W = base + s B0 A0 from
    its init), so the logits are the saved model's even where this machine's SVD/QR differ from the saving one's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    state, meta = read_safetensors(path)
    if meta.get("format") != "lorasec-lora":
        raise ValueError(f"{path}: not a lorasec LoRA file (written by save_lora)")
    ours = {name: [m.rank, m.scaling] for name, m in lora_layers(model).items()}
    if any(m.merged for m in lora_layers(model).values()):
        raise RuntimeError("load_lora: unmerge() the model's LoRA layers first")
    theirs = json.loads(meta["layers"])
    if ours != theirs:
        diff = sorted(set(map(str, ours.items())) ^ set(map(str, theirs.items())))
        raise ValueError(f"{path}: LoRA layers (name, [rank, scaling]) differ from the model's: {diff[:4]}")
    saved_inits = json.loads(meta.get("inits", "{}"))  # files from before the init zoo: random A
    mismatched = sorted({(saved_inits.get(name, "kaiming_uniform"), m.init) for name, m in lora_layers(model).items()
                         if _init_kind(saved_inits.get(name, "kaiming_uniform")) != _init_kind(m.init)})
    if mismatched:
        (saved, used), *_ = mismatched
        raise ValueError(f"{path}: saved with --init {saved} but the model was adapted with --init {used}; "
                         f"adapt it with --init {saved}")
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        raise ValueError(f"{path}: missing {sorted(set(expected) - set(state))}, "
                         f"unexpected {sorted(set(state) - set(expected))}")
    bad = [f"{n}: file {tuple(t.shape)} vs model {tuple(expected[n].shape)}" for n, t in state.items()
           if t.shape != expected[n].shape]
    if bad:
        raise ValueError(f"{path}: shapes differ: " + "; ".join(bad))
    for name, m in lora_layers(model).items():
        if m.init in RESIDUAL_INITS:
            m._rebase(state[f"{name}.lora_A0"].to(m.lora_A0), state[f"{name}.lora_B0"].to(m.lora_B0))
    model.load_state_dict(state, strict=False)


def export_peft(model, folder, base_model_path=None):
    """Write `folder/adapter_config.json` + `folder/adapter_model.safetensors` in peft's LoRA format, so that
    `PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), folder)` reproduces our model
    (MPNet: MPNetForSequenceClassification; model.cfg.hf_class names it).

    r, lora_alpha, dropout, rsLoRA and the init are read from the model's LoRA layers (they must agree: one peft
    config). Tensor names follow peft: base_model.model.<HF module>.lora_{A,B}.weight (DoRA: also
    .lora_magnitude_vector); the trained head is a peft `modules_to_save` entry, stored (as peft stores it) under
    base_model.model.classifier.{weight,bias} (MPNet: classifier.{dense,out_proj}.*). Per init, relative to the
    ORIGINAL base model:
      random A, orthogonal: plain LoRA (orthogonal never changed the base; init_lora_weights=True so that loading
        does not spend peft's global RNG on a draw the file overwrites);
      mica: plain LoRA with init_lora_weights="mica", so that peft keeps B frozen if training continues;
      dora: use_dora=True with the magnitude vector;
      pissa, olora: peft's own conversion (save_pretrained's path_initial_model_for_weight_conversion): our base is
        W - s B0 A0, so relative to W the update is s (B A - B0 A0) = s [B, -B0] [A; A0], a rank-2r LoRA, with
        lora_alpha doubled (times sqrt 2 for rsLoRA) so that the scaling stays s.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no LoRA layers (call apply_lora first)")
    settings = {(m.rank, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0), _init_kind(m.init)) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"export_peft: LoRA layers differ in (rank, alpha, rslora, dropout, init): {sorted(settings)}")
    (rank, alpha, rslora, dropout, init), = settings
    tensors, family = {}, model.cfg.model_type
    for name, m in layers.items():
        prefix = f"base_model.model.{hf_name(name, family)}"
        A, B = m.lora_A.detach(), m.lora_B.detach()
        if init in RESIDUAL_INITS:
            A, B = torch.cat([A, m.lora_A0]), torch.cat([B, -m.lora_B0], dim=1)
        tensors[f"{prefix}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
        if init == "dora":
            tensors[f"{prefix}.lora_magnitude_vector"] = m.lora_magnitude.detach().contiguous()
    for n, p in model.classifier.named_parameters():
        tensors[f"base_model.model.classifier.{n}"] = p.detach().contiguous()
    if init in RESIDUAL_INITS:
        rank, alpha = 2 * rank, alpha * (math.sqrt(2) if rslora else 2)
    config = dict(peft_type="LORA", task_type="SEQ_CLS", base_model_name_or_path=base_model_path,
                  r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, bias="none",
                  fan_in_fan_out=False, target_modules=[hf_name(n, family) for n in layers],
                  modules_to_save=["classifier"], init_lora_weights="mica" if init == "mica" else True,
                  use_dora=init == "dora", inference_mode=True)
    os.makedirs(folder, exist_ok=True)
    cli.write_json(os.path.join(folder, "adapter_config.json"), config)
    write_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
